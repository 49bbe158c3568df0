//! The Lago sink against wiremock (exact bytes, scripted answers) and against the Lago
//! simulator (real idempotency semantics of both event stores).

#[path = "common/lago.rs"]
mod lago_common;

use std::str::FromStr;
use std::time::{Duration, Instant};

use billsync::http::RetryPolicy;
use billsync::simulators::lago::{Behaviour, DropMode, LagoSim, LagoSimConfig, LagoSimHandle};
use billsync::sinks::lago::{LagoConfig, LagoSink};
use billsync::sinks::{Outcome, Sink};
use chrono::TimeZone;
use lago_common::*;
use rust_decimal::Decimal;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn sim(behaviour: Behaviour) -> LagoSimHandle {
    LagoSim::start(LagoSimConfig {
        api_key: KEY.into(),
        behaviour,
        read_only_api_key: Some("read-only-key".into()),
        ..LagoSimConfig::default()
    })
    .await
    .expect("simulator starts")
}

fn four_events(s: &LagoSink) -> Vec<billsync::sinks::Outgoing> {
    batch(
        s,
        &[
            ("k0", event("sub-1", "0.012846", at(1_710_000_000))),
            ("k1", event("sub-1", "1.5", at(1_710_003_600))),
            ("k2", event("sub-1", "2", at(1_710_007_200))),
            (
                "k3",
                event("sub-2", "123456789012.000001", at(1_710_000_000)),
            ),
        ],
    )
}

/// A fake Lago answering the first request with `first` and every later one with `then`.
async fn answering_first(first: ResponseTemplate, then: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(first)
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(then)
        .mount(&server)
        .await;
    server
}

async fn bodies(server: &MockServer) -> Vec<String> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| String::from_utf8(r.body.clone()).expect("utf-8 body"))
        .collect()
}

#[test]
fn encode_is_frozen_exact_json() {
    let s = sink("http://127.0.0.1:1", fast_retry(0));
    let mut e = event("sub-\"1\"", "1.500", at(1_710_421_740));
    e.properties.insert("a_first".into(), "x".into());
    assert_eq!(
        s.encode("tx-1", &e).unwrap(),
        r#"{"transaction_id":"tx-1","external_subscription_id":"sub-\"1\"","code":"storage","timestamp":1710421740,"properties":{"gb":"1.5","a_first":"x","region":"eu-west"}}"#
    );
    // Sub-second: a string "secs.millis"; big and tiny decimals without exponent.
    let t = chrono::Utc.timestamp_opt(1_710_421_740, 5_000_000).unwrap();
    let e = event("sub-1", "79228162514264337593543950335", t);
    assert_eq!(
        s.encode("tx-2", &e).unwrap(),
        r#"{"transaction_id":"tx-2","external_subscription_id":"sub-1","code":"storage","timestamp":"1710421740.005","properties":{"gb":"79228162514264337593543950335","region":"eu-west"}}"#
    );
    let e = event("sub-1", "0.0000000000000000000000000001", at(0));
    assert!(s
        .encode("tx-3", &e)
        .unwrap()
        .contains(r#""gb":"0.0000000000000000000000000001""#));
    let e = event("sub-1", "-0.000", at(0));
    assert!(s.encode("tx-4", &e).unwrap().contains(r#""gb":"0""#));
    // Deterministic: the same input gives the same bytes.
    assert_eq!(s.encode("tx-4", &e).unwrap(), s.encode("tx-4", &e).unwrap());
    // Refused: empty subscription, property collision, empty key.
    assert!(s.encode("tx-5", &event("", "1", at(0))).is_err());
    let mut e = event("sub-1", "1", at(0));
    e.properties.insert("gb".into(), "2".into());
    assert!(s.encode("tx-6", &e).is_err());
    assert!(s.encode("", &event("sub-1", "1", at(0))).is_err());
}

/// Lago keeps events in Postgres, which cannot store the NUL character: a request carrying one
/// is answered 500 as a whole, at every retry and every run, and the events batched beside it
/// would never be delivered. Such an event is refused when it is encoded (the record is held
/// in the ledger with the reason), wherever the character is; the others go out.
#[test]
fn an_event_with_a_nul_character_is_refused_at_encoding() {
    let s = sink("http://127.0.0.1:1", fast_retry(0));
    let mut e = event("sub-1", "1", at(0));
    e.properties.insert("region".into(), "eu\0west".into());
    let refused = s.encode("tx-1", &e).expect_err("a NUL in a property value");
    assert!(
        refused.message.contains("region holds a NUL"),
        "{refused:?}"
    );
    let mut e = event("sub-1", "1", at(0));
    e.properties.insert("ra\0ck".into(), "a".into());
    assert!(s.encode("tx-2", &e).is_err(), "in a property name");
    assert!(s.encode("tx-3", &event("sub\0", "1", at(0))).is_err());
    assert!(s.encode("tx-\0", &event("sub-1", "1", at(0))).is_err());
    assert!(s.encode("tx-5", &event("sub-1", "1", at(0))).is_ok());
}

#[test]
fn config_is_validated() {
    let cfg = |url: &str, batch_size: usize| LagoConfig {
        api_url: url.into(),
        api_key: billsync::config::Secret::new("k"),
        batch_size,
        timeout: Duration::from_secs(1),
        retry: RetryPolicy::default(),
    };
    assert!(LagoSink::new("l".into(), cfg("https://api.getlago.com", 0)).is_err());
    assert!(LagoSink::new("l".into(), cfg("https://api.getlago.com", 101)).is_err());
    assert!(LagoSink::new("l".into(), cfg("https://api.getlago.com/api/v1", 100)).is_err());
    assert!(LagoSink::new("l".into(), cfg("ftp://x", 100)).is_err());
    let s = LagoSink::new("l".into(), cfg("https://api.getlago.com/", 50)).unwrap();
    assert_eq!(s.endpoint(), "https://api.getlago.com/api/v1/events/batch");
    assert_eq!(s.max_batch(), 50);
    assert_eq!(s.kind(), "lago");

    std::env::set_var("BILLSYNC_TEST_LAGO_KEY_CFG", "secret-value");
    let parsed: LagoConfig = serde_yaml_ng::from_str(
        "api_url: https://api.getlago.com\napi_key: env:BILLSYNC_TEST_LAGO_KEY_CFG\ntimeout: 5s\n",
    )
    .unwrap();
    assert_eq!(parsed.batch_size, 100);
    assert_eq!(parsed.timeout, Duration::from_secs(5));
    assert_eq!(parsed.retry, RetryPolicy::default());
    assert!(!format!("{parsed:?}").contains("secret-value"));
    let unknown = serde_yaml_ng::from_str::<LagoConfig>(
        "api_url: x\napi_key: env:BILLSYNC_TEST_LAGO_KEY_CFG\nbatchsize: 5\n",
    );
    assert!(unknown.is_err());
}

#[tokio::test]
async fn delivers_on_200_with_exact_body_and_bearer() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/events/batch"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"events":[{},{},{},{}]}"#))
        .expect(1)
        .mount(&server)
        .await;
    let s = sink(&server.uri(), fast_retry(2));
    let b = four_events(&s);
    let out = s.deliver(&b).await.unwrap();
    assert_eq!(out, vec![Outcome::Delivered; 4]);
    assert_eq!(
        bodies(&server).await,
        vec![body_of(&b.iter().collect::<Vec<_>>())]
    );
}

/// A 2xx answer is proof of delivery only when it is Lago's (an object with an `events` array):
/// a proxy's page or another service's JSON leaves the records failed (pending for the next
/// run, which resends them safely), never delivered.
#[tokio::test]
async fn a_2xx_that_is_not_lagos_answer_is_not_delivery() {
    /// The outcomes of delivering four events to a server that answers 200 with `body`.
    async fn outcomes_of(body: &str) -> Vec<Outcome> {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string(body))
            .mount(&server)
            .await;
        let s = sink(&server.uri(), fast_retry(0));
        s.deliver(&four_events(&s)).await.unwrap()
    }
    for body in [
        "<html>gateway</html>",
        r#"{"ok":true}"#,
        r#"{"events":3}"#,
        r#"{"events":{"0":{}}}"#,
        r#"[{"events":[]}]"#,
        r#"[[{},{},{},{}]]"#,
        "",
    ] {
        let out = outcomes_of(body).await;
        assert!(
            out.iter().all(
                |o| matches!(o, Outcome::Failed(r) if r.contains("not a Lago events response"))
            ),
            "{body}: {out:?}"
        );
    }
    // Lago's answer, whatever the events echoed look like.
    for body in [
        r#"{"events":[]}"#,
        r#" {"events":[{"lago_id":"x","properties":{"a":[1,{"b":null}]}}],"meta":{}}"#,
    ] {
        assert_eq!(
            outcomes_of(body).await,
            vec![Outcome::Delivered; 4],
            "{body}"
        );
    }
}

#[tokio::test]
async fn rate_limited_waits_for_retry_after_and_resends_same_bytes() {
    let server = answering_first(
        ResponseTemplate::new(429).insert_header("Retry-After", "1"),
        ResponseTemplate::new(200).set_body_string(r#"{"events":[]}"#),
    )
    .await;
    let retry = RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_secs(5),
    };
    let s = sink(&server.uri(), retry);
    let b = four_events(&s);
    let started = Instant::now();
    let out = s.deliver(&b).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After ignored"
    );
    assert_eq!(out, vec![Outcome::Delivered; 4]);
    let sent = bodies(&server).await;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], sent[1]);
}

#[tokio::test]
async fn server_errors_are_retried_with_identical_bodies() {
    let lago = sim(Behaviour::Postgres).await;
    lago.fail_next(1, 500);
    lago.fail_next(1, 503);
    lago.rate_limit_next(1, None);
    let s = sink(&lago.url, fast_retry(5));
    let b = four_events(&s);
    assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered; 4]);
    let sent = lago.bodies();
    assert_eq!(sent.len(), 4);
    assert!(sent.iter().all(|x| *x == sent[0]));
    assert_eq!(sent[0], body_of(&b.iter().collect::<Vec<_>>()));
    assert_eq!(lago.events().len(), 4);
}

#[tokio::test]
async fn exhausted_retries_fail_every_record() {
    let lago = sim(Behaviour::Postgres).await;
    lago.fail_next(10, 502);
    let s = sink(&lago.url, fast_retry(2));
    let out = s.deliver(&four_events(&s)).await.unwrap();
    // Three attempts, then the run's one probe for a poison event: the two halves, one
    // attempt each, failing too (see sink_lago_poison.rs).
    assert_eq!(lago.request_count(), 3 + 2);
    for o in out {
        match o {
            Outcome::Failed(reason) => assert!(reason.contains("502"), "{reason}"),
            other => panic!("expected Failed, got {other:?}"),
        }
    }
    assert!(lago.events().is_empty());
}

#[tokio::test]
async fn transport_errors_are_failed_not_lost() {
    // Nothing listens on this port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let s = sink(&url, fast_retry(1));
    let out = s.deliver(&four_events(&s)).await.unwrap();
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Failed(_))),
        "{out:?}"
    );
}

#[tokio::test]
async fn timeouts_are_retried() {
    let lago = sim(Behaviour::Postgres).await;
    lago.set_delay(Duration::from_millis(400));
    let s = sink_with(&lago.url, KEY, fast_retry(1), Duration::from_millis(100));
    let out = s.deliver(&four_events(&s)).await.unwrap();
    for o in &out {
        match o {
            Outcome::Failed(reason) => assert!(reason.contains("timeout"), "{reason}"),
            other => panic!("expected Failed, got {other:?}"),
        }
    }
    assert_eq!(lago.request_count(), 2);
}

#[tokio::test]
async fn unauthorized_stops_the_sink_after_one_request() {
    let lago = sim(Behaviour::Postgres).await;
    let s = sink_with(
        &lago.url,
        "zz-bad-key-77",
        fast_retry(5),
        Duration::from_secs(2),
    );
    let err = s.deliver(&four_events(&s)).await.unwrap_err();
    assert!(err.message.contains("401"), "{err}");
    assert!(
        !err.to_string().contains("zz-bad-key-77"),
        "the key must not leak: {err}"
    );
    assert_eq!(lago.request_count(), 1);
}

#[tokio::test]
async fn forbidden_stops_the_sink_with_lago_code() {
    let lago = sim(Behaviour::Postgres).await;
    let s = sink_with(
        &lago.url,
        "read-only-key",
        fast_retry(5),
        Duration::from_secs(2),
    );
    let err = s.deliver(&four_events(&s)).await.unwrap_err();
    assert!(
        err.message.contains("write_action_not_allowed_for_event"),
        "{err}"
    );
    assert_eq!(lago.request_count(), 1);
}

#[tokio::test]
async fn split_422_by_index_and_resend_remainder() {
    let server = answering_first(ResponseTemplate::new(422).set_body_string(
            r#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"0":{"transaction_id":["value_already_exist"]},"2":{"properties":["invalid_value"]}}}"#,
        ), ResponseTemplate::new(200).set_body_string(r#"{"events":[{},{}]}"#)).await;
    let s = sink(&server.uri(), fast_retry(2));
    let b = four_events(&s);
    let out = s.deliver(&b).await.unwrap();
    assert_eq!(out[0], Outcome::AlreadyDelivered);
    assert_eq!(out[1], Outcome::Delivered);
    assert!(
        matches!(&out[2], Outcome::Rejected(r) if r.contains("properties: invalid_value")),
        "{:?}",
        out[2]
    );
    assert_eq!(out[3], Outcome::Delivered);
    let sent = bodies(&server).await;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], body_of(&b.iter().collect::<Vec<_>>()));
    assert_eq!(sent[1], body_of(&[&b[1], &b[3]]));
}

/// Outcomes an earlier request of the same call settled go with a stop on a later one, by
/// position in the batch; the records not settled stay pending. Here a 422 by index settles
/// events 0 and 2, and the resend of 1 and 3 is answered 401.
#[tokio::test]
async fn a_stop_on_the_resend_after_a_422_by_index_carries_what_the_422_settled() {
    let server = answering_first(ResponseTemplate::new(422).set_body_string(
            r#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"0":{"transaction_id":["value_already_exist"]},"2":{"properties":["invalid_value"]}}}"#,
        ), ResponseTemplate::new(401)
                .set_body_string(r#"{"status":401,"error":"Unauthorized","code":"unauthorized"}"#),).await;
    let s = sink(&server.uri(), fast_retry(2));
    let b = four_events(&s);
    let stop = s.deliver(&b).await.expect_err("a 401 stops the sink");
    assert!(stop.message.contains("401"), "{stop}");
    assert_eq!(stop.settled.len(), 2, "{:?}", stop.settled);
    assert_eq!(stop.settled[0], (0, Outcome::AlreadyDelivered));
    assert!(
        matches!(&stop.settled[1], (2, Outcome::Rejected(r)) if r.contains("invalid_value")),
        "{:?}",
        stop.settled
    );
    let sent = bodies(&server).await;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1], body_of(&[&b[1], &b[3]]));
}

/// A key repeated in one call goes in a later request; if that one stops the sink, the records
/// the first request delivered go with the stop.
#[tokio::test]
async fn a_stop_on_a_later_request_carries_what_the_first_delivered() {
    let server = answering_first(
        ResponseTemplate::new(200).set_body_string(r#"{"events":[{},{}]}"#),
        ResponseTemplate::new(403)
            .set_body_string(r#"{"status":403,"error":"Forbidden","code":"forbidden"}"#),
    )
    .await;
    let s = sink(&server.uri(), fast_retry(2));
    let b = batch(
        &s,
        &[
            ("k0", event("sub-1", "1", at(1_710_000_000))),
            ("k1", event("sub-1", "2", at(1_710_000_000))),
            ("k0", event("sub-1", "1", at(1_710_000_000))),
        ],
    );
    let stop = s.deliver(&b).await.expect_err("a 403 stops the sink");
    assert_eq!(
        stop.settled,
        vec![(0, Outcome::Delivered), (1, Outcome::Delivered)]
    );
}

#[tokio::test]
async fn split_422_against_the_simulator() {
    let lago = sim(Behaviour::Postgres).await;
    let s = sink(&lago.url, fast_retry(2));
    let b = four_events(&s);
    // k0 already stored by an earlier run; k2 refused by Lago.
    assert_eq!(s.deliver(&b[..1]).await.unwrap(), vec![Outcome::Delivered]);
    lago.reject_transaction("k2");
    let out = s.deliver(&b).await.unwrap();
    assert_eq!(out[0], Outcome::AlreadyDelivered);
    assert_eq!(out[1], Outcome::Delivered);
    assert!(matches!(&out[2], Outcome::Rejected(_)));
    assert_eq!(out[3], Outcome::Delivered);
    let counts = lago.counts();
    assert_eq!(counts.get("k0"), Some(&1));
    assert_eq!(counts.get("k1"), Some(&1));
    assert_eq!(counts.get("k2"), None);
    assert_eq!(counts.get("k3"), Some(&1));
}

#[tokio::test]
async fn whole_request_422_and_other_permanent_errors() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(422).set_body_string(
            r#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":"expression failed"}"#,
        ))
        .mount(&server)
        .await;
    let s = sink(&server.uri(), fast_retry(2));
    let out = s.deliver(&four_events(&s)).await.unwrap();
    assert!(
        out.iter()
            .all(|o| matches!(o, Outcome::Rejected(r) if r.contains("expression failed"))),
        "{out:?}"
    );
    assert_eq!(bodies(&server).await.len(), 1);

    // A 400 in Lago's format used to reject every record of the batch. lago-api answers 400 on
    // this endpoint only about the request as a whole, never about one of its events: Rails'
    // answer to a body it cannot parse (`{"status":400,"error":"Bad Request"}`) and
    // `Api::BaseController`'s `rescue_from ActionController::ParameterMissing`; a missing or
    // empty `events` is the 422 `no_events` (`Events::CreateBatchService#call`). All of these
    // mean the request was damaged on its way (a proxy, a connector bug), so every batch would
    // meet the same answer and quarantine its records: the sink stops instead, naming Lago's
    // answer, records pending, no retry.
    for (status, answer, named) in [
        (
            400,
            r#"{"status":400,"error":"BadRequest: param is missing or the value is empty: events"}"#,
            "BadRequest: param is missing or the value is empty: events",
        ),
        (
            400,
            r#"{"status":400,"error":"Bad Request"}"#,
            "Bad Request",
        ),
        (
            422,
            r#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"events":["no_events"]}}"#,
            "no_events",
        ),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_string(answer))
            .mount(&server)
            .await;
        let s = sink(&server.uri(), fast_retry(2));
        let stop = s
            .deliver(&four_events(&s))
            .await
            .expect_err("a request Lago could not read stops the sink, no record rejected");
        assert!(stop.message.contains(named), "{stop}");
        assert!(stop.message.contains("records stay pending"), "{stop}");
        assert_eq!(bodies(&server).await.len(), 1, "{answer}: not retried");
    }

    // A server with a lower batch limit: a configuration problem, records stay pending.
    let lago = LagoSim::start(LagoSimConfig {
        api_key: KEY.into(),
        max_batch: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let s = sink(&lago.url, fast_retry(2));
    let err = s.deliver(&four_events(&s)).await.unwrap_err();
    assert!(err.message.contains("too_many_events"), "{err}");

    // A 404 that is not Lago's: a wrong api_url, the sink stops.
    let server = MockServer::start().await;
    let s = sink(&server.uri(), fast_retry(2));
    let err = s.deliver(&four_events(&s)).await.unwrap_err();
    assert!(err.message.contains("404"), "{err}");
}

#[tokio::test]
async fn postgres_same_batch_twice_is_already_delivered() {
    let lago = sim(Behaviour::Postgres).await;
    let s = sink(&lago.url, fast_retry(2));
    let b = four_events(&s);
    assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered; 4]);
    assert_eq!(
        s.deliver(&b).await.unwrap(),
        vec![Outcome::AlreadyDelivered; 4]
    );
    assert!(lago.counts().values().all(|c| *c == 1));
    assert_eq!(lago.events().len(), 4);
    assert_eq!(
        lago.total("sub-1", "storage", "gb"),
        Some(Decimal::from_str("3.512846").unwrap())
    );
    assert_eq!(
        lago.total("sub-2", "storage", "gb"),
        Some(Decimal::from_str("123456789012.000001").unwrap())
    );
}

#[tokio::test]
async fn stored_then_answer_lost_is_stored_once() {
    for mode in [DropMode::Status500, DropMode::CloseConnection] {
        let lago = sim(Behaviour::Postgres).await;
        lago.store_then_drop_next(1, mode);
        let s = sink(&lago.url, fast_retry(3));
        let out = s.deliver(&four_events(&s)).await.unwrap();
        assert_eq!(out, vec![Outcome::AlreadyDelivered; 4], "{mode:?}");
        assert_eq!(lago.request_count(), 2, "{mode:?}");
        assert!(lago.counts().values().all(|c| *c == 1), "{mode:?}");
        assert_eq!(lago.events().len(), 4);
        assert_eq!(
            lago.total("sub-1", "storage", "gb"),
            Some(Decimal::from_str("3.512846").unwrap())
        );
    }
}

#[tokio::test]
async fn repeated_key_in_one_call_goes_in_a_later_request() {
    let lago = sim(Behaviour::Postgres).await;
    let s = sink(&lago.url, fast_retry(2));
    let b = batch(
        &s,
        &[
            ("k0", event("sub-1", "1", at(1_710_000_000))),
            ("k1", event("sub-1", "2", at(1_710_000_000))),
            ("k0", event("sub-1", "1", at(1_710_000_000))),
        ],
    );
    let out = s.deliver(&b).await.unwrap();
    assert_eq!(
        out,
        vec![
            Outcome::Delivered,
            Outcome::Delivered,
            Outcome::AlreadyDelivered
        ]
    );
    let sent = lago.bodies();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], body_of(&[&b[0], &b[1]]));
    assert_eq!(sent[1], body_of(&[&b[2]]));
    assert_eq!(lago.total("sub-1", "storage", "gb"), Some(Decimal::from(3)));
}

#[tokio::test]
async fn clickhouse_bills_a_new_timestamp_twice() {
    // Why the timestamp is frozen in the payload: on the ClickHouse store the same
    // transaction_id with another timestamp is a second billable event.
    let lago = sim(Behaviour::ClickHouse).await;
    let s = sink(&lago.url, fast_retry(2));
    let first = batch(&s, &[("k0", event("sub-1", "1.25", at(1_710_000_000)))]);
    let regenerated = batch(&s, &[("k0", event("sub-1", "1.25", at(1_710_000_060)))]);
    assert_eq!(s.deliver(&first).await.unwrap(), vec![Outcome::Delivered]);
    // Same bytes again: replaced, still billed once (no 422 on this store).
    assert_eq!(s.deliver(&first).await.unwrap(), vec![Outcome::Delivered]);
    assert_eq!(lago.count("k0"), 1);
    assert_eq!(
        lago.total("sub-1", "storage", "gb"),
        Some(Decimal::from_str("1.25").unwrap())
    );
    // Another timestamp: billed twice.
    assert_eq!(
        s.deliver(&regenerated).await.unwrap(),
        vec![Outcome::Delivered]
    );
    assert_eq!(lago.count("k0"), 2);
    assert_eq!(
        lago.total("sub-1", "storage", "gb"),
        Some(Decimal::from_str("2.5").unwrap())
    );
}

#[tokio::test]
async fn simulator_read_back_and_validation() {
    let lago = sim(Behaviour::Postgres).await;
    let s = sink(&lago.url, fast_retry(1));
    let events: Vec<(String, billsync::mapping::MappedEvent)> = (0..25)
        .map(|i| {
            (
                format!("t{i:02}"),
                event("sub-1", "1", at(1_710_000_000 + i * 60)),
            )
        })
        .collect();
    let refs: Vec<(&str, billsync::mapping::MappedEvent)> = events
        .iter()
        .map(|(k, e)| (k.as_str(), e.clone()))
        .collect();
    assert!(s
        .deliver(&batch(&s, &refs))
        .await
        .unwrap()
        .iter()
        .all(|o| *o == Outcome::Delivered));

    let http = reqwest::Client::new();
    let page: serde_json::Value = http
        .get(format!("{}/api/v1/events", lago.url))
        .bearer_auth(KEY)
        .query(&[
            ("external_subscription_id", "sub-1"),
            ("code", "storage"),
            ("page", "2"),
            ("per_page", "10"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 10);
    assert_eq!(page["meta"]["total_count"], 25);
    assert_eq!(page["meta"]["total_pages"], 3);
    assert_eq!(page["meta"]["next_page"], 3);
    assert_eq!(page["meta"]["prev_page"], 1);

    let found = http
        .get(format!("{}/api/v1/events/t03", lago.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(found.status(), 200);
    let found: serde_json::Value = found.json().await.unwrap();
    assert_eq!(found["event"]["timestamp"], "2024-03-09T16:03:00.000Z");
    assert_eq!(found["event"]["properties"]["gb"], "1");
    let missing = http
        .get(format!("{}/api/v1/events/nope", lago.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // Per-index validation and batch limits.
    let post = |body: &'static str| {
        http.post(format!("{}/api/v1/events/batch", lago.url))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = post(r#"{"events":[{"transaction_id":"a","code":"c","external_subscription_id":"s"},{"code":"c","external_subscription_id":"s","timestamp":"soon"}]}"#).await.unwrap();
    assert_eq!(r.status(), 422);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["error_details"]["1"]["transaction_id"][0],
        "value_is_mandatory"
    );
    assert_eq!(v["error_details"]["1"]["timestamp"][0], "invalid_format");
    assert!(v["error_details"].get("0").is_none());
    let r = post(r#"{"events":[]}"#).await.unwrap();
    assert_eq!(r.status(), 422);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error_details"]["events"][0], "no_events");
    let r = http
        .post(format!("{}/api/v1/events/batch", lago.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Duplicate inside one batch: rolled back whole, the repeat reported.
    let r = post(r#"{"events":[{"transaction_id":"d","code":"c","external_subscription_id":"s"},{"transaction_id":"d","code":"c","external_subscription_id":"s"}]}"#).await.unwrap();
    assert_eq!(r.status(), 422);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["error_details"]["1"]["transaction_id"][0],
        "value_already_exist"
    );
    assert_eq!(lago.count("d"), 0);
    // `precise_total_amount_cents` (dynamic pricing) is kept and answered back, as a string.
    let r = post(r#"{"events":[{"transaction_id":"p","code":"c","external_subscription_id":"s","precise_total_amount_cents":"1234.56"}]}"#).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["events"][0]["precise_total_amount_cents"], "1234.56");
    let found: serde_json::Value = http
        .get(format!("{}/api/v1/events/p", lago.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["event"]["precise_total_amount_cents"], "1234.56");
    lago.shutdown().await;
}

/// The simulator answers a batch request Lago cannot read as lago-api does. `batch_params` only
/// permits `events`, it does not require it: a missing root, or one that is not an array, is
/// dropped and answered like an empty list, 422 `no_events` (`Events::CreateBatchService#call`),
/// never a 400 ParameterMissing (which the simulator answered). A body that is not JSON is Rails'
/// own 400, `{"status":400,"error":"Bad Request"}` (the sink stops on either, records pending).
#[tokio::test]
async fn the_simulator_answers_an_unreadable_batch_as_lago_api_does() {
    let lago = sim(Behaviour::Postgres).await;
    let http = reqwest::Client::new();
    let post = |body: &'static str| {
        http.post(format!("{}/api/v1/events/batch", lago.url))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(body)
            .send()
    };
    for body in [
        "{}",
        r#"{"events":"x"}"#,
        r#"{"event":{"transaction_id":"a","code":"c","external_subscription_id":"s"}}"#,
    ] {
        let r = post(body).await.unwrap();
        assert_eq!(r.status(), 422, "{body}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "status": 422,
                "error": "Unprocessable Entity",
                "code": "validation_errors",
                "error_details": {"events": ["no_events"]}
            }),
            "{body}"
        );
    }
    let r = post(r#"{"events":["#).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({"status": 400, "error": "Bad Request"})
    );
    assert_eq!(lago.event_count(), 0);
}

/// What the sink sees of a simulator in a scripted exchange: every delivery's outcomes, then
/// the stored-event and request counts.
async fn script_on(
    behaviour: Behaviour,
    lean: bool,
) -> (Vec<Vec<Outcome>>, usize, usize, LagoSimHandle) {
    let lago = sim(behaviour).await;
    lago.set_lean(lean);
    let s = sink(&lago.url, fast_retry(2));
    let mut outcomes = Vec::new();
    for b in [
        four_events(&s),
        // The same four again.
        four_events(&s),
        // One new key, one known key, one key twice in the call.
        batch(
            &s,
            &[
                ("k5", event("sub-1", "1", at(1_710_000_000))),
                ("k0", event("sub-1", "0.012846", at(1_710_000_000))),
                ("k6", event("sub-2", "2", at(1_710_000_000))),
                ("k6", event("sub-2", "2", at(1_710_000_000))),
            ],
        ),
        // A known key with another timestamp (a second event on ClickHouse).
        batch(&s, &[("k1", event("sub-1", "1.5", at(1_710_999_999)))]),
    ] {
        outcomes.push(s.deliver(&b).await.unwrap());
    }
    let (events, requests) = (lago.event_count(), lago.request_count());
    (outcomes, events, requests, lago)
}

#[tokio::test]
async fn a_lean_simulator_answers_exactly_like_the_full_one() {
    // The benchmark harness runs the simulator lean (millions of events, none kept): its
    // idempotency must be the same, or the harness would measure another sink.
    for behaviour in [Behaviour::Postgres, Behaviour::ClickHouse] {
        let (full, full_events, full_requests, full_sim) = script_on(behaviour, false).await;
        let (lean, lean_events, lean_requests, lean_sim) = script_on(behaviour, true).await;
        assert_eq!(lean, full, "{behaviour:?}");
        assert_eq!(
            (lean_events, lean_requests),
            (full_events, full_requests),
            "{behaviour:?}"
        );
        assert_eq!(full_sim.events().len(), full_events, "{behaviour:?}");
        assert!(
            lean_sim.events().is_empty(),
            "{behaviour:?}: lean keeps no event"
        );
        assert!(
            lean_sim.bodies().is_empty(),
            "{behaviour:?}: lean keeps no body"
        );
        // Both counted what each store bills: 6 keys (k0–k3, k5, k6) on Postgres, plus the
        // second timestamp of k1 on ClickHouse.
        let expected = match behaviour {
            Behaviour::Postgres => 6,
            Behaviour::ClickHouse => 7,
        };
        assert_eq!(lean_events, expected, "{behaviour:?}");
    }
}

/// Answers that are not in Lago's error format (`status` and `error`, the answer's own status)
/// come from what stands in front of Lago: a gateway's JSON 404 for a wrong api_url path, and
/// nginx's 400 "The plain HTTP request was sent to HTTPS port" for http:// on a TLS port. The
/// way to Lago is wrong, not the records: the sink stops and they stay pending.
#[tokio::test]
async fn answers_not_in_lagos_error_format_stop_the_sink_and_reject_no_record() {
    let gateway_404 = r#"{"message":"no Route matched with those values"}"#;
    let nginx_400 = "<html>\r\n<head><title>400 The plain HTTP request was sent to HTTPS port</title></head>\r\n<body><center><h1>400 Bad Request</h1></center><hr><center>nginx</center></body></html>";
    for (status, body) in [(404, gateway_404), (400, nginx_400)] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_string(body))
            .mount(&server)
            .await;
        let s = sink(&server.uri(), fast_retry(2));
        let stop = s
            .deliver(&four_events(&s))
            .await
            .expect_err("an answer from in front of Lago stops the sink");
        assert!(stop.message.contains("check api_url"), "{status}: {stop}");
    }
}

/// Lago itself answers every unknown route with its own error shape: lago-api's
/// `config/routes.rb` ends with `match "*unmatched" => "application#not_found"`, which renders
/// `{"status":404,"error":"Not Found","code":"resource_not_found"}`. So an api_url with a wrong
/// path in front of a real Lago (`https://lago.example.com/lago`, an extra `/api`) gets a 404 in
/// Lago's format for every batch. Nothing in the batch endpoint answers 404 about an event: the
/// sink stops with the records pending, instead of quarantining every record it is given as
/// rejected (revenue held until someone replays them all).
#[tokio::test]
async fn a_404_from_lago_itself_stops_the_sink_and_rejects_no_record() {
    let lago = sim(Behaviour::Postgres).await;
    let s = sink(&format!("{}/lago", lago.url), fast_retry(2));
    let result = s.deliver(&four_events(&s)).await;
    let stop = result.expect_err("a wrong path in api_url stops the sink, no record rejected");
    assert!(stop.message.contains("404"), "{stop}");
    assert!(stop.message.contains("check api_url"), "{stop}");
    assert_eq!(lago.event_count(), 0);

    // The answer the simulator gives is lago-api's, byte for byte in its fields.
    let answer = reqwest::Client::new()
        .post(format!("{}/lago/api/v1/events/batch", lago.url))
        .bearer_auth(KEY)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 404);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"status": 404, "error": "Not Found", "code": "resource_not_found"})
    );
}

/// Read-back for reconciliation covers `[from, to)` to the millisecond. The sink sends event
/// times to the millisecond and Lago keeps and answers them so (`timestamp.iso8601(3)`), with
/// `timestamp_to` inclusive (`EventsQuery#with_timestamp_range`: `..timestamp_to`). Ending the
/// query a whole second early left out what the sink stored in the period's last second
/// (23:59:59.500 of the month's last day): reconciliation then called a delivered event lost.
#[tokio::test]
async fn read_back_covers_the_whole_period_to_the_millisecond() {
    use billsync::sinks::ReadBackQuery;
    let lago = sim(Behaviour::Postgres).await;
    let s = sink(&lago.url, fast_retry(1));
    let from = at(1_790_000_000);
    let to = at(1_790_003_600);
    let ms =
        |t: chrono::DateTime<chrono::Utc>, millis: i64| t + chrono::Duration::milliseconds(millis);
    let b = batch(
        &s,
        &[
            ("first", event("sub-1", "1", from)),
            ("last-whole-second", event("sub-1", "2", ms(to, -1000))),
            ("last-millisecond", event("sub-1", "4", ms(to, -1))),
            ("next-period", event("sub-1", "8", to)),
            ("before", event("sub-1", "16", ms(from, -1))),
        ],
    );
    assert!(s
        .deliver(&b)
        .await
        .unwrap()
        .iter()
        .all(|o| *o == Outcome::Delivered));
    let read = s
        .read_back(&ReadBackQuery {
            subscription: "sub-1".into(),
            metric: "storage".into(),
            from,
            to,
        })
        .await
        .unwrap()
        .expect("Lago can be read back");
    let mut keys: Vec<&str> = read.iter().map(|e| e.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["first", "last-millisecond", "last-whole-second"]);
}

/// On the Postgres store lago-api matches the rows `insert_all` stored back to the batch by
/// `transaction_id` alone (`saved_attributes.index_by { |attrs| attrs[0] }`, then one `delete`
/// per event, in `Events::CreateBatchService#bulk_insert_events`), although its unique index is
/// (organization, external_subscription_id, transaction_id). So one transaction id sent for two
/// subscriptions in one batch is refused whole, the second event reported
/// `value_already_exist` although it was stored nowhere: a client taking that as "delivered"
/// would lose it. The simulator answers so, in full and lean mode; the sink sends a repeated key
/// in a later request, where each subscription's event is stored once.
#[tokio::test]
async fn one_transaction_id_for_two_subscriptions_in_one_batch_is_refused_as_lago_does() {
    for lean in [false, true] {
        let lago = sim(Behaviour::Postgres).await;
        lago.set_lean(lean);
        let r = reqwest::Client::new()
            .post(format!("{}/api/v1/events/batch", lago.url))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(r#"{"events":[{"transaction_id":"x","code":"c","external_subscription_id":"s1"},{"transaction_id":"x","code":"c","external_subscription_id":"s2"}]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 422, "lean: {lean}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            v["error_details"],
            serde_json::json!({"1": {"transaction_id": ["value_already_exist"]}}),
            "lean: {lean}"
        );
        assert_eq!(lago.event_count(), 0, "lean: {lean}: rolled back whole");

        let s = sink(&lago.url, fast_retry(1));
        let b = batch(
            &s,
            &[
                ("k", event("sub-1", "1", at(1_710_000_000))),
                ("k", event("sub-2", "2", at(1_710_000_000))),
            ],
        );
        assert_eq!(
            s.deliver(&b).await.unwrap(),
            vec![Outcome::Delivered, Outcome::Delivered],
            "lean: {lean}"
        );
        assert_eq!(lago.event_count(), 2, "lean: {lean}");
        assert_eq!(lago.request_count(), 3, "lean: {lean}");
    }
}

/// Lago pages `GET /api/v1/events` by offset, newest first (`order(timestamp: :desc)`), and
/// counts the list again on every page (`meta.total_count`). An event ingested while the pages
/// are read (a sync running beside a month-end reconcile) shifts the list: the next page
/// repeats the previous page's last event and the new one is never seen. Read as is, that is an
/// event "stored twice" (a double billing that is not there, which someone may credit) and
/// one missing. A read whose count changed, or that ends short of the count, is read again.
#[tokio::test]
async fn read_back_reads_again_when_the_list_changes_between_pages() {
    use billsync::sinks::ReadBackQuery;
    use wiremock::matchers::query_param;
    let event = |i: usize| {
        serde_json::json!({
            "transaction_id": format!("e{i:03}"),
            "external_subscription_id": "sub-1",
            "code": "storage",
            "timestamp": "2026-10-01T00:00:00.000Z",
            "properties": {"gb": "1"}
        })
    };
    let page = |events: Vec<serde_json::Value>, page: u64, next: Option<u64>, total: usize| {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "events": events,
            "meta": {"current_page": page, "next_page": next, "total_count": total}
        }))
    };
    let server = MockServer::start().await;
    // First pass: 101 events, then e000 arrives before page 2 is read.
    Mock::given(method("GET"))
        .and(query_param("page", "1"))
        .respond_with(page((1..=100).map(event).collect(), 1, Some(2), 101))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(query_param("page", "2"))
        .respond_with(page(vec![event(100)], 2, None, 102))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    // Afterwards the list holds e000 to e101.
    Mock::given(method("GET"))
        .and(query_param("page", "1"))
        .respond_with(page((0..100).map(event).collect(), 1, Some(2), 102))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(query_param("page", "2"))
        .respond_with(page(vec![event(100), event(101)], 2, None, 102))
        .mount(&server)
        .await;
    let s = sink(&server.uri(), fast_retry(1));
    let read = s
        .read_back(&ReadBackQuery {
            subscription: "sub-1".into(),
            metric: "storage".into(),
            from: at(1_790_000_000),
            to: at(1_790_003_600),
        })
        .await
        .unwrap()
        .expect("Lago can be read back");
    let keys: Vec<String> = read.iter().map(|e| e.key.clone()).collect();
    let expected: Vec<String> = (0..102).map(|i| format!("e{i:03}")).collect();
    assert_eq!(keys, expected);

    // A list that never holds still is an error, not a partial read.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(page((0..3).map(event).collect(), 1, None, 4))
        .mount(&server)
        .await;
    let s = sink(&server.uri(), fast_retry(1));
    let err = s
        .read_back(&ReadBackQuery {
            subscription: "sub-1".into(),
            metric: "storage".into(),
            from: at(1_790_000_000),
            to: at(1_790_003_600),
        })
        .await
        .expect_err("3 events read of 4 counted");
    assert!(err.contains("sub-1") && err.contains('4'), "{err}");
}

/// Reconciliation's read-back pages through `GET /api/v1/events`, hundreds of requests for a
/// month: Lago rate-limits it like any endpoint, and a 5xx or a timeout is as transient there
/// as on the batch endpoint. The first 429 or 503 used to end the read with an error, leaving
/// the lines of that subscription and metric without read-back (reconcile exits non-zero for a
/// hiccup). It is retried with the sink's policy, honouring `Retry-After`; other answers, and
/// retries exhausted, are an error naming the status.
#[tokio::test]
async fn read_back_retries_429_5xx_and_timeouts_with_the_sink_policy() {
    use billsync::sinks::ReadBackQuery;
    let query = ReadBackQuery {
        subscription: "sub-1".into(),
        metric: "storage".into(),
        from: at(1_790_000_000),
        to: at(1_790_003_600),
    };
    let one_page = ResponseTemplate::new(200).set_body_json(serde_json::json!({
        "events": [{"transaction_id": "e1", "properties": {"gb": "1"}}],
        "meta": {"current_page": 1, "next_page": null, "total_count": 1}
    }));

    // A 503, then a 429 asking for a second, then the page.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(one_page.clone())
        .mount(&server)
        .await;
    let s = sink(
        &server.uri(),
        RetryPolicy {
            max_retries: 3,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_secs(5),
        },
    );
    let started = Instant::now();
    let read = s
        .read_back(&query)
        .await
        .expect("a 503 and a 429 are retried")
        .expect("Lago can be read back");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After ignored"
    );
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].key, "e1");
    assert_eq!(server.received_requests().await.unwrap().len(), 3);

    // A page that times out once.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(one_page.clone().set_delay(Duration::from_millis(600)))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(one_page.clone())
        .mount(&server)
        .await;
    let s = sink_with(
        &server.uri(),
        KEY,
        fast_retry(2),
        Duration::from_millis(200),
    );
    let read = s
        .read_back(&query)
        .await
        .expect("a timeout is retried")
        .expect("Lago can be read back");
    assert_eq!(read.len(), 1);

    // Retries exhausted: an error naming the status, after 1 + max_retries requests.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(502))
        .mount(&server)
        .await;
    let s = sink(&server.uri(), fast_retry(2));
    let err = s.read_back(&query).await.expect_err("502 every time");
    assert!(err.contains("502") && err.contains("3 attempts"), "{err}");
    assert_eq!(server.received_requests().await.unwrap().len(), 3);

    // A 400 is not transient: one request, an error.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_string(r#"{"status":400,"error":"BadRequest: invalid timestamp_from"}"#),
        )
        .mount(&server)
        .await;
    let s = sink(&server.uri(), fast_retry(2));
    let err = s.read_back(&query).await.expect_err("400");
    assert!(err.contains("400"), "{err}");
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

/// A 422 that is not Lago's (Lago's 422 always carries `status: 422`, `error` and
/// `error_details`: lago-api `ApiErrors#validation_errors`) comes from what stands in front of
/// Lago: a WAF's HTML block page, a gateway's own JSON, or a body whose `status` is not the
/// answer's. Such a 422 says nothing about the records, and every batch would meet it: it used
/// to reject the whole batch (the run's backlog quarantined as `rejected`), and a body with
/// another `status` but Lago-like `error_details` was even split by index, marking records
/// delivered that Lago never stored. The sink stops, naming the answer; the records stay
/// pending.
#[tokio::test]
async fn a_422_not_in_lagos_error_format_stops_the_sink_and_keeps_the_records_pending() {
    let waf_page = "<html><head><title>Request Rejected</title></head><body>The requested URL was rejected. Support ID: 1234567890</body></html>";
    let gateway_json = r#"{"message":"Request body validation failed"}"#;
    // Spring Cloud Gateway's default error body: `status` and `error`, no `error_details`.
    let spring_gateway = r#"{"timestamp":"2026-12-07T10:00:00.000+00:00","path":"/api/v1/events/batch","status":422,"error":"Unprocessable Entity","requestId":"4f1c"}"#;
    // Lago-like details under another status: not Lago answering this request.
    let other_status = r#"{"status":400,"error":"Bad Request","code":"validation_errors","error_details":{"0":{"transaction_id":["value_already_exist"]}}}"#;
    for (body, named) in [
        (waf_page, "Request Rejected"),
        (gateway_json, "Request body validation failed"),
        (spring_gateway, "requestId"),
        (other_status, "value_already_exist"),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(422).set_body_string(body))
            .mount(&server)
            .await;
        let s = sink(&server.uri(), fast_retry(2));
        let result = s.deliver(&four_events(&s)).await;
        let stop = match result {
            Err(stop) => stop,
            Ok(out) => panic!("a 422 not from Lago must stop the sink, got {out:?} for {body}"),
        };
        assert!(stop.message.contains("422"), "{stop}");
        assert!(
            stop.message.contains("not in Lago's error format"),
            "{stop}"
        );
        assert!(stop.message.contains(named), "the answer is named: {stop}");
        assert!(stop.message.contains("records stay pending"), "{stop}");
        assert!(
            stop.settled.is_empty(),
            "nothing settled: {:?}",
            stop.settled
        );
        assert_eq!(bodies(&server).await.len(), 1, "{body}: not retried");
    }
}

/// Lago Cloud sends `X-RateLimit-Limit/Remaining/Reset` on every answer, not only on 429, with
/// a reset of 0 or 1 second. Taken as the wait for a 5xx or 408, it replaced the backoff: during
/// a short outage a batch spent all its retries within about a second and its records were left
/// failed instead of waiting the outage out. `X-RateLimit-Reset` is the wait for a 429 only;
/// other retried answers back off with the policy, unless they carry `Retry-After`.
#[tokio::test]
async fn a_rate_limit_reset_is_the_wait_for_a_429_only() {
    let retry = RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(5),
    };
    // Lago Cloud's rate-limit headers on an answer that is not a 429.
    let with_rate_headers = |status: u16| {
        ResponseTemplate::new(status)
            .insert_header("X-RateLimit-Limit", "500")
            .insert_header("X-RateLimit-Remaining", "499")
            .insert_header("X-RateLimit-Reset", "0")
    };
    for status in [500, 502, 503, 408] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(with_rate_headers(status))
            .mount(&server)
            .await;
        let s = sink(&server.uri(), retry.clone());
        let started = Instant::now();
        let out = s.deliver(&four_events(&s)).await.unwrap();
        let elapsed = started.elapsed();
        assert!(
            out.iter().all(|o| matches!(o, Outcome::Failed(_))),
            "{status}: {out:?}"
        );
        // Three attempts; after a 500 or 502 at each, the fresh sink's one probe for a poison
        // event adds the two halves, one attempt each (see sink_lago_poison.rs).
        let probe = if matches!(status, 500 | 502) { 2 } else { 0 };
        assert_eq!(bodies(&server).await.len(), 3 + probe, "{status}");
        // The policy's backoff: at least 200 ms, then 400 ms (jitter only adds).
        assert!(
            elapsed >= Duration::from_millis(550),
            "{status}: X-RateLimit-Reset: 0 cut the backoff to {elapsed:?}"
        );
    }

    // A 429's X-RateLimit-Reset is still its wait.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("X-RateLimit-Limit", "500")
                .insert_header("X-RateLimit-Remaining", "0")
                .insert_header("X-RateLimit-Reset", "1"),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"events":[]}"#))
        .mount(&server)
        .await;
    // A short backoff, so only the hint (capped at max_delay) makes the wait.
    let honouring = RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_secs(5),
    };
    let s = sink(&server.uri(), honouring.clone());
    let started = Instant::now();
    assert_eq!(
        s.deliver(&four_events(&s)).await.unwrap(),
        vec![Outcome::Delivered; 4]
    );
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "a 429's X-RateLimit-Reset ignored"
    );

    // A 503's Retry-After is still its wait, whatever X-RateLimit-Reset says.
    let server = answering_first(
        with_rate_headers(503).insert_header("Retry-After", "1"),
        ResponseTemplate::new(200).set_body_string(r#"{"events":[]}"#),
    )
    .await;
    let s = sink(&server.uri(), honouring);
    let started = Instant::now();
    assert_eq!(
        s.deliver(&four_events(&s)).await.unwrap(),
        vec![Outcome::Delivered; 4]
    );
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "a 503's Retry-After ignored"
    );
}

/// `api_url` may carry credentials (user info for a proxy in front of Lago, a token in a query
/// it then refuses). The messages that name the address (a refused configuration at start-up, a
/// stop on a 404 or on an answer not in Lago's format) are logged and stored as the records'
/// last error in the ledger, where no secret may go: they show the address without them, as the
/// Stripe and webhook sinks do.
#[tokio::test]
async fn api_url_credentials_are_never_shown() {
    let secrets = ["lago-user", "tok-s3cret"];
    let cfg = |url: &str| LagoConfig {
        api_url: url.into(),
        api_key: billsync::config::Secret::new("k"),
        batch_size: 100,
        timeout: Duration::from_secs(1),
        retry: RetryPolicy::default(),
    };
    for url in [
        "ftp://lago-user:tok-s3cret@lago.example.invalid",
        "https://lago-user:tok-s3cret@lago.example.invalid/api/v1",
        "https://lago.example.invalid/?api_key=tok-s3cret&user=lago-user",
        "https://lago-user:tok-s3cret@[::1",
    ] {
        let err = LagoSink::new("l".into(), cfg(url))
            .expect_err("not a usable api_url")
            .to_string();
        assert!(
            err.contains("lago.example.invalid") || err.contains("[::1"),
            "{err}"
        );
        for secret in secrets {
            assert!(!err.contains(secret), "{secret} in: {err}");
        }
    }

    // The stops that name the address: a 404, a 400 and a 422 not in Lago's format.
    for (status, body) in [
        (404, ""),
        (400, "<html>400 Bad Request</html>"),
        (422, "<html>Request Rejected</html>"),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_string(body))
            .mount(&server)
            .await;
        let with_user = server
            .uri()
            .replacen("http://", "http://lago-user:tok-s3cret@", 1);
        let s = sink(&with_user, fast_retry(0));
        let stop = s
            .deliver(&four_events(&s))
            .await
            .expect_err("an answer about the way to Lago stops the sink");
        let shown = stop.to_string();
        assert!(
            shown.contains(&server.address().to_string()),
            "{status}: {shown}"
        );
        for secret in secrets {
            assert!(!shown.contains(secret), "{status}: {secret} in: {shown}");
        }
    }
}
