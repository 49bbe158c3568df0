//! The command line: parsing, wiring settings into a pipeline, printing, exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{ProviderSettings, Settings, SettingsError, SinkSettings};
use crate::ledger::{Ledger, LedgerError, RecordFilter, Status};
use crate::mapping::MappingSet;
use crate::observe;
use crate::observe::{out, outln};
use crate::providers::jelastic::JelasticProvider;
use crate::providers::metalsoft::MetalsoftProvider;
use crate::providers::sakura::SakuraProvider;
use crate::providers::softlayer::SoftlayerProvider;
use crate::providers::Provider;
use crate::sinks::lago::LagoSink;
use crate::sinks::stripe::StripeSink;
use crate::sinks::Sink;
use crate::sync::{Pipeline, ReplayOptions, RunOutcome, RunSummary, SyncError, SyncOptions};

/// Exit codes (documented in the README).
pub mod exit {
    /// Everything pulled is delivered, ignored on purpose, or waiting to be final.
    pub const OK: u8 = 0;
    /// A runtime failure: a provider failed, the ledger could not be written, ...
    pub const FAILED: u8 = 1;
    /// Bad command line, settings or mapping files, or a ledger written by a newer billsync (a
    /// deployment mismatch). Nothing was pulled or sent.
    pub const CONFIG: u8 = 2;
    /// Another run holds the ledger lock. Nothing was done.
    pub const LOCKED: u8 = 3;
    /// The run completed, but records are left undelivered (pending, unmapped or rejected).
    pub const UNDELIVERED: u8 = 4;
    /// A sink refused the credentials (401/403); its records stay pending.
    pub const SINK_STOPPED: u8 = 5;
    /// Stopped early by SIGTERM/SIGINT after recording everything done; the next run resumes.
    pub const INTERRUPTED: u8 = 6;
    /// `reconcile` found a difference that the ledger does not explain.
    pub const UNRECONCILED: u8 = 7;
    /// A second signal: exited at once. Every ledger write is a transaction, so the ledger is
    /// consistent; the lock expires after `ledger.lock_ttl`.
    pub const FORCED: u8 = 130;
}

#[derive(Debug, Parser)]
#[command(
    name = "billsync",
    version,
    about = "Sync cloud billing usage into invoicing systems, exactly once."
)]
pub struct Cli {
    /// Settings file (YAML); `BILLSYNC__SECTION__KEY` environment variables override it.
    #[arg(
        long,
        short,
        global = true,
        env = "BILLSYNC_CONFIG",
        default_value = "billsync.yaml"
    )]
    pub config: PathBuf,
    /// Log format on standard error: `auto` is text on a terminal and JSON otherwise.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// Run summary on standard output: `auto` is a table on a terminal and one JSON line
    /// otherwise.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub output: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pull every source, map, stage in the ledger and push to the sinks.
    Sync {
        /// Only this source (its configured name) or provider kind.
        #[arg(long)]
        provider: Option<String>,
        /// Pull and map, report what would be staged; write nothing, send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Cursors, counts per status, the last runs and the lock.
    Status {
        /// Also count the records per source and status: a pass over every record (on a
        /// ledger of 10M records ~10 s with its pages cached, a minute cold).
        #[arg(long)]
        by_source: bool,
    },
    /// Re-map held records with today's mapping files and push what now maps.
    Replay {
        /// Which records: `unmapped` (no rule matched), `rejected` (the sink refused them) or
        /// `ignored` (a rule said not billed: after narrowing a rule that ignored too much).
        #[arg(long, value_enum)]
        status: ReplayStatus,
        /// Only records of this source or provider kind.
        #[arg(long)]
        provider: Option<String>,
        /// Only records whose charge period starts at or after this (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_parser = parse_time)]
        since: Option<DateTime<Utc>>,
        /// Only records whose charge period starts before this (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// Only records last handled by this run (see `billsync status`).
        #[arg(long)]
        run: Option<i64>,
        /// Only this record (its key, as `status`, `ledger export` and a rejection name it):
        /// one record checked among others of its run.
        #[arg(long)]
        key: Option<String>,
        /// List what would change, record by record; change nothing, send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why you replay (kept in the ledger's audit trail).
        #[arg(long)]
        reason: String,
    },
    /// Compare provider cost, mapped value, sent value and the sink's read-back for a month.
    Reconcile {
        /// The month, YYYY-MM.
        #[arg(long)]
        period: String,
        /// `table` for a person, `csv` for a spreadsheet.
        #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
        format: ReportFormat,
        /// The time zone of the month's bounds (SAKURA bills JST months: `+09:00`).
        #[arg(long, default_value = "+00:00", allow_hyphen_values = true)]
        utc_offset: String,
    },
    /// Ledger care: export records, prune old sent records.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Mapping files.
    Mappings {
        #[command(subcommand)]
        command: MappingsCommand,
    },
    /// Run a full sync against built-in simulators of MetalSoft, SoftLayer, SAKURA Cloud,
    /// Jelastic and Lago, no account needed.
    Demo {
        /// Directory of the demo ledger; run twice on the same directory and nothing is sent
        /// the second time.
        #[arg(long, default_value = "billsync-demo")]
        dir: PathBuf,
    },
    /// Throughput benchmark against the built-in simulators (see BENCHMARKS.md).
    Bench {
        /// About how many records to pull (MetalSoft users are chosen to reach it).
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        /// Daily windows pulled per user, 1 to 366. More days for the same `--records` is a
        /// backfill: fewer users, a longer period each. A `--noop` run must repeat the days of
        /// the run that filled its ledger.
        #[arg(long, default_value_t = crate::bench::DEFAULT_DAYS)]
        days: i64,
        /// Ledger directory (kept; default: a temporary directory).
        #[arg(long)]
        ledger: Option<PathBuf>,
        /// Limit the Lago simulator to this many requests per second (429 + Retry-After).
        #[arg(long)]
        rate: Option<u32>,
        /// Also run the naive baseline (bench/naive_baseline.py) on the same simulators.
        #[arg(long)]
        baseline: bool,
        /// Records the naive baseline pulls (its records/s is compared).
        #[arg(long, default_value_t = 10_000)]
        baseline_records: u64,
        /// Measure a no-op sync on the existing ledger of `--ledger` (nothing new, nothing pending).
        #[arg(long, requires = "ledger")]
        noop: bool,
        /// Pull, map and stage only (no push).
        #[arg(long)]
        stage_only: bool,
    },
    /// The bench's simulators (started by `billsync bench` in a child process).
    #[command(hide = true)]
    BenchSim {
        #[arg(long)]
        users: u64,
        #[arg(long, default_value_t = crate::bench::DEFAULT_DAYS)]
        days: i64,
        #[arg(long)]
        rate: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Records as CSV on standard output (all statuses unless `--status`).
    Export {
        #[arg(long, value_parser = parse_status)]
        status: Option<Status>,
        /// Only records of this source or provider kind.
        #[arg(long)]
        provider: Option<String>,
        /// Charge period starting at or after (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_parser = parse_time)]
        since: Option<DateTime<Utc>>,
        /// Charge period starting before (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// Last handled by this run.
        #[arg(long)]
        run: Option<i64>,
        /// This record only (its key).
        #[arg(long)]
        key: Option<String>,
    },
    /// Move one source's cursor by hand, to read a period again after a fix: the next sync
    /// pulls from there. Records read again with the same content are no-ops, changed ones go
    /// out as corrections. Forward (skipping what lies between) only with `--allow-forward`.
    SetCursor {
        /// The source (its configured name).
        #[arg(long)]
        source: String,
        /// The stream, as `billsync status` lists it (e.g. `user:42` for MetalSoft).
        #[arg(long)]
        stream: String,
        /// The new value, in the form the cursor has (a time, a month, an invoice id).
        #[arg(long)]
        value: String,
        /// Allow moving the cursor forward: what lies between is never read.
        #[arg(long)]
        allow_forward: bool,
        /// Why (kept in the ledger's audit trail).
        #[arg(long)]
        reason: String,
    },
    /// Changes of sent (or queued) records that wait for a person, oldest first: what was
    /// sent, the new content and why it cannot go out as a correction.
    Changes,
    /// Resolve a change that waits for a person. `--keep-sent`: what was billed stays billed,
    /// nothing is sent; the record's new content stays recorded (re-reading it changes
    /// nothing) and a month with period pricing settles on what was sent.
    Resolve {
        /// The change, as `billsync ledger changes` lists it.
        #[arg(long)]
        change: i64,
        /// Keep what was sent (the only resolution so far; a reversal and re-billing under the
        /// new mapping is done in the invoicing system by hand).
        #[arg(long)]
        keep_sent: bool,
        /// Resolve every open change of the change's record, not only this one.
        #[arg(long)]
        all_of_record: bool,
        /// Why (kept in the ledger's audit trail).
        #[arg(long)]
        reason: String,
    },
    /// Record a rejected record as delivered, after finding it in the sink (e.g. `reconcile`
    /// shows Stripe counted a record held back after an unclear delivery): nothing is sent,
    /// the record becomes `sent` with an audit line. Not for a record of a month with period
    /// pricing.
    MarkDelivered {
        /// The record's key, as `status`, `ledger export` and the rejection name it.
        #[arg(long)]
        key: String,
        /// Why (kept in the ledger's audit trail), e.g. what `reconcile` showed.
        #[arg(long)]
        reason: String,
    },
    /// Prune sent (and ignored) records older than the retention: payloads and raw fields go, a
    /// tombstone with the key stays so they can never be billed again. Unsent records are
    /// never touched.
    Vacuum {
        /// Retention, e.g. `400d` (by charge period and send time).
        #[arg(long, value_parser = parse_retention)]
        older_than: std::time::Duration,
        /// Count what would be pruned; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `billsync ledger set-cursor`: checked against the stored value (same form; backwards
/// unless `allow_forward`), written under the run lock with an audit line.
async fn set_cursor(
    ledger: &Ledger,
    source: &str,
    stream: &str,
    value: &str,
    allow_forward: bool,
    reason: &str,
) -> anyhow::Result<()> {
    // These record the grid a source's watermarks were read on (MetalSoft `window`, Jelastic
    // `period` and `time_offset`), checked by every plan: moved by hand they would let a
    // changed grid re-read the look-back under other keys.
    if [
        crate::providers::metalsoft::STREAM_WINDOW,
        crate::providers::jelastic::STREAM_GRID,
    ]
    .contains(&stream)
    {
        return Err(ConfigError(format!(
            "{source} {stream} is not a position but the grid the source's watermarks were read \
             on; it cannot be moved (to change the grid, see the README: a new source)"
        ))
        .into());
    }
    let cursors = ledger.cursors(source).await?;
    let Some(old) = cursors.get(stream) else {
        return Err(ConfigError(format!(
            "no cursor {source} {stream} in the ledger ({} stream(s) of {source}; a cursor is \
             made by a sync, `billsync status` lists them)",
            cursors.len()
        ))
        .into());
    };
    let forward = match cursor_order(old, value) {
        Some(order) => order == std::cmp::Ordering::Less,
        None => {
            return Err(ConfigError(format!(
                "--value {value:?} is not in the form of {source} {stream}'s cursor {old:?} \
                 (a time, a YYYY-MM month or an id, as it is now)"
            ))
            .into())
        }
    };
    if forward && !allow_forward {
        return Err(ConfigError(format!(
            "{value} is after {source} {stream}'s cursor {old}: what lies between would never be \
             read (lost revenue); pass --allow-forward if that is meant"
        ))
        .into());
    }
    let detail = serde_json::json!({
        "source": source, "stream": stream, "from": old, "to": value, "reason": reason,
    })
    .to_string();
    let written = in_a_locked_run(
        ledger,
        "set-cursor",
        |run, now| ledger.move_cursor(run, (source, stream, value), &detail, now),
        |_| detail.clone(),
    )
    .await;
    written?.ok_or_else(|| ConfigError(format!("no cursor {source} {stream} in the ledger")))?;
    outln!("cursor {source} {stream}: {old} → {value}");
    Ok(())
}

/// Run `work` as a run of its own (`command`, with the run's time) under the run lock: taken
/// first (exit 3 beside a sync), the run recorded with its outcome and `detail_of` its
/// result, the lock released whatever happened. An operator's change to the ledger is never
/// made beside a run, and always leaves a trace.
async fn in_a_locked_run<T, Fut>(
    ledger: &Ledger,
    command: &str,
    work: impl FnOnce(i64, DateTime<Utc>) -> Fut,
    detail_of: impl FnOnce(&Result<T, LedgerError>) -> String,
) -> Result<T, LedgerError>
where
    Fut: std::future::Future<Output = Result<T, LedgerError>>,
{
    let holder = format!(
        "{command}@{}:{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
        std::process::id()
    );
    let now = Utc::now();
    ledger
        .acquire_lock(&holder, now, std::time::Duration::from_secs(60))
        .await?;
    let written = async {
        let run = ledger.start_run(command, now).await?;
        let result = work(run, now).await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        ledger
            .finish_run(run, outcome, &detail_of(&result), Utc::now())
            .await?;
        result
    }
    .await;
    if let Err(e) = ledger.release_lock(&holder).await {
        tracing::warn!(error = %e, "could not release the run lock; it expires by itself");
    }
    written
}

/// `billsync ledger resolve --keep-sent`: under the run lock, in a run of its own, with an
/// audit line; nothing is sent.
async fn resolve_keep_sent(
    ledger: &Ledger,
    change: i64,
    all_of_record: bool,
    reason: &str,
) -> anyhow::Result<()> {
    let written = in_a_locked_run(
        ledger,
        "resolve",
        |run, now| ledger.keep_sent(run, change, all_of_record, reason, now),
        |result| match result {
            Ok(done) => done.detail.clone(),
            Err(e) => serde_json::json!({ "error": e.to_string() }).to_string(),
        },
    )
    .await;
    let done = written.map_err(|e| match e {
        LedgerError::NoOpenChange { .. } => anyhow::Error::new(ConfigError(e.to_string())),
        other => anyhow::Error::new(other),
    })?;
    let ids: Vec<String> = done.changes.iter().map(i64::to_string).collect();
    outln!(
        "change(s) {} of record {} ({}): kept what was sent; nothing sent",
        ids.join(", "),
        done.record,
        done.key
    );
    if done.still_open > 0 {
        outln!(
            "{} other change(s) of this record still wait (`billsync ledger changes`; \
             --all-of-record resolves them all)",
            done.still_open
        );
    }
    for g in &done.months {
        outln!("month {g}: settles on what was sent at the next sync");
    }
    Ok(())
}

/// `billsync ledger mark-delivered`: under the run lock, in a run of its own, with an audit
/// line; nothing is sent.
async fn mark_delivered(ledger: &Ledger, key: &str, reason: &str) -> anyhow::Result<()> {
    let written = in_a_locked_run(
        ledger,
        "mark-delivered",
        |run, now| ledger.mark_delivered(run, key, reason, now),
        |result| match result {
            Ok(done) => done.detail.clone(),
            Err(e) => serde_json::json!({ "error": e.to_string() }).to_string(),
        },
    )
    .await;
    let done = written.map_err(|e| match e {
        LedgerError::NotMarkable { .. } => anyhow::Error::new(ConfigError(e.to_string())),
        other => anyhow::Error::new(other),
    })?;
    outln!(
        "record {} ({key}): marked delivered to {}; nothing sent (it was refused: {})",
        done.id,
        done.sink.as_deref().unwrap_or("its sink"),
        done.refusal.as_deref().unwrap_or("no reason recorded")
    );
    Ok(())
}

/// `billsync ledger changes`: a block per change for a person, or one JSON object a line.
fn format_changes(changes: &[crate::ledger::OpenChange], json: bool) -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    if json {
        for c in changes {
            out.push_str(&serde_json::to_string(c)?);
            out.push('\n');
        }
        return Ok(out);
    }
    if changes.is_empty() {
        out.push_str("no change of a sent record waits for a person\n");
        return Ok(out);
    }
    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    writeln!(
        out,
        "{:<8} {:<8} {:<20} {:<12} KEY",
        "CHANGE", "RECORD", "SEEN", "SOURCE"
    )?;
    for c in changes {
        writeln!(
            out,
            "{:<8} {:<8} {:<20} {:<12} {}",
            c.change, c.record, c.seen_at, c.source, c.key
        )?;
        writeln!(
            out,
            "         {} to {} {}/{}: {} = {} (with its corrections: {})",
            if c.status == "sent" { "sent" } else { "queued" },
            or(&c.sent_sink),
            or(&c.sent_subscription),
            or(&c.sent_metric),
            or(&c.sent_value_property),
            or(&c.sent_value),
            or(&c.sent_total)
        )?;
        writeln!(
            out,
            "         new content: billed_cost {} {}, quantity {}",
            or(&c.new_billed_cost),
            or(&c.new_billing_currency),
            or(&c.new_consumed_quantity)
        )?;
        writeln!(out, "         needs a person: {}", or(&c.reason))?;
    }
    writeln!(
        out,
        "{} change(s); keep what was sent: billsync ledger resolve --change ID --keep-sent --reason TEXT",
        changes.len()
    )?;
    Ok(out)
}

/// How `old` compares with `new` when both have the same form (an integer id, an RFC 3339
/// time, a `YYYY-MM` month); `None` when they do not.
fn cursor_order(old: &str, new: &str) -> Option<std::cmp::Ordering> {
    if let (Ok(a), Ok(b)) = (old.parse::<i64>(), new.parse::<i64>()) {
        return Some(a.cmp(&b));
    }
    if let (Ok(a), Ok(b)) = (
        DateTime::parse_from_rfc3339(old),
        DateTime::parse_from_rfc3339(new),
    ) {
        return Some(a.cmp(&b));
    }
    let month = |t: &str| {
        (t.len() == 7)
            .then(|| NaiveDate::parse_from_str(&format!("{t}-01"), "%Y-%m-%d").ok())
            .flatten()
    };
    match (month(old), month(new)) {
        (Some(a), Some(b)) => Some(a.cmp(&b)),
        _ => None,
    }
}

fn parse_status(text: &str) -> Result<Status, String> {
    text.parse()
}

fn parse_retention(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (e.g. 400d)"))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    Table,
    Csv,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReplayStatus {
    Unmapped,
    Rejected,
    Ignored,
}

#[derive(Debug, Subcommand)]
pub enum MappingsCommand {
    /// Check mapping files without any network: syntax, unknown keys, fields, globs, units.
    Validate {
        /// Files or directories (default: the `mappings` of the settings, or `mappings/`).
        paths: Vec<PathBuf>,
    },
    /// Print the JSON Schema of the mapping format (for editors: `mappings/schema.json`).
    Schema,
    /// Run the mapping test cases (`mappings/tests/*.yaml`); exit 1 if any fails.
    Test {
        /// Mapping files or directories (default: the settings' `mappings`, or `mappings/`).
        #[arg(long, num_args = 1..)]
        mappings: Vec<PathBuf>,
        /// Case files or directories (default: `tests/` inside each mapping directory).
        cases: Vec<PathBuf>,
    },
    /// Show why a record maps the way it does: rules tried, customer lookup, pricing steps.
    Explain {
        /// A record as JSON (the `UsageRecord` shape).
        #[arg(long, conflicts_with = "id", required_unless_present = "id")]
        record: Option<PathBuf>,
        /// A record of the ledger, by id (needs the settings).
        #[arg(long)]
        id: Option<i64>,
        /// Mapping files or directories (default: the settings' `mappings`, or `mappings/`).
        #[arg(long, num_args = 1..)]
        mappings: Vec<PathBuf>,
    },
    /// Check the mappings against the configured Lago: metrics, aggregations, subscriptions.
    Check {
        /// Query the Lago sinks of the settings (required: the check is remote only).
        #[arg(long)]
        remote: bool,
        /// How often the sync runs (the CronJob: hourly): added to each source's lateness when
        /// compared with Lago's invoice grace periods.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        run_interval: std::time::Duration,
    },
}

/// At most eight glibc malloc arenas. glibc gives each thread that allocates an arena of its
/// own, up to eight per core on 64-bit: on a large node that is hundreds, and memory freed in
/// one arena is not reused by another. But too few arenas make the busy threads of a sync (the
/// puller, the stager, the pusher, the SQLite connection threads, the runtime's workers) queue
/// for each other's arena locks: with two, the puller slept on a malloc lock about 70 times per
/// thousand records and a 1M-record `billsync bench` took 24.9 s instead of 19.1–21.9 s, for
/// 2–6 MB less peak RSS. Eight covers those threads. (The container image is a glibc build
/// too: deploy/Dockerfile.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    // glibc's own setting, when given, wins.
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only sets an allocator parameter; called before any thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 8);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

/// Parse the command line, run, and return the documented exit code.
pub fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let json_logs = observe::logs_are_json(explicit(cli.log_format));
    observe::init_tracing(json_logs);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            observe::print_err(format_args!("error: cannot start the async runtime: {e}\n"));
            return ExitCode::from(exit::FAILED);
        }
    };
    let (trigger, shutdown) = crate::shutdown::channel();
    runtime.spawn(async move {
        crate::shutdown::signal().await;
        tracing::warn!(
            "signal received: stopping after the work in flight; a second signal exits at once"
        );
        trigger.trigger();
        crate::shutdown::signal().await;
        tracing::warn!(
            "second signal: exiting now; the ledger stays consistent, the lock expires by itself"
        );
        std::process::exit(i32::from(exit::FORCED));
    });
    let ctx = Ctx {
        json_output: explicit(cli.output).unwrap_or_else(|| !std::io::stdout().is_terminal()),
        json_logs,
        shutdown,
    };
    let result = runtime.block_on(run(cli, &ctx));
    // Leave nothing running (a slow request of an abandoned batch) behind the exit code.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => ExitCode::from(code),
        // The reader of standard output has gone (`billsync ledger export | head`): it read
        // what it wanted, and the command stops there quietly, as a Unix tool does.
        Err(e) if observe::stdout_closed() && is_broken_pipe(&e) => ExitCode::from(exit::OK),
        Err(e) => {
            let code = exit_code_of(&e);
            if json_logs {
                tracing::error!(
                    error = format!("{e:#}"),
                    exit_code = code,
                    "billsync failed"
                );
            } else {
                observe::print_err(format_args!("error: {e:#}\n"));
            }
            ExitCode::from(code)
        }
    }
}

/// Whether `e` comes from a write to standard output after its reader has gone (the io error
/// may be wrapped, e.g. by the ledger's export); a broken pipe met elsewhere (a socket) is an
/// error like any other.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(observe::is_stdout_closed)
    })
}

fn explicit(format: LogFormat) -> Option<bool> {
    match format {
        LogFormat::Auto => None,
        LogFormat::Json => Some(true),
        LogFormat::Text => Some(false),
    }
}

/// What every command shares.
pub struct Ctx {
    /// Summaries as one JSON line instead of a table.
    pub json_output: bool,
    pub json_logs: bool,
    pub shutdown: crate::shutdown::Shutdown,
}

fn exit_code_of(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(LedgerError::Locked { .. }) = cause.downcast_ref::<LedgerError>() {
            return exit::LOCKED;
        }
        if let Some(SyncError::Ledger(LedgerError::Locked { .. })) = cause.downcast_ref() {
            return exit::LOCKED;
        }
        // A ledger written by a newer billsync is a deployment mismatch (an image rolled back
        // under a ledger the newer one upgraded), and so is one of an older schema opened by a
        // command that does not upgrade it (a newer image's `status` beside the CronJob's older
        // one): running the same image again cannot fix either, so neither is the retried
        // exit 1. Nothing was pulled or sent.
        if let Some(LedgerError::Newer { .. } | LedgerError::Older { .. }) =
            cause.downcast_ref::<LedgerError>()
        {
            return exit::CONFIG;
        }
        if let Some(SyncError::Ledger(LedgerError::Newer { .. } | LedgerError::Older { .. })) =
            cause.downcast_ref()
        {
            return exit::CONFIG;
        }
        if cause.downcast_ref::<SettingsError>().is_some()
            || cause
                .downcast_ref::<crate::mapping::MappingErrors>()
                .is_some()
            || cause.downcast_ref::<ConfigError>().is_some()
            || matches!(
                cause.downcast_ref(),
                Some(SyncError::UnknownProvider(_) | SyncError::UnknownReplaySource(_))
            )
        {
            return exit::CONFIG;
        }
    }
    exit::FAILED
}

/// A configuration problem found while wiring the pipeline.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

async fn run(cli: Cli, ctx: &Ctx) -> anyhow::Result<u8> {
    match cli.command {
        Command::Demo { dir } => crate::demo::run(&dir, ctx).await,
        Command::Bench {
            records,
            days,
            ledger,
            rate,
            baseline,
            baseline_records,
            noop,
            stage_only,
        } => {
            crate::bench::run(&crate::bench::BenchOptions {
                records,
                days,
                ledger,
                rate,
                baseline,
                baseline_records,
                noop,
                stage_only,
                json_logs: ctx.json_logs,
                json_output: ctx.json_output,
            })
            .await
        }
        Command::BenchSim { users, days, rate } => {
            crate::bench::serve_simulators(users, days, rate).await
        }
        Command::Mappings { command } => run_mappings(&cli.config, command).await,
        Command::Reconcile {
            period,
            format,
            utc_offset,
        } => {
            let offset: chrono::FixedOffset = utc_offset.parse().map_err(|_| {
                ConfigError(format!(
                    "--utc-offset {utc_offset:?} is not an offset like +09:00"
                ))
            })?;
            // Only the ledger and the sinks it reads back: it pulls and maps nothing, so it
            // needs no provider secret nor mapping file. It only reads the ledger, so it neither
            // creates one (a wrong path would reconcile an empty month) nor upgrades one (the
            // CronJob's older image would then refuse it).
            let settings = Settings::load_for_reconcile(&cli.config)?;
            let sinks = build_sinks(&settings.sinks, None)?;
            let ledger = Ledger::open_existing(&settings.ledger.path).await?;
            let report = crate::reconcile::reconcile(&ledger, &sinks, &period, offset)
                .await
                .map_err(|e| match e {
                    crate::reconcile::ReconcileError::Period(_) => {
                        anyhow::Error::new(ConfigError(e.to_string()))
                    }
                    other => anyhow::Error::new(other),
                })?;
            match format {
                ReportFormat::Csv => out!("{}", crate::reconcile::to_csv(&report)),
                ReportFormat::Table => out!("{}", crate::reconcile::to_table(&report)),
            }
            // Money first: a difference among what was read back is 7 even when a sink could
            // not be read back as well; a sink not read back alone is 1 (the check did not
            // complete), so an alert on 7 means money and never "Lago unreachable".
            Ok(match report.verdict() {
                crate::reconcile::Verdict::Reconciled => exit::OK,
                crate::reconcile::Verdict::Unexplained => exit::UNRECONCILED,
                crate::reconcile::Verdict::Incomplete => exit::FAILED,
            })
        }
        Command::Ledger { command } => {
            // Only the ledger: no secret is needed (nor resolved).
            let settings = Settings::load_for_ledger(&cli.config)?;
            let ledger = Ledger::open_existing(&settings.ledger.path).await?;
            match command {
                LedgerCommand::Export {
                    status,
                    provider,
                    since,
                    until,
                    run,
                    key,
                } => {
                    check_window(since, until)?;
                    let filter = RecordFilter {
                        status,
                        provider,
                        since,
                        until,
                        run,
                        key,
                    };
                    let mut out = std::io::BufWriter::new(observe::Stdout);
                    let n = ledger.export_csv(&filter, &mut out).await?;
                    std::io::Write::flush(&mut out)?;
                    tracing::info!(records = n, "exported");
                }
                LedgerCommand::SetCursor {
                    source,
                    stream,
                    value,
                    allow_forward,
                    reason,
                } => {
                    if reason.trim().is_empty() {
                        return Err(ConfigError(
                            "--reason must say why the cursor is moved (what is read again or \
                             skipped, and why)"
                                .into(),
                        )
                        .into());
                    }
                    set_cursor(&ledger, &source, &stream, &value, allow_forward, &reason).await?;
                }
                LedgerCommand::Changes => {
                    let changes = ledger.open_changes(None).await?;
                    out!("{}", format_changes(&changes, ctx.json_output)?);
                }
                LedgerCommand::Resolve {
                    change,
                    keep_sent,
                    all_of_record,
                    reason,
                } => {
                    if !keep_sent {
                        return Err(ConfigError(
                            "say how to resolve the change: --keep-sent (what was billed stays \
                             billed; the only resolution billsync makes)"
                                .into(),
                        )
                        .into());
                    }
                    if reason.trim().is_empty() {
                        return Err(ConfigError(
                            "--reason must say why the change is resolved so".into(),
                        )
                        .into());
                    }
                    resolve_keep_sent(&ledger, change, all_of_record, &reason).await?;
                }
                LedgerCommand::MarkDelivered { key, reason } => {
                    if reason.trim().is_empty() {
                        return Err(ConfigError(
                            "--reason must say why the record is taken as delivered (what was \
                             found in the sink)"
                                .into(),
                        )
                        .into());
                    }
                    mark_delivered(&ledger, &key, &reason).await?;
                }
                LedgerCommand::Vacuum {
                    older_than,
                    dry_run,
                } => {
                    let cutoff = Utc::now()
                        - chrono::Duration::from_std(older_than)
                            .map_err(|_| ConfigError("--older-than is too large".into()))?;
                    let (n, pages_freed) = if dry_run {
                        (ledger.prunable(cutoff).await?, None)
                    } else {
                        // A write of the whole file (VACUUM holds SQLite's write lock until it
                        // is done): under the run lock, like any run, so that beside a sync it
                        // exits 3 instead of making the sync's writes time out. The prune
                        // checks and extends the lock itself (a prune longer than `lock_ttl`
                        // that finds it taken by a sync stops: exit 3).
                        let holder = format!(
                            "vacuum@{}:{}",
                            std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
                            std::process::id()
                        );
                        let ttl = settings.ledger.lock_ttl;
                        ledger.acquire_lock(&holder, Utc::now(), ttl).await?;
                        let pruned = ledger.vacuum(cutoff, &holder, ttl).await;
                        if let Err(e) = ledger.release_lock(&holder).await {
                            tracing::warn!(error = %e, "could not release the run lock; it expires by itself");
                        }
                        let done = pruned?;
                        (done.pruned, Some(done.pages_freed))
                    };
                    outln!(
                        "{} {n} sent or ignored records older than {}",
                        if dry_run { "would prune" } else { "pruned" },
                        crate::ledger::ts(cutoff)
                    );
                    if let Some(pages) = pages_freed {
                        outln!("gave back {pages} pages of the ledger file");
                    }
                }
            }
            Ok(exit::OK)
        }
        Command::Status { by_source } => {
            // Only the ledger and the Stripe sinks' `max_age`: no secret is needed.
            let settings = Settings::load_for_ledger(&cli.config)?;
            let ledger = Ledger::open_existing(&settings.ledger.path).await?;
            print_status(&ledger, by_source).await?;
            print_stripe_age_warnings(&settings.stripe_max_age, &ledger).await?;
            Ok(exit::OK)
        }
        Command::Sync { provider, dry_run } => {
            let started = std::time::Instant::now();
            let settings = Settings::load(&cli.config)?;
            let done = async {
                let pipeline = build_pipeline(&settings, ctx, dry_run, false).await?;
                let summary = pipeline
                    .sync(&SyncOptions {
                        provider,
                        dry_run,
                        ..Default::default()
                    })
                    .await?;
                anyhow::Ok((pipeline, summary))
            }
            .await;
            report_run(&settings, ctx, "sync", dry_run, started, done).await
        }
        Command::Replay {
            status,
            provider,
            since,
            until,
            run,
            key,
            dry_run,
            reason,
        } => {
            if reason.trim().is_empty() {
                return Err(ConfigError("--reason must say why you replay".into()).into());
            }
            check_window(since, until)?;
            let started = std::time::Instant::now();
            let settings = Settings::load(&cli.config)?;
            let done = async {
                let pipeline = build_pipeline(&settings, ctx, dry_run, true).await?;
                let summary = pipeline
                    .replay(&ReplayOptions {
                        filter: RecordFilter {
                            status: Some(match status {
                                ReplayStatus::Unmapped => Status::Unmapped,
                                ReplayStatus::Rejected => Status::Rejected,
                                ReplayStatus::Ignored => Status::Ignored,
                            }),
                            provider,
                            since,
                            until,
                            run,
                            key,
                        },
                        dry_run,
                        reason,
                        now: None,
                    })
                    .await?;
                anyhow::Ok((pipeline, summary))
            }
            .await;
            report_run(&settings, ctx, "replay", dry_run, started, done).await
        }
    }
}

/// Push the run's metrics when a Pushgateway is configured. A failed push is a warning: the
/// run's work is done and recorded either way.
async fn push_metrics(settings: &Settings, pipeline: &Pipeline, summary: &RunSummary) {
    let Some(metrics) = &settings.metrics else {
        return;
    };
    let gauges = match pipeline.ledger.gauges().await {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "metrics not pushed: cannot read the ledger");
            return;
        }
    };
    let sinks: Vec<String> = pipeline
        .sinks
        .iter()
        .map(|s| s.name().to_string())
        .collect();
    // Months with period pricing: a failed read leaves their metrics out, not the run's.
    let periods = match pipeline.ledger.period_status().await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "period metrics not pushed: cannot read the months");
            None
        }
    };
    let body = observe::render_metrics(
        summary,
        &gauges,
        periods.as_ref(),
        chrono::Utc::now(),
        &sinks,
    );
    if let Err(e) = observe::push_metrics(metrics, &summary.command, body).await {
        tracing::warn!(error = %e, "metrics not pushed");
    }
}

/// Push the outcome (`locked`, `config` or `failed`, by the exit code) and duration of a run
/// that ended in an error, when a Pushgateway is configured; never its last success.
async fn push_failed_metrics(
    settings: &Settings,
    command: &str,
    error: &anyhow::Error,
    started: std::time::Instant,
) {
    let Some(metrics) = &settings.metrics else {
        return;
    };
    let outcome = match exit_code_of(error) {
        exit::LOCKED => "locked",
        exit::CONFIG => "config",
        _ => "failed",
    };
    let body = observe::render_failed_metrics(outcome, started.elapsed());
    if let Err(e) = observe::push_metrics(metrics, command, body).await {
        tracing::warn!(error = %e, "metrics not pushed");
    }
}

/// A point in time on the command line: RFC 3339, or a date (midnight UTC).
fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            format!("{text:?} is neither RFC 3339 (2026-10-01T00:00:00Z) nor a date (2026-10-01)")
        })
}

/// The mapping paths: those given, else the settings' `mappings`, else `mappings/`.
fn mapping_paths(config: &std::path::Path, given: Vec<PathBuf>) -> anyhow::Result<Vec<PathBuf>> {
    if !given.is_empty() {
        return Ok(given);
    }
    match Settings::load_for_mappings(config) {
        Ok(s) => Ok(s.mappings),
        Err(SettingsError::Missing { .. }) => Ok(vec![PathBuf::from("mappings")]),
        Err(e) => Err(e.into()),
    }
}

async fn run_mappings(config: &std::path::Path, command: MappingsCommand) -> anyhow::Result<u8> {
    match command {
        MappingsCommand::Validate { paths } => {
            let given = !paths.is_empty();
            let set = MappingSet::load(&mapping_paths(config, paths)?)?;
            for w in set.warnings() {
                outln!("{w}");
            }
            // The sinks rules may name are those of the settings, when there are any.
            match Settings::load_for_mappings(config) {
                Ok(settings) => {
                    let unknown = set.rules_naming_unknown_sinks(&settings.sinks);
                    if !unknown.is_empty() {
                        return Err(crate::mapping::MappingErrors { errors: unknown }.into());
                    }
                }
                Err(SettingsError::Missing { .. }) => {}
                // Files given on the command line are checked even beside broken settings.
                Err(e) if given => outln!("sinks not checked: {e}"),
                Err(e) => return Err(e.into()),
            }
            outln!("mappings OK: {}", set.summary());
            Ok(exit::OK)
        }
        MappingsCommand::Schema => {
            out!("{}", crate::mapping::json_schema_text());
            Ok(exit::OK)
        }
        MappingsCommand::Test { mappings, cases } => {
            let paths = mapping_paths(config, mappings)?;
            let set = MappingSet::load(&paths)?;
            let cases = if cases.is_empty() {
                paths
                    .iter()
                    .filter(|p| p.is_dir())
                    .map(|p| p.join("tests"))
                    .filter(|p| p.is_dir())
                    .collect()
            } else {
                cases
            };
            if cases.is_empty() {
                return Err(ConfigError(
                    "no case files: give them as arguments or put them in <mappings>/tests/".into(),
                )
                .into());
            }
            let (files, errors) = crate::mapping::cases::read_case_files(&cases);
            let mut report = crate::mapping::cases::run_cases(&set, &files);
            report.errors.extend(errors);
            out!("{report}");
            Ok(if report.passed() {
                exit::OK
            } else {
                exit::FAILED
            })
        }
        MappingsCommand::Explain {
            record,
            id,
            mappings,
        } => {
            let set = MappingSet::load(&mapping_paths(config, mappings)?)?;
            let rec: crate::record::UsageRecord = match (record, id) {
                (Some(path), _) => {
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        ConfigError(format!("--record {}: cannot read: {e}", path.display()))
                    })?;
                    serde_json::from_str(&text).map_err(|e| {
                        ConfigError(format!(
                            "{}:{}:{}: not a usage record: {e}",
                            path.display(),
                            e.line(),
                            e.column()
                        ))
                    })?
                }
                (None, Some(id)) => {
                    // The ledger's section only: explaining needs no provider or sink secret.
                    let settings = Settings::load_for_ledger(config)?;
                    let ledger = Ledger::open_existing(&settings.ledger.path).await?;
                    ledger.record_by_id(id).await?.ok_or_else(|| {
                        ConfigError(format!("no record with id {id} in the ledger"))
                    })?
                }
                (None, None) => {
                    return Err(ConfigError("give --record FILE or --id N".into()).into())
                }
            };
            if rec.provider == crate::sync::PERIOD_PROVIDER {
                // An adjustment comes from its month, not from a rule: show how it was settled.
                outln!(
                    "period adjustment of {} {} {} (no rule maps it; it settles the month's \
                     `period: month` pricing):",
                    rec.sub_account_id,
                    rec.resource_id,
                    rec.resource_name.as_deref().unwrap_or("")
                );
                for step in rec.raw.to_value()["steps"].as_array().into_iter().flatten() {
                    outln!("  {}", step.as_str().unwrap_or_default());
                }
                return Ok(exit::OK);
            }
            out!("{}", set.explain(&rec));
            Ok(exit::OK)
        }
        MappingsCommand::Check {
            remote,
            run_interval,
        } => {
            if !remote {
                return Err(ConfigError(
                    "`mappings check` queries the invoicing system; pass --remote (for an \
                     offline check use `mappings validate`)"
                        .into(),
                )
                .into());
            }
            let settings = Settings::load(config)?;
            let set = MappingSet::load(&settings.mappings)?;
            // Rules without `sink:` send to the default sink; each Lago sink is compared with
            // the rules that send to it only.
            let default_sink = settings.default_sink_name().unwrap_or_default().to_string();
            let mut errors = 0;
            for (name, sink) in &settings.sinks {
                let SinkSettings::Lago(cfg) = sink else {
                    outln!("sink {name}: no remote catalogue to check (only Lago has one)");
                    continue;
                };
                let admin = crate::sinks::lago_admin::LagoAdmin::new(cfg)?;
                let metrics = admin.billable_metrics().await?;
                let listed = admin.subscription_list().await?;
                let subs = crate::sinks::lago_admin::customers_of(&listed);
                // The plans of the subscriptions this sink's rules bill (not terminated).
                let used = set.subscription_uses(name, &default_sink);
                let plan_codes: std::collections::BTreeSet<String> = listed
                    .iter()
                    .filter(|s| s.status != "terminated" && used.contains_key(&s.external_id))
                    .filter_map(|s| s.plan_code.clone())
                    .collect();
                let plans = admin.plans(&plan_codes).await?;
                let mut findings = set.check_remote(name, &default_sink, &metrics, &listed, &plans);
                let interval = chrono::Duration::from_std(run_interval)?;
                findings.extend(
                    crate::sinks::lago_admin::period_findings(
                        &admin, &settings, &set, &subs, interval,
                    )
                    .await?,
                );
                outln!(
                    "sink {name}: {} metric(s), {} subscription(s) in Lago; {} finding(s)",
                    metrics.len(),
                    subs.len(),
                    findings.len()
                );
                for f in &findings {
                    outln!("  {f}");
                }
                errors += findings.iter().filter(|f| f.error).count();
            }
            Ok(if errors == 0 { exit::OK } else { exit::CONFIG })
        }
    }
}

/// The end of a sync or replay: its summary printed and its metrics pushed (a run that ended in
/// an error pushes its outcome only; a dry run pushes nothing), and its exit code.
async fn report_run(
    settings: &Settings,
    ctx: &Ctx,
    command: &str,
    dry_run: bool,
    started: std::time::Instant,
    done: anyhow::Result<(Pipeline, RunSummary)>,
) -> anyhow::Result<u8> {
    let (pipeline, summary) = match done {
        Ok(done) => done,
        Err(e) if dry_run => return Err(e),
        Err(e) => {
            push_failed_metrics(settings, command, &e, started).await;
            return Err(e);
        }
    };
    observe::print_summary(&summary, ctx.json_output);
    if !dry_run {
        push_metrics(settings, &pipeline, &summary).await;
    }
    Ok(exit_code(&summary))
}

/// The exit code a finished run deserves.
pub fn exit_code(summary: &RunSummary) -> u8 {
    match summary.outcome {
        // A dry run holds and sends nothing: what it would leave undelivered is its report,
        // not a failure. A provider that failed is one (a pre-flight check after rotating a
        // key must not exit 0), and so is a stop.
        RunOutcome::Undelivered | RunOutcome::SinkStopped if summary.dry_run => exit::OK,
        RunOutcome::Ok => exit::OK,
        RunOutcome::Undelivered => exit::UNDELIVERED,
        RunOutcome::ProviderFailed => exit::FAILED,
        RunOutcome::SinkStopped => exit::SINK_STOPPED,
        RunOutcome::Interrupted => exit::INTERRUPTED,
    }
}

/// Wire providers, sinks, mappings and the ledger from the settings. For a dry run
/// (`dry_run`) the ledger is opened as it is, never
/// created or upgraded ("write nothing": a newer image's `sync --dry-run`, a natural check
/// before a rollout, would otherwise migrate the ledger the CronJob's older image then refuses),
/// and a ledger that does not exist yet is planned from an empty throwaway one. With
/// `must_exist` (a replay, which only re-maps what a ledger holds) a missing ledger is
/// [`LedgerError::Missing`] and nothing is created: an empty one would replay nothing and
/// report success, on a pod started without its volume.
pub async fn build_pipeline(
    settings: &Settings,
    ctx: &Ctx,
    dry_run: bool,
    must_exist: bool,
) -> anyhow::Result<Pipeline> {
    let mappings = MappingSet::load(&settings.mappings)?;
    // Not an error here: the other rules' records still go out, and these are held with the
    // reason (`mappings validate` refuses them).
    let configured: Vec<String> = settings.sinks.keys().cloned().collect();
    for problem in mappings.rules_naming_unknown_sinks(&configured) {
        tracing::warn!(%problem, "its records are held until the sink is configured");
    }
    let mut providers: Vec<Box<dyn Provider>> = Vec::new();
    for (name, p) in &settings.providers {
        match p {
            ProviderSettings::Metalsoft(cfg) => providers.push(Box::new(
                MetalsoftProvider::new(name.clone(), cfg.clone())
                    .map_err(|e| ConfigError(e.to_string()))?,
            )),
            ProviderSettings::Softlayer(cfg) => providers.push(Box::new(
                SoftlayerProvider::new(name.clone(), cfg.clone())
                    .map_err(|e| ConfigError(e.to_string()))?,
            )),
            ProviderSettings::Jelastic(cfg) => providers.push(Box::new(
                JelasticProvider::new(name.clone(), cfg.clone())
                    .map_err(|e| ConfigError(e.to_string()))?,
            )),
            ProviderSettings::Sakura(cfg) => providers.push(Box::new(
                SakuraProvider::new(name.clone(), cfg.clone())
                    .map_err(|e| ConfigError(e.to_string()))?,
            )),
        }
    }
    if providers.is_empty() {
        return Err(ConfigError("no provider is configured (`providers:`)".into()).into());
    }
    let sinks = build_sinks(&settings.sinks, settings.default_sink_name())?;
    let path = &settings.ledger.path;
    let ledger = if must_exist && !path.is_file() {
        Err(LedgerError::Missing { path: path.clone() })
    } else if !dry_run {
        Ledger::open(path).await
    } else {
        match Ledger::open_existing(path).await {
            Err(LedgerError::Missing { .. }) => {
                tracing::warn!(
                    ledger = %path.display(),
                    "no ledger there yet: the dry run plans from an empty one, as a first sync \
                     would, and creates nothing there"
                );
                Ledger::open_scratch().await
            }
            opened => opened,
        }
    }
    .with_context(|| format!("opening the ledger {}", path.display()))?;
    let mut pipeline = Pipeline::new(ledger, providers, sinks, mappings);
    pipeline.lock_ttl = settings.ledger.lock_ttl;
    pipeline.shutdown = ctx.shutdown.clone();
    pipeline.shutdown_deadline = settings.shutdown_deadline;
    pipeline.period_close_delay = settings.period_close_delay;
    // Each source's usual lateness with hourly runs (the CronJob): later records are flagged.
    pipeline.late_after = settings
        .lateness(chrono::Duration::hours(1))
        .0
        .into_iter()
        .map(|l| (l.source, l.after_end))
        .collect();
    pipeline.progress = observe::progress(ctx.json_logs);
    Ok(pipeline)
}

/// The configured sinks, the default one (rules that name no sink) first.
fn build_sinks(
    settings: &std::collections::BTreeMap<String, SinkSettings>,
    default: Option<&str>,
) -> anyhow::Result<Vec<Box<dyn Sink>>> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    for (name, s) in settings {
        let sink: Box<dyn Sink> = match s {
            SinkSettings::Lago(cfg) => Box::new(
                LagoSink::new(name.clone(), cfg.clone()).map_err(|e| ConfigError(e.to_string()))?,
            ),
            SinkSettings::Stripe(cfg) => Box::new(
                StripeSink::new(name.clone(), cfg.clone())
                    .map_err(|e| ConfigError(e.to_string()))?,
            ),
            SinkSettings::Webhook(cfg) => Box::new(
                crate::sinks::webhook::WebhookSink::new(name.clone(), cfg.clone())
                    .map_err(|e| ConfigError(e.to_string()))?,
            ),
            SinkSettings::Jsonl(cfg) => Box::new(
                crate::sinks::jsonl::JsonlSink::new(name.clone(), cfg.clone())
                    .map_err(|e| ConfigError(e.to_string()))?,
            ),
            SinkSettings::Focus(cfg) => Box::new(
                crate::sinks::focus::FocusSink::new(name.clone(), cfg.clone())
                    .map_err(|e| ConfigError(e.to_string()))?,
            ),
        };
        if Some(name.as_str()) == default {
            sinks.insert(0, sink);
        } else {
            sinks.push(sink);
        }
    }
    Ok(sinks)
}

/// Warn about records of Stripe sinks that approach Stripe's backdating limit (35 days by
/// default): past it they can no longer be sent at all. The warning starts 5 days before the
/// limit (a seventh of it for limits under 35 days).
async fn print_stripe_age_warnings(
    stripe_max_age: &std::collections::BTreeMap<String, std::time::Duration>,
    ledger: &Ledger,
) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    for (name, max_age) in stripe_max_age {
        let limit = chrono::Duration::from_std(*max_age).unwrap_or(chrono::Duration::days(35));
        let warn_after = limit - std::cmp::min(chrono::Duration::days(5), limit / 7);
        let (n, oldest) = ledger.waiting_older_than(name, now - warn_after).await?;
        let Some((key, start)) = oldest.filter(|_| n > 0) else {
            continue;
        };
        let age = chrono::DateTime::parse_from_rfc3339(&start)
            .map(|t| {
                format!(
                    ", {} days old",
                    (now - t.with_timezone(&chrono::Utc)).num_days()
                )
            })
            .unwrap_or_default();
        outln!(
            "warning: Stripe sink {name}: {n} waiting records (pending or provisional) are older than {}; Stripe refuses events older than {}; oldest: {key} (charge period start {start}{age})",
            crate::sinks::stripe::human(warn_after),
            crate::sinks::stripe::human(limit),
        );
    }
    Ok(())
}

/// `--until` is exclusive: one not after `--since` selects no charge period, a mistake (dates
/// swapped) that would otherwise look like an empty ledger (exit 2).
fn check_window(
    since: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<(), ConfigError> {
    match (since, until) {
        (Some(since), Some(until)) if until <= since => Err(ConfigError(format!(
            "--until {} is not after --since {}: no record can match",
            crate::ledger::ts(until),
            crate::ledger::ts(since)
        ))),
        _ => Ok(()),
    }
}

/// How many changes waiting for a person `status` shows (oldest first).
const CHANGES_SHOWN: i64 = 5;

async fn print_status(ledger: &Ledger, by_source: bool) -> anyhow::Result<()> {
    let st = ledger.status().await?;
    outln!("ledger {}", ledger.path().display());
    // A killed run (SIGKILL, OOM) leaves its lock row behind; once it has expired the next
    // run takes it over, so it is free, not held.
    let expired = |until: &str| {
        chrono::DateTime::parse_from_rfc3339(until)
            .is_ok_and(|t| t.with_timezone(&chrono::Utc) <= chrono::Utc::now())
    };
    match &st.lock {
        Some((holder, since, until)) if expired(until) => outln!(
            "lock: free (the lock of {holder}, taken {since}, expired {until}: that run was \
             killed or crashed; the next run takes the lock over)"
        ),
        Some((holder, since, until)) => {
            outln!("lock: held by {holder} since {since}, expires {until}")
        }
        None => outln!("lock: free"),
    }
    outln!("cursors:");
    let now = chrono::Utc::now();
    for c in &st.cursors {
        let lag = crate::providers::cursor_time(&c.value)
            .map(|t| {
                let secs = (now - t).num_seconds().max(0) as u64;
                format!(
                    ", lag {}",
                    humantime::format_duration(std::time::Duration::from_secs(secs))
                )
            })
            .unwrap_or_default();
        outln!(
            "  {} {}: {} (updated {}{lag})",
            c.source,
            c.stream,
            c.value,
            c.updated_at
        );
    }
    outln!("records by status:");
    // Per status, then per sink when a status has records of more than one.
    let mut statuses: std::collections::BTreeMap<&str, Vec<(Option<&str>, i64)>> =
        std::collections::BTreeMap::new();
    for ((status, sink), n) in &st.by_status {
        statuses
            .entry(status.as_str())
            .or_default()
            .push((sink.as_deref(), *n));
    }
    for (status, sinks) in &statuses {
        outln!("  {status}: {}", sinks.iter().map(|(_, n)| n).sum::<i64>());
        if sinks.len() > 1 {
            for (sink, n) in sinks {
                outln!("    {}: {n}", sink.unwrap_or("(no sink)"));
            }
        }
    }
    if by_source {
        outln!("records by source and status:");
        for ((source, status), n) in &ledger.counts_by_source().await? {
            outln!("  {source} {status}: {n}");
        }
    } else {
        outln!("  (per source: `billsync status --by-source`, which reads every record)");
    }
    if !st.held_reasons.is_empty() {
        outln!("undelivered records by source, status and resource type, with the oldest one's reason:");
        for h in &st.held_reasons {
            outln!(
                "  {} {} {}: {} (oldest staged {}): {}",
                h.source,
                h.status,
                h.resource_type,
                h.count,
                h.oldest_staged,
                h.reason
            );
        }
        let more = st.held_reason_groups - st.held_reasons.len() as i64;
        if more > 0 {
            outln!(
                "  … and {more} more groups (`billsync ledger export --status unmapped|rejected|pending` lists every record)"
            );
        }
    }
    outln!("corrections staged: {}", st.corrections);
    outln!(
        "changes of sent records to resolve by hand: {}",
        st.open_changes
    );
    if st.open_changes > 0 {
        for c in ledger.open_changes(Some(CHANGES_SHOWN)).await? {
            outln!(
                "  change {} of {} (seen {}): {}",
                c.change,
                c.key,
                c.seen_at,
                c.reason.as_deref().unwrap_or("-")
            );
        }
        let more = st.open_changes - CHANGES_SHOWN;
        outln!(
            "  {}`billsync ledger changes` lists them with what was sent; `billsync ledger \
             resolve --change ID --keep-sent --reason TEXT` keeps what was sent",
            if more > 0 {
                format!("… and {more} more: ")
            } else {
                String::new()
            }
        );
    }
    let periods = ledger.period_status().await?;
    if periods != Default::default() {
        outln!(
            "months with period pricing: {} open, {} settled, {} changed since settled",
            periods.open,
            periods.settled,
            periods.changed
        );
        for (group, note) in &periods.problems {
            outln!("  cannot settle {group}: {note}");
        }
    }
    if let Some((key, status, staged, err)) = &st.oldest_undelivered {
        outln!(
            "oldest undelivered: {key} ({status}, staged {staged}){}",
            err.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    outln!("last runs:");
    for run in &st.runs {
        outln!(
            "  {} {} started {} finished {} outcome {}",
            run.id,
            run.command,
            run.started_at,
            run.finished_at.as_deref().unwrap_or("-"),
            run.outcome.as_deref().unwrap_or("running or crashed")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a write to standard output after its reader has gone ends a command quietly: a
    /// broken pipe met elsewhere (a socket to a sink, a file) is an error like any other, even
    /// after standard output closed.
    #[test]
    fn only_standard_outputs_broken_pipe_is_quiet() {
        let elsewhere = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(!is_broken_pipe(
            &anyhow::Error::new(elsewhere).context("sending a batch")
        ));
        let mut out = observe::Stdout;
        // Once standard output is known closed, the writer fails with the marked error.
        observe::mark_stdout_closed_for_tests();
        let e = std::io::Write::write(&mut out, b"x").unwrap_err();
        assert!(is_broken_pipe(&anyhow::Error::new(e).context("exporting")));
    }
}
