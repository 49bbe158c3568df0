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
use crate::providers::sakura::SakuraProvider;
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
        Command::Mappings {
            command: MappingsCommand::Validate { paths },
        } => {
            let paths = if paths.is_empty() {
                match Settings::load(&cli.config) {
                    Ok(s) => s.mappings,
                    Err(SettingsError::Missing { .. }) => vec![PathBuf::from("mappings")],
                    Err(e) => return Err(e.into()),
                }
            } else {
                paths
            };
            let set = MappingSet::load(&paths)?;
            println!("mappings OK: {}", set.summary());
            Ok(exit::OK)
        }
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
            ProviderSettings::Sakura(cfg) => providers.push(Box::new(
                SakuraProvider::new(name.clone(), cfg.clone())
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
        "  pulled {}  new {}  unchanged {}  restaged {}  changed after send {}\n",
        s.pulled, s.new, s.unchanged, s.restaged, s.changed_after_send
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
    println!("changes of sent records to resolve: {}", st.open_changes);
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
