//! Helpers shared by the Lago sink tests: events, sinks with short retry policies, batches.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::mapping::MappedEvent;
use billsync::sinks::lago::{LagoConfig, LagoSink};
use billsync::sinks::{Outgoing, Sink};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

/// The key the simulator accepts in these tests.
pub const KEY: &str = "test-key-123";

/// A retry policy in milliseconds, so tests stay fast.
pub fn fast_retry(max_retries: usize) -> RetryPolicy {
    RetryPolicy {
        max_retries,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(40),
    }
}

/// A sink on `url` with the given policy and a 2 s timeout.
pub fn sink(url: &str, retry: RetryPolicy) -> LagoSink {
    sink_with(url, KEY, retry, Duration::from_secs(2))
}

/// A sink with every knob.
pub fn sink_with(url: &str, key: &str, retry: RetryPolicy, timeout: Duration) -> LagoSink {
    LagoSink::new(
        "lago-test".into(),
        LagoConfig {
            api_url: url.to_string(),
            api_key: Secret::new(key),
            batch_size: 100,
            timeout,
            retry,
        },
    )
    .expect("valid test configuration")
}

/// A whole-second timestamp.
pub fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0)
        .single()
        .expect("valid timestamp")
}

/// A `gb` sum event on `sub` / `storage`.
pub fn event(sub: &str, value: &str, timestamp: DateTime<Utc>) -> MappedEvent {
    MappedEvent {
        rule: "test.yaml#storage".into(),
        sink: None,
        external_subscription_id: sub.into(),
        external_customer_id: Some("cust-1".into()),
        metric_code: "storage".into(),
        value_property: "gb".into(),
        value: Decimal::from_str(value).expect("decimal literal"),
        properties: BTreeMap::from([("region".into(), "eu-west".into())]),
        timestamp,
    }
}

/// Encode `(key, event)` pairs into a batch with ids 1, 2, 3, …
pub fn batch(sink: &LagoSink, events: &[(&str, MappedEvent)]) -> Vec<Outgoing> {
    events
        .iter()
        .enumerate()
        .map(|(i, (key, e))| Outgoing {
            id: i as i64 + 1,
            key: key.to_string(),
            payload: sink.encode(key, e).expect("encodable"),
            unclear_since: None,
        })
        .collect()
}

/// The request body the sink must send for these payloads.
pub fn body_of(batch: &[&Outgoing]) -> String {
    let payloads: Vec<&str> = batch.iter().map(|o| o.payload.as_str()).collect();
    format!("{{\"events\":[{}]}}", payloads.join(","))
}
