//! The Stripe meter events sink against the loopback simulator: exact bytes and headers,
//! exactly-once through a lost answer, retry classes, the 35-day guard, and the v2 stream.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::mapping::MappedEvent;
use billsync::simulators::stripe::{DropMode, StripeSim, StripeSimConfig, StripeSimHandle};
use billsync::sinks::stripe::{StripeConfig, StripeMode, StripeSink};
use billsync::sinks::{Outcome, Outgoing, Sink};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

const KEY: &str = "sk_test_sim";

fn fast_retry(max_retries: usize) -> RetryPolicy {
    RetryPolicy {
        max_retries,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(40),
    }
}

fn config(url: &str, retry: RetryPolicy) -> StripeConfig {
    let mut c = StripeConfig::new(url, Secret::new(KEY));
    c.retry = retry;
    c.timeout = Duration::from_secs(2);
    c.meter_events_url = url.to_string();
    c
}

fn sink(url: &str, retry: RetryPolicy) -> StripeSink {
    StripeSink::new("stripe-test".into(), config(url, retry)).expect("valid configuration")
}

/// Whole seconds, `ago` before now.
fn ago(ago: chrono::Duration) -> DateTime<Utc> {
    let t = Utc::now() - ago;
    Utc.timestamp_opt(t.timestamp(), 0).single().unwrap()
}

fn event(customer: &str, value: &str, timestamp: DateTime<Utc>) -> MappedEvent {
    MappedEvent {
        rule: "test.yaml#api".into(),
        sink: Some("stripe-test".into()),
        external_subscription_id: customer.into(),
        external_customer_id: None,
        metric_code: "api_calls".into(),
        value_property: "ignored".into(),
        value: Decimal::from_str(value).unwrap(),
        properties: BTreeMap::from([("region".into(), "eu west/1".into())]),
        timestamp,
    }
}

fn batch(s: &StripeSink, events: &[(&str, MappedEvent)]) -> Vec<Outgoing> {
    events
        .iter()
        .enumerate()
        .map(|(i, (key, e))| Outgoing {
            id: i as i64 + 1,
            key: key.to_string(),
            payload: s.encode(key, e).expect("encodable"),
            unclear_since: None,
        })
        .collect()
}

async fn sim() -> StripeSimHandle {
    StripeSim::start(StripeSimConfig::default()).await.unwrap()
}

#[tokio::test]
async fn delivers_the_exact_body_and_headers() {
    let stripe = sim().await;
    let s = sink(&stripe.url, fast_retry(0));
    let t = ago(chrono::Duration::hours(1));
    let b = batch(&s, &[("ms.k1", event("cus_A1", "25.000", t))]);
    let expected = format!(
        "event_name=api_calls&identifier=ms.k1&timestamp={}&payload[stripe_customer_id]=cus_A1&payload[value]=25&payload[region]=eu+west%2F1",
        t.timestamp()
    );
    assert_eq!(b[0].payload, expected);
    assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered]);
    let reqs = stripe.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].body, expected);
    assert_eq!(reqs[0].idempotency_key.as_deref(), Some("ms.k1"));
    assert_eq!(
        reqs[0].content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(reqs[0].authorization.as_deref(), Some("Bearer sk_test_sim"));
    let stored = stripe.events();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].identifier, "ms.k1");
    assert_eq!(stored[0].timestamp, t.timestamp());
    assert_eq!(stored[0].payload["region"], "eu west/1");
    assert_eq!(stripe.total("cus_A1", "api_calls"), Some(Decimal::from(25)));
}

#[tokio::test]
async fn a_lost_answer_is_delivered_exactly_once() {
    let stripe = sim().await;
    let s = sink(&stripe.url, fast_retry(2));
    let t = ago(chrono::Duration::hours(2));
    let b = batch(
        &s,
        &[
            ("k.1", event("cus_A", "7", t)),
            ("k.2", event("cus_B", "5", t)),
        ],
    );
    // Stripe accepts; the ledger never records it (crash): the next run sends again.
    assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered; 2]);
    assert_eq!(
        s.deliver(&b).await.unwrap(),
        vec![Outcome::AlreadyDelivered; 2],
        "Idempotency-Key replay"
    );
    // Later, after Stripe pruned the idempotency keys: the identifier still deduplicates.
    stripe.forget_idempotency_keys();
    assert_eq!(
        s.deliver(&b).await.unwrap(),
        vec![Outcome::AlreadyDelivered; 2],
        "identifier duplicate"
    );
    assert_eq!(stripe.count("k.1"), 1);
    assert_eq!(stripe.count("k.2"), 1);
    assert_eq!(stripe.total("cus_A", "api_calls"), Some(Decimal::from(7)));

    // Stored, then the answer is lost on the way (502): the retry gets the replayed 200.
    let b = batch(&s, &[("k.3", event("cus_A", "1", t))]);
    stripe.store_then_drop_next(1, DropMode::Status502);
    assert_eq!(
        s.deliver(&b).await.unwrap(),
        vec![Outcome::AlreadyDelivered]
    );
    assert_eq!(stripe.count("k.3"), 1);

    // Stored, then the answer comes too late (client timeout).
    let mut c = config(&stripe.url, fast_retry(2));
    c.timeout = Duration::from_millis(300);
    let slow = StripeSink::new("stripe-test".into(), c).unwrap();
    let b = batch(&slow, &[("k.4", event("cus_A", "1", t))]);
    stripe.store_then_drop_next(1, DropMode::Stall(Duration::from_millis(600)));
    assert_eq!(
        slow.deliver(&b).await.unwrap(),
        vec![Outcome::AlreadyDelivered]
    );
    assert_eq!(stripe.count("k.4"), 1);
    assert_eq!(stripe.total("cus_A", "api_calls"), Some(Decimal::from(9)));
}

#[tokio::test]
async fn transient_failures_are_retried_with_the_same_key_and_body() {
    let stripe = sim().await;
    let s = sink(&stripe.url, fast_retry(4));
    let b = batch(
        &s,
        &[("k.r", event("cus_A", "3", ago(chrono::Duration::hours(1))))],
    );
    stripe.fail_next(1, 500);
    stripe.fail_next(1, 503);
    stripe.rate_limit_next(1, Some(0));
    assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered]);
    // The 429 is counted, so the pipeline halves the batches it keeps in flight.
    assert_eq!(s.throttled(), 1);
    let reqs = stripe.requests();
    assert_eq!(reqs.len(), 4);
    assert!(reqs.iter().all(|r| r.body == b[0].payload));
    assert!(reqs
        .iter()
        .all(|r| r.idempotency_key.as_deref() == Some("k.r")));
    assert_eq!(stripe.count("k.r"), 1);

    // Exhausted: Unclear (stays pending; Stripe may store an event and answer 5xx), nothing
    // stored here.
    let b = batch(
        &s,
        &[("k.x", event("cus_A", "3", ago(chrono::Duration::hours(1))))],
    );
    stripe.fail_next(5, 503);
    match &s.deliver(&b).await.unwrap()[0] {
        Outcome::Unclear(reason) => assert!(reason.contains("503"), "{reason}"),
        other => panic!("expected Unclear, got {other:?}"),
    }
    assert_eq!(stripe.count("k.x"), 0);
}

/// A record not delivered is `Unclear` when an attempt may have reached Stripe (a timeout, a
/// 5xx: Stripe may have stored the event; the ledger keeps when, since Stripe deduplicates the
/// identifier for about 24 hours only), and `Failed` when Stripe cannot have taken it (a
/// refused connection, a 429, a 409). One unclear attempt makes the record unclear, whatever
/// the attempts after it met; and a stop after one still records it.
#[tokio::test]
async fn what_may_have_reached_stripe_is_unclear_and_what_cannot_is_failed() {
    let stripe = sim().await;
    let one = |s: &StripeSink, key: &str| {
        batch(
            s,
            &[(key, event("cus_A", "3", ago(chrono::Duration::hours(1))))],
        )
    };
    let s = sink(&stripe.url, fast_retry(1));
    stripe.rate_limit_next(2, Some(0));
    assert!(
        matches!(&s.deliver(&one(&s, "k.429")).await.unwrap()[0], Outcome::Failed(r) if r.contains("429")),
        "a 429 is not taken"
    );
    stripe.fail_next(2, 409);
    assert!(matches!(
        &s.deliver(&one(&s, "k.409")).await.unwrap()[0],
        Outcome::Failed(_)
    ));
    stripe.fail_next(1, 500);
    stripe.rate_limit_next(1, Some(0));
    assert!(
        matches!(&s.deliver(&one(&s, "k.500")).await.unwrap()[0], Outcome::Unclear(r) if r.contains("429")),
        "a 500 before the 429 makes it unclear"
    );
    // A timeout: the request went out, the answer never came.
    let mut c = config(&stripe.url, fast_retry(0));
    c.timeout = Duration::from_millis(200);
    let slow = StripeSink::new("stripe-test".into(), c).unwrap();
    stripe.set_delay(Duration::from_millis(600));
    assert!(matches!(
        &slow.deliver(&one(&slow, "k.slow")).await.unwrap()[0],
        Outcome::Unclear(r) if r.contains("timeout")
    ));
    stripe.clear_faults();
    // A 500, then the key refused: the sink stops, and the record's outcome goes with it.
    stripe.fail_next(1, 500);
    stripe.fail_next(1, 401);
    let stopped = s.deliver(&one(&s, "k.stop")).await.unwrap_err();
    assert!(
        matches!(&stopped.settled[..], [(0, Outcome::Unclear(_))]),
        "{:?}",
        stopped.settled
    );
    // Nothing listens: the request never left.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let nowhere = sink(&closed, fast_retry(0));
    assert!(
        matches!(&nowhere.deliver(&one(&nowhere, "k.refused")).await.unwrap()[0], Outcome::Failed(r) if r.contains("connection")),
        "a refused connection took nothing"
    );
}

#[tokio::test]
async fn a_replayed_server_error_is_not_retried_within_the_run() {
    let stripe = sim().await;
    let s = sink(&stripe.url, fast_retry(4));
    let b = batch(
        &s,
        &[("k.s", event("cus_A", "3", ago(chrono::Duration::hours(1))))],
    );
    stripe.fail_and_save_next(500);
    match &s.deliver(&b).await.unwrap()[0] {
        Outcome::Unclear(reason) => assert!(reason.contains("replays"), "{reason}"),
        other => panic!("expected Unclear, got {other:?}"),
    }
    // The first answer, then one replay of it: no more.
    assert_eq!(stripe.request_count(), 2);
}

#[tokio::test]
async fn a_permanent_400_quarantines_only_its_record() {
    // Stripe's window is 35 days; this sink is pinned to 40, so the 37-day-old record reaches
    // Stripe and is refused there (e.g. clock skew or a misconfigured guard).
    let stripe = sim().await;
    let mut c = config(&stripe.url, fast_retry(2));
    c.max_age = Duration::from_secs(40 * 86_400);
    let s = StripeSink::new("stripe-test".into(), c).unwrap();
    let b = batch(
        &s,
        &[
            ("k.a", event("cus_A", "1", ago(chrono::Duration::hours(3)))),
            (
                "k.old",
                event("cus_A", "2", ago(chrono::Duration::days(37))),
            ),
            ("k.c", event("cus_B", "4", ago(chrono::Duration::hours(3)))),
        ],
    );
    let out = s.deliver(&b).await.unwrap();
    assert_eq!(out[0], Outcome::Delivered);
    assert_eq!(out[2], Outcome::Delivered);
    match &out[1] {
        Outcome::Rejected(reason) => {
            assert!(reason.contains("too far in the past"), "{reason}")
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(stripe.request_count(), 3, "a 400 is not retried");
    assert_eq!(stripe.count("k.old"), 0);
}

#[tokio::test]
async fn a_bad_key_stops_the_sink_without_showing_it() {
    let stripe = sim().await;
    let mut c = config(&stripe.url, fast_retry(3));
    c.api_key = Secret::new("sk_test_WRONGKEY123456");
    let s = StripeSink::new("stripe-test".into(), c).unwrap();
    let b = batch(
        &s,
        &[("k.1", event("cus_A", "1", ago(chrono::Duration::hours(1))))],
    );
    let stopped = s.deliver(&b).await.unwrap_err();
    assert!(stopped.message.contains("401"), "{}", stopped.message);
    assert!(!stopped.message.contains("WRONGKEY123456"));
    assert!(!format!("{s:?}").contains("WRONGKEY"));
    assert_eq!(stripe.request_count(), 1, "a 401 is not retried");
}

#[tokio::test]
async fn records_outside_stripes_window_are_rejected_without_a_request() {
    let stripe = sim().await;
    let s = sink(&stripe.url, fast_retry(0));
    let b = batch(
        &s,
        &[
            (
                "k.old",
                event("cus_A", "1", ago(chrono::Duration::days(40))),
            ),
            (
                "k.now",
                event("cus_A", "2", ago(chrono::Duration::hours(1))),
            ),
            (
                "k.future",
                event("cus_A", "3", ago(-chrono::Duration::hours(36))),
            ),
        ],
    );
    let out = s.deliver(&b).await.unwrap();
    match &out[0] {
        Outcome::Rejected(r) => assert!(
            r.starts_with("Stripe refuses meter events older than 35 days (timestamp ")
                && r.ends_with("is 40 days old)"),
            "{r}"
        ),
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(out[1], Outcome::Delivered);
    // Too early is not wrong: it stays pending (see
    // `a_record_stamped_ahead_of_stripes_window_waits_instead_of_being_quarantined`).
    match &out[2] {
        Outcome::Failed(r) => assert!(r.contains("in the future"), "{r}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    let reqs = stripe.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].idempotency_key.as_deref(), Some("k.now"));
}

/// A record stamped more than 5 minutes ahead (a provider clock or time zone ahead of ours) is
/// not wrong, only early: Stripe takes it once its time is inside the window. It stays pending
/// (Failed, with the reason) and goes out by itself on a later run. Rejected would quarantine
/// billable usage until a person replays it, and past 35 days it could never be billed.
#[tokio::test]
async fn a_record_stamped_ahead_of_stripes_window_waits_instead_of_being_quarantined() {
    let stripe = sim().await;
    let s = sink(&stripe.url, fast_retry(0));
    let early = event("cus_A", "3", ago(-chrono::Duration::minutes(30)));
    let b = batch(&s, &[("k.early", early.clone())]);
    match &s.deliver(&b).await.unwrap()[0] {
        Outcome::Failed(r) => assert!(r.contains("in the future"), "{r}"),
        other => panic!("expected Failed (stays pending), got {other:?}"),
    }
    assert_eq!(stripe.request_count(), 0, "nothing sent before its time");

    // Later (here: a sink and a Stripe whose window already covers that time), the same
    // frozen payload goes out as it is.
    let later = StripeSim::start(StripeSimConfig {
        max_future: Duration::from_secs(3600),
        ..StripeSimConfig::default()
    })
    .await
    .unwrap();
    let mut c = config(&later.url, fast_retry(0));
    c.max_future = Duration::from_secs(3600);
    let s = StripeSink::new("stripe-test".into(), c).unwrap();
    assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered]);
    assert_eq!(later.count("k.early"), 1);
}

/// Stripe's own clock decides in the end: a record our guard lets through (here a sink whose
/// `max_future` is an hour, like a clock of ours running ahead of Stripe's) can still be refused
/// by Stripe as too far in the future. That refusal is about the time, not the record: the
/// record stays pending (Failed) and goes out on a later run. Rejected would quarantine billable
/// usage for good.
#[tokio::test]
async fn stripes_own_too_early_refusal_keeps_the_record_pending() {
    let stripe = sim().await;
    let mut c = config(&stripe.url, fast_retry(2));
    c.max_future = Duration::from_secs(3600);
    let s = StripeSink::new("stripe-test".into(), c).unwrap();
    let b = batch(
        &s,
        &[(
            "k.early",
            event("cus_A", "3", ago(-chrono::Duration::minutes(30))),
        )],
    );
    match &s.deliver(&b).await.unwrap()[0] {
        Outcome::Failed(r) => assert!(r.contains("pending"), "{r}"),
        other => panic!("expected Failed (stays pending), got {other:?}"),
    }
    assert_eq!(
        stripe.request_count(),
        1,
        "a time window refusal is not retried within the run"
    );
    assert_eq!(stripe.count("k.early"), 0);

    // Once Stripe's window covers the time, the same frozen payload is taken.
    let later = StripeSim::start(StripeSimConfig {
        max_future: Duration::from_secs(3600),
        ..StripeSimConfig::default()
    })
    .await
    .unwrap();
    let mut c = config(&later.url, fast_retry(0));
    c.max_future = Duration::from_secs(3600);
    let s = StripeSink::new("stripe-test".into(), c).unwrap();
    assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered]);
    assert_eq!(later.count("k.early"), 1);
}

/// Stripe's time window answers are classified by Stripe's documented meter event error codes
/// (`timestamp_in_future`, `timestamp_too_far_in_past`), whatever the message says: too early
/// waits (Failed), too old is rejected for good with a reason naming the record. A refusal of
/// the `timestamp` parameter without one of those codes is time-dependent too: it waits (our
/// own guard rejects the record once it is older than `max_age`).
#[tokio::test]
async fn stripes_time_window_answers_are_classified_by_their_code() {
    use wiremock::matchers::{body_string_contains, method};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    for (key, body) in [
        (
            "k.future",
            r#"{"error":{"type":"invalid_request_error","code":"timestamp_in_future","message":"Invalid timestamp."}}"#,
        ),
        (
            "k.past",
            r#"{"error":{"type":"invalid_request_error","code":"timestamp_too_far_in_past","message":"Invalid timestamp."}}"#,
        ),
        (
            "k.nocode",
            r#"{"error":{"type":"invalid_request_error","param":"timestamp","message":"Invalid timestamp."}}"#,
        ),
    ] {
        Mock::given(method("POST"))
            .and(body_string_contains(format!("identifier={key}&")))
            .respond_with(ResponseTemplate::new(400).set_body_string(body))
            .mount(&server)
            .await;
    }
    let s = sink(&server.uri(), fast_retry(2));
    let t = ago(chrono::Duration::hours(1));
    let b = batch(
        &s,
        &[
            ("k.future", event("cus_A", "1", t)),
            ("k.past", event("cus_B", "1", t)),
            ("k.nocode", event("cus_C", "1", t)),
        ],
    );
    let out = s.deliver(&b).await.unwrap();
    match &out[0] {
        Outcome::Failed(r) => assert!(r.contains("timestamp_in_future"), "{r}"),
        other => panic!("too early must wait, got {other:?}"),
    }
    match &out[1] {
        Outcome::Rejected(r) => {
            assert!(r.contains("k.past"), "{r}");
            assert!(r.contains("timestamp_too_far_in_past"), "{r}");
        }
        other => panic!("too old is final, got {other:?}"),
    }
    match &out[2] {
        Outcome::Failed(r) => assert!(r.contains("param timestamp"), "{r}"),
        other => panic!("a timestamp refusal without a code must wait, got {other:?}"),
    }
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        3,
        "time window answers are not retried within the run"
    );
}

/// A refused `api_url` (or `meter_events_url`) is printed at start-up: without the
/// credentials a URL may carry.
#[test]
fn a_refused_url_is_shown_without_its_credentials() {
    for url in [
        "ftp://apiuser:apipass@api.example.invalid?key=sk_live_secret",
        "https://apiuser:apipass@api.example.invalid/v1",
        "https://apiuser:apipass@[::1",
    ] {
        let err = StripeSink::new("stripe-test".into(), config(url, fast_retry(0)))
            .expect_err("not a usable URL")
            .to_string();
        for secret in ["apipass", "apiuser", "sk_live_secret"] {
            assert!(!err.contains(secret), "{secret} in: {err}");
        }
    }
}

#[test]
fn what_stripe_cannot_take_is_refused_at_staging() {
    let s = sink("http://127.0.0.1:1", fast_retry(0));
    let t = ago(chrono::Duration::hours(1));
    let err = s.encode("k", &event("cus_A", "2.5", t)).unwrap_err();
    assert!(err.message.contains("whole numbers"), "{err}");
    let err = s.encode("k", &event("sub-1", "2", t)).unwrap_err();
    assert!(err.message.contains("cus_"), "{err}");
    let long = "k".repeat(101);
    assert!(s.encode(&long, &event("cus_A", "2", t)).is_err());
    assert!(s.encode(&"k".repeat(100), &event("cus_A", "2", t)).is_ok());
    // Sub-second times are truncated; values are plain integers.
    let sub = Utc
        .timestamp_opt(1_700_000_000, 999_000_000)
        .single()
        .unwrap();
    let body = s.encode("k", &event("cus_A", "-12.000", sub)).unwrap();
    assert!(body.contains("&timestamp=1700000000&"), "{body}");
    assert!(body.contains("payload[value]=-12&"), "{body}");
}

#[test]
fn the_value_key_can_be_configured() {
    let mut c = config("http://127.0.0.1:1", fast_retry(0));
    c.value_property = "tokens".into();
    let s = StripeSink::new("s".into(), c).unwrap();
    let body = s
        .encode("k", &event("cus_A", "2", ago(chrono::Duration::hours(1))))
        .unwrap();
    assert!(body.contains("&payload[tokens]=2&"), "{body}");
    assert!(!body.contains("payload[value]"));
}

fn stream_sink(stripe: &StripeSimHandle) -> StripeSink {
    let mut c = config(&stripe.url, fast_retry(2));
    c.mode = StripeMode::V2Stream;
    StripeSink::new("stripe-test".into(), c).unwrap()
}

#[tokio::test]
async fn the_stream_sends_100_events_per_request() {
    let stripe = sim().await;
    let s = stream_sink(&stripe);
    let t = ago(chrono::Duration::hours(5));
    let keys: Vec<String> = (0..250).map(|i| format!("k.{i:03}")).collect();
    let events: Vec<(&str, MappedEvent)> = keys
        .iter()
        .map(|k| (k.as_str(), event("cus_S", "3", t)))
        .collect();
    let b = batch(&s, &events);
    let out = s.deliver(&b).await.unwrap();
    assert!(out.iter().all(|o| *o == Outcome::Delivered));
    let bodies = stripe.bodies();
    let sizes: Vec<usize> = bodies
        .iter()
        .map(|b| {
            serde_json::from_str::<serde_json::Value>(b).unwrap()["events"]
                .as_array()
                .unwrap()
                .len()
        })
        .collect();
    assert_eq!(sizes, vec![100, 100, 50]);
    let first: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(
        first["events"][0],
        serde_json::json!({
            "event_name": "api_calls",
            "identifier": "k.000",
            "timestamp": t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "payload": {"stripe_customer_id": "cus_S", "value": "3", "region": "eu west/1"},
        })
    );
    assert_eq!(stripe.sessions_created(), 1);
    assert_eq!(stripe.counts().len(), 250);
    assert!(stripe.counts().values().all(|&n| n == 1));
    assert_eq!(stripe.total("cus_S", "api_calls"), Some(Decimal::from(750)));
    let auth = stripe.requests();
    assert!(auth
        .iter()
        .filter(|r| r.route.contains("meter_event_stream"))
        .all(|r| r.authorization.as_deref() == Some("Bearer mes_tok_sim_1")));
}

/// A stream request of several events refused as a whole is resent event by event. If the sink
/// is stopped part-way through (here a 403: the key may no longer write), the stop carries the
/// events Stripe already took one by one as delivered, as v1 does mid-batch: left pending, they
/// would go out again on a later run and, once Stripe's 24 h identifier window has passed,
/// be billed twice. The others stay pending, and the sink is stopped (it used to go on to the
/// next batch once something of this one had been delivered).
#[tokio::test]
async fn the_stream_reports_events_taken_one_by_one_before_a_stop() {
    let stripe = sim().await;
    let s = stream_sink(&stripe);
    let t = ago(chrono::Duration::hours(5));
    let b = batch(
        &s,
        &[
            ("k.1", event("cus_S", "1", t)),
            ("k.2", event("cus_S", "2", t)),
        ],
    );
    stripe.fail_next(1, 400); // the request of both: refused as a whole
    stripe.pass_next(1); // k.1 alone: taken
    stripe.fail_next(1, 403); // k.2 alone: the key may no longer write
    let stop = s.deliver(&b).await.expect_err("a 403 stops the sink");
    assert!(stop.message.contains("403"), "{stop}");
    assert_eq!(
        stop.settled,
        vec![(0, Outcome::Delivered)],
        "k.1 reached Stripe: its outcome goes with the stop; k.2 stays pending"
    );
    assert_eq!(stripe.count("k.1"), 1);
    assert_eq!(stripe.count("k.2"), 0);
}

#[tokio::test]
async fn the_stream_renews_an_expired_session_and_resends() {
    let stripe = sim().await;
    let s = stream_sink(&stripe);
    let t = ago(chrono::Duration::hours(5));
    let b = batch(&s, &[("k.1", event("cus_S", "1", t))]);
    assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered]);
    stripe.expire_sessions();
    let b2 = batch(&s, &[("k.2", event("cus_S", "2", t))]);
    assert_eq!(s.deliver(&b2).await.unwrap(), vec![Outcome::Delivered]);
    assert_eq!(stripe.sessions_created(), 2);
    // The refused request and its resend carried the same events.
    let bodies = stripe.bodies();
    assert_eq!(bodies.len(), 3);
    assert_eq!(bodies[1], bodies[2]);
    assert_eq!(stripe.count("k.2"), 1);
    // A transient failure on the stream is retried with the same events.
    stripe.fail_next(1, 503);
    let b3 = batch(&s, &[("k.3", event("cus_S", "4", t))]);
    assert_eq!(s.deliver(&b3).await.unwrap(), vec![Outcome::Delivered]);
    assert_eq!(stripe.total("cus_S", "api_calls"), Some(Decimal::from(7)));
}

#[tokio::test]
async fn the_stream_renews_a_session_about_to_expire() {
    let stripe = StripeSim::start(StripeSimConfig {
        session_ttl: Duration::from_secs(30),
        ..StripeSimConfig::default()
    })
    .await
    .unwrap();
    let s = stream_sink(&stripe);
    let t = ago(chrono::Duration::hours(5));
    for i in 0..3 {
        let k = format!("k.{i}");
        let b = batch(&s, &[(k.as_str(), event("cus_S", "1", t))]);
        assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered]);
    }
    // Each token had less than the renewal margin left: a new session every time, and no
    // request was refused for an expired token.
    assert_eq!(stripe.sessions_created(), 3);
    assert_eq!(stripe.request_count(), 3);
}

#[test]
fn the_configuration_reads_from_yaml_with_defaults() {
    std::env::set_var("BILLSYNC_TEST_STRIPE_KEY", "sk_test_from_env");
    let c: StripeConfig = serde_yaml_ng::from_str(
        "api_key: env:BILLSYNC_TEST_STRIPE_KEY\nmode: v2_stream\nmax_age: 30d\n",
    )
    .unwrap();
    assert_eq!(c.api_url, "https://api.stripe.com");
    assert_eq!(c.meter_events_url, "https://meter-events.stripe.com");
    assert_eq!(c.mode, StripeMode::V2Stream);
    assert_eq!(c.max_age, Duration::from_secs(30 * 86_400));
    assert_eq!(c.max_future, Duration::from_secs(300));
    assert_eq!(c.value_property, "value");
    assert!(serde_yaml_ng::from_str::<StripeConfig>(
        "api_key: env:BILLSYNC_TEST_STRIPE_KEY\nbatch_size: 10\n"
    )
    .is_err());
    let mut bad = config("http://127.0.0.1:1", fast_retry(0));
    bad.api_key = Secret::new("pk_test_x");
    assert!(StripeSink::new("s".into(), bad).is_err());
}

/// A record for the status warning: `age` old, waiting for sink `sink` with `status`.
fn waiting(
    resource: &str,
    sink: &str,
    status: billsync::ledger::Status,
    age: chrono::Duration,
) -> billsync::ledger::StageRow {
    let start = ago(age);
    let record = billsync::record::UsageRecord {
        provider: "metalsoft".into(),
        source: "ms".into(),
        billing_account_id: "acct".into(),
        sub_account_id: "1".into(),
        resource_id: resource.into(),
        resource_name: None,
        resource_type: "instance".into(),
        service_name: "instance".into(),
        sku_id: None,
        charge_description: None,
        charge_period_start: start,
        charge_period_end: start + chrono::Duration::hours(1),
        consumed_quantity: Decimal::from(3600),
        consumed_unit: "seconds".into(),
        billed_cost: Decimal::ONE,
        billing_currency: "EUR".into(),
        scope: "1".into(),
        natural_key: vec![("resource".into(), resource.into())],
        is_final: status == billsync::ledger::Status::Pending,
        attributes: Default::default(),
        raw: Default::default(),
    };
    billsync::ledger::StageRow {
        key: record.idempotency_key(),
        content_hash: record.content_hash(),
        match_hash: record.match_hash(),
        status,
        mapped: billsync::ledger::MappedColumns {
            rule: Some("test#rule".into()),
            sink: Some(sink.into()),
            subscription: Some("cus_A".into()),
            metric: Some("api_calls".into()),
            value: Some(Decimal::ONE),
            payload: Some("frozen".into()),
            ..Default::default()
        },
        note: None,
        event: None,
        correction_of: None,
        revision: 0,
        body: None,
        record,
    }
}

#[tokio::test]
async fn status_warns_about_waiting_records_near_the_35_day_limit() {
    use billsync::ledger::{Correction, Ledger, SentState, Status};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let cfg = dir.path().join("billsync.yaml");
    std::fs::write(
        &cfg,
        format!(
            "ledger:\n  path: {}\nmappings: []\nsinks:\n  stripe:\n    kind: stripe\n    api_key: env:TEST_STRIPE_KEY\n  archive:\n    kind: jsonl\n    directory: {}\ndefault_sink: stripe\n",
            db.display(),
            dir.path().join("jsonl").display()
        ),
    )
    .unwrap();
    let status = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_billsync"))
            .args(["--output", "text", "--config"])
            .arg(&cfg)
            .arg("status")
            .env_remove("BILLSYNC_CONFIG")
            // `status` only reads the ledger: it needs no secret, the Stripe key included.
            .env_remove("TEST_STRIPE_KEY")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let day = chrono::Duration::days(1);
    let by_hand = |_: &billsync::ledger::StageRow, s: &SentState| {
        Correction::Unresolved(format!("{} changed", s.key))
    };
    let ledger = Ledger::open(&db).await.unwrap();
    let run = ledger.start_run("sync", Utc::now()).await.unwrap();
    // Young records only: no warning.
    let young = [
        waiting("a", "stripe", Status::Pending, day * 10),
        waiting("b", "stripe", Status::Pending, day * 29),
    ];
    ledger
        .stage(run, &young, None, Utc::now(), &by_hand)
        .await
        .unwrap();
    ledger.close().await;
    let out = status();
    assert!(!out.contains("warning"), "{out}");

    // Near the limit: two pending (31 and 33 days) and one provisional (32 days) of the Stripe
    // sink; an equally old record of another sink does not count.
    let ledger = Ledger::open(&db).await.unwrap();
    let old = [
        waiting("c", "stripe", Status::Pending, day * 31),
        waiting("d", "stripe", Status::Pending, day * 33),
        waiting("e", "stripe", Status::Provisional, day * 32),
        waiting("f", "archive", Status::Pending, day * 34),
    ];
    let oldest = old[1].key.clone();
    ledger
        .stage(run, &old, None, Utc::now(), &by_hand)
        .await
        .unwrap();
    // A record sent already no longer waits.
    let sent = ledger.pending_batch("stripe", 0, 100).await.unwrap();
    let c = sent.iter().find(|o| o.key == old[0].key).unwrap().id;
    ledger
        .ack(run, &[(c, Outcome::Delivered)], Utc::now())
        .await
        .unwrap();
    ledger.close().await;
    let out = status();
    let warning = out
        .lines()
        .find(|l| l.starts_with("warning: Stripe sink stripe:"))
        .unwrap_or_else(|| panic!("no warning:\n{out}"));
    assert!(
        warning.contains(": 2 waiting records (pending or provisional) are older than 30 days;"),
        "{warning}"
    );
    assert!(
        warning.contains("Stripe refuses events older than 35 days;"),
        "{warning}"
    );
    assert!(
        warning.contains(&format!("oldest: {oldest} (charge period start ")),
        "{warning}"
    );
    assert!(warning.contains(", 33 days old)"), "{warning}");
    assert_eq!(out.matches("warning").count(), 1, "{out}");
}

/// Stripe answers an unknown URL with 404 *and* its error envelope ("Unrecognized request URL"),
/// e.g. with api_url `https://api.stripe.com/api`: the address is wrong, not the records, so
/// the sink stops (naming api_url) and they stay pending.
#[tokio::test]
async fn an_unrecognized_url_stops_the_sink_instead_of_rejecting_records() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(404).set_body_string(
            r#"{"error":{"message":"Unrecognized request URL (POST: /api/v1/billing/meter_events). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.","type":"invalid_request_error"}}"#,
        ))
        .mount(&server)
        .await;
    let s = sink(&server.uri(), fast_retry(1));
    let b = batch(
        &s,
        &[
            ("k.1", event("cus_A", "1", ago(chrono::Duration::hours(1)))),
            ("k.2", event("cus_B", "2", ago(chrono::Duration::hours(1)))),
        ],
    );
    let stop = s.deliver(&b).await.expect_err("a wrong URL stops the sink");
    assert!(stop.message.contains("check api_url"), "{stop}");
}

/// A 2xx that is not Stripe's meter event for the record (an egress proxy's page, a wrong host
/// answering 200) is no proof that Stripe took it: the records stay pending (failed), to be
/// resent with the same keys, instead of being recorded as sent and never billed. Stripe's own
/// answer, for another identifier, is no proof either.
#[tokio::test]
async fn a_2xx_that_is_not_stripes_meter_event_keeps_the_records_pending() {
    use wiremock::matchers::{body_string_contains, method};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("identifier=k.2"))
        .respond_with(ResponseTemplate::new(200).set_body_string(
            r#"{"object":"billing.meter_event","created":1,"event_name":"api_requests","identifier":"k.other","livemode":false,"payload":{},"timestamp":1}"#,
        ))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("identifier=k.3"))
        .respond_with(ResponseTemplate::new(200).set_body_string(
            r#"{"object":"billing.meter_event","created":1,"event_name":"api_requests","identifier":"k.3","livemode":false,"payload":{},"timestamp":1}"#,
        ))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_string("<html><body>Access policy: allowed</body></html>"),
        )
        .mount(&server)
        .await;
    let s = sink(&server.uri(), fast_retry(1));
    let b = batch(
        &s,
        &[
            ("k.1", event("cus_A", "1", ago(chrono::Duration::hours(1)))),
            ("k.2", event("cus_B", "2", ago(chrono::Duration::hours(1)))),
            ("k.3", event("cus_C", "3", ago(chrono::Duration::hours(1)))),
        ],
    );
    let outcomes = s.deliver(&b).await.unwrap();
    // Unclear: whatever answered may have passed the request on to Stripe.
    assert!(
        matches!(&outcomes[0], Outcome::Unclear(r) if r.contains("not Stripe's meter event")),
        "{outcomes:?}"
    );
    assert!(matches!(&outcomes[1], Outcome::Unclear(_)), "{outcomes:?}");
    assert_eq!(outcomes[2], Outcome::Delivered, "{outcomes:?}");
}

/// A bad `api_version` (a setting) makes Stripe answer every request 400
/// `invalid_request_error` "Invalid Stripe API version": the sink stops (naming api_version)
/// and the records stay pending.
#[tokio::test]
async fn an_invalid_api_version_stops_the_sink_instead_of_rejecting_records() {
    use wiremock::matchers::{header, method};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("Stripe-Version", "2026-13-45"))
        .respond_with(ResponseTemplate::new(400).set_body_string(
            r#"{"error":{"message":"Invalid Stripe API version: 2026-13-45","type":"invalid_request_error"}}"#,
        ))
        .mount(&server)
        .await;
    let mut c = config(&server.uri(), fast_retry(1));
    c.api_version = Some("2026-13-45".into());
    let s = StripeSink::new("stripe-test".into(), c).unwrap();
    let b = batch(
        &s,
        &[
            ("k.1", event("cus_A", "1", ago(chrono::Duration::hours(1)))),
            ("k.2", event("cus_B", "2", ago(chrono::Duration::hours(1)))),
        ],
    );
    let stop = s
        .deliver(&b)
        .await
        .expect_err("a bad api_version stops the sink");
    assert!(stop.message.contains("check api_version"), "{stop}");
}

// --- read-back: meters and event summaries --------------------------------------------------

/// GET `path` on the simulator with the secret key: status and JSON.
async fn sim_get(stripe: &StripeSimHandle, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", stripe.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The simulator counts what it accepted as Stripe's meters would, over Stripe's windows and
/// pages, and refuses what Stripe refuses.
#[tokio::test]
async fn the_simulator_serves_meters_and_summaries_with_stripes_pagination_and_errors() {
    use billsync::simulators::stripe::SimMeter;
    let stripe = StripeSim::start(StripeSimConfig {
        auto_meters: false,
        ..Default::default()
    })
    .await
    .unwrap();
    stripe.add_meter(SimMeter::sum("mtr_1", "api_calls"));
    stripe.add_meter(SimMeter::sum("mtr_2", "storage"));
    let s = sink(&stripe.url, fast_retry(0));
    // Two hours on hour boundaries, an hour ago at most.
    let hour = (Utc::now().timestamp() / 3600 - 2) * 3600;
    let at = |secs: i64| Utc.timestamp_opt(hour + secs, 0).single().unwrap();
    let b = batch(
        &s,
        &[
            ("k1", event("cus_A", "5", at(10))),
            ("k2", event("cus_A", "7", at(3_600 + 5))),
            ("k3", event("cus_B", "100", at(20))),
        ],
    );
    assert!(s
        .deliver(&b)
        .await
        .unwrap()
        .iter()
        .all(|o| *o == Outcome::Delivered));

    // Meters: newest first, paged by starting_after.
    let (code, page) = sim_get(&stripe, "/v1/billing/meters?limit=1").await;
    assert_eq!(code, 200);
    assert_eq!(page["data"][0]["id"], "mtr_2");
    assert_eq!(page["has_more"], true);
    let (_, page) = sim_get(&stripe, "/v1/billing/meters?limit=1&starting_after=mtr_2").await;
    assert_eq!(page["data"][0]["id"], "mtr_1");
    assert_eq!(page["data"][0]["default_aggregation"]["formula"], "sum");
    assert_eq!(page["has_more"], false);

    // One summary for the whole range, per customer, end exclusive.
    let (start, end) = (hour, hour + 7_200);
    let q = |extra: &str| {
        format!("/v1/billing/meters/mtr_1/event_summaries?customer=cus_A&start_time={start}&end_time={end}{extra}")
    };
    let (code, page) = sim_get(&stripe, &q("")).await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["data"][0]["aggregated_value"].to_string(), "12");
    assert_eq!(page["data"][0]["object"], "billing.meter_event_summary");
    // Per hour, paged.
    let (_, page) = sim_get(&stripe, &q("&value_grouping_window=hour&limit=1")).await;
    assert_eq!(page["data"][0]["aggregated_value"].to_string(), "5");
    assert_eq!(page["has_more"], true);
    let after = page["data"][0]["id"].as_str().unwrap().to_string();
    let (_, page) = sim_get(
        &stripe,
        &q(&format!(
            "&value_grouping_window=hour&limit=1&starting_after={after}"
        )),
    )
    .await;
    assert_eq!(page["data"][0]["aggregated_value"].to_string(), "7");
    assert_eq!(page["has_more"], false);

    // Stripe's refusals: off a minute boundary, off the hour with hourly grouping, a missing
    // customer, an unknown meter.
    let off = format!(
        "/v1/billing/meters/mtr_1/event_summaries?customer=cus_A&start_time={}&end_time={end}",
        start + 30
    );
    let (code, e) = sim_get(&stripe, &off).await;
    assert_eq!(code, 400);
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["param"], "start_time");
    let off_hour = format!(
        "/v1/billing/meters/mtr_1/event_summaries?customer=cus_A&start_time={start}&end_time={}&value_grouping_window=hour",
        end - 60
    );
    assert_eq!(sim_get(&stripe, &off_hour).await.0, 400);
    let (code, e) = sim_get(
        &stripe,
        &format!("/v1/billing/meters/mtr_1/event_summaries?start_time={start}&end_time={end}"),
    )
    .await;
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (400, Some("parameter_missing"))
    );
    let (code, e) = sim_get(
        &stripe,
        &format!(
            "/v1/billing/meters/mtr_9/event_summaries?customer=cus_A&start_time={start}&end_time={end}"
        ),
    )
    .await;
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (404, Some("resource_missing"))
    );
}

/// The sink's read-back: the meter found over several pages, the customer's summary read
/// exactly; a window Stripe would refuse, or a meter that does not sum what the sink sends,
/// is an error, not a number that cannot be compared.
#[tokio::test]
async fn read_back_sums_the_customers_meter_and_refuses_what_cannot_be_compared() {
    use billsync::simulators::stripe::SimMeter;
    use billsync::sinks::ReadBackQuery;
    let stripe = StripeSim::start(StripeSimConfig {
        auto_meters: false,
        ..Default::default()
    })
    .await
    .unwrap();
    // 150 meters: the one read back is on the second page.
    stripe.add_meter(SimMeter::sum("mtr_api", "api_calls"));
    for i in 0..149 {
        stripe.add_meter(SimMeter::sum(format!("mtr_{i}"), format!("other_{i}")));
    }
    let mut counted = SimMeter::sum("mtr_count", "requests");
    counted.formula = "count".into();
    stripe.add_meter(counted);
    let s = sink(&stripe.url, fast_retry(0));
    let t = ago(chrono::Duration::hours(1));
    let b = batch(
        &s,
        &[
            ("k1", event("cus_A", "9007199254740993", t)),
            ("k2", event("cus_A", "2", t)),
        ],
    );
    s.deliver(&b).await.unwrap();
    let from = Utc
        .timestamp_opt((t.timestamp() / 60 - 5) * 60, 0)
        .single()
        .unwrap();
    let query = |metric: &str, from: DateTime<Utc>| ReadBackQuery {
        subscription: "cus_A".into(),
        metric: metric.into(),
        from,
        to: from + chrono::Duration::hours(2),
    };
    let total = s
        .read_back_total(&query("api_calls", from))
        .await
        .unwrap()
        .expect("Stripe is read back as a total");
    // 2^53 + 1 + 2, odd: exact only if the JSON number never went through f64.
    assert_eq!(total.total, Decimal::from_str("9007199254740995").unwrap());
    assert!(total.source.contains("mtr_api"), "{}", total.source);
    let meter_pages = stripe
        .requests()
        .iter()
        .filter(|r| r.route == "GET /v1/billing/meters")
        .count();
    assert_eq!(meter_pages, 2);

    let before = stripe.requests().len();
    let err = s
        .read_back_total(&query("api_calls", from + chrono::Duration::seconds(30)))
        .await
        .unwrap_err();
    assert!(err.contains("minute boundaries"), "{err}");
    assert_eq!(stripe.requests().len(), before, "refused without a request");

    let err = s
        .read_back_total(&query("requests", from))
        .await
        .unwrap_err();
    assert!(
        err.contains("mtr_count") && err.contains("\"count\""),
        "{err}"
    );
}
