//! Fault injection, one class at a time, each ending in an exact state: how many records the
//! ledger holds per status, and what Lago holds per key and in total.
//!
//! The world is the demo dataset (users 1 and 2, daily windows) with the example mappings:
//! 80 records pulled, 71 to deliver, 1 held (a reservation installment without a rule), the
//! rest ignored on purpose.

#[path = "common/world.rs"]
mod world;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::time::{Duration, Instant};

use billsync::config::Secret;
use billsync::ledger::{Ledger, RecordFilter, Status};
use billsync::mapping::MappedEvent;
use billsync::mapping::MappingSet;
use billsync::providers::metalsoft::MetalsoftProvider;
use billsync::simulators::lago::{Behaviour, DropMode};
use billsync::simulators::metalsoft::Fault;
use billsync::sinks::lago::{LagoConfig, LagoSink};
use billsync::sinks::{EncodeError, Outcome, Outgoing, Sink, SinkStopped};
use billsync::sync::{Pipeline, RunOutcome, RunSummary, SyncOptions};
use world::{fast_retry, now, World, LAGO_KEY};

const DELIVERED: usize = 71;

fn opts() -> SyncOptions {
    SyncOptions {
        now: Some(now()),
        ..Default::default()
    }
}

/// A pipeline on the world's ledger with explicit timeouts (provider, sink).
async fn pipeline(world: &World, provider_timeout: Duration, sink_timeout: Duration) -> Pipeline {
    pipeline_with_retry(world, provider_timeout, sink_timeout, fast_retry()).await
}

/// The same, with one retry policy for both ends.
async fn pipeline_with_retry(
    world: &World,
    provider_timeout: Duration,
    sink_timeout: Duration,
    retry: billsync::http::RetryPolicy,
) -> Pipeline {
    // The world's provider, with explicit timeouts.
    let mut cfg = billsync::providers::metalsoft::MetalsoftConfig::new(
        world.metalsoft.url.clone(),
        Secret::new(world::MS_KEY),
        vec![1, 2],
        billsync::demo::demo_start(),
    );
    cfg.window = chrono::Duration::days(1);
    cfg.settle_delay = chrono::Duration::hours(2);
    cfg.retry = retry.clone();
    cfg.timeout = provider_timeout;
    let provider = MetalsoftProvider::new("metalsoft_test".into(), cfg).unwrap();
    let sink = LagoSink::new(
        "lago".into(),
        LagoConfig {
            api_url: world.lago.url.clone(),
            api_key: Secret::new(LAGO_KEY),
            batch_size: 25,
            timeout: sink_timeout,
            retry,
        },
    )
    .unwrap();
    let mut p = Pipeline::new(
        Ledger::open(&world.dir.path().join("ledger.db"))
            .await
            .unwrap(),
        vec![Box::new(provider)],
        vec![Box::new(sink)],
        MappingSet::examples().unwrap(),
    );
    p.lock_ttl = Duration::from_secs(60);
    p
}

/// Short backoff, but a `max_delay` above one second so a `Retry-After: 1` is honoured whole
/// (hints are capped at `max_delay`).
async fn honouring_pipeline(world: &World) -> Pipeline {
    let retry = billsync::http::RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_secs(2),
    };
    pipeline_with_retry(world, Duration::from_secs(5), Duration::from_secs(5), retry).await
}

async fn default_pipeline(world: &World) -> Pipeline {
    pipeline(world, Duration::from_secs(5), Duration::from_secs(5)).await
}

async fn sync(world: &World) -> RunSummary {
    default_pipeline(world).await.sync(&opts()).await.unwrap()
}

/// Ledger record counts per status (one source).
async fn ledger_counts(world: &World) -> BTreeMap<String, i64> {
    let ledger = Ledger::open(&world.dir.path().join("ledger.db"))
        .await
        .unwrap();
    let counts = ledger.counts_by_source().await.unwrap();
    ledger.close().await;
    counts
        .into_iter()
        .map(|((source, status), n)| {
            assert_eq!(source, "metalsoft_test");
            (status, n)
        })
        .collect()
}

fn counts(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
    pairs
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| (s.to_string(), *n))
        .collect()
}

/// The state after a complete delivery: 71 sent, 1 held, 8 ignored, and Lago holding each
/// expected key once with the expected totals.
async fn assert_complete(world: &World) {
    assert_eq!(
        ledger_counts(world).await,
        counts(&[("sent", 71), ("unmapped", 1), ("ignored", 8)])
    );
    assert_lago_holds_exactly(world, None).await;
}

/// Lago holds each expected key once (or only those in `only`) and the expected totals.
async fn assert_lago_holds_exactly(world: &World, only: Option<usize>) {
    let (totals, keys) = world.expected(&MappingSet::examples().unwrap()).await;
    let held = world.lago.counts();
    assert!(
        held.values().all(|&n| n == 1),
        "a key stored twice: {held:?}"
    );
    match only {
        None => {
            assert_eq!(
                held.keys().collect::<Vec<_>>(),
                keys.keys().collect::<Vec<_>>()
            );
            assert_eq!(world.lago_totals(), totals, "totals to the cent");
        }
        Some(n) => {
            assert_eq!(held.len(), n);
            assert!(held.keys().all(|k| keys.contains_key(k)), "unknown key");
        }
    }
    // Every stored value is the mapped value of its key.
    for e in world.lago.events() {
        let v: rust_decimal::Decimal = e.properties[World::value_property(&e.code)]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(v, keys[&e.transaction_id]);
    }
}

// ----- sink side ------------------------------------------------------------------------

#[tokio::test]
async fn lago_500_502_503_are_retried_and_everything_arrives_once() {
    for status in [500, 502, 503] {
        let world = World::start(Behaviour::Postgres).await;
        world.lago.fail_next(3, status);
        let run = sync(&world).await;
        assert_eq!((run.sent, run.failed), (71, 0), "{status}");
        assert_eq!(world.lago.request_count(), 3 + 3, "3 failures + 3 batches");
        assert_complete(&world).await;
    }
}

#[tokio::test]
async fn lago_5xx_past_the_retries_leaves_that_batch_pending_for_the_next_run() {
    let world = World::start(Behaviour::Postgres).await;
    // fast_retry: 3 retries = 4 attempts, all refused, and the two halves of the run's one
    // probe for a poison event (one attempt each) too: the first batch (25) stays pending.
    world.lago.fail_next(4 + 2, 502);
    let run = sync(&world).await;
    assert_eq!((run.sent, run.failed), (46, 25));
    assert_eq!(run.outcome, RunOutcome::Undelivered);
    assert_eq!(
        ledger_counts(&world).await,
        counts(&[
            ("sent", 46),
            ("pending", 25),
            ("unmapped", 1),
            ("ignored", 8)
        ])
    );
    assert_lago_holds_exactly(&world, Some(46)).await;
    let next = sync(&world).await;
    assert_eq!((next.sent, next.new), (25, 0));
    assert_complete(&world).await;
}

#[tokio::test]
async fn lago_429_with_and_without_retry_after_is_honoured_and_retried() {
    let world = World::start(Behaviour::Postgres).await;
    world.lago.rate_limit_next(1, Some(1));
    world.lago.rate_limit_next(2, None);
    let started = Instant::now();
    let run = honouring_pipeline(&world)
        .await
        .sync(&opts())
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was waited"
    );
    assert_eq!((run.sent, run.failed), (71, 0));
    assert_eq!(world.lago.request_count(), 3 + 3);
    assert_complete(&world).await;
}

/// The world's Lago sink behind a gate: each batch the pipeline hands it waits until the test
/// lets it through (oldest first), so the test sees how many batches the pipeline keeps in
/// flight at each step. Its 429 count is the Lago sink's own.
struct Gated {
    lago: LagoSink,
    counts: std::sync::Arc<GateCounts>,
    /// How many of the batches handed over may go on to Lago.
    released: tokio::sync::watch::Receiver<usize>,
}

#[derive(Default)]
struct GateCounts {
    /// Batches handed over so far.
    started: AtomicUsize,
    /// Batches that came back from Lago.
    completed: AtomicUsize,
    /// The Lago sink's 429 count after the last batch came back.
    throttled: AtomicU64,
}

#[async_trait::async_trait]
impl Sink for Gated {
    fn kind(&self) -> &'static str {
        self.lago.kind()
    }
    fn name(&self) -> &str {
        self.lago.name()
    }
    fn max_batch(&self) -> usize {
        self.lago.max_batch()
    }
    fn encode(&self, key: &str, event: &MappedEvent) -> Result<String, EncodeError> {
        self.lago.encode(key, event)
    }
    fn throttled(&self) -> u64 {
        self.lago.throttled()
    }
    async fn deliver(&self, batch: &[Outgoing]) -> Result<Vec<Outcome>, SinkStopped> {
        let n = self.counts.started.fetch_add(1, SeqCst);
        let mut released = self.released.clone();
        released.wait_for(|r| *r > n).await.unwrap();
        let outcomes = self.lago.deliver(batch).await;
        self.counts.throttled.store(self.lago.throttled(), SeqCst);
        self.counts.completed.fetch_add(1, SeqCst);
        outcomes
    }
}

/// Batches in flight follow the sink's answers (AIMD): the window opens by one batch per
/// answer up to eight; a 429 halves it to four, so the pipeline sends nothing more until its
/// batches in flight drain below the window (which opens again by one per answer meanwhile).
#[tokio::test]
async fn a_429_halves_the_batches_in_flight_then_they_grow_back_one_per_answer() {
    let world = World::start(Behaviour::Postgres).await;
    let mut pipeline = default_pipeline(&world).await;
    pipeline
        .sync(&SyncOptions {
            skip_push: true,
            ..opts()
        })
        .await
        .unwrap();
    let (release, released) = tokio::sync::watch::channel(0usize);
    let counts = std::sync::Arc::new(GateCounts::default());
    pipeline.sinks = vec![Box::new(Gated {
        lago: LagoSink::new(
            "lago".into(),
            LagoConfig {
                api_url: world.lago.url.clone(),
                api_key: Secret::new(LAGO_KEY),
                // 36 batches of the 71 records.
                batch_size: 2,
                timeout: Duration::from_secs(5),
                retry: fast_retry(),
            },
        )
        .unwrap(),
        counts: counts.clone(),
        released,
    })];

    let done = AtomicBool::new(false);
    let run = async {
        let run = pipeline.sync(&opts()).await.unwrap();
        done.store(true, SeqCst);
        run
    };
    // Lets the oldest batch through, waits for Lago's answer and for the pipeline to act on
    // it, and gives the batches then in flight.
    let step = || async {
        release.send_modify(|r| *r += 1);
        let through = *release.borrow();
        while counts.completed.load(SeqCst) < through {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Time for the pipeline to act on the answer: generous, as other tests of this binary
        // run on the same two cores (a late reaction shows as a wrong count, never a pass).
        tokio::time::sleep(Duration::from_millis(150)).await;
        counts.started.load(SeqCst) - through
    };
    let drive = async {
        let mut opening = Vec::new();
        while opening.last() != Some(&8) && opening.len() < 20 {
            opening.push(step().await);
        }
        // Lago answers the next request 429: the oldest batch's, let through next (retried
        // at once, then stored).
        world.lago.rate_limit_next(1, Some(0));
        let mut after = Vec::new();
        for _ in 0..8 {
            after.push(step().await);
        }
        while !done.load(SeqCst) {
            if counts.started.load(SeqCst) > *release.borrow() {
                step().await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        (opening, after)
    };
    let (run, (opening, after)) = tokio::join!(run, drive);
    assert_eq!((run.sent, run.failed), (71, 0), "{run:?}");
    assert_complete(&world).await;
    assert_eq!(counts.throttled.load(SeqCst), 1, "the 429 reached the sink");
    // One more batch in flight per answer, up to eight.
    assert_eq!(opening, [2, 3, 4, 5, 6, 7, 8], "before the 429");
    // The 429'd batch's answer: the window halves to 4 with 7 in flight, so nothing is sent;
    // each further answer frees one batch and opens the window by one (6 in flight, window 5;
    // 5 in flight, window 6: one batch sent), until it is back at eight.
    assert_eq!(after, [7, 6, 6, 7, 8, 8, 8, 8], "after the 429");
}

async fn lago_slower_than_the_timeout(behaviour: Behaviour) {
    let world = World::start(behaviour).await;
    let timeout = Duration::from_millis(300);
    // Before storing: nothing reaches Lago, everything stays pending.
    world.lago.set_delay(Duration::from_millis(600));
    let run = pipeline(&world, Duration::from_secs(5), timeout)
        .await
        .sync(&opts())
        .await
        .unwrap();
    assert_eq!((run.sent, run.failed), (0, 71));
    assert_eq!(world.lago.events().len(), 0);
    assert_eq!(
        ledger_counts(&world).await,
        counts(&[("pending", 71), ("unmapped", 1), ("ignored", 8)])
    );
    // After storing: Lago keeps the events, billsync never hears back.
    world.lago.set_delay(Duration::ZERO);
    world.lago.set_answer_delay(Duration::from_millis(600));
    let run = pipeline(&world, Duration::from_secs(5), timeout)
        .await
        .sync(&opts())
        .await
        .unwrap();
    match behaviour {
        // The retry meets value_already_exist at once: delivered in the same run.
        Behaviour::Postgres => {
            assert_eq!((run.sent, run.already_delivered, run.failed), (0, 71, 0));
            assert_complete(&world).await;
        }
        // The retry replaces the identical event and times out again: still pending, Lago
        // holds each key once.
        Behaviour::ClickHouse => {
            assert_eq!((run.sent, run.failed), (0, 71));
            assert_eq!(
                ledger_counts(&world).await,
                counts(&[("pending", 71), ("unmapped", 1), ("ignored", 8)])
            );
            assert_lago_holds_exactly(&world, None).await;
            world.lago.set_answer_delay(Duration::ZERO);
            let run = sync(&world).await;
            assert_eq!(run.sent, 71);
            assert_complete(&world).await;
        }
    }
}

#[tokio::test]
async fn lago_slower_than_the_timeout_postgres_store() {
    lago_slower_than_the_timeout(Behaviour::Postgres).await;
}

#[tokio::test]
async fn lago_slower_than_the_timeout_clickhouse_store() {
    lago_slower_than_the_timeout(Behaviour::ClickHouse).await;
}

async fn answer_lost_after_store(behaviour: Behaviour, mode: DropMode) {
    let world = World::start(behaviour).await;
    world.lago.store_then_drop_next(1, mode);
    let run = sync(&world).await;
    let retried_in_run = matches!(mode, DropMode::Status500 | DropMode::CloseConnection);
    if retried_in_run {
        // A transport error or a 5xx is retried at once with the same bytes.
        assert_eq!(run.sent + run.already_delivered, 71, "{mode:?}");
        if behaviour == Behaviour::Postgres {
            assert_eq!(run.already_delivered, 25, "{mode:?}");
        }
        assert_complete(&world).await;
        return;
    }
    // A 200 that is not Lago's answer is not proof of delivery: the batch stays pending,
    // although Lago stored it.
    assert_eq!((run.sent, run.failed), (46, 25), "{mode:?}");
    assert_eq!(
        ledger_counts(&world).await,
        counts(&[
            ("sent", 46),
            ("pending", 25),
            ("unmapped", 1),
            ("ignored", 8)
        ]),
        "{mode:?}"
    );
    assert_lago_holds_exactly(&world, None).await;
    let next = sync(&world).await;
    match behaviour {
        Behaviour::Postgres => assert_eq!((next.sent, next.already_delivered), (0, 25)),
        Behaviour::ClickHouse => assert_eq!((next.sent, next.already_delivered), (25, 0)),
    }
    assert_complete(&world).await;
}

#[tokio::test]
async fn connection_cut_or_answer_garbled_after_lago_stored_the_batch() {
    for behaviour in [Behaviour::Postgres, Behaviour::ClickHouse] {
        for mode in [
            DropMode::Status500,
            DropMode::CloseConnection,
            DropMode::TruncatedJson,
            DropMode::MalformedJson,
            DropMode::WrongShape,
        ] {
            answer_lost_after_store(behaviour, mode).await;
        }
    }
}

#[tokio::test]
async fn lago_200_with_truncated_malformed_or_wrong_shape_json_and_nothing_stored() {
    for body in [
        "{\"events\": [{\"lago_id\": \"x\", \"transac",
        "<html>upstream</html>",
        "{\"status\": \"ok\"}",
        "",
    ] {
        let world = World::start(Behaviour::Postgres).await;
        world.lago.answer_next(1, 200, body);
        let run = sync(&world).await;
        assert_eq!((run.sent, run.failed), (46, 25), "{body:?}");
        assert_eq!(
            ledger_counts(&world).await,
            counts(&[
                ("sent", 46),
                ("pending", 25),
                ("unmapped", 1),
                ("ignored", 8)
            ])
        );
        assert_lago_holds_exactly(&world, Some(46)).await;
        let next = sync(&world).await;
        assert_eq!(next.sent, 25);
        assert_complete(&world).await;
    }
}

/// A 422 whose body a proxy garbled (cut short) is not Lago's error format, so it says nothing
/// Lago could have said about the records: the way to Lago is at fault. It used to reject the
/// whole batch (25 records `rejected`, held until someone replayed them); now the sink stops
/// for the run, the records stay pending, and the next run delivers them.
#[tokio::test]
async fn lago_422_with_a_malformed_body_stops_the_sink_and_the_next_run_delivers_the_batch() {
    let world = World::start(Behaviour::Postgres).await;
    world
        .lago
        .answer_next(1, 422, "{\"status\": 422, \"error_deta");
    let run = sync(&world).await;
    assert_eq!(run.outcome, RunOutcome::SinkStopped, "{run:?}");
    assert_eq!((run.sent, run.rejected), (0, 0), "{run:?}");
    assert_eq!(
        ledger_counts(&world).await,
        counts(&[("pending", 71), ("unmapped", 1), ("ignored", 8)])
    );
    assert_lago_holds_exactly(&world, Some(0)).await;
    let next = sync(&world).await;
    assert_eq!((next.sent, next.rejected), (71, 0), "{next:?}");
    assert_complete(&world).await;
}

/// Lago answers the first batch's request 422 by index (event 0 already exists, event 1 is
/// invalid): both are settled there and then, and the rest of the batch is resent, to be
/// answered 401 (the key was rotated): the sink stops. The two settled outcomes used to be
/// dropped with the stop, both records left pending: the run's counts said nothing was
/// delivered or rejected, and the next run sent the invalid one again (rejected again) and the
/// one Lago already had. Now the stop carries what was settled before it.
#[tokio::test]
async fn outcomes_settled_in_a_batch_before_lago_stops_the_sink_are_recorded() {
    let world = World::start(Behaviour::Postgres).await;
    world.lago.answer_next(
        1,
        422,
        r#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"0":{"transaction_id":["value_already_exist"]},"1":{"properties":["invalid_value"]}}}"#,
    );
    world.lago.fail_next(1, 401);
    let run = sync(&world).await;
    assert_eq!(run.outcome, RunOutcome::SinkStopped, "{run:?}");
    assert_eq!(
        (run.sent, run.already_delivered, run.rejected),
        (0, 1, 1),
        "{run:?}"
    );
    assert_eq!(
        ledger_counts(&world).await,
        counts(&[
            ("sent", 1),
            ("rejected", 1),
            ("pending", 69),
            ("unmapped", 1),
            ("ignored", 8)
        ])
    );
    // Which ones: the first two events of the first request.
    let first: serde_json::Value = serde_json::from_str(&world.lago.bodies()[0]).unwrap();
    let key = |i: usize| {
        first["events"][i]["transaction_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let ledger = Ledger::open(&world.dir.path().join("ledger.db"))
        .await
        .unwrap();
    for (status, i) in [(Status::Sent, 0), (Status::Rejected, 1)] {
        let keys: Vec<String> = ledger
            .records_matching(&RecordFilter::status(status), 0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(keys, vec![key(i)], "{status:?}");
    }
    ledger.close().await;
    // The next run sends the 69 others and nothing else.
    let next = sync(&world).await;
    assert_eq!(
        (next.sent, next.already_delivered, next.rejected),
        (69, 0, 0),
        "{next:?}"
    );
}

/// The Lago sink's records in ledger id order (the order the push walks them): key, status,
/// attempts, last error.
async fn ledger_rows(world: &World) -> Vec<(String, String, i64, Option<String>)> {
    use sqlx::{Connection, Row};
    let path = world.dir.path().join("ledger.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let rows = sqlx::query(
        "SELECT idem_key, status, attempts, last_error FROM records WHERE sink = 'lago' ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Batch 1 is delivered (the window grows to two), then batches 2 and 3 go out together.
/// Lago answers batch 2 with its own 404 (a route gone: the sink stops) and batch 3 with a 422
/// by index (its last event invalid), the other four then delivered by the resend. Batch 3's
/// outcomes used to be dropped with the stop: four events Lago holds stayed `pending` with no
/// attempt (resent next run), the invalid one with no error. Now they are awaited and recorded.
#[tokio::test]
async fn lago_batches_in_flight_when_the_sink_stops_are_awaited_and_recorded() {
    use wiremock::matchers::{body_string_contains, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let world = World::start(Behaviour::Postgres).await;
    let server = MockServer::start().await;
    // The world's pipeline, its Lago sink sending batches of 5 to the mock server.
    let (world_ref, uri) = (&world, server.uri());
    let pipeline = move || {
        let uri = uri.clone();
        async move {
            let mut p = default_pipeline(world_ref).await;
            p.sinks = vec![Box::new(
                LagoSink::new(
                    "lago".into(),
                    LagoConfig {
                        api_url: uri,
                        api_key: Secret::new(LAGO_KEY),
                        batch_size: 5,
                        timeout: Duration::from_secs(5),
                        retry: fast_retry(),
                    },
                )
                .unwrap(),
            )];
            p
        }
    };
    // Stage only, to know which records make up each batch of 5 (the push walks by id).
    pipeline()
        .await
        .sync(&SyncOptions {
            skip_push: true,
            ..opts()
        })
        .await
        .unwrap();
    let pending: Vec<String> = ledger_rows(&world)
        .await
        .into_iter()
        .filter(|(_, status, _, _)| status == "pending")
        .map(|(key, ..)| key)
        .collect();
    assert_eq!(pending.len(), DELIVERED);
    let (second, third) = (&pending[5..10], &pending[10..15]);
    Mock::given(method("POST"))
        .and(body_string_contains(format!("\"{}\"", second[0])))
        .respond_with(
            ResponseTemplate::new(404).set_body_string(
                r#"{"status":404,"error":"Not Found","code":"resource_not_found"}"#,
            ),
        )
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains(format!("\"{}\"", third[4])))
        .respond_with(ResponseTemplate::new(422).set_body_string(
            r#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"4":{"properties":["invalid_value"]}}}"#,
        ))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/events/batch"))
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"events":[]}"#))
        .with_priority(5)
        .mount(&server)
        .await;

    let run = pipeline().await.sync(&opts()).await.unwrap();
    assert_eq!(run.outcome, RunOutcome::SinkStopped, "{run:?}");
    assert_eq!((run.sent, run.rejected), (9, 1), "{run:?}");
    let rows: BTreeMap<String, (String, i64, Option<String>)> = ledger_rows(&world)
        .await
        .into_iter()
        .map(|(key, status, attempts, error)| (key, (status, attempts, error)))
        .collect();
    for key in &third[..4] {
        assert_eq!(rows[key], ("sent".to_string(), 1, None), "{key}");
    }
    let (status, attempts, error) = &rows[&third[4]];
    assert_eq!((status.as_str(), *attempts), ("rejected", 1), "{error:?}");
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("invalid_value")),
        "{error:?}"
    );
    for key in second {
        assert_eq!(rows[key], ("pending".to_string(), 0, None), "{key}");
    }
    // Lago was sent batch 1, 2 and 3, and the resend of batch 3's four valid events: nothing
    // else (no batch started after the stop).
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 4, "{}", requests.len());
}

// ----- provider side --------------------------------------------------------------------

#[tokio::test]
async fn provider_500_502_503_and_429_are_retried() {
    for fault in [
        Fault::Http(500),
        Fault::Http(502),
        Fault::Http(503),
        Fault::RateLimited {
            retry_after_secs: 0,
        },
    ] {
        let world = World::start(Behaviour::Postgres).await;
        world.metalsoft.fail_next(3, fault.clone());
        let run = sync(&world).await;
        assert_eq!(run.outcome, RunOutcome::Undelivered, "{fault:?}");
        assert_eq!(run.sent, 71, "{fault:?}");
        assert_complete(&world).await;
    }
}

#[tokio::test]
async fn provider_429_with_retry_after_is_waited() {
    let world = World::start(Behaviour::Postgres).await;
    world.metalsoft.fail_next(
        1,
        Fault::RateLimited {
            retry_after_secs: 1,
        },
    );
    let started = Instant::now();
    let run = honouring_pipeline(&world)
        .await
        .sync(&opts())
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was waited"
    );
    assert_eq!(run.sent, 71);
    assert_complete(&world).await;
}

/// A failure that outlasts the retries on the first chunk: nothing is staged, no cursor moves,
/// nothing is sent; the next run does everything once.
async fn first_chunk_fails_then_recovers(world: &World, run: RunSummary, what: &str) {
    assert_eq!(run.outcome, RunOutcome::ProviderFailed, "{what}");
    assert_eq!((run.pulled, run.sent), (0, 0), "{what}");
    assert!(
        run.sources["metalsoft_test"].error.is_some(),
        "{what}: the error is reported"
    );
    assert_eq!(ledger_counts(world).await, counts(&[]), "{what}");
    assert_eq!(world.lago.events().len(), 0, "{what}");
    world.metalsoft.clear_faults();
    let next = sync(world).await;
    assert_eq!(next.sent, 71, "{what}");
    assert_complete(world).await;
}

#[tokio::test]
async fn provider_5xx_past_the_retries_fails_the_source_and_the_next_run_recovers() {
    let world = World::start(Behaviour::Postgres).await;
    // Every attempt at user 1's first window fails, whatever order the windows are asked in.
    world
        .metalsoft
        .fail_window(1, billsync::demo::demo_start(), Fault::Http(503));
    let run = sync(&world).await;
    first_chunk_fails_then_recovers(&world, run, "503 on every attempt").await;
}

#[tokio::test]
async fn provider_window_failing_among_concurrent_requests_stops_staging_at_that_window() {
    window_failing_among_concurrent_requests().await;
}

/// As above with the stager on its own thread (the binary's multi-threaded runtime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_window_failing_with_the_stager_on_its_own_thread_stops_staging_there() {
    window_failing_among_concurrent_requests().await;
}

async fn window_failing_among_concurrent_requests() {
    // Windows are requested four at a time (MetalSoft's default); the third day of user 1 keeps
    // failing. Everything before it in plan order is staged and sent, nothing after it, though
    // later windows were already answered; the next run does the rest, every key once.
    let world = World::start(Behaviour::Postgres).await;
    let first = world.metalsoft.dataset().earliest().unwrap();
    let failing = first + chrono::Duration::days(2);
    world.metalsoft.fail_window(1, failing, Fault::Http(500));
    let run = sync(&world).await;
    assert_eq!(run.outcome, RunOutcome::ProviderFailed);
    let events = world.lago.events();
    assert!(
        !events.is_empty(),
        "the windows before the failing one went out"
    );
    assert!(
        events.iter().all(|e| e.timestamp < failing),
        "nothing at or after the failing window was staged: {:?}",
        events.iter().map(|e| e.timestamp).max()
    );
    world.metalsoft.clear_faults();
    let next = sync(&world).await;
    assert_eq!(next.sent + run.sent, 71);
    assert_complete(&world).await;
}

#[tokio::test]
async fn provider_slower_than_the_timeout_is_retried_then_fails_cleanly() {
    // One slow answer: the retry succeeds.
    let world = World::start(Behaviour::Postgres).await;
    world
        .metalsoft
        .fail_next(1, Fault::Slow(Duration::from_millis(800)));
    let run = pipeline(&world, Duration::from_millis(300), Duration::from_secs(5))
        .await
        .sync(&opts())
        .await
        .unwrap();
    assert_eq!(run.sent, 71);
    assert_complete(&world).await;
    // Always slow: the source fails, nothing is staged.
    let world = World::start(Behaviour::Postgres).await;
    world.metalsoft.set_delay(Duration::from_millis(800));
    let run = pipeline(&world, Duration::from_millis(300), Duration::from_secs(5))
        .await
        .sync(&opts())
        .await
        .unwrap();
    world.metalsoft.set_delay(Duration::ZERO);
    first_chunk_fails_then_recovers(&world, run, "slow").await;
}

#[tokio::test]
async fn provider_truncated_malformed_and_wrong_shape_answers_fail_the_source_without_staging() {
    for fault in [Fault::Truncated, Fault::Malformed, Fault::WrongShape] {
        let world = World::start(Behaviour::Postgres).await;
        // A persistent fault of the first window (every retry gets it).
        world
            .metalsoft
            .fail_window(1, billsync::demo::demo_start(), fault.clone());
        let run = sync(&world).await;
        first_chunk_fails_then_recovers(&world, run, &format!("{fault:?}")).await;
    }
}

#[tokio::test]
async fn provider_empty_pages_move_the_cursor_and_stage_nothing() {
    // Every answer empty: the cursors move to the end, nothing is staged or sent.
    let world = World::start(Behaviour::Postgres).await;
    world.metalsoft.fail_next(1000, Fault::Empty);
    let p = default_pipeline(&world).await;
    let run = p.sync(&opts()).await.unwrap();
    let requests = world.metalsoft.request_count();
    assert_eq!(run.outcome, RunOutcome::Ok);
    assert_eq!((run.pulled, run.new, run.sent), (0, 0, 0));
    assert_eq!(ledger_counts(&world).await, counts(&[]));
    assert_eq!(world.lago.events().len(), 0);
    let cursors = p.ledger.status().await.unwrap().cursors;
    assert_eq!(
        cursors
            .iter()
            .map(|c| c.stream.as_str())
            .collect::<Vec<_>>(),
        ["user:1", "user:2", "window"],
        "one cursor per user, and the window they were read with"
    );
    // The data the provider hid is only re-read within the look-back: the next run asks
    // again only one window per user. What the empty answers hid is not billed — a provider
    // that lies with an empty page cannot be detected by a client.
    world.metalsoft.clear_faults();
    world.metalsoft.clear_calls();
    let next = sync(&world).await;
    assert_eq!(
        world.metalsoft.request_count(),
        2,
        "one look-back window per user"
    );
    assert!(requests > 2);
    let held = world.lago.counts();
    assert!(held.values().all(|&n| n == 1));
    assert_eq!(next.sent as usize, held.len());
}

#[tokio::test]
async fn provider_duplicated_lines_in_one_page_are_staged_and_sent_once() {
    let world = World::start(Behaviour::Postgres).await;
    world.metalsoft.fail_next(1000, Fault::DuplicateLines);
    let run = sync(&world).await;
    world.metalsoft.clear_faults();
    assert!(
        run.pulled > 80,
        "the duplicates were pulled: {}",
        run.pulled
    );
    assert_eq!(run.sent, 71);
    assert_complete(&world).await;
}

/// The MetalSoft provider of the world with another window length and look-back.
fn metalsoft_with(
    world: &World,
    window: chrono::Duration,
    look_back: chrono::Duration,
) -> MetalsoftProvider {
    let mut cfg = billsync::providers::metalsoft::MetalsoftConfig::new(
        world.metalsoft.url.clone(),
        Secret::new(world::MS_KEY),
        vec![1, 2],
        billsync::demo::demo_start(),
    );
    cfg.window = window;
    cfg.settle_delay = chrono::Duration::hours(2);
    cfg.look_back = Some(look_back);
    cfg.retry = fast_retry();
    MetalsoftProvider::new("metalsoft_test".into(), cfg).unwrap()
}

/// One sync of `provider` into Lago on the world's ledger, at `now`.
async fn run_with(
    world: &World,
    provider: MetalsoftProvider,
    now: chrono::DateTime<chrono::Utc>,
) -> RunSummary {
    let p = Pipeline::new(
        Ledger::open(&world.dir.path().join("ledger.db"))
            .await
            .unwrap(),
        vec![Box::new(provider)],
        vec![Box::new(world.sink_with_key(LAGO_KEY))],
        MappingSet::examples().unwrap(),
    );
    p.sync(&SyncOptions {
        now: Some(now),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A page that shifted between reads (window N's lines answered for window N+1, stamped with
/// N+1's bounds) is refused as a whole: its lines lie outside the window asked for. Nothing of
/// it is staged or billed, the cursor stays, and the correct read bills every key once.
#[tokio::test]
async fn provider_pages_that_shift_between_reads_do_not_bill_twice() {
    // A look-back of 60 days: the second run re-reads every window. (A shifted page that
    // happens to be empty cannot be told from an empty window; the look-back is what re-reads
    // such a window. Here that happens to the data's first day: asked for it, the shifted
    // server answers the empty day before, which is accepted.)
    let world = World::start(Behaviour::ClickHouse).await;
    let reread = |world: &World| {
        metalsoft_with(world, chrono::Duration::days(1), chrono::Duration::days(60))
    };
    // First read: every page holds the lines of the window before it. Billsync must refuse
    // such a page rather than key its lines to the wrong window.
    world.metalsoft.fail_next(1000, Fault::ShiftedBack);
    let first = run_with(&world, reread(&world), now()).await;
    assert_eq!(first.outcome, RunOutcome::ProviderFailed, "{first:?}");
    assert!(
        first.sources["metalsoft_test"]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("outside the requested window")),
        "{first:?}"
    );
    assert_eq!((first.new, first.sent), (0, 0), "nothing of it staged");
    assert!(world.lago.events().is_empty());
    world.metalsoft.clear_faults();
    // Second read: correct. Every key once, totals to the cent.
    let second = run_with(&world, reread(&world), now()).await;
    assert_eq!(second.outcome, RunOutcome::Undelivered, "{second:?}");
    assert_eq!(world.lago.events().len(), DELIVERED);
    assert_complete(&world).await;
}

/// `window` changed from one hour to one day under an existing ledger. The server cuts lines
/// at the window asked for, so the look-back re-read in days would return a resource's day as
/// one line where 24 hour lines were staged (one key shared, 23 new: billed twice). The run
/// refuses the source instead, naming both windows; nothing is asked or sent, and the hours
/// stay billed once.
#[tokio::test]
async fn provider_a_changed_window_is_refused_instead_of_billing_the_overlap_twice() {
    let from = billsync::demo::demo_start();
    let to = from + chrono::Duration::days(2);
    let dataset = billsync::simulators::metalsoft::MetalsoftDataset::generated(2, 40, 8, from, to);
    let world = World::start_with(Behaviour::ClickHouse, dataset).await;
    let now = to + chrono::Duration::hours(3);

    let hourly = run_with(
        &world,
        metalsoft_with(
            &world,
            chrono::Duration::hours(1),
            chrono::Duration::hours(1),
        ),
        now,
    )
    .await;
    assert_eq!(hourly.outcome, RunOutcome::Ok, "{hourly:?}");
    assert!(hourly.sent > 50, "{hourly:?}");

    world.metalsoft.clear_calls();
    let daily = run_with(
        &world,
        metalsoft_with(&world, chrono::Duration::days(1), chrono::Duration::days(5)),
        now + chrono::Duration::days(1),
    )
    .await;
    assert_eq!(daily.outcome, RunOutcome::ProviderFailed, "{daily:?}");
    let error = daily.sources["metalsoft_test"]
        .error
        .clone()
        .unwrap_or_default();
    assert!(
        error.contains("`window` is 1day") && error.contains("windows of 1h"),
        "{error}"
    );
    assert_eq!(world.metalsoft.request_count(), 0, "nothing was re-read");
    assert_eq!((daily.new, daily.sent), (0, 0), "{daily:?}");
    assert_eq!(world.lago.events().len() as u64, hourly.sent);
    assert!(world.lago.counts().values().all(|&n| n == 1));
}

#[tokio::test]
async fn provider_the_same_record_twice_in_two_reads_is_billed_once() {
    // A full re-read (look-back) of unchanged pages: every record is seen twice, staged once.
    let world = World::start(Behaviour::ClickHouse).await;
    let first = sync(&world).await;
    assert_eq!(first.sent, 71);
    world.metalsoft.fail_next(1000, Fault::DuplicateLines);
    let again = sync(&world).await;
    world.metalsoft.clear_faults();
    assert_eq!((again.new, again.sent), (0, 0));
    assert_complete(&world).await;
}
