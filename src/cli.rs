//! The command line: parsing, wiring settings into a pipeline, printing, exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{ProviderSettings, Settings, SettingsError, SinkSettings};
use crate::ledger::{Ledger, LedgerError, Status};
use crate::mapping::MappingSet;
use crate::providers::metalsoft::MetalsoftProvider;
use crate::providers::Provider;
use crate::sinks::lago::LagoSink;
use crate::sinks::Sink;
use crate::sync::{Pipeline, ReplayOptions, RunOutcome, RunSummary, SyncError, SyncOptions};

/// Exit codes (documented in the README).
pub mod exit {
    /// Everything pulled is delivered, ignored on purpose, or waiting to be final.
    pub const OK: u8 = 0;
    /// A runtime failure: a provider failed, the ledger could not be written, ...
    pub const FAILED: u8 = 1;
    /// Bad command line, settings or mapping files. Nothing was pulled or sent.
    pub const CONFIG: u8 = 2;
    /// Another run holds the ledger lock. Nothing was done.
    pub const LOCKED: u8 = 3;
    /// The run completed, but records are left undelivered (pending, unmapped or rejected).
    pub const UNDELIVERED: u8 = 4;
    /// A sink refused the credentials (401/403); its records stay pending.
    pub const SINK_STOPPED: u8 = 5;
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
    Status,
    /// Re-map held records with today's mapping files and push what now maps.
    Replay {
        /// Which held records: `unmapped` (no rule matched) or `rejected` (the sink refused them).
        #[arg(long, value_enum)]
        status: ReplayStatus,
        /// Only records of this source or provider kind.
        #[arg(long)]
        provider: Option<String>,
        /// Say what would change; change nothing, send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why you replay (kept in the ledger's audit trail).
        #[arg(long)]
        reason: String,
    },
    /// Mapping files.
    Mappings {
        #[command(subcommand)]
        command: MappingsCommand,
    },
    /// Run a full sync against built-in simulators of MetalSoft and Lago, no account needed.
    Demo {
        /// Directory of the demo ledger; run twice on the same directory and nothing is sent
        /// the second time.
        #[arg(long, default_value = "billsync-demo")]
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReplayStatus {
    Unmapped,
    Rejected,
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
    },
}

/// Parse the command line, run, and return the documented exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = exit_code_of(&e);
            tracing::error!(error = format!("{e:#}"), "billsync failed");
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn exit_code_of(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(LedgerError::Locked { .. }) = cause.downcast_ref::<LedgerError>() {
            return exit::LOCKED;
        }
        if let Some(SyncError::Ledger(LedgerError::Locked { .. })) = cause.downcast_ref() {
            return exit::LOCKED;
        }
        if cause.downcast_ref::<SettingsError>().is_some()
            || cause
                .downcast_ref::<crate::mapping::MappingErrors>()
                .is_some()
            || cause.downcast_ref::<ConfigError>().is_some()
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

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BILLSYNC_LOG")
        .unwrap_or_else(|_| EnvFilter::new("billsync=info,warn"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_target(false).init();
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Demo { dir } => crate::demo::run(&dir).await,
        Command::Mappings { command } => run_mappings(&cli.config, command).await,
        Command::Status => {
            let settings = Settings::load(&cli.config)?;
            let ledger = Ledger::open(&settings.ledger.path).await?;
            print_status(&ledger).await?;
            Ok(exit::OK)
        }
        Command::Sync { provider, dry_run } => {
            let settings = Settings::load(&cli.config)?;
            let pipeline = build_pipeline(&settings).await?;
            let summary = pipeline
                .sync(&SyncOptions {
                    provider,
                    dry_run,
                    ..Default::default()
                })
                .await?;
            print_summary(&summary);
            Ok(exit_code(&summary))
        }
        Command::Replay {
            status,
            provider,
            dry_run,
            reason,
        } => {
            if reason.trim().is_empty() {
                return Err(ConfigError("--reason must say why you replay".into()).into());
            }
            let settings = Settings::load(&cli.config)?;
            let pipeline = build_pipeline(&settings).await?;
            let summary = pipeline
                .replay(&ReplayOptions {
                    status: match status {
                        ReplayStatus::Unmapped => Status::Unmapped,
                        ReplayStatus::Rejected => Status::Rejected,
                    },
                    provider,
                    dry_run,
                    reason,
                    now: None,
                })
                .await?;
            print_summary(&summary);
            Ok(exit_code(&summary))
        }
    }
}

/// The mapping paths: those given, else the settings' `mappings`, else `mappings/`.
fn mapping_paths(config: &std::path::Path, given: Vec<PathBuf>) -> anyhow::Result<Vec<PathBuf>> {
    if !given.is_empty() {
        return Ok(given);
    }
    match Settings::load(config) {
        Ok(s) => Ok(s.mappings),
        Err(SettingsError::Missing { .. }) => Ok(vec![PathBuf::from("mappings")]),
        Err(e) => Err(e.into()),
    }
}

async fn run_mappings(config: &std::path::Path, command: MappingsCommand) -> anyhow::Result<u8> {
    match command {
        MappingsCommand::Validate { paths } => {
            let set = MappingSet::load(&mapping_paths(config, paths)?)?;
            for w in set.warnings() {
                println!("{w}");
            }
            println!("mappings OK: {}", set.summary());
            Ok(exit::OK)
        }
        MappingsCommand::Schema => {
            print!("{}", crate::mapping::json_schema_text());
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
            print!("{report}");
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
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
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
                    let settings = Settings::load(config)?;
                    let ledger = Ledger::open(&settings.ledger.path).await?;
                    ledger.record_by_id(id).await?.ok_or_else(|| {
                        ConfigError(format!("no record with id {id} in the ledger"))
                    })?
                }
                (None, None) => {
                    return Err(ConfigError("give --record FILE or --id N".into()).into())
                }
            };
            print!("{}", set.explain(&rec));
            Ok(exit::OK)
        }
        MappingsCommand::Check { remote } => {
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
            let mut errors = 0;
            for (name, sink) in &settings.sinks {
                let SinkSettings::Lago(cfg) = sink;
                let admin = crate::sinks::lago_admin::LagoAdmin::new(cfg)?;
                let metrics = admin.billable_metrics().await?;
                let subs = admin.subscription_ids().await?;
                let findings = set.check_remote(&metrics, &subs);
                println!(
                    "sink {name}: {} metric(s), {} subscription(s) in Lago; {} finding(s)",
                    metrics.len(),
                    subs.len(),
                    findings.len()
                );
                for f in &findings {
                    println!("  {f}");
                }
                errors += findings.iter().filter(|f| f.error).count();
            }
            Ok(if errors == 0 { exit::OK } else { exit::CONFIG })
        }
    }
}

/// The exit code a finished run deserves.
pub fn exit_code(summary: &RunSummary) -> u8 {
    if summary.dry_run {
        return exit::OK;
    }
    match summary.outcome {
        RunOutcome::Ok => exit::OK,
        RunOutcome::Undelivered => exit::UNDELIVERED,
        RunOutcome::ProviderFailed => exit::FAILED,
        RunOutcome::SinkStopped => exit::SINK_STOPPED,
    }
}

/// Wire providers, sinks, mappings and the ledger from the settings.
pub async fn build_pipeline(settings: &Settings) -> anyhow::Result<Pipeline> {
    let mappings = MappingSet::load(&settings.mappings)?;
    let mut providers: Vec<Box<dyn Provider>> = Vec::new();
    for (name, p) in &settings.providers {
        match p {
            ProviderSettings::Metalsoft(cfg) => providers.push(Box::new(
                MetalsoftProvider::new(name.clone(), cfg.clone())
                    .map_err(|e| ConfigError(e.to_string()))?,
            )),
        }
    }
    if providers.is_empty() {
        return Err(ConfigError("no provider is configured (`providers:`)".into()).into());
    }
    let default = settings.default_sink_name().unwrap_or_default().to_string();
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    for (name, s) in &settings.sinks {
        let sink: Box<dyn Sink> = match s {
            SinkSettings::Lago(cfg) => Box::new(
                LagoSink::new(name.clone(), cfg.clone()).map_err(|e| ConfigError(e.to_string()))?,
            ),
        };
        if *name == default {
            sinks.insert(0, sink);
        } else {
            sinks.push(sink);
        }
    }
    let ledger = Ledger::open(&settings.ledger.path)
        .await
        .with_context(|| format!("opening the ledger {}", settings.ledger.path.display()))?;
    Ok(Pipeline {
        ledger,
        providers,
        sinks,
        mappings,
        lock_ttl: settings.ledger.lock_ttl,
    })
}

/// Print a run summary for a person.
pub fn print_summary(s: &RunSummary) {
    let mut out = String::new();
    let title = if s.dry_run {
        format!("{} (dry run: nothing written, nothing sent)", s.command)
    } else {
        format!("{} run {}", s.command, s.run_id.unwrap_or_default())
    };
    out.push_str(&format!("billsync {title}: {:?}\n", s.outcome));
    for (name, src) in &s.sources {
        out.push_str(&format!(
            "  source {name} ({}): {} windows, {} records pulled{}\n",
            src.provider,
            src.chunks,
            src.pulled,
            src.error
                .as_deref()
                .map(|e| format!(", FAILED: {e}"))
                .unwrap_or_default()
        ));
    }
    out.push_str(&format!(
        "  pulled {}  new {}  unchanged {}  restaged {}  corrections {}  changes to resolve {}\n",
        s.pulled, s.new, s.unchanged, s.restaged, s.corrections, s.changed_after_send
    ));
    out.push_str(&format!(
        "  mapped {}  held (unmapped) {}  ignored {}  provisional {}\n",
        s.mapped(),
        s.held(),
        s.staged_by_status.get("ignored").copied().unwrap_or(0),
        s.staged_by_status.get("provisional").copied().unwrap_or(0),
    ));
    out.push_str(&format!(
        "  sent {}  already delivered {}  rejected {}  failed (retried next run) {}\n",
        s.sent, s.already_delivered, s.rejected, s.failed
    ));
    for e in &s.sink_errors {
        out.push_str(&format!("  sink error: {e}\n"));
    }
    if !s.totals.is_empty() {
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
            "  {:<w1$}  {:<w2$}  {:>18}\n",
            "subscription", "metric", "sent"
        ));
        for t in &s.totals {
            out.push_str(&format!(
                "  {:<w1$}  {:<w2$}  {:>18}\n",
                t.subscription, t.metric, t.value
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
    print!("{out}");
}

async fn print_status(ledger: &Ledger) -> anyhow::Result<()> {
    let st = ledger.status().await?;
    println!("ledger {}", ledger.path().display());
    match &st.lock {
        Some((holder, since, until)) => {
            println!("lock: held by {holder} since {since}, expires {until}")
        }
        None => println!("lock: free"),
    }
    println!("cursors:");
    for (source, stream, value, updated) in &st.cursors {
        println!("  {source} {stream}: {value} (updated {updated})");
    }
    println!("records by status:");
    for ((source, status), n) in &st.counts {
        println!("  {source} {status}: {n}");
    }
    println!("corrections staged: {}", st.corrections);
    println!(
        "changes of sent records to resolve by hand: {}",
        st.open_changes
    );
    if let Some((key, status, staged, err)) = &st.oldest_undelivered {
        println!(
            "oldest undelivered: {key} ({status}, staged {staged}){}",
            err.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    println!("last runs:");
    for run in &st.runs {
        println!(
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
