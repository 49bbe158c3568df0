//! `billsync demo`: a full sync against the built-in simulators, with the example mappings.
//!
//! A newcomer sees the whole path (pull → map → ledger → push → summary) for all four providers
//! on a fresh machine without any account. The simulators are the same ones the tests and
//! benchmarks use.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};

use crate::cli::{exit, ConfigError, Ctx};
use crate::config::Secret;
use crate::ledger::Ledger;
use crate::mapping::MappingSet;
use crate::observe::outln;
use crate::providers::jelastic::{JelasticConfig, JelasticProvider, Period as JelasticPeriod};
use crate::providers::metalsoft::{MetalsoftConfig, MetalsoftProvider};
use crate::providers::sakura::{Month, SakuraConfig, SakuraProvider};
use crate::providers::softlayer::{SoftlayerConfig, SoftlayerProvider};
use crate::providers::Provider;
use crate::simulators::jelastic::{GenSpec, JelasticDataset, JelasticSim};
use crate::simulators::lago::{LagoSim, LagoSimConfig};
use crate::simulators::metalsoft::{
    MetalsoftDataset, MetalsoftSim, FIXTURE_BIGSTEP_2020, FIXTURE_CURRENT,
};
use crate::simulators::sakura::{SakuraDataset, SakuraSim};
use crate::simulators::softlayer::{
    GenerateOptions as SoftlayerGenerate, SoftlayerDataset, SoftlayerSim,
};
use crate::sinks::lago::{LagoConfig, LagoSink};
use crate::sync::{Pipeline, RunOutcome, SyncOptions};

const DEMO_METALSOFT_KEY: &str = "demo-metalsoft-key";
const DEMO_LAGO_KEY: &str = "demo-lago-key";
const DEMO_SOFTLAYER_KEY: &str = "demo-softlayer-key";
const DEMO_SAKURA_SECRET: &str = "demo-sakura-secret";
const DEMO_JELASTIC_SESSION: &str = "demo-jelastic-session";

/// The demo's first watermark. The documentation resources are moved to start a few days
/// later, at fixed dates, so every run of the demo pulls the same records.
pub fn demo_start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0)
        .single()
        .expect("valid date")
}

/// The demo's clock. Its data lies in September to November 2026, and whether a month is final
/// depends on the time of the run: on a fixed clock the demo shows the same run on every date
/// (November's SAKURA bills provisional, the rest final) instead of one that changes as the
/// real calendar moves past its data.
pub fn demo_now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0)
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

/// The demo's SAKURA Cloud data: four bills a month from September 2026; the running month
/// (November) is provisional and waits until it is final.
pub fn demo_sakura_dataset() -> anyhow::Result<SakuraDataset> {
    Ok(SakuraDataset::generate(
        7,
        Month::new(2026, 9).expect("valid month"),
        3,
        4,
    )?)
}

/// The demo's Jelastic data: three environments of two nodes, daily buckets for a week.
pub fn demo_jelastic_dataset() -> JelasticDataset {
    JelasticDataset::generate(&GenSpec {
        seed: 11,
        environments: 3,
        nodes_per_env: 2,
        start: demo_start(),
        end: demo_start() + chrono::Duration::days(7),
    })
}

/// The demo's SoftLayer data: four monthly invoices (one of them a credit), several users, some
/// items without an order item (billed to the account).
pub fn demo_softlayer_dataset() -> SoftlayerDataset {
    SoftlayerDataset::generate(&SoftlayerGenerate {
        seed: 5,
        invoices: 4,
        items_per_invoice: 5,
        users: 3,
        next_items: 2,
    })
}

/// The demo's sources, in the order of its providers.
const DEMO_SOURCES: [&str; 4] = [
    "metalsoft_demo",
    "softlayer_demo",
    "sakura_demo",
    "jelastic_demo",
];

/// Run the demo with its ledger in `dir`.
pub async fn run(dir: &Path, ctx: &Ctx) -> anyhow::Result<u8> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // A ledger of other sources (`--dir` pointed at a real ledger's directory) would get the
    // demo's records, sent to a simulated Lago, and be upgraded by this binary: refused.
    let path = dir.join("ledger.db");
    if let Some(sources) = Ledger::sources_at(&path).await? {
        let foreign: Vec<&str> = sources
            .iter()
            .map(String::as_str)
            .filter(|s| !DEMO_SOURCES.contains(s))
            .collect();
        if !foreign.is_empty() {
            return Err(ConfigError(format!(
                "{} is not a demo ledger (it has cursors of {}): the demo writes its own records \
                 into the ledger it runs on; give it a directory of its own (`--dir`)",
                path.display(),
                foreign.join(", ")
            ))
            .into());
        }
    }
    let metalsoft = MetalsoftSim::start(demo_dataset()?, DEMO_METALSOFT_KEY)
        .await
        .context("starting the MetalSoft simulator")?;
    let softlayer = SoftlayerSim::start(demo_softlayer_dataset(), "demo", DEMO_SOFTLAYER_KEY)
        .await
        .context("starting the SoftLayer simulator")?;
    let sakura = SakuraSim::start(demo_sakura_dataset()?, "demo-token", DEMO_SAKURA_SECRET)
        .await
        .context("starting the SAKURA Cloud simulator")?;
    let jelastic = JelasticSim::start(demo_jelastic_dataset(), DEMO_JELASTIC_SESSION)
        .await
        .context("starting the Jelastic simulator")?;
    let lago = LagoSim::start(LagoSimConfig {
        api_key: DEMO_LAGO_KEY.into(),
        ..Default::default()
    })
    .await
    .context("starting the Lago simulator")?;
    // With `--output json` standard output is the summary's one JSON line (for `jq`); the
    // demo's own words go to the log instead.
    let say = |text: String| {
        if ctx.json_output {
            tracing::info!("{text}");
        } else {
            outln!("{text}");
        }
    };
    say(format!(
        "billsync demo: simulators of MetalSoft, SoftLayer, SAKURA Cloud, Jelastic and Lago on loopback; ledger in {}",
        dir.display()
    ));

    let mut ms = MetalsoftConfig::new(
        metalsoft.url.clone(),
        Secret::new(DEMO_METALSOFT_KEY),
        vec![1, 2],
        demo_start(),
    );
    ms.window = chrono::Duration::days(1);
    ms.settle_delay = chrono::Duration::hours(2);
    let sl = SoftlayerConfig::new(
        softlayer.url.clone(),
        "demo",
        Secret::new(DEMO_SOFTLAYER_KEY),
    );
    let sk = SakuraConfig::new(
        sakura.endpoint.clone(),
        Secret::new("demo-token"),
        Secret::new(DEMO_SAKURA_SECRET),
        Month::new(2026, 9).expect("valid month"),
    );
    let mut jl = JelasticConfig::new(
        jelastic.url.clone(),
        Secret::new(DEMO_JELASTIC_SESSION),
        "EUR",
        demo_start(),
    );
    jl.period = JelasticPeriod::Day;
    jl.max_buckets_per_request = 31;
    let providers: Vec<Box<dyn Provider>> = vec![
        Box::new(MetalsoftProvider::new(DEMO_SOURCES[0].into(), ms)?),
        Box::new(SoftlayerProvider::new(DEMO_SOURCES[1].into(), sl)?),
        Box::new(SakuraProvider::new(DEMO_SOURCES[2].into(), sk)?),
        Box::new(JelasticProvider::new(DEMO_SOURCES[3].into(), jl)?),
    ];
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
        providers,
        vec![Box::new(sink)],
        MappingSet::examples()?,
    );
    pipeline.shutdown = ctx.shutdown.clone();
    pipeline.progress = crate::observe::progress(ctx.json_logs);
    // The run lock is taken on the demo's fixed clock too, where it would never expire: a demo
    // killed outright must not lock its directory for good. (Two demos on one directory at
    // once only stage the same keys twice, which is a no-op.)
    pipeline.lock_ttl = Duration::ZERO;
    let summary = pipeline
        .sync(&SyncOptions {
            now: Some(demo_now()),
            ..Default::default()
        })
        .await?;
    crate::observe::print_summary(&summary, ctx.json_output);
    say(format!(
        "Lago simulator received {} events in {} requests during this run.",
        lago.events().len(),
        lago.request_count()
    ));
    if summary.held() > 0 || summary.undelivered > 0 {
        say(
            "Held records wait in the ledger; inspect them with `billsync status` on a ledger of your own."
                .to_string(),
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
