//! The core promise, end to end against the simulators: every usage record reaches Lago
//! exactly once in effect — through crashes, retries and refusals — and nothing is dropped.
//! Totals are compared as exact decimals, to the cent and beyond.

#[path = "common/openapi.rs"]
mod openapi;
#[path = "common/world.rs"]
mod world;

use billsync::ledger::{LedgerError, RecordFilter, Status};
use billsync::mapping::MappingSet;
use billsync::simulators::lago::{Behaviour, DropMode};
use billsync::simulators::metalsoft::Fault;
use billsync::sinks::Sink;
use billsync::sync::{ReplayOptions, RunOutcome, SyncError, SyncOptions};
use world::{now, World, LAGO_KEY};

fn opts() -> SyncOptions {
    SyncOptions {
        now: Some(now()),
        ..Default::default()
    }
}

/// Every key Lago holds is held once, and Lago's totals are what the mapping says.
async fn assert_delivered_exactly_once(world: &World) {
    let mappings = MappingSet::examples().unwrap();
    let (expected_totals, expected_keys) = world.expected(&mappings).await;
    let counts = world.lago.counts();
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        expected_keys.keys().cloned().collect::<Vec<_>>(),
        "Lago holds exactly the expected keys"
    );
    assert!(
        counts.values().all(|&n| n == 1),
        "a key stored twice: {counts:?}"
    );
    assert_eq!(world.lago_totals(), expected_totals);
    if let Some(validator) = openapi::batch_validator() {
        for body in world.lago.bodies() {
            openapi::check_batch_body(&validator, &body)
                .expect("request body matches the Lago spec");
        }
    }
}

#[tokio::test]
async fn a_sync_delivers_every_mapped_record_once_and_a_second_sync_sends_nothing() {
    delivers_once_then_nothing().await;
}

/// The binary's runtime has several threads, and there the stager runs on a thread of its own
/// beside the puller (tests on one thread await both in one task): the same outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_stager_on_its_own_thread_a_sync_delivers_every_record_once() {
    delivers_once_then_nothing().await;
}

async fn delivers_once_then_nothing() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    let first = pipeline.sync(&opts()).await.unwrap();
    assert_eq!(first.sent, 71);
    assert_eq!(
        first.held(),
        1,
        "the reservation installment has no rule and is held"
    );
    assert_eq!(first.outcome, RunOutcome::Undelivered);
    assert_delivered_exactly_once(&world).await;
    let ledger_totals: std::collections::BTreeMap<_, _> = pipeline
        .ledger
        .sent_totals(first.run_id.unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|((_, subscription, metric), v)| ((subscription, metric), v))
        .collect();
    assert_eq!(ledger_totals, world.lago_totals());

    let requests = world.lago.request_count();
    let second = pipeline.sync(&opts()).await.unwrap();
    assert_eq!((second.sent, second.new), (0, 0));
    assert_eq!(
        world.lago.request_count(),
        requests,
        "nothing was sent again"
    );
    assert_delivered_exactly_once(&world).await;
}

#[tokio::test]
async fn a_crash_after_staging_is_resumed_by_the_next_run() {
    let world = World::start(Behaviour::Postgres).await;
    {
        // The run stages every page with its cursor, then dies before pushing.
        let pipeline = world.pipeline().await;
        let staged = pipeline
            .sync(&SyncOptions {
                skip_push: true,
                ..opts()
            })
            .await
            .unwrap();
        assert_eq!(staged.mapped(), 71);
        assert_eq!(world.lago.request_count(), 0);
    }
    let restarted = world.pipeline().await;
    let run = restarted.sync(&opts()).await.unwrap();
    assert_eq!(run.new, 0, "the cursor was stored with the staged pages");
    assert_eq!(run.sent, 71, "the outbox is pushed by the next run");
    assert_delivered_exactly_once(&world).await;
}

/// Push every pending record to Lago (which stores them) and commit no acknowledgement: what
/// a crash right after the requests leaves behind.
async fn deliver_without_acknowledging(world: &World, pipeline: &billsync::sync::Pipeline) {
    let sink = world.sink_with_key(LAGO_KEY);
    let mut after = 0;
    loop {
        let batch = pipeline
            .ledger
            .pending_batch("lago", after, 25)
            .await
            .unwrap();
        let Some(last) = batch.last() else { break };
        after = last.id;
        sink.deliver(&batch).await.unwrap();
    }
}

async fn crash_between_lago_storing_and_the_ledger_recording(behaviour: Behaviour) {
    let world = World::start(behaviour).await;
    {
        let pipeline = world.pipeline().await;
        pipeline
            .sync(&SyncOptions {
                skip_push: true,
                ..opts()
            })
            .await
            .unwrap();
        // The push reaches Lago, which stores every batch; the process dies before the
        // acknowledgements are committed.
        deliver_without_acknowledging(&world, &pipeline).await;
        assert_eq!(world.lago.events().len(), 71);
    }
    let restarted = world.pipeline().await;
    let run = restarted.sync(&opts()).await.unwrap();
    assert_eq!(run.sent + run.already_delivered, 71);
    if behaviour == Behaviour::Postgres {
        assert_eq!(
            run.already_delivered, 71,
            "Lago answered value_already_exist"
        );
    }
    assert_eq!(
        restarted.ledger.undelivered().await.unwrap(),
        1,
        "only the held record"
    );
    assert_delivered_exactly_once(&world).await;
}

#[tokio::test]
async fn a_crash_after_lago_stored_a_batch_ends_with_each_key_once_postgres_store() {
    crash_between_lago_storing_and_the_ledger_recording(Behaviour::Postgres).await;
}

#[tokio::test]
async fn a_crash_after_lago_stored_a_batch_ends_with_each_key_once_clickhouse_store() {
    // The ClickHouse store bills a re-sent key again if its timestamp differs: the frozen
    // payload keeps it identical, so the resend replaces instead of adding.
    crash_between_lago_storing_and_the_ledger_recording(Behaviour::ClickHouse).await;
}

#[tokio::test]
async fn a_lost_answer_after_lago_stored_the_batch_is_retried_without_double_billing() {
    for mode in [DropMode::Status500, DropMode::CloseConnection] {
        let world = World::start(Behaviour::Postgres).await;
        world.lago.store_then_drop_next(1, mode);
        let run = world.pipeline().await.sync(&opts()).await.unwrap();
        assert_eq!(run.sent + run.already_delivered, 71, "{mode:?}");
        assert!(
            run.already_delivered >= 1,
            "{mode:?}: the retried batch was a duplicate"
        );
        assert_delivered_exactly_once(&world).await;
    }
}

#[tokio::test]
async fn server_errors_and_rate_limits_are_retried_with_identical_bodies() {
    let world = World::start(Behaviour::Postgres).await;
    world.lago.fail_next(1, 503);
    world.lago.rate_limit_next(1, Some(0));
    world.lago.fail_next(1, 500);
    let run = world.pipeline().await.sync(&opts()).await.unwrap();
    assert_eq!(run.sent, 71);
    assert_eq!(run.failed, 0);
    let bodies = world.lago.bodies();
    assert!(bodies.len() > 3);
    assert_eq!(bodies[0], bodies[1], "a retry resends the frozen bytes");
    assert_delivered_exactly_once(&world).await;
}

#[tokio::test]
async fn a_refused_api_key_stops_the_sink_and_keeps_every_record_pending() {
    let world = World::start(Behaviour::Postgres).await;
    let run = world
        .pipeline_with(MappingSet::examples().unwrap(), "rotated-key")
        .await
        .sync(&opts())
        .await
        .unwrap();
    assert_eq!(run.outcome, RunOutcome::SinkStopped);
    assert!(run.sink_errors[0].contains("401"), "{:?}", run.sink_errors);
    assert_eq!(
        world.lago.request_count(),
        1,
        "no retries burnt on a bad key"
    );
    assert_eq!(world.lago.events().len(), 0);

    let fixed = world.pipeline().await.sync(&opts()).await.unwrap();
    assert_eq!(fixed.sent, 71);
    assert_delivered_exactly_once(&world).await;
}

#[tokio::test]
async fn a_record_lago_rejects_is_held_with_the_reason_and_the_rest_is_delivered() {
    let world = World::start(Behaviour::Postgres).await;
    let mappings = MappingSet::examples().unwrap();
    let (_, keys) = world.expected(&mappings).await;
    let victim = keys.keys().nth(3).unwrap().clone();
    world.lago.reject_transaction(victim.clone());
    let pipeline = world.pipeline().await;
    let run = pipeline.sync(&opts()).await.unwrap();
    assert_eq!((run.sent, run.rejected), (70, 1));
    let rejected = pipeline
        .ledger
        .records_matching(&RecordFilter::status(Status::Rejected), 0, 10)
        .await
        .unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].key, victim);

    // Once Lago accepts it, replaying the rejected record delivers it.
    world.lago.clear_faults();
    let replay = pipeline
        .replay(&ReplayOptions {
            filter: RecordFilter::status(Status::Rejected),
            dry_run: false,
            reason: "metric fixed in Lago".into(),
            now: Some(now()),
        })
        .await
        .unwrap();
    assert_eq!(replay.sent, 1);
    assert_delivered_exactly_once(&world).await;
}

/// Lago behind a key that is rotated while a run pushes: the last, partial batch goes out with
/// the rotated key and Lago answers it 401, while the batch before it is still being answered.
struct RotatedDuringThePush {
    valid: billsync::sinks::lago::LagoSink,
    rotated: billsync::sinks::lago::LagoSink,
}

#[async_trait::async_trait]
impl Sink for RotatedDuringThePush {
    fn kind(&self) -> &'static str {
        self.valid.kind()
    }
    fn name(&self) -> &str {
        self.valid.name()
    }
    fn max_batch(&self) -> usize {
        self.valid.max_batch()
    }
    fn encode(
        &self,
        key: &str,
        event: &billsync::mapping::MappedEvent,
    ) -> Result<String, billsync::sinks::EncodeError> {
        self.valid.encode(key, event)
    }
    async fn deliver(
        &self,
        batch: &[billsync::sinks::Outgoing],
    ) -> Result<Vec<billsync::sinks::Outcome>, billsync::sinks::SinkStopped> {
        if batch.len() < self.valid.max_batch() {
            self.rotated.deliver(batch).await
        } else {
            self.valid.deliver(batch).await
        }
    }
}

/// A sink that stops mid-run (a key rotated while batches are in flight) stops the run's push,
/// but what Lago stored before is acknowledged in that run: left pending it would be sent
/// again by the next one, and only a sink that deduplicates would keep that from billing twice.
#[tokio::test]
async fn what_lago_stored_before_a_key_rotated_mid_push_is_recorded_as_sent() {
    let world = World::start(Behaviour::Postgres).await;
    let mut pipeline = world.pipeline().await;
    // Everything is staged first, so the push reads all 71 records at once: batches of 25,
    // 25 and 21, the second and third in flight together.
    pipeline
        .sync(&SyncOptions {
            skip_push: true,
            ..opts()
        })
        .await
        .unwrap();
    pipeline.sinks = vec![Box::new(RotatedDuringThePush {
        valid: world.sink_with_key(LAGO_KEY),
        rotated: world.sink_with_key("rotated-key"),
    })];
    let run = pipeline.sync(&opts()).await.unwrap();
    assert_eq!(run.outcome, RunOutcome::SinkStopped, "{run:?}");
    assert!(run.sink_errors[0].contains("401"), "{:?}", run.sink_errors);
    assert_eq!(world.lago.events().len(), 50, "the two full batches");
    assert_eq!(run.sent, 50);
    assert_eq!(
        pipeline.ledger.pending_count("lago").await.unwrap(),
        21,
        "every record Lago stored is acknowledged; only the refused batch is pending"
    );
    let requests = world.lago.request_count();

    let next = world.pipeline().await.sync(&opts()).await.unwrap();
    assert_eq!(
        (next.sent, next.already_delivered),
        (21, 0),
        "only the refused batch is sent again"
    );
    assert_eq!(world.lago.request_count(), requests + 1);
    assert_delivered_exactly_once(&world).await;
}

const RESERVATION_RULE: &str = r#"
version: 1
rules:
  - name: reservation-installments
    match:
      resource_type: reservation_installment
    metric: reservation_cost
    property: amount
    value:
      cost: {}
    round: { scale: 2, mode: half_up }
"#;

/// The example mappings plus [`RESERVATION_RULE`]: the mapping fix the held record waits for.
fn mappings_with_the_reservation_rule() -> MappingSet {
    let mut sources: Vec<(String, String)> = billsync::mapping::EXAMPLE_MAPPINGS
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    sources.push(("reservations.yaml".into(), RESERVATION_RULE.into()));
    MappingSet::from_sources(&sources).unwrap()
}

#[tokio::test]
async fn an_unmapped_record_is_held_then_delivered_by_replay_after_a_mapping_fix() {
    let world = World::start(Behaviour::Postgres).await;
    let run = world.pipeline().await.sync(&opts()).await.unwrap();
    assert_eq!(run.held(), 1);
    assert_eq!(world.lago.events().len(), 71);

    let fixed = mappings_with_the_reservation_rule();
    let pipeline = world.pipeline_with(fixed, LAGO_KEY).await;

    let dry = pipeline
        .replay(&ReplayOptions {
            filter: RecordFilter::status(Status::Unmapped),
            dry_run: true,
            reason: "added the reservation rule".into(),
            now: Some(now()),
        })
        .await
        .unwrap();
    assert_eq!(dry.staged_by_status.get("pending"), Some(&1));
    assert_eq!(
        pipeline.ledger.undelivered().await.unwrap(),
        1,
        "a dry run changes nothing"
    );

    let replay = pipeline
        .replay(&ReplayOptions {
            filter: RecordFilter::status(Status::Unmapped),
            dry_run: false,
            reason: "added the reservation rule".into(),
            now: Some(now()),
        })
        .await
        .unwrap();
    assert_eq!(replay.sent, 1);
    assert_eq!(replay.outcome, RunOutcome::Ok);
    assert_eq!(pipeline.ledger.undelivered().await.unwrap(), 0);
    let stored = world
        .lago
        .events()
        .into_iter()
        .filter(|e| e.code == "reservation_cost")
        .collect::<Vec<_>>();
    assert_eq!(stored.len(), 1);
    // The 2020 example's installment: 119.81 GBP, stated as a JSON number, sent exactly.
    assert_eq!(stored[0].properties["amount"], "119.81");
}

/// The example mappings with their `subnets-free` rule (`ignore: true`) turned into one that
/// bills subnets: the fix after deciding subnets are resold after all.
fn mappings_billing_subnets() -> MappingSet {
    let ignore = "  - name: subnets-free\n    match:\n      provider: metalsoft\n      \
                  resource_type: subnet\n    ignore: true\n";
    let bill = "  - name: subnets-billed\n    match:\n      provider: metalsoft\n      \
                resource_type: subnet\n    metric: subnet_cost\n    property: amount\n    \
                value:\n      cost: {}\n    round: { scale: 2, mode: half_up }\n";
    let sources: Vec<(String, String)> = billsync::mapping::EXAMPLE_MAPPINGS
        .iter()
        .map(|(n, t)| {
            let t = t.to_string();
            (
                n.to_string(),
                if t.contains(ignore) {
                    t.replace(ignore, bill)
                } else {
                    t
                },
            )
        })
        .collect();
    assert!(
        sources.iter().any(|(_, t)| t.contains("subnets-billed")),
        "the example mappings still have the subnets-free rule"
    );
    MappingSet::from_sources(&sources).unwrap()
}

/// A rule that ignored too much is fixed: `replay --status ignored` re-maps what it caught and
/// sends what now maps, once (re-reading the provider would not: the same content is a no-op).
/// Records `ledger vacuum` pruned to a tombstone cannot be re-mapped: the replay counts them and
/// leaves them, instead of failing on their empty body.
#[tokio::test]
async fn ignored_records_are_billed_by_replay_after_the_rule_is_fixed_and_pruned_ones_are_counted()
{
    let replay = |dry_run| ReplayOptions {
        filter: RecordFilter::status(Status::Ignored),
        dry_run,
        reason: "subnets are resold".into(),
        now: Some(now()),
    };
    let world = World::start(Behaviour::Postgres).await;
    let run = world.pipeline().await.sync(&opts()).await.unwrap();
    let subnets = run.staged_by_status["ignored"];
    assert!(subnets > 0, "{run:?}");
    let pipeline = world
        .pipeline_with(mappings_billing_subnets(), LAGO_KEY)
        .await;
    let billed = || {
        world
            .lago
            .events()
            .into_iter()
            .filter(|e| e.code == "subnet_cost")
            .count() as u64
    };
    let replayed = pipeline.replay(&replay(false)).await.unwrap();
    assert_eq!(
        (replayed.pulled, replayed.sent),
        (subnets, subnets),
        "{replayed:?}"
    );
    assert_eq!(billed(), subnets);
    // Once more: nothing is ignored any longer, nothing goes out again.
    let again = pipeline.replay(&replay(false)).await.unwrap();
    assert_eq!((again.pulled, again.sent), (0, 0), "{again:?}");
    assert_eq!(billed(), subnets);

    // Another ledger, pruned before the fix: its ignored records are tombstones now.
    let world = World::start(Behaviour::Postgres).await;
    world.pipeline().await.sync(&opts()).await.unwrap();
    let pipeline = world
        .pipeline_with(mappings_billing_subnets(), LAGO_KEY)
        .await;
    let ttl = std::time::Duration::from_secs(60);
    let ledger = &pipeline.ledger;
    ledger
        .acquire_lock("vacuum", chrono::Utc::now(), ttl)
        .await
        .unwrap();
    let cutoff = chrono::Utc::now() + chrono::Duration::days(1);
    assert!(ledger.vacuum(cutoff, "vacuum", ttl).await.unwrap().pruned >= subnets);
    ledger.release_lock("vacuum").await.unwrap();
    let after = pipeline.replay(&replay(false)).await.unwrap();
    assert_eq!(
        (after.pulled, after.sent, after.pruned),
        (0, 0, subnets),
        "{after:?}"
    );
    let text = billsync::observe::summary_text(&after);
    assert!(
        text.contains("not replayable (pruned by `ledger vacuum`) "),
        "{text}"
    );
}

/// A held record that a replay re-maps goes out for its charge period as a record a sync stages
/// does, and is judged late by the same rule: the reservation installment (its period ends
/// 2026-11-27 20:38 UTC) replayed two days later than that, within the source's usual lateness,
/// is not late; replayed on 10 December, when the invoice of its period may be finalized (Lago
/// would store it without billing it), it is flagged in the replay's summary (`1 LATE`) and
/// in the replay's `billsync_records_late`.
#[tokio::test]
async fn a_held_record_replayed_later_than_its_sources_lateness_after_its_period_is_flagged_late() {
    for (replayed_at, late) in [("2026-11-29T12:00:00Z", 0), ("2026-12-10T12:00:00Z", 1)] {
        let world = World::start(Behaviour::Postgres).await;
        let run = world.pipeline().await.sync(&opts()).await.unwrap();
        assert_eq!(run.held(), 1);

        let mut pipeline = world
            .pipeline_with(mappings_with_the_reservation_rule(), LAGO_KEY)
            .await;
        // The world's source reads daily windows with the default look-back (one window) and
        // `settle_delay: 2h`: its records normally reach the sinks within 1d + 1d + 2h, plus
        // an hourly run, of their period's end (what `billsync replay` sets from the settings).
        pipeline.late_after.insert(
            "metalsoft_test".into(),
            chrono::Duration::days(2) + chrono::Duration::hours(3),
        );
        let held = pipeline
            .ledger
            .records_matching(&RecordFilter::status(Status::Unmapped), 0, 10)
            .await
            .unwrap();
        let replayed_at: chrono::DateTime<chrono::Utc> = replayed_at.parse().unwrap();
        assert!(
            held[0].record.charge_period_end < replayed_at,
            "replayed after its period ended: {:?}",
            held[0].record
        );

        let replay = |dry_run| ReplayOptions {
            filter: RecordFilter::status(Status::Unmapped),
            dry_run,
            reason: "added the reservation rule".into(),
            now: Some(replayed_at),
        };
        // A dry run says so beforehand.
        let dry = pipeline.replay(&replay(true)).await.unwrap();
        let flagged = dry.sources.get("metalsoft_test").map_or(0, |s| s.late);
        assert_eq!(flagged, late, "dry run at {replayed_at}: {dry:?}");

        let replay = pipeline.replay(&replay(false)).await.unwrap();
        assert_eq!(replay.sent, 1, "{replay:?}");
        let flagged = replay.sources.get("metalsoft_test").map_or(0, |s| s.late);
        assert_eq!(flagged, late, "replayed at {replayed_at}: {replay:?}");
        let text = billsync::observe::summary_text(&replay);
        assert_eq!(
            text.contains(" LATE "),
            late > 0,
            "replayed at {replayed_at}:\n{text}"
        );
        let gauges = pipeline.ledger.gauges().await.unwrap();
        let metrics = billsync::observe::render_metrics(
            &replay,
            &gauges,
            None,
            replayed_at,
            &["lago".into()],
        );
        let line = format!(
            "billsync_records_late{{source=\"metalsoft_test\",provider=\"metalsoft\"}} {late}\n"
        );
        assert!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
    }
}

/// A replay asked to stop (SIGTERM) stops re-mapping between pages, sends nothing it has not
/// re-mapped, and ends interrupted; the held record waits, unchanged, for the next replay.
#[tokio::test]
async fn a_replay_asked_to_stop_re_maps_nothing_more_and_holds_what_is_left() {
    let world = World::start(Behaviour::Postgres).await;
    let run = world.pipeline().await.sync(&opts()).await.unwrap();
    assert_eq!(run.held(), 1);

    let fixed = mappings_with_the_reservation_rule();
    let mut pipeline = world.pipeline_with(fixed, LAGO_KEY).await;
    let (trigger, shutdown) = billsync::shutdown::channel();
    pipeline.shutdown = shutdown;
    trigger.trigger();

    let replay = pipeline
        .replay(&ReplayOptions {
            filter: RecordFilter::status(Status::Unmapped),
            dry_run: false,
            reason: "added the reservation rule".into(),
            now: Some(now()),
        })
        .await
        .unwrap();
    assert_eq!(replay.outcome, RunOutcome::Interrupted, "{replay:?}");
    assert_eq!((replay.pulled, replay.sent), (0, 0), "{replay:?}");
    let held = pipeline
        .ledger
        .records_matching(&RecordFilter::status(Status::Unmapped), 0, 10)
        .await
        .unwrap();
    assert_eq!(held.len(), 1, "the held record is still held");
    assert_eq!(world.lago.events().len(), 71);
}

#[tokio::test]
async fn a_provider_failure_is_reported_and_the_next_run_completes() {
    let world = World::start(Behaviour::Postgres).await;
    // Every attempt (1 + 3 retries) of the first window fails.
    world
        .metalsoft
        .fail_window(1, billsync::demo::demo_start(), Fault::Http(500));
    let pipeline = world.pipeline().await;
    let failed = pipeline.sync(&opts()).await.unwrap();
    assert_eq!(failed.outcome, RunOutcome::ProviderFailed);
    let error = failed.sources["metalsoft_test"].error.clone().unwrap();
    assert!(error.contains("500"), "{error}");
    assert!(pipeline
        .ledger
        .cursors("metalsoft_test")
        .await
        .unwrap()
        .is_empty());

    world.metalsoft.clear_faults();
    let next = pipeline.sync(&opts()).await.unwrap();
    assert_eq!(
        next.outcome,
        RunOutcome::Undelivered,
        "only the held record is left"
    );
    assert_delivered_exactly_once(&world).await;
}

#[tokio::test]
async fn a_second_run_while_one_holds_the_lock_is_refused() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    pipeline
        .ledger
        .acquire_lock(
            "other-host:1:abc",
            now(),
            std::time::Duration::from_secs(600),
        )
        .await
        .unwrap();
    let err = pipeline
        .sync(&SyncOptions {
            now: Some(now()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, SyncError::Ledger(LedgerError::Locked { ref holder, .. }) if holder == "other-host:1:abc"),
        "{err}"
    );
    assert_eq!(world.lago.request_count(), 0);
    assert_eq!(world.metalsoft.request_count(), 0);
}

/// A run whose lock expired and was taken by another run (here one whose clock is a day ahead,
/// or a run that outlived `lock_ttl`) must notice it at its next refresh and stop: two runs
/// pushing from one ledger at once is how a record gets billed twice. With a short `lock_ttl`
/// the lock is refreshed often enough to be noticed within the run. What the run delivered is
/// still recorded, the new holder keeps its lock, and the next run delivers the rest once.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_lock_was_taken_over_stops_at_its_next_refresh() {
    let world = World::start(Behaviour::Postgres).await;
    let mut pipeline = world.pipeline().await;
    pipeline.lock_ttl = std::time::Duration::from_secs(1);
    // 71 records in batches of 25, each request taking 0.5 s.
    world.lago.set_delay(std::time::Duration::from_millis(500));
    let other = billsync::ledger::Ledger::open(&world.dir.path().join("ledger.db"))
        .await
        .unwrap();
    let run = tokio::spawn(async move { pipeline.sync(&opts()).await });
    for _ in 0..200 {
        if world.lago.request_count() >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        world.lago.request_count(),
        1,
        "the first batch is in flight"
    );
    other
        .acquire_lock(
            "intruder:1:0",
            chrono::Utc::now() + chrono::Duration::days(1),
            std::time::Duration::from_secs(600),
        )
        .await
        .unwrap();
    let result = run.await.unwrap();
    assert!(
        matches!(result, Err(SyncError::Ledger(LedgerError::Locked { ref holder, .. })) if holder == "intruder:1:0"),
        "the run must stop once its lock is gone: {result:?}"
    );
    assert_eq!(
        world.lago.request_count(),
        1,
        "no batch was sent after the lock was lost"
    );
    let st = other.status().await.unwrap();
    assert_eq!(
        st.lock.as_ref().map(|l| l.0.as_str()),
        Some("intruder:1:0"),
        "the new holder keeps the lock"
    );
    assert_eq!(
        other
            .counts_by_source()
            .await
            .unwrap()
            .get(&("metalsoft_test".to_string(), "sent".to_string()))
            .copied(),
        Some(world.lago.events().len() as i64),
        "what was delivered before the run stopped is recorded as sent"
    );
    other.release_lock("intruder:1:0").await.unwrap();
    world.lago.set_delay(std::time::Duration::ZERO);
    let next = world.pipeline().await.sync(&opts()).await.unwrap();
    assert_eq!(
        next.outcome,
        RunOutcome::Undelivered,
        "only the held record"
    );
    assert_delivered_exactly_once(&world).await;
}

/// A sink in front of the Lago simulator: the first batch is answered at once (the push
/// window then opens to two); the second is held until `second_go`; the third, sent beside it,
/// reaches Lago and notifies `third_stored`, and its answer is then held until `third_go` if
/// there is one.
struct HeldBatchesSink {
    inner: billsync::sinks::lago::LagoSink,
    calls: std::sync::atomic::AtomicUsize,
    second_go: std::sync::Arc<tokio::sync::Notify>,
    third_stored: std::sync::Arc<tokio::sync::Notify>,
    third_go: Option<std::sync::Arc<tokio::sync::Notify>>,
}

#[async_trait::async_trait]
impl Sink for HeldBatchesSink {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }
    fn encode(
        &self,
        key: &str,
        event: &billsync::mapping::MappedEvent,
    ) -> Result<String, billsync::sinks::EncodeError> {
        self.inner.encode(key, event)
    }
    async fn deliver(
        &self,
        batch: &[billsync::sinks::Outgoing],
    ) -> Result<Vec<billsync::sinks::Outcome>, billsync::sinks::SinkStopped> {
        match self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            1 => {
                self.second_go.notified().await;
                self.inner.deliver(batch).await
            }
            2 => {
                let answer = self.inner.deliver(batch).await;
                self.third_stored.notify_one();
                if let Some(go) = &self.third_go {
                    go.notified().await;
                }
                answer
            }
            _ => self.inner.deliver(batch).await,
        }
    }
}

/// A sync of `world` through a [`HeldBatchesSink`] (its records staged first, so that the
/// batches are the same whatever the timing: 25, 25, 21), with a lock that expires after a
/// second; returned running, with the second batch's go and the third's stored notice.
async fn sync_with_held_batches(
    world: &World,
    third_go: Option<std::sync::Arc<tokio::sync::Notify>>,
) -> (
    tokio::task::JoinHandle<Result<billsync::sync::RunSummary, SyncError>>,
    std::sync::Arc<tokio::sync::Notify>,
    std::sync::Arc<tokio::sync::Notify>,
) {
    world
        .pipeline()
        .await
        .sync(&SyncOptions {
            skip_push: true,
            ..opts()
        })
        .await
        .unwrap();
    let second_go = std::sync::Arc::new(tokio::sync::Notify::new());
    let third_stored = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut pipeline = world.pipeline().await;
    pipeline.lock_ttl = std::time::Duration::from_secs(1);
    pipeline.sinks = vec![Box::new(HeldBatchesSink {
        inner: world.sink_with_key(LAGO_KEY),
        calls: Default::default(),
        second_go: second_go.clone(),
        third_stored: third_stored.clone(),
        third_go,
    })];
    let run = tokio::spawn(async move { pipeline.sync(&opts()).await });
    (run, second_go, third_stored)
}

/// Another process takes the run's lock over (as one would after the lock expired).
async fn take_the_lock_over(world: &World) -> billsync::ledger::Ledger {
    let other = billsync::ledger::Ledger::open(&world.dir.path().join("ledger.db"))
        .await
        .unwrap();
    other
        .acquire_lock(
            "intruder:1:0",
            chrono::Utc::now() + chrono::Duration::days(1),
            std::time::Duration::from_secs(600),
        )
        .await
        .unwrap();
    other
}

/// A sync through a [`HeldBatchesSink`] whose third batch was answered while the second is
/// held, and whose lock another process has then taken over: the run, the second batch's go
/// and the other process's ledger.
async fn lock_taken_over_behind_a_held_batch(
    world: &World,
) -> (
    tokio::task::JoinHandle<Result<billsync::sync::RunSummary, SyncError>>,
    std::sync::Arc<tokio::sync::Notify>,
    billsync::ledger::Ledger,
) {
    let (run, second_go, third_stored) = sync_with_held_batches(world, None).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), third_stored.notified())
        .await
        .expect("the third batch is answered while the second is held");
    (run, second_go, take_the_lock_over(world).await)
}

/// The run ended on its lost lock with all 71 records recorded as sent, as Lago holds them,
/// and the next run sends nothing again.
async fn assert_every_batch_recorded(
    world: &World,
    other: billsync::ledger::Ledger,
    result: Result<billsync::sync::RunSummary, SyncError>,
) {
    assert!(
        matches!(result, Err(SyncError::Ledger(LedgerError::Locked { ref holder, .. })) if holder == "intruder:1:0"),
        "the run stops once its lock is gone: {result:?}"
    );
    assert_eq!(world.lago.events().len(), 71, "every batch reached Lago");
    assert_eq!(
        other
            .counts_by_source()
            .await
            .unwrap()
            .get(&("metalsoft_test".to_string(), "sent".to_string()))
            .copied(),
        Some(71),
        "every answer of the run is recorded as sent"
    );
    other.release_lock("intruder:1:0").await.unwrap();
    let next = world.pipeline().await.sync(&opts()).await.unwrap();
    assert_eq!(
        (next.sent, next.already_delivered),
        (0, 0),
        "the next run sends nothing again: {next:?}"
    );
    assert_delivered_exactly_once(world).await;
}

/// Answers are taken in the order the batches were sent, so the third batch's answer (Lago
/// stored it) waits behind the second's. When the run then finds its lock taken over, it stops
/// sending and records what was delivered; an answer already received but not yet in its turn
/// was dropped: Lago held 71 events, the ledger said 50 were sent, and whichever run pushes
/// next sends those 21 again (a webhook receiver that does not deduplicate by key bills them
/// twice). Every answer already received is recorded.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_lock_was_taken_over_records_every_answer_already_received() {
    let world = World::start(Behaviour::Postgres).await;
    let (run, second_go, other) = lock_taken_over_behind_a_held_batch(&world).await;
    // The run refreshes its lock every third of a second: it has found it taken by now.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    second_go.notify_one();
    let result = run.await.unwrap();
    assert_every_batch_recorded(&world, other, result).await;
}

/// The run finds its lock taken over while a batch Lago has already stored is still out. It
/// sends nothing more, but awaits that batch (within the shutdown deadline) and records its
/// answer. Before, it was dropped: Lago held 71 events, the ledger said 50 were sent, and
/// whichever run pushed next sent those 21 again.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_lock_was_taken_over_awaits_and_records_the_batches_still_out() {
    let world = World::start(Behaviour::Postgres).await;
    let third_go = std::sync::Arc::new(tokio::sync::Notify::new());
    let (run, second_go, third_stored) =
        sync_with_held_batches(&world, Some(third_go.clone())).await;
    let ten = std::time::Duration::from_secs(10);
    tokio::time::timeout(ten, third_stored.notified())
        .await
        .expect("the third batch reaches Lago while the second is held");
    let other = take_the_lock_over(&world).await;
    // The run refreshes its lock every third of a second: it has found it taken by now. The
    // second answer then makes it look at the lock while the third batch is still out.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    second_go.notify_one();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!run.is_finished(), "the run awaits the batch still out");
    third_go.notify_one();
    let result = tokio::time::timeout(ten, run).await.unwrap().unwrap();
    assert_every_batch_recorded(&world, other, result).await;
}

/// The run finds its lock taken over, and recording the answers it still has then fails. It
/// ends on the lost lock (exit 3, what stopped it), not on the failed write (exit 1, which
/// says nothing of the other run); the records stay pending and the next run's resend is
/// answered as already delivered: nothing is billed twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_lock_was_taken_over_ends_on_the_lost_lock_when_its_answers_cannot_be_recorded()
{
    let world = World::start(Behaviour::Postgres).await;
    let (run, second_go, other) = lock_taken_over_behind_a_held_batch(&world).await;
    let pool = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new().filename(world.dir.path().join("ledger.db")),
    )
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_acks BEFORE UPDATE OF status ON records
         BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END",
    )
    .execute(&pool)
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    second_go.notify_one();
    let result = run.await.unwrap();
    assert!(
        matches!(result, Err(SyncError::Ledger(LedgerError::Locked { ref holder, .. })) if holder == "intruder:1:0"),
        "the run ends on its lost lock: {result:?}"
    );
    assert_eq!(world.lago.events().len(), 71, "every batch reached Lago");
    let recorded = other
        .counts_by_source()
        .await
        .unwrap()
        .get(&("metalsoft_test".to_string(), "sent".to_string()))
        .copied()
        .unwrap_or(0);
    assert!(
        recorded <= 25,
        "the held batches' answers were not recorded: {recorded}"
    );
    sqlx::query("DROP TRIGGER refuse_acks")
        .execute(&pool)
        .await
        .unwrap();
    other.release_lock("intruder:1:0").await.unwrap();
    let next = world.pipeline().await.sync(&opts()).await.unwrap();
    assert_eq!(
        (next.sent, next.already_delivered),
        (0, 71 - recorded as u64),
        "the unrecorded answers go out again and Lago knows them: {next:?}"
    );
    assert_delivered_exactly_once(&world).await;
}

#[tokio::test]
async fn a_dry_run_pulls_and_maps_but_writes_and_sends_nothing() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    let dry = pipeline
        .sync(&SyncOptions {
            dry_run: true,
            ..opts()
        })
        .await
        .unwrap();
    assert!(dry.dry_run && dry.run_id.is_none());
    assert_eq!((dry.new, dry.mapped(), dry.held()), (80, 71, 1));
    assert_eq!(world.lago.request_count(), 0);
    let status = pipeline.ledger.status().await.unwrap();
    assert!(status.by_status.is_empty() && status.cursors.is_empty() && status.runs.is_empty());
}

/// One provider page larger than everything the puller may hold ahead of the stager (two
/// staging transactions, 8,000 records): it is neither refused nor waited on forever, but
/// staged whole and delivered exactly once in the same run.
#[tokio::test]
async fn a_page_larger_than_the_pull_ahead_bound_is_delivered_whole_in_one_run() {
    let from = billsync::demo::demo_start();
    // Two users, one day: one page per user, of 9,000 lines each.
    let dataset = billsync::simulators::metalsoft::MetalsoftDataset::generated(
        2,
        9_000,
        11,
        from,
        from + chrono::Duration::hours(20),
    );
    let world = World::start_with(Behaviour::ClickHouse, dataset).await;
    let run = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        world.pipeline().await.sync(&opts()).await.unwrap()
    })
    .await
    .expect("the run ends");
    assert_eq!(run.outcome, RunOutcome::Ok, "{run:?}");
    let source = run.sources.values().next().unwrap();
    assert!(
        source.pulled > 8_000 * source.chunks.min(2) && source.pulled >= 17_000,
        "pages larger than the bound: {source:?}"
    );
    assert_eq!(run.new, run.pulled, "{run:?}");
    assert_delivered_exactly_once(&world).await;
}

/// The run summary is stored in the ledger's `runs` table with its totals; a run with more
/// totals than the pipeline keeps there (a backfill: one per subscription and metric) stores
/// their count instead, and still reports every total to its caller.
#[tokio::test]
async fn a_run_with_many_totals_stores_their_count_not_the_list() {
    async fn stored_summary(world: &World, run_id: i64) -> serde_json::Value {
        let pool = sqlx::SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new().filename(world.dir.path().join("ledger.db")),
        )
        .await
        .unwrap();
        let text: String = sqlx::query_scalar("SELECT summary FROM runs WHERE id = ?1")
            .bind(run_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        serde_json::from_str(&text).unwrap()
    }
    // The default keeps the demo's few totals.
    let world = World::start(Behaviour::Postgres).await;
    let run = world.pipeline().await.sync(&opts()).await.unwrap();
    assert!(run.totals.len() > 2, "{run:?}");
    let stored = stored_summary(&world, run.run_id.unwrap()).await;
    assert_eq!(stored["totals"], serde_json::to_value(&run.totals).unwrap());
    assert!(stored.get("totals_left_out").is_none(), "{stored}");

    let world = World::start(Behaviour::Postgres).await;
    let mut pipeline = world.pipeline().await;
    pipeline.stored_totals_max = 2;
    let run = pipeline.sync(&opts()).await.unwrap();
    assert!(run.totals.len() > 2, "every total still reported: {run:?}");
    assert_eq!(run.totals_left_out, None);
    let stored = stored_summary(&world, run.run_id.unwrap()).await;
    assert_eq!(stored["totals"], serde_json::json!([]), "{stored}");
    assert_eq!(stored["totals_left_out"], run.totals.len());
    assert_eq!(stored["sent"], run.sent);
}

/// A provider that serves one record again with new content (a restatement), under its key.
struct Restating {
    inner: billsync::providers::metalsoft::MetalsoftProvider,
    record: billsync::record::UsageRecord,
}

#[async_trait::async_trait]
impl billsync::providers::Provider for Restating {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn plan(
        &self,
        _cursors: &billsync::providers::Cursors,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<billsync::providers::Chunk>, billsync::providers::ProviderError> {
        Ok(vec![billsync::providers::Chunk {
            stream: "restated".into(),
            window_start: now,
            window_end: now,
            detail: String::new(),
        }])
    }
    async fn fetch(
        &self,
        _chunk: &billsync::providers::Chunk,
        _now: chrono::DateTime<chrono::Utc>,
    ) -> Result<billsync::providers::Page, billsync::providers::ProviderError> {
        Ok(billsync::providers::Page {
            records: vec![self.record.clone()],
            cursor: None,
            also: Vec::new(),
        })
    }
}

/// Lago stored a batch, the process died before the acknowledgement, and before the next run
/// the provider restated one record of it. The record is still pending in the ledger, but Lago
/// holds its first content under its key: the next run must still bill the difference.
#[tokio::test]
async fn a_record_restated_after_lago_stored_it_unacknowledged_reaches_lago_in_full() {
    use billsync::mapping::MapOutcome;
    use billsync::providers::Provider;
    use rust_decimal::Decimal;
    let world = World::start(Behaviour::Postgres).await;
    let mappings = MappingSet::examples().unwrap();
    let provider = world.provider();
    let mut first = None;
    'chunks: for chunk in provider.plan(&Default::default(), now()).await.unwrap() {
        for r in provider.fetch(&chunk, now()).await.unwrap().records {
            if matches!(mappings.apply(&r), MapOutcome::Mapped(_)) {
                first = Some(r);
                break 'chunks;
            }
        }
    }
    let first = first.expect("a mapped record");
    {
        let pipeline = world.pipeline().await;
        pipeline
            .sync(&SyncOptions {
                skip_push: true,
                ..opts()
            })
            .await
            .unwrap();
        deliver_without_acknowledging(&world, &pipeline).await;
    }
    let mut restated = first.clone();
    restated.consumed_quantity *= Decimal::TWO;
    restated.billed_cost *= Decimal::TWO;
    let mut pipeline = world.pipeline().await;
    pipeline.providers = vec![Box::new(Restating {
        inner: world.provider(),
        record: restated.clone(),
    })];
    // This run stages the restatement and dies before pushing (in a real run: the record lies
    // beyond what the pusher alongside has read when the stager reaches it).
    let staged = pipeline
        .sync(&SyncOptions {
            skip_push: true,
            ..opts()
        })
        .await
        .unwrap();
    assert_eq!((staged.restaged, staged.corrections), (0, 1), "{staged:?}");
    pipeline.providers = vec![];
    pipeline.sync(&opts()).await.unwrap();
    let key = first.idempotency_key();
    let MapOutcome::Mapped(latest) = mappings.apply(&restated) else {
        panic!("the restated record maps");
    };
    let in_lago = world.lago_value_of(&key);
    assert_eq!(pipeline.ledger.pending_count("lago").await.unwrap(), 0);
    assert_eq!(
        in_lago, latest.value,
        "Lago holds {in_lago} for {key} and its corrections; the restated record maps to {}",
        latest.value
    );
}

/// The run lock is a lease kept alive by the live run itself, not by its progress: a provider
/// answer slower than `lock_ttl` (a slow API, retries with backoff) must not let another run
/// take the ledger and push the same records beside it.
#[tokio::test]
async fn a_run_keeps_its_lock_while_a_provider_answer_takes_longer_than_the_lock_ttl() {
    let world = World::start(Behaviour::Postgres).await;
    let mut pipeline = world.pipeline().await;
    // The ledger keeps lock times to the second: 2 s, extended every 0.67 s, never looks
    // expired to another run while this one lives.
    pipeline.lock_ttl = std::time::Duration::from_secs(2);
    world
        .metalsoft
        .set_delay(std::time::Duration::from_millis(4000));
    let other = billsync::ledger::Ledger::open(&world.dir.path().join("ledger.db"))
        .await
        .unwrap();
    let run = tokio::spawn(async move { pipeline.sync(&opts()).await });
    // Past the lock's first expiry, while the first provider answer is still awaited.
    tokio::time::sleep(std::time::Duration::from_millis(2800)).await;
    let intruder = other
        .acquire_lock(
            "intruder:1:0",
            chrono::Utc::now(),
            std::time::Duration::from_secs(600),
        )
        .await;
    assert!(
        matches!(intruder, Err(LedgerError::Locked { .. })),
        "a live run's lock must not be taken: {intruder:?}"
    );
    world.metalsoft.set_delay(std::time::Duration::ZERO);
    let summary = run.await.unwrap().unwrap();
    assert_eq!(
        summary.outcome,
        RunOutcome::Undelivered,
        "only the held record"
    );
    assert_delivered_exactly_once(&world).await;
}

/// A dry run takes no lock, so it has none to lose: a dry run that lasts longer than a lock
/// refresh interval still completes (and still writes nothing).
#[tokio::test]
async fn a_dry_run_longer_than_a_lock_refresh_interval_completes() {
    let world = World::start(Behaviour::Postgres).await;
    let mut pipeline = world.pipeline().await;
    pipeline.lock_ttl = std::time::Duration::from_millis(300);
    world
        .metalsoft
        .set_delay(std::time::Duration::from_millis(150));
    let dry = pipeline
        .sync(&SyncOptions {
            dry_run: true,
            ..opts()
        })
        .await
        .unwrap();
    assert_eq!((dry.new, dry.mapped(), dry.held()), (80, 71, 1));
    assert_eq!(world.lago.request_count(), 0);
    let status = pipeline.ledger.status().await.unwrap();
    assert!(status.lock.is_none() && status.by_status.is_empty() && status.runs.is_empty());
}
