//! `period: month` pricing end to end: records arrive hourly over a month (Jelastic) or as a
//! provisional month restated later (SAKURA Cloud), each record is sent with its per-record
//! price as it arrives, and when the month closes billsync sends ONE adjustment per
//! subscription, metric and month that brings the sink's month total to the month's price —
//! under a key derived from the month alone, so a re-run never sends it twice, and a change
//! after the close yields a further adjustment `<key>.r<n>` with the exact difference.

#[path = "common/serving.rs"]
mod serving;
use serving::Serving;

use std::str::FromStr;
use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::ledger::{Ledger, RecordFilter, Status};
use billsync::mapping::{MappingSet, PeriodSpec};
use billsync::providers::jelastic::{JelasticConfig, JelasticProvider};
use billsync::providers::sakura::{Month, SakuraConfig, SakuraProvider};
use billsync::providers::Provider;
use billsync::simulators::jelastic::{JelasticDataset, JelasticSim, SimCharge, SimEnv, SimNode};
use billsync::simulators::lago::{LagoSim, LagoSimConfig, LagoSimHandle, StoredEvent};
use billsync::simulators::sakura::{SakuraDataset, SakuraSim};
use billsync::sinks::lago::{LagoConfig, LagoSink};
use billsync::sync::{Pipeline, RunSummary, SyncOptions};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

const APPID: &str = "3288620ac46236af4537c843a0b726ba";

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
}

fn retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

fn october() -> (DateTime<Utc>, DateTime<Utc>) {
    (at(2026, 10, 1, 0, 0), at(2026, 11, 1, 0, 0))
}

/// One environment with two charges running every hour of October 2026: 744 hourly buckets
/// of each, 1,488 records. Hourly costs with few digits keep every per-record price exact at
/// the rule's 6 places, so the month's figures below are exact arithmetic.
fn october_dataset() -> JelasticDataset {
    let (start, end) = october();
    let charge = |kind: &str, rt: &str, cost: &str| SimCharge {
        kind: kind.into(),
        resource_type: rt.into(),
        hourly_cost: dec(cost),
        start,
        end,
        extras: Default::default(),
    };
    JelasticDataset {
        envs: vec![SimEnv {
            appid: APPID.into(),
            domain: "env-shop".into(),
            host_group: "user_host_group".into(),
            host_group_display: "Users".into(),
            nodes: vec![SimNode {
                nodeid: 1639,
                charges: vec![
                    charge("cloudlet", "NODE", "0.0125"),
                    charge("ip", "OPTION", "0.005"),
                ],
            }],
        }],
        paid_before: None,
    }
}

/// The month's provider cost: 744 × (0.0125 + 0.005) = 13.02 EUR.
fn october_cost() -> Decimal {
    dec("744") * (dec("0.0125") + dec("0.005"))
}

fn jelastic_mapping(cost: &str) -> MappingSet {
    jelastic_mapping_as(cost, "amount")
}

/// [`jelastic_mapping`] sending the value under event property `property`.
fn jelastic_mapping_as(cost: &str, property: &str) -> MappingSet {
    let text = format!(
        "version: 1
customers:
  - match: {{ provider: jelastic, sub_account_id: {APPID} }}
    external_subscription_id: sub_shop
    external_customer_id: shop
rules:
  - name: paas
    match: {{ provider: jelastic, billing_currency: EUR }}
    metric: paas_cost
    property: {property}
    value:
      cost: {cost}
    round: {{ scale: 6 }}
"
    );
    MappingSet::from_sources(&[("period.yaml".to_string(), text)]).expect("the mapping loads")
}

struct JelasticWorld {
    jelastic: billsync::simulators::jelastic::JelasticSimHandle,
    lago: LagoSimHandle,
    dir: tempfile::TempDir,
    mappings: MappingSet,
}

impl JelasticWorld {
    async fn start(cost: &str) -> JelasticWorld {
        JelasticWorld {
            jelastic: JelasticSim::start(october_dataset(), "sess").await.unwrap(),
            lago: LagoSim::start(LagoSimConfig {
                api_key: "lago-key".into(),
                ..Default::default()
            })
            .await
            .unwrap(),
            dir: tempfile::tempdir().unwrap(),
            mappings: jelastic_mapping(cost),
        }
    }

    async fn pipeline(&self) -> Pipeline {
        self.pipeline_with(self.mappings.clone()).await
    }

    async fn pipeline_with(&self, mappings: MappingSet) -> Pipeline {
        let mut cfg = JelasticConfig::new(
            self.jelastic.url.clone(),
            Secret::new("sess"),
            "EUR",
            october().0,
        );
        cfg.max_buckets_per_request = 168;
        cfg.retry = retry();
        let providers: Vec<Box<dyn Provider>> =
            vec![Box::new(JelasticProvider::new("paas".into(), cfg).unwrap())];
        Pipeline::new(
            Ledger::open(&self.dir.path().join("ledger.db"))
                .await
                .unwrap(),
            providers,
            vec![Box::new(lago_sink(&self.lago))],
            mappings,
        )
    }

    async fn sync(&self, now: DateTime<Utc>) -> RunSummary {
        let summary = self
            .pipeline()
            .await
            .sync(&SyncOptions {
                now: Some(now),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(summary.sink_errors, Vec::<String>::new());
        assert_eq!(summary.rejected, 0, "{summary:?}");
        summary
    }

    /// A sync at `now` that stages (the month's records, its adjustment once due) and pushes
    /// nothing: what the sink then refuses or takes is up to the test.
    async fn stage_without_push(&self, now: DateTime<Utc>) -> RunSummary {
        self.pipeline()
            .await
            .sync(&SyncOptions {
                now: Some(now),
                skip_push: true,
                ..Default::default()
            })
            .await
            .unwrap()
    }
}

fn lago_sink(lago: &LagoSimHandle) -> LagoSink {
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
    .unwrap()
}

fn amount(e: &StoredEvent) -> Decimal {
    Decimal::from_str(e.properties["amount"].as_str().expect("amount is a string")).unwrap()
}

/// What Lago holds for `[from, to)`: every stored event (a duplicate would count twice).
fn lago_total(lago: &LagoSimHandle, from: DateTime<Utc>, to: DateTime<Utc>) -> Decimal {
    lago.events()
        .iter()
        .filter(|e| e.timestamp >= from && e.timestamp < to)
        .map(amount)
        .sum()
}

fn adjustments(lago: &LagoSimHandle) -> Vec<StoredEvent> {
    lago.events()
        .into_iter()
        .filter(|e| e.transaction_id.starts_with("period."))
        .collect()
}

#[tokio::test]
async fn a_month_under_its_minimum_gets_exactly_one_adjustment_up_to_the_minimum() {
    let w = JelasticWorld::start(r#"{ markup_percent: 10, minimum: "50", period: month }"#).await;
    let (from, to) = october();
    // Mid-month: the records so far are sent with their per-record price, nothing else.
    let mid = w.sync(at(2026, 10, 15, 12, 0)).await;
    assert!(mid.sent > 500, "{mid:?}");
    assert_eq!(mid.period_adjustments, 0);
    assert!(adjustments(&w.lago).is_empty());

    // Just after the month: the last buckets are not settled yet (1 h settle delay), so the
    // records do not reach the month's end and the close delay has not passed: no adjustment.
    let early = w.sync(at(2026, 11, 1, 0, 30)).await;
    assert_eq!(early.period_adjustments, 0, "{early:?}");
    assert!(adjustments(&w.lago).is_empty());

    // Every bucket is in and final: the month closes, one adjustment tops it up to 50.
    let close = w.sync(at(2026, 11, 1, 2, 0)).await;
    assert_eq!(close.period_adjustments, 1, "{close:?}");
    let adj = adjustments(&w.lago);
    assert_eq!(adj.len(), 1);
    let records_total = october_cost() * dec("1.1");
    assert_eq!(records_total, dec("14.322"));
    assert_eq!(amount(&adj[0]), dec("50") - records_total);
    assert_eq!(
        lago_total(&w.lago, from, to),
        dec("50"),
        "Lago's October is the minimum"
    );
    assert_eq!(adj[0].external_subscription_id, "sub_shop");
    assert_eq!(adj[0].code, "paas_cost");
    assert!(adj[0].timestamp >= from && adj[0].timestamp < to);
    assert_eq!(
        w.lago.events().len(),
        2 * 744 + 1,
        "every hourly record once, plus the adjustment"
    );

    // Re-runs: nothing new, the adjustment is never sent twice.
    for now in [at(2026, 11, 1, 3, 0), at(2026, 11, 10, 0, 0)] {
        let again = w.sync(now).await;
        assert_eq!((again.sent, again.period_adjustments), (0, 0), "{again:?}");
    }
    assert_eq!(adjustments(&w.lago).len(), 1);
    assert_eq!(lago_total(&w.lago, from, to), dec("50"));
    let status = w.pipeline().await.ledger.period_status().await.unwrap();
    assert_eq!((status.open, status.settled, status.changed), (0, 1, 0));
}

#[tokio::test]
async fn a_month_above_its_minimum_gets_no_adjustment() {
    let w =
        JelasticWorld::start(r#"{ markup_percent: 10, minimum: "14.32", period: month }"#).await;
    let (from, to) = october();
    w.sync(at(2026, 10, 20, 0, 0)).await;
    let close = w.sync(at(2026, 11, 5, 0, 0)).await;
    assert_eq!(close.period_adjustments, 0, "{close:?}");
    assert!(adjustments(&w.lago).is_empty());
    assert_eq!(lago_total(&w.lago, from, to), dec("14.322"));
    let status = w.pipeline().await.ledger.period_status().await.unwrap();
    assert_eq!(
        status.settled, 1,
        "the month is settled, with nothing to add"
    );
}

#[tokio::test]
async fn monthly_tiers_price_the_month_sum_not_each_record() {
    // 20 % on the first 10 EUR of the month, 10 % above. Per record (a few cents each) the
    // first tier would apply to every record; per month only the first 10 EUR get 20 %.
    let w = JelasticWorld::start(
        r#"{ period: month, tiers: [{ up_to: "10", markup_percent: 20 }, { markup_percent: 10 }] }"#,
    )
    .await;
    let (from, to) = october();
    for day in [8, 16, 24] {
        let s = w.sync(at(2026, 10, day, 6, 0)).await;
        assert_eq!(s.period_adjustments, 0);
    }
    // During the month the records carry the lowest rate: never more than the month's price.
    let during = lago_total(&w.lago, from, to);
    // The run that closes the month stops after staging (as a crash before the push would):
    // the adjustment waits in the ledger and the next run sends it, once.
    let staged_only = w.stage_without_push(at(2026, 11, 2, 0, 0)).await;
    assert_eq!(staged_only.period_adjustments, 1, "{staged_only:?}");
    assert!(adjustments(&w.lago).is_empty());
    let close = w.sync(at(2026, 11, 2, 1, 0)).await;
    assert_eq!(close.period_adjustments, 0, "already staged: {close:?}");
    assert!(
        close.sent > 1,
        "the last week's records and the adjustment: {close:?}"
    );
    let sum = october_cost();
    let tiered = sum + dec("10") * dec("0.20") + (sum - dec("10")) * dec("0.10");
    assert_eq!(tiered, dec("15.322"));
    assert_eq!(
        lago_total(&w.lago, from, to),
        tiered,
        "the tiered price of the month's sum"
    );
    assert!(during < tiered);
    let adj = adjustments(&w.lago);
    assert_eq!(adj.len(), 1);
    assert_eq!(amount(&adj[0]), dec("1.000"), "10 EUR × (20 % − 10 %)");
    // The same records priced per record would have been marked up 20 % each.
    assert_ne!(lago_total(&w.lago, from, to), sum * dec("1.2"));
    let again = w.sync(at(2026, 11, 3, 0, 0)).await;
    assert_eq!((again.sent, again.period_adjustments), (0, 0));
}

/// SAKURA Cloud bills JST months; the mapping says so with `period_utc_offset`. The month is
/// pushed while provisional, closes by the close delay, then the provider restates a line.
#[tokio::test]
async fn a_correction_after_the_close_yields_a_further_adjustment_with_the_exact_difference() {
    let november = Month::new(2026, 11).unwrap();
    let sakura = SakuraSim::start(
        SakuraDataset::generate(3, november, 1, 3).unwrap(),
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
    let provider_total = sakura.dataset().month_total(november);
    let minimum = provider_total + dec("500");
    let text = format!(
        "version: 1
customers:
  - match: {{ provider: sakura }}
    external_subscription_id: sub_sakura
rules:
  - name: sakura-jpy
    match: {{ provider: sakura, billing_currency: JPY }}
    metric: sakura_cost
    property: amount
    value:
      cost: {{ minimum: \"{minimum}\", period: month, period_utc_offset: \"+09:00\" }}
"
    );
    let mappings = MappingSet::from_sources(&[("sakura.yaml".to_string(), text)]).unwrap();
    let pipeline = async || {
        let mut cfg = SakuraConfig::new(
            sakura.endpoint.clone(),
            Secret::new("tok"),
            Secret::new("sec"),
            november,
        );
        cfg.push_provisional = true;
        cfg.final_lag = chrono::Duration::days(7);
        cfg.retry = retry();
        let mut p = Pipeline::new(
            Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
            vec![Box::new(SakuraProvider::new("sakura".into(), cfg).unwrap())],
            vec![Box::new(lago_sink(&lago))],
            mappings.clone(),
        );
        p.period_close_delay = chrono::Duration::days(1);
        p
    };
    let sync = async |now| {
        pipeline()
            .await
            .sync(&SyncOptions {
                now: Some(now),
                ..Default::default()
            })
            .await
            .unwrap()
    };
    let (from, to) = (november.start_utc(), november.end_utc());

    // 20 November: provisional, pushed as is.
    let first = sync(at(2026, 11, 20, 3, 0)).await;
    assert_eq!((first.sent, first.period_adjustments), (3, 0), "{first:?}");
    assert_eq!(lago_total(&lago, from, to), provider_total);

    // 2 December (UTC): a day past the JST month's end, so it closes, although SAKURA still
    // calls it provisional (final 7 days after): one adjustment of +500 up to the minimum.
    let closed = sync(at(2026, 12, 2, 0, 0)).await;
    assert_eq!(closed.period_adjustments, 1, "{closed:?}");
    let adj = adjustments(&lago);
    assert_eq!(adj.len(), 1);
    assert_eq!(amount(&adj[0]), dec("500"));
    assert_eq!(lago_total(&lago, from, to), minimum);

    // The provider restates a line by +1,100 JPY: the month is now above its minimum.
    let bill = sakura.dataset().bills_of(november)[0].clone();
    let line = bill.lines[0].clone();
    sakura
        .set_detail_amount(
            bill.bill_id,
            line.index,
            line.price_excl_tax + dec("1000"),
            line.tax + dec("100"),
        )
        .unwrap();
    let restated = sync(at(2026, 12, 3, 0, 0)).await;
    assert_eq!(
        restated.corrections, 1,
        "the record's own correction: {restated:?}"
    );
    assert_eq!(restated.period_adjustments, 1, "one further adjustment");
    assert_eq!(restated.sent, 2);
    let adj = adjustments(&lago);
    assert_eq!(adj.len(), 2);
    let further = adj
        .iter()
        .find(|e| e.transaction_id == format!("{}.r1", adj[0].transaction_id))
        .expect("the further adjustment is <key>.r1");
    assert_eq!(
        amount(further),
        dec("-500"),
        "the month is 1,100 above its old total, so the +500 top-up is taken back exactly"
    );
    assert_eq!(lago_total(&lago, from, to), provider_total + dec("1100"));
    assert_eq!(
        lago_total(&lago, from, to),
        sakura.dataset().month_total(november)
    );

    // Re-run, then the month becomes final with the same amounts: nothing new is sent.
    let again = sync(at(2026, 12, 4, 0, 0)).await;
    assert_eq!((again.sent, again.period_adjustments), (0, 0), "{again:?}");
    sakura.finalize_month(november);
    let fin = sync(at(2026, 12, 10, 0, 0)).await;
    assert_eq!((fin.sent, fin.period_adjustments), (0, 0), "{fin:?}");
    assert_eq!(adjustments(&lago).len(), 2);
    assert_eq!(lago_total(&lago, from, to), provider_total + dec("1100"));
}

// ----- without a sync: explain and `mappings test` show the month's part -------------------

const MONTHLY: &str = r#"version: 1
customers:
  - match: { provider: metalsoft }
    external_subscription_id: sub_acme
    pricing: { minimum: "50", period: month }
rules:
  - name: drives
    match: { resource_type: drive }
    metric: storage_cost
    property: amount
    value:
      cost:
        period: month
        tiers:
          - { up_to: "1000", markup_percent: 20 }
          - { markup_percent: 10 }
"#;

fn monthly_set() -> MappingSet {
    MappingSet::from_sources(&[("m/monthly.yaml".to_string(), MONTHLY.to_string())]).unwrap()
}

fn drive(cost: &str) -> billsync::record::UsageRecord {
    billsync::record::UsageRecord {
        provider: "metalsoft".into(),
        source: "metalsoft".into(),
        billing_account_id: "ms".into(),
        sub_account_id: "1".into(),
        resource_id: "77".into(),
        resource_name: None,
        resource_type: "drive".into(),
        service_name: "metalsoft".into(),
        sku_id: None,
        charge_description: None,
        charge_period_start: at(2026, 10, 31, 23, 0),
        charge_period_end: at(2026, 11, 1, 0, 0),
        consumed_quantity: dec("3600"),
        consumed_unit: "seconds".into(),
        billed_cost: dec(cost),
        billing_currency: "EUR".into(),
        scope: "1".into(),
        natural_key: vec![],
        is_final: true,
        attributes: Default::default(),
        raw: Default::default(),
    }
}

#[test]
fn explain_shows_the_record_part_and_the_month_it_settles_in() {
    let set = monthly_set();
    let ex = set.explain(&drive("12.00"));
    let text = ex.to_string();
    // The record carries the lowest tier rate and no minimum.
    assert!(
        text.contains("this record at the lowest rate 10%"),
        "{text}"
    );
    assert!(text.contains("50 EUR per month"), "{text}");
    assert!(
        text.contains(
            "period: month 2026-10 [2026-10-01T00:00:00+00:00 .. 2026-11-01T00:00:00+00:00)"
        ),
        "{text}"
    );
    assert!(text.contains("= 13.20"), "{text}");
    let share = ex.period.expect("a monthly share");
    assert_eq!(share.base, dec("12.00"));
    assert_eq!(share.spec.minimum, Some(dec("50")));
    assert_eq!(share.spec.lowest_percent, dec("10"));
    let (outcome, _) = set.apply_with_period(&drive("12.00"));
    match outcome {
        billsync::mapping::MapOutcome::Mapped(ev) => assert_eq!(ev.value, dec("13.20")),
        other => panic!("{other:?}"),
    }
    // `validate` says what the rule does per month.
    let summary = set.summary().to_string();
    assert!(
        summary.contains("tiers and minimum per calendar month UTC"),
        "{summary}"
    );
}

#[test]
fn mapping_cases_settle_a_month_of_records() {
    let set = monthly_set();
    let cases = r#"defaults: { provider: metalsoft, sub_account_id: "1", billing_currency: EUR, resource_type: drive }
cases:
  - name: a quiet month is raised to the minimum
    record: { charge_period_start: "2026-10-05T00:00:00Z" }
    records:
      - { billed_cost: "10" }
      - { billed_cost: "5.50" }
    expect:
      subscription: sub_acme
      value: "17.05"
      records_total: "17.05"
      period_total: "50"
      adjustment: "32.95"
  - name: a busy month is tiered on its sum
    record: { charge_period_start: "2026-10-05T00:00:00Z" }
    records:
      - { billed_cost: "700" }
      - { billed_cost: "700" }
    expect:
      value: "1540"
      period_total: "1640"
      adjustment: "100"
  - name: a wrong adjustment is reported
    records:
      - { billed_cost: "10" }
    expect:
      adjustment: "1"
"#;
    let report = billsync::mapping::cases::run_cases(&set, &[("cases.yaml".into(), cases.into())]);
    let text = report.to_string();
    assert_eq!(report.failed(), 1, "{text}");
    assert!(
        report.results[0].passed() && report.results[1].passed(),
        "{text}"
    );
    assert!(
        text.contains("period 2026-10: records carry 17.05 + adjustment 32.95 = month total 50"),
        "{text}"
    );
    // 1,400 × 10 % = 140 on the records; the month: 1,000 × 20 % + 400 × 10 % = 240.
    assert!(
        text.contains("records carry 1540.00 + adjustment 100.00"),
        "{text}"
    );
    assert!(text.contains("✗ adjustment"), "{text}");
    assert!(
        text.contains("39.00"),
        "the actual adjustment is shown: {text}"
    );
}

/// A rejected adjustment (say the subscription did not exist yet in Lago) waits as `rejected`;
/// `billsync replay` sends it again as it was frozen, once.
#[tokio::test]
async fn a_rejected_adjustment_is_sent_again_by_replay() {
    use billsync::sinks::Outcome;
    use billsync::sync::ReplayOptions;

    let w = JelasticWorld::start(r#"{ markup_percent: 10, minimum: "50", period: month }"#).await;
    let (from, to) = october();
    let staged = w.stage_without_push(at(2026, 11, 3, 0, 0)).await;
    assert_eq!(staged.period_adjustments, 1);
    let p = w.pipeline().await;
    let mut filter = RecordFilter::status(Status::Pending);
    filter.provider = Some("period".into());
    let adj = p.ledger.records_matching(&filter, 0, 10).await.unwrap();
    assert_eq!(adj.len(), 1, "one pending adjustment");
    let run = p
        .ledger
        .start_run("test", at(2026, 11, 3, 0, 0))
        .await
        .unwrap();
    p.ledger
        .ack(
            run,
            &[(
                adj[0].id,
                Outcome::Rejected("subscription not found".into()),
            )],
            at(2026, 11, 3, 0, 0),
        )
        .await
        .unwrap();
    // The records go out; the adjustment stays held.
    let s = w.sync(at(2026, 11, 3, 1, 0)).await;
    assert_eq!(s.period_adjustments, 0, "{s:?}");
    assert!(adjustments(&w.lago).is_empty());
    assert_eq!(lago_total(&w.lago, from, to), dec("14.322"));

    let replay = |dry_run| ReplayOptions {
        filter: RecordFilter::status(Status::Rejected),
        dry_run,
        reason: "subscription created in Lago".into(),
        now: Some(at(2026, 11, 3, 2, 0)),
    };
    let dry = w.pipeline().await.replay(&replay(true)).await.unwrap();
    assert!(
        dry.preview[0].contains("period adjustment"),
        "{:?}",
        dry.preview
    );
    let done = w.pipeline().await.replay(&replay(false)).await.unwrap();
    assert_eq!(done.sent, 1, "{done:?}");
    assert_eq!(adjustments(&w.lago).len(), 1);
    assert_eq!(lago_total(&w.lago, from, to), dec("50"));
    let again = w.pipeline().await.replay(&replay(false)).await.unwrap();
    assert_eq!(again.sent, 0);
    assert_eq!(adjustments(&w.lago).len(), 1);
}

/// The billing engineer raises the minimum in the middle of the month: the records staged before
/// carry the old rule, the later ones the new; the month is priced by the rule of its latest
/// record, and the adjustment says so.
#[tokio::test]
async fn a_minimum_changed_mid_month_prices_the_whole_month() {
    let w = JelasticWorld::start(r#"{ markup_percent: 10, minimum: "50", period: month }"#).await;
    let (from, to) = october();
    w.sync(at(2026, 10, 15, 0, 0)).await;
    let raised = jelastic_mapping(r#"{ markup_percent: 10, minimum: "60", period: month }"#);
    let s = w
        .pipeline_with(raised.clone())
        .await
        .sync(&SyncOptions {
            now: Some(at(2026, 11, 2, 0, 0)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(s.period_adjustments, 1, "{s:?}");
    assert_eq!(lago_total(&w.lago, from, to), dec("60"));
    let p = w.pipeline_with(raised).await;
    let mut filter = RecordFilter::status(Status::Sent);
    filter.provider = Some("period".into());
    let adj = p.ledger.records_matching(&filter, 0, 10).await.unwrap();
    let steps = adj[0].record.raw.to_value()["steps"].to_string();
    assert!(
        steps.contains("were staged under another period rule"),
        "{steps}"
    );
    assert!(steps.contains("raised to 60"), "{steps}");
}

/// The first `n` pending provider records (not adjustments) of the ledger, by key.
async fn pending_provider_keys(w: &JelasticWorld, n: i64) -> Vec<String> {
    let p = w.pipeline().await;
    let mut filter = RecordFilter::status(Status::Pending);
    filter.provider = Some("jelastic".into());
    p.ledger
        .records_matching(&filter, 0, n)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect()
}

async fn sync_allowing_rejections(w: &JelasticWorld, now: DateTime<Utc>) -> RunSummary {
    w.pipeline()
        .await
        .sync(&SyncOptions {
            now: Some(now),
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Lago refuses a few hourly records during the month (say a transient validation problem),
/// the month closes without them (topped up to the minimum from what Lago holds), then the
/// records are replayed and accepted. The month must still cost its price: replaying them into
/// a settled month re-settles it, so Lago's October stays at the minimum, not above it.
#[tokio::test]
async fn records_replayed_into_a_settled_month_re_settle_it() {
    use billsync::sync::ReplayOptions;

    let w = JelasticWorld::start(r#"{ markup_percent: 10, minimum: "50", period: month }"#).await;
    let (from, to) = october();
    w.pipeline()
        .await
        .sync(&SyncOptions {
            now: Some(at(2026, 10, 15, 0, 0)),
            skip_push: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let refused = pending_provider_keys(&w, 3).await;
    assert_eq!(refused.len(), 3);
    for k in &refused {
        w.lago.reject_transaction(k.clone());
    }
    let mid = sync_allowing_rejections(&w, at(2026, 10, 15, 1, 0)).await;
    assert_eq!(mid.rejected, 3, "{mid:?}");
    // The month closes with the three records held as rejected.
    let close = sync_allowing_rejections(&w, at(2026, 11, 3, 0, 0)).await;
    assert_eq!(close.period_adjustments, 1, "{close:?}");
    assert_eq!(lago_total(&w.lago, from, to), dec("50"));

    // The problem is fixed in Lago; the records are replayed and sent.
    w.lago.clear_faults();
    let done = w
        .pipeline()
        .await
        .replay(&ReplayOptions {
            filter: RecordFilter::status(Status::Rejected),
            dry_run: false,
            reason: "fixed in Lago".into(),
            now: Some(at(2026, 11, 3, 1, 0)),
        })
        .await
        .unwrap();
    assert!(done.sent >= 3, "{done:?}");
    for k in &refused {
        assert_eq!(w.lago.count(k), 1);
    }
    // Whatever run settles again, once it has: October costs its minimum.
    w.sync(at(2026, 11, 3, 2, 0)).await;
    assert_eq!(
        lago_total(&w.lago, from, to),
        dec("50"),
        "a month under its minimum costs the minimum, with or without the replayed records"
    );
    let again = w.sync(at(2026, 11, 3, 3, 0)).await;
    assert_eq!((again.sent, again.period_adjustments), (0, 0), "{again:?}");
}

/// The month is settled while its last records still wait to be sent (staged, then the push
/// was cut short); Lago then refuses one of them. The adjustment was computed as if Lago held
/// it: the next run re-settles the month, so Lago's October is the minimum, not less.
#[tokio::test]
async fn a_record_rejected_after_its_month_was_settled_re_settles_it() {
    let w = JelasticWorld::start(r#"{ markup_percent: 10, minimum: "50", period: month }"#).await;
    let (from, to) = october();
    w.sync(at(2026, 10, 15, 0, 0)).await;
    let staged = w.stage_without_push(at(2026, 11, 3, 0, 0)).await;
    assert_eq!(staged.period_adjustments, 1, "{staged:?}");
    let refused = pending_provider_keys(&w, 1).await;
    assert_eq!(refused.len(), 1);
    w.lago.reject_transaction(refused[0].clone());
    let pushed = sync_allowing_rejections(&w, at(2026, 11, 3, 1, 0)).await;
    assert_eq!(pushed.rejected, 1, "{pushed:?}");
    let next = sync_allowing_rejections(&w, at(2026, 11, 3, 2, 0)).await;
    assert_eq!(next.rejected, 0, "{next:?}");
    assert_eq!(
        lago_total(&w.lago, from, to),
        dec("50"),
        "the month is settled on what Lago holds"
    );
    let again = sync_allowing_rejections(&w, at(2026, 11, 3, 3, 0)).await;
    assert_eq!((again.sent, again.period_adjustments), (0, 0), "{again:?}");
}

/// A record queued for Lago (pending: Lago was down) is re-read unchanged after the billing
/// engineer changed the mapping so that it is no longer billed. Its payload is frozen (Lago may
/// hold it already), so it still goes out as queued; the month must then be priced with it,
/// as it is in Lago: here a month under its minimum costs exactly the minimum.
#[tokio::test]
async fn a_queued_record_whose_mapping_changed_still_counts_in_its_month() {
    let november = Month::new(2026, 11).unwrap();
    let sakura = SakuraSim::start(
        SakuraDataset::generate(3, november, 1, 3).unwrap(),
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
    let minimum = sakura.dataset().month_total(november) + dec("500");
    let dropped = sakura.dataset().bills_of(november)[0].lines[0]
        .contract_id
        .clone();
    let mapping = |ignore_one: bool| {
        let ignore = if ignore_one {
            format!(
                "  - name: dropped
    match: {{ provider: sakura, resource_id: \"{dropped}\" }}
    ignore: true
"
            )
        } else {
            String::new()
        };
        let text = format!(
            "version: 1
customers:
  - match: {{ provider: sakura }}
    external_subscription_id: sub_sakura
rules:
{ignore}  - name: sakura-jpy
    match: {{ provider: sakura, billing_currency: JPY }}
    metric: sakura_cost
    property: amount
    value:
      cost: {{ minimum: \"{minimum}\", period: month, period_utc_offset: \"+09:00\" }}
"
        );
        MappingSet::from_sources(&[("sakura.yaml".to_string(), text)]).unwrap()
    };
    let sync = async |now, ignore_one: bool| {
        let mut cfg = SakuraConfig::new(
            sakura.endpoint.clone(),
            Secret::new("tok"),
            Secret::new("sec"),
            november,
        );
        cfg.push_provisional = true;
        cfg.final_lag = chrono::Duration::days(7);
        cfg.retry = retry();
        let mut p = Pipeline::new(
            Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
            vec![Box::new(SakuraProvider::new("sakura".into(), cfg).unwrap())],
            vec![Box::new(lago_sink(&lago))],
            mapping(ignore_one),
        );
        p.period_close_delay = chrono::Duration::days(1);
        p.sync(&SyncOptions {
            now: Some(now),
            ..Default::default()
        })
        .await
        .unwrap()
    };
    let (from, to) = (november.start_utc(), november.end_utc());

    // Lago is down: the month's records are queued (pending).
    lago.fail_next(1000, 503);
    let first = sync(at(2026, 11, 20, 3, 0), false).await;
    assert_eq!(first.sent, 0, "{first:?}");
    // The mapping now leaves one line unbilled; the month closes while Lago is still down.
    let closed = sync(at(2026, 12, 2, 0, 0), true).await;
    assert_eq!(closed.sent, 0, "{closed:?}");
    // Lago is back: what was queued goes out, the queued line with it (frozen payload).
    lago.clear_faults();
    sync(at(2026, 12, 2, 1, 0), true).await;
    let dropped_events = lago
        .events()
        .into_iter()
        .filter(|e| e.transaction_id.starts_with("sakura"))
        .count();
    assert_eq!(dropped_events, 3, "the three queued lines went out");
    sync(at(2026, 12, 2, 2, 0), true).await;
    assert_eq!(
        lago_total(&lago, from, to),
        minimum,
        "the month holds exactly its minimum"
    );
}

/// One subscription's month is fed by two Jelastic sources (two hoster accounts of the same
/// customer). On the run just after the month, source A pulls to the month's end while the
/// pull of source B fails: B's last three weeks are not in the ledger. The month must not be
/// settled on A's complete data alone (the minimum's adjustment would be computed on a month
/// missing B's part, sent, and then taken back by a correction on a later run, after Lago may
/// have invoiced it). It settles, once, on the run where B has pulled past the month's end too.
#[tokio::test]
async fn a_month_fed_by_a_source_whose_pull_failed_waits_for_it() {
    let (from, to) = october();
    let jelastic_a = JelasticSim::start(october_dataset(), "sess").await.unwrap();
    let jelastic_b = JelasticSim::start(october_dataset(), "sess").await.unwrap();
    let lago = LagoSim::start(LagoSimConfig {
        api_key: "lago-key".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sync = async |now, b_fails: bool| {
        let source = |name: &str, url: &str, session: &str| {
            let mut cfg = JelasticConfig::new(url, Secret::new(session), "EUR", october().0);
            cfg.max_buckets_per_request = 168;
            cfg.retry = retry();
            Box::new(JelasticProvider::new(name.into(), cfg).unwrap()) as Box<dyn Provider>
        };
        let b_session = if b_fails { "expired" } else { "sess" };
        let p = Pipeline::new(
            Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
            vec![
                source("paas_a", &jelastic_a.url, "sess"),
                source("paas_b", &jelastic_b.url, b_session),
            ],
            vec![Box::new(lago_sink(&lago))],
            jelastic_mapping(r#"{ markup_percent: 10, minimum: "50", period: month }"#),
        );
        p.sync(&SyncOptions {
            now: Some(now),
            ..Default::default()
        })
        .await
        .unwrap()
    };
    let mid = sync(at(2026, 10, 10, 0, 0), false).await;
    assert_eq!(mid.period_adjustments, 0, "{mid:?}");

    // A reaches the month's end, every record it has is final; B's pull fails.
    let partial = sync(at(2026, 11, 1, 2, 0), true).await;
    assert!(
        partial.sources["paas_b"].error.is_some(),
        "B's pull fails: {partial:?}"
    );
    assert!(partial.sources["paas_a"].error.is_none(), "{partial:?}");
    assert_eq!(
        partial.period_adjustments, 0,
        "a month is not settled while a source feeding it has not pulled past its end: {partial:?}"
    );
    assert!(adjustments(&lago).is_empty(), "{:?}", adjustments(&lago));

    // B is back: the month settles once, on both sources' complete data.
    let close = sync(at(2026, 11, 1, 3, 0), false).await;
    assert_eq!(close.period_adjustments, 1, "{close:?}");
    let records_total = dec("2") * october_cost() * dec("1.1");
    let adj = adjustments(&lago);
    assert_eq!(adj.len(), 1, "one adjustment, no correction of it: {adj:?}");
    assert_eq!(amount(&adj[0]), dec("50") - records_total);
    assert_eq!(lago_total(&lago, from, to), dec("50"));
}

/// The same two sources, both pulling fine, but B only reads buckets a day old (a longer
/// `settle_delay`): just after the month, A's records reach its end and B's stop a day before.
/// A month closes early only once the records of every source feeding it reach its end;
/// one source's complete month says nothing about the other's.
#[tokio::test]
async fn a_month_closes_early_only_when_every_source_feeding_it_reaches_its_end() {
    let (from, to) = october();
    let jelastic_a = JelasticSim::start(october_dataset(), "sess").await.unwrap();
    let jelastic_b = JelasticSim::start(october_dataset(), "sess").await.unwrap();
    let lago = LagoSim::start(LagoSimConfig {
        api_key: "lago-key".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sync = async |now| {
        let source = |name: &str, url: &str, settle_delay: chrono::Duration| {
            let mut cfg = JelasticConfig::new(url, Secret::new("sess"), "EUR", october().0);
            cfg.max_buckets_per_request = 168;
            cfg.retry = retry();
            cfg.settle_delay = settle_delay;
            Box::new(JelasticProvider::new(name.into(), cfg).unwrap()) as Box<dyn Provider>
        };
        let p = Pipeline::new(
            Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
            vec![
                source("paas_a", &jelastic_a.url, chrono::Duration::hours(1)),
                source("paas_b", &jelastic_b.url, chrono::Duration::days(1)),
            ],
            vec![Box::new(lago_sink(&lago))],
            jelastic_mapping(r#"{ markup_percent: 10, minimum: "50", period: month }"#),
        );
        p.sync(&SyncOptions {
            now: Some(now),
            ..Default::default()
        })
        .await
        .unwrap()
    };
    let early = sync(at(2026, 11, 1, 2, 0)).await;
    assert_eq!(early.period_adjustments, 0, "B is a day behind: {early:?}");
    assert!(adjustments(&lago).is_empty(), "{:?}", adjustments(&lago));
    let close = sync(at(2026, 11, 2, 2, 0)).await;
    assert_eq!(close.period_adjustments, 1, "{close:?}");
    let adj = adjustments(&lago);
    assert_eq!(adj.len(), 1, "{adj:?}");
    assert_eq!(
        amount(&adj[0]),
        dec("50") - dec("2") * october_cost() * dec("1.1")
    );
    assert_eq!(lago_total(&lago, from, to), dec("50"));
}

/// `period_utc_offset` changed in the middle of a month: the records before the change belong
/// to the UTC month, those after to the +09:00 month, and the two months overlap. Settling both
/// would bring each up to the minimum: the customer charged the minimum twice for one month.
/// Neither is settled; both are reported as problems to resolve by hand.
#[tokio::test]
async fn months_that_overlap_after_a_change_of_utc_offset_are_not_both_charged_the_minimum() {
    let w = JelasticWorld::start(r#"{ minimum: "50", period: month }"#).await;
    let (from, to) = october();
    let mid = w.sync(at(2026, 10, 15, 12, 0)).await;
    assert!(mid.sent > 500, "{mid:?}");
    let shifted =
        jelastic_mapping(r#"{ minimum: "50", period: month, period_utc_offset: "+09:00" }"#);
    let close = w
        .pipeline_with(shifted)
        .await
        .sync(&SyncOptions {
            now: Some(at(2026, 11, 5, 0, 0)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(close.period_adjustments, 0, "{close:?}");
    assert!(
        adjustments(&w.lago).is_empty(),
        "{:?}",
        adjustments(&w.lago)
    );
    assert!(
        lago_total(&w.lago, from, to) <= dec("50"),
        "never more than the month's minimum: {}",
        lago_total(&w.lago, from, to)
    );
    let status = w.pipeline().await.ledger.period_status().await.unwrap();
    assert_eq!(status.problems.len(), 2, "{status:?}");
    assert!(
        status
            .problems
            .iter()
            .all(|(_, note)| note.contains("overlaps")),
        "{:?}",
        status.problems
    );
    // Such months never clear in billsync (they are settled by hand in the invoicing system):
    // they are listed and counted, but do not fail every later hourly run with exit 4.
    assert_eq!(
        (close.period_problems, close.undelivered, close.outcome),
        (2, 0, billsync::sync::RunOutcome::Ok),
        "{close:?}"
    );
}

/// One final MetalSoft line of October for instance `id`, 10.00 GBP, described as
/// `description`.
fn october_line(id: &str, description: &str) -> billsync::record::UsageRecord {
    let start = at(2026, 10, 5, 0, 0);
    billsync::record::UsageRecord {
        provider: "metalsoft".into(),
        source: "metalsoft".into(),
        billing_account_id: "ms".into(),
        sub_account_id: "1".into(),
        resource_id: id.into(),
        resource_name: Some("web".into()),
        resource_type: "instance".into(),
        service_name: "Instances".into(),
        sku_id: Some("M.8.8".into()),
        charge_description: Some(description.into()),
        charge_period_start: start,
        charge_period_end: start + chrono::Duration::hours(1),
        consumed_quantity: Decimal::from(3600),
        consumed_unit: "seconds".into(),
        billed_cost: dec("10.00"),
        billing_currency: "GBP".into(),
        scope: "1".into(),
        natural_key: vec![("instance".into(), id.into())],
        is_final: true,
        attributes: Default::default(),
        raw: Default::default(),
    }
}

/// Monthly tiers for the customer (+10 % up to 10.00 a month, +20 % above); before them, GPU
/// lines (by description) +50 %, any other line `cost_markup` %.
fn re_describable_rules(cost_markup: u32) -> MappingSet {
    MappingSet::from_sources(&[(
        "monthly.yaml".to_string(),
        format!(
            "version: 1
customers:
  - match: {{ provider: metalsoft }}
    external_subscription_id: sub_acme
    pricing:
      tiers: [{{ up_to: \"10\", markup_percent: 10 }}, {{ markup_percent: 20 }}]
      period: month
rules:
  - name: gpu
    match: {{ provider: metalsoft, charge_description: {{ glob: \"gpu-*\" }} }}
    metric: resale_cost
    property: amount
    value: {{ cost: {{ markup_percent: 50 }} }}
  - name: cost
    match: {{ provider: metalsoft }}
    metric: resale_cost
    property: amount
    value: {{ cost: {{ markup_percent: {cost_markup} }} }}
"
        ),
    )])
    .unwrap()
}

/// One sync (nothing pushed) of the lines `served` holds into the ledger at `path`.
async fn sync_lines(
    path: &std::path::Path,
    served: &std::sync::Arc<std::sync::Mutex<Vec<billsync::record::UsageRecord>>>,
    mappings: &MappingSet,
    now: DateTime<Utc>,
) -> RunSummary {
    Pipeline::new(
        Ledger::open(path).await.unwrap(),
        vec![Box::new(Serving(served.clone()))],
        vec![Box::new(
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
            .unwrap(),
        )],
        mappings.clone(),
    )
    .sync(&SyncOptions {
        now: Some(now),
        skip_push: true,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// The values of the month adjustments staged in the ledger at `path`.
async fn adjustments_in(path: &std::path::Path) -> Vec<(String, String)> {
    let pool =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(path))
            .await
            .unwrap();
    let adjustments =
        sqlx::query_as("SELECT idem_key, value FROM records WHERE provider = 'period'")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    adjustments
}

/// The month's share of a record follows its mapping. A line re-described so that another
/// rule prices it (+50 % before the customer's monthly tiers instead of +0 %) is corrected per
/// record, and the month is tiered on its new value: 15.00 at the tiers' input, not the 10.00
/// the old rule gave. Tiering the month on the share computed under the old rule would leave
/// its 5.00 above the first tier at the first tier's rate (0.50 short).
#[tokio::test]
async fn a_line_re_described_under_another_rule_is_tiered_in_its_month_at_its_new_value() {
    let mappings = re_describable_rules(0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let served = std::sync::Arc::new(std::sync::Mutex::new(vec![october_line(
        "2416",
        "instance-2416",
    )]));
    // October is open: the line goes out at 10.00 at the lowest tier's +10 %: 11.00.
    let first = sync_lines(&path, &served, &mappings, at(2026, 10, 20, 0, 0)).await;
    assert_eq!(first.new, 1, "{first:?}");
    // Re-described as a GPU: 15.00 at the lowest tier, corrected by +5.50.
    *served.lock().unwrap() = vec![october_line("2416", "gpu-2416")];
    let second = sync_lines(&path, &served, &mappings, at(2026, 10, 21, 0, 0)).await;
    assert_eq!(second.corrections, 1, "{second:?}");
    // October closed: 15.00 tiered is 10.00 × 1.1 + 5.00 × 1.2 = 17.00, of which 16.50 went out.
    sync_lines(&path, &served, &mappings, at(2026, 11, 10, 0, 0)).await;
    let adjustments = adjustments_in(&path).await;
    assert_eq!(adjustments.len(), 1, "{adjustments:?}");
    assert_eq!(
        dec(&adjustments[0].1),
        dec("0.50"),
        "17.00 − 16.50 sent: {adjustments:?}"
    );
}

/// A copy of the ledger at `staged` as a billsync of schema 6 (before match hashes) kept it:
/// the tables of migrations 0001–0006 with every row, and no match hash anywhere.
async fn as_schema_6(staged: &std::path::Path, dir: &tempfile::TempDir) -> std::path::PathBuf {
    use sqlx::Connection;
    let path = dir.path().join("ledger.db");
    let migrations = dir.path().join("migrations-0001-0006");
    std::fs::create_dir(&migrations).unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name[..4].parse::<u32>().unwrap() <= 6 {
            std::fs::copy(entry.path(), migrations.join(&name)).unwrap();
        }
    }
    let mut conn = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .foreign_keys(false),
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
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM main.sqlite_master WHERE type = 'table'
           AND name NOT LIKE 'sqlite%' AND name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(tables.iter().any(|t| t == "period_members"), "{tables:?}");
    for table in tables {
        let columns: String = sqlx::query_scalar(
            "SELECT group_concat(name, ', ') FROM pragma_table_info(?1, 'main')",
        )
        .bind(&table)
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

/// Shares kept before match hashes have none. After the upgrade, the first re-read of each
/// compares it with the content its record holds: a line re-described meanwhile so that
/// another rule prices it gets its share computed again (its month tiered on 15.00, not on the
/// 10.00 of the old rule, which would be 0.50 short and stay so once the new hash is kept); an
/// unchanged line keeps its share, even under a mapping changed since (+20 % instead of
/// +0 %), as it keeps its record's value: only replay reprices what did not change.
#[tokio::test]
async fn shares_kept_before_match_hashes_follow_a_line_re_described_across_the_upgrade() {
    let staged = tempfile::tempdir().unwrap();
    let served = std::sync::Arc::new(std::sync::Mutex::new(vec![
        october_line("2416", "instance-2416"),
        october_line("2417", "instance-2417"),
    ]));
    // Kept by a billsync of schema 6: two lines at 11.00, each a share of 10.00 of October.
    let first = sync_lines(
        &staged.path().join("ledger.db"),
        &served,
        &re_describable_rules(0),
        at(2026, 10, 20, 0, 0),
    )
    .await;
    assert_eq!(first.new, 2, "{first:?}");
    let dir = tempfile::tempdir().unwrap();
    let path = as_schema_6(&staged.path().join("ledger.db"), &dir).await;

    // The upgrade, with the plain rule's markup raised since: the first line unchanged, the
    // second re-described as a GPU (15.00 at the lowest tier: a correction of +5.50).
    let unchanged = october_line("2416", "instance-2416");
    let re_described = october_line("2417", "gpu-2417");
    *served.lock().unwrap() = vec![unchanged.clone(), re_described.clone()];
    let mappings = re_describable_rules(20);
    let second = sync_lines(&path, &served, &mappings, at(2026, 10, 21, 0, 0)).await;
    assert_eq!(
        (second.new, second.unchanged, second.corrections),
        (0, 1, 1),
        "{second:?}"
    );
    let pool =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
    let shares: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT idem_key, base, match_hash FROM period_members ORDER BY idem_key")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    let share_of = |line: &billsync::record::UsageRecord| {
        shares
            .iter()
            .find(|(key, _, _)| *key == line.idempotency_key())
            .map(|(_, base, hash)| (dec(base), hash.clone()))
            .unwrap_or_else(|| panic!("no share of {}: {shares:?}", line.idempotency_key()))
    };
    assert_eq!(
        share_of(&unchanged),
        (dec("10"), Some(unchanged.match_hash().to_string())),
        "the unchanged line keeps its share, now with its hash"
    );
    assert_eq!(
        share_of(&re_described),
        (dec("15"), Some(re_described.match_hash().to_string())),
        "the re-described line's share follows its new rule"
    );

    // October closed: 25.00 tiered is 10.00 × 10 % + 15.00 × 20 % = 4.00, of which the records
    // carry 2.50 (the lowest rate): an adjustment of 1.50.
    let last = sync_lines(&path, &served, &mappings, at(2026, 11, 10, 0, 0)).await;
    assert_eq!((last.unchanged, last.corrections), (2, 0), "{last:?}");
    let adjustments = adjustments_in(&path).await;
    assert_eq!(adjustments.len(), 1, "{adjustments:?}");
    assert_eq!(
        dec(&adjustments[0].1),
        dec("1.50"),
        "29.00 − 27.50 sent: {adjustments:?}"
    );
}

// ----- the share of a queued or sent record follows what goes out ---------------------------

/// A pipeline with [`re_describable_rules`] and a Lago sink nothing is pushed to.
fn re_describable_pipeline(path: &std::path::Path) -> impl std::future::Future<Output = Pipeline> {
    let path = path.to_path_buf();
    async move {
        Pipeline::new(
            Ledger::open(&path).await.unwrap(),
            Vec::new(),
            vec![Box::new(
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
                .unwrap(),
            )],
            re_describable_rules(0),
        )
    }
}

/// `line` mapped by `p`, with its share of its month as a sync registers it.
fn row_and_share(
    p: &Pipeline,
    line: billsync::record::UsageRecord,
) -> (billsync::ledger::StageRow, billsync::ledger::PeriodShareRow) {
    let (row, share) = p.stage_row_with_period(line, false);
    let share = share.expect("a monthly share");
    let group = billsync::sync::period_group(
        row.mapped.sink.as_deref().unwrap(),
        row.mapped.subscription.as_deref().unwrap(),
        row.mapped.metric.as_deref().unwrap(),
        &share,
    );
    let share = billsync::ledger::PeriodShareRow {
        key: row.key.clone(),
        content_hash: row.content_hash.clone(),
        match_hash: row.match_hash,
        group,
        base: share.base,
        spec: serde_json::to_string(&share.spec).unwrap(),
        is_final: row.record.is_final,
        charge_period_start: row.record.charge_period_start,
        charge_period_end: row.record.charge_period_end,
    };
    (row, share)
}

/// The share the ledger at `path` keeps for `key`: (base, content hash), and the record's own
/// content hash.
async fn share_and_record(path: &std::path::Path, key: &str) -> (Decimal, String, String) {
    let pool =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(path))
            .await
            .unwrap();
    let (base, share_hash, record_hash): (String, String, String) = sqlx::query_as(
        "SELECT m.base, m.content_hash, r.content_hash
         FROM period_members m JOIN records r ON r.idem_key = m.idem_key WHERE m.idem_key = ?1",
    )
    .bind(key)
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    (dec(&base), share_hash, record_hash)
}

/// Stage `rows` as a sync does, with the shares registration left to staging.
async fn stage_with_shares(
    p: &Pipeline,
    run: i64,
    row: &billsync::ledger::StageRow,
    shares: &[billsync::ledger::PeriodShareRow],
) -> billsync::ledger::StageCounts {
    let correct = |row: &billsync::ledger::StageRow, sent: &billsync::ledger::SentState| {
        p.correction(row, sent)
    };
    p.ledger
        .stage_pages(
            run,
            &[row],
            shares,
            &[],
            Utc::now(),
            &correct,
            &|_| false,
            None,
        )
        .await
        .unwrap()
}

/// A sent line re-described (another rule: 15.00 at the tiers' input instead of 10.00). Its
/// share registered, the run stops before the staging commits: the share still holds what was
/// sent, with the record's own content, so the month can settle on what the sink holds. The
/// re-read stages the correction, and the share follows it in the same transaction.
#[tokio::test]
async fn a_sent_line_whose_change_did_not_commit_keeps_its_share_until_it_is_corrected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let p = re_describable_pipeline(&path).await;
    let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
    let (row, share) = row_and_share(&p, october_line("2416", "instance-2416"));
    let key = row.key.clone();
    let left = p
        .ledger
        .register_period_shares(&[share], &[])
        .await
        .unwrap();
    assert!(
        left.is_empty(),
        "a new record's share is kept before staging"
    );
    assert_eq!(stage_with_shares(&p, run, &row, &left).await.new, 1);
    let id = p.ledger.existing(&[key.as_str()]).await.unwrap()[&key].id;
    p.ledger
        .ack(
            run,
            &[(id, billsync::sinks::Outcome::Delivered)],
            Utc::now(),
        )
        .await
        .unwrap();
    let sent = share_and_record(&path, &key).await;
    assert_eq!(sent.0, dec("10"));
    assert_eq!(sent.1, sent.2);

    let (re_described, share) = row_and_share(&p, october_line("2416", "gpu-2416"));
    let left = p
        .ledger
        .register_period_shares(&[share], &[])
        .await
        .unwrap();
    assert_eq!(left.len(), 1, "left to staging");
    // No staging: the run stopped here.
    assert_eq!(share_and_record(&path, &key).await, sent);

    // The re-read.
    let left = p
        .ledger
        .register_period_shares(&[left[0].clone()], &[])
        .await
        .unwrap();
    let c = stage_with_shares(&p, run, &re_described, &left).await;
    assert_eq!(c.corrections, 1, "{c:?}");
    let corrected = share_and_record(&path, &key).await;
    assert_eq!(corrected.0, dec("15"));
    assert_eq!(corrected.1, re_described.content_hash);
    assert_eq!(corrected.2, re_described.content_hash);
}

/// A queued line re-described: its share is left to staging (its payload is frozen), and the
/// sink refuses the queued line before the staging runs. Staging then restages it in place,
/// and keeps its new share with it: the month is not left with a share of the old content
/// beside a record of the new one (which would hold the month back for good).
#[tokio::test]
async fn a_queued_line_refused_before_its_change_is_staged_takes_its_new_share() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let p = re_describable_pipeline(&path).await;
    let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
    let (row, share) = row_and_share(&p, october_line("2416", "instance-2416"));
    let key = row.key.clone();
    let left = p
        .ledger
        .register_period_shares(&[share], &[])
        .await
        .unwrap();
    stage_with_shares(&p, run, &row, &left).await;

    let (re_described, share) = row_and_share(&p, october_line("2416", "gpu-2416"));
    let left = p
        .ledger
        .register_period_shares(&[share], &[])
        .await
        .unwrap();
    assert_eq!(left.len(), 1, "a queued record's share is left to staging");
    let id = p.ledger.existing(&[key.as_str()]).await.unwrap()[&key].id;
    p.ledger
        .ack(
            run,
            &[(id, billsync::sinks::Outcome::Rejected("refused".into()))],
            Utc::now(),
        )
        .await
        .unwrap();
    let c = stage_with_shares(&p, run, &re_described, &left).await;
    assert_eq!((c.restaged, c.corrections), (1, 0), "{c:?}");
    let (base, share_hash, record_hash) = share_and_record(&path, &key).await;
    assert_eq!(base, dec("15"));
    assert_eq!(share_hash, re_described.content_hash);
    assert_eq!(record_hash, re_described.content_hash);
}

/// The status and note (`last_error`) of every period adjustment row (original and
/// corrections), by key, in id order.
async fn adjustment_rows(w: &JelasticWorld) -> Vec<(String, String, Option<String>)> {
    let pool = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new().filename(w.dir.path().join("ledger.db")),
    )
    .await
    .unwrap();
    let rows = sqlx::query_as(
        "SELECT idem_key, status, last_error FROM records WHERE provider = 'period' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows
}

/// A replay of the rejected records of one provider whose charge period starts at `start`
/// (one hour's records), or of every rejected record of `provider`.
fn replay_rejected(
    provider: &str,
    start: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> billsync::sync::ReplayOptions {
    billsync::sync::ReplayOptions {
        filter: RecordFilter {
            status: Some(Status::Rejected),
            provider: Some(provider.into()),
            since: start,
            until: start.map(|s| s + chrono::Duration::hours(1)),
            run: None,
            key: None,
        },
        dry_run: false,
        reason: "fixed in Lago".into(),
        now: Some(now),
    }
}

/// A month whose adjustment's correction Lago refused: two records of October (k1, k2) are
/// refused mid-month, the month closes at its minimum (50) without them, Lago then refuses
/// `<adjustment>.r1`, and k1 is replayed: k1 goes out, the month is settled again and `.r1`
/// (minus k1's price) is refused. Lago holds the minimum plus k1. Returns the adjustment's key
/// and k2's charge period start.
async fn a_refused_adjustment_correction(w: &JelasticWorld) -> (String, DateTime<Utc>) {
    let (from, to) = october();
    w.pipeline()
        .await
        .sync(&SyncOptions {
            now: Some(at(2026, 10, 15, 0, 0)),
            skip_push: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let p = w.pipeline().await;
    let mut filter = RecordFilter::status(Status::Pending);
    filter.provider = Some("jelastic".into());
    let pending = p.ledger.records_matching(&filter, 0, 2000).await.unwrap();
    let on = |d: u32| {
        pending
            .iter()
            .find(|r| r.record.charge_period_start == at(2026, 10, d, 5, 0))
            .unwrap()
            .clone()
    };
    let (k1, k2) = (on(2), on(3));
    w.lago.reject_transaction(k1.key.clone());
    w.lago.reject_transaction(k2.key.clone());
    let mid = sync_allowing_rejections(w, at(2026, 10, 15, 1, 0)).await;
    assert_eq!(mid.rejected, 2, "{mid:?}");
    let close = sync_allowing_rejections(w, at(2026, 11, 3, 0, 0)).await;
    assert_eq!(close.period_adjustments, 1, "{close:?}");
    assert_eq!(lago_total(&w.lago, from, to), dec("50"));
    let adj = adjustments(&w.lago)[0].transaction_id.clone();
    w.lago.clear_faults();
    w.lago.reject_transaction(format!("{adj}.r1"));
    let r1 = w
        .pipeline()
        .await
        .replay(&replay_rejected(
            "jelastic",
            Some(k1.record.charge_period_start),
            at(2026, 11, 3, 1, 0),
        ))
        .await
        .unwrap();
    assert_eq!((r1.sent, r1.rejected), (1, 1), "{r1:?}");
    assert_eq!(w.lago.count(&k1.key), 1);
    assert_eq!(w.lago.count(&format!("{adj}.r1")), 0, ".r1 was refused");
    assert!(lago_total(&w.lago, from, to) > dec("50"));
    w.lago.clear_faults();
    (adj, k2.record.charge_period_start)
}

/// The reviewer's scenario. With `.r1` refused, k2 is replayed: the month is settled again
/// against what went out (the refused `.r1` is not part of it), so `.r2` carries both records'
/// prices and Lago is back at 50. A replay of everything rejected then finds `.r1`: sent as it
/// was frozen, it would take k1's price off a second time (Lago at 49.98625, and nothing later
/// would settle the month again). Replay re-derives it instead: `.r1` becomes `ignored`
/// (superseded) and its month is settled again against what went out, which finds nothing
/// missing.
#[tokio::test]
async fn a_replayed_refused_adjustment_correction_is_not_sent_on_top_of_a_later_one() {
    let w = JelasticWorld::start(r#"{ markup_percent: 10, minimum: "50", period: month }"#).await;
    let (from, to) = october();
    let (adj, k2) = a_refused_adjustment_correction(&w).await;
    let r2 = w
        .pipeline()
        .await
        .replay(&replay_rejected(
            "jelastic",
            Some(k2),
            at(2026, 11, 3, 2, 0),
        ))
        .await
        .unwrap();
    assert_eq!((r2.sent, r2.period_adjustments), (2, 1), "{r2:?}");
    assert_eq!(w.lago.count(&format!("{adj}.r2")), 1);
    assert_eq!(lago_total(&w.lago, from, to), dec("50"));

    let mut everything = RecordFilter::status(Status::Rejected);
    everything.provider = None;
    let dry = w
        .pipeline()
        .await
        .replay(&billsync::sync::ReplayOptions {
            filter: everything.clone(),
            dry_run: true,
            reason: "all refused".into(),
            now: Some(at(2026, 11, 3, 3, 0)),
        })
        .await
        .unwrap();
    assert_eq!(dry.preview.len(), 1, "{:?}", dry.preview);
    assert!(
        dry.preview[0].starts_with(&format!("{adj}.r1 rejected → ignored"))
            && dry.preview[0].contains("settled again"),
        "{:?}",
        dry.preview
    );
    let all = w
        .pipeline()
        .await
        .replay(&billsync::sync::ReplayOptions {
            filter: everything,
            dry_run: false,
            reason: "all refused".into(),
            now: Some(at(2026, 11, 3, 3, 0)),
        })
        .await
        .unwrap();
    assert_eq!((all.sent, all.period_adjustments), (0, 0), "{all:?}");
    assert_eq!(w.lago.count(&format!("{adj}.r1")), 0);
    assert_eq!(
        lago_total(&w.lago, from, to),
        dec("50"),
        "October costs its minimum"
    );
    let rows = adjustment_rows(&w).await;
    let statuses: Vec<(&str, &str)> = rows
        .iter()
        .map(|(k, s, _)| (k.as_str(), s.as_str()))
        .collect();
    let (r1, r2) = (format!("{adj}.r1"), format!("{adj}.r2"));
    assert_eq!(
        statuses,
        vec![
            (adj.as_str(), "sent"),
            (r1.as_str(), "ignored"),
            (r2.as_str(), "sent")
        ]
    );
    assert!(
        rows[1]
            .2
            .as_deref()
            .is_some_and(|n| n.contains("superseded")),
        "{rows:?}"
    );
    let after = sync_allowing_rejections(&w, at(2026, 11, 3, 4, 0)).await;
    assert_eq!((after.sent, after.period_adjustments), (0, 0), "{after:?}");
    assert_eq!(lago_total(&w.lago, from, to), dec("50"));
}

/// The same refused `.r1`, but nothing after it carried its amount: replayed, it is not lost.
/// `.r1` is superseded and its month settled again against what went out, which still lacks
/// k1's price: the next correction `.r2` takes it off, and Lago is at 50. Then k2 is replayed
/// into the month, which settles again to 50.
#[tokio::test]
async fn a_replayed_refused_adjustment_correction_still_missing_goes_out_re_derived() {
    let w = JelasticWorld::start(r#"{ markup_percent: 10, minimum: "50", period: month }"#).await;
    let (from, to) = october();
    let (adj, k2) = a_refused_adjustment_correction(&w).await;
    let over = lago_total(&w.lago, from, to) - dec("50");
    let r = w
        .pipeline()
        .await
        .replay(&replay_rejected("period", None, at(2026, 11, 3, 2, 0)))
        .await
        .unwrap();
    assert_eq!((r.sent, r.period_adjustments), (1, 1), "{r:?}");
    let r2: Vec<StoredEvent> = adjustments(&w.lago)
        .into_iter()
        .filter(|e| e.transaction_id == format!("{adj}.r2"))
        .collect();
    assert_eq!(r2.len(), 1);
    assert_eq!(amount(&r2[0]), -over, "what .r1 would have taken off");
    assert_eq!(lago_total(&w.lago, from, to), dec("50"));
    let k = w
        .pipeline()
        .await
        .replay(&replay_rejected(
            "jelastic",
            Some(k2),
            at(2026, 11, 3, 3, 0),
        ))
        .await
        .unwrap();
    assert_eq!((k.sent, k.period_adjustments), (2, 1), "{k:?}");
    assert_eq!(lago_total(&w.lago, from, to), dec("50"));
    let after = sync_allowing_rejections(&w, at(2026, 11, 3, 4, 0)).await;
    assert_eq!((after.sent, after.period_adjustments), (0, 0), "{after:?}");
}

/// A further adjustment `.r1` refused by Lago; the operator replays the refused provider
/// record first (the month is settled again, against what went out: `.r1` left out, so the
/// settlement covers its amount), then everything still refused. `.r1` must not go out on top
/// of that: the month ends at its minimum, and a later sync changes nothing.
#[tokio::test]
async fn a_refused_further_adjustment_replayed_after_its_month_was_settled_again_is_not_billed_twice(
) {
    use billsync::sync::ReplayOptions;

    let w = JelasticWorld::start(r#"{ markup_percent: 10, minimum: "50", period: month }"#).await;
    let (from, to) = october();
    w.sync(at(2026, 10, 15, 0, 0)).await;
    let staged = w.stage_without_push(at(2026, 11, 3, 0, 0)).await;
    assert_eq!(staged.period_adjustments, 1, "{staged:?}");
    let p = w.pipeline().await;
    let mut filter = RecordFilter::status(Status::Pending);
    filter.provider = Some("period".into());
    let adj = p.ledger.records_matching(&filter, 0, 10).await.unwrap();
    assert_eq!(adj.len(), 1);
    let adj_key = adj[0].key.clone();
    let refused = pending_provider_keys(&w, 1).await;
    w.lago.reject_transaction(refused[0].clone());
    w.lago.reject_transaction(format!("{adj_key}.r1"));
    sync_allowing_rejections(&w, at(2026, 11, 3, 1, 0)).await;
    sync_allowing_rejections(&w, at(2026, 11, 3, 2, 0)).await;
    w.lago.clear_faults();
    // The operator replays the refused provider record first.
    let mut jel = RecordFilter::status(Status::Rejected);
    jel.provider = Some("jelastic".into());
    w.pipeline()
        .await
        .replay(&ReplayOptions {
            filter: jel,
            dry_run: false,
            reason: "fixed".into(),
            now: Some(at(2026, 11, 3, 3, 0)),
        })
        .await
        .unwrap();
    // Then everything still refused (the further adjustment).
    w.pipeline()
        .await
        .replay(&ReplayOptions {
            filter: RecordFilter::status(Status::Rejected),
            dry_run: false,
            reason: "fixed".into(),
            now: Some(at(2026, 11, 3, 4, 0)),
        })
        .await
        .unwrap();
    let after = sync_allowing_rejections(&w, at(2026, 11, 3, 5, 0)).await;
    assert_eq!(after.sent, 0, "{after:?}");
    assert_eq!(lago_total(&w.lago, from, to), dec("50"));
}

/// October's adjustment `A` is queued (staged, not pushed yet) when the sink refuses one of
/// the month's records: the month is settled again, and `A`'s change is staged as its
/// correction `A.r1` (a queued payload is never rewritten). Lago then refuses `A` for good but
/// takes `A.r1`, and refuses a second record; the month is settled once more. `A` must not be
/// rewritten with the whole new adjustment (Lago would bill it on top of `A.r1`): the change
/// goes out as `A.r2`, `A` is sent again as it was, and October costs its minimum.
#[tokio::test]
async fn a_refused_adjustment_whose_correction_went_out_is_corrected_when_its_month_changes() {
    use billsync::sinks::Outcome;
    let w = JelasticWorld::start(r#"{ markup_percent: 10, minimum: "50", period: month }"#).await;
    let (from, to) = october();
    let staged = |h| SyncOptions {
        now: Some(at(2026, 11, 3, h, 0)),
        skip_push: true,
        ..Default::default()
    };
    let s = w.pipeline().await.sync(&staged(0)).await.unwrap();
    assert_eq!(s.period_adjustments, 1, "{s:?}");
    let p = w.pipeline().await;
    let pending = |provider: &str| {
        let mut f = RecordFilter::status(Status::Pending);
        f.provider = Some(provider.into());
        f
    };
    let records = p
        .ledger
        .records_matching(&pending("jelastic"), 0, 2)
        .await
        .unwrap();
    let adj = p
        .ledger
        .records_matching(&pending("period"), 0, 10)
        .await
        .unwrap();
    assert_eq!((records.len(), adj.len()), (2, 1));
    let adj = adj[0].key.clone();
    let run = p
        .ledger
        .start_run("test", at(2026, 11, 3, 0, 30))
        .await
        .unwrap();
    p.ledger
        .ack(
            run,
            &[(records[0].id, Outcome::Rejected("refused".into()))],
            at(2026, 11, 3, 0, 30),
        )
        .await
        .unwrap();
    w.pipeline().await.sync(&staged(1)).await.unwrap();
    assert_eq!(
        p.ledger
            .existing(&[format!("{adj}.r1").as_str()])
            .await
            .unwrap()
            .len(),
        1,
        "the queued adjustment's change is its correction"
    );

    w.lago.reject_transaction(adj.clone());
    w.lago.reject_transaction(records[1].key.clone());
    let pushed = sync_allowing_rejections(&w, at(2026, 11, 3, 2, 0)).await;
    assert_eq!(pushed.rejected, 2, "{pushed:?}");
    assert_eq!(w.lago.count(&format!("{adj}.r1")), 1);

    w.lago.clear_faults();
    let resettled = sync_allowing_rejections(&w, at(2026, 11, 3, 3, 0)).await;
    assert_eq!(resettled.rejected, 0, "{resettled:?}");
    assert_eq!(
        lago_total(&w.lago, from, to),
        dec("50"),
        "October costs its minimum: {:?}",
        adjustments(&w.lago)
            .iter()
            .map(|e| (e.transaction_id.clone(), amount(e)))
            .collect::<Vec<_>>()
    );
    assert_eq!(w.lago.count(&format!("{adj}.r2")), 1, "{resettled:?}");
    let again = sync_allowing_rejections(&w, at(2026, 11, 3, 4, 0)).await;
    assert_eq!((again.sent, again.period_adjustments), (0, 0), "{again:?}");
    assert_eq!(lago_total(&w.lago, from, to), dec("50"));
}

/// The month is staged with its adjustment (up to the minimum: 50 − 14.322 = 35.678), then Lago
/// refuses every one of its 1,488 records and takes the adjustment. Nothing of the month is
/// billed any more, so the next run takes the adjustment back: exactly −35.678, as the
/// adjustment went out (under the rule's property `amount`, for its customer, in EUR: a
/// correction under another property would not be added to it, and would wait for a person
/// while Lago kept billing 35.678 for an empty month), and the month is settled at 0. Once the
/// records are replayed and accepted, the month is settled again and Lago's October is 50.
#[tokio::test]
async fn an_adjustment_is_taken_back_exactly_when_every_record_leaves_its_month() {
    use billsync::sync::ReplayOptions;

    let w = JelasticWorld::start(r#"{ markup_percent: 10, minimum: "50", period: month }"#).await;
    let (from, to) = october();
    let staged = w.stage_without_push(at(2026, 11, 3, 0, 0)).await;
    assert_eq!(staged.period_adjustments, 1, "{staged:?}");
    for k in pending_provider_keys(&w, 5000).await {
        w.lago.reject_transaction(k);
    }
    let pushed = sync_allowing_rejections(&w, at(2026, 11, 3, 1, 0)).await;
    assert_eq!(pushed.rejected, 2 * 744, "{pushed:?}");
    let adj = adjustments(&w.lago);
    assert_eq!(adj.len(), 1);
    assert_eq!(amount(&adj[0]), dec("35.678"));
    let adjustment_key = adj[0].transaction_id.clone();

    let next = sync_allowing_rejections(&w, at(2026, 11, 3, 2, 0)).await;
    assert_eq!(
        (next.period_adjustments, next.period_problems),
        (1, 0),
        "{next:?}"
    );
    let adj = adjustments(&w.lago);
    assert_eq!(adj.len(), 2, "the adjustment and its take-back");
    let back = &adj[1];
    assert_eq!(back.transaction_id, format!("{adjustment_key}.r1"));
    assert_eq!(amount(back), dec("-35.678"));
    assert_eq!(
        (
            back.external_subscription_id.as_str(),
            back.code.as_str(),
            back.timestamp
        ),
        (
            adj[0].external_subscription_id.as_str(),
            adj[0].code.as_str(),
            adj[0].timestamp
        ),
        "the take-back lands where the adjustment did"
    );
    assert_eq!(
        lago_total(&w.lago, from, to),
        dec("0"),
        "nothing of October is billed"
    );
    let p = w.pipeline().await;
    assert!(p.ledger.open_changes(None).await.unwrap().is_empty());
    let status = p.ledger.period_status().await.unwrap();
    assert_eq!((status.settled, status.unsettleable), (1, 0), "{status:?}");

    // The records were refused for a reason fixed since: replayed, they bill October again,
    // and the month is settled again up to its minimum.
    w.lago.clear_faults();
    let mut refused = RecordFilter::status(Status::Rejected);
    refused.provider = Some("jelastic".into());
    let replayed = w
        .pipeline()
        .await
        .replay(&ReplayOptions {
            filter: refused,
            dry_run: false,
            reason: "fixed in Lago".into(),
            now: Some(at(2026, 11, 3, 3, 0)),
        })
        .await
        .unwrap();
    assert_eq!(replayed.sent, 2 * 744 + 1, "{replayed:?}");
    sync_allowing_rejections(&w, at(2026, 11, 3, 4, 0)).await;
    assert_eq!(adjustments(&w.lago).len(), 3);
    assert_eq!(lago_total(&w.lago, from, to), dec("50"));
}

/// Months settled (with no change since) and months that cannot be settled.
async fn months_settled(w: &JelasticWorld) -> (i64, i64) {
    let s = w.pipeline().await.ledger.period_status().await.unwrap();
    (s.settled, s.unsettleable)
}

/// A change of a month's adjustment that cannot go out leaves the month unsettled. Lago
/// refuses the month's first record; the month is settled without it (35.678, then +its value
/// once the refusal is known). The rule's property is then renamed (`amount` → `amount_eur`)
/// and the record replayed: it goes out under the new property, and the month, settled again,
/// would send its adjustment's difference under `amount_eur` too, which the metric that summed
/// the adjustment does not read. That change waits for a person, so the sink does not hold the
/// month's settlement: the month is listed as a problem on every run (not recorded as settled
/// at a total nobody billed) until the person resolves the change; then it settles.
#[tokio::test]
async fn a_month_whose_adjustment_change_cannot_go_out_is_not_settled() {
    use billsync::sync::ReplayOptions;

    let cost = r#"{ markup_percent: 10, minimum: "50", period: month }"#;
    let w = JelasticWorld::start(cost).await;
    w.pipeline()
        .await
        .sync(&SyncOptions {
            now: Some(at(2026, 11, 3, 0, 0)),
            skip_push: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // The month's first record by key: the one whose mapping the adjustment goes out with.
    let first = pending_provider_keys(&w, 5000)
        .await
        .into_iter()
        .min()
        .unwrap();
    w.lago.reject_transaction(first.clone());
    let pushed = sync_allowing_rejections(&w, at(2026, 11, 3, 1, 0)).await;
    assert_eq!(pushed.rejected, 1, "{pushed:?}");
    let resettled = sync_allowing_rejections(&w, at(2026, 11, 3, 2, 0)).await;
    assert_eq!(resettled.period_adjustments, 1, "{resettled:?}");
    w.lago.clear_faults();
    assert_eq!(months_settled(&w).await, (1, 0));

    let renamed = jelastic_mapping_as(cost, "amount_eur");
    let mut refused = RecordFilter::status(Status::Rejected);
    refused.provider = Some("jelastic".into());
    let replayed = w
        .pipeline_with(renamed.clone())
        .await
        .replay(&ReplayOptions {
            filter: refused,
            dry_run: false,
            reason: "fixed in Lago".into(),
            now: Some(at(2026, 11, 3, 3, 0)),
        })
        .await
        .unwrap();
    assert_eq!(replayed.sent, 1, "{replayed:?}");
    let p = w.pipeline_with(renamed.clone()).await;
    let changes = p.ledger.open_changes(None).await.unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(changes[0].key.starts_with("period."), "{changes:?}");
    assert_eq!(
        months_settled(&w).await,
        (0, 1),
        "the month is not settled while its adjustment's change waits"
    );
    let again = w
        .pipeline_with(renamed.clone())
        .await
        .sync(&SyncOptions {
            now: Some(at(2026, 11, 3, 4, 0)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (again.period_adjustments, again.period_problems),
        (0, 1),
        "{again:?}"
    );
    assert_eq!(months_settled(&w).await, (0, 1));
    let status = p.ledger.period_status().await.unwrap();
    assert!(status.problems[0].1.contains(&changes[0].key), "{status:?}");

    // The person settles it in Lago by hand and keeps what was sent: the month settles.
    let run = p
        .ledger
        .start_run("resolve", at(2026, 11, 3, 5, 0))
        .await
        .unwrap();
    p.ledger
        .keep_sent(
            run,
            changes[0].change,
            false,
            "settled by hand",
            at(2026, 11, 3, 5, 0),
        )
        .await
        .unwrap();
    let after = w
        .pipeline_with(renamed)
        .await
        .sync(&SyncOptions {
            now: Some(at(2026, 11, 3, 6, 0)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(after.period_problems, 0, "{after:?}");
    assert_eq!(months_settled(&w).await, (1, 0));
}

/// A month whose adjustment would be beyond a decimal's range (records carrying about −7.9 ×
/// 10^28 while monthly tiers add as much and the minimum raises the month to 50: the adjustment
/// 50 − (−7.9 × 10^28) cannot be represented) is a problem the month reports, never a panic,
/// which would stop every run and billing for every customer.
#[test]
fn an_adjustment_beyond_a_decimals_range_is_an_error_not_a_panic() {
    use billsync::mapping::period::{settle, TierSpec};

    let spec = PeriodSpec {
        period: "month".into(),
        utc_offset: "+00:00".into(),
        currency: "EUR".into(),
        tiers: vec![
            TierSpec {
                up_to: Some(Decimal::MAX),
                markup_percent: dec("100"),
            },
            TierSpec {
                up_to: None,
                markup_percent: dec("0"),
            },
        ],
        lowest_percent: dec("0"),
        factor: Decimal::ONE,
        minimum: Some(dec("50")),
        scale: 2,
        mode: Default::default(),
    };
    let huge = dec("79228162514264337593543950300");
    let settled = std::panic::catch_unwind(|| settle(&spec, &[(huge, -huge)]));
    let err = settled.expect("no panic").unwrap_err();
    assert!(err.contains("overflows"), "{err}");
}

/// `ledger mark-delivered` (a rejected record found in the sink, recorded as sent by hand) is
/// refused for a month's records and for its adjustment: the adjustment is computed from what
/// the month's records sent, so taking one as sent by hand would leave the month priced on a
/// guess. They are replayed instead; nothing changes.
#[tokio::test]
async fn a_month_with_period_pricing_cannot_have_a_record_marked_delivered_by_hand() {
    use billsync::sinks::Outcome;

    let w = JelasticWorld::start(r#"{ markup_percent: 10, minimum: "50", period: month }"#).await;
    w.stage_without_push(at(2026, 11, 3, 0, 0)).await;
    let p = w.pipeline().await;
    let mut filter = RecordFilter::status(Status::Pending);
    filter.provider = Some("period".into());
    let adj = p.ledger.records_matching(&filter, 0, 10).await.unwrap();
    assert_eq!(adj.len(), 1, "one pending adjustment");
    let member = pending_provider_keys(&w, 1).await.remove(0);
    let member_id = p
        .ledger
        .records_matching(&RecordFilter::status(Status::Pending), 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.key == member)
        .unwrap()
        .id;
    let now = at(2026, 11, 3, 0, 0);
    let run = p.ledger.start_run("test", now).await.unwrap();
    p.ledger
        .ack(
            run,
            &[
                (adj[0].id, Outcome::Rejected("refused".into())),
                (member_id, Outcome::Rejected("refused".into())),
            ],
            now,
        )
        .await
        .unwrap();
    for key in [adj[0].key.as_str(), member.as_str()] {
        let err = p
            .ledger
            .mark_delivered(run, key, "found in Lago", now)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("period pricing"), "{key}: {err}");
    }
    assert_eq!(
        p.ledger
            .records_matching(&RecordFilter::status(Status::Rejected), 0, 10)
            .await
            .unwrap()
            .len(),
        2,
        "both stay rejected"
    );
}
