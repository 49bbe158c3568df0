//! The file sinks (JSON Lines and FOCUS CSV): exact content, atomic writes, re-runs after a
//! crash that never duplicate a line, and routing (each record reaches only its rule's sink).
//! Also the FOCUS export of the demo data that `scripts/focus-validate.sh` feeds to the FOCUS
//! validator (`focus_export_of_the_demo`).

#[path = "common/world.rs"]
mod world;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use billsync::config::Secret;
use billsync::ledger::Ledger;
use billsync::mapping::{MappedEvent, MappingSet};
use billsync::record::UsageRecord;
use billsync::simulators::lago::Behaviour;
use billsync::sinks::focus::{FocusConfig, FocusSink, FocusVersion, EXTRA_COLUMNS};
use billsync::sinks::jsonl::{JsonlConfig, JsonlSink};
use billsync::sinks::{EncodeError, Outcome, Outgoing, Sink, SinkStopped};
use billsync::sync::{Pipeline, RunOutcome, SyncOptions};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

/// The FOCUS 1.0 Mandatory columns under their 1.0 column IDs (spec v1.0,
/// `specification/columns/*.md`: "Feature level: Mandatory"). FOCUS 1.2 has the same list.
const FOCUS_MANDATORY: &[&str] = &[
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
];

/// The FOCUS 1.0 Conditional columns `focus-validator` 1.0.0 also requires (its `*_Required`
/// rules), under their 1.0 column IDs.
const FOCUS_CONDITIONAL_REQUIRED: &[&str] = &[
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedUnitPrice",
    "ListUnitPrice",
    "PricingCategory",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
];

/// The 1.0-preview names focus-validator 1.0.0 still uses in its 1.0 rules; not FOCUS 1.0.
const PREVIEW_NAMES: &[&str] = &["Provider", "Publisher", "InvoiceIssuer", "ResourceID"];

fn t(y: i32, mo: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, 0, 0).unwrap()
}

fn event(value: &str) -> MappedEvent {
    MappedEvent {
        rule: "test.yaml#instance-hours".into(),
        sink: None,
        external_subscription_id: "sub_acme".into(),
        external_customer_id: Some("acme".into()),
        metric_code: "instance_hours".into(),
        value_property: "hours".into(),
        value: Decimal::from_str(value).unwrap(),
        properties: BTreeMap::from([
            ("instance".into(), "i-1".into()),
            ("note".into(), "a \"quoted\", value".into()),
        ]),
        timestamp: t(2026, 10, 5, 0),
    }
}

fn record() -> UsageRecord {
    UsageRecord {
        provider: "metalsoft".into(),
        source: "metalsoft_test".into(),
        billing_account_id: "1".into(),
        sub_account_id: "7".into(),
        resource_id: "1234".into(),
        resource_name: Some("web, \"front\"".into()),
        resource_type: "instance".into(),
        service_name: "Instances".into(),
        sku_id: Some("M.8.8".into()),
        charge_description: Some("instance-hours".into()),
        charge_period_start: t(2026, 10, 31, 23),
        charge_period_end: t(2026, 11, 1, 0),
        consumed_quantity: Decimal::from_str("3600.000").unwrap(),
        consumed_unit: "seconds".into(),
        billed_cost: Decimal::from_str("0.1250").unwrap(),
        billing_currency: "usd".into(),
        scope: "7".into(),
        natural_key: vec![("id".into(), "1".into())],
        is_final: true,
        attributes: BTreeMap::new(),
        raw: Default::default(),
    }
}

fn jsonl(dir: &Path) -> JsonlSink {
    JsonlSink::new(
        "export".into(),
        JsonlConfig {
            directory: dir.to_path_buf(),
            prefix: None,
            batch_size: 10,
        },
    )
    .unwrap()
}

fn focus(dir: &Path, version: &str) -> FocusSink {
    FocusSink::new(
        "focus".into(),
        FocusConfig {
            directory: dir.to_path_buf(),
            prefix: Some("cur".into()),
            version: version.into(),
            batch_size: 10,
            provider_names: BTreeMap::new(),
            service_categories: BTreeMap::new(),
        },
    )
    .unwrap()
}

fn outgoing(sink: &dyn Sink, ids: &[i64]) -> Vec<Outgoing> {
    ids.iter()
        .map(|&id| {
            let key = format!("metalsoft.7.20261005T000000.{id:024}");
            Outgoing {
                id,
                payload: sink
                    .encode_record(&key, &event(&format!("{id}.5")), &record())
                    .unwrap(),
                key,
                unclear_since: None,
            }
        })
        .collect()
}

/// (file name, content) of every file in `dir`, sorted by name.
fn files(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn jsonl_line_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let s = jsonl(dir.path());
    assert_eq!(
        s.encode("k1", &event("1.500")).unwrap(),
        r#"{"key":"k1","subscription":"sub_acme","customer":"acme","metric":"instance_hours","property":"hours","value":"1.5","timestamp":"2026-10-05T00:00:00Z","properties":{"instance":"i-1","note":"a \"quoted\", value"},"rule":"test.yaml#instance-hours"}"#
    );
    assert!(s.encode("", &event("1")).is_err());
    // Bad prefixes and batch sizes are configuration errors.
    for (prefix, size) in [(Some("../x"), 10), (Some(""), 10), (None, 0)] {
        assert!(JsonlSink::new(
            "export".into(),
            JsonlConfig {
                directory: dir.path().into(),
                prefix: prefix.map(str::to_string),
                batch_size: size,
            }
        )
        .is_err());
    }
}

#[tokio::test]
async fn jsonl_write_is_atomic_complete_and_named_by_the_first_id() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let s = jsonl(&out_dir);
    let b = outgoing(&s, &[7, 8, 9]);
    assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered; 3]);
    let f = files(&out_dir);
    assert_eq!(f.len(), 1, "no temporary file left: {f:?}");
    assert_eq!(f[0].0, "export-00000000000000000007.jsonl");
    let expected: String = b.iter().map(|o| format!("{}\n", o.payload)).collect();
    assert_eq!(f[0].1, expected);
    // Every line is a JSON object with the exact decimal string.
    for (line, o) in f[0].1.lines().zip(&b) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["key"], o.key.as_str());
    }
}

#[tokio::test]
async fn rewrite_after_a_crash_replaces_the_file_instead_of_duplicating() {
    let dir = tempfile::tempdir().unwrap();
    let s = jsonl(dir.path());
    // Batch 1..=2 written, the "process dies" before the ledger's ack: still pending. The next
    // run's first batch starts at the same id and holds one more record.
    s.deliver(&outgoing(&s, &[1, 2])).await.unwrap();
    s.deliver(&outgoing(&s, &[1, 2, 3])).await.unwrap();
    let f = files(dir.path());
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].1.lines().count(), 3);

    // A lower id became pending in between (another batch start): the earlier attempt's file,
    // whose first record is in the new batch, is superseded and removed.
    s.deliver(&outgoing(&s, &[5, 6])).await.unwrap();
    s.deliver(&outgoing(&s, &[4, 5, 6])).await.unwrap();
    let f = files(dir.path());
    assert_eq!(
        f.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        vec![
            "export-00000000000000000001.jsonl",
            "export-00000000000000000004.jsonl"
        ]
    );
    // An acknowledged file (its first id is not in the batch) is left alone.
    s.deliver(&outgoing(&s, &[8, 9])).await.unwrap();
    assert_eq!(files(dir.path()).len(), 3);
    let lines: Vec<String> = files(dir.path())
        .iter()
        .flat_map(|(_, c)| c.lines().map(str::to_string).collect::<Vec<_>>())
        .collect();
    let unique: HashSet<&String> = lines.iter().collect();
    assert_eq!(lines.len(), unique.len(), "no duplicate line");
    assert_eq!(lines.len(), 8);
}

/// A crash between creating the temporary file and the rename leaves a `.tmp` file behind.
/// Its records were never acknowledged (the ack follows the rename), so they are still pending
/// and the next write holds them: the leftover is garbage. The sink's first write removes the
/// leftovers of its own prefix (and only those), without touching the temporary files of
/// writes of its own that are in flight.
#[tokio::test]
async fn a_temporary_file_left_by_a_crash_is_removed_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir
        .path()
        .join(".export-00000000000000000001.jsonl.Xy12ab.tmp");
    std::fs::write(&stale, "{\"key\":\"half a line").unwrap();
    let other = dir.path().join(".cur-00000000000000000001.csv.Qw34cd.tmp");
    std::fs::write(&other, "another sink's file").unwrap();
    let s = jsonl(dir.path());
    // Two batches in flight at once: neither may lose its temporary file to the clean-up.
    let (first, second) = (outgoing(&s, &[1, 2]), outgoing(&s, &[3, 4]));
    let (a, b) = tokio::join!(s.deliver(&first), s.deliver(&second));
    assert_eq!(a.unwrap(), vec![Outcome::Delivered; 2]);
    assert_eq!(b.unwrap(), vec![Outcome::Delivered; 2]);
    assert!(!stale.exists(), "the crash leftover is removed");
    assert!(other.exists(), "another prefix's file is left alone");
    let names: Vec<String> = files(dir.path()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        vec![
            ".cur-00000000000000000001.csv.Qw34cd.tmp",
            "export-00000000000000000001.jsonl",
            "export-00000000000000000003.jsonl"
        ]
    );
}

/// A sink that writes through the JSONL sink and then "crashes" once (SinkStopped: the run
/// ends, nothing of the batch is acknowledged) — the window between rename and ack.
struct CrashAfterWrite {
    inner: JsonlSink,
    crashed: AtomicBool,
}

#[async_trait]
impl Sink for CrashAfterWrite {
    fn kind(&self) -> &'static str {
        "jsonl"
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }
    fn encode(&self, key: &str, event: &MappedEvent) -> Result<String, EncodeError> {
        self.inner.encode(key, event)
    }
    async fn deliver(&self, batch: &[Outgoing]) -> Result<Vec<Outcome>, SinkStopped> {
        let out = self.inner.deliver(batch).await?;
        if !self.crashed.swap(true, Ordering::SeqCst) {
            return Err(SinkStopped::new(
                self.name(),
                "simulated crash before the ledger's ack",
            ));
        }
        Ok(out)
    }
}

async fn pipeline(world: &world::World, sink: Box<dyn Sink>) -> Pipeline {
    let mut p = Pipeline::new(
        Ledger::open(&world.dir.path().join("ledger.db"))
            .await
            .unwrap(),
        vec![Box::new(world.provider())],
        vec![sink],
        MappingSet::examples().unwrap(),
    );
    p.lock_ttl = Duration::from_secs(60);
    p
}

#[tokio::test]
async fn pipeline_rerun_after_a_crash_never_duplicates_lines() {
    let world = world::World::start(Behaviour::default()).await;
    let out = world.dir.path().join("jsonl");
    let opts = SyncOptions {
        now: Some(world::now()),
        ..Default::default()
    };
    let crashing = CrashAfterWrite {
        inner: jsonl(&out),
        crashed: AtomicBool::new(false),
    };
    let first = pipeline(&world, Box::new(crashing))
        .await
        .sync(&opts)
        .await
        .unwrap();
    assert_eq!(first.outcome, RunOutcome::SinkStopped);
    assert_eq!(first.sent, 0);
    assert_eq!(
        files(&out).len(),
        1,
        "the first batch is on disk, unacknowledged"
    );

    let second = pipeline(&world, Box::new(jsonl(&out)))
        .await
        .sync(&opts)
        .await
        .unwrap();
    // (`undelivered` counts the demo's one unmapped record too.)
    assert_eq!(second.failed, 0, "{second:?}");
    assert!(second.sent > 0);
    // A third run has nothing to write.
    let third = pipeline(&world, Box::new(jsonl(&out)))
        .await
        .sync(&opts)
        .await
        .unwrap();
    assert_eq!(third.sent, 0);

    let (_, expected) = world.expected(&MappingSet::examples().unwrap()).await;
    let mut seen = BTreeMap::new();
    for (name, content) in files(&out) {
        assert!(name.ends_with(".jsonl") && !name.starts_with('.'), "{name}");
        for line in content.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let key = v["key"].as_str().unwrap().to_string();
            let value = Decimal::from_str(v["value"].as_str().unwrap()).unwrap();
            assert!(seen.insert(key.clone(), value).is_none(), "duplicate {key}");
        }
    }
    assert_eq!(seen, expected);
}

fn parse_csv(text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let header = r.headers().unwrap().iter().map(str::to_string).collect();
    let rows = r
        .records()
        .map(|x| x.unwrap().iter().map(str::to_string).collect())
        .collect();
    (header, rows)
}

fn column<'a>(header: &[String], row: &'a [String], name: &str) -> &'a str {
    let i = header
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name}"));
    &row[i]
}

#[tokio::test]
async fn focus_csv_has_every_required_column_extras_last_and_utc_times() {
    let dir = tempfile::tempdir().unwrap();
    let s = focus(dir.path(), "1.0");
    assert_eq!(s.version(), FocusVersion::V1_0);
    let b = outgoing(&s, &[3, 4]);
    s.deliver(&b).await.unwrap();
    let f = files(dir.path());
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].0, "cur-00000000000000000003.csv");
    let (header, rows) = parse_csv(&f[0].1);
    for c in FOCUS_MANDATORY.iter().chain(FOCUS_CONDITIONAL_REQUIRED) {
        assert!(header.iter().any(|h| h == c), "missing {c}");
    }
    for old in PREVIEW_NAMES {
        assert!(
            !header.iter().any(|h| h == old),
            "{old} is not a FOCUS 1.0 name"
        );
    }
    // x_ extras come after every FOCUS column; nothing else is unprefixed.
    let first_extra = header.iter().position(|h| h.starts_with("x_")).unwrap();
    assert!(header[first_extra..].iter().all(|h| h.starts_with("x_")));
    assert_eq!(&header[first_extra..], EXTRA_COLUMNS);
    assert!(header[..first_extra]
        .iter()
        .all(|h| FOCUS_MANDATORY.contains(&h.as_str())
            || FOCUS_CONDITIONAL_REQUIRED.contains(&h.as_str())
            || h == "ChargeFrequency"));
    assert_eq!(rows.len(), 2);
    let row = &rows[0];
    // Period: start inclusive, end exclusive, UTC with Z; billing period = the month of start.
    assert_eq!(
        column(&header, row, "ChargePeriodStart"),
        "2026-10-31T23:00:00Z"
    );
    assert_eq!(
        column(&header, row, "ChargePeriodEnd"),
        "2026-11-01T00:00:00Z"
    );
    assert_eq!(
        column(&header, row, "BillingPeriodStart"),
        "2026-10-01T00:00:00Z"
    );
    assert_eq!(
        column(&header, row, "BillingPeriodEnd"),
        "2026-11-01T00:00:00Z"
    );
    for c in [
        "ChargePeriodStart",
        "ChargePeriodEnd",
        "BillingPeriodStart",
        "BillingPeriodEnd",
    ] {
        let v = column(&header, row, c);
        assert!(v.ends_with('Z'));
        assert_eq!(
            DateTime::parse_from_rfc3339(v)
                .unwrap()
                .offset()
                .local_minus_utc(),
            0
        );
    }
    // Exact decimals, provider fields, quoting survives.
    assert_eq!(column(&header, row, "BilledCost"), "0.125");
    assert_eq!(column(&header, row, "ConsumedQuantity"), "3600");
    assert_eq!(column(&header, row, "BillingCurrency"), "USD");
    assert_eq!(column(&header, row, "ChargeCategory"), "Usage");
    assert_eq!(column(&header, row, "ChargeClass"), "");
    assert_eq!(column(&header, row, "ChargeFrequency"), "Usage-Based");
    assert_eq!(column(&header, row, "ServiceCategory"), "Compute");
    assert_eq!(column(&header, row, "ProviderName"), "MetalSoft");
    assert_eq!(column(&header, row, "ResourceId"), "1234");
    assert_eq!(column(&header, row, "ResourceName"), "web, \"front\"");
    assert_eq!(column(&header, row, "x_BilledValue"), "3.5");
    assert_eq!(column(&header, row, "x_Subscription"), "sub_acme");
    assert_eq!(column(&header, row, "x_IdempotencyKey"), b[0].key);
    // The frozen payload is exactly the file's row.
    assert_eq!(f[0].1.lines().nth(1).unwrap(), b[0].payload);

    // A negative cost is a credit.
    let mut credit = record();
    credit.billed_cost = Decimal::from_str("-2.00").unwrap();
    let line = s.encode_record("k-credit", &event("1"), &credit).unwrap();
    let (_, rows) = parse_csv(&format!("{}\n{line}\n", FocusSink::header_line()));
    assert_eq!(column(&header, &rows[0], "ChargeCategory"), "Credit");
    assert_eq!(column(&header, &rows[0], "BilledCost"), "-2");
    // FOCUS 1.0: the consumed columns are null for any category but Usage.
    assert_eq!(column(&header, &rows[0], "ConsumedQuantity"), "");
    assert_eq!(column(&header, &rows[0], "ConsumedUnit"), "");
    assert_eq!(column(&header, &rows[0], "PricingQuantity"), "3600");
    // A period that ends before it starts is refused at staging.
    let mut bad = record();
    bad.charge_period_end = bad.charge_period_start;
    assert!(s.encode_record("k-bad", &event("1"), &bad).is_err());
}

#[tokio::test]
async fn focus_1_2_writes_the_same_columns_and_corrections_are_usage_with_their_class() {
    let dir = tempfile::tempdir().unwrap();
    let s = focus(dir.path(), "1.2");
    assert_eq!(s.version(), FocusVersion::V1_2);
    let key = "metalsoft.7.20261005T000000.abcdef";
    let correction = format!("{key}.r1");
    let b = vec![
        Outgoing {
            id: 1,
            key: key.into(),
            payload: s.encode_record(key, &event("2"), &record()).unwrap(),
            unclear_since: None,
        },
        Outgoing {
            id: 2,
            key: correction.clone(),
            payload: s
                .encode_record(&correction, &event("-0.5"), &{
                    // A correction's record carries differences (Pipeline::correction).
                    let mut delta = record();
                    delta.billed_cost = Decimal::from_str("-0.03").unwrap();
                    delta.consumed_quantity = Decimal::from(-900);
                    delta
                })
                .unwrap(),
            unclear_since: None,
        },
    ];
    s.deliver(&b).await.unwrap();
    let (header, rows) = parse_csv(&files(dir.path())[0].1);
    // FOCUS 1.1 and 1.2 renamed no 1.0 column and made no new column mandatory.
    assert_eq!(
        files(dir.path())[0].1.lines().next().unwrap(),
        FocusSink::header_line()
    );
    for c in FOCUS_MANDATORY {
        assert!(header.iter().any(|h| h == c), "missing {c}");
    }
    assert_eq!(column(&header, &rows[0], "ChargeClass"), "");
    assert_eq!(column(&header, &rows[1], "ChargeClass"), "Correction");
    assert_eq!(column(&header, &rows[1], "x_CorrectionOf"), key);
    assert_eq!(column(&header, &rows[1], "x_BilledValue"), "-0.5");
    // A negative difference restates usage: not a credit.
    assert_eq!(column(&header, &rows[1], "ChargeCategory"), "Usage");
    assert_eq!(column(&header, &rows[1], "BilledCost"), "-0.03");
    assert_eq!(column(&header, &rows[1], "ConsumedQuantity"), "-900");
    assert_eq!(column(&header, &rows[1], "ProviderName"), "MetalSoft");

    // Unknown versions and categories are configuration errors.
    let bad = |version: &str, category: &str| {
        FocusSink::new(
            "focus".into(),
            FocusConfig {
                directory: dir.path().into(),
                prefix: None,
                version: version.into(),
                batch_size: 10,
                provider_names: BTreeMap::new(),
                service_categories: BTreeMap::from([("Instances".into(), category.into())]),
            },
        )
        .is_err()
    };
    assert!(bad("1.1", "Compute"));
    assert!(bad("1.0", "Servers"));
    assert!(!bad("1.2", "Compute"));
}

/// The FOCUS export of the demo data (all four providers, the example mappings, the FOCUS sink
/// as the only sink), for `scripts/focus-validate.sh`. Writes to `$BILLSYNC_FOCUS_OUT`, or to
/// a temporary directory when unset (then it only checks that the export runs).
#[tokio::test]
#[ignore = "run by scripts/focus-validate.sh"]
async fn focus_export_of_the_demo() {
    use billsync::demo;
    use billsync::providers::jelastic::{JelasticConfig, JelasticProvider, Period};
    use billsync::providers::metalsoft::{MetalsoftConfig, MetalsoftProvider};
    use billsync::providers::sakura::{Month, SakuraConfig, SakuraProvider};
    use billsync::providers::softlayer::{SoftlayerConfig, SoftlayerProvider};
    use billsync::providers::Provider;
    use billsync::simulators::jelastic::JelasticSim;
    use billsync::simulators::metalsoft::MetalsoftSim;
    use billsync::simulators::sakura::SakuraSim;
    use billsync::simulators::softlayer::SoftlayerSim;

    let tmp = tempfile::tempdir().unwrap();
    let out: PathBuf = std::env::var_os("BILLSYNC_FOCUS_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("focus"));
    let metalsoft = MetalsoftSim::start(demo::demo_dataset().unwrap(), "ms")
        .await
        .unwrap();
    let softlayer = SoftlayerSim::start(demo::demo_softlayer_dataset(), "demo", "sl")
        .await
        .unwrap();
    let sakura = SakuraSim::start(demo::demo_sakura_dataset().unwrap(), "tok", "sec")
        .await
        .unwrap();
    let jelastic = JelasticSim::start(demo::demo_jelastic_dataset(), "sess")
        .await
        .unwrap();
    let mut ms = MetalsoftConfig::new(
        metalsoft.url.clone(),
        Secret::new("ms"),
        vec![1, 2],
        demo::demo_start(),
    );
    ms.window = chrono::Duration::days(1);
    ms.settle_delay = chrono::Duration::hours(2);
    let sl = SoftlayerConfig::new(softlayer.url.clone(), "demo", Secret::new("sl"));
    let sk = SakuraConfig::new(
        sakura.endpoint.clone(),
        Secret::new("tok"),
        Secret::new("sec"),
        Month::new(2026, 9).unwrap(),
    );
    let mut jl = JelasticConfig::new(
        jelastic.url.clone(),
        Secret::new("sess"),
        "EUR",
        demo::demo_start(),
    );
    jl.period = Period::Day;
    jl.max_buckets_per_request = 31;
    let providers: Vec<Box<dyn Provider>> = vec![
        Box::new(MetalsoftProvider::new("metalsoft_demo".into(), ms).unwrap()),
        Box::new(SoftlayerProvider::new("softlayer_demo".into(), sl).unwrap()),
        Box::new(SakuraProvider::new("sakura_demo".into(), sk).unwrap()),
        Box::new(JelasticProvider::new("jelastic_demo".into(), jl).unwrap()),
    ];
    let sink = FocusSink::new(
        "focus_demo".into(),
        FocusConfig {
            directory: out.clone(),
            prefix: Some("focus-demo".into()),
            version: "1.0".into(),
            batch_size: 100,
            provider_names: BTreeMap::new(),
            service_categories: BTreeMap::new(),
        },
    )
    .unwrap();
    let pipeline = Pipeline::new(
        Ledger::open(&tmp.path().join("ledger.db")).await.unwrap(),
        providers,
        vec![Box::new(sink)],
        MappingSet::examples().unwrap(),
    );
    let summary = pipeline
        .sync(&SyncOptions {
            now: Some(world::now()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(summary.sent > 0, "{summary:?}");
    assert!(
        matches!(summary.outcome, RunOutcome::Ok | RunOutcome::Undelivered),
        "{summary:?}"
    );
    let written: usize = files(&out).iter().map(|(_, c)| c.lines().count() - 1).sum();
    assert_eq!(written as u64, summary.sent);
    println!("FOCUS export: {written} rows in {}", out.display());
}

/// The example mappings with MetalSoft traffic routed to `sink: finops` and storage to a sink
/// that is not configured.
fn routed_mappings() -> MappingSet {
    let sources: Vec<(String, String)> = billsync::mapping::EXAMPLE_MAPPINGS
        .iter()
        .map(|(name, text)| {
            let text = if name.ends_with("metalsoft.yaml") {
                let routed = text
                    .replace(
                        "    metric: network_gb\n",
                        "    metric: network_gb\n    sink: finops\n",
                    )
                    .replace(
                        "    metric: storage_cost\n",
                        "    metric: storage_cost\n    sink: nowhere\n",
                    );
                assert_ne!(&routed, text);
                routed
            } else {
                text.to_string()
            };
            (name.to_string(), text)
        })
        .collect();
    MappingSet::from_sources(&sources).unwrap()
}

#[tokio::test]
async fn each_record_reaches_only_the_sink_its_rule_names_with_its_own_status() {
    let world = world::World::start(Behaviour::default()).await;
    let archive = world.dir.path().join("jsonl");
    let finops = world.dir.path().join("focus");
    // The FOCUS sink cannot write at first: its directory is a file.
    std::fs::write(&finops, "not a directory").unwrap();
    let pipeline = || async {
        let focus_sink = FocusSink::new(
            "finops".into(),
            FocusConfig {
                directory: finops.clone(),
                prefix: None,
                version: "1.0".into(),
                batch_size: 10,
                provider_names: BTreeMap::new(),
                service_categories: BTreeMap::new(),
            },
        )
        .unwrap();
        let mut p = Pipeline::new(
            Ledger::open(&world.dir.path().join("ledger.db"))
                .await
                .unwrap(),
            vec![Box::new(world.provider())],
            // The first sink is the default for rules that name none.
            vec![Box::new(jsonl(&archive)), Box::new(focus_sink)],
            routed_mappings(),
        );
        p.lock_ttl = Duration::from_secs(60);
        p
    };
    let opts = SyncOptions {
        now: Some(world::now()),
        ..Default::default()
    };
    let by_sink = |ledger_csv: &str| {
        let (header, rows) = parse_csv(ledger_csv);
        let mut m: BTreeMap<(String, String, String), usize> = BTreeMap::new();
        for r in &rows {
            *m.entry((
                column(&header, r, "sink").to_string(),
                column(&header, r, "metric").to_string(),
                column(&header, r, "status").to_string(),
            ))
            .or_default() += 1;
        }
        m
    };
    let ledger_csv = |p: &Pipeline| {
        let p = p.ledger.clone();
        async move {
            let mut out = Vec::new();
            p.export_csv(
                &billsync::ledger::RecordFilter {
                    status: None,
                    provider: None,
                    since: None,
                    until: None,
                    run: None,
                    key: None,
                },
                &mut out,
            )
            .await
            .unwrap();
            String::from_utf8(out).unwrap()
        }
    };

    let p = pipeline().await;
    let first = p.sync(&opts).await.unwrap();
    assert_eq!(first.outcome, RunOutcome::SinkStopped, "{first:?}");
    let counts = by_sink(&ledger_csv(&p).await);
    // Traffic waits for finops only; everything else the archive took.
    let traffic_pending = counts[&("finops".into(), "network_gb".into(), "pending".into())];
    assert!(traffic_pending > 0, "{counts:?}");
    assert!(counts
        .keys()
        .all(|(sink, metric, status)| match metric.as_str() {
            "network_gb" => sink == "finops" && status == "pending",
            "storage_cost" => sink.is_empty() && status == "unmapped",
            "" => sink.is_empty(),
            _ => sink == "export" && status == "sent", // the JSON Lines sink
        }));
    let unmapped_storage = counts[&(String::new(), "storage_cost".into(), "unmapped".into())];
    assert!(unmapped_storage > 0, "{counts:?}");
    let archived: Vec<serde_json::Value> = files(&archive)
        .iter()
        .flat_map(|(_, c)| {
            c.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(first.sent > 0, "{first:?}");
    assert_eq!(archived.len() as u64, first.sent);
    assert!(archived
        .iter()
        .all(|e| e["metric"] != "network_gb" && e["metric"] != "storage_cost"));

    // The directory is fixed: the next run sends the traffic to finops and nothing else.
    std::fs::remove_file(&finops).unwrap();
    let p = pipeline().await;
    let second = p.sync(&opts).await.unwrap();
    assert_eq!(second.sent as usize, traffic_pending, "{second:?}");
    let counts = by_sink(&ledger_csv(&p).await);
    assert_eq!(
        counts[&("finops".into(), "network_gb".into(), "sent".into())],
        traffic_pending
    );
    let (header, rows) =
        files(&finops)
            .iter()
            .fold((Vec::new(), Vec::new()), |(_, mut all), (_, c)| {
                let (h, rows) = parse_csv(c);
                all.extend(rows);
                (h, all)
            });
    assert_eq!(rows.len(), traffic_pending);
    assert!(rows
        .iter()
        .all(|r| column(&header, r, "x_Metric") == "network_gb"));
    let archived_again: usize = files(&archive).iter().map(|(_, c)| c.lines().count()).sum();
    assert_eq!(
        archived_again,
        archived.len(),
        "the archive got nothing new"
    );
    // A rule naming a sink that is not configured holds its records with that reason.
    let (header, rows) = parse_csv(&ledger_csv(&p).await);
    let storage: Vec<_> = rows
        .iter()
        .filter(|r| column(&header, r, "metric") == "storage_cost")
        .collect();
    assert_eq!(storage.len(), unmapped_storage);
    assert!(storage.iter().all(|r| column(&header, r, "last_error")
        .contains("targets sink \"nowhere\", which is not configured")));
}
