//! Specification of the Jelastic / Virtuozzo provider: parsing the documented history exactly
//! (floats read as decimals from their text), time offsets, the bucket grid, look-back and
//! backfill planning, the REST transport (`result != 0`, retries), and end-to-end pulls
//! against the loopback simulator.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::{Duration, Instant};

use billsync::config::{ProviderSettings, Secret};
use billsync::http::RetryPolicy;
use billsync::providers::jelastic::{
    parse_response, Grid, HistoryContext, JelasticConfig, JelasticProvider, OffsetUnit, Period,
    TimeOffset,
};
use billsync::providers::{Chunk, Cursors, Provider, ProviderError};
use billsync::record::UsageRecord;
use billsync::simulators::jelastic::{
    Fault, GenSpec, JelasticDataset, JelasticSim, JelasticSimHandle, FIXTURE,
};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;

const SESSION: &str = "pat-7f3e9c2a41d0";

fn t(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("test timestamp")
        .with_timezone(&Utc)
}

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).expect("test decimal")
}

fn offset(text: &str) -> TimeOffset {
    text.parse().expect("test offset")
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
    }
}

fn ctx(period: Period, off: &str, start: &str, end: &str) -> HistoryContext {
    HistoryContext {
        source: "jel-test".into(),
        billing_account_id: "acct-42".into(),
        currency: "EUR".into(),
        period,
        time_offset: offset(off),
        window_start: t(start),
        window_end: t(end),
        settled_before: t("2030-01-01T00:00:00Z"),
        final_requires_charge: false,
    }
}

/// The context of the documented example: a DAY bucket in UTC.
fn fixture_ctx() -> HistoryContext {
    ctx(
        Period::Day,
        "Z",
        "2024-04-01T00:00:00Z",
        "2024-04-02T00:00:00Z",
    )
}

fn config(url: &str, start: &str) -> JelasticConfig {
    let mut c = JelasticConfig::new(url, Secret::new(SESSION), "EUR", t(start));
    c.retry = fast_retry();
    c.timeout = Duration::from_secs(5);
    c
}

fn provider(c: JelasticConfig) -> JelasticProvider {
    JelasticProvider::new("jel-test".into(), c).expect("valid config")
}

/// One sync run as the pipeline does it: plan, then fetch every chunk, storing cursors.
async fn run(
    p: &JelasticProvider,
    cursors: &mut Cursors,
    now: DateTime<Utc>,
) -> Result<(Vec<Chunk>, Vec<UsageRecord>), ProviderError> {
    let chunks = p.plan(cursors, now).await?;
    let mut records = Vec::new();
    for c in &chunks {
        let page = p.fetch(c, now).await?;
        records.extend(page.records);
        if let Some(cursor) = page.cursor {
            cursors.insert(c.stream.clone(), cursor);
        }
    }
    Ok((chunks, records))
}

/// The records a ledger would keep: one per natural key, the last read wins.
fn ledger(records: &[UsageRecord]) -> BTreeMap<String, UsageRecord> {
    records
        .iter()
        .map(|r| (r.natural_key_string(), r.clone()))
        .collect()
}

fn total(records: impl IntoIterator<Item = UsageRecord>) -> Decimal {
    records.into_iter().map(|r| r.billed_cost).sum()
}

fn generated(envs: usize, nodes: usize) -> JelasticDataset {
    JelasticDataset::generate(&GenSpec {
        seed: 7,
        environments: envs,
        nodes_per_env: nodes,
        start: t("2026-03-01T00:00:00Z"),
        end: t("2026-03-05T00:00:00Z"),
    })
}

async fn sim(dataset: JelasticDataset) -> JelasticSimHandle {
    JelasticSim::start(dataset, SESSION)
        .await
        .expect("simulator")
}

fn body(rows: &str) -> String {
    format!(r#"{{"result": 0, "array": [{rows}]}}"#)
}

fn row(date: &str, appid: &str, node: u64, kind: &str, cost: &str, count: u64) -> String {
    format!(
        r#"{{"dateTime": "{date}", "appid": "{appid}", "domain": "env-{appid}", "nodeid": {node},
            "type": "{kind}", "resourceType": "NODE", "hostGroupUniqueName": "hg",
            "count": {count}, "cost": {cost}, "isPaid": false, "isWithdrawn": false,
            "isBonus": false}}"#
    )
}

// ---------------------------------------------------------------------------------------------
// Parsing the documented history
// ---------------------------------------------------------------------------------------------

#[test]
fn embedded_fixture_is_the_shared_one() {
    let shared = std::fs::read_to_string(
        "/work/shared/fixtures/providers/jelastic/billing.account.GetAccountBillingHistoryByPeriod.json",
    );
    if let Ok(shared) = shared {
        assert_eq!(shared, FIXTURE);
    }
}

#[test]
fn documented_row_parses_exactly_with_the_documented_mapping() {
    let records = parse_response(FIXTURE, &fixture_ctx()).expect("parses");
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.billed_cost, dec("0.012846"));
    assert_eq!(r.billed_cost.to_string(), "0.012846"); // not 0.012845999999999999
    assert_eq!(r.consumed_quantity, dec("3"));
    assert_eq!(r.consumed_unit, "count");
    assert_eq!(r.billing_currency, "EUR"); // configuration: the payload has none
    assert_eq!(r.provider, "jelastic");
    assert_eq!(r.source, "jel-test");
    assert_eq!(r.billing_account_id, "acct-42");
    assert_eq!(r.sub_account_id, "08888888888888888888888888888851");
    assert_eq!(r.scope, "08888888888888888888888888888851");
    assert_eq!(r.resource_id, "1639");
    assert_eq!(r.resource_name.as_deref(), Some("env-7057607/1639"));
    assert_eq!(r.resource_type, "ip");
    assert_eq!(r.service_name, "option");
    assert_eq!(r.sku_id.as_deref(), Some("OPTION:ip"));
    assert_eq!(r.charge_period_start, t("2024-04-01T00:00:00Z"));
    assert_eq!(r.charge_period_end, t("2024-04-02T00:00:00Z"));
    assert!(r.is_final);
    assert_eq!(r.attributes["domain"], "env-7057607");
    assert_eq!(r.attributes["hostGroupUniqueName"], "user_host_group");
    assert_eq!(r.attributes["usedCloudletsAmount"], "3");
    assert_eq!(r.attributes["bucket_local"], "2024-04-01 00:00:00");
    assert_eq!(r.attributes["period"], "DAY");
    // Charge-state flags change after the fact: raw only, never attributes.
    assert!(!r.attributes.contains_key("isPaid"));
    assert_eq!(r.raw.to_value()["isPaid"], Value::Bool(false));
    let names: Vec<&str> = r.natural_key.iter().map(|(k, _)| k.as_ref()).collect();
    assert_eq!(
        names,
        [
            "appid",
            "nodeid",
            "type",
            "resourceType",
            "hostGroupUniqueName",
            "period",
            "bucket_start"
        ]
    );
    assert_eq!(r.natural_key[6].1, "2024-04-01T00:00:00Z");
}

#[test]
fn many_rows_add_up_to_a_hand_computed_literal() {
    let text = body(
        &[
            row("2024-04-01 00:00:00", "a1", 1, "cloudlet", "0.012846", 1),
            row(
                "2024-04-01 00:00:00",
                "a1",
                2,
                "cloudlet",
                "0.12345678901234567",
                1,
            ),
            row("2024-04-01 01:00:00", "a1", 1, "cloudlet", "1.1", 2),
            row("2024-04-01 01:00:00", "b2", 9, "storage", "2.2", 3),
            row("2024-04-01 02:00:00", "b2", 9, "storage", "1.5e-7", 1),
        ]
        .join(","),
    );
    let records = parse_response(
        &text,
        &ctx(
            Period::Hour,
            "Z",
            "2024-04-01T00:00:00Z",
            "2024-04-01T03:00:00Z",
        ),
    )
    .expect("parses");
    assert_eq!(records.len(), 5);
    // 0.012846 + 0.12345678901234567 + 1.1 + 2.2 + 0.00000015
    //   = 3.43630293901234567 (with f64, 1.1 + 2.2 alone is 3.3000000000000003)
    assert_eq!(total(records.clone()), dec("3.43630293901234567"));
    let q: Decimal = records.iter().map(|r| r.consumed_quantity).sum();
    assert_eq!(q, dec("8"));
}

#[test]
fn a_cost_with_seventeen_significant_digits_survives_exactly() {
    let text = body(&row(
        "2024-04-01 00:00:00",
        "a1",
        1,
        "ip",
        "0.12345678901234567",
        1,
    ));
    let records = parse_response(
        &text,
        &ctx(
            Period::Hour,
            "Z",
            "2024-04-01T00:00:00Z",
            "2024-04-01T01:00:00Z",
        ),
    )
    .expect("parses");
    assert_eq!(records[0].billed_cost.to_string(), "0.12345678901234567");
    // f64 would have kept only ~16 significant digits.
    assert_ne!(
        format!("{}", 0.123_456_789_012_345_67_f64),
        "0.12345678901234567"
    );
}

#[test]
fn naive_timestamps_are_converted_to_utc_with_positive_and_negative_offsets() {
    let text = body(&row("2024-04-01 00:00:00", "a1", 1, "ip", "1", 1));
    // UTC+02:00: local midnight is 22:00 UTC the day before.
    let plus = parse_response(
        &text,
        &ctx(
            Period::Day,
            "+02:00",
            "2024-03-31T22:00:00Z",
            "2024-04-01T22:00:00Z",
        ),
    )
    .expect("parses");
    assert_eq!(plus[0].charge_period_start, t("2024-03-31T22:00:00Z"));
    assert_eq!(plus[0].charge_period_end, t("2024-04-01T22:00:00Z"));
    assert_eq!(plus[0].attributes["time_offset"], "+02:00");
    // UTC−05:30: local midnight is 05:30 UTC.
    let minus = parse_response(
        &text,
        &ctx(
            Period::Day,
            "-05:30",
            "2024-04-01T05:30:00Z",
            "2024-04-02T05:30:00Z",
        ),
    )
    .expect("parses");
    assert_eq!(minus[0].charge_period_start, t("2024-04-01T05:30:00Z"));
    // The bucket start in UTC is what the natural key holds.
    assert_eq!(minus[0].natural_key[6].1, "2024-04-01T05:30:00Z");
}

#[test]
fn time_offsets_are_written_like_rfc3339_offsets() {
    assert_eq!(offset("+02:00").minutes(), 120);
    assert_eq!(offset("-05:30").minutes(), -330);
    assert_eq!(offset("+0545").minutes(), 345);
    assert_eq!(offset("Z").minutes(), 0);
    assert_eq!(offset("-05:30").to_string(), "-05:30");
    assert!("+25:00".parse::<TimeOffset>().is_err());
    assert!("2".parse::<TimeOffset>().is_err());
    assert!("+02:75".parse::<TimeOffset>().is_err());
}

#[test]
fn result_not_zero_is_an_api_error_with_the_platforms_message() {
    let text = r#"{"result": 2207, "error": "external billing error", "reason": "upstream down"}"#;
    let err = parse_response(text, &fixture_ctx()).expect_err("must fail");
    match &err {
        ProviderError::Api {
            provider,
            call,
            code,
            message,
        } => {
            assert_eq!(provider, "jel-test");
            assert_eq!(call, "GetAccountBillingHistoryByPeriod");
            assert_eq!(code, "2207");
            assert_eq!(message, "external billing error (reason: upstream down)");
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    let auth = parse_response(
        r#"{"result": 8202, "error": "permission denied"}"#,
        &fixture_ctx(),
    )
    .expect_err("must fail");
    let text = auth.to_string();
    assert!(text.contains("authentication failed"), "{text}");
    assert!(text.contains("permission denied"), "{text}");
}

#[test]
fn malformed_rows_are_shape_errors_naming_the_row() {
    let missing_cost = r#"{"result": 0, "array": [{"dateTime": "2024-04-01 00:00:00",
        "appid": "a", "nodeid": 1, "type": "ip"}]}"#;
    let err = parse_response(missing_cost, &fixture_ctx()).expect_err("must fail");
    assert!(matches!(err, ProviderError::Shape { .. }));
    assert!(err.to_string().contains("array[0].cost"), "{err}");
    let no_result = r#"{"array": []}"#;
    assert!(matches!(
        parse_response(no_result, &fixture_ctx()),
        Err(ProviderError::Shape { .. })
    ));
    let empty = r#"{"result": 0, "array": []}"#;
    assert!(parse_response(empty, &fixture_ctx())
        .expect("ok")
        .is_empty());
}

#[test]
fn rows_outside_the_window_are_dropped_and_duplicate_keys_are_added_up() {
    let text = body(
        &[
            row("2024-04-01 00:00:00", "a1", 1, "ip", "0.5", 1),
            row("2024-04-01 00:00:00", "a1", 1, "ip", "0.25", 1), // same key
            row("2024-04-01 01:00:00", "a1", 1, "ip", "9", 1),    // at the window end
        ]
        .join(","),
    );
    let records = parse_response(
        &text,
        &ctx(
            Period::Hour,
            "Z",
            "2024-04-01T00:00:00Z",
            "2024-04-01T01:00:00Z",
        ),
    )
    .expect("parses");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].billed_cost, dec("0.75"));
    assert_eq!(records[0].consumed_quantity, dec("2"));
    assert_eq!(records[0].attributes["merged_rows"], "2");
}

#[test]
fn finality_follows_the_settle_delay_and_optionally_the_charge_flags() {
    let text = body(&row("2024-04-01 00:00:00", "a1", 1, "ip", "1", 1));
    let mut c = ctx(
        Period::Hour,
        "Z",
        "2024-04-01T00:00:00Z",
        "2024-04-01T01:00:00Z",
    );
    c.settled_before = t("2024-04-01T00:59:59Z");
    assert!(!parse_response(&text, &c).expect("parses")[0].is_final);
    c.settled_before = t("2024-04-01T01:00:00Z");
    assert!(parse_response(&text, &c).expect("parses")[0].is_final);
    c.final_requires_charge = true; // the row is neither paid nor withdrawn
    assert!(!parse_response(&text, &c).expect("parses")[0].is_final);
    let paid = text.replace(r#""isPaid": false"#, r#""isPaid": true"#);
    assert!(parse_response(&paid, &c).expect("parses")[0].is_final);
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn yaml_configuration_with_defaults() {
    std::env::set_var("JEL_TEST_SESSION", SESSION);
    let c = JelasticConfig::from_str(
        "hoster_url: https://app.jelastic.example.com\nsession: env:JEL_TEST_SESSION\n\
         currency: EUR\nstart: 2026-01-01T00:00:00Z\n",
    )
    .expect("parses");
    assert_eq!(c.period, Period::Hour);
    assert_eq!(c.look_back_buckets, 2);
    assert_eq!(c.settle_delay, chrono::Duration::hours(1));
    assert_eq!(c.time_offset, TimeOffset::UTC);
    assert_eq!(c.time_offset_unit, OffsetUnit::Minutes);
    assert_eq!(c.max_buckets_per_request, 24);
    assert!(!c.push_provisional);
    let p = provider(c);
    assert_eq!(
        p.url(),
        "https://app.jelastic.example.com/1.0/billing/account/rest/getaccountbillinghistorybyperiod"
    );
    assert!(
        !format!("{p:?}").contains(SESSION),
        "the session never shows"
    );

    let c = JelasticConfig::from_str(
        "hoster_url: https://h.example\nsession: env:JEL_TEST_SESSION\ncurrency: USD\n\
         start: 2026-01-01T00:00:00Z\nperiod: DAY\ntime_offset: \"-05:00\"\n\
         time_offset_unit: hours\nlook_back_buckets: 3\nsettle_delay: 2h\npush_provisional: true\n",
    )
    .expect("parses");
    assert_eq!(c.period, Period::Day);
    assert_eq!(c.time_offset.minutes(), -300);
    let p = provider(c);
    assert_eq!(p.time_offset_param(), "-5");
    assert!(p.push_provisional());

    let unknown = JelasticConfig::from_str(
        "hoster_url: https://h.example\nsession: env:JEL_TEST_SESSION\ncurrency: EUR\n\
         start: 2026-01-01T00:00:00Z\nuid: 5\n",
    );
    assert!(unknown.is_err(), "unknown fields are refused");
    let no_currency = JelasticConfig::from_str(
        "hoster_url: https://h.example\nsession: env:JEL_TEST_SESSION\nstart: 2026-01-01T00:00:00Z\n",
    );
    assert!(no_currency.is_err(), "the currency is required");
}

#[test]
fn settings_know_the_jelastic_kind() {
    std::env::set_var("JEL_TEST_SESSION2", SESSION);
    let s: ProviderSettings = serde_yaml_ng::from_str(
        "kind: jelastic\nhoster_url: https://h.example\nsession: env:JEL_TEST_SESSION2\n\
         currency: EUR\nstart: 2026-01-01T00:00:00Z\n",
    )
    .expect("parses");
    assert!(matches!(s, ProviderSettings::Jelastic(_)));
}

#[test]
fn impossible_configurations_are_refused() {
    let base = || config("https://h.example", "2026-01-01T00:00:00Z");
    let mut c = base();
    c.currency = "euro".into();
    assert!(JelasticProvider::new("x".into(), c).is_err());
    let mut c = base();
    c.time_offset = offset("+05:30");
    c.time_offset_unit = OffsetUnit::Hours;
    assert!(JelasticProvider::new("x".into(), c).is_err());
    let mut c = base();
    c.max_buckets_per_request = 0;
    assert!(JelasticProvider::new("x".into(), c).is_err());
    let mut c = base();
    c.hoster_url = "ftp://h.example".into();
    assert!(JelasticProvider::new("x".into(), c).is_err());
}

// ---------------------------------------------------------------------------------------------
// Planning: grid, settle delay, look-back, backfill
// ---------------------------------------------------------------------------------------------

#[test]
fn the_grid_follows_the_period_and_the_offset() {
    let hour = Grid {
        period: Period::Hour,
        offset: TimeOffset::UTC,
    };
    assert_eq!(
        hour.align_down(t("2026-03-01T10:42:13Z")),
        t("2026-03-01T10:00:00Z")
    );
    let half = Grid {
        period: Period::Hour,
        offset: offset("+05:30"),
    };
    assert_eq!(
        half.align_down(t("2026-03-01T10:42:13Z")),
        t("2026-03-01T10:30:00Z")
    );
    let day_east = Grid {
        period: Period::Day,
        offset: offset("+02:00"),
    };
    assert_eq!(
        day_east.align_down(t("2026-03-01T10:00:00Z")),
        t("2026-02-28T22:00:00Z")
    );
    let day_west = Grid {
        period: Period::Day,
        offset: offset("-05:00"),
    };
    assert_eq!(
        day_west.align_down(t("2026-03-01T03:00:00Z")),
        t("2026-02-28T05:00:00Z")
    );
}

#[tokio::test]
async fn windows_are_aligned_settled_and_split_into_requests() {
    let mut c = config("http://127.0.0.1:9", "2026-03-01T00:17:00Z");
    c.max_buckets_per_request = 24;
    let p = provider(c);
    // now − 1h settle = 2026-03-04T09:40 → last settled bucket ends at 09:00.
    let chunks = p
        .plan(&Cursors::new(), t("2026-03-04T10:40:00Z"))
        .await
        .expect("plan");
    let bounds: Vec<(DateTime<Utc>, DateTime<Utc>)> = chunks
        .iter()
        .map(|c| (c.window_start, c.window_end))
        .collect();
    assert_eq!(
        bounds,
        [
            (t("2026-03-01T00:00:00Z"), t("2026-03-02T00:00:00Z")),
            (t("2026-03-02T00:00:00Z"), t("2026-03-03T00:00:00Z")),
            (t("2026-03-03T00:00:00Z"), t("2026-03-04T00:00:00Z")),
            (t("2026-03-04T00:00:00Z"), t("2026-03-04T09:00:00Z")),
        ]
    );
    assert!(chunks
        .iter()
        .all(|c| c.stream == "account" && c.detail.is_empty()));
}

#[tokio::test]
async fn day_windows_start_at_local_midnight() {
    let mut c = config("http://127.0.0.1:9", "2026-03-01T00:00:00Z");
    c.period = Period::Day;
    c.time_offset = offset("+02:00");
    c.max_buckets_per_request = 2;
    let p = provider(c);
    let chunks = p
        .plan(&Cursors::new(), t("2026-03-05T12:00:00Z"))
        .await
        .expect("plan");
    let bounds: Vec<(DateTime<Utc>, DateTime<Utc>)> = chunks
        .iter()
        .map(|c| (c.window_start, c.window_end))
        .collect();
    // start 2026-03-01T00:00Z is 02:00 local → its day began 2026-02-28T22:00Z;
    // now − 1h = 2026-03-05T11:00Z → the last settled local day ended 2026-03-04T22:00Z.
    assert_eq!(
        bounds,
        [
            (t("2026-02-28T22:00:00Z"), t("2026-03-02T22:00:00Z")),
            (t("2026-03-02T22:00:00Z"), t("2026-03-04T22:00:00Z")),
        ]
    );
}

#[tokio::test]
async fn look_back_rereads_exactly_n_buckets_before_the_watermark() {
    let mut c = config("http://127.0.0.1:9", "2026-03-01T00:00:00Z");
    c.look_back_buckets = 3;
    let p = provider(c);
    let mut cursors = Cursors::new();
    cursors.insert("account".into(), "2026-03-02T10:00:00Z".into());
    // Nothing new settled: only the look-back is read.
    let chunks = p
        .plan(&cursors, t("2026-03-02T11:30:00Z"))
        .await
        .expect("plan");
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].window_start, t("2026-03-02T07:00:00Z"));
    assert_eq!(chunks[0].window_end, t("2026-03-02T10:00:00Z"));
    // The look-back never reaches before `start`.
    cursors.insert("account".into(), "2026-03-01T01:00:00Z".into());
    let chunks = p
        .plan(&cursors, t("2026-03-01T02:30:00Z"))
        .await
        .expect("plan");
    assert_eq!(chunks[0].window_start, t("2026-03-01T00:00:00Z"));
    // A corrupt cursor is a configuration error, not a silent restart.
    cursors.insert("account".into(), "yesterday".into());
    assert!(matches!(
        p.plan(&cursors, t("2026-03-02T11:30:00Z")).await,
        Err(ProviderError::Config { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Against the simulator
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_simulator_answers_the_documented_request_with_the_documented_row() {
    let sim = sim(JelasticDataset::from_fixture_json(FIXTURE, Period::Day).expect("dataset")).await;
    let url = format!(
        "{}/1.0/billing/account/rest/getaccountbillinghistorybyperiod",
        sim.url
    );
    let resp = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "session={SESSION}&starttime=2024-04-01 20:23:55&endtime=2024-04-02 20:23:55&period=DAY"
        ))
        .send()
        .await
        .expect("request");
    let got: Value = serde_json::from_str(&resp.text().await.expect("body")).expect("json");
    let want: Value = serde_json::from_str(FIXTURE).expect("json");
    assert_eq!(got, want);
}

#[tokio::test]
async fn time_offset_is_always_sent_and_the_window_travels_as_local_time() {
    let sim = sim(generated(3, 2)).await;
    for (off, minutes, start_local) in [
        ("Z", "0", "2026-03-01 00:00:00"),
        ("+02:00", "120", "2026-03-01 02:00:00"),
        ("-05:30", "-330", "2026-02-28 18:30:00"),
    ] {
        sim.clear_calls();
        let mut c = config(&sim.url, "2026-03-01T00:00:00Z");
        c.time_offset = offset(off);
        let p = provider(c);
        let chunk = Chunk {
            stream: "account".into(),
            window_start: t("2026-03-01T00:00:00Z"),
            window_end: t("2026-03-01T06:00:00Z"),
            detail: String::new(),
        };
        let page = p
            .fetch(&chunk, t("2026-03-10T00:00:00Z"))
            .await
            .expect("fetch");
        let calls = sim.calls();
        assert_eq!(calls.len(), 1);
        let call = &calls[0];
        assert_eq!(call.method, "POST");
        assert!(call.form_body, "parameters travel in a form body");
        assert!(call.authorized);
        assert!(!call.params.contains_key("session"));
        assert_eq!(call.params["timeoffset"], minutes, "offset {off}");
        assert_eq!(call.params["starttime"], start_local);
        assert_eq!(call.params["period"], "HOUR");
        assert!(
            !page.records.is_empty(),
            "offset {off}: the window has charges"
        );
        // Every bucket converts back into the requested UTC window, on the hour.
        for r in &page.records {
            assert!(r.charge_period_start >= chunk.window_start, "{off}: {r:?}");
            assert!(r.charge_period_end <= chunk.window_end, "{off}: {r:?}");
            assert_eq!(r.charge_period_start.timestamp() % 1800, 0);
        }
        assert_eq!(
            total(page.records),
            sim.dataset()
                .total_cost(chunk.window_start, chunk.window_end, None),
            "offset {off}"
        );
    }
}

#[tokio::test]
async fn a_backfill_is_split_and_adds_up_to_the_dataset_per_environment_and_node() {
    let sim = sim(generated(12, 3)).await;
    let mut c = config(&sim.url, "2026-03-01T00:00:00Z");
    c.max_buckets_per_request = 10;
    let p = provider(c);
    let now = t("2026-03-03T01:10:00Z"); // settled up to 2026-03-03T00:00Z: 48 buckets
    let mut cursors = Cursors::new();
    let (chunks, records) = run(&p, &mut cursors, now).await.expect("run");
    assert_eq!(chunks.len(), 5); // 10 + 10 + 10 + 10 + 8 buckets
    assert_eq!(sim.request_count(), 5);
    assert_eq!(cursors["account"], "2026-03-03T00:00:00Z");
    let keys: HashSet<String> = records.iter().map(|r| r.natural_key_string()).collect();
    assert_eq!(keys.len(), records.len(), "natural keys are unique");
    let ids: HashSet<String> = records.iter().map(|r| r.idempotency_key()).collect();
    assert_eq!(ids.len(), records.len(), "idempotency keys are unique");
    assert_eq!(
        total(records.clone()),
        sim.dataset()
            .total_cost(t("2026-03-01T00:00:00Z"), t("2026-03-03T00:00:00Z"), None)
    );
    assert!(records
        .iter()
        .all(|r| r.is_final && r.billing_currency == "EUR"));
    // One record per bucket, environment, node and charge type.
    let envs: HashSet<&str> = records.iter().map(|r| r.sub_account_id.as_str()).collect();
    let nodes: HashSet<&str> = records.iter().map(|r| r.resource_id.as_str()).collect();
    assert!(
        envs.len() > 1 && nodes.len() > envs.len(),
        "{} envs, {} nodes",
        envs.len(),
        nodes.len()
    );
    for env in &sim.dataset().envs {
        let sum = total(
            records
                .iter()
                .filter(|r| r.sub_account_id == env.appid)
                .cloned(),
        );
        assert_eq!(
            sum,
            sim.dataset().total_cost(
                t("2026-03-01T00:00:00Z"),
                t("2026-03-03T00:00:00Z"),
                Some(&env.appid)
            )
        );
    }
}

#[tokio::test]
async fn a_second_run_pulls_only_the_look_back_and_rereads_the_same_keys() {
    let sim = sim(generated(5, 2)).await;
    let p = provider(config(&sim.url, "2026-03-01T00:00:00Z"));
    let now = t("2026-03-01T12:05:00Z");
    let mut cursors = Cursors::new();
    let (_, first) = run(&p, &mut cursors, now).await.expect("first run");
    assert_eq!(cursors["account"], "2026-03-01T11:00:00Z");
    sim.clear_calls();
    let (chunks, second) = run(&p, &mut cursors, now).await.expect("second run");
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].window_start, t("2026-03-01T09:00:00Z"));
    assert_eq!(chunks[0].window_end, t("2026-03-01T11:00:00Z"));
    let calls = sim.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].params["starttime"], "2026-03-01 09:00:00");
    assert_eq!(calls[0].params["endtime"], "2026-03-01 11:00:00");
    assert_eq!(
        cursors["account"], "2026-03-01T11:00:00Z",
        "never backwards"
    );
    // Re-read records are the same records (same keys, same content).
    let before = ledger(&first);
    for r in &second {
        let old = before
            .get(&r.natural_key_string())
            .expect("seen in the first run");
        assert_eq!(old.content_hash(), r.content_hash());
    }
    // An hour later: the look-back plus the one new bucket, in one request.
    sim.clear_calls();
    let (chunks, _) = run(&p, &mut cursors, t("2026-03-01T13:05:00Z"))
        .await
        .expect("third run");
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].window_start, t("2026-03-01T09:00:00Z"));
    assert_eq!(chunks[0].window_end, t("2026-03-01T12:00:00Z"));
    assert_eq!(cursors["account"], "2026-03-01T12:00:00Z");
}

#[tokio::test]
async fn the_stored_watermark_never_moves_backwards() {
    let sim = sim(generated(2, 1)).await;
    let p = provider(config(&sim.url, "2026-03-01T00:00:00Z"));
    let mut cursors = Cursors::new();
    cursors.insert("account".into(), "2026-03-02T00:00:00Z".into());
    let chunks = p
        .plan(&cursors, t("2026-03-02T01:30:00Z"))
        .await
        .expect("plan");
    // The look-back chunk ends at the watermark; fetching it keeps the watermark.
    let page = p
        .fetch(&chunks[0], t("2026-03-02T01:30:00Z"))
        .await
        .expect("fetch");
    assert_eq!(page.cursor.as_deref(), Some("2026-03-02T00:00:00Z"));
    // Even an explicitly older chunk cannot pull the watermark back.
    let older = Chunk {
        window_start: t("2026-03-01T00:00:00Z"),
        window_end: t("2026-03-01T01:00:00Z"),
        ..chunks[0].clone()
    };
    let page = p
        .fetch(&older, t("2026-03-02T01:30:00Z"))
        .await
        .expect("fetch");
    assert_eq!(page.cursor.as_deref(), Some("2026-03-02T00:00:00Z"));
}

/// With `final_requires_charge`, a settled bucket whose rows are not charged yet is
/// provisional: the watermark must stay at it, so that it is read again until it is charged.
/// A watermark that passes it leaves its records provisional for ever once the look-back no
/// longer reaches them: never sent, revenue lost.
#[tokio::test]
async fn uncharged_buckets_pin_the_watermark_until_they_are_charged() {
    let mut unpaid = generated(6, 2);
    // Charges up to 03:00 are paid; the buckets after it are not yet.
    unpaid.paid_before = Some(t("2026-03-01T03:00:00Z"));
    let mut paid = unpaid.clone();
    paid.paid_before = Some(t("2026-03-02T00:00:00Z"));
    let (sim_unpaid, sim_paid) = (sim(unpaid).await, sim(paid).await);
    let config_of = |url: &str| {
        let mut c = config(url, "2026-03-01T00:00:00Z");
        c.final_requires_charge = true;
        c
    };
    let now = t("2026-03-01T12:05:00Z");
    let mut cursors = Cursors::new();
    let (_, first) = run(&provider(config_of(&sim_unpaid.url)), &mut cursors, now)
        .await
        .expect("first run");
    let earliest_unpaid = first
        .iter()
        .filter(|r| !r.is_final)
        .map(|r| r.charge_period_start)
        .min()
        .expect("later buckets are unpaid");
    assert!(
        earliest_unpaid < t("2026-03-01T09:00:00Z"),
        "the dataset has unpaid buckets before the look-back of the next run"
    );
    assert_eq!(
        t(&cursors["account"]),
        earliest_unpaid,
        "the watermark stops at the first uncharged bucket"
    );
    // Later the platform has charged everything: the next run makes every record final.
    let (_, second) = run(&provider(config_of(&sim_paid.url)), &mut cursors, now)
        .await
        .expect("second run");
    let mut all = first;
    all.extend(second);
    let kept = ledger(&all);
    let provisional: Vec<&String> = kept
        .iter()
        .filter(|(_, r)| !r.is_final)
        .map(|(k, _)| k)
        .collect();
    assert!(provisional.is_empty(), "left provisional: {provisional:?}");
    assert_eq!(
        total(kept.into_values()),
        sim_paid
            .dataset()
            .total_cost(t("2026-03-01T00:00:00Z"), t("2026-03-01T11:00:00Z"), None)
    );
    assert_eq!(cursors["account"], "2026-03-01T11:00:00Z");
}

#[tokio::test]
async fn day_period_pulls_local_days_and_adds_up() {
    let sim = sim(generated(6, 2)).await;
    let mut c = config(&sim.url, "2026-03-01T00:00:00Z");
    c.period = Period::Day;
    c.time_offset = offset("-05:00");
    c.max_buckets_per_request = 2;
    let p = provider(c);
    let mut cursors = Cursors::new();
    let (chunks, records) = run(&p, &mut cursors, t("2026-03-05T08:00:00Z"))
        .await
        .expect("run");
    // Local days from 2026-02-28 (05:00Z) to the last settled one ending 2026-03-05T05:00Z.
    assert_eq!(
        chunks.first().map(|c| c.window_start),
        Some(t("2026-02-28T05:00:00Z"))
    );
    assert_eq!(
        chunks.last().map(|c| c.window_end),
        Some(t("2026-03-05T05:00:00Z"))
    );
    assert_eq!(chunks.len(), 3); // 5 days by 2
    assert!(sim
        .calls()
        .iter()
        .all(|c| c.params["period"] == "DAY" && c.params["timeoffset"] == "-300"));
    for r in &records {
        assert_eq!(
            r.charge_period_end - r.charge_period_start,
            chrono::Duration::days(1)
        );
        assert_eq!(r.charge_period_start.format("%H:%M").to_string(), "05:00");
    }
    let keys: HashSet<String> = records.iter().map(|r| r.natural_key_string()).collect();
    assert_eq!(keys.len(), records.len());
    assert_eq!(
        total(records),
        sim.dataset()
            .total_cost(t("2026-02-28T05:00:00Z"), t("2026-03-05T05:00:00Z"), None)
    );
}

#[tokio::test]
async fn target_environments_get_their_own_streams() {
    let dataset = generated(4, 2);
    let wanted = dataset.envs[1].appid.clone();
    let sim = sim(dataset).await;
    let mut c = config(&sim.url, "2026-03-01T00:00:00Z");
    c.target_appids = vec![wanted.clone()];
    let p = provider(c);
    let mut cursors = Cursors::new();
    let (_, records) = run(&p, &mut cursors, t("2026-03-02T01:00:00Z"))
        .await
        .expect("run");
    assert!(cursors.contains_key(&format!("env:{wanted}")));
    assert!(sim
        .calls()
        .iter()
        .all(|c| c.params["targetappid"] == wanted));
    assert!(records.iter().all(|r| r.sub_account_id == wanted));
    assert_eq!(
        total(records),
        sim.dataset().total_cost(
            t("2026-03-01T00:00:00Z"),
            t("2026-03-02T00:00:00Z"),
            Some(&wanted)
        )
    );
}

fn one_hour() -> Chunk {
    Chunk {
        stream: "account".into(),
        window_start: t("2026-03-01T10:00:00Z"),
        window_end: t("2026-03-01T11:00:00Z"),
        detail: String::new(),
    }
}

#[tokio::test]
async fn result_not_zero_with_http_200_is_an_error_and_not_retried() {
    let sim = sim(generated(2, 1)).await;
    sim.fail_next(
        1,
        Fault::Result {
            code: 2223,
            message: "external billing rejected the request".into(),
        },
    );
    let p = provider(config(&sim.url, "2026-03-01T00:00:00Z"));
    let err = p
        .fetch(&one_hour(), t("2026-03-02T00:00:00Z"))
        .await
        .expect_err("must fail");
    let text = err.to_string();
    assert!(matches!(err, ProviderError::Api { ref code, .. } if code == "2223"));
    assert!(text.contains("jel-test"), "{text}");
    assert!(text.contains("GetAccountBillingHistoryByPeriod"), "{text}");
    assert!(
        text.contains("external billing rejected the request"),
        "{text}"
    );
    assert_eq!(sim.request_count(), 1);
}

#[tokio::test]
async fn an_invalid_session_is_a_clear_authentication_error_without_retry() {
    let sim = sim(generated(2, 1)).await;
    let mut c = config(&sim.url, "2026-03-01T00:00:00Z");
    c.session = Secret::new("expired-session-value");
    let p = provider(c);
    let err = p
        .fetch(&one_hour(), t("2026-03-02T00:00:00Z"))
        .await
        .expect_err("must fail");
    let text = err.to_string();
    assert!(text.contains("authentication failed"), "{text}");
    assert!(
        !text.contains("expired-session-value"),
        "never the secret: {text}"
    );
    assert_eq!(sim.request_count(), 1);
    assert!(!sim.calls()[0].authorized);
}

#[tokio::test]
async fn invalid_parameters_come_back_with_the_platforms_message() {
    let sim = sim(generated(2, 1)).await;
    let url = format!(
        "{}/1.0/billing/account/rest/getaccountbillinghistorybyperiod",
        sim.url
    );
    // GET with query parameters is accepted too (public clients do this).
    let resp = reqwest::Client::new()
        .get(format!("{url}?session={SESSION}&starttime=2026-03-01%2000:00:00&endtime=2026-03-01%2001:00:00&period=WEEKLY"))
        .send()
        .await
        .expect("request");
    let v: Value = serde_json::from_str(&resp.text().await.expect("body")).expect("json");
    assert_eq!(v["result"], Value::from(1));
    assert!(v["error"].as_str().unwrap_or_default().contains("period"));
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let sim = sim(generated(3, 2)).await;
    sim.fail_next(2, Fault::Http(500));
    let p = provider(config(&sim.url, "2026-03-01T00:00:00Z"));
    let page = p
        .fetch(&one_hour(), t("2026-03-02T00:00:00Z"))
        .await
        .expect("succeeds after retries");
    assert_eq!(sim.request_count(), 3);
    assert_eq!(
        total(page.records),
        sim.dataset()
            .total_cost(t("2026-03-01T10:00:00Z"), t("2026-03-01T11:00:00Z"), None)
    );
}

#[tokio::test]
async fn persistent_server_errors_give_up_with_the_status() {
    let sim = sim(generated(1, 1)).await;
    sim.fail_next(10, Fault::Http(503));
    let p = provider(config(&sim.url, "2026-03-01T00:00:00Z"));
    let err = p
        .fetch(&one_hour(), t("2026-03-02T00:00:00Z"))
        .await
        .expect_err("gives up");
    assert!(
        matches!(err, ProviderError::Http { status: 503, .. }),
        "{err}"
    );
    assert_eq!(sim.request_count(), 4); // 1 + max_retries (3)
}

#[tokio::test]
async fn rate_limits_wait_for_retry_after() {
    let sim = sim(generated(1, 1)).await;
    sim.fail_next(
        1,
        Fault::RateLimited {
            retry_after_secs: 1,
        },
    );
    let mut c = config(&sim.url, "2026-03-01T00:00:00Z");
    c.retry.max_delay = Duration::from_secs(5); // the server's hint wins up to this cap
    let p = provider(c);
    let started = Instant::now();
    p.fetch(&one_hour(), t("2026-03-02T00:00:00Z"))
        .await
        .expect("succeeds after the wait");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sim.request_count(), 2);
}

#[tokio::test]
async fn generated_datasets_are_deterministic_and_use_many_digits() {
    let a = generated(10, 3);
    let b = generated(10, 3);
    assert_eq!(a, b);
    let digits: HashMap<u32, usize> = a
        .envs
        .iter()
        .flat_map(|e| &e.nodes)
        .flat_map(|n| &n.charges)
        .fold(HashMap::new(), |mut m, c| {
            *m.entry(c.hourly_cost.scale()).or_default() += 1;
            m
        });
    assert!(digits.keys().any(|s| *s >= 15), "{digits:?}");
}

// ---------------------------------------------------------------------------------------------
// Answers that must not pass for a window's history
// ---------------------------------------------------------------------------------------------

/// A success without the history (`{"result":0}`, `{"result":0,"response":{…}}`, `"array":
/// null`) says nothing about the window. Read as "no usage", its page's cursor would be the
/// window's end and the window would never be asked again: every record of it lost. It is a
/// shape error naming the call and the window; the cursor stays. The platform's empty history
/// (`"array": []`, what an account without charges gets) is still an empty page.
#[tokio::test]
async fn a_success_without_array_is_refused_and_the_window_is_asked_again() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    for answer in [
        r#"{"result": 0}"#,
        r#"{"result": 0, "response": {"result": 0}}"#,
        r#"{"result": 0, "array": null}"#,
    ] {
        let err = parse_response(answer, &fixture_ctx()).expect_err(answer);
        let text = err.to_string();
        assert!(
            matches!(err, ProviderError::Shape { .. }),
            "{answer}: {text}"
        );
        assert!(
            text.contains("GetAccountBillingHistoryByPeriod")
                && text.contains("[2024-04-01T00:00:00Z, 2024-04-02T00:00:00Z)")
                && text.contains("`array`"),
            "{answer}: {text}"
        );
    }
    let empty = parse_response(r#"{"result": 0, "array": []}"#, &fixture_ctx());
    assert!(empty.expect("the empty history").is_empty());

    // End to end: the run fails and the stored watermark does not move past the window.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(billsync::providers::jelastic::REST_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"result": 0}"#))
        .mount(&server)
        .await;
    let p = provider(config(&server.uri(), "2026-03-01T00:00:00Z"));
    let mut cursors = Cursors::new();
    cursors.insert("account".into(), "2026-03-01T10:00:00Z".into());
    let err = run(&p, &mut cursors, t("2026-03-01T13:05:00Z"))
        .await
        .expect_err("a success without `array` is not an empty window");
    assert!(matches!(err, ProviderError::Shape { .. }), "{err}");
    assert_eq!(cursors["account"], "2026-03-01T10:00:00Z");
}

/// The natural key holds `period` and the bucket start, so re-reading the look-back on another
/// grid (HOUR → DAY, or DAY buckets moved by another `time_offset`) returns usage already
/// staged under other keys: billed twice. The pages store the grid the watermarks were read on
/// (stream `grid`, once, beside them); a plan with another `period` or `time_offset` is
/// refused, naming both, before anything is asked.
#[tokio::test]
async fn a_changed_period_or_time_offset_is_refused_instead_of_re_keying_the_look_back() {
    let sim = sim(generated(2, 1)).await;
    let hourly = provider(config(&sim.url, "2026-03-01T00:00:00Z"));
    let now = t("2026-03-02T03:05:00Z");
    // A ledger without the grid (new, or written before it was kept): every page carries it.
    let mut cursors = Cursors::new();
    let chunks = hourly.plan(&cursors, now).await.expect("plan");
    assert!(!chunks.is_empty());
    for c in &chunks {
        let page = hourly.fetch(c, now).await.expect("fetch");
        assert_eq!(
            page.also,
            [("grid".to_string(), "HOUR +00:00".to_string())],
            "{c:?}"
        );
        cursors.insert(c.stream.clone(), page.cursor.expect("a cursor"));
        cursors.extend(page.also);
    }
    // Once the ledger holds it, pages no longer carry it.
    for c in &hourly.plan(&cursors, now).await.expect("plan") {
        assert!(hourly.fetch(c, now).await.expect("fetch").also.is_empty());
    }
    // The same source read with DAY buckets from now on: refused before any request.
    let requests = sim.request_count();
    let mut c = config(&sim.url, "2026-03-01T00:00:00Z");
    c.period = Period::Day;
    let refused = provider(c)
        .plan(&cursors, t("2026-03-03T03:05:00Z"))
        .await
        .expect_err("another period is refused");
    let message = refused.to_string();
    assert!(matches!(refused, ProviderError::Config { .. }), "{message}");
    assert!(
        message.contains("DAY +00:00")
            && message.contains("HOUR +00:00")
            && message.contains("twice")
            && message.contains("README"),
        "{message}"
    );
    assert_eq!(sim.request_count(), requests, "nothing was asked");

    // DAY buckets in another time offset start at other instants: refused too.
    let mut daily = Cursors::new();
    daily.insert("account".into(), "2026-03-02T00:00:00Z".into());
    daily.insert("grid".into(), "DAY +00:00".into());
    let mut c = config(&sim.url, "2026-03-01T00:00:00Z");
    c.period = Period::Day;
    c.time_offset = offset("+02:00");
    let message = provider(c)
        .plan(&daily, t("2026-03-03T03:05:00Z"))
        .await
        .expect_err("another offset is refused")
        .to_string();
    assert!(
        message.contains("DAY +02:00") && message.contains("DAY +00:00"),
        "{message}"
    );
    assert_eq!(sim.request_count(), requests, "nothing was asked");
}

/// Log lines written while `f` runs (WARN and above).
fn warnings_of<T>(f: impl FnOnce() -> T) -> (T, String) {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }
    let sink = Sink::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(sink.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(sink.0.lock().unwrap().clone()).expect("utf-8 logs");
    (out, text)
}

/// Windows are on the grid, so a row of a bucket outside the window asked for means the
/// platform read the window or the offset otherwise (endtime inclusivity and `timeOffset` are
/// unverified): buckets at the edges may be missing from every answer. Such rows are dropped,
/// counted and warned about once per page, with the count and the window. A row of the bucket
/// starting exactly at the window's end (what an inclusive `endtime` adds, and the next window
/// reads) is no warning.
#[test]
fn rows_outside_the_window_are_counted_and_warned_about_once_per_page() {
    let window = ctx(
        Period::Hour,
        "Z",
        "2024-04-01T10:00:00Z",
        "2024-04-01T12:00:00Z",
    );
    let text = body(
        &[
            row("2024-04-01 09:00:00", "a1", 1, "ip", "1", 1), // before the window
            row("2024-04-01 10:00:00", "a1", 1, "ip", "2", 1),
            row("2024-04-01 11:00:00", "a1", 1, "ip", "3", 1),
            row("2024-04-01 12:00:00", "a1", 1, "ip", "4", 1), // at its end
            row("2024-04-01 13:00:00", "a1", 1, "ip", "5", 1), // after it
            row("2024-04-01 13:00:00", "a2", 1, "ip", "6", 1), // after it
        ]
        .join(","),
    );
    let (records, logs) = warnings_of(|| parse_response(&text, &window));
    assert_eq!(total(records.expect("parses")), dec("5"));
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(
        warnings[0].contains("rows=3")
            && warnings[0].contains("[2024-04-01T10:00:00Z, 2024-04-01T12:00:00Z)")
            && warnings[0].contains("outside the requested window"),
        "{logs}"
    );
    // Only the bucket at the window's end (an inclusive endtime): dropped without a warning.
    let at_end = body(
        &[
            row("2024-04-01 11:00:00", "a1", 1, "ip", "3", 1),
            row("2024-04-01 12:00:00", "a1", 1, "ip", "4", 1),
        ]
        .join(","),
    );
    let (records, logs) = warnings_of(|| parse_response(&at_end, &window));
    assert_eq!(total(records.expect("parses")), dec("3"));
    assert!(!logs.contains("WARN"), "{logs}");
}
