//! Specification of the MetalSoft provider: parsing the documented report exactly, the JSON-RPC
//! transport (errors, retries), window planning with look-back, and end-to-end pulls against
//! the loopback simulator.

#[path = "common/metalsoft.rs"]
mod fixtures;

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::providers::metalsoft::{
    parse_report, parse_report_str, MetalsoftConfig, MetalsoftProvider, ReportContext,
};
use billsync::providers::{Chunk, Cursors, Provider, ProviderError};
use billsync::record::UsageRecord;
use billsync::simulators::metalsoft::{Fault, MetalsoftDataset, MetalsoftSim};
use chrono::{DateTime, SecondsFormat, Utc};
use fixtures::{lines_of, FIXTURE_BIGSTEP_2020, FIXTURE_CURRENT};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "test-key-123";

fn t(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("test timestamp")
        .with_timezone(&Utc)
}

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).expect("test decimal")
}

/// The whole period of the documentation examples, settled.
fn fixture_ctx() -> ReportContext {
    ReportContext {
        source: "ms-test".into(),
        billing_account_id: "us01.metalsoft.io".into(),
        user_id: 1,
        window_start: t("2015-01-01T00:00:00Z"),
        window_end: t("2016-11-01T00:00:00Z"),
        settled: true,
    }
}

/// A settled context for the window `[start, end)` (lines must lie inside it).
fn window_ctx(start: &str, end: &str) -> ReportContext {
    ReportContext {
        window_start: t(start),
        window_end: t(end),
        ..fixture_ctx()
    }
}

fn sums(records: &[UsageRecord]) -> (Decimal, Decimal) {
    (
        records.iter().map(|r| r.billed_cost).sum(),
        records.iter().map(|r| r.consumed_quantity).sum(),
    )
}

fn counts(records: &[UsageRecord]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in records {
        *m.entry(r.resource_type.to_string()).or_insert(0) += 1;
    }
    m
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
    }
}

fn provider(endpoint: &str, users: Vec<u64>, start: DateTime<Utc>) -> MetalsoftProvider {
    let mut config = MetalsoftConfig::new(endpoint, Secret::new(KEY), users, start);
    config.retry = fast_retry();
    config.timeout = Duration::from_secs(5);
    MetalsoftProvider::new("ms-test".into(), config).expect("valid config")
}

fn chunk(user: u64, start: &str, end: &str) -> Chunk {
    Chunk {
        stream: format!("user:{user}"),
        window_start: t(start),
        window_end: t(end),
        detail: user.to_string(),
    }
}

fn envelope(result: &str) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":1,"result":{result}}}"#)
}

const RPC: &str = "/api/developer/developer";

// ---------------------------------------------------------------------------------------------
// Parsing the documented report
// ---------------------------------------------------------------------------------------------

#[test]
fn current_docs_fixture_parses_to_exact_sums() {
    let records = parse_report_str(FIXTURE_CURRENT, &fixture_ctx()).expect("parses");
    let (cost, quantity) = sums(&records);
    // 0.23354152 + 1.11383813 + 7.25925278 + 0.00000000 + 4 × 0.00000000 (waypoints)
    assert_eq!(cost, dec("8.60663243"));
    // 242136 + 250369 + 84301 + 250376 seconds + 4 × 0.0000 gbytes
    assert_eq!(quantity, dec("827182"));
    let expected: BTreeMap<String, usize> = [
        ("data_lake_download", 1),
        ("data_lake_upload", 1),
        ("drive", 1),
        ("instance", 1),
        ("network_download", 1),
        ("network_upload", 1),
        ("shared_drive", 1),
        ("subnet", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(counts(&records), expected);
}

/// A record's raw fields are its line as the report gave it (kept as the line's text, not a
/// parsed copy): for every kind of line (resources, waypoints, reservation installments), for
/// keys with `/`, `~`, quotes and escapes, and from pretty-printed text (kept compact).
#[test]
fn each_record_keeps_its_line_as_raw_fields() {
    let mut odd: Value = serde_json::from_str(FIXTURE_BIGSTEP_2020).unwrap();
    fn first_key(map: &Value) -> String {
        map.as_object().unwrap().keys().next().unwrap().clone()
    }
    fn rename_first(map: &mut Value, to: &str) {
        let from = first_key(map);
        let m = map.as_object_mut().unwrap();
        let v = m.remove(&from).unwrap();
        m.insert(to.to_string(), v);
    }
    let detailed = &mut odd["detailed_report"];
    let infra = first_key(detailed);
    rename_first(&mut detailed[&infra], "odd/type~0 \"q\" é");
    let network = &mut odd["network_report"];
    let net_infra = first_key(network);
    let bucket = first_key(&network[&net_infra]);
    rename_first(&mut network[&net_infra][&bucket], "up/~1");
    rename_first(&mut network[&net_infra], "b/~");
    for report in [
        serde_json::from_str::<Value>(FIXTURE_CURRENT).unwrap(),
        serde_json::from_str::<Value>(FIXTURE_BIGSTEP_2020).unwrap(),
        odd,
    ] {
        let compact = parse_report(&report, &fixture_ctx()).expect("parses");
        let pretty = serde_json::to_string_pretty(&report).unwrap();
        // The same text with every non-ASCII character and key escaped as \uXXXX.
        let escaped: String = pretty
            .chars()
            .map(|c| {
                if c.is_ascii() {
                    c.to_string()
                } else {
                    format!("\\u{:04x}", c as u32)
                }
            })
            .collect();
        for text in [pretty, escaped] {
            assert_eq!(
                parse_report_str(&text, &fixture_ctx()).expect("parses"),
                compact
            );
        }
        assert!(compact.len() >= 8);
        let lines = lines_of(&report);
        assert_eq!(compact.len(), lines.len());
        for (record, line) in compact.iter().zip(&lines) {
            assert!(line.is_object());
            assert_eq!(&record.raw.to_value(), line, "{}", record.resource_id);
            assert!(!record.raw.get().contains('\n'), "kept compact");
        }
    }
}

#[test]
fn bigstep_fixture_adds_data_lake_and_reservation_installment() {
    let records = parse_report_str(FIXTURE_BIGSTEP_2020, &fixture_ctx()).expect("parses");
    let (cost, quantity) = sums(&records);
    // 8.60663243 as above + data_lake 0.00000000 + installment 119.81
    assert_eq!(cost, dec("128.41663243"));
    // 827182 + data_lake 4261 seconds + 1 installment
    assert_eq!(quantity, dec("831444"));
    let c = counts(&records);
    assert_eq!(records.len(), 10);
    assert_eq!(c["data_lake"], 1);
    assert_eq!(c["reservation_installment"], 1);

    let inst = records
        .iter()
        .find(|r| r.resource_type == "reservation_installment")
        .expect("installment record");
    assert_eq!(inst.billed_cost, dec("119.81"));
    assert_eq!(inst.resource_id, "server_type_reservation:60");
    assert_eq!(inst.sku_id.as_deref(), Some("FMCI 4.8"));
    assert_eq!(inst.attributes["is_reservation"], "true");
    // No key names the requested window: a line reported by several windows is one record.
    for r in &records {
        assert!(
            r.natural_key.iter().all(|(k, _)| !k.starts_with("window")),
            "{:?}",
            r.natural_key
        );
    }

    // `infrastructures` labels the network lines of infrastructure 3688.
    let wan = records
        .iter()
        .find(|r| r.resource_type == "network_upload")
        .expect("waypoint");
    assert_eq!(wan.attributes["infrastructure_label"], "d-lake");
}

#[test]
fn record_fields_follow_the_documented_mapping() {
    let records = parse_report_str(FIXTURE_CURRENT, &fixture_ctx()).expect("parses");
    let instance = records
        .iter()
        .find(|r| r.resource_type == "instance")
        .expect("instance");
    assert_eq!(instance.provider, "metalsoft");
    assert_eq!(instance.source, "ms-test");
    assert_eq!(instance.billing_account_id, "us01.metalsoft.io");
    assert_eq!(instance.sub_account_id, "1");
    assert_eq!(instance.scope, "1");
    assert_eq!(instance.resource_id, "instance:2416");
    assert_eq!(instance.resource_name.as_deref(), Some("instance-2416"));
    assert_eq!(
        instance.charge_description.as_deref(),
        Some("instance-2416")
    );
    assert_eq!(instance.service_name, "compute");
    assert_eq!(instance.sku_id.as_deref(), Some("instance")); // server_type_id is null
    assert_eq!(instance.billed_cost, dec("7.25925278"));
    assert_eq!(instance.consumed_quantity, dec("84301"));
    assert_eq!(instance.consumed_unit, "seconds");
    assert_eq!(instance.billing_currency, "GBP");
    assert_eq!(instance.charge_period_start, t("2016-02-01T12:58:00Z"));
    assert_eq!(instance.charge_period_end, t("2016-02-02T12:23:00Z"));
    assert_eq!(instance.attributes["infrastructure_id"], "3668");
    assert_eq!(instance.attributes["cost_per_unit"], "0.31000000");
    // The content is the line's own: the window it was asked in would make the same line
    // read by two windows look changed.
    assert!(!instance.attributes.contains_key("window_start"));
    assert!(!instance.attributes.contains_key("window_end"));
    assert!(instance.is_final);
    assert_eq!(instance.raw.to_value()["product_id"], json!(2416));

    let drive = records
        .iter()
        .find(|r| r.resource_type == "drive")
        .expect("drive");
    assert_eq!(drive.attributes["drive_size_mbytes"], "41000");

    let wan_down = records
        .iter()
        .find(|r| r.resource_type == "network_download")
        .expect("waypoint");
    assert_eq!(wan_down.resource_id, "network:8381");
    assert_eq!(wan_down.attributes["bucket"], "network");
    assert_eq!(wan_down.attributes["direction"], "download");
    assert_eq!(wan_down.attributes["infrastructure_id"], "3688");
    assert_eq!(wan_down.consumed_unit, "gbytes");
}

/// Two lines of one report can share every part of the natural key: two metered waypoints of
/// one network, both clipped to the window start, are two charges of the same network product
/// starting at the same instant. Each must stay a record of its own, under a key that a re-read
/// gives again: with one key the ledger keeps only the last line, and the other one's amount is
/// never billed.
#[test]
fn lines_sharing_a_natural_key_stay_separate_records() {
    let waypoint = |cost: &str| {
        format!(
            r#"{{"cost": "{cost}", "cost_currency": "GBP", "cost_per_unit": "0.06",
                "measurement_unit": "gbytes", "measurement_period": "3600",
                "is_reservation": "0", "product_id": 8381, "product_label": "wan",
                "quantity": "1.0", "start_timestamp": "2026-03-01T10:00:00Z",
                "end_timestamp": "2026-03-01T11:00:00Z"}}"#
        )
    };
    let text = format!(
        r#"{{"network_report": {{"7": {{"network": {{"download": {{"cost": 0.5,
            "cost_currency": "GBP", "measurement_unit": "gbytes", "quantity": 2,
            "metered_waypoints": [{}, {}]}}}}}}}}}}"#,
        waypoint("0.2"),
        waypoint("0.3")
    );
    let ctx = window_ctx("2026-03-01T10:00:00Z", "2026-03-01T11:00:00Z");
    let records = parse_report_str(&text, &ctx).expect("parses");
    assert_eq!(records.len(), 2);
    // What the ledger keeps: one record per idempotency key, the last one read.
    let kept: BTreeMap<String, Decimal> = records
        .iter()
        .map(|r| (r.idempotency_key(), r.billed_cost))
        .collect();
    assert_eq!(kept.len(), 2, "each line keeps a key of its own");
    assert_eq!(kept.values().copied().sum::<Decimal>(), dec("0.5"));
    // A re-read of the window gives the same keys to the same lines.
    let again = parse_report_str(&text, &ctx).expect("parses");
    let keys = |rs: &[UsageRecord]| -> Vec<(String, Decimal)> {
        rs.iter()
            .map(|r| (r.idempotency_key(), r.billed_cost))
            .collect()
    };
    assert_eq!(keys(&again), keys(&records));
    // The first line keeps the key it always had (no key of a unique line changes).
    assert_eq!(records[0].natural_key.len(), 8);
}

#[test]
fn natural_keys_are_unique_and_complete() {
    for fixture in [FIXTURE_CURRENT, FIXTURE_BIGSTEP_2020] {
        let records = parse_report_str(fixture, &fixture_ctx()).expect("parses");
        let keys: HashSet<String> = records.iter().map(|r| r.natural_key_string()).collect();
        assert_eq!(keys.len(), records.len(), "natural keys must be unique");
        let ids: HashSet<String> = records.iter().map(|r| r.idempotency_key()).collect();
        assert_eq!(ids.len(), records.len(), "idempotency keys must be unique");
    }
    let records = parse_report_str(FIXTURE_CURRENT, &fixture_ctx()).expect("parses");
    let instance = records
        .iter()
        .find(|r| r.resource_type == "instance")
        .expect("instance");
    let names: Vec<&str> = instance
        .natural_key
        .iter()
        .map(|(k, _)| k.as_ref())
        .collect();
    assert_eq!(
        names,
        [
            "user_id_owner",
            "infrastructure_id",
            "resource_type",
            "product_id",
            "start_timestamp",
            "is_reservation",
        ]
    );
    let wp = records
        .iter()
        .find(|r| r.resource_type == "data_lake_upload")
        .expect("waypoint");
    let names: Vec<&str> = wp.natural_key.iter().map(|(k, _)| k.as_ref()).collect();
    assert!(names.contains(&"bucket") && names.contains(&"direction"));
}

#[test]
fn measurement_period_as_string_or_number_both_parse() {
    let records = parse_report_str(FIXTURE_CURRENT, &fixture_ctx()).expect("parses");
    let period = |rt: &str| {
        records
            .iter()
            .find(|r| r.resource_type == rt)
            .map(|r| r.attributes["measurement_period"].clone())
    };
    assert_eq!(period("shared_drive").as_deref(), Some("3600")); // wire: 3600
    assert_eq!(period("drive").as_deref(), Some("3600")); // wire: "3600"
    assert_eq!(period("network_upload").as_deref(), Some("10800"));
}

#[test]
fn every_fixture_line_is_on_demand() {
    let records = parse_report_str(FIXTURE_BIGSTEP_2020, &fixture_ctx()).expect("parses");
    for r in records
        .iter()
        .filter(|r| r.resource_type != "reservation_installment")
    {
        assert_eq!(r.attributes["is_reservation"], "false", "{}", r.resource_id);
    }
}

#[test]
fn money_arriving_as_json_numbers_is_exact() {
    let result = json!({"detailed_report": {"1": {"instance": [{
        "cost": 0.012846, "cost_currency": "EUR", "cost_per_unit": 0.1,
        "measurement_period": 3600, "measurement_unit": "seconds", "product_id": "5",
        "is_reservation": 1, "quantity": 462.456,
        "start_timestamp": "2024-01-01T00:00:00Z", "end_timestamp": "2024-01-01T00:07:42Z"
    }]}}});
    let ctx = window_ctx("2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z");
    let records = parse_report(&result, &ctx).expect("parses");
    assert_eq!(records[0].billed_cost, dec("0.012846"));
    assert_eq!(records[0].consumed_quantity, dec("462.456"));
    assert_eq!(records[0].attributes["is_reservation"], "true");
}

#[test]
fn any_resource_type_key_becomes_records() {
    let result = json!({"detailed_report": {"9": {"gpu_slice": [{
        "cost": "1.00000000", "cost_currency": "GBP", "measurement_unit": "seconds",
        "product_id": 1, "quantity": "3600",
        "start_timestamp": "2024-01-01T00:00:00Z", "end_timestamp": "2024-01-01T01:00:00Z"
    }]}}, "network_report": []});
    let ctx = window_ctx("2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z");
    let records = parse_report(&result, &ctx).expect("parses");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].resource_type, "gpu_slice");
}

#[test]
fn empty_reports_in_php_encoding_are_empty() {
    let result = json!({"detailed_report": [], "network_report": []});
    assert!(parse_report(&result, &fixture_ctx())
        .expect("parses")
        .is_empty());
}

#[test]
fn missing_cost_is_a_shape_error_naming_where() {
    let mut v: Value = serde_json::from_str(FIXTURE_CURRENT).expect("fixture");
    v["detailed_report"]["3668"]["instance"][0]
        .as_object_mut()
        .expect("entry")
        .remove("cost");
    let err = parse_report(&v, &fixture_ctx()).expect_err("must fail");
    let ProviderError::Shape { message, .. } = &err else {
        panic!("expected Shape, got {err:?}");
    };
    for part in ["3668", "instance", "line 0", "cost"] {
        assert!(message.contains(part), "{message} should name {part}");
    }
}

#[test]
fn unparseable_timestamp_is_a_shape_error() {
    let mut v: Value = serde_json::from_str(FIXTURE_CURRENT).expect("fixture");
    v["network_report"]["3688"]["network"]["upload"]["metered_waypoints"][0]["end_timestamp"] =
        json!("yesterday");
    let err = parse_report(&v, &fixture_ctx()).expect_err("must fail");
    let msg = err.to_string();
    assert!(matches!(err, ProviderError::Shape { .. }));
    assert!(
        msg.contains("network_upload") && msg.contains("end_timestamp"),
        "{msg}"
    );
}

#[test]
fn wrong_shapes_are_shape_errors() {
    for bad in [
        json!("hello"),
        json!({"something": 1}),
        json!({"detailed_report": 5}),
        json!({"detailed_report": {"1": {"instance": {"not": "an array"}}}}),
    ] {
        let err = parse_report(&bad, &fixture_ctx()).expect_err("must fail");
        assert!(matches!(err, ProviderError::Shape { .. }), "{bad}: {err:?}");
    }
}

/// A value of the wrong kind is refused with its path and what it is (numbers included, which
/// the reader meets in disguise).
#[test]
fn wrong_kinds_are_named_with_their_path() {
    for (bad, says) in [
        (
            json!({"detailed_report": 5}),
            "detailed_report should be an object but is a number",
        ),
        (
            json!({"detailed_report": {"1": "x"}}),
            "detailed_report.1 should be an object but is a string",
        ),
        (
            json!({"detailed_report": {"1": [4]}}),
            "detailed_report.1 should be an object but is an array",
        ),
        (
            json!({"detailed_report": {"1": {"instance": {"a": 1}}}}),
            "detailed_report.1.instance should be an array but is an object",
        ),
        (
            json!({"detailed_report": {"1": {"instance": [5]}}}),
            "instance line 0: not an object (detailed_report.1.instance[0])",
        ),
        (
            json!({"network_report": {"1": {"network": {"upload": []}}}}),
            "network_report.1.network.upload is not an object",
        ),
        (
            json!({"network_report": {"1": {"network": {"upload": {"metered_waypoints": true}}}}}),
            "network_report.1.network.upload.metered_waypoints should be an array but is a boolean",
        ),
        (
            json!({"detailed_report": [], "reservation_installments": {"server_types": "x"}}),
            "reservation_installments.server_types should be an array but is a string",
        ),
        (
            json!({"detailed_report": [], "reservation_installments": 1.5}),
            "reservation_installments should be an object but is a number",
        ),
        (json!([1]), "the result is not an object but an array"),
        (json!(7), "the result is not an object but a number"),
        (json!(null), "the result is not an object but null"),
    ] {
        let err = parse_report(&bad, &fixture_ctx()).expect_err("must fail");
        assert!(matches!(err, ProviderError::Shape { .. }), "{bad}: {err:?}");
        assert!(err.to_string().contains(says), "{bad}: {err}");
    }
}

/// A map of the report with a key given twice is refused, naming the key: read one way, a
/// parsed object keeps only the last one's lines and the first's are lost without a word. A
/// line's own field given twice is read as its last value, as a parsed object keeps it.
#[test]
fn a_key_given_twice_refuses_the_report() {
    let line = r#"{"cost": "0.1", "cost_currency": "GBP", "measurement_unit": "seconds",
        "product_id": 1, "quantity": "3600", "start_timestamp": "2024-01-01T00:00:00Z",
        "end_timestamp": "2024-01-01T01:00:00Z"}"#;
    let ctx = window_ctx("2024-01-01T00:00:00Z", "2024-01-01T01:00:00Z");
    for (text, path) in [
        (
            format!(
                r#"{{"detailed_report": {{"1": {{"instance": [{line}]}}, "1": {{"drive": [{line}]}}}}}}"#
            ),
            r#"detailed_report has the key "1" twice"#,
        ),
        (
            format!(r#"{{"detailed_report": {{"1": {{"instance": [{line}], "instance": []}}}}}}"#),
            r#"detailed_report.1 has the key "instance" twice"#,
        ),
        (
            format!(
                r#"{{"detailed_report": {{"1": {{"drive": [{line}]}}}}, "detailed_report": []}}"#
            ),
            r#"the result has the key "detailed_report" twice"#,
        ),
        (
            format!(
                r#"{{"network_report": {{"1": {{"network": {{"upload": {{"metered_waypoints": [{line}],
                "metered_waypoints": []}}}}}}}}}}"#
            ),
            r#"network_report.1.network.upload has the key "metered_waypoints" twice"#,
        ),
    ] {
        let err = parse_report_str(&text, &ctx).expect_err("refused");
        assert!(matches!(err, ProviderError::Shape { .. }), "{err:?}");
        assert!(err.to_string().contains(path), "{err}");
    }
    let twice = line.replace(r#""cost": "0.1","#, r#""cost": "0.1", "cost": "0.3","#);
    let text = format!(r#"{{"detailed_report": {{"1": {{"drive": [{twice}]}}}}}}"#);
    let records = parse_report_str(&text, &ctx).expect("parses");
    assert_eq!(records[0].billed_cost, Decimal::from_str("0.3").unwrap());
}

#[test]
fn finality_needs_a_settled_window() {
    // Two lines clipped to the window (one at each end), as the server reports them.
    let result = json!({"detailed_report": {"1": {"instance": [
        {"cost": "0.1", "cost_currency": "GBP", "measurement_unit": "seconds", "product_id": 1,
         "quantity": "3600", "start_timestamp": "2024-01-01T00:00:00Z",
         "end_timestamp": "2024-01-01T01:00:00Z"},
        {"cost": "0.05", "cost_currency": "GBP", "measurement_unit": "seconds", "product_id": 2,
         "quantity": "1800", "start_timestamp": "2024-01-01T00:30:00Z",
         "end_timestamp": "2024-01-01T01:00:00Z"}
    ]}}});
    let mut ctx = window_ctx("2024-01-01T00:00:00Z", "2024-01-01T01:00:00Z");
    let records = parse_report(&result, &ctx).expect("parses");
    assert!(
        records.iter().all(|r| r.is_final),
        "inside a settled window"
    );
    ctx.settled = false;
    let records = parse_report(&result, &ctx).expect("parses");
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| !r.is_final), "window not settled");
}

/// A line that does not lie inside the requested window refuses the whole report, naming the
/// line, its interval and the window (module doc, "Window clipping").
#[test]
fn a_line_outside_the_requested_window_refuses_the_report() {
    let line = |start: &str, end: &str| {
        json!({"cost": "0.1", "cost_currency": "GBP", "measurement_unit": "seconds",
               "product_id": 7, "quantity": "3600", "start_timestamp": start,
               "end_timestamp": end})
    };
    let ctx = window_ctx("2024-01-01T01:00:00Z", "2024-01-01T02:00:00Z");
    let inside = line("2024-01-01T01:00:00Z", "2024-01-01T02:00:00Z");
    for (outside, shown) in [
        // Past the end, before the start, wholly before (a page shifted back), wholly after.
        (
            line("2024-01-01T01:00:00Z", "2024-01-01T02:00:01Z"),
            "2024-01-01T01:00:00Z → 2024-01-01T02:00:01Z",
        ),
        (
            line("2024-01-01T00:59:59Z", "2024-01-01T02:00:00Z"),
            "2024-01-01T00:59:59Z → 2024-01-01T02:00:00Z",
        ),
        (
            line("2024-01-01T00:00:00Z", "2024-01-01T01:00:00Z"),
            "2024-01-01T00:00:00Z → 2024-01-01T01:00:00Z",
        ),
        (
            line("2024-01-01T02:00:00Z", "2024-01-01T03:00:00Z"),
            "2024-01-01T02:00:00Z → 2024-01-01T03:00:00Z",
        ),
    ] {
        // A detailed line, and the same line as a network waypoint.
        for result in [
            json!({"detailed_report": {"9": {"drive": [inside.clone(), outside.clone()]}}}),
            json!({"detailed_report": [], "network_report": {"9": {"network": {"upload":
                {"cost": 0, "quantity": 0, "metered_waypoints": [inside.clone(), outside.clone()]}}}}}),
        ] {
            let err = parse_report(&result, &ctx).expect_err("refused");
            assert!(matches!(err, ProviderError::Shape { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("outside the requested window"), "{msg}");
            assert!(msg.contains(shown), "names the line's interval: {msg}");
            assert!(
                msg.contains("2024-01-01T01:00:00Z → 2024-01-01T02:00:00Z"),
                "names the window: {msg}"
            );
            assert!(
                msg.contains("detailed_report.9.drive[1]")
                    || msg.contains("network_report.9.network.upload.metered_waypoints[1]"),
                "names where the line sits: {msg}"
            );
        }
    }
    // The lines alone, inside: accepted.
    let ok = json!({"detailed_report": {"9": {"drive": [inside]}}});
    assert_eq!(parse_report(&ok, &ctx).expect("inside").len(), 1);
}

#[test]
fn a_report_stamped_with_another_window_is_refused() {
    let mut v: Value = serde_json::from_str(FIXTURE_BIGSTEP_2020).expect("fixture");
    // The example is stamped 2015-01-01 → 2016-11-01, which is `fixture_ctx`'s window.
    assert!(parse_report(&v, &fixture_ctx()).is_ok());
    v["end_timestamp"] = json!("2016-12-01T00:00:00Z");
    let err = parse_report(&v, &fixture_ctx()).expect_err("refused");
    assert!(matches!(err, ProviderError::Shape { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("`end_timestamp` is 2016-12-01T00:00:00Z"),
        "{msg}"
    );
    assert!(
        msg.contains("2015-01-01T00:00:00Z → 2016-11-01T00:00:00Z"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn configuration_defaults_and_unknown_fields() {
    std::env::set_var("BILLSYNC_TEST_MS_KEY", "k");
    let config = MetalsoftConfig::from_str(
        "endpoint: https://us01.metalsoft.io\napi_key: env:BILLSYNC_TEST_MS_KEY\nuser_ids: [1, 2]\nstart: 2024-01-01T00:00:00Z\n",
    )
    .expect("valid");
    assert_eq!(config.window, chrono::Duration::hours(1));
    assert_eq!(config.effective_look_back(), chrono::Duration::hours(1));
    assert_eq!(config.settle_delay, chrono::Duration::hours(1));
    assert_eq!(config.timeout, Duration::from_secs(60));
    assert!(!config.send_datacenter_param);
    let p = MetalsoftProvider::new("ms".into(), config).expect("valid");
    assert_eq!(p.url(), "https://us01.metalsoft.io/api/developer/developer");
    assert!(!format!("{p:?}").contains("api_key: Secret(\"k\")"));

    let err = MetalsoftConfig::from_str(
        "endpoint: x\napi_key: env:BILLSYNC_TEST_MS_KEY\nuser_ids: [1]\nstart: 2024-01-01T00:00:00Z\nfoo: 1\n",
    )
    .expect_err("unknown field");
    assert!(err.contains("foo"), "{err}");

    let cfg = MetalsoftConfig::new(
        "https://h",
        Secret::new("k"),
        vec![],
        t("2024-01-01T00:00:00Z"),
    );
    assert!(matches!(
        MetalsoftProvider::new("ms".into(), cfg),
        Err(ProviderError::Config { .. })
    ));

    // An endpoint refused for its scheme is named without the credentials it carries.
    let cfg = MetalsoftConfig::new(
        "ftp://admin:S3CRET-PW@h/x",
        Secret::new("k"),
        vec![1],
        t("2024-01-01T00:00:00Z"),
    );
    let Err(err) = MetalsoftProvider::new("ms".into(), cfg) else {
        panic!("an ftp endpoint is refused");
    };
    let err = err.to_string();
    assert!(
        err.contains("ftp://h/x") && !err.contains("S3CRET"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Planning
// ---------------------------------------------------------------------------------------------

const NOW: &str = "2024-05-10T12:34:56Z";

#[tokio::test]
async fn first_plan_covers_start_to_now_minus_settle_in_aligned_windows() {
    let p = provider("http://127.0.0.1:9", vec![7, 3], t("2024-05-10T06:20:00Z"));
    let chunks = p.plan(&Cursors::new(), t(NOW)).await.expect("plan");
    // user 7 first, then user 3; 06:00 (06:20 aligned down) .. 11:00 (12:34:56 - 1h aligned down)
    assert_eq!(chunks.len(), 10);
    for (i, c) in chunks[..5].iter().enumerate() {
        assert_eq!(c.stream, "user:7");
        assert_eq!(c.detail, "7");
        assert_eq!(c.window_start.timestamp() % 3600, 0, "aligned to the grid");
        assert_eq!(c.window_end - c.window_start, chrono::Duration::hours(1));
        assert_eq!(
            c.window_start,
            t("2024-05-10T06:00:00Z") + chrono::Duration::hours(i as i64)
        );
    }
    assert_eq!(chunks[4].window_end, t("2024-05-10T11:00:00Z"));
    assert_eq!(chunks[5].stream, "user:3");
}

#[tokio::test]
async fn look_back_rereads_exactly_one_window_before_the_cursor() {
    let p = provider("http://127.0.0.1:9", vec![1], t("2024-01-01T00:00:00Z"));
    let mut cursors = Cursors::new();
    cursors.insert("user:1".into(), "2024-05-10T09:00:00Z".into());
    let chunks = p.plan(&cursors, t(NOW)).await.expect("plan");
    let starts: Vec<_> = chunks.iter().map(|c| c.window_start).collect();
    assert_eq!(
        starts,
        [
            t("2024-05-10T08:00:00Z"), // the look-back window
            t("2024-05-10T09:00:00Z"),
            t("2024-05-10T10:00:00Z"),
        ]
    );
}

#[tokio::test]
async fn nothing_new_is_planned_when_the_watermark_is_at_now_minus_settle() {
    let mut cursors = Cursors::new();
    cursors.insert("user:1".into(), "2024-05-10T11:00:00Z".into());
    // Without look-back: nothing at all.
    let mut cfg = MetalsoftConfig::new(
        "http://127.0.0.1:9",
        Secret::new(KEY),
        vec![1],
        t("2024-01-01T00:00:00Z"),
    );
    cfg.look_back = Some(chrono::Duration::zero());
    let p = MetalsoftProvider::new("ms".into(), cfg).expect("valid");
    assert!(p.plan(&cursors, t(NOW)).await.expect("plan").is_empty());
    // With the default look-back: only the look-back window.
    let p = provider("http://127.0.0.1:9", vec![1], t("2024-01-01T00:00:00Z"));
    let chunks = p.plan(&cursors, t(NOW)).await.expect("plan");
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].window_end, t("2024-05-10T11:00:00Z"));
    // A watermark ahead of now - settle (clock skew, start in the future): nothing.
    cursors.insert("user:1".into(), "2024-05-10T13:00:00Z".into());
    assert!(p.plan(&cursors, t(NOW)).await.expect("plan").is_empty());
}

#[tokio::test]
async fn a_bad_stored_cursor_is_a_config_error() {
    let p = provider("http://127.0.0.1:9", vec![1], t("2024-01-01T00:00:00Z"));
    let mut cursors = Cursors::new();
    cursors.insert("user:1".into(), "last tuesday".into());
    assert!(matches!(
        p.plan(&cursors, t(NOW)).await,
        Err(ProviderError::Config { .. })
    ));
}

/// Users 5, 2, 9, 4 (in that order), one-hour windows, two hours of look-back, `NOW` settled
/// up to 11:00. User 5 has no stored cursor; 2 and 9 have one; 4's is ahead of 11:00.
fn mixed_users() -> (MetalsoftProvider, Cursors) {
    let mut cfg = MetalsoftConfig::new(
        "http://127.0.0.1:9",
        Secret::new(KEY),
        vec![5, 2, 9, 4],
        t("2024-05-10T07:30:00Z"),
    );
    cfg.look_back = Some(chrono::Duration::hours(2));
    let p = MetalsoftProvider::new("ms".into(), cfg).expect("valid");
    let mut cursors = Cursors::new();
    cursors.insert("user:2".into(), "2024-05-10T10:15:00Z".into());
    cursors.insert("user:9".into(), "2024-05-10T11:00:00Z".into());
    cursors.insert("user:4".into(), "2024-05-10T13:00:00Z".into());
    (p, cursors)
}

#[tokio::test]
async fn the_lazy_plan_yields_user_by_user_window_by_window_what_plan_lists() {
    let (p, cursors) = mixed_users();
    let expected = vec![
        // user 5, first run: from `start` aligned down, no look-back.
        chunk(5, "2024-05-10T07:00:00Z", "2024-05-10T08:00:00Z"),
        chunk(5, "2024-05-10T08:00:00Z", "2024-05-10T09:00:00Z"),
        chunk(5, "2024-05-10T09:00:00Z", "2024-05-10T10:00:00Z"),
        chunk(5, "2024-05-10T10:00:00Z", "2024-05-10T11:00:00Z"),
        // user 2: 10:15 - 2h = 08:15, aligned down to 08:00.
        chunk(2, "2024-05-10T08:00:00Z", "2024-05-10T09:00:00Z"),
        chunk(2, "2024-05-10T09:00:00Z", "2024-05-10T10:00:00Z"),
        chunk(2, "2024-05-10T10:00:00Z", "2024-05-10T11:00:00Z"),
        // user 9: already at 11:00, only the look-back is re-read.
        chunk(9, "2024-05-10T09:00:00Z", "2024-05-10T10:00:00Z"),
        chunk(9, "2024-05-10T10:00:00Z", "2024-05-10T11:00:00Z"),
        // user 4: 13:00 - 2h = 11:00, no window ends by 11:00.
    ];
    let plan = p.plan_lazily(&cursors, t(NOW)).await.expect("lazy plan");
    assert_eq!(plan.len, expected.len());
    let lazy: Vec<Chunk> = plan.chunks.collect();
    assert_eq!(lazy, expected);
    assert_eq!(p.plan(&cursors, t(NOW)).await.expect("plan"), expected);
}

#[tokio::test]
async fn users_without_a_complete_window_yield_nothing_and_count_nothing() {
    // User 1 starts inside the last unsettled hour; user 2's cursor (minus one window of
    // look-back) is past 11:00.
    let p = provider("http://127.0.0.1:9", vec![1, 2], t("2024-05-10T11:10:00Z"));
    let mut cursors = Cursors::new();
    cursors.insert("user:2".into(), "2024-05-10T12:00:00Z".into());
    let mut plan = p.plan_lazily(&cursors, t(NOW)).await.expect("lazy plan");
    assert_eq!(plan.len, 0);
    assert_eq!(plan.chunks.next(), None);
}

#[tokio::test]
async fn a_bad_stored_cursor_fails_the_lazy_plan_before_any_chunk() {
    let (p, mut cursors) = mixed_users();
    cursors.insert("user:4".into(), "yesterday".into());
    let err = p
        .plan_lazily(&cursors, t(NOW))
        .await
        .expect_err("a cursor that is no time");
    assert!(err.to_string().contains("user:4"), "{err}");
}

#[tokio::test]
async fn chunks_are_made_as_they_are_taken_not_all_at_once() {
    // 1,000,000 users × 43,200 one-minute windows: 43.2 billion chunks, far more than memory
    // holds, so a plan that made them up front would never return.
    let mut cfg = MetalsoftConfig::new(
        "http://127.0.0.1:9",
        Secret::new(KEY),
        (1..=1_000_000).collect(),
        t("2024-04-10T12:34:56Z"),
    );
    cfg.window = chrono::Duration::minutes(1);
    cfg.settle_delay = chrono::Duration::zero();
    let p = MetalsoftProvider::new("ms".into(), cfg).expect("valid");
    let mut plan = p.plan_lazily(&Cursors::new(), t(NOW)).await.expect("plan");
    assert_eq!(plan.len, 1_000_000 * 43_200);
    assert_eq!(
        plan.chunks.next(),
        Some(chunk(1, "2024-04-10T12:34:00Z", "2024-04-10T12:35:00Z"))
    );
    // The last window of user 1 ends at NOW aligned down; user 2 follows.
    assert_eq!(
        plan.chunks.nth(43_198),
        Some(chunk(1, "2024-05-10T12:33:00Z", "2024-05-10T12:34:00Z"))
    );
    assert_eq!(
        plan.chunks.next(),
        Some(chunk(2, "2024-04-10T12:34:00Z", "2024-04-10T12:35:00Z"))
    );
}

// ---------------------------------------------------------------------------------------------
// Transport (wiremock serving the documentation example as the `result`)
// ---------------------------------------------------------------------------------------------

async fn fixture_server() -> MockServer {
    MockServer::start().await
}

/// The window the current documentation example lies in (its lines run from 2016-01-22 to
/// 2016-02-09). The mocks answer the example only to a request for this window, as a real
/// server would: the same lines for another window would be refused.
const FIXTURE_FROM: &str = "2016-01-01T00:00:00Z";
const FIXTURE_TO: &str = "2016-03-01T00:00:00Z";

fn fixture_chunk() -> Chunk {
    chunk(1, FIXTURE_FROM, FIXTURE_TO)
}

/// Matches a request for user 1 and the example's window (further params may follow).
fn asks_for_the_fixture_window() -> wiremock::matchers::BodyPartialJsonMatcher {
    body_partial_json(json!({"params": [1, FIXTURE_FROM, FIXTURE_TO]}))
}

#[tokio::test]
async fn request_is_json_rpc_2_with_bearer_and_windowed_params() {
    let server = fixture_server().await;
    Mock::given(method("POST"))
        .and(path(RPC))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .and(asks_for_the_fixture_window())
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(envelope(FIXTURE_CURRENT), "application/json"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(&server.uri(), vec![1], t(FIXTURE_FROM));
    let page = p.fetch(&fixture_chunk(), t(NOW)).await.expect("fetch");
    assert_eq!(page.records.len(), 8);
    assert_eq!(page.cursor.as_deref(), Some(FIXTURE_TO));
    let requests = server.received_requests().await.expect("recorded");
    let body: Value = serde_json::from_slice(&requests[0].body).expect("json body");
    assert_eq!(body["jsonrpc"], json!("2.0"));
    assert!(!body["id"].is_null(), "a null id would be a notification");
    assert_eq!(body["method"], json!("resource_utilization_detailed"));
    assert_eq!(body["params"], json!([1, FIXTURE_FROM, FIXTURE_TO]));
}

#[tokio::test]
async fn optional_params_are_sent_only_when_configured() {
    let server = fixture_server().await;
    Mock::given(method("POST"))
        .and(asks_for_the_fixture_window())
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(envelope(FIXTURE_CURRENT), "application/json"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let mut cfg = MetalsoftConfig::new(server.uri(), Secret::new(KEY), vec![1], t(NOW));
    cfg.infrastructure_ids = Some(vec![3668]);
    cfg.send_datacenter_param = true;
    let p = MetalsoftProvider::new("ms".into(), cfg).expect("valid");
    let page = p.fetch(&fixture_chunk(), t(NOW)).await.expect("fetch");
    assert_eq!(page.records.len(), 8);
    let requests = server.received_requests().await.expect("recorded");
    let body: Value = serde_json::from_slice(&requests[0].body).expect("json body");
    assert_eq!(body["params"][3], json!([3668]));
    assert_eq!(body["params"][4], Value::Null);
    assert_eq!(body["params"].as_array().map(Vec::len), Some(5));
}

#[tokio::test]
async fn json_rpc_error_object_is_an_api_error_naming_the_method() {
    let server = fixture_server().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "jsonrpc": "2.0", "id": 1,
            "error": {"code": -32000, "message": "User 1 has no permission utilization_reports_read"}
        })))
        .expect(1) // not retried
        .mount(&server)
        .await;
    let p = provider(&server.uri(), vec![1], t(NOW));
    let err = p
        .fetch(
            &chunk(1, "2016-01-01T00:00:00Z", "2016-01-01T01:00:00Z"),
            t(NOW),
        )
        .await
        .expect_err("api error");
    let ProviderError::Api { code, .. } = &err else {
        panic!("expected Api, got {err:?}");
    };
    assert_eq!(code, "-32000");
    let msg = err.to_string();
    assert!(msg.contains("resource_utilization_detailed"), "{msg}");
    assert!(
        msg.contains("has no permission utilization_reports_read"),
        "{msg}"
    );
}

#[tokio::test]
async fn http_500_then_success_is_retried() {
    let server = fixture_server().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_string("boom"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(asks_for_the_fixture_window())
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(envelope(FIXTURE_CURRENT), "application/json"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(&server.uri(), vec![1], t(NOW));
    let page = p
        .fetch(&fixture_chunk(), t(NOW))
        .await
        .expect("retried into success");
    assert_eq!(sums(&page.records).0, dec("8.60663243"));
}

#[tokio::test]
async fn http_429_with_retry_after_is_retried() {
    let server = fixture_server().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(asks_for_the_fixture_window())
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(envelope(FIXTURE_CURRENT), "application/json"),
        )
        .expect(1)
        .mount(&server)
        .await;
    // The hint (1s) is capped by max_delay (50ms here), so the test stays fast.
    let p = provider(&server.uri(), vec![1], t(NOW));
    let page = p
        .fetch(&fixture_chunk(), t(NOW))
        .await
        .expect("retried into success");
    assert_eq!(page.records.len(), 8);
}

/// A server (or a cache in front of it) that answers the same canned report whatever window is
/// asked: the answer is refused at once (not retried, nothing returned to stage), naming the
/// first line that lies outside the window.
#[tokio::test]
async fn a_canned_answer_for_another_window_is_refused() {
    let server = fixture_server().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(envelope(FIXTURE_CURRENT), "application/json"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(&server.uri(), vec![1], t(NOW));
    let err = p
        .fetch(
            &chunk(1, "2016-01-01T00:00:00Z", "2016-01-01T01:00:00Z"),
            t(NOW),
        )
        .await
        .expect_err("refused");
    assert!(matches!(err, ProviderError::Shape { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("resource_utilization_detailed"), "{msg}");
    assert!(msg.contains("outside the requested window"), "{msg}");
    assert!(
        msg.contains("2016-01-01T00:00:00Z → 2016-01-01T01:00:00Z"),
        "{msg}"
    );
    assert!(msg.contains("detailed_report.3668."), "{msg}");
}

#[tokio::test]
async fn http_5xx_forever_gives_up_after_the_policy() {
    let server = fixture_server().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .expect(4) // 1 + max_retries 3
        .mount(&server)
        .await;
    let p = provider(&server.uri(), vec![1], t(NOW));
    let err = p
        .fetch(
            &chunk(1, "2016-01-01T00:00:00Z", "2016-01-01T01:00:00Z"),
            t(NOW),
        )
        .await
        .expect_err("gives up");
    assert!(
        matches!(err, ProviderError::Http { status: 503, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn http_401_is_a_clear_error_and_not_retried() {
    let server = fixture_server().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_string("Unauthorized"))
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(&server.uri(), vec![1], t(NOW));
    let err = p
        .fetch(
            &chunk(1, "2016-01-01T00:00:00Z", "2016-01-01T01:00:00Z"),
            t(NOW),
        )
        .await
        .expect_err("unauthorized");
    assert!(
        matches!(err, ProviderError::Http { status: 401, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("API key"), "{msg}");
    assert!(!msg.contains(KEY), "the key must never appear in errors");
}

#[tokio::test]
async fn wrong_shaped_bodies_are_shape_errors() {
    for body in [
        "<html>maintenance</html>".to_string(),
        r#"{"jsonrpc":"2.0","id":1}"#.to_string(),
        envelope(r#"{"detailed_report": "nope"}"#),
    ] {
        let server = fixture_server().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(body.clone(), "application/json"))
            .expect(1)
            .mount(&server)
            .await;
        let p = provider(&server.uri(), vec![1], t(NOW));
        let err = p
            .fetch(
                &chunk(1, "2016-01-01T00:00:00Z", "2016-01-01T01:00:00Z"),
                t(NOW),
            )
            .await
            .expect_err("shape");
        assert!(
            matches!(err, ProviderError::Shape { .. }),
            "{body}: {err:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Against the simulator
// ---------------------------------------------------------------------------------------------

fn store(cursors: &mut Cursors, chunk: &Chunk, cursor: Option<String>) {
    if let Some(c) = cursor {
        cursors.insert(chunk.stream.clone(), c);
    }
}

#[tokio::test]
async fn look_back_rereads_never_move_a_stored_cursor_back() {
    let day = t("2024-03-01T00:00:00Z");
    let end = t("2024-03-02T00:00:00Z");
    let dataset = MetalsoftDataset::generated(2, 5, 7, day, end);
    let sim = MetalsoftSim::start(dataset, KEY).await.expect("sim");
    let mut cfg = MetalsoftConfig::new(&sim.url, Secret::new(KEY), vec![1, 2], day);
    cfg.look_back = Some(chrono::Duration::hours(3));
    cfg.retry = fast_retry();
    let p = MetalsoftProvider::new("ms".into(), cfg).expect("valid");
    let now = t("2024-03-01T12:10:00Z"); // settled up to 11:00
                                         // User 1 read up to 10:00 (re-reads 07:00-10:00, then 10:00); user 2 never ran.
    let mut cursors = Cursors::new();
    cursors.insert("user:1".into(), "2024-03-01T10:00:00Z".into());
    let plan = p.plan_lazily(&cursors, now).await.expect("plan");
    assert_eq!(plan.len, 4 + 11);
    let mut got = Vec::new();
    for c in plan.chunks {
        let page = p.fetch(&c, now).await.expect("fetch");
        got.push((c.stream, c.window_end, page.cursor.expect("a cursor")));
    }
    let user1: Vec<&str> = got
        .iter()
        .filter(|(s, _, _)| s == "user:1")
        .map(|(_, _, cursor)| cursor.as_str())
        .collect();
    assert_eq!(
        user1,
        [
            "2024-03-01T10:00:00Z", // 07:00-08:00 re-read: the stored cursor, not 08:00
            "2024-03-01T10:00:00Z",
            "2024-03-01T10:00:00Z",
            "2024-03-01T11:00:00Z",
        ]
    );
    // A first run's cursor is each window's end.
    for (stream, window_end, cursor) in &got {
        if stream == "user:2" {
            assert_eq!(
                *cursor,
                window_end.to_rfc3339_opts(SecondsFormat::Secs, true)
            );
        }
    }
}

#[tokio::test]
async fn pulling_a_day_in_hourly_windows_matches_the_simulator() {
    let day = t("2024-03-01T00:00:00Z");
    let end = t("2024-03-02T00:00:00Z");
    let dataset = MetalsoftDataset::generated(3, 20, 42, day - chrono::Duration::hours(6), end);
    let sim = MetalsoftSim::start(dataset, KEY).await.expect("sim");
    let p = provider(&sim.url, vec![1, 2, 3], day);
    let now = end + chrono::Duration::hours(1) + chrono::Duration::minutes(5);

    let chunks = p.plan(&Cursors::new(), now).await.expect("plan");
    assert_eq!(chunks.len(), 3 * 24);
    let mut cursors = Cursors::new();
    let mut records = Vec::new();
    for c in &chunks {
        let page = p.fetch(c, now).await.expect("fetch");
        records.extend(page.records);
        store(&mut cursors, c, page.cursor);
    }
    for user in 1..=3u64 {
        let expected: Decimal = (0..24)
            .map(|h| {
                let s = day + chrono::Duration::hours(h);
                sim.dataset()
                    .report_cost(user, s, s + chrono::Duration::hours(1))
            })
            .sum();
        let got: Decimal = records
            .iter()
            .filter(|r| r.sub_account_id == user.to_string())
            .map(|r| r.billed_cost)
            .sum();
        assert_eq!(got, expected, "user {user}");
        assert!(got > Decimal::ZERO);
        assert_eq!(cursors[&format!("user:{user}")], "2024-03-02T00:00:00Z");
    }
    assert!(records.iter().all(|r| r.is_final));
    let keys: HashSet<String> = records.iter().map(|r| r.natural_key_string()).collect();
    assert_eq!(keys.len(), records.len());

    // The params the simulator received are exactly the windows, in order.
    let calls = sim.calls();
    assert_eq!(calls.len(), chunks.len());
    for (call, c) in calls.iter().zip(&chunks) {
        assert_eq!(call.method, "resource_utilization_detailed");
        assert!(call.authorized);
        assert_eq!(
            call.params,
            json!([
                c.detail.parse::<u64>().expect("user id"),
                c.window_start.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                c.window_end.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            ])
        );
    }

    // A second run with the stored cursors re-reads only the look-back window, and the cursor
    // stays where it was.
    sim.clear_calls();
    let again = p.plan(&cursors, now).await.expect("plan");
    assert_eq!(again.len(), 3);
    for c in &again {
        assert_eq!(c.window_start, t("2024-03-01T23:00:00Z"));
        let page = p.fetch(c, now).await.expect("fetch");
        assert_eq!(page.cursor.as_deref(), Some("2024-03-02T00:00:00Z"));
        // Re-reading gives the very same records (same keys, same content).
        for r in &page.records {
            let same = records
                .iter()
                .find(|o| o.natural_key == r.natural_key)
                .expect("same key as the first read");
            assert_eq!(same.content_hash(), r.content_hash());
        }
    }
    assert_eq!(sim.request_count(), 3);
}

#[tokio::test]
async fn simulator_reproduces_the_documentation_example() {
    let dataset = MetalsoftDataset::from_fixture_json(FIXTURE_BIGSTEP_2020, 1).expect("fixture");
    let report = dataset.report(
        1,
        t("2015-01-01T00:00:00Z"),
        t("2016-11-01T00:00:00Z"),
        None,
    );
    let records = parse_report(&report, &fixture_ctx()).expect("parses");
    assert_eq!(records.len(), 10);
    // The documentation's quantities are one second longer than their intervals (84301 s for
    // 12:58:00 → 12:23:00 next day, which is 84300 s): the real server apparently counts both
    // ends. The simulator counts `[start, end)` exactly, so each time-metered line is one second
    // cheaper: 7.25916667 + 1.11383368 + 0.23354055 + 0 + 0 (data lake) + 119.81.
    assert_eq!(sums(&records).0, dec("128.41654090"));
    let instance = records
        .iter()
        .find(|r| r.resource_type == "instance")
        .expect("instance");
    assert_eq!(instance.consumed_quantity, dec("84300"));
    assert_eq!(instance.billed_cost, dec("7.25916667"));
    // Aggregates are JSON numbers, waypoint values strings, like the real example.
    assert!(report["network_report"]["3688"]["network"]["upload"]["cost"].is_number());
    assert!(
        report["network_report"]["3688"]["network"]["upload"]["metered_waypoints"][0]["cost"]
            .is_string()
    );
    assert!(report["detailed_report"]["3668"]["shared_drive"][0]["measurement_period"].is_number());
}

#[tokio::test]
async fn shifted_fixture_pulled_hourly_sums_to_the_simulator() {
    let start = t("2024-02-01T00:00:00Z");
    let dataset = MetalsoftDataset::from_fixture_json(FIXTURE_CURRENT, 5)
        .expect("fixture")
        .shift_to(start + chrono::Duration::minutes(17));
    let sim = MetalsoftSim::start(dataset, KEY).await.expect("sim");
    let p = provider(&sim.url, vec![5], start);
    let now = t("2024-02-03T01:30:00Z");
    let chunks = p.plan(&Cursors::new(), now).await.expect("plan");
    assert_eq!(chunks.len(), 48);
    let mut total = Decimal::ZERO;
    let mut expected = Decimal::ZERO;
    for c in &chunks {
        total += sums(&p.fetch(c, now).await.expect("fetch").records).0;
        expected += sim.dataset().report_cost(5, c.window_start, c.window_end);
    }
    assert_eq!(total, expected);
    assert!(total > Decimal::ZERO);
}

#[tokio::test]
async fn simulator_faults_are_retried_or_reported() {
    let sim = MetalsoftSim::start(
        MetalsoftDataset::generated(
            1,
            5,
            7,
            t("2024-01-01T00:00:00Z"),
            t("2024-01-02T00:00:00Z"),
        ),
        KEY,
    )
    .await
    .expect("sim");
    let p = provider(&sim.url, vec![1], t("2024-01-01T00:00:00Z"));
    let c = chunk(1, "2024-01-01T10:00:00Z", "2024-01-01T11:00:00Z");

    sim.fail_next(2, Fault::Http(503));
    sim.fail_next(
        1,
        Fault::RateLimited {
            retry_after_secs: 1,
        },
    );
    let page = p.fetch(&c, t(NOW)).await.expect("retried into success");
    assert!(!page.records.is_empty());
    assert_eq!(sim.request_count(), 4);

    sim.fail_next(
        1,
        Fault::RpcError {
            code: -32000,
            message: "Internal failure".into(),
        },
    );
    let err = p.fetch(&c, t(NOW)).await.expect_err("api error");
    assert!(matches!(err, ProviderError::Api { .. }));
    assert!(err.to_string().contains("Internal failure"));

    let wrong = {
        let mut cfg = MetalsoftConfig::new(&sim.url, Secret::new("wrong"), vec![1], t(NOW));
        cfg.retry = fast_retry();
        MetalsoftProvider::new("ms".into(), cfg).expect("valid")
    };
    sim.clear_calls();
    let err = wrong.fetch(&c, t(NOW)).await.expect_err("unauthorized");
    assert!(
        matches!(err, ProviderError::Http { status: 401, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("Unauthorized"));
    assert_eq!(sim.request_count(), 1, "401 is not retried");
}

#[tokio::test]
async fn simulator_validates_method_and_params() {
    let sim = MetalsoftSim::start(MetalsoftDataset::new(), KEY)
        .await
        .expect("sim");
    let client = reqwest::Client::new();
    let call = |body: Value| {
        let client = client.clone();
        let url = format!("{}{RPC}", sim.url);
        async move {
            let v: Value = client
                .post(url)
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await
                .expect("send")
                .json()
                .await
                .expect("json");
            v
        }
    };
    let r = call(json!({"jsonrpc":"2.0","id":1,"method":"nope","params":[]})).await;
    assert_eq!(r["error"]["code"], json!(-32601));
    let r = call(json!({"jsonrpc":"2.0","id":2,"method":"resource_utilization_detailed","params":[1,"yesterday","today"]})).await;
    assert_eq!(r["error"]["code"], json!(-32602));
    let r = call(json!({"jsonrpc":"2.0","id":3,"method":"resource_utilization_detailed","params":[1,"2024-01-01T00:00:00Z","2024-01-01T01:00:00Z"]})).await;
    assert_eq!(r["result"]["detailed_report"], json!([]));
    assert_eq!(r["id"], json!(3));
}

#[test]
fn generated_datasets_are_deterministic() {
    let a = MetalsoftDataset::generated(
        4,
        10,
        99,
        t("2024-01-01T00:00:00Z"),
        t("2024-01-02T00:00:00Z"),
    );
    let b = MetalsoftDataset::generated(
        4,
        10,
        99,
        t("2024-01-01T00:00:00Z"),
        t("2024-01-02T00:00:00Z"),
    );
    assert_eq!(a, b);
    assert_eq!(a.users.len(), 4);
}

/// The simulator's embedded copies are the project's shared fixtures, byte for byte (checked
/// where the shared fixtures are present beside the repository, as on CI).
#[test]
fn embedded_fixtures_are_the_shared_fixtures() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/providers/metalsoft"
    );
    if !std::path::Path::new(dir).exists() {
        eprintln!("{dir} not present; skipping the comparison");
        return;
    }
    for (file, embedded) in [
        (
            "developer.resource_utilization_detailed.json",
            FIXTURE_CURRENT,
        ),
        (
            "developer.resource_utilization_detailed.bigstep-docs-2020.json",
            FIXTURE_BIGSTEP_2020,
        ),
    ] {
        let shared = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        assert_eq!(shared, embedded, "{file} differs from the shared fixture");
    }
}

/// Keys and content hashes are stored in ledgers and sent as `transaction_id`s: a change in
/// how either is derived would resend every record (or take every re-read for a change). They
/// are pinned here on the documentation examples and a generated report.
#[test]
fn keys_and_content_hashes_never_change() {
    let mut records = parse_report(
        &serde_json::from_str(FIXTURE_BIGSTEP_2020).expect("fixture"),
        &fixture_ctx(),
    )
    .expect("parses");
    records.extend(
        parse_report(
            &serde_json::from_str(FIXTURE_CURRENT).expect("fixture"),
            &fixture_ctx(),
        )
        .expect("parses"),
    );
    let start = t("2026-10-02T00:00:00Z");
    let end = t("2026-10-03T00:00:00Z");
    let dataset = MetalsoftDataset::generated(3, 40, 42, t("2026-10-01T00:00:00Z"), end);
    for user in 1..=3 {
        let ctx = ReportContext {
            user_id: user,
            ..window_ctx("2026-10-02T00:00:00Z", "2026-10-03T00:00:00Z")
        };
        records
            .extend(parse_report(&dataset.report(user, start, end, None), &ctx).expect("parses"));
    }
    assert_eq!(records.len(), 131);
    let all: Vec<String> = records
        .iter()
        .map(|r| format!("{} {}", r.idempotency_key(), r.content_hash()))
        .collect();
    assert_eq!(
        all[0],
        "metalsoft.1.20160201T131005.0baab94df2cea8769692e1b9 d14aee13cfb6712dce99d1f7478ea678"
    );
    use sha2::Digest;
    let digest = sha2::Sha256::digest(all.join("\n").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "1652aecbb9ba50c82fbe8906f6d132ae6afe4f87163cb430861ba837995cf4fc"
    );
}

/// The server clips every line to the window asked for, so re-reading the look-back on
/// another grid returns the same usage cut at other instants, under other keys (a day as one
/// line over hours staged as 24 lines bills 23 of them twice). The pages store the window the
/// watermarks were read with, once, beside them; a plan with another `window` is refused,
/// naming both, and nothing is fetched.
#[tokio::test]
async fn a_changed_window_is_refused_instead_of_re_reading_the_look_back_on_another_grid() {
    use billsync::providers::metalsoft::STREAM_WINDOW;
    let day = t("2024-03-01T00:00:00Z");
    let dataset = MetalsoftDataset::generated(1, 5, 7, day, t("2024-03-03T00:00:00Z"));
    let sim = MetalsoftSim::start(dataset, KEY).await.expect("sim");
    let hourly = {
        let mut cfg = MetalsoftConfig::new(&sim.url, Secret::new(KEY), vec![1], day);
        cfg.retry = fast_retry();
        MetalsoftProvider::new("ms".into(), cfg).expect("valid")
    };
    let now = t("2024-03-01T12:10:00Z");
    // A ledger without the window (new, or written before it was kept): every page carries it.
    let mut cursors = Cursors::new();
    let plan = hourly.plan_lazily(&cursors, now).await.expect("plan");
    for c in plan.chunks {
        let page = hourly.fetch(&c, now).await.expect("fetch");
        assert_eq!(
            page.also,
            [(STREAM_WINDOW.to_string(), "3600".to_string())],
            "{c:?}"
        );
        cursors.insert(c.stream, page.cursor.expect("a cursor"));
        for (stream, value) in page.also {
            cursors.insert(stream, value);
        }
    }
    // Once the ledger holds it, pages no longer carry it.
    let plan = hourly.plan_lazily(&cursors, now).await.expect("plan");
    for c in plan.chunks {
        assert!(hourly.fetch(&c, now).await.expect("fetch").also.is_empty());
    }
    // The same source read with daily windows from now on: refused before any request.
    let daily = {
        let mut cfg = MetalsoftConfig::new(&sim.url, Secret::new(KEY), vec![1], day);
        cfg.window = chrono::Duration::days(1);
        cfg.retry = fast_retry();
        MetalsoftProvider::new("ms".into(), cfg).expect("valid")
    };
    let requests = sim.request_count();
    let Err(refused) = daily.plan_lazily(&cursors, t("2024-03-03T03:00:00Z")).await else {
        panic!("another window is refused");
    };
    let message = refused.to_string();
    assert!(
        message.contains("`window` is 1day")
            && message.contains("windows of 1h")
            && message.contains("twice"),
        "{message}"
    );
    assert_eq!(sim.request_count(), requests, "nothing was asked");
}

/// A look-back never reaches before `start`'s window: a source started where another system
/// (or the source it replaces after a change of `window`) stopped billing re-reads nothing of
/// that system's time, even when its first run read less than `look_back`.
#[tokio::test]
async fn the_look_back_never_reaches_before_start() {
    let start = t("2024-03-01T10:00:00Z");
    let mut cfg = MetalsoftConfig::new("http://127.0.0.1:9", Secret::new(KEY), vec![1], start);
    cfg.look_back = Some(chrono::Duration::hours(6));
    let p = MetalsoftProvider::new("ms".into(), cfg).expect("valid");
    let mut cursors = Cursors::new();
    cursors.insert("user:1".into(), "2024-03-01T11:00:00Z".into());
    let chunks = p
        .plan(&cursors, t("2024-03-01T14:10:00Z"))
        .await
        .expect("plan");
    let starts: Vec<_> = chunks.iter().map(|c| c.window_start).collect();
    assert_eq!(
        starts,
        [
            t("2024-03-01T10:00:00Z"),
            t("2024-03-01T11:00:00Z"),
            t("2024-03-01T12:00:00Z"),
        ]
    );
}
