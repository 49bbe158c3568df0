//! The Lago sink's request bodies checked against Lago's own OpenAPI description
//! (`shared/specs/lago-openapi.yaml`, schema `EventBatchInput`).
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
    let validator = batch_validator();
    let s = sink("http://127.0.0.1:1", fast_retry(0));
    let b = batch(&s, &varied_events());
    let body = body_of(&b.iter().collect::<Vec<_>>());
    check_batch_body(&validator, &body).unwrap();
    assert!(body.contains(r#""timestamp":"1710421740.123""#));
    assert!(body.contains(r#""gb":"0.012846""#));
}

#[test]
fn the_spec_check_can_fail() {
    let validator = batch_validator();
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
    for body in &bodies {
        check_batch_body(&validator, body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    }
    assert_eq!(
        lago.total("sub-1", "storage", "gb"),
        Some(Decimal::from_str("12345678901234567889.636302789").unwrap())
    );
}
