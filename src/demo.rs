//! `billsync demo`: a full sync against the built-in simulators, with the example mappings.
//!
//! A newcomer sees the whole path (pull → map → ledger → push → summary) on a fresh machine
//! without any account. The simulators are the same ones the tests and benchmarks use.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};

use crate::cli::{exit, Ctx};
use crate::config::Secret;
use crate::ledger::Ledger;
use crate::mapping::MappingSet;
use crate::providers::metalsoft::{MetalsoftConfig, MetalsoftProvider};
use crate::simulators::lago::{LagoSim, LagoSimConfig};
use crate::simulators::metalsoft::{
    MetalsoftDataset, MetalsoftSim, FIXTURE_BIGSTEP_2020, FIXTURE_CURRENT,
};
use crate::sinks::lago::{LagoConfig, LagoSink};
use crate::sync::{Pipeline, RunOutcome, SyncOptions};

const DEMO_METALSOFT_KEY: &str = "demo-metalsoft-key";
const DEMO_LAGO_KEY: &str = "demo-lago-key";

/// The demo's first watermark. The documentation resources are moved to start a few days
/// later, at fixed dates, so every run of the demo pulls the same records.
pub fn demo_start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0)
        .single()
        .expect("valid date")
}

/// The dataset of the demo: MetalSoft user 1 with the current documentation example, user 2
/// with the 2020 one, placed in October 2026.
pub fn demo_dataset() -> anyhow::Result<MetalsoftDataset> {
    let first = Utc
        .with_ymd_and_hms(2026, 10, 5, 0, 0, 0)
        .single()
        .expect("valid date");
    let mut dataset = MetalsoftDataset::from_fixture_json(FIXTURE_CURRENT, 1)?.shift_to(first);
    let second = MetalsoftDataset::from_fixture_json(FIXTURE_BIGSTEP_2020, 2)?
        .shift_to(first + chrono::Duration::days(7));
    dataset.users.extend(second.users);
    Ok(dataset)
}

/// Run the demo with its ledger in `dir`.
pub async fn run(dir: &Path, ctx: &Ctx) -> anyhow::Result<u8> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let metalsoft = MetalsoftSim::start(demo_dataset()?, DEMO_METALSOFT_KEY)
        .await
        .context("starting the MetalSoft simulator")?;
    let lago = LagoSim::start(LagoSimConfig {
        api_key: DEMO_LAGO_KEY.into(),
        ..Default::default()
    })
    .await
    .context("starting the Lago simulator")?;
    println!(
        "billsync demo: MetalSoft simulator at {}, Lago simulator at {}, ledger in {}",
        metalsoft.url,
        lago.url,
        dir.display()
    );

    let mut ms = MetalsoftConfig::new(
        metalsoft.url.clone(),
        Secret::new(DEMO_METALSOFT_KEY),
        vec![1, 2],
        demo_start(),
    );
    ms.window = chrono::Duration::days(1);
    ms.settle_delay = chrono::Duration::hours(2);
    let provider = MetalsoftProvider::new("metalsoft_demo".into(), ms)?;
    let sink = LagoSink::new(
        "lago_demo".into(),
        LagoConfig {
            api_url: lago.url.clone(),
            api_key: Secret::new(DEMO_LAGO_KEY),
            batch_size: 100,
            timeout: Duration::from_secs(10),
            retry: Default::default(),
        },
    )?;
    let mut pipeline = Pipeline::new(
        Ledger::open(&dir.join("ledger.db")).await?,
        vec![Box::new(provider)],
        vec![Box::new(sink)],
        MappingSet::examples()?,
    );
    pipeline.shutdown = ctx.shutdown.clone();
    pipeline.progress = crate::observe::progress(ctx.json_logs);
    let summary = pipeline.sync(&SyncOptions::default()).await?;
    crate::observe::print_summary(&summary, ctx.json_output);
    println!(
        "Lago simulator received {} events in {} requests during this run.",
        lago.events().len(),
        lago.request_count()
    );
    if summary.held() > 0 || summary.undelivered > 0 {
        println!(
            "Held records wait in the ledger; inspect them with `billsync status` on a ledger of your own."
        );
    }
    pipeline.ledger.close().await;
    // The demo succeeds when the run completed; held records are part of what it shows.
    Ok(match summary.outcome {
        RunOutcome::Ok | RunOutcome::Undelivered => exit::OK,
        RunOutcome::ProviderFailed => exit::FAILED,
        RunOutcome::SinkStopped => exit::SINK_STOPPED,
        RunOutcome::Interrupted => exit::INTERRUPTED,
    })
}
