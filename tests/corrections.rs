//! Corrections, end to end with SAKURA Cloud: a provisional month pushed early (the source opts
//! in with `push_provisional`) and changed by the provider afterwards yields exactly one
//! correction carrying the exact difference; once the month is final, what Lago holds for it
//! equals the provider's final total to the yen. A sent payload is never overwritten. The same
//! with the FOCUS export: correction rows carry differences of cost and quantity, so the
//! export's `BilledCost` sums to the provider's total; a cost-only change reaches FOCUS only.
//! A correction Lago refused, replayed, goes out under its own key with the difference still
//! missing (nothing if a later correction covered it); replay never mints a key. A refused or
//! held original with corrections that changes again is corrected, never rewritten in place:
//! what goes out adds up to the latest content, not to it plus the corrections.

use std::str::FromStr;
use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::ledger::{Ledger, RecordFilter, Status};
use billsync::mapping::MappingSet;
use billsync::providers::sakura::{Month, SakuraConfig, SakuraProvider};
use billsync::simulators::lago::{LagoSim, LagoSimConfig, LagoSimHandle};
use billsync::simulators::sakura::{SakuraDataset, SakuraSim, SakuraSimHandle};
use billsync::sinks::lago::{LagoConfig, LagoSink};
use billsync::sync::{Pipeline, ReplayOptions, RunSummary, SyncOptions};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
}

/// A Lago sink nobody answers at (port 9): for tests that stage and never push.
fn offline_lago() -> LagoSink {
    LagoSink::new(
        "lago".into(),
        LagoConfig {
            api_url: "http://127.0.0.1:9".into(),
            api_key: Secret::new("k"),
            batch_size: 10,
            timeout: Duration::from_secs(1),
            retry: retry(),
        },
    )
    .unwrap()
}

fn retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

#[tokio::test]
async fn a_changed_provisional_sakura_month_yields_one_correction_and_ends_equal_to_the_yen() {
    let october = Month::new(2026, 10).unwrap();
    let november = Month::new(2026, 11).unwrap();
    let sakura = SakuraSim::start(
        SakuraDataset::generate(3, october, 2, 3).unwrap(),
        "tok",
        "sec",
    )
    .await
    .unwrap();
    let lago = LagoSim::start(LagoSimConfig {
        api_key: "lago-key".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = async || {
        let mut cfg = SakuraConfig::new(
            sakura.endpoint.clone(),
            Secret::new("tok"),
            Secret::new("sec"),
            october,
        );
        cfg.push_provisional = true;
        cfg.retry = retry();
        Pipeline::new(
            Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
            vec![Box::new(SakuraProvider::new("sakura".into(), cfg).unwrap())],
            vec![Box::new(
                LagoSink::new(
                    "lago".into(),
                    LagoConfig {
                        api_url: lago.url.clone(),
                        api_key: Secret::new("lago-key"),
                        batch_size: 100,
                        timeout: Duration::from_secs(5),
                        retry: retry(),
                    },
                )
                .unwrap(),
            )],
            MappingSet::examples().unwrap(),
        )
    };
    let sync_at = |now| SyncOptions {
        now: Some(now),
        ..Default::default()
    };
    let lago_total = |month: Month| -> Decimal {
        lago.events()
            .iter()
            .filter(|e| e.timestamp >= month.start_utc() && e.timestamp < month.end_utc())
            .map(|e| Decimal::from_str(e.properties["amount"].as_str().unwrap()).unwrap())
            .sum()
    };

    // 20 November: October is final, November provisional; both are pushed.
    let first = pipeline()
        .await
        .sync(&sync_at(at(2026, 11, 20)))
        .await
        .unwrap();
    assert_eq!(first.sent, 6, "{first:?}");
    assert_eq!(lago_total(november), sakura.dataset().month_total(november));
    let frozen = lago.events();

    // The provider re-states one November line: 1,000 + 100 tax more.
    let bill = sakura.dataset().bills_of(november)[0].clone();
    let line = bill.lines[1].clone();
    let before = line.price_excl_tax + line.tax;
    let (net, tax) = (
        line.price_excl_tax + Decimal::from(1000),
        line.tax + Decimal::from(100),
    );
    sakura
        .set_detail_amount(bill.bill_id, line.index, net, tax)
        .unwrap();

    let second = pipeline()
        .await
        .sync(&sync_at(at(2026, 11, 21)))
        .await
        .unwrap();
    assert_eq!(second.corrections, 1, "{second:?}");
    assert_eq!(second.sent, 1, "only the correction goes out");
    let correction = lago
        .events()
        .into_iter()
        .find(|e| e.transaction_id.ends_with(".r1"))
        .expect("a correction event");
    assert_eq!(
        Decimal::from_str(correction.properties["amount"].as_str().unwrap()).unwrap(),
        net + tax - before,
        "the correction carries the exact difference"
    );
    // The ledger keeps the whole new content for audit, the provider's raw line and the
    // record's attributes included (rows travel to the stager without them; the stored body
    // has them): the correction's own record and the change of the sent original.
    let ledger = &pipeline().await.ledger;
    let all = ledger
        .records_matching(
            &RecordFilter {
                status: None,
                provider: None,
                since: None,
                until: None,
                run: None,
                key: None,
            },
            0,
            1000,
        )
        .await
        .unwrap();
    let corr = all
        .iter()
        .find(|r| r.correction_of.is_some())
        .expect("the correction is in the ledger");
    let original = all
        .iter()
        .find(|r| Some(r.id) == corr.correction_of)
        .unwrap();
    let change = ledger
        .correction_basis(corr.id)
        .await
        .unwrap()
        .unwrap()
        .latest
        .expect("the change is kept");
    for (what, record) in [
        ("correction", &corr.record),
        ("change of the original", &change),
    ] {
        assert!(!record.raw.is_null(), "{what}: raw provider fields kept");
        assert_eq!(
            record.attributes.keys().collect::<Vec<_>>(),
            original.record.attributes.keys().collect::<Vec<_>>(),
            "{what}: attributes kept"
        );
        assert_eq!(
            record.attributes["price_excl_tax"],
            net.to_string(),
            "{what}: the new content's attributes"
        );
        // Rows travel without what staging does not write as a column, either.
        assert_eq!(
            record.natural_key, original.record.natural_key,
            "{what}: natural key"
        );
        assert_eq!(record.scope, original.record.scope, "{what}: scope");
        assert_eq!(
            record.service_name, original.record.service_name,
            "{what}: service"
        );
        assert_eq!(record.sku_id, original.record.sku_id, "{what}: SKU");
        assert_eq!(
            record.resource_name, original.record.resource_name,
            "{what}: resource name"
        );
        assert!(!record.natural_key.is_empty() && !record.service_name.is_empty());
    }
    assert_ne!(
        change.raw, original.record.raw,
        "the change carries the provider's new line"
    );
    // What was sent before is untouched: same keys, same timestamps, same amounts.
    for e in &frozen {
        let now = lago
            .events()
            .into_iter()
            .find(|x| x.transaction_id == e.transaction_id)
            .unwrap();
        assert_eq!(
            (&now.properties, now.timestamp),
            (&e.properties, e.timestamp)
        );
    }

    // Read again unchanged: nothing new.
    let third = pipeline()
        .await
        .sync(&sync_at(at(2026, 11, 22)))
        .await
        .unwrap();
    assert_eq!((third.sent, third.corrections), (0, 0));

    // December: November is final with the same amounts. No further correction; Lago's
    // November equals the provider's final November to the yen.
    sakura.finalize_month(november);
    let fourth = pipeline()
        .await
        .sync(&sync_at(at(2026, 12, 5)))
        .await
        .unwrap();
    assert_eq!((fourth.sent, fourth.corrections), (0, 0), "{fourth:?}");
    assert_eq!(lago_total(november), sakura.dataset().month_total(november));
    assert_eq!(lago_total(october), sakura.dataset().month_total(october));
    let status = pipeline().await.ledger.status().await.unwrap();
    assert_eq!(status.corrections, 1);
    assert_eq!(status.open_changes, 0);
}

/// Every row of every FOCUS file in `dir`: (header, rows).
fn focus_rows(dir: &std::path::Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    names.sort();
    let mut header = Vec::new();
    let mut rows = Vec::new();
    for path in names {
        let mut r = csv::Reader::from_path(&path).unwrap();
        header = r.headers().unwrap().iter().map(str::to_string).collect();
        rows.extend(
            r.records()
                .map(|x| x.unwrap().iter().map(str::to_string).collect::<Vec<_>>()),
        );
    }
    (header, rows)
}

#[tokio::test]
async fn restated_sakura_lines_keep_the_focus_export_summable_to_the_provider_total() {
    use billsync::sinks::focus::{FocusConfig, FocusSink};
    let october = Month::new(2026, 10).unwrap();
    let november = Month::new(2026, 11).unwrap();
    let sakura = SakuraSim::start(
        SakuraDataset::generate(5, october, 2, 3).unwrap(),
        "tok",
        "sec",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("focus");
    let pipeline = async || {
        let mut cfg = SakuraConfig::new(
            sakura.endpoint.clone(),
            Secret::new("tok"),
            Secret::new("sec"),
            october,
        );
        cfg.push_provisional = true;
        cfg.retry = retry();
        Pipeline::new(
            Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
            vec![Box::new(SakuraProvider::new("sakura".into(), cfg).unwrap())],
            vec![Box::new(
                FocusSink::new(
                    "focus".into(),
                    FocusConfig {
                        directory: out.clone(),
                        prefix: None,
                        version: "1.0".into(),
                        batch_size: 100,
                        provider_names: Default::default(),
                        service_categories: Default::default(),
                    },
                )
                .unwrap(),
            )],
            MappingSet::examples().unwrap(),
        )
    };
    let sync_at = |now| SyncOptions {
        now: Some(now),
        ..Default::default()
    };
    let col = |header: &[String], name: &str| header.iter().position(|h| h == name).unwrap();
    // The export's BilledCost of one month (by ChargePeriodStart), summed exactly.
    let export_total = |month: Month| -> Decimal {
        let (header, rows) = focus_rows(&out);
        let (start, cost) = (
            col(&header, "ChargePeriodStart"),
            col(&header, "BilledCost"),
        );
        rows.iter()
            .filter(|r| {
                let t = DateTime::parse_from_rfc3339(&r[start]).unwrap();
                t >= month.start_utc() && t < month.end_utc()
            })
            .map(|r| Decimal::from_str(&r[cost]).unwrap())
            .sum()
    };
    let restate = |delta_net: i64, delta_tax: i64| {
        let bill = sakura.dataset().bills_of(november)[0].clone();
        let line = bill.lines[1].clone();
        sakura
            .set_detail_amount(
                bill.bill_id,
                line.index,
                line.price_excl_tax + Decimal::from(delta_net),
                line.tax + Decimal::from(delta_tax),
            )
            .unwrap();
        line.price_excl_tax + line.tax
    };

    // 20 November: October final, November provisional; both exported.
    let first = pipeline()
        .await
        .sync(&sync_at(at(2026, 11, 20)))
        .await
        .unwrap();
    assert!(first.sent > 0, "{first:?}");
    let november_before = sakura.dataset().month_total(november);
    assert_eq!(export_total(november), november_before);
    let rows_before = focus_rows(&out).1.len();

    // The provider restates one November line by +1,000 net and +100 tax.
    let line_before = restate(1000, 100);
    let second = pipeline()
        .await
        .sync(&sync_at(at(2026, 11, 21)))
        .await
        .unwrap();
    assert_eq!((second.corrections, second.sent), (1, 1), "{second:?}");
    let (header, rows) = focus_rows(&out);
    assert_eq!(
        rows.len(),
        rows_before + 1,
        "one correction row, no rewrite"
    );
    let r1 = rows
        .iter()
        .find(|r| r[col(&header, "x_IdempotencyKey")].ends_with(".r1"))
        .expect("a correction row");
    let original = &r1[col(&header, "x_CorrectionOf")];
    assert!(rows
        .iter()
        .any(|r| &r[col(&header, "x_IdempotencyKey")] == original));
    assert_eq!(r1[col(&header, "ChargeClass")], "Correction");
    assert_eq!(r1[col(&header, "ChargeCategory")], "Usage");
    for c in ["BilledCost", "EffectiveCost", "ListCost", "ContractedCost"] {
        assert_eq!(r1[col(&header, c)], "1100", "{c} carries the difference");
    }
    assert_eq!(r1[col(&header, "x_BilledValue")], "1100");
    // Same quantity: the difference is zero, not the line's full quantity again.
    assert_eq!(r1[col(&header, "ConsumedQuantity")], "0");
    assert_eq!(
        sakura.dataset().month_total(november),
        november_before + Decimal::from(1100)
    );
    assert_eq!(
        export_total(november),
        sakura.dataset().month_total(november)
    );

    // Restated again, downwards: measured against original + r1, not the original alone.
    let line_now = restate(-300, -30);
    assert_eq!(line_now, line_before + Decimal::from(1100));
    pipeline()
        .await
        .sync(&sync_at(at(2026, 11, 22)))
        .await
        .unwrap();
    let (header, rows) = focus_rows(&out);
    let r2 = rows
        .iter()
        .find(|r| r[col(&header, "x_IdempotencyKey")].ends_with(".r2"))
        .expect("a second correction row");
    assert_eq!(r2[col(&header, "BilledCost")], "-330");
    assert_eq!(r2[col(&header, "ChargeCategory")], "Usage");

    // December: November final with these amounts; nothing more is exported and both months
    // sum, to the yen, to the provider's final totals.
    sakura.finalize_month(november);
    let last = pipeline()
        .await
        .sync(&sync_at(at(2026, 12, 5)))
        .await
        .unwrap();
    assert_eq!((last.sent, last.corrections), (0, 0), "{last:?}");
    assert_eq!(
        export_total(november),
        sakura.dataset().month_total(november)
    );
    assert_eq!(export_total(october), sakura.dataset().month_total(october));
    assert_eq!(
        export_total(november),
        november_before + Decimal::from(1100 - 330)
    );
}

/// A MetalSoft instance line the example mappings bill by hours (the value is the quantity).
fn instance_line(cost: &str) -> billsync::record::UsageRecord {
    let start = Utc.with_ymd_and_hms(2026, 10, 5, 0, 0, 0).unwrap();
    billsync::record::UsageRecord {
        provider: "metalsoft".into(),
        source: "metalsoft".into(),
        billing_account_id: "ms".into(),
        sub_account_id: "1".into(),
        resource_id: "2416".into(),
        resource_name: Some("instance-2416".into()),
        resource_type: "instance".into(),
        service_name: "Instances".into(),
        sku_id: Some("M.8.8".into()),
        charge_description: Some("instance-2416".into()),
        charge_period_start: start,
        charge_period_end: start + chrono::Duration::hours(1),
        consumed_quantity: Decimal::from(3600),
        consumed_unit: "seconds".into(),
        billed_cost: Decimal::from_str(cost).unwrap(),
        billing_currency: "GBP".into(),
        scope: "1".into(),
        natural_key: vec![("instance".into(), "2416".into())],
        is_final: true,
        attributes: [
            ("infrastructure_id".into(), "3668".into()),
            ("is_reservation".into(), "0".into()),
        ]
        .into(),
        raw: Default::default(),
    }
}

#[tokio::test]
async fn a_cost_only_restatement_is_corrected_in_the_focus_export_only() {
    use billsync::ledger::{Correction, SentState};
    use billsync::sinks::focus::{FocusConfig, FocusSink};
    use billsync::sinks::Sink;
    let dir = tempfile::tempdir().unwrap();
    let with_sink = async |sink: Box<dyn Sink>| {
        Pipeline::new(
            Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
            Vec::new(),
            vec![sink],
            MappingSet::examples().unwrap(),
        )
    };
    let focus = with_sink(Box::new(
        FocusSink::new(
            "focus".into(),
            FocusConfig {
                directory: dir.path().join("focus"),
                prefix: None,
                version: "1.0".into(),
                batch_size: 10,
                provider_names: Default::default(),
                service_categories: Default::default(),
            },
        )
        .unwrap(),
    ))
    .await;
    let lago = with_sink(Box::new(offline_lago())).await;
    // Sent: 3600 s for 0.50; the provider now says 0.80 for the same 3600 s (1 hour billed).
    let sent_state = |row: &billsync::ledger::StageRow, cost: Option<&str>| SentState {
        key: row.key.clone(),
        subscription: row.mapped.subscription.as_deref().map(str::to_string),
        metric: row.mapped.metric.as_deref().map(str::to_string),
        sink: row.mapped.sink.as_deref().map(str::to_string),
        value_property: row.mapped.value_property.as_deref().map(str::to_string),
        billing_currency: Some(row.record.billing_currency.to_string()),
        sent_total: row.mapped.value.unwrap(),
        sent_cost: cost.map(|c| Decimal::from_str(c).unwrap()),
        sent_quantity: cost.map(|_| Decimal::from(3600)),
        next_revision: 1,
    };

    let row = focus.stage_row(instance_line("0.80"), false);
    assert_eq!(row.mapped.value, Some(Decimal::ONE), "{:?}", row.note);
    match focus.correction(&row, &sent_state(&row, Some("0.50"))) {
        Correction::Send { row: c, difference } => {
            assert!(difference.is_zero());
            assert_eq!(c.key, format!("{}.r1", row.key));
            assert_eq!(c.record.billed_cost, Decimal::from_str("0.30").unwrap());
            assert!(c.record.consumed_quantity.is_zero());
            let payload = c.mapped.payload.unwrap();
            assert!(payload.starts_with("0.3,"), "{payload}");
            assert!(payload.contains(",Correction,"), "{payload}");
        }
        other => panic!("expected a correction, got {other:?}"),
    }

    // Lago gets hours only: nothing to correct.
    let row = lago.stage_row(instance_line("0.80"), false);
    assert!(matches!(
        lago.correction(&row, &sent_state(&row, Some("0.50"))),
        Correction::NoDifference
    ));

    // What was sent was pruned by `vacuum`: the difference is unknown, a person decides.
    let row = focus.stage_row(instance_line("0.80"), false);
    match focus.correction(&row, &sent_state(&row, None)) {
        Correction::Unresolved(reason) => assert!(reason.contains("vacuum"), "{reason}"),
        other => panic!("expected unresolved, got {other:?}"),
    }
}

/// A sent record whose rule now routes it to another sink is left to a person: a correction
/// would carry only the difference to a sink that never got the original, while the sink that
/// did keeps billing the old value.
#[tokio::test]
async fn a_sent_record_now_routed_to_another_sink_is_unresolved_not_corrected() {
    use billsync::ledger::{Correction, SentState};
    let dir = tempfile::tempdir().unwrap();
    let lago = Pipeline::new(
        Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
        Vec::new(),
        vec![Box::new(offline_lago())],
        MappingSet::examples().unwrap(),
    );
    // One hour was sent; the provider now says two hours.
    let mut line = instance_line("0.50");
    line.consumed_quantity = Decimal::from(7200);
    let row = lago.stage_row(line, false);
    assert_eq!(row.mapped.value, Some(Decimal::TWO), "{:?}", row.note);
    let sent = |sink: Option<&str>| SentState {
        key: row.key.clone(),
        subscription: row.mapped.subscription.as_deref().map(str::to_string),
        metric: row.mapped.metric.as_deref().map(str::to_string),
        sink: sink.map(str::to_string),
        value_property: row.mapped.value_property.as_deref().map(str::to_string),
        billing_currency: Some(row.record.billing_currency.to_string()),
        sent_total: Decimal::ONE,
        sent_cost: Some(Decimal::from_str("0.50").unwrap()),
        sent_quantity: Some(Decimal::from(3600)),
        next_revision: 1,
    };
    // Sent to the same sink: the difference goes out.
    match lago.correction(&row, &sent(row.mapped.sink.as_deref())) {
        Correction::Send { difference, .. } => assert_eq!(difference, Decimal::ONE),
        other => panic!("expected a correction, got {other:?}"),
    }
    // Sent to another sink (the rule's `sink:` changed since): a person decides.
    let elsewhere = if row.mapped.sink.as_deref() == Some("focus") {
        "lago"
    } else {
        "focus"
    };
    match lago.correction(&row, &sent(Some(elsewhere))) {
        Correction::Unresolved(reason) => assert!(reason.contains(&row.key), "{reason}"),
        other => panic!("expected unresolved, got {other:?}"),
    }
}

// ----- replaying corrections ----------------------------------------------------------------

/// SAKURA (pushing provisional months early) → Lago, one ledger: the world of the replay tests.
struct Replayed {
    sakura: SakuraSimHandle,
    lago: LagoSimHandle,
    dir: tempfile::TempDir,
}

impl Replayed {
    async fn start() -> Replayed {
        let october = Month::new(2026, 10).unwrap();
        Replayed {
            sakura: SakuraSim::start(
                SakuraDataset::generate(7, october, 2, 3).unwrap(),
                "tok",
                "sec",
            )
            .await
            .unwrap(),
            lago: LagoSim::start(LagoSimConfig {
                api_key: "lago-key".into(),
                ..Default::default()
            })
            .await
            .unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    async fn pipeline(&self, mappings: MappingSet) -> Pipeline {
        let mut cfg = SakuraConfig::new(
            self.sakura.endpoint.clone(),
            Secret::new("tok"),
            Secret::new("sec"),
            Month::new(2026, 10).unwrap(),
        );
        cfg.push_provisional = true;
        cfg.retry = retry();
        Pipeline::new(
            Ledger::open(&self.dir.path().join("ledger.db"))
                .await
                .unwrap(),
            vec![Box::new(SakuraProvider::new("sakura".into(), cfg).unwrap())],
            vec![Box::new(
                LagoSink::new(
                    "lago".into(),
                    LagoConfig {
                        api_url: self.lago.url.clone(),
                        api_key: Secret::new("lago-key"),
                        batch_size: 100,
                        timeout: Duration::from_secs(5),
                        retry: retry(),
                    },
                )
                .unwrap(),
            )],
            mappings,
        )
    }

    async fn sync(&self, now: DateTime<Utc>, skip_push: bool) -> RunSummary {
        self.pipeline(MappingSet::examples().unwrap())
            .await
            .sync(&SyncOptions {
                now: Some(now),
                skip_push,
                ..Default::default()
            })
            .await
            .unwrap()
    }

    async fn replay(&self, status: Status, mappings: MappingSet, dry_run: bool) -> RunSummary {
        self.pipeline(mappings)
            .await
            .replay(&ReplayOptions {
                filter: RecordFilter::status(status),
                dry_run,
                reason: "the rejection was lifted".into(),
                now: Some(at(2026, 11, 23)),
            })
            .await
            .unwrap()
    }

    /// Ledger keys with this status.
    async fn keys(&self, status: Status) -> Vec<String> {
        Ledger::open(&self.dir.path().join("ledger.db"))
            .await
            .unwrap()
            .records_matching(&RecordFilter::status(status), 0, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect()
    }

    fn november() -> Month {
        Month::new(2026, 11).unwrap()
    }

    /// What Lago holds for November.
    fn lago_november(&self) -> Decimal {
        let m = Self::november();
        self.lago
            .events()
            .iter()
            .filter(|e| e.timestamp >= m.start_utc() && e.timestamp < m.end_utc())
            .map(|e| Decimal::from_str(e.properties["amount"].as_str().unwrap()).unwrap())
            .sum()
    }

    fn provider_november(&self) -> Decimal {
        self.sakura.dataset().month_total(Self::november())
    }

    /// The amount of the one Lago event with this transaction id.
    fn amount_of(&self, transaction_id: &str) -> Decimal {
        let events: Vec<_> = self
            .lago
            .events()
            .into_iter()
            .filter(|e| e.transaction_id == transaction_id)
            .collect();
        assert_eq!(events.len(), 1, "{transaction_id} in Lago: {events:?}");
        Decimal::from_str(events[0].properties["amount"].as_str().unwrap()).unwrap()
    }

    /// Change one November line by these amounts (net, tax).
    fn restate(&self, net: i64, tax: i64) {
        let bill = self.sakura.dataset().bills_of(Self::november())[0].clone();
        let line = bill.lines[1].clone();
        self.sakura
            .set_detail_amount(
                bill.bill_id,
                line.index,
                line.price_excl_tax + Decimal::from(net),
                line.tax + Decimal::from(tax),
            )
            .unwrap();
    }

    /// November pushed, then one line restated by +1,100 whose correction Lago refuses (422):
    /// returns the correction's key, held as `rejected`.
    async fn rejected_correction(&self) -> String {
        let first = self.sync(at(2026, 11, 20), false).await;
        assert!(first.sent > 0, "{first:?}");
        assert_eq!(self.lago_november(), self.provider_november());
        self.restate(1000, 100);
        let staged = self.sync(at(2026, 11, 21), true).await;
        assert_eq!(staged.corrections, 1, "{staged:?}");
        let pending = self.keys(Status::Pending).await;
        assert_eq!(pending.len(), 1, "{pending:?}");
        let r1 = pending[0].clone();
        assert!(r1.ends_with(".r1"), "{r1}");
        self.lago.reject_transaction(r1.clone());
        let refused = self.sync(at(2026, 11, 21), false).await;
        assert_eq!((refused.rejected, refused.sent), (1, 0), "{refused:?}");
        assert_eq!(self.keys(Status::Rejected).await, vec![r1.clone()]);
        assert_eq!(
            self.lago_november() + Decimal::from(1100),
            self.provider_november(),
            "Lago lacks the refused difference"
        );
        self.lago.clear_faults();
        r1
    }

    fn assert_each_key_once(&self) {
        let twice: Vec<_> = self
            .lago
            .counts()
            .into_iter()
            .filter(|(_, n)| *n != 1)
            .collect();
        assert!(twice.is_empty(), "sent more than once: {twice:?}");
    }
}

/// The example mappings without the SAKURA rules: SAKURA records no longer map.
fn mappings_without_sakura() -> MappingSet {
    let sources: Vec<(String, String)> = billsync::mapping::EXAMPLE_MAPPINGS
        .iter()
        .filter(|(name, _)| !name.contains("sakura"))
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    MappingSet::from_sources(&sources).unwrap()
}

#[tokio::test]
async fn a_rejected_correction_replayed_goes_out_under_its_own_key_with_the_difference() {
    let w = Replayed::start().await;
    let r1 = w.rejected_correction().await;
    let original = r1.trim_end_matches(".r1").to_string();
    let original_amount = w.amount_of(&original);

    // The plan names the correction's own key and the difference.
    let plan = w
        .replay(Status::Rejected, MappingSet::examples().unwrap(), true)
        .await;
    assert_eq!(plan.preview.len(), 1, "{plan:?}");
    assert!(
        plan.preview[0].starts_with(&format!("{r1} rejected → pending")),
        "{:?}",
        plan.preview
    );
    assert!(plan.preview[0].ends_with(" 1100)"), "{:?}", plan.preview);

    let replay = w
        .replay(Status::Rejected, MappingSet::examples().unwrap(), false)
        .await;
    assert_eq!(
        (replay.sent, replay.already_delivered, replay.rejected),
        (1, 0, 0),
        "{replay:?}"
    );
    assert_eq!(
        w.amount_of(&r1),
        Decimal::from(1100),
        "exactly the difference"
    );
    assert_eq!(
        w.amount_of(&original),
        original_amount,
        "the original is untouched"
    );
    assert_eq!(w.lago_november(), w.provider_november());
    w.assert_each_key_once();
    assert!(w.keys(Status::Rejected).await.is_empty());

    // Read again, and once November is final: nothing more goes out, Lago equals the provider.
    let again = w.sync(at(2026, 11, 22), false).await;
    assert_eq!((again.sent, again.corrections), (0, 0), "{again:?}");
    w.sakura.finalize_month(Replayed::november());
    let last = w.sync(at(2026, 12, 5), false).await;
    assert_eq!((last.sent, last.corrections), (0, 0), "{last:?}");
    assert_eq!(w.lago_november(), w.provider_november());
    w.assert_each_key_once();
}

#[tokio::test]
async fn a_rejected_correction_superseded_by_a_later_one_sends_nothing_on_replay() {
    let w = Replayed::start().await;
    let r1 = w.rejected_correction().await;

    // Restated again (-330) while r1 is refused: r2 carries everything Lago lacks
    // (+1,100 - 330), measured against what went out.
    w.restate(-300, -30);
    let second = w.sync(at(2026, 11, 22), false).await;
    assert_eq!((second.corrections, second.sent), (1, 1), "{second:?}");
    let r2 = r1.replace(".r1", ".r2");
    assert_eq!(w.amount_of(&r2), Decimal::from(770));
    assert_eq!(w.lago_november(), w.provider_november());

    // Replaying r1 now would bill the +1,100 twice: its difference is re-derived (zero).
    let plan = w
        .replay(Status::Rejected, MappingSet::examples().unwrap(), true)
        .await;
    assert!(
        plan.preview[0].starts_with(&format!("{r1} rejected → ignored")),
        "{:?}",
        plan.preview
    );
    let replay = w
        .replay(Status::Rejected, MappingSet::examples().unwrap(), false)
        .await;
    assert_eq!(
        (replay.sent, replay.already_delivered),
        (0, 0),
        "{replay:?}"
    );
    assert_eq!(w.lago.count(&r1), 0);
    assert_eq!(w.keys(Status::Ignored).await, vec![r1.clone()]);
    assert_eq!(w.lago_november(), w.provider_november());

    // The next restatement is measured against what Lago really holds.
    w.restate(40, 10);
    let third = w.sync(at(2026, 11, 23), false).await;
    assert_eq!((third.corrections, third.sent), (1, 1), "{third:?}");
    assert_eq!(w.amount_of(&r1.replace(".r1", ".r3")), Decimal::from(50));
    assert_eq!(w.lago_november(), w.provider_november());
    w.assert_each_key_once();
}

#[tokio::test]
async fn a_correction_held_by_replay_goes_out_once_it_maps_again() {
    let w = Replayed::start().await;
    let r1 = w.rejected_correction().await;

    // Replayed under mapping files that lost the SAKURA rule: held, nothing sent.
    let held = w
        .replay(Status::Rejected, mappings_without_sakura(), false)
        .await;
    assert_eq!((held.sent, held.held()), (0, 1), "{held:?}");
    assert_eq!(w.keys(Status::Unmapped).await, vec![r1.clone()]);
    assert_eq!(
        w.lago_november() + Decimal::from(1100),
        w.provider_november()
    );

    // The rule is back: the held correction goes out under its key with the difference.
    let replay = w
        .replay(Status::Unmapped, MappingSet::examples().unwrap(), false)
        .await;
    assert_eq!(
        (replay.sent, replay.already_delivered),
        (1, 0),
        "{replay:?}"
    );
    assert_eq!(w.amount_of(&r1), Decimal::from(1100));
    assert_eq!(w.lago_november(), w.provider_november());
    w.assert_each_key_once();
}

#[tokio::test]
async fn a_held_correction_is_covered_by_the_next_one_and_then_sends_nothing() {
    let w = Replayed::start().await;
    let r1 = w.rejected_correction().await;
    let held = w
        .replay(Status::Rejected, mappings_without_sakura(), false)
        .await;
    assert_eq!(held.held(), 1, "{held:?}");

    // Restated again while r1 is held: r2 carries all that Lago lacks.
    w.restate(-300, -30);
    let second = w.sync(at(2026, 11, 22), false).await;
    assert_eq!((second.corrections, second.sent), (1, 1), "{second:?}");
    assert_eq!(w.amount_of(&r1.replace(".r1", ".r2")), Decimal::from(770));
    assert_eq!(w.lago_november(), w.provider_november());

    let replay = w
        .replay(Status::Unmapped, MappingSet::examples().unwrap(), false)
        .await;
    assert_eq!(
        (replay.sent, replay.already_delivered),
        (0, 0),
        "{replay:?}"
    );
    assert_eq!(w.lago.count(&r1), 0);
    assert_eq!(w.keys(Status::Ignored).await, vec![r1.clone()]);
    assert_eq!(w.lago_november(), w.provider_november());

    // The next restatement is measured against what Lago really holds.
    w.restate(40, 10);
    let third = w.sync(at(2026, 11, 23), false).await;
    assert_eq!((third.corrections, third.sent), (1, 1), "{third:?}");
    assert_eq!(w.amount_of(&r1.replace(".r1", ".r3")), Decimal::from(50));
    assert_eq!(w.lago_november(), w.provider_november());
    w.assert_each_key_once();
}

#[tokio::test]
async fn replay_sends_a_record_under_its_stored_key_whatever_the_key_derivation_says_today() {
    use sqlx::Connection;
    let w = Replayed::start().await;
    let first = w.sync(at(2026, 11, 20), true).await;
    assert!(first.mapped() > 1, "{first:?}");
    let pending = w.keys(Status::Pending).await;
    let derived = pending[0].clone();
    w.lago.reject_transaction(derived.clone());
    let pushed = w.sync(at(2026, 11, 20), false).await;
    assert_eq!(pushed.rejected, 1, "{pushed:?}");

    // A ledger written by an older build keyed this record differently.
    let legacy = format!("{derived}.legacy");
    let path = w.dir.path().join("ledger.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE records SET idem_key = ?1 WHERE idem_key = ?2")
        .bind(&legacy)
        .bind(&derived)
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    w.lago.clear_faults();
    let replay = w
        .replay(Status::Rejected, MappingSet::examples().unwrap(), false)
        .await;
    assert_eq!(
        (replay.sent, replay.already_delivered),
        (1, 0),
        "{replay:?}"
    );
    assert_eq!(w.lago.count(&legacy), 1, "the stored key is the identity");
    assert_eq!(w.lago.count(&derived), 0, "no key minted by replay");
    assert_eq!(w.lago_november(), w.provider_november());
}

// ----- what a correction may add to --------------------------------------------------------

/// A Lago pipeline with no provider over `mapping` (one rule billing MetalSoft cost, in the
/// record's own currency), for staging rows by hand.
async fn cost_pipeline(dir: &tempfile::TempDir, property: &str) -> Pipeline {
    let text = format!(
        "version: 1
customers:
  - match: {{ provider: metalsoft, sub_account_id: \"1\" }}
    external_subscription_id: sub_acme
rules:
  - name: cost
    match: {{ provider: metalsoft }}
    metric: resale_cost
    property: {property}
    value: {{ cost: {{ markup_percent: 0 }} }}
"
    );
    Pipeline::new(
        Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
        Vec::new(),
        vec![Box::new(offline_lago())],
        MappingSet::from_sources(&[("cost.yaml".to_string(), text)]).unwrap(),
    )
}

/// [`cost_pipeline`] over the same ledger with mapping files that map no MetalSoft record.
async fn unmapping_pipeline(dir: &tempfile::TempDir) -> Pipeline {
    let text = "version: 1
customers:
  - match: { provider: sakura }
    external_subscription_id: sub_other
rules:
  - name: other
    match: { provider: sakura }
    metric: resale_cost
    property: amount
    value: { cost: { markup_percent: 0 } }
";
    let p = cost_pipeline(dir, "amount").await;
    Pipeline::new(
        Ledger::open(p.ledger.path()).await.unwrap(),
        Vec::new(),
        vec![Box::new(offline_lago())],
        MappingSet::from_sources(&[("other.yaml".to_string(), text.to_string())]).unwrap(),
    )
}

/// Stage `line` through `p` (its corrections decided by the pipeline) as a sync would.
async fn stage_line(
    p: &Pipeline,
    run: i64,
    line: billsync::record::UsageRecord,
) -> billsync::ledger::StageCounts {
    let row = p.stage_row(line, false);
    let correct = |row: &billsync::ledger::StageRow, sent: &billsync::ledger::SentState| {
        p.correction(row, sent)
    };
    p.ledger
        .stage(run, &[row], None, Utc::now(), &correct)
        .await
        .unwrap()
}

/// The provider re-states a line that went out as 10.00 GBP as 12.00 EUR. A correction would
/// add "+2.00" to a sum of GBP amounts (and a restatement to 10.00 EUR would send nothing at
/// all): the sink would keep billing a GBP amount for a EUR charge. A person decides.
#[tokio::test]
async fn a_sent_record_restated_in_another_currency_is_unresolved_not_corrected() {
    let dir = tempfile::tempdir().unwrap();
    let p = cost_pipeline(&dir, "amount").await;
    let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
    let first = stage_line(&p, run, instance_line("10.00")).await;
    assert_eq!(first.new, 1);
    for cost in ["12.00", "10.00"] {
        let mut restated = instance_line(cost);
        restated.billing_currency = "EUR".into();
        let c = stage_line(&p, run, restated).await;
        assert_eq!(
            (c.corrections, c.changed_after_send),
            (0, 1),
            "GBP 10.00 re-read as EUR {cost}: {c:?}"
        );
    }
    // In the sent currency, a restatement is corrected as usual.
    let c = stage_line(&p, run, instance_line("11.00")).await;
    assert_eq!((c.corrections, c.changed_after_send), (1, 0), "{c:?}");
}

/// The rule's `property` changed (`amount` → `cost`) between the send and a restatement. The
/// correction would carry the difference under `cost`, a property the metric that summed the
/// original's `amount` does not read: the difference would never be billed. A person decides.
#[tokio::test]
async fn a_sent_record_whose_value_property_changed_is_unresolved_not_corrected() {
    let dir = tempfile::tempdir().unwrap();
    let before = cost_pipeline(&dir, "amount").await;
    let run = before.ledger.start_run("sync", Utc::now()).await.unwrap();
    assert_eq!(
        stage_line(&before, run, instance_line("10.00")).await.new,
        1
    );
    let after = cost_pipeline(&dir, "cost").await;
    let c = stage_line(&after, run, instance_line("12.00")).await;
    assert_eq!((c.corrections, c.changed_after_send), (0, 1), "{c:?}");
}

// ----- re-reads that change what a rule matches on -------------------------------------------

/// A Lago pipeline with no provider whose rules and customers look at fields that carry no
/// money: `charge_description` picks the rule (GPU lines are resold at +50 %), `resource_name`
/// picks who pays (`acme-*` or `globex-*`; any other name has no customer).
async fn naming_pipeline(dir: &tempfile::TempDir) -> Pipeline {
    let text = "version: 1
customers:
  - match: { provider: metalsoft, resource_name: { glob: \"acme-*\" } }
    external_subscription_id: sub_acme
  - match: { provider: metalsoft, resource_name: { glob: \"globex-*\" } }
    external_subscription_id: sub_globex
rules:
  - name: gpu
    match: { provider: metalsoft, charge_description: { glob: \"gpu-*\" } }
    metric: resale_cost
    property: amount
    value: { cost: { markup_percent: 50 } }
  - name: cost
    match: { provider: metalsoft }
    metric: resale_cost
    property: amount
    value: { cost: { markup_percent: 0 } }
";
    Pipeline::new(
        Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
        Vec::new(),
        vec![Box::new(offline_lago())],
        MappingSet::from_sources(&[("naming.yaml".to_string(), text.to_string())]).unwrap(),
    )
}

/// [`instance_line`] at 10.00 GBP, named `name` and described as `description`.
fn named_line(name: &str, description: &str) -> billsync::record::UsageRecord {
    let mut line = instance_line("10.00");
    line.resource_name = Some(name.into());
    line.charge_description = Some(description.into());
    line
}

/// The mapping stored for `line`'s key (the original, not a correction): status,
/// subscription and value, read from the ledger file.
async fn stored_mapping(
    p: &Pipeline,
    line: &billsync::record::UsageRecord,
) -> (Status, Option<String>, Option<Decimal>) {
    let pool = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new().filename(p.ledger.path()),
    )
    .await
    .unwrap();
    let (status, subscription, value): (String, Option<String>, Option<String>) =
        sqlx::query_as("SELECT status, subscription, value FROM records WHERE idem_key = ?1")
            .bind(line.idempotency_key())
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    (
        status.parse().unwrap(),
        subscription,
        value.map(|v| Decimal::from_str(&v).unwrap()),
    )
}

/// The value stored for the record under `key`.
async fn value_of(path: &std::path::Path, key: &str) -> Decimal {
    let pool =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(path))
            .await
            .unwrap();
    let value: String = sqlx::query_scalar("SELECT value FROM records WHERE idem_key = ?1")
        .bind(key)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    Decimal::from_str(&value).unwrap()
}

/// The provider re-states a line's description only (cost, quantity and everything else as
/// before), and the new description is one a GPU rule prices at +50 %. The value the invoice
/// must show changed by 5.00: a correction carries it. Taking the re-read for "unchanged"
/// because no amount changed would keep billing 10.00 for a 15.00 line.
#[tokio::test]
async fn a_sent_record_re_read_with_a_description_another_rule_prices_is_corrected() {
    let dir = tempfile::tempdir().unwrap();
    let p = naming_pipeline(&dir).await;
    let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
    let before = named_line("acme-web", "instance-2416");
    assert_eq!(stage_line(&p, run, before.clone()).await.new, 1);
    assert_eq!(
        stored_mapping(&p, &before).await,
        (
            Status::Pending,
            Some("sub_acme".into()),
            Some(Decimal::from(10))
        )
    );
    // The same content read again is a no-op.
    let again = stage_line(&p, run, before.clone()).await;
    assert_eq!((again.unchanged, again.corrections), (1, 0), "{again:?}");

    let after = named_line("acme-web", "gpu-2416");
    assert_eq!(before.idempotency_key(), after.idempotency_key());
    let c = stage_line(&p, run, after.clone()).await;
    assert_eq!(
        (c.unchanged, c.corrections, c.changed_after_send),
        (0, 1, 0),
        "a re-read that now maps to the GPU rule: {c:?}"
    );
    assert_eq!(
        value_of(p.ledger.path(), &format!("{}.r1", before.idempotency_key())).await,
        Decimal::from(5),
        "the correction: 15.00 - 10.00"
    );
    // The new description read again is a no-op: one correction, not one per run.
    let third = stage_line(&p, run, after).await;
    assert_eq!((third.unchanged, third.corrections), (1, 0), "{third:?}");
}

/// The provider re-states a sent line's resource name only, and the new name belongs to
/// another customer. The original went to `sub_acme`; a correction cannot move it (it would
/// add to the wrong subscription), so a person must decide. Taking the re-read for
/// "unchanged" leaves the usage on acme's invoice with nobody told.
#[tokio::test]
async fn a_sent_record_re_read_with_a_name_another_customer_pays_for_is_left_to_a_person() {
    let dir = tempfile::tempdir().unwrap();
    let p = naming_pipeline(&dir).await;
    let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
    let before = named_line("acme-web", "instance-2416");
    assert_eq!(stage_line(&p, run, before.clone()).await.new, 1);
    let after = named_line("globex-web", "instance-2416");
    let c = stage_line(&p, run, after).await;
    assert_eq!(
        (c.unchanged, c.corrections, c.changed_after_send),
        (0, 0, 1),
        "a re-read that now bills sub_globex: {c:?}"
    );
    assert_eq!(p.ledger.status().await.unwrap().open_changes, 1);
    // The original keeps what was sent.
    assert_eq!(
        stored_mapping(&p, &before).await,
        (
            Status::Pending,
            Some("sub_acme".into()),
            Some(Decimal::from(10))
        )
    );
}

/// A line held because its resource name has no customer is re-read under a name that has
/// one: it is restaged in place and goes out. Taking the re-read for "unchanged" would hold
/// billable usage as `unmapped` until someone replays it by hand.
#[tokio::test]
async fn a_held_record_re_read_with_a_name_that_now_maps_is_restaged_for_sending() {
    let dir = tempfile::tempdir().unwrap();
    let p = naming_pipeline(&dir).await;
    let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
    let before = named_line("web-1", "instance-2416");
    assert_eq!(stage_line(&p, run, before.clone()).await.new, 1);
    assert_eq!(
        stored_mapping(&p, &before).await,
        (Status::Unmapped, None, None)
    );
    let after = named_line("acme-web-1", "instance-2416");
    let c = stage_line(&p, run, after.clone()).await;
    assert_eq!((c.unchanged, c.restaged), (0, 1), "{c:?}");
    assert_eq!(
        stored_mapping(&p, &after).await,
        (
            Status::Pending,
            Some("sub_acme".into()),
            Some(Decimal::from(10))
        )
    );
}

// ----- ledgers from before match hashes ------------------------------------------------------

/// `line` under another resource, so that it is a record of its own.
fn named_line_of(resource: &str, name: &str, description: &str) -> billsync::record::UsageRecord {
    let mut line = named_line(name, description);
    line.resource_id = resource.into();
    line.natural_key = vec![("instance".into(), resource.into())];
    line
}

/// The `match_hash` column of the record under `line`'s key (`None`: NULL).
async fn stored_match_hash(
    path: &std::path::Path,
    line: &billsync::record::UsageRecord,
) -> Option<String> {
    let pool =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(path))
            .await
            .unwrap();
    let hash = sqlx::query_scalar("SELECT match_hash FROM records WHERE idem_key = ?1")
        .bind(line.idempotency_key())
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    hash
}

/// Copy the ledger at `staged` into a new ledger at `path` of schema 6, the last before
/// `match_hash`: runs, records (every column but the match hash), bodies and changes, as a
/// billsync of that schema wrote them (the content hash, bodies and changes are written as
/// they were then).
async fn as_schema_6(staged: &std::path::Path, dir: &tempfile::TempDir) -> std::path::PathBuf {
    use sqlx::Connection;
    let path = dir.path().join("ledger.db");
    let migrations = dir.path().join("migrations-0001-0006");
    std::fs::create_dir(&migrations).unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let version: u32 = name[..4].parse().unwrap();
        if version <= 6 {
            std::fs::copy(entry.path(), migrations.join(&name)).unwrap();
        }
    }
    let mut conn = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true),
    )
    .await
    .unwrap();
    sqlx::migrate::Migrator::new(migrations.as_path())
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    sqlx::query("ATTACH DATABASE ?1 AS staged")
        .bind(staged.to_str().unwrap())
        .execute(&mut conn)
        .await
        .unwrap();
    for table in ["runs", "records", "record_bodies", "record_changes"] {
        let columns: String =
            sqlx::query_scalar("SELECT group_concat(name, ', ') FROM pragma_table_info(?1)")
                .bind(table)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert!(!columns.contains("match_hash"), "{table}: {columns}");
        // The table and column names are the schema's own.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO main.{table} ({columns}) SELECT {columns} FROM staged.{table}"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    conn.close().await.unwrap();
    path
}

/// Records staged before match hashes existed carry no match hash. After the upgrade, their
/// first re-read is compared with the content the ledger holds for them: unchanged, it stays a
/// no-op (one correction for every record of the look-back would bill them all again, or fill
/// `changes to resolve`); with a description or name changed meanwhile, it is a change like
/// any other, corrected or restaged. The hash is stored on the way, so later re-reads compare
/// it directly.
#[tokio::test]
async fn records_staged_before_match_hashes_are_compared_with_what_the_ledger_holds() {
    // Staged, as a billsync of schema 6 would have:
    let unchanged = named_line_of("1", "acme-web", "instance-1");
    let described = named_line_of("2", "acme-db", "instance-2");
    let held = named_line_of("3", "web-3", "instance-3");
    // restated after it was queued: 10.00 → 12.00 and described as a GPU (a correction of +8.00)
    let restated = named_line_of("4", "acme-gpu", "instance-4");
    let mut restated_now = named_line_of("4", "acme-gpu", "gpu-4");
    restated_now.billed_cost = Decimal::from(12);
    // its body pruned by `vacuum`
    let pruned = named_line_of("5", "acme-old", "instance-5");
    // restated like the fourth, then described as before
    let redescribed = named_line_of("6", "acme-gpu-2", "instance-6");
    let mut redescribed_then = named_line_of("6", "acme-gpu-2", "gpu-6");
    redescribed_then.billed_cost = Decimal::from(12);

    let staged_dir = tempfile::tempdir().unwrap();
    let before = naming_pipeline(&staged_dir).await;
    let run = before.ledger.start_run("sync", Utc::now()).await.unwrap();
    for line in [
        &unchanged,
        &described,
        &held,
        &restated,
        &pruned,
        &redescribed,
    ] {
        assert_eq!(stage_line(&before, run, line.clone()).await.new, 1);
    }
    for line in [&restated_now, &redescribed_then] {
        let c = stage_line(&before, run, line.clone()).await;
        assert_eq!(c.corrections, 1, "{c:?}");
    }
    before.ledger.close().await;
    let dir = tempfile::tempdir().unwrap();
    let path = as_schema_6(&staged_dir.path().join("ledger.db"), &dir).await;
    {
        let pool = sqlx::SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new().filename(&path),
        )
        .await
        .unwrap();
        let id: i64 = sqlx::query_scalar("SELECT id FROM records WHERE idem_key = ?1")
            .bind(pruned.idempotency_key())
            .fetch_one(&pool)
            .await
            .unwrap();
        sqlx::query("UPDATE record_bodies SET record = X'', payload = NULL WHERE id = ?1")
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }

    // The upgrade: the column is there, empty for every record staged before it.
    let p = naming_pipeline(&dir).await;
    for line in [
        &unchanged,
        &described,
        &held,
        &restated,
        &pruned,
        &redescribed,
    ] {
        assert_eq!(stored_match_hash(&path, line).await, None);
    }
    let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
    let mut described_now = described.clone();
    described_now.charge_description = Some("gpu-2".into());
    let mut held_now = held.clone();
    held_now.resource_name = Some("acme-web-3".into());
    let mut pruned_now = pruned.clone();
    pruned_now.resource_name = Some("globex-old".into());
    let mut redescribed_now = redescribed_then.clone();
    redescribed_now.charge_description = Some("instance-6".into());
    let reread = [
        unchanged.clone(),
        described_now.clone(),
        held_now.clone(),
        restated_now.clone(),
        pruned_now.clone(),
        redescribed_now.clone(),
    ];
    let rows: Vec<_> = reread
        .iter()
        .map(|line| p.stage_row(line.clone(), false))
        .collect();

    // What a dry run sees, without writing anything.
    let known = p.ledger.known(&rows).await.unwrap();
    let holds: Vec<bool> = rows.iter().map(|r| known[&r.key].holds(r)).collect();
    assert_eq!(holds, [true, false, false, true, true, false]);
    assert_eq!(
        stored_match_hash(&path, &unchanged).await,
        None,
        "a dry run writes nothing"
    );

    let correct = |row: &billsync::ledger::StageRow, sent: &billsync::ledger::SentState| {
        p.correction(row, sent)
    };
    let c = p
        .ledger
        .stage(run, &rows, None, Utc::now(), &correct)
        .await
        .unwrap();
    assert_eq!(
        (
            c.new,
            c.unchanged,
            c.corrections,
            c.restaged,
            c.changed_after_send
        ),
        (0, 3, 2, 1, 0),
        "unchanged, restated before the upgrade (compared with its latest change, not with \
         its body) and pruned: no-ops; described and described back: corrections; held: \
         restaged. {c:?}"
    );
    // 10.00 went out for the second; as a GPU it bills 15.00.
    assert_eq!(
        value_of(&path, &format!("{}.r1", described.idempotency_key())).await,
        Decimal::from(5)
    );
    // 10.00 and +8.00 went out for the sixth; no longer a GPU it bills 12.00.
    assert_eq!(
        value_of(&path, &format!("{}.r2", redescribed.idempotency_key())).await,
        Decimal::from(-6)
    );
    assert_eq!(
        stored_mapping(&p, &held_now).await,
        (
            Status::Pending,
            Some("sub_acme".into()),
            Some(Decimal::from(10))
        )
    );
    // Every record has its match hash now, the one of its latest content.
    for line in &reread {
        assert_eq!(
            stored_match_hash(&path, line).await,
            Some(line.match_hash().to_string()),
            "{}",
            line.idempotency_key()
        );
    }
    // The same re-read again: nothing to do.
    let c = p
        .ledger
        .stage(run, &rows, None, Utc::now(), &correct)
        .await
        .unwrap();
    assert_eq!((c.unchanged, c.corrections, c.restaged), (6, 0, 0), "{c:?}");
}

// ----- a refused original with corrections ---------------------------------------------------

/// Key, status and value of every row of the ledger at `path`, in id order.
async fn ledger_rows(path: &std::path::Path) -> Vec<(String, String, Option<String>)> {
    let pool =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(path))
            .await
            .unwrap();
    let rows = sqlx::query_as("SELECT idem_key, status, value FROM records ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

fn value(row: &(String, String, Option<String>)) -> Decimal {
    Decimal::from_str(row.2.as_deref().unwrap()).unwrap()
}

/// What the sink is billed for the line, or will be: the values of its sent and pending rows.
fn billed(rows: &[(String, String, Option<String>)]) -> Decimal {
    rows.iter()
        .filter(|(_, status, _)| status == "sent" || status == "pending")
        .map(value)
        .sum()
}

/// A line is staged at 10.00 and waits (the sink is down); the provider restates it at 12.00,
/// so its correction `.r1` (+2.00) is staged beside it (a queued payload is never rewritten).
/// Then the sink refuses the original for good, and `.r1` is delivered, still waiting, or
/// refused too. The provider restates the line once more, at 15.00.
///
/// The refused original must not be rewritten in place with its whole new content: `.r1`, if
/// it went or goes out, would be billed on top of it (15.00 + 2.00), and if refused, `replay`
/// would re-derive it against the original's new value (12.00 − 15.00 = −3.00). Its value is
/// what its corrections were measured against: the change goes out as a further correction
/// (measured, as always, against the original plus the corrections that went or go out), and
/// the refused original is queued again as it was. The line is billed 15.00 in every case, and
/// still is when the sink refuses the original once more and `replay` sends it again from its
/// frozen body at 10.00 (a refused `.r1` then re-derived to nothing).
#[tokio::test]
async fn a_refused_original_with_corrections_restated_again_is_corrected_not_rewritten() {
    use billsync::sinks::Outcome;
    for r1 in [
        Some(Outcome::Delivered),
        None,
        Some(Outcome::Rejected("refused".into())),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = cost_pipeline(&dir, "amount").await;
        let path = p.ledger.path().to_path_buf();
        let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
        assert_eq!(stage_line(&p, run, instance_line("10.00")).await.new, 1);
        let c = stage_line(&p, run, instance_line("12.00")).await;
        assert_eq!(c.corrections, 1, "{c:?}");
        // Ids 1 (the original) and 2 (`.r1`).
        let mut answers = vec![(1, Outcome::Rejected("refused for good".into()))];
        answers.extend(r1.clone().map(|o| (2, o)));
        p.ledger.ack(run, &answers, Utc::now()).await.unwrap();

        let c = stage_line(&p, run, instance_line("15.00")).await;
        let rows = ledger_rows(&path).await;
        assert_eq!(billed(&rows), Decimal::from(15), ".r1 {r1:?}: {rows:?}");
        assert_eq!(
            (c.restaged, c.corrections, c.restaged_pending.clone()),
            (1, 1, vec![1]),
            ".r1 {r1:?}: {c:?}"
        );
        assert_eq!(
            (rows[0].1.as_str(), value(&rows[0])),
            ("pending", Decimal::from(10)),
            "the original goes out again as it was: {rows:?}"
        );
        // Against what goes out (the original's 10.00 and `.r1` unless refused).
        let r2 = if matches!(r1, Some(Outcome::Rejected(_))) {
            5
        } else {
            3
        };
        assert_eq!(value(&rows[2]), Decimal::from(r2), "{rows:?}");
        // The same content again changes nothing.
        let c = stage_line(&p, run, instance_line("15.00")).await;
        assert_eq!((c.unchanged, c.restaged, c.corrections), (1, 0, 0), "{c:?}");

        // The sink refuses the original again; a replay sends it from its body (10.00), and
        // re-derives a refused `.r1` from the latest content and what goes out.
        p.ledger
            .ack(
                run,
                &[(1, Outcome::Rejected("refused again".into()))],
                Utc::now(),
            )
            .await
            .unwrap();
        p.replay(&ReplayOptions {
            filter: RecordFilter::status(Status::Rejected),
            dry_run: false,
            reason: "test".into(),
            now: None,
        })
        .await
        .unwrap();
        let rows = ledger_rows(&path).await;
        assert_eq!(
            billed(&rows),
            Decimal::from(15),
            "after replay, .r1 {r1:?}: {rows:?}"
        );
    }
}

/// As above (10.00 queued, restated 12.00: `.r1` +2.00 staged), but after the sink refused the
/// original and took `.r1`, a replay with mapping files that no longer map the line held it as
/// `unmapped` (it keeps its body at 10.00; no payload). The provider restates the line at 15.00.
/// The held original is not restaged with its whole new content (15.00 on top of `.r1`'s
/// 2.00, billed 17.00): there is nothing of it to send, and what its change adds cannot be
/// measured against a value it no longer has, so the change waits for a person, and the line
/// stays billed 2.00. Once the mapping maps it again, `replay` sends the original from its
/// body: 10.00 + 2.00, what went out before the change, which the person then resolves.
#[tokio::test]
async fn an_unmapped_original_with_a_delivered_correction_restated_is_left_to_a_person() {
    use billsync::sinks::Outcome;
    let dir = tempfile::tempdir().unwrap();
    let p = cost_pipeline(&dir, "amount").await;
    let path = p.ledger.path().to_path_buf();
    let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
    assert_eq!(stage_line(&p, run, instance_line("10.00")).await.new, 1);
    assert_eq!(
        stage_line(&p, run, instance_line("12.00"))
            .await
            .corrections,
        1
    );
    p.ledger
        .ack(
            run,
            &[
                (1, Outcome::Rejected("refused for good".into())),
                (2, Outcome::Delivered),
            ],
            Utc::now(),
        )
        .await
        .unwrap();
    let replay = |status| ReplayOptions {
        filter: RecordFilter::status(status),
        dry_run: false,
        reason: "test".into(),
        now: None,
    };
    unmapping_pipeline(&dir)
        .await
        .replay(&replay(Status::Rejected))
        .await
        .unwrap();
    assert_eq!(ledger_rows(&path).await[0].1, "unmapped");

    let c = stage_line(&p, run, instance_line("15.00")).await;
    let rows = ledger_rows(&path).await;
    assert_eq!(billed(&rows), Decimal::from(2), "{rows:?}");
    assert_eq!(
        (c.restaged, c.corrections, c.changed_after_send),
        (0, 0, 1),
        "{c:?}"
    );
    assert_eq!(rows[0].1, "unmapped", "{rows:?}");
    let open = p.ledger.open_changes(None).await.unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].record, 1);

    p.replay(&replay(Status::Unmapped)).await.unwrap();
    let rows = ledger_rows(&path).await;
    assert_eq!(billed(&rows), Decimal::from(12), "{rows:?}");
}

/// A source pushing provisional lines sent one at 10.00 (not final yet), restated at 12.00
/// (`.r1` +2.00, delivered); the sink refused the original, and a replay after the source
/// stopped pushing provisional lines held it as `provisional` (its body at 10.00, its payload
/// kept). The provider then closes the line at 15.00. The original goes out as it was, now
/// that its content is final, and the change as a further correction: 10.00 + 2.00 + 3.00,
/// not 15.00 on top of `.r1`.
#[tokio::test]
async fn a_provisional_original_with_a_delivered_correction_goes_out_as_it_was_once_final() {
    use billsync::sinks::Outcome;
    let dir = tempfile::tempdir().unwrap();
    let p = cost_pipeline(&dir, "amount").await;
    let path = p.ledger.path().to_path_buf();
    let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
    let stage = async |cost: &str, is_final: bool| {
        let mut line = instance_line(cost);
        line.is_final = is_final;
        let row = p.stage_row(line, true);
        let correct = |row: &billsync::ledger::StageRow, sent: &billsync::ledger::SentState| {
            p.correction(row, sent)
        };
        p.ledger
            .stage(run, &[row], None, Utc::now(), &correct)
            .await
            .unwrap()
    };
    assert_eq!(stage("10.00", false).await.new, 1);
    assert_eq!(stage("12.00", false).await.corrections, 1);
    p.ledger
        .ack(
            run,
            &[
                (1, Outcome::Rejected("refused for good".into())),
                (2, Outcome::Delivered),
            ],
            Utc::now(),
        )
        .await
        .unwrap();
    p.replay(&ReplayOptions {
        filter: RecordFilter::status(Status::Rejected),
        dry_run: false,
        reason: "test".into(),
        now: None,
    })
    .await
    .unwrap();
    assert_eq!(ledger_rows(&path).await[0].1, "provisional");

    let c = stage("15.00", true).await;
    let rows = ledger_rows(&path).await;
    assert_eq!(billed(&rows), Decimal::from(15), "{rows:?}");
    assert_eq!((c.restaged, c.corrections), (1, 1), "{c:?}");
    assert_eq!(
        (rows[0].1.as_str(), value(&rows[0])),
        ("pending", Decimal::from(10)),
        "{rows:?}"
    );
}

// ----- amounts beyond a decimal's range ----------------------------------------------------

/// A Lago pipeline (nothing is pushed) billing MetalSoft lines at cost + 10 % under `amount`.
async fn cost_plus_ten(path: &std::path::Path) -> Pipeline {
    Pipeline::new(
        Ledger::open(path).await.unwrap(),
        Vec::new(),
        vec![Box::new(offline_lago())],
        MappingSet::from_sources(&[(
            "cost.yaml".to_string(),
            "version: 1
customers:
  - match: { provider: metalsoft }
    external_subscription_id: sub_acme
rules:
  - name: cost
    match: { provider: metalsoft }
    metric: resale_cost
    property: amount
    value: { cost: { markup_percent: 10 } }
"
            .to_string(),
        )])
        .unwrap(),
    )
}

/// Stage `lines` (one page) into `p`'s ledger, corrections decided by `p`.
async fn stage_lines(
    p: &Pipeline,
    lines: Vec<billsync::record::UsageRecord>,
) -> billsync::ledger::StageCounts {
    let rows: Vec<_> = lines.into_iter().map(|l| p.stage_row(l, false)).collect();
    let correct = |row: &billsync::ledger::StageRow, sent: &billsync::ledger::SentState| {
        p.correction(row, sent)
    };
    let run = p.ledger.start_run("test", at(2026, 11, 1)).await.unwrap();
    p.ledger
        .stage(run, &rows, None, at(2026, 11, 1), &correct)
        .await
        .unwrap()
}

/// Another MetalSoft line than [`instance_line`] (another instance).
fn other_line(cost: &str) -> billsync::record::UsageRecord {
    let mut line = instance_line(cost);
    line.resource_id = "2417".into();
    line.natural_key = vec![("instance".into(), "2417".into())];
    line
}

/// Providers accept amounts up to a decimal's limit (about 7.9 × 10^28). A line sent (queued)
/// at 5 × 10^28 and restated as the equal credit differs by 1.1 × 10^29 once marked up, beyond
/// that limit: the difference cannot be computed, let alone sent. The change waits for a
/// person, with a reason naming the record, and the other line of the same page is corrected
/// as usual; nothing panics (a panic here would stop every run, and billing for every
/// customer, for as long as the provider reports the line).
#[tokio::test]
async fn a_restatement_beyond_a_decimals_range_waits_for_a_person_and_the_page_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let p = cost_plus_ten(&dir.path().join("ledger.db")).await;
    let huge = instance_line("50000000000000000000000000000");
    let key = p.stage_row(huge.clone(), false).key;
    let first = stage_lines(&p, vec![huge.clone(), other_line("10")]).await;
    assert_eq!(first.new, 2, "{first:?}");

    let mut credit = huge;
    credit.billed_cost = -credit.billed_cost;
    let restated = stage_lines(&p, vec![credit, other_line("12")]).await;
    assert_eq!(
        (restated.corrections, restated.changed_after_send),
        (1, 1),
        "{restated:?}"
    );
    let changes = p.ledger.open_changes(None).await.unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    let reason = changes[0].reason.clone().unwrap_or_default();
    assert_eq!(changes[0].key, key);
    assert!(reason.contains(&key), "{reason}");
    assert!(reason.contains("beyond the range of a decimal"), "{reason}");
    let pending = p
        .ledger
        .records_matching(&RecordFilter::status(Status::Pending), 0, 10)
        .await
        .unwrap();
    let correction: Vec<_> = pending
        .iter()
        .filter(|r| r.correction_of.is_some())
        .collect();
    assert_eq!(correction.len(), 1);
    assert_eq!(correction[0].record.billed_cost, Decimal::TWO, "12 − 10");
}

/// What was sent for a line adds up beyond a decimal's range once a correction of it is
/// refused: sent (queued) at 5.5 × 10^28, corrected by −7.7 × 10^28 and +7.7 × 10^28, and the
/// sink then refuses the first correction, which no longer counts as sent: the original and
/// the second correction add up to 1.32 × 10^29. The next change of the line cannot be measured
/// against that: it waits for a person, with a reason naming the record, `ledger changes`
/// lists it, and the other line of the page is staged as usual. A replay of the refused
/// correction (re-derived against what went out without it) holds it as `unmapped` with the
/// same reason.
#[tokio::test]
async fn what_was_sent_adding_up_beyond_a_decimals_range_leaves_the_change_to_a_person() {
    use billsync::sinks::Outcome;

    let dir = tempfile::tempdir().unwrap();
    let p = cost_plus_ten(&dir.path().join("ledger.db")).await;
    let line = |cost: &str| instance_line(cost);
    let key = p.stage_row(line("1"), false).key;
    stage_lines(&p, vec![line("50000000000000000000000000000")]).await;
    let down = stage_lines(&p, vec![line("-20000000000000000000000000000")]).await;
    let up = stage_lines(&p, vec![line("50000000000000000000000000000")]).await;
    assert_eq!(
        (down.corrections, up.corrections),
        (1, 1),
        "{down:?} {up:?}"
    );
    let r1 = p
        .ledger
        .records_matching(&RecordFilter::status(Status::Pending), 0, 10)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.key == format!("{key}.r1"))
        .unwrap();
    let run = p.ledger.start_run("test", at(2026, 11, 1)).await.unwrap();
    p.ledger
        .ack(
            run,
            &[(r1.id, Outcome::Rejected("refused".into()))],
            at(2026, 11, 1),
        )
        .await
        .unwrap();

    let replay = |dry_run| ReplayOptions {
        filter: RecordFilter::status(Status::Rejected),
        dry_run,
        reason: "fixed".into(),
        now: Some(at(2026, 11, 2)),
    };
    let plan = p.replay(&replay(true)).await.unwrap();
    assert!(
        plan.preview[0].contains("→ unmapped") && plan.preview[0].contains("beyond the range"),
        "{:?}",
        plan.preview
    );
    p.replay(&replay(false)).await.unwrap();
    let held = p
        .ledger
        .records_matching(&RecordFilter::status(Status::Unmapped), 0, 10)
        .await
        .unwrap();
    assert_eq!(
        held.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        [format!("{key}.r1")]
    );

    let next = stage_lines(&p, vec![line("1"), other_line("10")]).await;
    assert_eq!((next.new, next.changed_after_send), (1, 1), "{next:?}");
    let changes = p.ledger.open_changes(None).await.unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    let reason = changes[0].reason.clone().unwrap_or_default();
    assert!(reason.contains(&key), "{reason}");
    assert!(reason.contains("beyond the range of a decimal"), "{reason}");
    assert_eq!(
        changes[0].sent_total.as_deref(),
        Some("beyond the range of a decimal")
    );
}
