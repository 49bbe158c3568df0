//! What an operator sees: logs, progress bars, the run summary, pushed metrics.
//!
//! On a terminal: human logs and `indicatif` bars (logs are printed above the bars, never
//! through them). Elsewhere (a CronJob): one JSON object per log line, with the run id on
//! every line inside a run, and the summary as one JSON line. ERROR is reserved for something an
//! operator must act on (a provider that failed, a sink that refused the key); a rejected record
//! is a WARN, the records a run held as unmapped one WARN per source; reasons are in the ledger.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;

use crate::config::Secret;
use crate::ledger::LedgerGauges;
use crate::sync::{Progress, RunOutcome, RunSummary};

static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Whether logs are JSON: explicitly, or because standard error is not a terminal.
pub fn logs_are_json(explicit: Option<bool>) -> bool {
    explicit.unwrap_or_else(|| !std::io::stderr().is_terminal())
}

/// Set up logging. `BILLSYNC_LOG` sets the level (`billsync=debug`, ...).
///
/// A log line that cannot be written (standard error's reader has gone: a log collector that
/// stopped, `2>&1 | head`) is dropped. tracing-subscriber would report it with `eprintln!`,
/// which panics on the same closed pipe: the run would die between a request and its
/// acknowledgement with its lock held (see [`Stdout`] for why SIGPIPE does not kill us either).
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BILLSYNC_LOG")
        .unwrap_or_else(|_| EnvFilter::new("billsync=info,warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .init();
    } else {
        let bars =
            BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let bars = bars.clone();
        builder
            .with_target(false)
            .with_writer(move || AboveBars(bars.clone()))
            .init();
    }
}

/// A log writer that prints above the progress bars instead of through them.
struct AboveBars(MultiProgress);

impl Write for AboveBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Progress bars on a terminal; log lines when standard error is not one (or logs are JSON).
pub fn progress(json_logs: bool) -> std::sync::Arc<dyn Progress> {
    match BARS.get() {
        Some(bars) if !json_logs && std::io::stderr().is_terminal() => std::sync::Arc::new(Bars {
            multi: bars.clone(),
            pull: Mutex::new(None),
            push: Mutex::new(PushBars::default()),
        }),
        _ => std::sync::Arc::new(LogProgress::new(log_progress_every())),
    }
}

/// How often a run without a terminal logs its progress.
const LOG_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// [`LOG_PROGRESS_EVERY`], or `BILLSYNC_PROGRESS_EVERY` (a duration such as `30s`) when set.
fn log_progress_every() -> Duration {
    let Some(value) = std::env::var_os("BILLSYNC_PROGRESS_EVERY") else {
        return LOG_PROGRESS_EVERY;
    };
    match humantime::parse_duration(&value.to_string_lossy()) {
        Ok(every) => every,
        Err(e) => {
            tracing::warn!(value = %value.to_string_lossy(), error = %e,
                "BILLSYNC_PROGRESS_EVERY is not a duration (such as 30s); progress is logged every 10 s");
            LOG_PROGRESS_EVERY
        }
    }
}

/// Progress as log lines, for runs without a terminal (the CronJob): a long pull or push says
/// how far it is at most every `every`, so a stalled run can be told from a slow one. The pull
/// and each sink's push have their own figures and their own interval: a sync pushes while it
/// pulls, and one side's lines must neither reset nor crowd out the other's.
pub struct LogProgress {
    every: Duration,
    state: Mutex<LogProgressState>,
}

#[derive(Default)]
struct LogProgressState {
    pull: Option<Phase>,
    /// Each sink pushed in this run, by name: a sink pushed again goes on from its figures.
    push: std::collections::BTreeMap<String, Phase>,
    /// The sink last started, whose batches `batch_done` counts.
    pushing: Option<String>,
}

struct Phase {
    phase: String,
    unit: &'static str,
    total: u64,
    done: u64,
    records: u64,
    started: std::time::Instant,
    logged: std::time::Instant,
}

impl Phase {
    fn new(phase: String, unit: &'static str, total: u64) -> Phase {
        let now = std::time::Instant::now();
        Phase {
            phase,
            unit,
            total,
            done: 0,
            records: 0,
            started: now,
            logged: now,
        }
    }

    fn advance(&mut self, every: Duration, done: u64, records: u64) {
        self.done += done;
        self.records += records;
        // A push alongside the pull also reads records committed after its total was taken
        // (and restaged ones): what it did is then part of the total.
        self.total = self.total.max(self.done);
        if self.logged.elapsed() < every {
            return;
        }
        self.logged = std::time::Instant::now();
        let millis = u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        tracing::info!(
            phase = %self.phase,
            done = self.done,
            total = self.total,
            unit = self.unit,
            records = self.records,
            records_per_s = self.records.saturating_mul(1000) / millis,
            "progress"
        );
    }
}

impl LogProgress {
    pub fn new(every: Duration) -> Self {
        LogProgress {
            every,
            state: Mutex::new(LogProgressState::default()),
        }
    }
}

impl Progress for LogProgress {
    fn source_started(&self, source: &str, chunks: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.pull = Some(Phase::new(format!("pull {source}"), "windows", chunks));
        }
    }
    fn chunk_done(&self, records: u64) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(pull) = s.pull.as_mut() {
                pull.advance(self.every, 1, records);
            }
        }
    }
    fn push_started(&self, sink: &str, pending: u64) {
        if let Ok(mut s) = self.state.lock() {
            match s.push.get_mut(sink) {
                Some(push) => push.total = push.done + pending,
                None => {
                    let phase = Phase::new(format!("push {sink}"), "records", pending);
                    s.push.insert(sink.to_string(), phase);
                }
            }
            s.pushing = Some(sink.to_string());
        }
    }
    fn batch_done(&self, records: u64) {
        if let Ok(mut s) = self.state.lock() {
            let s = &mut *s;
            if let Some(push) = s.pushing.as_ref().and_then(|n| s.push.get_mut(n)) {
                push.advance(self.every, records, records);
            }
        }
    }
}

/// One bar for the source being pulled and one per sink pushed, side by side (a sync pushes
/// while it pulls).
struct Bars {
    multi: MultiProgress,
    pull: Mutex<Option<ProgressBar>>,
    push: Mutex<PushBars>,
}

#[derive(Default)]
struct PushBars {
    /// Each sink pushed in this run: a sink pushed again goes on on its bar.
    bars: std::collections::BTreeMap<String, ProgressBar>,
    /// The sink last started, whose batches `batch_done` counts.
    pushing: Option<String>,
}

impl Bars {
    fn bar(&self, prefix: String, len: u64, unit: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(len));
        let template = format!("{{prefix:>24}} [{{bar:32}}] {{pos}}/{{len}} {unit} ({{per_sec}}, {{eta}} left) {{msg}}");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(prefix);
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}

impl Progress for Bars {
    fn source_started(&self, source: &str, chunks: u64) {
        let bar = self.bar(format!("pull {source}"), chunks, "windows");
        if let Ok(mut pull) = self.pull.lock() {
            if let Some(old) = pull.replace(bar) {
                old.finish();
            }
        }
    }
    fn chunk_done(&self, _records: u64) {
        if let Ok(pull) = self.pull.lock() {
            if let Some(bar) = pull.as_ref() {
                bar.inc(1);
            }
        }
    }
    fn push_started(&self, sink: &str, pending: u64) {
        if let Ok(mut push) = self.push.lock() {
            match push.bars.get(sink) {
                Some(bar) => bar.set_length(bar.position() + pending),
                None => {
                    let bar = self.bar(format!("push {sink}"), pending, "records");
                    push.bars.insert(sink.to_string(), bar);
                }
            }
            push.pushing = Some(sink.to_string());
        }
    }
    fn batch_done(&self, records: u64) {
        if let Ok(push) = self.push.lock() {
            if let Some(bar) = push.pushing.as_ref().and_then(|n| push.bars.get(n)) {
                bar.inc(records);
                // Records committed after the total was taken (see `Phase::advance`).
                if bar.length().is_some_and(|len| bar.position() > len) {
                    bar.set_length(bar.position());
                }
            }
        }
    }
    fn finish(&self) {
        if let Ok(mut pull) = self.pull.lock() {
            if let Some(bar) = pull.take() {
                bar.finish_and_clear();
            }
        }
        if let Ok(mut push) = self.push.lock() {
            for (_, bar) in std::mem::take(&mut push.bars) {
                bar.finish_and_clear();
            }
        }
        let _ = self.multi.clear();
    }
}

/// Standard output once its reader has gone (`billsync status | head -1`): a write to it
/// failed with a broken pipe.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether standard output's reader has gone (see [`Stdout`]).
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Standard output for everything a command prints. A closed pipe is the reader saying it has
/// read enough, as for any Unix tool: the write fails with `BrokenPipe` (a producer such as
/// `ledger export` stops there, and `main` exits quietly, see [`stdout_closed`]), and nothing
/// panics. Why not SIGPIPE's default disposition (killed at the write, as C tools are): the
/// same process writes the ledger and delivers batches, and a log line to a stderr pipe that
/// closed would kill a sync between a request and its acknowledgement, leaving an unclear
/// delivery (Stripe: held back for a person once its 24 h dedup window passes); Rust ignores
/// SIGPIPE, so every write reports the closed pipe as an error instead, handled here.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if stdout_closed() {
            return Err(StdoutClosed::error());
        }
        std::io::stdout().lock().write(buf).map_err(stdout_error)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if stdout_closed() {
            return Err(StdoutClosed::error());
        }
        std::io::stdout().lock().flush().map_err(stdout_error)
    }
}

/// The error of a write to standard output after its reader has gone: marked, so that `main`
/// exits quietly for this broken pipe only, not for one met elsewhere (a socket, a file) by a
/// command that printed into a closed pipe before ([`is_stdout_closed`]).
#[derive(Debug, thiserror::Error)]
#[error("standard output's reader has gone")]
pub struct StdoutClosed;

impl StdoutClosed {
    fn error() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, StdoutClosed)
    }
}

/// As if standard output's reader had gone (unit tests of what follows from it).
#[cfg(test)]
pub fn mark_stdout_closed_for_tests() {
    STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether `e` is the error of a write to standard output after its reader has gone.
pub fn is_stdout_closed(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<StdoutClosed>())
}

fn stdout_error(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        closed(&e);
        StdoutClosed::error()
    } else {
        e
    }
}

fn closed(e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `print!` through [`Stdout`]: nothing more is printed once the reader has gone, without a
/// panic; any other failure to print panics as `print!` does.
#[doc(hidden)]
pub fn print_out(args: std::fmt::Arguments<'_>) {
    if stdout_closed() {
        return;
    }
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        closed(&e);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            panic!("failed printing to stdout: {e}");
        }
    }
}

/// `eprint!` that never panics: a message standard error cannot take (its reader has gone) is
/// dropped, as a log line is ([`init_tracing`]); the exit code still says how the command ended.
pub fn print_err(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `print!` that stops quietly when standard output's reader has gone ([`Stdout`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::observe::print_out(format_args!($($arg)*))
    };
}

/// `println!` that stops quietly when standard output's reader has gone ([`Stdout`]).
macro_rules! outln {
    () => {
        $crate::observe::print_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::observe::print_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {out, outln};

/// Print a run summary: a table for a person, or one JSON line for a machine.
pub fn print_summary(s: &RunSummary, json: bool) {
    if json {
        // Written as it is serialized: a backfill's summary holds one total per subscription
        // and metric, megabytes of JSON that need not sit in memory at once.
        let mut out = std::io::BufWriter::new(Stdout);
        if serde_json::to_writer(&mut out, s).is_ok() {
            let _ = writeln!(out);
        }
        let _ = out.flush();
        return;
    }
    out!("{}", summary_text(s));
}

/// A run summary as the table [`print_summary`] prints for a person.
pub fn summary_text(s: &RunSummary) -> String {
    let mut out = String::new();
    let title = if s.dry_run {
        format!("{} (dry run: nothing written, nothing sent)", s.command)
    } else {
        format!("{} run {}", s.command, s.run_id.unwrap_or_default())
    };
    out.push_str(&format!("billsync {title}: {}\n", outcome_text(s.outcome)));
    let replay = s.command == "replay";
    for (name, src) in &s.sources {
        if replay && src.pulled == 0 {
            continue; // a source this replay had no record of
        }
        out.push_str(&format!(
            "  source {name} ({}): {}{}{}\n",
            src.provider,
            if replay {
                format!("{} records replayed", src.pulled)
            } else {
                format!("{} windows, {} records pulled", src.chunks, src.pulled)
            },
            if src.late > 0 {
                format!(
                    ", {} LATE (their periods ended longer ago than usual: check the invoice \
                     of each period bills them)",
                    src.late
                )
            } else {
                String::new()
            },
            src.error
                .as_deref()
                .map(|e| format!(", FAILED: {e}"))
                .unwrap_or_default()
        ));
    }
    out.push_str(&format!(
        "  {} {}  new {}  unchanged {}  restaged {}  corrections {}  changes to resolve {}\n",
        // A replay pulls nothing: it counts the ledger's records its filters matched.
        if replay { "matched" } else { "pulled" },
        s.pulled,
        s.new,
        s.unchanged,
        s.restaged,
        s.corrections,
        s.changed_after_send
    ));
    let status = |k: &str| s.staged_by_status.get(k).copied().unwrap_or(0);
    out.push_str(&format!(
        "  mapped {}  held (unmapped) {}  ignored {}  provisional {}\n",
        s.mapped(),
        s.held(),
        status("ignored"),
        status("provisional"),
    ));
    out.push_str(&format!(
        "  sent {}  already delivered {}  rejected {}  failed (retried next run) {}\n",
        s.sent, s.already_delivered, s.rejected, s.failed
    ));
    if s.period_adjustments > 0 || s.period_problems > 0 {
        out.push_str(&format!(
            "  period adjustments staged {}  months that cannot be settled {}\n",
            s.period_adjustments, s.period_problems
        ));
    }
    for e in &s.sink_errors {
        out.push_str(&format!("  sink error: {e}\n"));
    }
    if !s.totals.is_empty() {
        let w0 = s
            .totals
            .iter()
            .map(|t| t.source.len())
            .max()
            .unwrap_or(0)
            .max(6);
        let w1 = s
            .totals
            .iter()
            .map(|t| t.subscription.len())
            .max()
            .unwrap_or(0)
            .max(12);
        let w2 = s
            .totals
            .iter()
            .map(|t| t.metric.len())
            .max()
            .unwrap_or(0)
            .max(6);
        out.push_str(&format!(
            "  {:<w0$}  {:<w1$}  {:<w2$}  {:>18}\n",
            "source", "subscription", "metric", "sent"
        ));
        for t in &s.totals {
            out.push_str(&format!(
                "  {:<w0$}  {:<w1$}  {:<w2$}  {:>18}\n",
                t.source, t.subscription, t.metric, t.value
            ));
        }
    }
    if s.pruned > 0 {
        out.push_str(&format!(
            "  not replayable (pruned by `ledger vacuum`) {}\n",
            s.pruned
        ));
    }
    if !s.preview.is_empty() {
        out.push_str("  plan:\n");
        for line in &s.preview {
            out.push_str(&format!("    {line}\n"));
        }
        if (s.pulled as usize) > s.preview.len() {
            out.push_str(&format!(
                "    … and {} more\n",
                s.pulled as usize - s.preview.len()
            ));
        }
    }
    out.push_str(&format!(
        "  undelivered in ledger: {}{}\n",
        s.undelivered,
        if s.undelivered > 0 {
            "  (see `billsync status`; fix mappings, then `billsync replay`)"
        } else {
            ""
        }
    ));
    if s.changes_to_resolve > 0 {
        out.push_str(&format!(
            "  changes of sent records to resolve: {}  (see `billsync ledger changes`)\n",
            s.changes_to_resolve
        ));
    }
    out
}

fn outcome_text(o: RunOutcome) -> &'static str {
    match o {
        RunOutcome::Ok => "ok",
        RunOutcome::Undelivered => "records left undelivered or waiting for a person",
        RunOutcome::ProviderFailed => "a provider failed",
        RunOutcome::SinkStopped => "a sink stopped",
        RunOutcome::Interrupted => "interrupted (the next run resumes)",
    }
}

/// Where to push run metrics (the Prometheus Pushgateway convention for batch jobs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Pushgateway base URL, e.g. `http://pushgateway.monitoring:9091`.
    pub pushgateway_url: String,
    /// The `job` label (default `billsync`).
    #[serde(default = "default_job")]
    pub job: String,
    /// The `instance` label (default: none, the job's one group). Not the host name: in a
    /// CronJob that is the pod's name, new every run, which would make a group per run.
    #[serde(default)]
    pub instance: Option<String>,
    /// Optional bearer token (`env:` / `file:`), sent as `Authorization: Bearer`. For basic
    /// auth put `user:password@` in `pushgateway_url` (never shown in logs).
    #[serde(default)]
    pub token: Option<Secret>,
    /// Timeout of the push.
    #[serde(default = "default_push_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
}

fn default_job() -> String {
    "billsync".into()
}

fn default_push_timeout() -> Duration {
    Duration::from_secs(10)
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics of one run in the Prometheus text format. Names are documented in the README.
///
/// A sync pushes everything. Any other command (a replay) pushes only what describes its own
/// run (outcome, duration, per-sink counts, its late records per source), into a group of its own ([`push_metrics`]): the
/// ledger-wide figures (records pulled, undelivered, cursor lag) and the last success belong to
/// the sync's group, which every hourly run refreshes; a replay's group keeps its values until
/// the next replay.
pub fn render_metrics(
    s: &RunSummary,
    ledger: &LedgerGauges,
    periods: Option<&crate::ledger::PeriodStatus>,
    now: chrono::DateTime<chrono::Utc>,
    sink_names: &[String],
) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, samples: Vec<(String, String)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in samples {
            out.push_str(&format!("{name}{labels} {value}\n"));
        }
    };
    let sync = s.command == "sync";
    let by_source = |f: &dyn Fn(&crate::sync::SourceSummary) -> u64| {
        s.sources
            .iter()
            .map(|(name, src)| {
                (
                    format!(
                        "{{source=\"{}\",provider=\"{}\"}}",
                        escape_label(name),
                        escape_label(&src.provider)
                    ),
                    f(src).to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    if sync {
        metric(
            "billsync_records_pulled",
            "Records pulled from a source by the last run.",
            "gauge",
            by_source(&|src| src.pulled),
        );
    }
    // Each configured sink's own figures (0 for a sink the run sent nothing to).
    let sink_label = |v: &dyn Fn(&crate::sync::SinkCounts) -> u64| {
        sink_names
            .iter()
            .map(|n| {
                let counts = s.by_sink.get(n).copied().unwrap_or_default();
                (
                    format!("{{sink=\"{}\"}}", escape_label(n)),
                    v(&counts).to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    metric(
        "billsync_records_sent",
        "Records the sink accepted in the last run (already-delivered included).",
        "gauge",
        sink_label(&|c| c.sent + c.already_delivered),
    );
    metric(
        "billsync_records_rejected",
        "Records the sink refused for good in the last run.",
        "gauge",
        sink_label(&|c| c.rejected),
    );
    metric(
        "billsync_records_failed",
        "Records the sink left pending after retries in the last run.",
        "gauge",
        sink_label(&|c| c.failed),
    );
    let mut held = std::collections::BTreeMap::<String, i64>::new();
    for ((source, st), n) in &ledger.undelivered {
        *held
            .entry(format!(
                "{{source=\"{}\",status=\"{}\"}}",
                escape_label(source),
                st
            ))
            .or_default() += n;
    }
    if sync {
        metric(
            "billsync_records_undelivered",
            "Undelivered records in the ledger by source and status (pending, unmapped, rejected).",
            "gauge",
            held.into_iter().map(|(l, n)| (l, n.to_string())).collect(),
        );
    }
    metric(
        "billsync_run_duration_seconds",
        "Duration of the last run.",
        "gauge",
        vec![(
            String::new(),
            format!("{}.{:03}", s.duration_ms / 1000, s.duration_ms % 1000),
        )],
    );
    metric(
        "billsync_run_outcome",
        "1 for the outcome of the last run.",
        "gauge",
        vec![(
            format!("{{outcome=\"{}\"}}", outcome_label(s.outcome)),
            "1".into(),
        )],
    );
    let lag: Vec<(String, String)> = ledger
        .cursors
        .iter()
        .filter_map(|c| {
            let t = crate::providers::cursor_time(&c.value)?;
            let lag = (now - t).num_seconds().max(0);
            Some((
                format!(
                    "{{source=\"{}\",stream=\"{}\"}}",
                    escape_label(&c.source),
                    escape_label(&c.stream)
                ),
                lag.to_string(),
            ))
        })
        .collect();
    // Records sent too late for an invoice that may be finalized: a sync's and a replay's
    // (each in its own group) alike.
    metric(
        "billsync_records_late",
        "Records the last run staged to be sent for periods that ended longer ago than their source's usual lateness (an invoice already finalized does not bill them).",
        "gauge",
        by_source(&|src| src.late),
    );
    if !sync {
        return out;
    }
    metric(
        "billsync_cursor_lag_seconds",
        "How far each time or month cursor is behind now (a month from its end, JST).",
        "gauge",
        lag,
    );
    // Revenue at risk (besides the late records above): a change of a sent record billsync
    // will not correct on its own, and months with period pricing that do not settle (their
    // tier adjustment or minimum is not sent while they wait).
    metric(
        "billsync_changes_unresolved",
        "Changes of sent records that wait for a person (billsync ledger changes).",
        "gauge",
        vec![(String::new(), ledger.open_changes.to_string())],
    );
    if let Some(p) = periods.filter(|p| p.open + p.settled + p.changed > 0) {
        metric(
            "billsync_period_months",
            "Months with period pricing by state (open: never settled; changed: settled, changed since; unsettleable: listed by status).",
            "gauge",
            [
                ("open", p.open),
                ("settled", p.settled),
                ("changed", p.changed),
                ("unsettleable", p.unsettleable),
            ]
            .into_iter()
            .map(|(state, n)| (format!("{{state=\"{state}\"}}"), n.to_string()))
            .collect(),
        );
        metric(
            "billsync_period_settlement_lag_seconds",
            "How long ago the oldest month waiting to be settled (or settled again) ended; 0 when none has ended.",
            "gauge",
            vec![(
                String::new(),
                p.oldest_due_end
                    .map_or(0, |end| (now - end).num_seconds().max(0))
                    .to_string(),
            )],
        );
    }
    if matches!(s.outcome, RunOutcome::Ok | RunOutcome::Undelivered) {
        metric(
            "billsync_last_success_timestamp_seconds",
            "Unix time of the last run that completed.",
            "gauge",
            vec![(String::new(), now.timestamp().to_string())],
        );
    }
    out
}

/// The metrics of a run that ended in an error instead of a summary (exit 1, 2 or 3: the ledger
/// locked, unwritable or from a newer billsync, a broken mapping file): `outcome` (`failed`,
/// `config`, `locked`) and the duration. Without them `billsync_run_outcome` would keep showing
/// the run before. Never the last success, so the alert on its age fires; the per-run figures
/// of the run before stay as they were (this run has none).
pub fn render_failed_metrics(outcome: &str, duration: Duration) -> String {
    let millis = duration.as_millis();
    format!(
        "# HELP billsync_run_duration_seconds Duration of the last run.\n\
         # TYPE billsync_run_duration_seconds gauge\n\
         billsync_run_duration_seconds {}.{:03}\n\
         # HELP billsync_run_outcome 1 for the outcome of the last run.\n\
         # TYPE billsync_run_outcome gauge\n\
         billsync_run_outcome{{outcome=\"{}\"}} 1\n",
        millis / 1000,
        millis % 1000,
        escape_label(outcome)
    )
}

fn outcome_label(o: RunOutcome) -> &'static str {
    match o {
        RunOutcome::Ok => "ok",
        RunOutcome::Undelivered => "undelivered",
        RunOutcome::ProviderFailed => "provider_failed",
        RunOutcome::SinkStopped => "sink_stopped",
        RunOutcome::Interrupted => "interrupted",
    }
}

/// Push the metrics of a run of `command`. POST replaces only the metrics it carries, so a
/// failed run keeps the last success timestamp of the one before — in the same group: every
/// sync pushes to `/metrics/job/<job>` (plus `/instance/<instance>` only when one is
/// configured), never to a group named after the host, which in a CronJob is a new pod name
/// every run. Another command (a replay) pushes below it, to `…/command/<command>`, and never
/// touches the sync's group.
pub async fn push_metrics(
    settings: &MetricsSettings,
    command: &str,
    body: String,
) -> Result<(), String> {
    let mut url = format!(
        "{}/metrics{}",
        settings.pushgateway_url.trim_end_matches('/'),
        grouping_segment("job", &settings.job),
    );
    if let Some(instance) = settings.instance.as_deref().filter(|i| !i.is_empty()) {
        url.push_str(&grouping_segment("instance", instance));
    }
    if command != "sync" {
        url.push_str(&grouping_segment("command", command));
    }
    let mut req = crate::http::client(settings.timeout)
        .post(&url)
        .header("content-type", "text/plain; version=0.0.4")
        .body(body);
    if let Some(token) = &settings.token {
        req = req.bearer_auth(token.expose());
    }
    // The URL may carry basic-auth credentials (`user:password@`): shown without them.
    let shown = crate::http::shown_url(&url);
    match req.send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("pushgateway {shown} answered HTTP {}", r.status())),
        Err(e) => Err(format!(
            "pushgateway {shown}: {}",
            crate::http::transport_reason(&e)
        )),
    }
}

/// One label of a Pushgateway grouping key as a path segment, `/name/value`, escaped as the
/// Pushgateway's API wants it: a value with a `/` (which no URI encoding can carry: the path is
/// split on it) or an empty one as `/name@base64/<base64url>`, any other value
/// percent-encoded (RFC 3986 unreserved characters kept).
fn grouping_segment(name: &str, value: &str) -> String {
    if value.is_empty() || value.contains('/') {
        return format!("/{name}@base64/{}", base64url(value.as_bytes()));
    }
    format!("/{name}/{}", utf8_percent_encode(value, PATH_SEGMENT))
}

/// What a path segment may carry as is (RFC 3986 unreserved characters); the rest is
/// percent-encoded.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// RFC 4648 §5 base64 (URL and filename safe alphabet), padded: the empty value is `=`, as the
/// Pushgateway requires for it.
fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    if bytes.is_empty() {
        return "=".into();
    }
    base64::engine::general_purpose::URL_SAFE.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn progress_lines(every: Duration, run: impl FnOnce(&LogProgress)) -> Vec<serde_json::Value> {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || run(&LogProgress::new(every)));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Each progress line's (phase, done, total, records); every line must be one.
    fn progress_facts(lines: &[serde_json::Value]) -> Vec<(String, u64, u64, u64)> {
        lines
            .iter()
            .map(|l| {
                assert_eq!(l["message"], "progress");
                (
                    l["phase"].as_str().unwrap().to_string(),
                    l["done"].as_u64().unwrap(),
                    l["total"].as_u64().unwrap(),
                    l["records"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_run_without_a_terminal_logs_how_far_its_pull_and_push_are() {
        let lines = progress_lines(Duration::ZERO, |p| {
            p.source_started("metalsoft", 3);
            p.chunk_done(10);
            p.chunk_done(0); // a window with no records still counts as done
            p.push_started("lago", 25);
            p.batch_done(20);
            p.batch_done(5);
        });
        let facts = progress_facts(&lines);
        assert_eq!(
            facts,
            [
                ("pull metalsoft".to_string(), 1, 3, 10),
                ("pull metalsoft".to_string(), 2, 3, 10),
                ("push lago".to_string(), 20, 25, 20),
                ("push lago".to_string(), 25, 25, 25),
            ]
        );
        assert_eq!(lines[0]["unit"], "windows");
        assert_eq!(lines[2]["unit"], "records");
    }

    /// A sync pushes while it pulls, and pushes a sink again after each commit of the pull
    /// (then once more at its end): each side keeps its own figures, and a sink pushed again
    /// goes on from what it had done (its total is that plus what is left), never from zero.
    #[test]
    fn the_pull_and_a_push_alongside_it_each_log_their_own_progress() {
        let lines = progress_lines(Duration::ZERO, |p| {
            p.source_started("metalsoft", 3);
            p.push_started("lago", 5);
            p.chunk_done(10);
            p.batch_done(2);
            p.push_started("lago", 4); // goes on: 2 done, 4 left
            p.chunk_done(4);
            p.batch_done(4);
            p.push_started("lago", 0); // the final pass: nothing left
        });
        let facts = progress_facts(&lines);
        assert_eq!(
            facts,
            [
                ("pull metalsoft".to_string(), 1, 3, 10),
                ("push lago".to_string(), 2, 5, 2),
                ("pull metalsoft".to_string(), 2, 3, 14),
                ("push lago".to_string(), 6, 6, 6),
            ]
        );
    }

    /// A push alongside the pull reads records the stager committed after the pass's total was
    /// taken: its total grows with what it did, never shows less than done.
    #[test]
    fn a_push_that_delivers_more_than_its_total_raises_the_total() {
        let lines = progress_lines(Duration::ZERO, |p| {
            p.push_started("lago", 2);
            p.batch_done(2);
            p.batch_done(3);
        });
        let facts: Vec<(u64, u64)> = lines
            .iter()
            .map(|l| (l["done"].as_u64().unwrap(), l["total"].as_u64().unwrap()))
            .collect();
        assert_eq!(facts, [(2, 2), (5, 5)]);
    }

    #[test]
    fn grouping_values_are_base64url_with_a_slash_or_empty_and_percent_encoded_otherwise() {
        assert_eq!(grouping_segment("job", "billsync"), "/job/billsync");
        assert_eq!(grouping_segment("job", ""), "/job@base64/=");
        // RFC 4648 test vectors, with the URL-safe alphabet.
        for (plain, encoded) in [
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url(plain.as_bytes()), encoded);
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8=");
        assert_eq!(
            grouping_segment("instance", "a/b"),
            format!("/instance@base64/{}", base64url(b"a/b"))
        );
        assert_eq!(
            grouping_segment("instance", "eu west:1é"),
            "/instance/eu%20west%3A1%C3%A9"
        );
    }

    #[test]
    fn progress_is_logged_at_most_once_per_interval() {
        let lines = progress_lines(Duration::from_secs(3600), |p| {
            p.source_started("metalsoft", 1000);
            for _ in 0..1000 {
                p.chunk_done(100);
            }
        });
        assert!(lines.is_empty(), "{lines:?}");
    }
}
