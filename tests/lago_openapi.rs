//! The Lago sink's request bodies checked against Lago's own OpenAPI description
//! (`lago-openapi.yaml`, schema `EventBatchInput`; where it is read from, and why these tests
//! skip without it unless `BILLSYNC_REQUIRE_SPECS` is set: `tests/fixtures/specs/README.md`).
//!
//! The spec is stricter than the server in two ways the sink must respect: property values
//! are `oneOf` string/integer/number (an integer matches two branches and fails), and
//! `timestamp` is integer|string (a JSON float fails). The negative cases prove the check
//! can fail.

#[path = "common/lago.rs"]
mod lago_common;
#[path = "common/openapi.rs"]
mod openapi;

use std::collections::BTreeMap;
use std::str::FromStr;

use billsync::simulators::lago::{Behaviour, LagoSim, LagoSimConfig};
use billsync::sinks::{Outcome, Sink};
use chrono::TimeZone;
use lago_common::*;
use openapi::{batch_validator, check_batch_body};
use rust_decimal::Decimal;

fn varied_events() -> Vec<(&'static str, billsync::mapping::MappedEvent)> {
    let mut extra = event("sub-2", "123456789012345678.123456789", at(1_710_421_740));
    extra.properties = BTreeMap::from([
        ("instance_type".into(), "gpu.large".into()),
        ("operation_type".into(), "add".into()),
        ("region".into(), "eu-west-1".into()),
    ]);
    let subsecond = chrono::Utc
        .timestamp_opt(1_710_421_740, 123_000_000)
        .single()
        .unwrap();
    vec![
        ("tx-a", event("sub-1", "0.012846", at(1_710_000_000))),
        ("tx-b", extra),
        (
            "tx-c",
            event("sub-1", "12345678901234567890.123456789", at(1_710_003_600)),
        ),
        ("tx-d", event("sub-1", "2.50", subsecond)),
        ("tx-e", event("sub-1", "-3", at(1_710_007_200))),
    ]
}

#[test]
fn encoded_batch_matches_the_spec() {
    let Some(validator) = batch_validator() else {
        return;
    };
    let s = sink("http://127.0.0.1:1", fast_retry(0));
    let b = batch(&s, &varied_events());
    let body = body_of(&b.iter().collect::<Vec<_>>());
    check_batch_body(&validator, &body).unwrap();
    assert!(body.contains(r#""timestamp":"1710421740.123""#));
    assert!(body.contains(r#""gb":"0.012846""#));
}

#[test]
fn the_spec_check_can_fail() {
    let Some(validator) = batch_validator() else {
        return;
    };
    let ok = r#"{"events":[{"transaction_id":"t","external_subscription_id":"s","code":"c","timestamp":1710421740,"properties":{"gb":"1.5"}}]}"#;
    check_batch_body(&validator, ok).unwrap();
    let float_timestamp = r#"{"events":[{"transaction_id":"t","external_subscription_id":"s","code":"c","timestamp":1710421740.5,"properties":{"gb":"1.5"}}]}"#;
    assert!(check_batch_body(&validator, float_timestamp).is_err());
    let integer_property = r#"{"events":[{"transaction_id":"t","external_subscription_id":"s","code":"c","timestamp":1710421740,"properties":{"gb":10}}]}"#;
    assert!(check_batch_body(&validator, integer_property).is_err());
    let no_subscription = r#"{"events":[{"transaction_id":"t","code":"c","timestamp":1710421740,"properties":{"gb":"1"}}]}"#;
    assert!(check_batch_body(&validator, no_subscription).is_err());
    assert!(check_batch_body(&validator, r#"{"event":{}}"#).is_err());
}

#[tokio::test]
async fn every_body_sent_to_the_simulator_matches_the_spec() {
    let validator = batch_validator();
    let lago = LagoSim::start(LagoSimConfig {
        api_key: KEY.into(),
        behaviour: Behaviour::Postgres,
        ..LagoSimConfig::default()
    })
    .await
    .unwrap();
    let s = sink(&lago.url, fast_retry(3));
    let b = batch(&s, &varied_events());
    // A duplicate forces a split and a second, smaller request; a 503 forces a retry.
    s.deliver(&b[..1]).await.unwrap();
    lago.fail_next(1, 503);
    let out = s.deliver(&b).await.unwrap();
    assert_eq!(out[0], Outcome::AlreadyDelivered);
    assert!(out[1..].iter().all(|o| *o == Outcome::Delivered), "{out:?}");
    let bodies = lago.bodies();
    assert_eq!(bodies.len(), 4);
    if let Some(validator) = &validator {
        for body in &bodies {
            check_batch_body(validator, body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        }
    }
    assert_eq!(
        lago.total("sub-1", "storage", "gb"),
        Some(Decimal::from_str("12345678901234567889.636302789").unwrap())
    );
}

/// A validator for the spec's `#/components/schemas/{name}`, or for `inline` (a schema that may
/// `$ref` the spec's components).
/// The caller checked first that the spec is there ([`openapi::lago_spec_path`]).
fn spec_validator(schema: serde_json::Value) -> jsonschema::Validator {
    let mut spec = openapi::lago_spec().expect("the spec, checked by the test");
    let root = spec.as_object_mut().unwrap();
    root.insert(
        "$schema".into(),
        "https://json-schema.org/draft/2020-12/schema".into(),
    );
    if let serde_json::Value::Object(s) = schema {
        root.extend(s);
    }
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&spec)
        .unwrap()
}

/// The simulator's billing entities and customers (what `mappings check --remote` reads for
/// grace periods and timezones) are shaped as the spec documents them: `GET
/// /api/v1/billing_entities` (`{billing_entities: [BillingEntityObject]}`, no pagination),
/// `GET /api/v1/customers` (`CustomersPaginated`), `GET /api/v1/customers/{id}` (`Customer`).
#[tokio::test]
async fn the_simulators_billing_entities_and_customers_match_the_spec() {
    if openapi::lago_spec_path().is_none() {
        return;
    }
    let lago = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    lago.register_billing_entity("acme_jp", 2, "Asia/Tokyo");
    lago.register_billing_entity("acme_us", 0, "America/New_York");
    lago.register_subscription("sub_a", "tokyo_co");
    lago.register_subscription("sub_b", "plain_co");
    lago.register_customer("tokyo_co", Some("Asia/Tokyo"), Some(3), Some("acme_jp"));
    let get = |path: &str| {
        let url = format!("{}{path}", lago.url);
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth("lago-sim-key")
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    // The spec types a customer's `billing_configuration.invoice_grace_period` as an integer,
    // but lago-api serializes the customer's own column (`V1::CustomerSerializer`:
    // `invoice_grace_period: model.invoice_grace_period`), null when the customer follows its
    // billing entity; the simulator answers as the server does, so a null is left out here.
    let check = |validator: &jsonschema::Validator, v: &serde_json::Value| {
        let mut v = v.clone();
        let customers: Vec<&mut serde_json::Value> = match v.get_mut("customers") {
            Some(serde_json::Value::Array(cs)) => cs.iter_mut().collect(),
            _ => v.get_mut("customer").into_iter().collect(),
        };
        for c in customers {
            if let Some(serde_json::Value::Object(b)) = c.get_mut("billing_configuration") {
                if b.get("invoice_grace_period") == Some(&serde_json::Value::Null) {
                    b.remove("invoice_grace_period");
                }
            }
        }
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}\n{v}");
    };
    let entities = spec_validator(serde_json::json!({
        "type": "object",
        "required": ["billing_entities"],
        "properties": { "billing_entities": {
            "type": "array", "items": { "$ref": "#/components/schemas/BillingEntityObject" } } }
    }));
    let listed = get("/api/v1/billing_entities").await;
    check(&entities, &listed);
    assert_eq!(listed["billing_entities"][0]["invoice_grace_period"], 2);
    let paginated =
        spec_validator(serde_json::json!({ "$ref": "#/components/schemas/CustomersPaginated" }));
    let customers = get("/api/v1/customers").await;
    check(&paginated, &customers);
    assert_eq!(customers["meta"]["total_count"], 2, "{customers}");
    let one = spec_validator(serde_json::json!({ "$ref": "#/components/schemas/Customer" }));
    let plain = get("/api/v1/customers/plain_co").await;
    check(&one, &plain);
    assert_eq!(
        plain["customer"]["applicable_timezone"], "Asia/Tokyo",
        "{plain}"
    );
    assert_eq!(
        plain["customer"]["timezone"],
        serde_json::Value::Null,
        "{plain}"
    );
    let tokyo = get("/api/v1/customers/tokyo_co").await;
    check(&one, &tokyo);
    assert_eq!(
        tokyo["customer"]["billing_configuration"]["invoice_grace_period"], 3,
        "{tokyo}"
    );
    // The check can fail: a grace period as a string is not the spec's integer.
    let mut bad = listed.clone();
    bad["billing_entities"][0]["invoice_grace_period"] = "2".into();
    assert!(!entities.is_valid(&bad));
    lago.shutdown().await;
}

/// The simulator's plans (what `mappings check --remote` reads to find a subscription's plan
/// without a charge for a metric the rules send it) are shaped as the spec documents them:
/// `GET /api/v1/plans/{code}` (`Plan`: `{plan: PlanObject}`, its `charges[]` each a
/// `ChargeObject` with `billable_metric_code`) and `GET /api/v1/plans` (`PlansPaginated`).
#[tokio::test]
async fn the_simulators_plans_match_the_spec() {
    if openapi::lago_spec_path().is_none() {
        return;
    }
    let lago = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    lago.register_plan("standard", &["compute_cost", "storage_cost"]);
    lago.register_plan("empty", &[]);
    let get = |path: &str| {
        let url = format!("{}{path}", lago.url);
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth("lago-sim-key")
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let check = |validator: &jsonschema::Validator, v: &serde_json::Value| {
        let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}\n{v}");
    };
    let one = spec_validator(serde_json::json!({ "$ref": "#/components/schemas/Plan" }));
    let plan = get("/api/v1/plans/standard").await;
    check(&one, &plan);
    assert_eq!(
        plan["plan"]["charges"][1]["billable_metric_code"], "storage_cost",
        "{plan}"
    );
    let listed =
        spec_validator(serde_json::json!({ "$ref": "#/components/schemas/PlansPaginated" }));
    let all = get("/api/v1/plans?page=1&per_page=100").await;
    check(&listed, &all);
    assert_eq!(all["meta"]["total_count"], 2, "{all}");
    // The check can fail: a charge without its metric's code is not a `ChargeObject`.
    let mut bad = plan.clone();
    bad["plan"]["charges"][0]
        .as_object_mut()
        .unwrap()
        .remove("billable_metric_code");
    assert!(!one.is_valid(&bad));
    lago.shutdown().await;
}
