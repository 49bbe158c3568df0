//! The webhook sink against a receiver written here, which checks the signature with nothing
//! but the scheme the README documents (HMAC-SHA256 over "<timestamp>.<body>", hex, `v1=`),
//! deduplicates by `Idempotency-Key` and record key, and can be scripted to fail.

#[path = "common/world.rs"]
mod world;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::ledger::{Ledger, RecordFilter, Status};
use billsync::mapping::{MappedEvent, MappingSet};
use billsync::simulators::lago::Behaviour;
use billsync::sinks::webhook::{HeaderValue, WebhookConfig, WebhookSink};
use billsync::sinks::{Outcome, Outgoing, Sink};
use billsync::sync::{Pipeline, SyncOptions};
use chrono::TimeZone;
use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use serde_json::Value;
use sha2::Sha256;

const SECRET: &str = "whsec-test-0123456789";

/// What the receiver does with the next request.
#[derive(Debug, Clone)]
enum Script {
    /// Verify, deduplicate, store; 200 (or 409 `{"duplicates":"all"}` for a known batch).
    Normal,
    /// Verify and store like `Normal`, then answer this status (the answer is "lost").
    StoreThenAnswer(u16),
    /// Answer this status with this body without storing.
    Answer(u16, &'static str),
    /// Like `Answer`, with `Retry-After: <seconds>`.
    AnswerRetryAfter(u16, &'static str, u64),
    /// Work on the request this long, then fail it (500) without storing: an original request
    /// the client timed out on while the receiver was still processing it.
    Stall(Duration),
}

/// A receiver built on the IETF Idempotency-Key draft answers a retry that arrives while the
/// original request with the same key is still being processed with this (its example).
const IN_PROGRESS: &str = r#"{"type":"https://developer.example.com/idempotency","title":"A request is outstanding for this Idempotency-Key","detail":"A request with the same Idempotency-Key for the same operation is being processed or is outstanding."}"#;

#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: String,
    status: u16,
    at: std::time::Instant,
}

#[derive(Default)]
struct ReceiverState {
    script: VecDeque<Script>,
    batches: HashSet<String>,
    /// Record key → how many times it was stored (must stay 1).
    stored: BTreeMap<String, usize>,
    records: Vec<Value>,
    requests: Vec<Received>,
    /// Answer a new batch holding keys already stored with 409 and
    /// `{"duplicates":[those keys]}`, storing nothing of it (a receiver deduplicating by key).
    list_duplicates: bool,
    /// Record key → the status (400 or 422) the receiver refuses any request holding it with,
    /// naming the key and storing nothing of the request (a receiver validating each record).
    refuse: BTreeMap<String, u16>,
}

type Shared = Arc<Mutex<ReceiverState>>;

/// The receiver's signature check, from the documented scheme only.
fn verify(headers: &HeaderMap, body: &[u8], secret: &str) -> bool {
    let Some(ts) = headers
        .get("x-billsync-timestamp")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Ok(ts_num) = ts.parse::<i64>() else {
        return false;
    };
    // Refuse stale signatures (replay window of five minutes).
    if (chrono::Utc::now().timestamp() - ts_num).abs() > 300 {
        return false;
    }
    let Some(sig) = headers
        .get("x-billsync-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("v1="))
    else {
        return false;
    };
    let Ok(expected) = (0..sig.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(sig.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    // Constant-time comparison.
    mac.verify_slice(&expected).is_ok()
}

async fn handle(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, String) {
    let at = std::time::Instant::now();
    let text = String::from_utf8_lossy(&body).into_owned();
    let script = state
        .lock()
        .unwrap()
        .script
        .pop_front()
        .unwrap_or(Script::Normal);
    if let Script::Stall(work) = script {
        // The work goes on when the client hangs up (hyper drops this handler then).
        let work = tokio::spawn(async move {
            tokio::time::sleep(work).await;
            state.lock().unwrap().requests.push(Received {
                headers,
                body: text,
                status: 500,
                at,
            });
        });
        let _ = work.await;
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            HeaderMap::new(),
            "processing failed".into(),
        );
    }
    let mut st = state.lock().unwrap();
    let mut answer_headers = HeaderMap::new();
    let (status, answer) = match script {
        Script::Stall(_) => unreachable!("answered above"),
        Script::Answer(code, msg) => (code, msg.to_string()),
        Script::AnswerRetryAfter(code, msg, secs) => {
            answer_headers.insert("retry-after", secs.into());
            (code, msg.to_string())
        }
        Script::Normal | Script::StoreThenAnswer(_) => {
            let sent: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let refused = sent["records"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["key"].as_str())
                .find_map(|k| st.refuse.get(k).map(|code| (*code, k.to_string())));
            if !verify(&headers, &body, SECRET) {
                (401, "bad signature".to_string())
            } else if let Some((code, key)) = refused {
                (code, format!("record {key}: unknown subscription"))
            } else {
                let id = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let known = st.batches.contains(&id);
                let duplicates: Vec<String> = if st.list_duplicates && !known {
                    parsed["records"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r["key"].as_str())
                        .filter(|k| st.stored.contains_key(*k))
                        .map(str::to_string)
                        .collect()
                } else {
                    Vec::new()
                };
                if !known && duplicates.is_empty() {
                    st.batches.insert(id);
                    for r in parsed["records"].as_array().cloned().unwrap_or_default() {
                        let key = r["key"].as_str().unwrap_or_default().to_string();
                        let n = st.stored.entry(key).or_insert(0);
                        *n += 1;
                        if *n == 1 {
                            st.records.push(r);
                        }
                    }
                }
                match script {
                    _ if !duplicates.is_empty() => (
                        409,
                        serde_json::json!({ "duplicates": duplicates }).to_string(),
                    ),
                    Script::StoreThenAnswer(code) => (code, "lost answer".to_string()),
                    _ if known => (409, r#"{"duplicates":"all"}"#.to_string()),
                    _ => (200, "{}".to_string()),
                }
            }
        }
    };
    st.requests.push(Received {
        headers,
        body: text,
        status,
        at,
    });
    (
        StatusCode::from_u16(status).unwrap(),
        answer_headers,
        answer,
    )
}

struct Receiver {
    url: String,
    state: Shared,
}

impl Receiver {
    async fn start(script: Vec<Script>) -> Receiver {
        let state: Shared = Arc::new(Mutex::new(ReceiverState {
            script: script.into(),
            ..Default::default()
        }));
        let app = axum::Router::new()
            .route("/hook", post(handle))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            state,
        }
    }

    fn requests(&self) -> Vec<Received> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn fast_retry(max_retries: usize) -> RetryPolicy {
    RetryPolicy {
        max_retries,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

fn config(url: &str, batch_size: usize, retry: RetryPolicy) -> WebhookConfig {
    WebhookConfig {
        url: url.into(),
        secret: Secret::new(SECRET),
        batch_size,
        headers: BTreeMap::from([("X-Tenant".to_string(), HeaderValue::Plain("acme".into()))]),
        timeout: Duration::from_secs(5),
        retry,
    }
}

fn sink(url: &str, batch_size: usize, retry: RetryPolicy) -> WebhookSink {
    WebhookSink::new("hook".into(), config(url, batch_size, retry)).unwrap()
}

fn event(sub: &str, value: &str) -> MappedEvent {
    MappedEvent {
        rule: "test.yaml#storage".into(),
        sink: None,
        external_subscription_id: sub.into(),
        external_customer_id: Some("cust-1".into()),
        metric_code: "storage".into(),
        value_property: "gb".into(),
        value: Decimal::from_str(value).unwrap(),
        properties: BTreeMap::from([("region".into(), "eu-west".into())]),
        timestamp: chrono::Utc.with_ymd_and_hms(2026, 10, 5, 0, 0, 0).unwrap(),
    }
}

fn batch(s: &WebhookSink, n: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| {
            let key = format!("k{i}");
            Outgoing {
                id: i as i64 + 1,
                payload: s.encode(&key, &event("sub-1", "1.50")).unwrap(),
                key,
                unclear_since: None,
            }
        })
        .collect()
}

#[test]
fn encode_is_exact_json_with_decimal_strings() {
    let s = sink("http://127.0.0.1:1/hook", 100, fast_retry(0));
    assert_eq!(
        s.encode("k1", &event("sub-\"1\"", "0.012300")).unwrap(),
        r#"{"key":"k1","subscription":"sub-\"1\"","customer":"cust-1","metric":"storage","property":"gb","value":"0.0123","timestamp":"2026-10-05T00:00:00Z","properties":{"region":"eu-west"}}"#
    );
    assert!(s.encode("", &event("sub-1", "1")).is_err());
    assert!(s.encode("k", &event("", "1")).is_err());
}

#[test]
fn config_is_validated_and_secrets_are_redacted() {
    let mut bad = config("ftp://x/hook", 100, fast_retry(0));
    assert!(WebhookSink::new("h".into(), bad.clone()).is_err());
    bad.url = "https://example.invalid/hook".into();
    bad.batch_size = 0;
    assert!(WebhookSink::new("h".into(), bad.clone()).is_err());
    bad.batch_size = 10;
    bad.headers.insert(
        "X-Billsync-Signature".into(),
        HeaderValue::Plain("x".into()),
    );
    assert!(WebhookSink::new("h".into(), bad.clone()).is_err());
    // A credential header written in the settings is refused, without quoting it.
    bad.headers.remove("X-Billsync-Signature");
    for name in ["Authorization", "X-Api-Key", "X-Auth-Token"] {
        let mut literal = bad.clone();
        literal.headers.insert(
            name.into(),
            HeaderValue::Plain("Bearer pasted-token-1".into()),
        );
        let err = WebhookSink::new("h".into(), literal)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("env:VARIABLE") && !err.contains("pasted-token-1"),
            "{err}"
        );
    }

    std::env::set_var("BILLSYNC_TEST_WEBHOOK_SECRET", "hmac-key-value");
    std::env::set_var("BILLSYNC_TEST_WEBHOOK_TOKEN", "bearer-token-value");
    let parsed: WebhookConfig = serde_yaml_ng::from_str(
        "url: https://billing.example.invalid/usage\nsecret: env:BILLSYNC_TEST_WEBHOOK_SECRET\nheaders:\n  Authorization: env:BILLSYNC_TEST_WEBHOOK_TOKEN\n  X-Tenant: acme\n",
    )
    .unwrap();
    assert_eq!(parsed.batch_size, 100);
    let debug = format!("{parsed:?}");
    assert!(!debug.contains("hmac-key-value") && !debug.contains("bearer-token-value"));
    assert!(debug.contains("acme"));
    let s = WebhookSink::new("h".into(), parsed).unwrap();
    assert!(!format!("{s:?}").contains("bearer-token-value"));
    // A secret in the file itself is refused.
    assert!(
        serde_yaml_ng::from_str::<WebhookConfig>("url: https://x.invalid\nsecret: plain\n")
            .is_err()
    );
}

#[tokio::test]
async fn signed_batch_is_verified_by_the_documented_scheme_and_a_tampered_body_fails() {
    let rx = Receiver::start(vec![]).await;
    let s = sink(&rx.url, 100, fast_retry(0));
    let b = batch(&s, 3);
    assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered; 3]);
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.status, 200);
    // Body: batch id + the frozen payloads verbatim.
    let id = r.headers["idempotency-key"].to_str().unwrap().to_string();
    let payloads: Vec<&str> = b.iter().map(|o| o.payload.as_str()).collect();
    assert_eq!(
        r.body,
        format!(
            "{{\"batch_id\":\"{id}\",\"records\":[{}]}}",
            payloads.join(",")
        )
    );
    assert_eq!(id.len(), 64);
    assert_eq!(r.headers["x-tenant"], "acme");
    assert_eq!(r.headers["content-type"], "application/json");

    // Replay the captured request with one digit changed: the receiver refuses it.
    let tampered = r.body.replace("\"1.5\"", "\"9.5\"");
    assert_ne!(tampered, r.body);
    let client = reqwest::Client::new();
    let send = |body: String| {
        client
            .post(&rx.url)
            .header("content-type", "application/json")
            .header("idempotency-key", "tampered-batch")
            .header(
                "x-billsync-timestamp",
                r.headers["x-billsync-timestamp"].clone(),
            )
            .header(
                "x-billsync-signature",
                r.headers["x-billsync-signature"].clone(),
            )
            .body(body)
            .send()
    };
    assert_eq!(send(tampered).await.unwrap().status().as_u16(), 401);
    // The untouched body with the same headers verifies (a new id, so it is not a 409).
    assert_eq!(send(r.body.clone()).await.unwrap().status().as_u16(), 200);
    // A wrong secret fails too.
    let wrong = WebhookSink::new(
        "h".into(),
        WebhookConfig {
            secret: Secret::new("another-secret"),
            ..config(&rx.url, 100, fast_retry(0))
        },
    )
    .unwrap();
    let err = wrong.deliver(&batch(&wrong, 1)).await.unwrap_err();
    assert!(err.message.contains("401"), "{err}");
    assert!(!err.to_string().contains("another-secret"));
}

#[tokio::test]
async fn retries_429_and_5xx_with_identical_body_and_key_and_fresh_valid_signatures() {
    let rx = Receiver::start(vec![
        Script::Answer(429, "slow down"),
        Script::Answer(503, "unavailable"),
        Script::Normal,
    ])
    .await;
    let s = sink(&rx.url, 100, fast_retry(3));
    let b = batch(&s, 2);
    assert_eq!(s.deliver(&b).await.unwrap(), vec![Outcome::Delivered; 2]);
    // The 429 is counted (not the 503), so the pipeline halves the batches it keeps in flight.
    assert_eq!(s.throttled(), 1);
    let reqs = rx.requests();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 503, 200]
    );
    for r in &reqs {
        assert_eq!(r.body, reqs[0].body);
        assert_eq!(
            r.headers["idempotency-key"],
            reqs[0].headers["idempotency-key"]
        );
        assert!(verify(&r.headers, r.body.as_bytes(), SECRET));
    }

    // Retries exhausted: the records stay pending (Failed), nothing rejected.
    let rx = Receiver::start(vec![Script::Answer(500, "down"); 5]).await;
    let s = sink(&rx.url, 100, fast_retry(1));
    let out = s.deliver(&batch(&s, 2)).await.unwrap();
    assert!(
        matches!(&out[0], Outcome::Failed(m) if m.contains("500")),
        "{out:?}"
    );
    assert_eq!(rx.requests().len(), 2);
}

/// A 400 rejects only the record it is about, never the batch it travelled in, and a 403 stops
/// the sink. (This test used to expect the whole batch rejected, its good record with it; see
/// `a_refused_batch_is_halved_until_only_the_refused_records_are_rejected`.)
#[tokio::test]
async fn a_400_rejects_only_its_record_and_403_stops_the_sink() {
    let rx = Receiver::start(vec![]).await;
    rx.state.lock().unwrap().refuse = BTreeMap::from([("k0".to_string(), 400)]);
    let s = sink(&rx.url, 2, fast_retry(2));
    let out = s.deliver(&batch(&s, 4)).await.unwrap();
    assert!(
        matches!(&out[0], Outcome::Rejected(m) if m.contains("record k0: unknown subscription")),
        "{out:?}"
    );
    assert_eq!(
        &out[1..],
        &[Outcome::Delivered, Outcome::Delivered, Outcome::Delivered]
    );
    // [k0, k1] refused, [k0] refused, [k1], then [k2, k3].
    assert_eq!(rx.requests().len(), 4);

    let rx = Receiver::start(vec![Script::Answer(403, "forbidden")]).await;
    let s = sink(&rx.url, 2, fast_retry(2));
    assert!(s.deliver(&batch(&s, 2)).await.is_err());
    assert_eq!(rx.requests().len(), 1, "no retry on 403");
}

/// One record the receiver refuses (400 or 422) used to reject every record of its batch: up to
/// `batch_size` good records quarantined (revenue held until someone replays them) for one bad
/// one. A refused batch of several records is split in halves, each sent as a new batch with its
/// own batch id (the SHA-256 of its keys, as the README documents), down to single records: the
/// good ones are delivered once, only the refused ones are rejected, each with the receiver's
/// answer about it. A batch of n records takes at most 2n - 1 requests.
#[tokio::test]
async fn a_refused_batch_is_halved_until_only_the_refused_records_are_rejected() {
    let rx = Receiver::start(vec![]).await;
    rx.state.lock().unwrap().refuse =
        BTreeMap::from([("k3".to_string(), 422), ("k6".to_string(), 400)]);
    let s = sink(&rx.url, 8, fast_retry(0));
    let out = s.deliver(&batch(&s, 8)).await.unwrap();
    for (i, o) in out.iter().enumerate() {
        match i {
            3 => assert!(
                matches!(o, Outcome::Rejected(m) if m.contains("422") && m.contains("record k3: unknown subscription")),
                "k3: {o:?}"
            ),
            6 => assert!(
                matches!(o, Outcome::Rejected(m) if m.contains("400") && m.contains("record k6: unknown subscription")),
                "k6: {o:?}"
            ),
            _ => assert_eq!(*o, Outcome::Delivered, "k{i}"),
        }
    }
    {
        let st = rx.state.lock().unwrap();
        let stored: Vec<(&str, usize)> = st.stored.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        assert_eq!(
            stored,
            vec![
                ("k0", 1),
                ("k1", 1),
                ("k2", 1),
                ("k4", 1),
                ("k5", 1),
                ("k7", 1)
            ]
        );
    }
    let reqs = rx.requests();
    let mut sent = Vec::new();
    for r in &reqs {
        let body: Value = serde_json::from_str(&r.body).unwrap();
        let keys: Vec<String> = body["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap().to_string())
            .collect();
        let id = billsync::sinks::webhook::batch_id(keys.iter().map(String::as_str));
        assert_eq!(r.headers["idempotency-key"], id.as_str(), "{keys:?}");
        assert_eq!(body["batch_id"], id.as_str(), "{keys:?}");
        sent.push(keys.join(","));
    }
    assert_eq!(
        sent,
        [
            "k0,k1,k2,k3,k4,k5,k6,k7",
            "k0,k1,k2,k3",
            "k0,k1",
            "k2,k3",
            "k2",
            "k3",
            "k4,k5,k6,k7",
            "k4,k5",
            "k6,k7",
            "k6",
            "k7",
        ]
    );
    assert!(reqs.len() < 2 * 8, "at most 2n - 1 batches");

    // A receiver refusing every record: each is rejected with its own reason, in 2n - 1
    // requests.
    let rx = Receiver::start(vec![]).await;
    rx.state.lock().unwrap().refuse = (0..5).map(|i| (format!("k{i}"), 422)).collect();
    let s = sink(&rx.url, 5, fast_retry(0));
    let out = s.deliver(&batch(&s, 5)).await.unwrap();
    for (i, o) in out.iter().enumerate() {
        let own = format!("record k{i}: unknown subscription");
        assert!(
            matches!(o, Outcome::Rejected(m) if m.contains(&own)),
            "k{i}: {o:?}"
        );
    }
    assert_eq!(rx.requests().len(), 2 * 5 - 1);
}

/// A pipeline of the MetalSoft demo data into the webhook sink, ledger in the world's dir.
async fn pipeline(world: &world::World, url: &str, retry: RetryPolicy) -> Pipeline {
    pipeline_with(world, sink(url, 5, retry)).await
}

/// [`pipeline`] with a sink configured by the test.
async fn pipeline_with(world: &world::World, sink: WebhookSink) -> Pipeline {
    let mut p = Pipeline::new(
        Ledger::open(&world.dir.path().join("ledger.db"))
            .await
            .unwrap(),
        vec![Box::new(world.provider())],
        vec![Box::new(sink)],
        MappingSet::examples().unwrap(),
    );
    p.lock_ttl = Duration::from_secs(60);
    p
}

#[tokio::test]
async fn exactly_once_through_a_lost_answer_and_a_restart() {
    let world = world::World::start(Behaviour::default()).await;
    // The receiver stores the first batch but its answer is lost (a 500 after storing), and
    // this run does not retry: the crash window between "receiver has it" and "ledger knows".
    let rx = Receiver::start(vec![Script::StoreThenAnswer(500)]).await;
    let opts = SyncOptions {
        now: Some(world::now()),
        ..Default::default()
    };
    let first = pipeline(&world, &rx.url, fast_retry(0))
        .await
        .sync(&opts)
        .await
        .unwrap();
    assert!(first.sent > 0);
    assert_eq!(first.failed, 5, "{first:?}");

    // The restarted run resends the same records: same Idempotency-Key, answered 409.
    let second = pipeline(&world, &rx.url, fast_retry(0))
        .await
        .sync(&opts)
        .await
        .unwrap();
    assert_eq!(second.already_delivered, 5, "{second:?}");
    assert_eq!(second.sent, 0);
    assert_eq!(second.failed, 0);

    let reqs = rx.requests();
    let lost = &reqs[0];
    let resent = reqs.last().unwrap();
    // `{"duplicates":"all"}`: the only 409 taken for the whole batch.
    assert_eq!(resent.status, 409);
    assert_eq!(
        resent.headers["idempotency-key"],
        lost.headers["idempotency-key"]
    );
    assert_eq!(resent.body, lost.body);

    // Every mapped record reached the receiver once, with the mapped value.
    let (_, expected) = world.expected(&MappingSet::examples().unwrap()).await;
    let st = rx.state.lock().unwrap();
    assert!(st.stored.values().all(|&n| n == 1), "a record stored twice");
    assert_eq!(st.records.len(), expected.len());
    for r in &st.records {
        let key = r["key"].as_str().unwrap();
        let value = Decimal::from_str(r["value"].as_str().unwrap()).unwrap();
        assert_eq!(Some(&value), expected.get(key), "{key}");
    }
}

/// Keys of the ledger's records with `status`, in id order.
async fn keys_with(p: &Pipeline, status: Status) -> Vec<String> {
    p.ledger
        .records_matching(&RecordFilter::status(status), 0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect()
}

/// A batch refused as a whole (422) is halved; the receiver stores the first half (200), then
/// refuses the credentials on the second half's request (401): the sink stops. The first half
/// is at the receiver, so the ledger must say `sent` for it now. It used to stay `pending` (the
/// stop dropped every outcome of the batch): the run's counts were wrong, and the next run sent
/// those records again in a new batch (a new batch id), billed twice by a receiver that does
/// not deduplicate by record key.
#[tokio::test]
async fn records_stored_before_a_stop_in_the_same_batch_are_recorded_as_sent() {
    let world = world::World::start(Behaviour::default()).await;
    let rx = Receiver::start(vec![
        Script::Answer(422, "one record of this batch is invalid"),
        Script::Normal,
        Script::Answer(401, "key rotated"),
    ])
    .await;
    let opts = SyncOptions {
        now: Some(world::now()),
        ..Default::default()
    };
    let p = pipeline(&world, &rx.url, fast_retry(0)).await;
    let first = p.sync(&opts).await.unwrap();
    assert_eq!(
        first.outcome,
        billsync::sync::RunOutcome::SinkStopped,
        "{first:?}"
    );
    let stored: Vec<String> = rx.state.lock().unwrap().stored.keys().cloned().collect();
    assert_eq!(
        stored.len(),
        2,
        "the first half of a batch of 5: {stored:?}"
    );
    let mut sent = keys_with(&p, Status::Sent).await;
    sent.sort();
    assert_eq!(
        sent, stored,
        "what the receiver stored is sent in the ledger"
    );
    assert_eq!(first.sent, 2, "{first:?}");
    assert!(keys_with(&p, Status::Rejected).await.is_empty());
    drop(p);

    // The next run (credentials fixed) sends only the others: nothing reaches the receiver twice.
    let second = pipeline(&world, &rx.url, fast_retry(0))
        .await
        .sync(&opts)
        .await
        .unwrap();
    assert_eq!(second.already_delivered, 0, "{second:?}");
    let st = rx.state.lock().unwrap();
    assert!(
        st.stored.values().all(|&n| n == 1),
        "a record stored twice: {:?}",
        st.stored
    );
}

/// The sink's records in ledger id order (the order the push walks them): key, status,
/// attempts, last error.
async fn ledger_rows(world: &world::World) -> Vec<(String, String, i64, Option<String>)> {
    use sqlx::{Connection, Row};
    let path = world.dir.path().join("ledger.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let rows = sqlx::query(
        "SELECT idem_key, status, attempts, last_error FROM records WHERE sink = 'hook' ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Several batches are in flight when one of them stops the sink. Here batch 1 is delivered
/// (the window grows to two), then batches 2 and 3 go out together: the receiver refuses the
/// credentials on batch 2 (401), and takes batch 3 apart (one record refused with 422, so it
/// is halved down to that record: the four others are stored). The answers of batch 3 used to
/// be dropped with the stop: four records the receiver holds stayed `pending` with no attempt,
/// sent again by the next run in new batches (new ids) and billed twice by a receiver that
/// does not deduplicate by record key, and the refused one had no error recorded. Now the
/// batches in flight are awaited and their outcomes recorded; only batch 2 stays pending.
#[tokio::test]
async fn batches_in_flight_when_the_sink_stops_are_awaited_and_recorded() {
    let world = world::World::start(Behaviour::default()).await;
    let rx = Receiver::start(vec![]).await;
    let opts = SyncOptions {
        now: Some(world::now()),
        ..Default::default()
    };
    // Stage only, to know which records make up each batch of 5 (the push walks by id).
    let staged = pipeline(&world, &rx.url, fast_retry(0))
        .await
        .sync(&SyncOptions {
            skip_push: true,
            ..opts.clone()
        })
        .await
        .unwrap();
    assert_eq!(staged.sent, 0);
    let pending: Vec<String> = ledger_rows(&world)
        .await
        .into_iter()
        .filter(|(_, status, _, _)| status == "pending")
        .map(|(key, ..)| key)
        .collect();
    assert!(pending.len() > 20, "{}", pending.len());
    let (second, third) = (&pending[5..10], &pending[10..15]);
    {
        let mut st = rx.state.lock().unwrap();
        st.refuse.insert(second[0].clone(), 401);
        st.refuse.insert(third[4].clone(), 422);
    }

    let run = pipeline(&world, &rx.url, fast_retry(0))
        .await
        .sync(&opts)
        .await
        .unwrap();
    assert_eq!(
        run.outcome,
        billsync::sync::RunOutcome::SinkStopped,
        "{run:?}"
    );
    // Batch 1 and the four stored records of batch 3 are sent; batch 3's refused record is
    // rejected with the receiver's reason; each tried once.
    assert_eq!((run.sent, run.rejected), (9, 1), "{run:?}");
    let rows: BTreeMap<String, (String, i64, Option<String>)> = ledger_rows(&world)
        .await
        .into_iter()
        .map(|(key, status, attempts, error)| (key, (status, attempts, error)))
        .collect();
    for key in &third[..4] {
        assert_eq!(
            rows[key],
            ("sent".to_string(), 1, None),
            "{key}: stored by the receiver"
        );
    }
    let (status, attempts, error) = &rows[&third[4]];
    assert_eq!((status.as_str(), *attempts), ("rejected", 1), "{error:?}");
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("unknown subscription")),
        "{error:?}"
    );
    for key in second {
        assert_eq!(
            rows[key].0, "pending",
            "{key}: the stopped batch stays pending"
        );
    }
    let stored: Vec<String> = rx.state.lock().unwrap().stored.keys().cloned().collect();
    let mut sent: Vec<String> = rows
        .iter()
        .filter(|(_, (status, ..))| status == "sent")
        .map(|(key, _)| key.clone())
        .collect();
    sent.sort();
    assert_eq!(
        sent, stored,
        "what the receiver stored is sent in the ledger"
    );

    // The credentials fixed, the next run sends the rest: nothing reaches the receiver twice.
    rx.state.lock().unwrap().refuse.clear();
    let next = pipeline(&world, &rx.url, fast_retry(0))
        .await
        .sync(&opts)
        .await
        .unwrap();
    assert_eq!(next.already_delivered, 0, "{next:?}");
    let st = rx.state.lock().unwrap();
    assert!(
        st.stored.values().all(|&n| n == 1),
        "a record stored twice: {:?}",
        st.stored
    );
}

/// The ledger fails to read the next pending records while batches are in flight (here a
/// pending record whose frozen payload is gone: `Corrupt`, and the run fails). The answers of
/// the batches in flight, and those received but not yet committed (acknowledgements are
/// committed together, once nothing is in flight), used to be dropped with the error: records
/// the receiver stored stayed `pending`, and since the next run fails at the same record, each
/// run sent them again. Now sending stops, what is in flight is awaited, and every answer is
/// recorded before the error ends the run.
#[tokio::test]
async fn a_ledger_read_failure_mid_push_still_records_every_answer_received() {
    let world = world::World::start(Behaviour::default()).await;
    let rx = Receiver::start(vec![]).await;
    let opts = SyncOptions {
        now: Some(world::now()),
        ..Default::default()
    };
    pipeline(&world, &rx.url, fast_retry(0))
        .await
        .sync(&SyncOptions {
            skip_push: true,
            ..opts.clone()
        })
        .await
        .unwrap();
    // Batches of 5, read 50 at a time: the second read meets the damaged record (the 61st),
    // while batches of the first 50 are still in flight.
    {
        use sqlx::Connection;
        let path = world.dir.path().join("ledger.db");
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let damaged = sqlx::query(
            "UPDATE record_bodies SET payload = NULL WHERE id = (SELECT id FROM records
             WHERE sink = 'hook' AND status = 'pending' ORDER BY id LIMIT 1 OFFSET 60)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        assert_eq!(damaged.rows_affected(), 1);
        conn.close().await.unwrap();
    }
    for run in 1..=2 {
        let failed = pipeline(&world, &rx.url, fast_retry(0))
            .await
            .sync(&opts)
            .await
            .expect_err("a pending record without its payload fails the run");
        assert!(failed.to_string().contains("payload"), "{failed}");
        let stored: Vec<String> = rx.state.lock().unwrap().stored.keys().cloned().collect();
        assert!(!stored.is_empty(), "run {run}: nothing was sent");
        let mut sent: Vec<String> = ledger_rows(&world)
            .await
            .into_iter()
            .filter(|(_, status, _, _)| status == "sent")
            .map(|(key, ..)| key)
            .collect();
        sent.sort();
        assert_eq!(
            sent, stored,
            "run {run}: what the receiver stored is sent in the ledger"
        );
        let st = rx.state.lock().unwrap();
        assert!(
            st.stored.values().all(|&n| n == 1),
            "run {run}: a record stored twice: {:?}",
            st.stored
        );
    }
}

/// After a crash, the pending queue can hold more records than the lost attempt: the resent
/// batch has a new id and only some of its records are at the receiver. A receiver that answers
/// 409 naming the keys it already has (`{"duplicates":[…]}`) gets exactly those recorded as
/// delivered before; the other records of the batch are sent again at once, never taken for
/// delivered. A 409 naming none of the batch's keys delivers nothing.
#[tokio::test]
async fn a_409_naming_its_duplicates_never_marks_the_other_records_delivered() {
    let rx = Receiver::start(vec![Script::StoreThenAnswer(500)]).await;
    rx.state.lock().unwrap().list_duplicates = true;
    let s = sink(&rx.url, 10, fast_retry(0));
    let all = batch(&s, 3);
    // The first attempt carried k0 and k1: stored, but the answer was lost.
    let first = s.deliver(&all[..2]).await.unwrap();
    assert!(matches!(first[0], Outcome::Failed(_)), "{first:?}");
    // The next run's batch also carries the new record k2.
    let out = s.deliver(&all).await.unwrap();
    assert_eq!(
        out,
        vec![
            Outcome::AlreadyDelivered,
            Outcome::AlreadyDelivered,
            Outcome::Delivered
        ]
    );
    {
        let st = rx.state.lock().unwrap();
        assert_eq!(
            st.stored.get("k2"),
            Some(&1),
            "the new record reached the receiver"
        );
        assert!(st.stored.values().all(|&n| n == 1), "a record stored twice");
    }
    let reqs = rx.requests();
    let last = reqs.last().unwrap();
    let body: Value = serde_json::from_str(&last.body).unwrap();
    let keys: Vec<&str> = body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        vec!["k2"],
        "only the record the receiver lacked is resent"
    );

    // A 409 whose list names none of the batch's records: nothing is taken for delivered.
    let rx = Receiver::start(vec![Script::Answer(409, r#"{"duplicates":["elsewhere"]}"#)]).await;
    let s = sink(&rx.url, 10, fast_retry(0));
    let out = s.deliver(&batch(&s, 2)).await.unwrap();
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Failed(_))),
        "{out:?}"
    );
}

/// A 409 counts as delivered only when its body says what the receiver has. Receivers built on
/// the IETF Idempotency-Key draft ("Error Scenarios") answer 409, with a problem+json body or
/// none, to a retry that arrives while the original request with that key is *still being
/// processed*, and the original may yet fail. Any 409 other than `{"duplicates":"all"}` or
/// `{"duplicates":[…]}` used to record the whole batch as delivered: records the receiver never
/// stored, never billed, and nothing flags it (a webhook cannot be read back). Now such a 409 is
/// retried like a 429 or 5xx, with the same body and key, after the `Retry-After` it asks for;
/// when the retries run out the records stay pending with the answer as the reason, and a later
/// request delivers them.
#[tokio::test]
async fn a_409_without_a_duplicates_answer_is_retried_and_never_taken_for_delivered() {
    let rx = Receiver::start(vec![
        Script::AnswerRetryAfter(409, IN_PROGRESS, 1),
        Script::Answer(409, ""),
        Script::Normal,
    ])
    .await;
    let s = sink(
        &rx.url,
        100,
        RetryPolicy {
            max_retries: 3,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_secs(5),
        },
    );
    assert_eq!(
        s.deliver(&batch(&s, 2)).await.unwrap(),
        vec![Outcome::Delivered; 2]
    );
    let reqs = rx.requests();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![409, 409, 200]
    );
    for r in &reqs {
        assert_eq!(r.body, reqs[0].body);
        assert_eq!(
            r.headers["idempotency-key"],
            reqs[0].headers["idempotency-key"]
        );
    }
    assert!(
        reqs[1].at - reqs[0].at >= Duration::from_secs(1),
        "Retry-After: 1 honoured: {:?}",
        reqs[1].at - reqs[0].at
    );
    assert_eq!(s.throttled(), 0, "a 409 is not throttling");
    assert!(rx.state.lock().unwrap().stored.values().all(|&n| n == 1));

    // Retries run out on such 409s: pending (Failed) with the answer, nothing delivered; the
    // next run's request is answered for the finished original (here 200) and delivers them.
    for body in [
        "",
        IN_PROGRESS,
        "batch already received",
        r#"{"duplicates":"ALL"}"#,
        r#"{"duplicates":true}"#,
        r#"{"status":"duplicate"}"#,
    ] {
        let rx = Receiver::start(vec![Script::Answer(409, body); 2]).await;
        let s = sink(&rx.url, 100, fast_retry(1));
        let out = s.deliver(&batch(&s, 2)).await.unwrap();
        for o in &out {
            assert!(
                matches!(o, Outcome::Failed(m) if m.contains("409") && m.contains("gave up after 2 attempts")),
                "{body:?}: {o:?}"
            );
        }
        assert_eq!(rx.requests().len(), 2, "{body:?}");
        assert!(rx.state.lock().unwrap().stored.is_empty());
        assert_eq!(
            s.deliver(&batch(&s, 2)).await.unwrap(),
            vec![Outcome::Delivered; 2],
            "{body:?}"
        );
    }

    // `{"duplicates":"all"}` says the receiver has every record of this request: delivered.
    let rx = Receiver::start(vec![Script::Answer(409, r#"{"duplicates":"all"}"#)]).await;
    let s = sink(&rx.url, 100, fast_retry(3));
    assert_eq!(
        s.deliver(&batch(&s, 3)).await.unwrap(),
        vec![Outcome::AlreadyDelivered; 3]
    );
    assert_eq!(rx.requests().len(), 1);
}

/// The loss end to end: the first request of a batch times out while the receiver is still
/// working on it; the retry (same Idempotency-Key) is answered 409 "a request is outstanding
/// for this Idempotency-Key" (IETF draft); then the original fails at the receiver, storing
/// nothing. The batch used to be recorded `sent` (already delivered), records the receiver
/// never had. Now they stay `pending` with the 409 as their last error, and the next run
/// delivers them, each once.
#[tokio::test]
async fn a_409_while_the_original_is_still_processing_leaves_the_records_pending() {
    let world = world::World::start(Behaviour::default()).await;
    let rx = Receiver::start(vec![
        Script::Stall(Duration::from_millis(2000)),
        Script::Answer(409, IN_PROGRESS),
    ])
    .await;
    let opts = SyncOptions {
        now: Some(world::now()),
        ..Default::default()
    };
    let impatient = || {
        WebhookSink::new(
            "hook".into(),
            WebhookConfig {
                timeout: Duration::from_millis(1000),
                ..config(&rx.url, 5, fast_retry(1))
            },
        )
        .unwrap()
    };
    let first = pipeline_with(&world, impatient())
        .await
        .sync(&opts)
        .await
        .unwrap();
    assert_eq!((first.failed, first.already_delivered), (5, 0), "{first:?}");
    // The original request has failed at the receiver by now.
    for _ in 0..250 {
        if rx.requests().iter().any(|r| r.status == 500) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reqs = rx.requests();
    let key_of = |status: u16| {
        reqs.iter()
            .find(|r| r.status == status)
            .map(|r| r.headers["idempotency-key"].clone())
    };
    assert!(key_of(500).is_some(), "the original failed");
    assert_eq!(key_of(409), key_of(500), "the 409 answered its retry");
    let rows = ledger_rows(&world).await;
    let pending: Vec<&(String, String, i64, Option<String>)> =
        rows.iter().filter(|r| r.1 == "pending").collect();
    assert_eq!(pending.len(), 5, "{rows:?}");
    for (key, _, _, error) in &pending {
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("409") && e.contains("outstanding")),
            "{key}: {error:?}"
        );
    }
    let stored: Vec<String> = rx.state.lock().unwrap().stored.keys().cloned().collect();
    let mut sent: Vec<String> = rows
        .iter()
        .filter(|r| r.1 == "sent")
        .map(|r| r.0.clone())
        .collect();
    sent.sort();
    assert_eq!(
        sent, stored,
        "what the receiver stored is sent in the ledger"
    );

    // The next run delivers them.
    let second = pipeline_with(&world, impatient())
        .await
        .sync(&opts)
        .await
        .unwrap();
    assert_eq!((second.sent, second.failed), (5, 0), "{second:?}");
    let rows = ledger_rows(&world).await;
    assert!(rows.iter().all(|r| r.1 == "sent"), "{rows:?}");
    let st = rx.state.lock().unwrap();
    assert_eq!(st.stored.len(), rows.len());
    assert!(st.stored.values().all(|&n| n == 1), "a record stored twice");
}

/// A 409 naming some records of the batch settles those (already delivered); when the resend
/// of the others then stops the sink (401), the stop carries the named ones, by position in the
/// batch, and only the others stay pending.
#[tokio::test]
async fn duplicates_named_by_a_409_go_with_a_stop_on_the_resend() {
    let rx = Receiver::start(vec![
        Script::StoreThenAnswer(500),
        Script::Normal,
        Script::Answer(401, "key rotated"),
    ])
    .await;
    rx.state.lock().unwrap().list_duplicates = true;
    let s = sink(&rx.url, 10, fast_retry(0));
    let all = batch(&s, 3);
    // k1 and k2 reach the receiver, the answer is lost.
    let first = s.deliver(&all[1..]).await.unwrap();
    assert!(matches!(first[0], Outcome::Failed(_)), "{first:?}");
    // [k0, k1, k2]: 409 naming k1 and k2; [k0] alone: 401.
    let stop = s.deliver(&all).await.expect_err("a 401 stops the sink");
    assert!(stop.message.contains("401"), "{stop}");
    assert_eq!(
        stop.settled,
        vec![
            (1, Outcome::AlreadyDelivered),
            (2, Outcome::AlreadyDelivered)
        ]
    );
    assert_eq!(rx.requests().len(), 3);
}

/// A wrong `url` path (or a receiver deployed without the route yet) answers 404: the address
/// is wrong, not the records, so the sink stops (naming url) and they stay pending.
#[tokio::test]
async fn a_404_stops_the_sink_instead_of_rejecting_records() {
    let rx = Receiver::start(vec![]).await;
    let s = sink(&format!("{}-typo", rx.url), 2, fast_retry(2));
    let stop = s
        .deliver(&batch(&s, 2))
        .await
        .expect_err("a 404 stops the sink");
    assert!(stop.message.contains("check url"), "{stop}");
}

/// 413 means the configured `batch_size` is too large for the receiver (or its proxy): the
/// sink stops (naming batch_size) and the records stay pending.
#[tokio::test]
async fn a_413_stops_the_sink_instead_of_rejecting_records() {
    let rx = Receiver::start(vec![Script::Answer(413, "request entity too large")]).await;
    let s = sink(&rx.url, 2, fast_retry(2));
    let stop = s
        .deliver(&batch(&s, 2))
        .await
        .expect_err("a 413 stops the sink");
    assert!(stop.message.contains("lower batch_size"), "{stop}");
}

/// A `url` that cannot work is a configuration error printed at start-up (and logged by the
/// CronJob): it names the URL without the credentials it may carry.
#[test]
fn a_refused_url_is_shown_without_its_credentials() {
    for url in [
        "ftp://hookuser:hookpass@billing.example.invalid/hook?token=tok-secret-123",
        "http://hookuser:hookpass@[::1/hook?token=tok-secret-123",
    ] {
        let err = WebhookSink::new("h".into(), config(url, 100, fast_retry(0)))
            .expect_err("not a usable URL")
            .to_string();
        for secret in ["hookpass", "hookuser", "tok-secret-123"] {
            assert!(!err.contains(secret), "{secret} in: {err}");
        }
    }
}

/// A webhook URL may carry credentials (user info, a `?token=` query): a transport failure's
/// reason, which is logged and stored as the record's last error in the ledger, names the
/// host and path but not them.
#[tokio::test]
async fn a_transport_failure_names_the_url_without_its_credentials() {
    let s = sink(
        "http://hookuser:hookpass@127.0.0.1:1/hook?token=tok-secret-123",
        100,
        fast_retry(0),
    );
    let outcomes = s.deliver(&batch(&s, 1)).await.unwrap();
    let Outcome::Failed(reason) = &outcomes[0] else {
        panic!("a refused connection is a failure to retry: {outcomes:?}");
    };
    assert!(reason.contains("127.0.0.1:1/hook"), "{reason}");
    for secret in ["hookpass", "hookuser", "tok-secret-123"] {
        assert!(!reason.contains(secret), "{secret} in: {reason}");
    }
}
