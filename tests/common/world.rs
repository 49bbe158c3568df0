//! A MetalSoft simulator, a Lago simulator and a ledger directory: the world an end-to-end
//! test runs billsync in. `pipeline()` opens the ledger afresh each time, which is what a
//! restarted process (after a crash) does.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::ledger::Ledger;
use billsync::mapping::{MapOutcome, MappingSet};
use billsync::providers::metalsoft::{MetalsoftConfig, MetalsoftProvider};
use billsync::providers::Provider;
use billsync::simulators::lago::{Behaviour, LagoSim, LagoSimConfig, LagoSimHandle};
use billsync::simulators::metalsoft::{MetalsoftDataset, MetalsoftSim, MetalsoftSimHandle};
use billsync::sinks::lago::{LagoConfig, LagoSink};
use billsync::sync::Pipeline;
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

pub const MS_KEY: &str = "ms-test-key";
pub const LAGO_KEY: &str = "lago-test-key";

/// The pinned "now" of every end-to-end test: the demo data lies in October 2026.
pub fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap()
}

pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

pub struct World {
    pub metalsoft: MetalsoftSimHandle,
    pub lago: LagoSimHandle,
    pub dir: tempfile::TempDir,
}

impl World {
    pub async fn start(behaviour: Behaviour) -> World {
        Self::start_with(behaviour, billsync::demo::demo_dataset().unwrap()).await
    }

    /// A world whose MetalSoft simulator serves `dataset` instead of the demo's.
    pub async fn start_with(behaviour: Behaviour, dataset: MetalsoftDataset) -> World {
        let metalsoft = MetalsoftSim::start(dataset, MS_KEY).await.unwrap();
        let lago = LagoSim::start(LagoSimConfig {
            api_key: LAGO_KEY.into(),
            behaviour,
            ..Default::default()
        })
        .await
        .unwrap();
        World {
            metalsoft,
            lago,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn provider(&self) -> MetalsoftProvider {
        let mut cfg = MetalsoftConfig::new(
            self.metalsoft.url.clone(),
            Secret::new(MS_KEY),
            vec![1, 2],
            billsync::demo::demo_start(),
        );
        cfg.window = chrono::Duration::days(1);
        cfg.settle_delay = chrono::Duration::hours(2);
        cfg.retry = fast_retry();
        MetalsoftProvider::new("metalsoft_test".into(), cfg).unwrap()
    }

    pub fn sink_with_key(&self, key: &str) -> LagoSink {
        LagoSink::new(
            "lago".into(),
            LagoConfig {
                api_url: self.lago.url.clone(),
                api_key: Secret::new(key),
                batch_size: 25,
                timeout: Duration::from_secs(5),
                retry: fast_retry(),
            },
        )
        .unwrap()
    }

    pub async fn pipeline_with(&self, mappings: MappingSet, lago_key: &str) -> Pipeline {
        let mut pipeline = Pipeline::new(
            Ledger::open(&self.dir.path().join("ledger.db"))
                .await
                .unwrap(),
            vec![Box::new(self.provider())],
            vec![Box::new(self.sink_with_key(lago_key))],
            mappings,
        );
        pipeline.lock_ttl = Duration::from_secs(60);
        pipeline
    }

    pub async fn pipeline(&self) -> Pipeline {
        self.pipeline_with(MappingSet::examples().unwrap(), LAGO_KEY)
            .await
    }

    /// What the mapping says should reach Lago, computed without the pipeline: every final
    /// record the provider yields, mapped, summed per (subscription, metric) — and per key.
    pub async fn expected(
        &self,
        mappings: &MappingSet,
    ) -> (
        BTreeMap<(String, String), Decimal>,
        BTreeMap<String, Decimal>,
    ) {
        let provider = self.provider();
        let chunks = provider.plan(&Default::default(), now()).await.unwrap();
        let mut totals = BTreeMap::new();
        let mut by_key = BTreeMap::new();
        for chunk in chunks {
            for record in provider.fetch(&chunk, now()).await.unwrap().records {
                if let MapOutcome::Mapped(ev) = mappings.apply(&record) {
                    assert!(record.is_final);
                    *totals
                        .entry((
                            ev.external_subscription_id.to_string(),
                            ev.metric_code.to_string(),
                        ))
                        .or_insert(Decimal::ZERO) += ev.value;
                    by_key.insert(record.idempotency_key(), ev.value);
                }
            }
        }
        (totals, by_key)
    }

    /// The property carrying the value of each metric of the example mappings.
    pub fn value_property(code: &str) -> &'static str {
        match code {
            "instance_hours" => "hours",
            "storage_cost" => "amount",
            _ => "value",
        }
    }

    /// The value an event stored by the Lago simulator carries.
    fn lago_value(e: &billsync::simulators::lago::StoredEvent) -> Decimal {
        e.properties
            .get(Self::value_property(&e.code))
            .and_then(|v| v.as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("event {} has no value property", e.transaction_id))
    }

    /// What the Lago simulator holds for one record: the event under its key and its
    /// corrections' (`<key>.rN`), summed.
    pub fn lago_value_of(&self, key: &str) -> Decimal {
        let corrections = format!("{key}.r");
        self.lago
            .events()
            .iter()
            .filter(|e| e.transaction_id == key || e.transaction_id.starts_with(&corrections))
            .map(Self::lago_value)
            .sum()
    }

    /// What the Lago simulator holds, per (subscription, metric), summing every stored event
    /// (a duplicate would be counted twice).
    pub fn lago_totals(&self) -> BTreeMap<(String, String), Decimal> {
        let mut totals = BTreeMap::new();
        for e in self.lago.events() {
            let value = Self::lago_value(&e);
            *totals
                .entry((e.external_subscription_id.clone(), e.code.clone()))
                .or_insert(Decimal::ZERO) += value;
        }
        totals
    }
}

/// A settings file for the binary, pointing at the simulators; `extra` is appended (top-level
/// YAML such as a `metrics:` section).
pub fn write_config(
    dir: &Path,
    metalsoft: &str,
    lago: &str,
    mappings: &str,
    extra: &str,
) -> String {
    let path = dir.join("billsync.yaml");
    std::fs::write(
        &path,
        format!(
            "ledger:\n  path: {ledger}\nmappings:\n  - {mappings}\nproviders:\n  metalsoft_test:\n    kind: metalsoft\n    endpoint: {metalsoft}\n    api_key: env:TEST_MS_KEY\n    user_ids: [1, 2]\n    window: 1d\n    settle_delay: 2h\n    start: 2026-10-01T00:00:00Z\nsinks:\n  lago:\n    kind: lago\n    api_url: {lago}\n    api_key: env:TEST_LAGO_KEY\n    batch_size: 25\n    retry:\n      max_retries: 2\n      min_delay: 10ms\n      max_delay: 50ms\n{extra}",
            ledger = dir.join("ledger").join("ledger.db").display(),
        ),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

/// The example mapping files, written to `dir/mappings` (as an operator's checkout has them).
pub fn example_mappings_dir(dir: &Path) -> PathBuf {
    let mappings = dir.join("mappings");
    std::fs::create_dir_all(&mappings).unwrap();
    for (name, text) in billsync::mapping::EXAMPLE_MAPPINGS {
        let file = Path::new(name).file_name().unwrap();
        std::fs::write(mappings.join(file), text).unwrap();
    }
    mappings
}
