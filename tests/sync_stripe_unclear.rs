//! Stripe deduplicates a meter event's `identifier` (and an `Idempotency-Key`) only over a
//! rolling window of at least 24 hours. A record whose delivery ended unclear (a timeout, a cut
//! connection, a 5xx: Stripe may have stored the event) stays pending and is resent by later
//! runs under the same identifier, which Stripe counts once within that window. Resent later
//! (the sink stopped for two days after a key rotation, or Stripe kept failing), it may be
//! counted a second time: a wrong invoice. So the ledger keeps when a record's first unclear
//! delivery happened, and a run more than 23 hours after it rejects the record, without a
//! request, with a reason saying what to do; a run within the window still resends it; a clear
//! refusal (429) is no unclear delivery; a re-read that restages the record does not free it; a
//! deliberate `replay --status rejected` sends it. A request abandoned at the shutdown deadline
//! is an unclear delivery too, and so is one a crash interrupted (the process killed between
//! Stripe storing the event and the ledger recording the answer): records are marked as being
//! sent before they go out, and a later run takes a mark left behind as an unclear delivery.
//! A ledger from before this was recorded upgrades, taking a pending record's last failed
//! attempt as its unclear delivery.

#[path = "common/old_ledger.rs"]
mod old_ledger;
#[path = "common/serving.rs"]
mod serving;

use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::ledger::{Correction, Ledger, RecordFilter, SentState, StageRow, Status};
use billsync::mapping::MappingSet;
use billsync::record::UsageRecord;
use billsync::simulators::stripe::{DropMode, StripeSim, StripeSimConfig, StripeSimHandle};
use billsync::sinks::stripe::{StripeConfig, StripeMode, StripeSink};
use billsync::sync::{Pipeline, ReplayOptions, RunOutcome, RunSummary, SyncError, SyncOptions};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

const KEY: &str = "sk_test_sim";

/// A sync at `now` on a task of its own, to be stopped, killed or overtaken while it runs; its
/// ledger is closed when it ends.
fn spawn_sync(
    p: Pipeline,
    now: DateTime<Utc>,
) -> tokio::task::JoinHandle<Result<RunSummary, SyncError>> {
    tokio::spawn(async move {
        let summary = p
            .sync(&SyncOptions {
                now: Some(now),
                ..Default::default()
            })
            .await;
        p.ledger.close().await;
        summary
    })
}

/// A run more than the window after the first: Stripe no longer deduplicates the identifier.
fn a_day_and_an_hour() -> chrono::Duration {
    chrono::Duration::hours(25)
}

/// Records of MetalSoft go to customer `cus_A`'s meter `api_calls` on the Stripe sink.
fn mappings() -> MappingSet {
    MappingSet::from_sources(&[(
        "stripe.yaml".to_string(),
        "version: 1
rules:
  - name: calls
    match: { provider: metalsoft }
    sink: stripe
    metric: api_calls
    target: { external_subscription_id: cus_A }
    value: { quantity: {} }
"
        .to_string(),
    )])
    .unwrap()
}

/// One final MetalSoft line of `calls` API calls an hour ago (inside Stripe's 35 days).
fn line(resource: &str, calls: i64) -> UsageRecord {
    let t = Utc::now() - chrono::Duration::hours(1);
    let t = Utc.timestamp_opt(t.timestamp(), 0).single().unwrap();
    UsageRecord {
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
        charge_period_start: t,
        charge_period_end: t + chrono::Duration::hours(1),
        consumed_quantity: Decimal::from(calls),
        consumed_unit: "calls".into(),
        billed_cost: Decimal::ONE,
        billing_currency: "EUR".into(),
        scope: "acct".into(),
        natural_key: vec![("resource".into(), resource.into())],
        is_final: true,
        attributes: Default::default(),
        raw: Default::default(),
    }
}

/// One pending record's row: key, status, attempts, last error, first unclear delivery.
type Row = (String, String, i64, Option<String>, Option<String>);

struct World {
    stripe: StripeSimHandle,
    dir: tempfile::TempDir,
    mode: StripeMode,
    /// The sink's `max_age`, when a test lowers it.
    max_age: std::cell::Cell<Option<Duration>>,
}

impl World {
    /// A Stripe simulator that deduplicates for `dedup_window` of real time (the test's runs
    /// are seconds apart: a tiny window is Stripe a day later), and an empty ledger.
    async fn start(dedup_window: Duration, mode: StripeMode) -> World {
        World {
            stripe: StripeSim::start(StripeSimConfig {
                api_key: KEY.into(),
                dedup_window,
                ..Default::default()
            })
            .await
            .unwrap(),
            dir: tempfile::tempdir().unwrap(),
            mode,
            max_age: std::cell::Cell::new(None),
        }
    }

    fn sink(&self) -> StripeSink {
        let mut c = StripeConfig::new(&self.stripe.url, Secret::new(KEY));
        c.meter_events_url = self.stripe.url.clone();
        c.mode = self.mode;
        c.timeout = Duration::from_secs(2);
        if let Some(max_age) = self.max_age.get() {
            c.max_age = max_age;
        }
        // One attempt per run: what a run leaves is what its one request met.
        c.retry = RetryPolicy {
            max_retries: 0,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
        };
        StripeSink::new("stripe".into(), c).unwrap()
    }

    async fn pipeline(&self) -> Pipeline {
        let ledger = Ledger::open(&self.dir.path().join("ledger.db"))
            .await
            .unwrap();
        Pipeline::new(ledger, vec![], vec![Box::new(self.sink())], mappings())
    }

    /// Stage `lines` as a sync maps them: pending for the Stripe sink.
    async fn stage(&self, lines: Vec<UsageRecord>) {
        let p = self.pipeline().await;
        let rows: Vec<StageRow> = lines.into_iter().map(|l| p.stage_row(l, false)).collect();
        assert!(rows.iter().all(|r| r.status == Status::Pending));
        let by_hand = |_: &StageRow, st: &SentState| Correction::Unresolved(st.key.clone());
        let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
        p.ledger
            .stage(run, &rows, None, Utc::now(), &by_hand)
            .await
            .unwrap();
        p.ledger.close().await;
    }

    /// Stage `record` as a sync does: a change of a record already sent, queued or held back
    /// goes out as a correction.
    async fn stage_as_sync(&self, record: UsageRecord) {
        let p = self.pipeline().await;
        let row = p.stage_row(record, false);
        let correct = |row: &StageRow, st: &SentState| p.correction(row, st);
        let run = p.ledger.start_run("sync", Utc::now()).await.unwrap();
        p.ledger
            .stage(run, &[row], None, Utc::now(), &correct)
            .await
            .unwrap();
        p.ledger.close().await;
    }

    /// A sync (no sources: it pushes what is pending) at `now`.
    async fn sync(&self, now: DateTime<Utc>) -> RunSummary {
        let p = self.pipeline().await;
        let summary = p
            .sync(&SyncOptions {
                now: Some(now),
                ..Default::default()
            })
            .await
            .unwrap();
        p.ledger.close().await;
        summary
    }

    /// `billsync replay --status rejected --key <key>` at `now`, as the rejection says (every
    /// rejected record without a key).
    async fn replay_rejected(&self, key: Option<&str>, now: DateTime<Utc>) -> RunSummary {
        let p = self.pipeline().await;
        let summary = p
            .replay(&ReplayOptions {
                filter: RecordFilter {
                    key: key.map(str::to_string),
                    ..RecordFilter::status(Status::Rejected)
                },
                dry_run: false,
                reason: "checked with reconcile: Stripe did not count it".into(),
                now: Some(now),
            })
            .await
            .unwrap();
        p.ledger.close().await;
        summary
    }

    async fn rows(&self) -> Vec<Row> {
        use sqlx::{Connection, Row};
        let path = self.dir.path().join("ledger.db");
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let rows = sqlx::query(
            "SELECT idem_key, status, attempts, last_error, unclear_at FROM records ORDER BY id",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect()
    }

    /// Each record's key and `sending_at` (the mark of a delivery under way), in id order.
    async fn marks(&self) -> Vec<(String, Option<String>)> {
        use sqlx::{Connection, Row};
        let path = self.dir.path().join("ledger.db");
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let rows = sqlx::query("SELECT idem_key, sending_at FROM records ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// A sync at `now` killed (its task aborted, as SIGKILL or an OOM kill ends the process)
    /// once Stripe has stored the event `key`, before its answer arrives: Stripe stalls the
    /// answer well past the client's timeout, and the run is gone before either ends. On a
    /// current-thread runtime only: on a multi-thread one the run pushes from a thread of its
    /// own, which an abort does not reach.
    async fn sync_killed_once_stripe_stored(&self, key: &str, now: DateTime<Utc>) {
        self.stripe
            .store_then_drop_next(1, DropMode::Stall(Duration::from_secs(60)));
        let p = self.pipeline().await;
        let run = spawn_sync(p, now);
        let waited = std::time::Instant::now();
        while self.stripe.count(key) == 0 {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "Stripe never got the event"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        run.abort();
        assert!(run.await.unwrap_err().is_cancelled(), "killed mid-request");
    }

    /// Run 2, 25 hours after `t0` (Stripe no longer deduplicates the identifier): the record
    /// of `key`, whose delivery ended unclear, is held back, not resent. Stripe counted it
    /// once, no request went out, the run rejected it with a reason holding each of `parts`.
    /// The ledger's rows and that reason.
    async fn held_back_after_the_window(
        &self,
        key: &str,
        t0: DateTime<Utc>,
        parts: &[&str],
    ) -> (Vec<Row>, String) {
        let mode = self.mode;
        let requests = self.ingestion_requests();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = self.sync(t0 + a_day_and_an_hour()).await;
        assert_eq!(
            self.stripe.count(key),
            1,
            "{mode:?}: resent after Stripe's 24 hours, the event was counted twice"
        );
        assert_eq!(
            self.ingestion_requests(),
            requests,
            "{mode:?}: no request for it"
        );
        assert_eq!((second.sent, second.rejected), (0, 1), "{mode:?}");
        let rows = self.rows().await;
        assert_eq!(rows[0].1, "rejected", "{mode:?}");
        let reason = rows[0].3.clone().unwrap_or_default();
        for part in parts {
            assert!(reason.contains(part), "{mode:?}: {part:?} not in {reason}");
        }
        (rows, reason)
    }

    /// Meter event requests Stripe received (v1 posts, or stream requests).
    fn ingestion_requests(&self) -> usize {
        self.stripe
            .requests()
            .iter()
            .filter(|r| r.route.contains("meter_event_stream") || r.route.contains("meter_events"))
            .count()
    }
}

/// Run 1: Stripe stores the event and the answer is lost (a 502 from a proxy): unclear, the
/// record stays pending with the time of that delivery. Run 2, 25 hours later, when Stripe no
/// longer deduplicates the identifier: resending would count it a second time, so the record
/// is rejected without a request, with a reason that says what happened and what to do.
#[tokio::test]
async fn a_record_whose_delivery_ended_unclear_is_not_resent_after_stripes_window() {
    for mode in [StripeMode::V1, StripeMode::V2Stream] {
        let w = World::start(Duration::from_millis(1), mode).await;
        let record = line("a", 7);
        let key = record.idempotency_key();
        w.stage(vec![record]).await;
        w.stripe.store_then_drop_next(1, DropMode::Status502);
        let t0 = Utc::now();

        let first = w.sync(t0).await;
        assert_eq!((first.sent, first.failed), (0, 1), "{mode:?}");
        assert_eq!(
            w.stripe.count(&key),
            1,
            "{mode:?}: Stripe stored it in run 1"
        );
        let rows = w.rows().await;
        assert_eq!((rows[0].1.as_str(), rows[0].2), ("pending", 1), "{mode:?}");
        assert!(
            rows[0].4.is_some(),
            "{mode:?}: the unclear delivery is kept"
        );
        let (rows, reason) = w
            .held_back_after_the_window(
                &key,
                t0,
                &[
                    "ended unclear",
                    "Stripe may have counted it",
                    "24 hours",
                    "billsync reconcile",
                    "billsync replay --status rejected",
                ],
            )
            .await;
        assert!(
            reason.contains(&rows[0].4.clone().unwrap()[..16]),
            "{mode:?}: the reason names when: {reason}"
        );
    }
}

/// Within Stripe's window a resend is what recovers a lost answer: run 2, 22 hours after run 1,
/// resends the record and Stripe (deduplicating) counts it once; it is sent.
#[tokio::test]
async fn within_stripes_window_a_record_whose_delivery_ended_unclear_is_resent() {
    let w = World::start(Duration::from_secs(86_400), StripeMode::V1).await;
    let record = line("a", 7);
    let key = record.idempotency_key();
    w.stage(vec![record]).await;
    w.stripe.store_then_drop_next(1, DropMode::Status502);
    let t0 = Utc::now();
    w.sync(t0).await;
    let requests = w.ingestion_requests();

    let second = w.sync(t0 + chrono::Duration::hours(22)).await;
    assert_eq!(w.ingestion_requests(), requests + 1, "resent");
    assert_eq!(second.sent + second.already_delivered, 1);
    assert_eq!(w.stripe.count(&key), 1, "counted once");
    assert_eq!(w.rows().await[0].1, "sent");
}

/// A 429 is Stripe refusing to run the request: nothing was taken, so a run two days later
/// sends the record as usual; a 500 (which Stripe may answer after storing it) holds the other
/// back.
#[tokio::test]
async fn a_rate_limited_record_is_no_unclear_delivery() {
    let w = World::start(Duration::from_millis(1), StripeMode::V1).await;
    let limited = line("a", 7);
    let failed = line("b", 5);
    let (limited_key, failed_key) = (limited.idempotency_key(), failed.idempotency_key());
    w.stage(vec![limited, failed]).await;
    w.stripe.rate_limit_next(1, None);
    w.stripe.fail_next(1, 500);
    let t0 = Utc::now();
    let first = w.sync(t0).await;
    assert_eq!(first.failed, 2);
    let rows = w.rows().await;
    let unclear = |k: &str| rows.iter().find(|r| r.0 == k).unwrap().4.is_some();
    assert!(!unclear(&limited_key), "a 429 is no unclear delivery");
    assert!(unclear(&failed_key), "a 500 is");

    let second = w.sync(t0 + chrono::Duration::days(2)).await;
    assert_eq!((second.sent, second.rejected), (1, 1));
    assert_eq!(w.stripe.count(&limited_key), 1);
    assert_eq!(w.stripe.count(&failed_key), 0);
}

/// The person checked (`billsync reconcile`: Stripe did not count it, the 500 stored nothing)
/// and replays the rejected record: the replay sends it, whatever the earlier unclear delivery.
#[tokio::test]
async fn replaying_a_record_held_back_after_stripes_window_sends_it() {
    let w = World::start(Duration::from_millis(1), StripeMode::V1).await;
    let record = line("a", 7);
    let key = record.idempotency_key();
    let other = line("b", 5);
    w.stage(vec![record, other]).await;
    w.stripe.fail_next(2, 500);
    let t0 = Utc::now();
    w.sync(t0).await;
    let later = t0 + a_day_and_an_hour();
    let held_back = w.sync(later).await;
    assert_eq!(held_back.rejected, 2, "{held_back:?}");
    let rows = w.rows().await;
    assert_eq!(rows[0].1, "rejected");
    // The message names this record, not the run: a replay of the run would resend its
    // neighbour too, which Stripe may have counted.
    assert!(
        rows[0].3.as_deref().unwrap_or_default().contains(&format!(
            "billsync replay --status rejected --key {key} --reason"
        )),
        "{rows:?}"
    );
    assert_eq!(w.stripe.count(&key), 0);

    let replay = w.replay_rejected(Some(&key), later).await;
    assert_eq!(replay.sent, 1, "{replay:?}");
    assert_eq!(w.stripe.count(&key), 1);
    let rows = w.rows().await;
    assert_eq!(rows[0].1, "sent");
    assert_eq!(rows[0].4, None, "the replay forgot the unclear delivery");
    assert_eq!(
        rows[1].1, "rejected",
        "the other one waits for its own decision"
    );
}

/// A re-read with new content does not restage the held-back record in place (pending again,
/// a new payload under the same key): Stripe may still hold what the unclear delivery sent.
/// It stays held back, frozen as it was sent, and the change goes out as a correction of it
/// (here the staging leaves it to a person; see
/// `an_original_held_back_after_an_unclear_delivery_is_corrected_not_rewritten`): no request.
#[tokio::test]
async fn a_record_restaged_by_a_re_read_stays_held_back() {
    let w = World::start(Duration::from_millis(1), StripeMode::V1).await;
    let record = line("a", 7);
    w.stage(vec![record.clone()]).await;
    w.stripe.fail_next(1, 500);
    let t0 = Utc::now();
    w.sync(t0).await;
    w.sync(t0 + a_day_and_an_hour()).await;
    assert_eq!(w.rows().await[0].1, "rejected");

    let mut changed = record;
    changed.consumed_quantity = Decimal::from(8);
    w.stage(vec![changed]).await;
    assert_eq!(w.rows().await[0].1, "rejected", "not restaged");
    let requests = w.ingestion_requests();
    let third = w.sync(t0 + chrono::Duration::hours(26)).await;
    assert_eq!((third.sent, third.rejected), (0, 0), "{third:?}");
    assert_eq!(w.ingestion_requests(), requests, "no request for it");
    assert_eq!(w.rows().await[0].1, "rejected");
}

/// A stop (SIGTERM) while a request is out: past the shutdown deadline the run abandons the
/// wait, and Stripe may have taken the record. That is recorded as an unclear delivery, so a
/// run after Stripe's window holds the record back instead of resending it.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_abandoned_at_the_shutdown_deadline_is_an_unclear_delivery() {
    let w = World::start(Duration::from_millis(1), StripeMode::V1).await;
    w.stage(vec![line("a", 7)]).await;
    w.stripe.set_delay(Duration::from_millis(1500));
    let (trigger, shutdown) = billsync::shutdown::channel();
    let mut p = w.pipeline().await;
    p.shutdown = shutdown;
    p.shutdown_deadline = Duration::from_millis(200);
    let t0 = Utc::now();
    let run = spawn_sync(p, t0);
    while w.ingestion_requests() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    trigger.trigger();
    let first = run.await.unwrap().unwrap();
    assert_eq!(first.outcome, RunOutcome::Interrupted);
    let rows = w.rows().await;
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("pending", 1), "{rows:?}");
    assert!(
        rows[0].4.is_some(),
        "the abandoned request is an unclear delivery"
    );

    w.stripe.clear_faults();
    let requests = w.ingestion_requests();
    let second = w.sync(t0 + a_day_and_an_hour()).await;
    assert_eq!(second.rejected, 1);
    assert_eq!(w.ingestion_requests(), requests, "no request for it");
}

/// A ledger from before the unclear delivery was kept (schema 0001 here) upgrades: a pending
/// record that failed before (attempts, an error) takes its last attempt (`updated_at`) as its
/// unclear delivery, so after Stripe's window it is held back too; a pending record never tried
/// has none.
#[tokio::test]
async fn an_older_ledger_upgrades_and_holds_back_records_that_failed_before() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pool) = old_ledger::in_dir_at_schema_0001(dir.path()).await;
    let tried = line("a", 7);
    let untried = line("b", 5);
    for (id, r, attempts, error) in [
        (
            1,
            &tried,
            3,
            Some("HTTP 500: {} (gave up after 4 attempts)"),
        ),
        (2, &untried, 0, None),
    ] {
        sqlx::query(
            "INSERT INTO records (id, idem_key, source, provider, natural_key, content_hash, status,
                 is_final, charge_period_start, charge_period_end, billing_account_id,
                 sub_account_id, resource_type, resource_id, consumed_quantity, consumed_unit,
                 billed_cost, billing_currency, sink, payload, record_json, first_run, last_run,
                 staged_at, updated_at, attempts, last_error)
             VALUES (?1, ?2, 'ms', 'metalsoft', ?3, ?4, 'pending', 1, '2026-10-05T00:00:00Z',
                 '2026-10-05T01:00:00Z', 'acct', '1', 'instance', ?5, '7', 'calls', '1', 'EUR',
                 'stripe', 'event_name=x', ?6, 1, 1, '2026-10-06T00:00:00Z',
                 '2026-10-06T02:00:00Z', ?7, ?8)",
        )
        .bind(id)
        .bind(r.idempotency_key())
        .bind(r.natural_key_string())
        .bind(r.content_hash())
        .bind(r.resource_id.as_str())
        .bind(serde_json::to_string(r).unwrap())
        .bind(attempts)
        .bind(error)
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;

    let ledger = Ledger::open(&path).await.unwrap();
    assert!(old_ledger::newest_migration(&path).await >= 10);
    let pending = ledger.pending_batch("stripe", 0, 10).await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(
        pending[0].unclear_since,
        Some(Utc.with_ymd_and_hms(2026, 10, 6, 2, 0, 0).unwrap()),
        "the last failed attempt stands in for the first unclear one"
    );
    assert_eq!(pending[1].unclear_since, None, "never tried");
}

/// A correction held back after an unclear delivery may have been counted by Stripe. A later
/// change of the same record is measured against it as if it went out: the original 7, its
/// correction `.r1` (+2, to 9) stored by Stripe but answered 502 and held back 25 hours later,
/// then the record restated to 10. Measured without `.r1` the next correction was +3, and with
/// `.r1` counted by Stripe the customer was billed 12 for 10. Measured with it, it is +1, and
/// whatever the person finds for `.r1` the total comes right: counted (Stripe has 10; `ledger
/// mark-delivered` records it), or not (its replay re-derives it as 10 − 7 − 1 = +2).
#[tokio::test]
async fn a_correction_held_back_after_an_unclear_delivery_counts_as_sent_for_the_next_one() {
    for stripe_counted_it in [true, false] {
        correction_held_back_then_restated(stripe_counted_it).await;
    }
}

async fn correction_held_back_then_restated(stripe_counted_it: bool) {
    let w = World::start(Duration::from_millis(1), StripeMode::V1).await;
    // One line, restated: the same charge period each time (`line` reads the clock).
    let base = line("a", 7);
    let stage_as_sync = |calls: i64| {
        w.stage_as_sync(UsageRecord {
            consumed_quantity: Decimal::from(calls),
            ..base.clone()
        })
    };
    let t0 = Utc::now();
    stage_as_sync(7).await;
    assert_eq!(w.sync(t0).await.sent, 1);
    stage_as_sync(9).await;
    if stripe_counted_it {
        w.stripe.store_then_drop_next(1, DropMode::Status502);
    } else {
        w.stripe.fail_next(1, 500);
    }
    let unclear = w.sync(t0 + chrono::Duration::minutes(1)).await;
    assert_eq!((unclear.sent, unclear.failed), (0, 1));
    let counted = if stripe_counted_it { 9 } else { 7 };
    assert_eq!(
        w.stripe.total("cus_A", "api_calls"),
        Some(Decimal::from(counted))
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let held = w.sync(t0 + a_day_and_an_hour()).await;
    assert_eq!(held.rejected, 1, "{held:?}");
    let r1 = w.rows().await[1].0.clone();
    assert!(r1.ends_with(".r1"), "{r1}");

    stage_as_sync(10).await;
    let next = w.sync(t0 + a_day_and_an_hour()).await;
    assert_eq!(next.sent, 1, "{next:?}");
    if !stripe_counted_it {
        // 7 + 1: the +2 waits for the person, who finds Stripe at 8 and replays it.
        assert_eq!(w.stripe.total("cus_A", "api_calls"), Some(Decimal::from(8)));
        let replayed = w
            .replay_rejected(
                None,
                t0 + a_day_and_an_hour() + chrono::Duration::minutes(5),
            )
            .await;
        assert_eq!(replayed.sent, 1, "{replayed:?}");
    }
    assert_eq!(
        w.stripe.total("cus_A", "api_calls"),
        Some(Decimal::from(10)),
        "the restatement to 10 is billed 10 (counted: {stripe_counted_it})"
    );
    if !stripe_counted_it {
        return;
    }
    let p = w.pipeline().await;
    let run = p
        .ledger
        .start_run("mark-delivered", Utc::now())
        .await
        .unwrap();
    p.ledger
        .mark_delivered(run, &r1, "reconcile: Stripe counted it", Utc::now())
        .await
        .unwrap();
    assert_eq!(p.ledger.undelivered().await.unwrap(), 0);
    p.ledger.close().await;
}

/// An original held back after an unclear delivery whose content then changes: Stripe may
/// hold what it sent, so the change goes out as a correction of it and the record stays held
/// back for a person, frozen as it was sent (7, restated to 8: `.r1` +1). Rewritten in place
/// with the new content, it was held back at 8: marked delivered, the ledger said 8 where
/// Stripe had 7; replayed, Stripe counted the 7 twice. Now either way Stripe ends at 8.
#[tokio::test]
async fn an_original_held_back_after_an_unclear_delivery_is_corrected_not_rewritten() {
    for stripe_counted_it in [true, false] {
        original_held_back_then_restated(stripe_counted_it).await;
    }
}

async fn original_held_back_then_restated(stripe_counted_it: bool) {
    let w = World::start(Duration::from_millis(1), StripeMode::V1).await;
    let base = line("a", 7);
    let key = base.idempotency_key();
    let stage_as_sync = |calls: i64| {
        w.stage_as_sync(UsageRecord {
            consumed_quantity: Decimal::from(calls),
            ..base.clone()
        })
    };
    let t0 = Utc::now();
    stage_as_sync(7).await;
    if stripe_counted_it {
        w.stripe.store_then_drop_next(1, DropMode::Status502);
    } else {
        w.stripe.fail_next(1, 500);
    }
    assert_eq!(w.sync(t0).await.failed, 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(w.sync(t0 + a_day_and_an_hour()).await.rejected, 1);

    stage_as_sync(8).await;
    let rows = w.rows().await;
    assert_eq!(
        rows[0].1, "rejected",
        "the original stays held back: {rows:?}"
    );
    assert!(rows[1].0.ends_with(".r1"), "{rows:?}");
    let next = w.sync(t0 + a_day_and_an_hour()).await;
    assert_eq!((next.sent, next.rejected), (1, 0), "{next:?}");
    let counted = if stripe_counted_it { 8 } else { 1 };
    assert_eq!(
        w.stripe.total("cus_A", "api_calls"),
        Some(Decimal::from(counted))
    );
    if stripe_counted_it {
        let p = w.pipeline().await;
        let run = p
            .ledger
            .start_run("mark-delivered", Utc::now())
            .await
            .unwrap();
        p.ledger
            .mark_delivered(run, &key, "reconcile: Stripe counted it", Utc::now())
            .await
            .unwrap();
        assert_eq!(p.ledger.undelivered().await.unwrap(), 0);
        p.ledger.close().await;
    } else {
        let replayed = w
            .replay_rejected(
                Some(&key),
                t0 + a_day_and_an_hour() + chrono::Duration::minutes(5),
            )
            .await;
        assert_eq!(replayed.sent, 1, "{replayed:?}");
    }
    assert_eq!(
        w.stripe.total("cus_A", "api_calls"),
        Some(Decimal::from(8)),
        "counted: {stripe_counted_it}"
    );
}

/// A correction whose first delivery ended unclear and which Stripe then refused outright
/// (a clear 400 within the window: had the first been stored, Stripe would have said it has
/// the identifier) was never counted: it is an ordinary refusal, and the record's next
/// correction carries its difference (7, a refused +2, restated to 10: +3, Stripe at 10).
/// Counted as held back, the next one was +1 and Stripe stayed at 8.
#[tokio::test]
async fn a_correction_refused_after_an_unclear_delivery_is_an_ordinary_refusal() {
    let w = World::start(Duration::from_secs(3600), StripeMode::V1).await;
    let base = line("a", 7);
    let stage_as_sync = |calls: i64| {
        w.stage_as_sync(UsageRecord {
            consumed_quantity: Decimal::from(calls),
            ..base.clone()
        })
    };
    let t0 = Utc::now();
    stage_as_sync(7).await;
    assert_eq!(w.sync(t0).await.sent, 1);
    stage_as_sync(9).await;
    w.stripe.fail_next(1, 500);
    assert_eq!(w.sync(t0 + chrono::Duration::minutes(1)).await.failed, 1);
    w.stripe.fail_next(1, 400);
    let refused = w.sync(t0 + chrono::Duration::minutes(2)).await;
    assert_eq!(refused.rejected, 1, "{refused:?}");
    let rows = w.rows().await;
    assert_eq!(rows[1].1, "rejected");
    assert_eq!(rows[1].4, None, "the refusal forgets the unclear delivery");

    stage_as_sync(10).await;
    assert_eq!(w.sync(t0 + chrono::Duration::minutes(3)).await.sent, 1);
    assert_eq!(
        w.stripe.total("cus_A", "api_calls"),
        Some(Decimal::from(10))
    );
}

/// Only a refusal that shows Stripe does not hold the record forgets an unclear delivery. One
/// stored by Stripe and answered 502, then found too old by billsync's own check before any
/// request (`max_age`): that says nothing about the first delivery, so it stays known
/// (`reconcile` names it if Stripe's total shows it, and a change of it is a correction).
#[tokio::test]
async fn a_local_refusal_after_an_unclear_delivery_keeps_it() {
    let w = World::start(Duration::from_secs(3600), StripeMode::V1).await;
    let record = line("a", 7);
    let key = record.idempotency_key();
    w.stage(vec![record]).await;
    w.stripe.store_then_drop_next(1, DropMode::Status502);
    let t0 = Utc::now();
    assert_eq!(w.sync(t0).await.failed, 1);
    assert_eq!(w.stripe.count(&key), 1);
    w.max_age.set(Some(Duration::from_secs(30 * 60)));
    let refused = w.sync(t0 + chrono::Duration::minutes(1)).await;
    assert_eq!(refused.rejected, 1, "{refused:?}");
    let rows = w.rows().await;
    assert_eq!(rows[0].1, "rejected");
    assert!(
        rows[0]
            .3
            .as_deref()
            .unwrap_or_default()
            .contains("older than"),
        "{rows:?}"
    );
    assert!(
        rows[0].4.is_some(),
        "the unclear delivery is kept: {rows:?}"
    );
}

/// Run 1 is killed (SIGKILL, OOM kill, a lost node) after Stripe stored the event and before
/// the ledger recorded the answer; the runs after it could send nothing (a revoked key, a
/// suspended CronJob) until run 2, 25 hours later, when Stripe no longer deduplicates the
/// identifier. The record was marked as being sent before the request, so run 2 takes the mark
/// as an unclear delivery and holds the record back for a person instead of resending it.
/// Without the mark the record was a plain pending one, resent, and Stripe counted it twice.
#[tokio::test]
async fn a_run_killed_before_recording_stripes_answer_is_not_resent_after_stripes_window() {
    for mode in [StripeMode::V1, StripeMode::V2Stream] {
        let w = World::start(Duration::from_millis(1), mode).await;
        let record = line("a", 7);
        let key = record.idempotency_key();
        w.stage(vec![record]).await;
        let t0 = Utc::now();
        w.sync_killed_once_stripe_stored(&key, t0).await;
        assert_eq!(
            w.stripe.count(&key),
            1,
            "{mode:?}: Stripe stored it in run 1"
        );
        let rows = w.rows().await;
        assert_eq!((rows[0].1.as_str(), rows[0].2), ("pending", 0), "{mode:?}");
        let (rows, _) = w
            .held_back_after_the_window(
                &key,
                t0,
                &[
                    "ended unclear",
                    "Stripe may have counted it",
                    "billsync reconcile",
                ],
            )
            .await;
        assert!(
            rows[0].4.is_some(),
            "{mode:?}: the unclear delivery is kept"
        );
        assert_eq!(w.marks().await[0].1, None, "{mode:?}: the mark is taken");

        // The person found it counted (`reconcile`) and records it as delivered.
        let p = w.pipeline().await;
        let run = p
            .ledger
            .start_run("mark-delivered", Utc::now())
            .await
            .unwrap();
        p.ledger
            .mark_delivered(run, &key, "reconcile: Stripe counted it", Utc::now())
            .await
            .unwrap();
        assert_eq!(p.ledger.undelivered().await.unwrap(), 0, "{mode:?}");
        p.ledger.close().await;
    }
}

/// The same crash, but run 2 comes 2 hours later, within Stripe's window: the record is resent
/// under the same identifier, Stripe deduplicates it (counted once) and it is sent. A person
/// who instead replays a record held back after such a crash gets it sent too.
#[tokio::test]
async fn a_run_killed_before_recording_stripes_answer_is_resent_within_stripes_window() {
    for mode in [StripeMode::V1, StripeMode::V2Stream] {
        let w = World::start(Duration::from_secs(86_400), mode).await;
        let record = line("a", 7);
        let key = record.idempotency_key();
        w.stage(vec![record]).await;
        let t0 = Utc::now();
        w.sync_killed_once_stripe_stored(&key, t0).await;
        let requests = w.ingestion_requests();

        let second = w.sync(t0 + chrono::Duration::hours(2)).await;
        assert_eq!(w.ingestion_requests(), requests + 1, "{mode:?}: resent");
        assert_eq!(
            second.sent + second.already_delivered,
            1,
            "{mode:?}: {second:?}"
        );
        assert_eq!(w.stripe.count(&key), 1, "{mode:?}: counted once");
        let rows = w.rows().await;
        assert_eq!(rows[0].1, "sent", "{mode:?}");
        assert_eq!(w.marks().await[0].1, None, "{mode:?}");
    }

    // Held back after the window, then replayed by a person (who checked with `reconcile`):
    // sent, with nothing unclear or marked left.
    let w = World::start(Duration::from_millis(1), StripeMode::V1).await;
    let record = line("a", 7);
    let key = record.idempotency_key();
    w.stage(vec![record]).await;
    let t0 = Utc::now();
    w.sync_killed_once_stripe_stored(&key, t0).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = t0 + a_day_and_an_hour();
    assert_eq!(w.sync(later).await.rejected, 1);
    let replay = w.replay_rejected(Some(&key), later).await;
    assert_eq!(replay.sent, 1, "{replay:?}");
    let rows = w.rows().await;
    assert_eq!((rows[0].1.as_str(), rows[0].4.clone()), ("sent", None));
    assert_eq!(w.marks().await[0].1, None);
}

/// Clear failures are no unclear delivery and leave no mark: a 429 (Stripe did not run the
/// request) fails one record, a 401 (a revoked key) then stops the sink before the other is
/// answered. Neither is marked as being sent nor as unclear afterwards, so a run two days later
/// sends both as usual, each counted once.
#[tokio::test]
async fn a_clear_failure_leaves_no_mark() {
    let w = World::start(Duration::from_millis(1), StripeMode::V1).await;
    let limited = line("a", 7);
    let refused = line("b", 5);
    let keys = [limited.idempotency_key(), refused.idempotency_key()];
    w.stage(vec![limited, refused]).await;
    w.stripe.rate_limit_next(1, None);
    w.stripe.fail_next(1, 401);
    let t0 = Utc::now();
    let first = w.sync(t0).await;
    assert_eq!(first.outcome, RunOutcome::SinkStopped, "{first:?}");
    assert_eq!(first.failed, 1, "{first:?}");
    let rows = w.rows().await;
    assert!(
        rows.iter().all(|r| r.1 == "pending" && r.4.is_none()),
        "{rows:?}"
    );
    let marks = w.marks().await;
    assert!(marks.iter().all(|m| m.1.is_none()), "{marks:?}");

    let second = w.sync(t0 + chrono::Duration::days(2)).await;
    assert_eq!((second.sent, second.rejected), (2, 0), "{second:?}");
    for key in &keys {
        assert_eq!(w.stripe.count(key), 1, "{key}");
    }
}

/// An orderly stop (SIGTERM) while the first batch is out, with more records read ahead: the
/// batch is answered and recorded, the records read ahead are not sent, and none of them keeps
/// a mark (only a crash leaves one), so they are sent as usual by a run days later.
#[tokio::test(flavor = "multi_thread")]
async fn an_orderly_stop_leaves_no_mark_on_records_read_ahead() {
    let w = World::start(Duration::from_millis(1), StripeMode::V2Stream).await;
    let n = billsync::sinks::stripe::MAX_BATCH + 50;
    w.stage((0..n).map(|i| line(&format!("r{i}"), 1)).collect())
        .await;
    w.stripe.set_delay(Duration::from_millis(500));
    let (trigger, shutdown) = billsync::shutdown::channel();
    let mut p = w.pipeline().await;
    p.shutdown = shutdown;
    p.shutdown_deadline = Duration::from_secs(10);
    let t0 = Utc::now();
    let run = spawn_sync(p, t0);
    while w.ingestion_requests() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    trigger.trigger();
    let first = run.await.unwrap().unwrap();
    assert_eq!(first.outcome, RunOutcome::Interrupted);
    assert_eq!(
        first.sent,
        billsync::sinks::stripe::MAX_BATCH as u64,
        "{first:?}"
    );
    let rows = w.rows().await;
    let pending: Vec<_> = rows.iter().filter(|r| r.1 == "pending").collect();
    assert_eq!(pending.len(), 50);
    assert!(
        pending.iter().all(|r| r.2 == 0 && r.4.is_none()),
        "{pending:?}"
    );
    let marks = w.marks().await;
    assert!(marks.iter().all(|m| m.1.is_none()), "{marks:?}");

    w.stripe.clear_faults();
    let second = w.sync(t0 + chrono::Duration::days(2)).await;
    assert_eq!((second.sent, second.rejected), (50, 0), "{second:?}");
}

/// A ledger last written by the release before the mark (schema 0010) upgrades: its pending
/// record is sent and leaves no mark, and one whose delivery ended unclear two days before is
/// still held back.
#[tokio::test]
async fn a_ledger_from_schema_0010_upgrades() {
    let w = World::start(Duration::from_millis(1), StripeMode::V1).await;
    let untried = line("a", 7);
    let tried = line("b", 5);
    // The rows as a sync maps them (on a scratch ledger: the real one is built old below).
    let scratch = tempfile::tempdir().unwrap();
    let p = Pipeline::new(
        Ledger::open(&scratch.path().join("ledger.db"))
            .await
            .unwrap(),
        vec![],
        vec![Box::new(w.sink())],
        mappings(),
    );
    let rows: Vec<StageRow> = [&untried, &tried]
        .into_iter()
        .map(|l| p.stage_row(l.clone(), false))
        .collect();
    p.ledger.close().await;

    let path = w.dir.path().join("ledger.db");
    let pool = old_ledger::at_schema_0001(&path).await;
    let two_days_ago =
        (Utc::now() - chrono::Duration::days(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let stamp = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for (id, (row, (attempts, error))) in rows
        .iter()
        .zip([(0, None), (1, Some("HTTP 502: Bad Gateway"))])
        .enumerate()
    {
        let r = &row.record;
        sqlx::query(
            "INSERT INTO records (id, idem_key, source, provider, natural_key, content_hash, status,
                 is_final, charge_period_start, charge_period_end, billing_account_id,
                 sub_account_id, resource_type, resource_id, consumed_quantity, consumed_unit,
                 billed_cost, billing_currency, rule, sink, subscription, metric, value, payload,
                 record_json, first_run, last_run, staged_at, updated_at, attempts, last_error)
             VALUES (?1, ?2, 'ms', 'metalsoft', ?3, ?4, 'pending', 1, ?5, ?6, 'acct', '1',
                 'instance', ?7, ?8, 'calls', '1', 'EUR', 'calls', 'stripe', 'cus_A', 'api_calls',
                 ?8, ?9, ?10, 1, 1, ?11, ?11, ?12, ?13)",
        )
        .bind(id as i64 + 1)
        .bind(&row.key)
        .bind(r.natural_key_string())
        .bind(&row.content_hash)
        .bind(stamp(r.charge_period_start))
        .bind(stamp(r.charge_period_end))
        .bind(r.resource_id.as_str())
        .bind(r.consumed_quantity.to_string())
        .bind(row.mapped.payload.as_deref().unwrap())
        .bind(serde_json::to_string(r).unwrap())
        .bind(&two_days_ago)
        .bind(attempts)
        .bind(error)
        .execute(&pool)
        .await
        .unwrap();
    }
    old_ledger::upgrade_to(&pool, &path, 10).await;
    pool.close().await;
    assert_eq!(old_ledger::newest_migration(&path).await, 10);

    let run = w.sync(Utc::now()).await;
    assert!(old_ledger::newest_migration(&path).await >= 11);
    assert_eq!((run.sent, run.rejected), (1, 1), "{run:?}");
    assert_eq!(w.stripe.count(&untried.idempotency_key()), 1);
    assert_eq!(w.stripe.count(&tried.idempotency_key()), 0, "held back");
    let rows = w.rows().await;
    assert_eq!(
        (rows[0].1.as_str(), rows[1].1.as_str()),
        ("sent", "rejected")
    );
    let marks = w.marks().await;
    assert!(marks.iter().all(|m| m.1.is_none()), "{marks:?}");
}

/// The preview of a dry run says what the real run will do with an original held back after an
/// unclear delivery whose content then changed: a change to look at (a correction of what was
/// sent), not a record restaged in place. It counted it `restaged` (the real run leaves the
/// original held back and stages `.r1`), and wrote nothing either way.
#[tokio::test]
async fn a_dry_run_previews_a_restated_held_back_original_as_a_correction() {
    let w = World::start(Duration::from_millis(1), StripeMode::V1).await;
    let base = line("a", 7);
    let t0 = Utc::now();
    w.stage_as_sync(base.clone()).await;
    w.stripe.store_then_drop_next(1, DropMode::Status502);
    assert_eq!(w.sync(t0).await.failed, 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(w.sync(t0 + a_day_and_an_hour()).await.rejected, 1);
    let before = w.rows().await;

    let restated = UsageRecord {
        consumed_quantity: Decimal::from(8),
        ..base.clone()
    };
    let serving = serving::Serving(std::sync::Arc::new(std::sync::Mutex::new(vec![restated])));
    let ledger = Ledger::open(&w.dir.path().join("ledger.db")).await.unwrap();
    let p = Pipeline::new(
        ledger,
        vec![Box::new(serving)],
        vec![Box::new(w.sink())],
        mappings(),
    );
    let preview = p
        .sync(&SyncOptions {
            dry_run: true,
            now: Some(t0 + a_day_and_an_hour()),
            ..Default::default()
        })
        .await
        .unwrap();
    p.ledger.close().await;
    assert_eq!(
        (preview.restaged, preview.changed_after_send),
        (0, 1),
        "{preview:?}"
    );
    assert_eq!(w.rows().await, before, "a dry run writes nothing");
}

/// A run whose lock was taken over leaves the marks of the records it read ahead and did not
/// send: the run that took the lock may have marked and sent them itself, and a mark the first
/// run cleared under it would leave no trace if that run then crashed (a resend after Stripe's
/// window counted twice). The next run claims what is left as unclear and, within the window,
/// sends each record once. Before, the first run cleared them.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_lock_was_taken_over_leaves_the_marks_of_what_it_did_not_send() {
    let w = World::start(Duration::from_secs(86_400), StripeMode::V1).await;
    let lines: Vec<UsageRecord> = (0..150).map(|i| line(&format!("r{i}"), 1)).collect();
    w.stage(lines).await;
    // The first batch of 100 takes a while; the other 50, read ahead and marked with it, wait.
    w.stripe.set_delay(Duration::from_millis(40));
    let mut pipeline = w.pipeline().await;
    pipeline.lock_ttl = Duration::from_secs(1);
    let other = Ledger::open(&w.dir.path().join("ledger.db")).await.unwrap();
    let t0 = Utc::now();
    let run = spawn_sync(pipeline, t0);
    for _ in 0..500 {
        if w.ingestion_requests() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(w.ingestion_requests() >= 1, "the first batch is out");
    other
        .acquire_lock(
            "intruder:1:0",
            Utc::now() + chrono::Duration::days(1),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let result = run.await.unwrap();
    assert!(
        result.is_err(),
        "the run stops on its lost lock: {result:?}"
    );
    let marks = w.marks().await;
    let rows = w.rows().await;
    let unsent: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].1 == "pending")
        .collect();
    assert!(!unsent.is_empty(), "some records were not sent: {rows:?}");
    assert!(
        unsent.iter().all(|&i| marks[i].1.is_some()),
        "the records read ahead and not sent keep their marks: {marks:?}"
    );
    other.release_lock("intruder:1:0").await.unwrap();
    other.close().await;

    w.stripe.set_delay(Duration::ZERO);
    let next = w.sync(t0 + chrono::Duration::hours(1)).await;
    assert_eq!(next.rejected, 0, "{next:?}");
    for (key, _) in w.marks().await {
        assert_eq!(w.stripe.count(&key), 1, "{key} counted once");
    }
    assert!(w.marks().await.iter().all(|(_, m)| m.is_none()));
}
