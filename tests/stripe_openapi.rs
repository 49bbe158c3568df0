//! The Stripe sink's request bodies checked against Stripe's own OpenAPI description
//! (`tests/fixtures/specs/stripe-billing-meter-events.subset.json`, the request body schema of
//! `POST /v1/billing/meter_events`).
//!
//! The body is form-encoded (`payload` as a deepObject), so it is decoded with an independent
//! decoder (`serde_urlencoded`, through axum's `Query`) into the object the schema describes:
//! `payload[k]=v` → `{"payload": {"k": "v"}}`, `timestamp` → an integer when it is one. The
//! negative cases prove the check can fail.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use axum::extract::Query;
use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::mapping::MappedEvent;
use billsync::simulators::stripe::{StripeSim, StripeSimConfig};
use billsync::sinks::stripe::{StripeConfig, StripeSink};
use billsync::sinks::{Outcome, Outgoing, Sink};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};

fn validator() -> jsonschema::Validator {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/specs/stripe-billing-meter-events.subset.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let mut spec: Value = serde_json::from_str(&text).expect("the spec is JSON");
    let root = spec.as_object_mut().expect("the spec is an object");
    root.insert(
        "$ref".into(),
        json!("#/paths/~1v1~1billing~1meter_events/post/requestBody/content/application~1x-www-form-urlencoded/schema"),
    );
    root.insert(
        "$schema".into(),
        json!("https://json-schema.org/draft/2020-12/schema"),
    );
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&spec)
        .expect("the request schema compiles")
}

/// A form body as the nested object the schema describes.
fn form_to_object(body: &str) -> Result<Value, String> {
    let uri: axum::http::Uri = format!("http://x/?{body}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map_err(|e| format!("not a form body: {e}"))?;
    let mut obj = Map::new();
    for (k, v) in pairs {
        if let Some(name) = k.strip_prefix("payload[").and_then(|r| r.strip_suffix(']')) {
            let payload = obj
                .entry("payload")
                .or_insert_with(|| Value::Object(Map::new()));
            payload
                .as_object_mut()
                .ok_or("payload is not an object")?
                .insert(name.to_string(), Value::String(v));
        } else if k.starts_with("expand[") {
            let list = obj.entry("expand").or_insert_with(|| json!([]));
            list.as_array_mut()
                .ok_or("expand is not a list")?
                .push(Value::String(v));
        } else if k == "timestamp" {
            let t = v
                .parse::<i64>()
                .map(Value::from)
                .unwrap_or(Value::String(v));
            obj.insert(k, t);
        } else {
            obj.insert(k, Value::String(v));
        }
    }
    Ok(Value::Object(obj))
}

fn check(validator: &jsonschema::Validator, body: &str) -> Result<(), String> {
    let value = form_to_object(body)?;
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

fn sink(url: &str) -> StripeSink {
    let mut c = StripeConfig::new(url, Secret::new("sk_test_sim"));
    c.retry = RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    };
    c.timeout = Duration::from_secs(2);
    StripeSink::new("stripe".into(), c).unwrap()
}

fn at_hours_ago(h: i64, nanos: u32) -> DateTime<Utc> {
    let t = Utc::now() - chrono::Duration::hours(h);
    Utc.timestamp_opt(t.timestamp(), nanos).single().unwrap()
}

fn event(customer: &str, value: &str, t: DateTime<Utc>, props: &[(&str, &str)]) -> MappedEvent {
    MappedEvent {
        rule: "t.yaml#r".into(),
        sink: None,
        external_subscription_id: customer.into(),
        external_customer_id: None,
        metric_code: "gpu_seconds".into(),
        value_property: "value".into(),
        value: Decimal::from_str(value).unwrap(),
        properties: props
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect::<BTreeMap<_, _>>(),
        timestamp: t,
    }
}

fn varied(s: &StripeSink) -> Vec<Outgoing> {
    let events = [
        (
            "m.a.20260101T000000.0123456789ab",
            event("cus_1", "25", at_hours_ago(1, 0), &[]),
        ),
        (
            "m.b",
            event(
                "cus_2",
                "79228162514264337593543950335",
                at_hours_ago(2, 500_000_000),
                &[("region", "eu-west 1"), ("note", "a&b=c [x] é%")],
            ),
        ),
        (
            "m.c",
            event(
                "cus_3",
                "-3.000",
                at_hours_ago(3, 0),
                &[("instance", "gpu.large")],
            ),
        ),
    ];
    events
        .iter()
        .enumerate()
        .map(|(i, (k, e))| Outgoing {
            id: i as i64 + 1,
            key: k.to_string(),
            payload: s.encode(k, e).unwrap(),
            unclear_since: None,
        })
        .collect()
}

#[test]
fn encoded_bodies_match_the_spec() {
    let v = validator();
    let s = sink("http://127.0.0.1:1");
    for out in varied(&s) {
        check(&v, &out.payload).unwrap_or_else(|e| panic!("{e}\n{}", out.payload));
        // The independent decoder reads back what was meant.
        let obj = form_to_object(&out.payload).unwrap();
        assert_eq!(obj["identifier"], json!(out.key));
        assert!(obj["timestamp"].is_i64());
    }
    let b = &varied(&s)[1];
    let obj = form_to_object(&b.payload).unwrap();
    assert_eq!(obj["payload"]["note"], json!("a&b=c [x] é%"));
    assert_eq!(
        obj["payload"]["value"],
        json!("79228162514264337593543950335")
    );
}

#[test]
fn the_spec_check_can_fail() {
    let v = validator();
    check(
        &v,
        "event_name=e&identifier=i&timestamp=1700000000&payload[stripe_customer_id]=cus_1&payload[value]=1",
    )
    .unwrap();
    // No event_name.
    assert!(check(&v, "identifier=i&payload[value]=1").is_err());
    // No payload.
    assert!(check(&v, "event_name=e&identifier=i").is_err());
    // A fractional timestamp is not an integer.
    assert!(check(&v, "event_name=e&timestamp=1700000000.5&payload[value]=1").is_err());
    // Unknown top-level parameter (additionalProperties: false).
    assert!(check(&v, "event_name=e&value=1&payload[value]=1").is_err());
    // Identifier longer than 100.
    let long = format!(
        "event_name=e&identifier={}&payload[value]=1",
        "i".repeat(101)
    );
    assert!(check(&v, &long).is_err());
}

#[tokio::test]
async fn every_body_sent_to_the_simulator_matches_the_spec() {
    let v = validator();
    let stripe = StripeSim::start(StripeSimConfig::default()).await.unwrap();
    let s = sink(&stripe.url);
    let b = varied(&s);
    stripe.fail_next(1, 503);
    let out = s.deliver(&b).await.unwrap();
    assert!(out.iter().all(|o| *o == Outcome::Delivered), "{out:?}");
    let bodies = stripe.bodies();
    assert_eq!(bodies.len(), 4);
    for body in &bodies {
        check(&v, body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    }
    assert_eq!(
        stripe.total("cus_3", "gpu_seconds"),
        Some(Decimal::from(-3))
    );
}
