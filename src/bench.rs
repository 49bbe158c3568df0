//! `billsync bench`: the throughput harness, against the built-in simulators on loopback.
//!
//! The simulators run in a child process (`billsync bench-sim`, hidden) so that the peak RSS
//! reported (`VmHWM`) is billsync's own: the Lago simulator keeps every event it stores. The
//! child prints its URLs as one JSON line and then answers `stats` / `rate N` / `quit` lines
//! on its standard input.
//!
//! Data: [`MetalsoftDataset::generated`] (instances, drives, shared drives, subnets, data lakes,
//! network waypoints over 1–3 infrastructures per user) with `RESOURCES_PER_USER` resources per
//! user over `--days` daily windows (default [`DEFAULT_DAYS`]); the number of users is chosen
//! from a sample so that the run pulls about `--records` records. More days at the same
//! records is a backfill: fewer users, each pulled over a longer period. Every user has an
//! entry in a generated account directory, and the rules are the shipped MetalSoft example
//! rules.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};

use crate::config::Secret;
use crate::http::RetryPolicy;
use crate::ledger::Ledger;
use crate::mapping::{MappingSet, EXAMPLE_MAPPINGS};
use crate::observe::outln;
use crate::providers::metalsoft::{
    parse_report_str, MetalsoftConfig, MetalsoftProvider, ReportContext,
};
use crate::simulators::lago::{LagoSim, LagoSimConfig};
use crate::simulators::metalsoft::{MetalsoftDataset, MetalsoftSim};
use crate::sinks::lago::{LagoConfig, LagoSink};
use crate::sync::{Pipeline, SyncOptions, Timings};

const MS_KEY: &str = "bench-metalsoft-key";
const LAGO_KEY: &str = "bench-lago-key";
/// Metered resources per user (plus 2–6 network waypoints).
pub const RESOURCES_PER_USER: usize = 100;
/// Daily windows pulled per user, unless `--days` says otherwise.
pub const DEFAULT_DAYS: i64 = 7;
/// Days of the sample that [`users_for`] measures, spread over the period: half the resources
/// live through it, the rest a random part of it, so its middle days have more records than
/// its first and last.
const SAMPLE_DAYS: i64 = 7;
/// The longest period `--days` accepts (a year's backfill).
pub const MAX_DAYS: i64 = 366;
const SEED: u64 = 42;
const SAMPLE_USERS: u64 = 20;

/// Options of `billsync bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub records: u64,
    /// Daily windows per user (the period pulled).
    pub days: i64,
    pub ledger: Option<PathBuf>,
    pub rate: Option<u32>,
    pub baseline: bool,
    pub baseline_records: u64,
    pub noop: bool,
    pub stage_only: bool,
    /// Logs are JSON: progress goes to the log instead of bars (as for `sync`).
    pub json_logs: bool,
    /// The figures as one JSON line at the end instead of text lines.
    pub json_output: bool,
}

fn period_start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0)
        .single()
        .expect("valid date")
}

fn period_end(days: i64) -> DateTime<Utc> {
    period_start() + chrono::Duration::days(days)
}

/// "Now" of every bench run: every window has settled.
fn bench_now(days: i64) -> DateTime<Utc> {
    period_end(days) + chrono::Duration::hours(3)
}

/// Users needed for about `records` records over `days` daily windows (measured on the first
/// users of the dataset, on days spread over the period).
pub fn users_for(records: u64, days: i64) -> u64 {
    let sample = MetalsoftDataset::generated(
        SAMPLE_USERS,
        RESOURCES_PER_USER,
        SEED,
        period_start(),
        period_end(days),
    );
    let sample_days = days.min(SAMPLE_DAYS);
    let mut sampled = 0u64;
    for user_id in 1..=SAMPLE_USERS {
        for k in 0..sample_days {
            let w = k * days / sample_days;
            let start = period_start() + chrono::Duration::days(w);
            let end = start + chrono::Duration::days(1);
            let answer = String::from_utf8(sample.report_json(user_id, start, end, None))
                .unwrap_or_default();
            let ctx = ReportContext {
                source: "bench".into(),
                billing_account_id: "bench".into(),
                user_id,
                window_start: start,
                window_end: end,
                settled: true,
            };
            sampled += parse_report_str(&answer, &ctx).map_or(0, |r| r.len() as u64);
        }
    }
    let per_user =
        (sampled as f64 / SAMPLE_USERS as f64 * days as f64 / sample_days as f64).max(1.0);
    ((records as f64 / per_user).round() as u64).max(1)
}

/// The hidden `bench-sim` command: serve both simulators until `quit` or end of input.
pub async fn serve_simulators(users: u64, days: i64, rate: Option<u32>) -> anyhow::Result<u8> {
    let dataset = MetalsoftDataset::generated(
        users,
        RESOURCES_PER_USER,
        SEED,
        period_start(),
        period_end(days),
    );
    let metalsoft = MetalsoftSim::start(dataset, MS_KEY).await?;
    let lago = LagoSim::start(LagoSimConfig {
        api_key: LAGO_KEY.into(),
        ..Default::default()
    })
    .await?;
    lago.set_lean(true);
    lago.set_rate_limit(rate);
    let hello = json!({"metalsoft": metalsoft.url, "lago": lago.url});
    outln!("{hello}");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("stats") => {
                let stats = json!({
                    "events": lago.event_count(),
                    "requests": lago.request_count(),
                    "throttled": lago.throttled_count(),
                    "metalsoft_requests": metalsoft.request_count(),
                    "cpu_seconds": cpu_seconds(),
                });
                outln!("{stats}");
            }
            Some("rate") => {
                let r: u32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                lago.set_rate_limit((r > 0).then_some(r));
                outln!("{{}}");
            }
            Some("quit") => break,
            _ => outln!("{{\"error\":\"unknown command\"}}"),
        }
        let _ = std::io::stdout().flush();
    }
    lago.shutdown().await;
    metalsoft.shutdown().await;
    Ok(0)
}

/// The simulators' child process.
struct Simulators {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    metalsoft: String,
    lago: String,
}

#[derive(Debug, Clone, Copy, Default)]
struct SimStats {
    events: u64,
    requests: u64,
    throttled: u64,
    /// The simulators' process: user + system CPU time so far.
    cpu_seconds: f64,
}

impl Simulators {
    fn start(users: u64, days: i64, rate: Option<u32>) -> anyhow::Result<Simulators> {
        let exe = std::env::current_exe().context("finding the billsync binary")?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "bench-sim",
            "--users",
            &users.to_string(),
            "--days",
            &days.to_string(),
        ]);
        if let Some(r) = rate {
            cmd.args(["--rate", &r.to_string()]);
        }
        let mut child = cmd
            .env("BILLSYNC_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the simulators")?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let hello: Value =
            serde_json::from_str(&line).with_context(|| format!("simulators said {line:?}"))?;
        let url = |k: &str| {
            hello[k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("simulators did not say their {k} URL"))
        };
        Ok(Simulators {
            metalsoft: url("metalsoft")?,
            lago: url("lago")?,
            child,
            stdin,
            stdout,
        })
    }

    fn ask(&mut self, command: &str) -> anyhow::Result<Value> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(serde_json::from_str(&line)?)
    }

    fn stats(&mut self) -> anyhow::Result<SimStats> {
        let v = self.ask("stats")?;
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok(SimStats {
            events: n("events"),
            requests: n("requests"),
            throttled: n("throttled"),
            cpu_seconds: v["cpu_seconds"].as_f64().unwrap_or(0.0),
        })
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// The bench mapping set: the shipped MetalSoft rules and one account per user.
fn mappings(users: u64) -> anyhow::Result<MappingSet> {
    let mut csv =
        String::from("provider,sub_account_id,external_subscription_id,external_customer_id\n");
    for u in 1..=users {
        csv.push_str(&format!("metalsoft,{u},sub_bench_{u},cust_bench_{u}\n"));
    }
    let mut sources = vec![
        (
            "bench/customers.yaml".to_string(),
            "version: 1\ncustomers_csv: accounts.csv\n".to_string(),
        ),
        ("bench/accounts.csv".to_string(), csv),
    ];
    for (name, text) in EXAMPLE_MAPPINGS {
        if name.ends_with("metalsoft.yaml") {
            sources.push(("bench/metalsoft.yaml".to_string(), text.to_string()));
        }
    }
    Ok(MappingSet::from_sources(&sources)?)
}

fn pipeline_for(
    sims: &Simulators,
    ledger: Ledger,
    users: u64,
    look_back: chrono::Duration,
) -> anyhow::Result<Pipeline> {
    let mut ms = MetalsoftConfig::new(
        sims.metalsoft.clone(),
        Secret::new(MS_KEY),
        (1..=users).collect(),
        period_start(),
    );
    ms.window = chrono::Duration::days(1);
    ms.look_back = Some(look_back);
    ms.settle_delay = chrono::Duration::hours(2);
    let sink = LagoSink::new(
        "lago".into(),
        LagoConfig {
            api_url: sims.lago.clone(),
            api_key: Secret::new(LAGO_KEY),
            batch_size: 100,
            timeout: Duration::from_secs(30),
            retry: RetryPolicy {
                max_retries: 10,
                min_delay: Duration::from_millis(100),
                max_delay: Duration::from_secs(10),
            },
        },
    )?;
    let mut pipeline = Pipeline::new(
        ledger,
        vec![Box::new(MetalsoftProvider::new(
            "metalsoft_bench".into(),
            ms,
        )?)],
        vec![Box::new(sink)],
        mappings(users)?,
    );
    pipeline.timings = Some(Arc::new(Timings::default()));
    Ok(pipeline)
}

/// User + system CPU time of this process (all its threads) so far, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: `rusage` is a plain C struct, for which all zeroes is a valid value, and
    // `getrusage` only writes into the one it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Peak resident set size of this process, in kB (`VmHWM`).
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Records per second, when the time is not zero.
fn per_second(n: u64, d: Duration) -> Option<f64> {
    (!d.is_zero()).then(|| n as f64 / d.as_secs_f64())
}

/// What a bench run measured: printed as text lines as the run goes, or as one JSON line at its
/// end (`--output json`, or standard output not a terminal), for scripts that collect figures.
#[derive(Debug, serde::Serialize)]
struct Report {
    users: u64,
    days: i64,
    resources_per_user: usize,
    target_records: u64,
    ledger: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    run: Option<RunFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    noop: Option<NoopFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<BaselineFigures>,
}

#[derive(Debug, serde::Serialize)]
struct RunFigures {
    pulled: u64,
    staged_new: u64,
    sent: u64,
    held: u64,
    ignored: u64,
    failed: u64,
    /// pull, map, stage, push, ack: busy seconds and records per busy second.
    stages: Vec<StageFigures>,
    seconds: f64,
    records_per_second: Option<f64>,
    lago_events: u64,
    lago_requests: u64,
    lago_throttled: u64,
    billsync_cpu_seconds: f64,
    simulators_cpu_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit: Option<RateFigures>,
    peak_rss_kb: u64,
}

#[derive(Debug, serde::Serialize)]
struct StageFigures {
    stage: &'static str,
    busy_seconds: f64,
    records_per_second: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
struct RateFigures {
    requests_per_second: u32,
    accepted_batches: u64,
    ideal_seconds: f64,
    push_phase_seconds: f64,
}

#[derive(Debug, serde::Serialize)]
struct NoopFigures {
    ledger_records: i64,
    /// Each sync: milliseconds, records pulled and sent, simulator requests.
    syncs: Vec<NoopSync>,
    min_ms: f64,
    median_ms: f64,
}

#[derive(Debug, serde::Serialize)]
struct NoopSync {
    ms: f64,
    pulled: u64,
    sent: u64,
    simulator_requests: u64,
}

#[derive(Debug, serde::Serialize)]
struct BaselineFigures {
    users: u64,
    target_records: u64,
    pulled: u64,
    events: u64,
    seconds: f64,
    records_per_second: f64,
    /// billsync's end-to-end records/s over the baseline's.
    ratio: f64,
}

/// Run the benchmark and print its figures.
pub async fn run(opts: &BenchOptions) -> anyhow::Result<u8> {
    let days = opts.days;
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(anyhow!(
            "--days must be between 1 and {MAX_DAYS}, not {days}"
        ));
    }
    let users = users_for(opts.records, days);
    let tmp;
    let dir: PathBuf = match &opts.ledger {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir)?;
    let ledger_path = dir.join("ledger.db");
    let mut report = Report {
        users,
        days,
        resources_per_user: RESOURCES_PER_USER,
        target_records: opts.records,
        ledger: ledger_path.display().to_string(),
        run: None,
        noop: None,
        baseline: None,
    };
    if !opts.json_output {
        outln!(
            "billsync bench: {users} MetalSoft users × {RESOURCES_PER_USER} resources × {days} daily windows (target {} records); ledger {}",
            opts.records,
            ledger_path.display()
        );
    }
    let mut sims = Simulators::start(users, days, opts.rate)?;
    let result = bench_with(opts, &mut sims, &mut report, &dir, &ledger_path).await;
    sims.quit();
    result?;
    if opts.json_output {
        outln!("{}", serde_json::to_string(&report)?);
    }
    Ok(0)
}

async fn bench_with(
    opts: &BenchOptions,
    sims: &mut Simulators,
    report: &mut Report,
    dir: &Path,
    ledger_path: &Path,
) -> anyhow::Result<()> {
    let text = !opts.json_output;
    let users = report.users;
    let ledger = Ledger::open(ledger_path).await?;
    if opts.noop {
        // A run with nothing new: every window is already pulled (no look-back), nothing is
        // pending. What is left is the local work: lock, run row, cursors, plan, queries.
        let pipeline = pipeline_for(sims, ledger, users, chrono::Duration::zero())?;
        let mut syncs = Vec::new();
        for _ in 0..7 {
            let before = sims.stats()?;
            let t = Instant::now();
            let summary = pipeline
                .sync(&SyncOptions {
                    now: Some(bench_now(opts.days)),
                    ..Default::default()
                })
                .await?;
            let took = t.elapsed();
            let after = sims.stats()?;
            let sync = NoopSync {
                ms: took.as_secs_f64() * 1000.0,
                pulled: summary.pulled,
                sent: summary.sent,
                simulator_requests: after.requests - before.requests,
            };
            if text {
                outln!(
                    "no-op sync: {:.1} ms (pulled {}, sent {}, simulator requests {})",
                    sync.ms,
                    sync.pulled,
                    sync.sent,
                    sync.simulator_requests
                );
            }
            syncs.push(sync);
        }
        let rows: i64 = pipeline.ledger.record_count().await?;
        let mut ms: Vec<f64> = syncs.iter().map(|s| s.ms).collect();
        ms.sort_by(f64::total_cmp);
        let figures = NoopFigures {
            ledger_records: rows,
            min_ms: ms[0],
            median_ms: ms[ms.len() / 2],
            syncs,
        };
        if text {
            outln!(
                "no-op sync on a ledger of {rows} records: min {:.1} ms, median {:.1} ms (7 runs)",
                figures.min_ms,
                figures.median_ms
            );
        }
        report.noop = Some(figures);
        pipeline.ledger.close().await;
        return Ok(());
    }

    let mut pipeline = pipeline_for(sims, ledger, users, chrono::Duration::days(1))?;
    pipeline.progress = crate::observe::progress(opts.json_logs);
    let before = sims.stats()?;
    let cpu_before = cpu_seconds();
    let t = Instant::now();
    let summary = pipeline
        .sync(&SyncOptions {
            now: Some(bench_now(opts.days)),
            skip_push: opts.stage_only,
            ..Default::default()
        })
        .await?;
    let run_time = t.elapsed();
    let cpu = cpu_seconds() - cpu_before;
    let after = sims.stats()?;
    let timings = pipeline.timings.clone().unwrap_or_default();
    let t = timings.snapshot();
    let pulled = summary.pulled;
    let sent = summary.sent + summary.already_delivered;
    let requests = after.requests - before.requests;
    let throttled = after.throttled - before.throttled;
    let batches = requests - throttled;
    let stage = |stage: &'static str, busy: Duration, records: u64| StageFigures {
        stage,
        busy_seconds: busy.as_secs_f64(),
        records_per_second: per_second(records, busy),
    };
    let figures = RunFigures {
        pulled,
        staged_new: summary.new,
        sent,
        held: summary.held(),
        ignored: summary
            .staged_by_status
            .get("ignored")
            .copied()
            .unwrap_or(0),
        failed: summary.failed,
        stages: vec![
            stage("pull", t.pull, pulled),
            stage("map", t.map, pulled),
            stage("stage", t.stage, pulled),
            stage("push", t.push, sent),
            stage("ack", t.ack, sent),
        ],
        seconds: run_time.as_secs_f64(),
        records_per_second: per_second(pulled, run_time),
        lago_events: after.events - before.events,
        lago_requests: requests,
        lago_throttled: throttled,
        billsync_cpu_seconds: cpu,
        // The simulators share the machine's cores with billsync (see BENCHMARKS.md, Method).
        simulators_cpu_seconds: after.cpu_seconds - before.cpu_seconds,
        rate_limit: opts.rate.map(|r| RateFigures {
            requests_per_second: r,
            accepted_batches: batches,
            ideal_seconds: batches as f64 / f64::from(r),
            push_phase_seconds: t.push_wall.as_secs_f64(),
        }),
        peak_rss_kb: peak_rss_kb().unwrap_or(0),
    };
    if text {
        print_run(&figures);
    }
    let ours = figures.records_per_second.unwrap_or(0.0);
    report.run = Some(figures);
    pipeline.ledger.close().await;

    if opts.baseline {
        let n = opts.baseline_records.min(opts.records);
        let base_users = users_for(n, opts.days);
        if text {
            outln!("naive baseline: bench/naive_baseline.py on the first {base_users} users (about {n} records), same simulators");
        }
        let base_dir = dir.join("naive");
        let _ = std::fs::remove_dir_all(&base_dir);
        std::fs::create_dir_all(&base_dir)?;
        let before = sims.stats()?;
        let script = baseline_script(&base_dir)?;
        let t = Instant::now();
        let out = Command::new("python3")
            .arg(&script)
            .args([
                "--metalsoft",
                &sims.metalsoft,
                "--metalsoft-key",
                MS_KEY,
                "--lago",
                &sims.lago,
                "--lago-key",
                LAGO_KEY,
                "--users",
                &base_users.to_string(),
                "--start",
                &period_start().to_rfc3339(),
                "--days",
                &opts.days.to_string(),
                "--db",
                &base_dir.join("naive.db").to_string_lossy(),
                "--prefix",
                "naive",
            ])
            .output()
            .context("running python3 bench/naive_baseline.py")?;
        let took = t.elapsed();
        let after = sims.stats()?;
        if !out.status.success() {
            return Err(anyhow!(
                "the naive baseline failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let said = String::from_utf8_lossy(&out.stdout);
        let base_pulled: u64 = said
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pulled="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let base_rate = base_pulled as f64 / took.as_secs_f64();
        let base = BaselineFigures {
            users: base_users,
            target_records: n,
            pulled: base_pulled,
            events: after.events - before.events,
            seconds: took.as_secs_f64(),
            records_per_second: base_rate,
            ratio: ours / base_rate.max(f64::MIN_POSITIVE),
        };
        if text {
            outln!(
                "naive baseline: {} records pulled, {} events reached Lago in {:.2}s → {:.0} records/s",
                base.pulled, base.events, base.seconds, base.records_per_second
            );
            outln!(
                "ratio billsync / naive (end to end, records/s): {:.1}×",
                base.ratio
            );
        }
        report.baseline = Some(base);
    }
    Ok(())
}

/// A run's figures as the text lines BENCHMARKS.md quotes.
fn print_run(f: &RunFigures) {
    let rate = |r: Option<f64>| r.map_or_else(|| "-".to_string(), |r| format!("{r:.0}"));
    outln!(
        "records pulled {}, staged new {}, sent {}, held {}, ignored {}, failed {}",
        f.pulled,
        f.staged_new,
        f.sent,
        f.held,
        f.ignored,
        f.failed
    );
    outln!("stage      busy time   records/s");
    for s in &f.stages {
        outln!(
            "{:<10} {:>8.2}s   {:>9}",
            s.stage,
            s.busy_seconds,
            rate(s.records_per_second)
        );
    }
    outln!(
        "end to end {:>8.2}s   {:>9} records/s (pulled records over the whole run)",
        f.seconds,
        rate(f.records_per_second)
    );
    outln!(
        "lago: {} events stored, {} requests, {} answered 429 ({:.2}%)",
        f.lago_events,
        f.lago_requests,
        f.lago_throttled,
        if f.lago_requests > 0 {
            f.lago_throttled as f64 * 100.0 / f.lago_requests as f64
        } else {
            0.0
        }
    );
    let wall = f.seconds.max(f64::MIN_POSITIVE);
    outln!(
        "CPU time: billsync {:.1}s ({:.2} cores), simulators {:.1}s ({:.2} cores)",
        f.billsync_cpu_seconds,
        f.billsync_cpu_seconds / wall,
        f.simulators_cpu_seconds,
        f.simulators_cpu_seconds / wall
    );
    if let Some(r) = &f.rate_limit {
        outln!(
            "rate limit {}/s: {} accepted batches → ideal {:.2}s; push phase took {:.2}s ({:+.1}%)",
            r.requests_per_second,
            r.accepted_batches,
            r.ideal_seconds,
            r.push_phase_seconds,
            (r.push_phase_seconds / r.ideal_seconds - 1.0) * 100.0
        );
    }
    outln!("peak RSS (VmHWM) {:.1} MB", f.peak_rss_kb as f64 / 1024.0);
}

/// `bench/naive_baseline.py`, embedded so the harness works from any directory. Written into
/// the baseline's own directory, which the next run removes (the system's temporary directory
/// kept one script per run).
fn baseline_script(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("naive_baseline.py");
    std::fs::write(&path, include_str!("../bench/naive_baseline.py"))?;
    Ok(path)
}
