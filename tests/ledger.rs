//! The ledger as a specification: outbox staging, no-op re-reads, changes of sent records kept
//! beside them, acknowledgements, the run lock, and refusal of a ledger from a newer binary.

#[path = "common/old_ledger.rs"]
mod old_ledger;

use std::str::FromStr;
use std::time::Duration;

use billsync::ledger::{
    Correction, Ledger, LedgerError, MappedColumns, RecordFilter, SentState, StageRow, Status,
};
use billsync::record::UsageRecord;
use billsync::sinks::Outcome;
use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;

fn record(resource: &str, cost: &str) -> UsageRecord {
    let start = Utc.with_ymd_and_hms(2026, 10, 5, 0, 0, 0).unwrap();
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
        charge_period_start: start,
        charge_period_end: start + chrono::Duration::hours(1),
        consumed_quantity: Decimal::from(3600),
        consumed_unit: "seconds".into(),
        billed_cost: Decimal::from_str(cost).unwrap(),
        billing_currency: "GBP".into(),
        scope: "1".into(),
        natural_key: vec![("resource".into(), resource.into())],
        is_final: true,
        attributes: Default::default(),
        raw: Default::default(),
    }
}

fn row(r: UsageRecord) -> StageRow {
    let value = r.billed_cost;
    StageRow {
        key: r.idempotency_key(),
        content_hash: r.content_hash(),
        match_hash: r.match_hash(),
        status: Status::Pending,
        mapped: MappedColumns {
            rule: Some("test#rule".into()),
            sink: Some("lago".into()),
            subscription: Some("sub_1".into()),
            metric: Some("cost".into()),
            value: Some(value),
            payload: Some(format!("{{\"value\":\"{value}\"}}")),
            ..Default::default()
        },
        note: None,
        event: None,
        correction_of: None,
        revision: 0,
        body: None,
        record: r,
    }
}

/// A correction policy that always leaves the change to a person.
fn by_hand(_: &StageRow, sent: &SentState) -> Correction {
    Correction::Unresolved(format!("{} changed", sent.key))
}

/// A correction policy that sends the difference (what the pipeline does for sum metrics).
fn difference(row: &StageRow, sent: &SentState) -> Correction {
    let value = row.mapped.value.unwrap();
    let difference = value - sent.sent_total;
    if difference.is_zero() {
        return Correction::NoDifference;
    }
    let mut c = row.clone();
    c.key = format!("{}.r{}", sent.key, sent.next_revision);
    c.mapped.value = Some(difference);
    c.mapped.payload = Some(format!("{{\"value\":\"{difference}\"}}"));
    Correction::Send {
        row: Box::new(c),
        difference,
    }
}

async fn open(dir: &tempfile::TempDir) -> Ledger {
    Ledger::open(&dir.path().join("ledger.db")).await.unwrap()
}

#[tokio::test]
async fn staging_is_idempotent_and_moves_the_cursor_in_the_same_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    let rows = vec![row(record("a", "1.10")), row(record("b", "2.20"))];

    let first = ledger
        .stage(
            run,
            &rows,
            Some(("ms", "user:1", "2026-10-05T01:00:00Z")),
            now,
            &by_hand,
        )
        .await
        .unwrap();
    assert_eq!(first.new, 2);
    assert_eq!(
        ledger.cursors("ms").await.unwrap()["user:1"],
        "2026-10-05T01:00:00Z"
    );

    let again = ledger.stage(run, &rows, None, now, &by_hand).await.unwrap();
    assert_eq!((again.new, again.unchanged), (0, 2));
    assert_eq!(ledger.pending_batch("lago", 0, 100).await.unwrap().len(), 2);
    // What a sync compares with the configured sources (a renamed source bills twice).
    ledger
        .stage(run, &[], Some(("jel", "window", "x")), now, &by_hand)
        .await
        .unwrap();
    assert_eq!(ledger.cursor_sources().await.unwrap(), ["jel", "ms"]);
}

#[tokio::test]
async fn a_sent_record_that_changes_is_kept_as_a_change_and_its_payload_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    ledger
        .stage(run, &[row(record("a", "1.10"))], None, now, &by_hand)
        .await
        .unwrap();
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    let frozen = batch[0].payload.clone();
    ledger
        .ack(run, &[(batch[0].id, Outcome::Delivered)], now)
        .await
        .unwrap();

    let changed = ledger
        .stage(run, &[row(record("a", "1.25"))], None, now, &by_hand)
        .await
        .unwrap();
    assert_eq!(changed.changed_after_send, 1);
    // Seen a second time with the same new content: nothing new.
    let again = ledger
        .stage(run, &[row(record("a", "1.25"))], None, now, &by_hand)
        .await
        .unwrap();
    assert_eq!((again.changed_after_send, again.unchanged), (0, 1));
    let status = ledger.status().await.unwrap();
    assert_eq!(status.open_changes, 1);
    assert_eq!(
        ledger.counts_by_source().await.unwrap()[&("ms".to_string(), "sent".to_string())],
        1
    );
    let totals = ledger.sent_totals(run).await.unwrap();
    assert_eq!(
        totals[&("ms".to_string(), "sub_1".to_string(), "cost".to_string())],
        Decimal::from_str("1.10").unwrap()
    );
    assert!(frozen.contains("1.10"));
    assert_eq!(ledger.pending_batch("lago", 0, 100).await.unwrap().len(), 0);
}

#[tokio::test]
async fn corrections_carry_the_difference_to_what_was_sent_so_far() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    let send_all = |ledger: Ledger| async move {
        let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
        let acks: Vec<_> = batch.iter().map(|o| (o.id, Outcome::Delivered)).collect();
        ledger.ack(run, &acks, Utc::now()).await.unwrap();
        batch
    };
    ledger
        .stage(run, &[row(record("a", "1.10"))], None, now, &difference)
        .await
        .unwrap();
    send_all(ledger.clone()).await;

    // 1.10 → 1.25: one correction of +0.15, keyed from the original key.
    let c = ledger
        .stage(run, &[row(record("a", "1.25"))], None, now, &difference)
        .await
        .unwrap();
    assert_eq!(c.corrections, 1);
    let first = send_all(ledger.clone()).await;
    assert_eq!(first.len(), 1);
    let key = record("a", "1").idempotency_key();
    assert_eq!(first[0].key, format!("{key}.r1"));
    assert!(
        first[0].payload.contains("\"0.15\""),
        "{}",
        first[0].payload
    );

    // 1.25 → 1.00: the next correction is measured against 1.25 (original + r1): −0.25.
    ledger
        .stage(run, &[row(record("a", "1.00"))], None, now, &difference)
        .await
        .unwrap();
    let second = send_all(ledger.clone()).await;
    assert_eq!(second[0].key, format!("{key}.r2"));
    assert!(
        second[0].payload.contains("\"-0.25\""),
        "{}",
        second[0].payload
    );

    // The same content again: nothing.
    let same = ledger
        .stage(run, &[row(record("a", "1.00"))], None, now, &difference)
        .await
        .unwrap();
    assert_eq!((same.corrections, same.unchanged), (0, 1));
    let totals = ledger.sent_totals(run).await.unwrap();
    assert_eq!(
        totals[&("ms".to_string(), "sub_1".to_string(), "cost".to_string())],
        Decimal::from_str("1.00").unwrap(),
        "original + corrections = the latest content"
    );
    assert_eq!(ledger.status().await.unwrap().corrections, 2);
}

/// A pending record may be at the sink already (a delivery whose answer was lost, a crash
/// before its acknowledgement), under its key, which the sink would not take again with new
/// content: its payload stays frozen and the change goes out as a correction, so the sink ends
/// with the latest value whether or not it had the first.
#[tokio::test]
async fn a_pending_record_that_changes_keeps_its_payload_and_the_change_is_a_correction() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    ledger
        .stage(run, &[row(record("a", "1.10"))], None, now, &difference)
        .await
        .unwrap();
    // Offered to the sink, the answer lost: still pending.
    let offered = ledger.pending_batch("lago", 0, 100).await.unwrap();
    ledger
        .ack(
            run,
            &[(offered[0].id, Outcome::Failed("timed out".into()))],
            now,
        )
        .await
        .unwrap();
    let c = ledger
        .stage(run, &[row(record("a", "1.25"))], None, now, &difference)
        .await
        .unwrap();
    assert_eq!((c.restaged, c.corrections), (0, 1));
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    let key = record("a", "1").idempotency_key();
    let sent: Vec<(&str, &str)> = batch
        .iter()
        .map(|o| (o.key.as_str(), o.payload.as_str()))
        .collect();
    assert_eq!(
        sent,
        [
            (key.as_str(), "{\"value\":\"1.10\"}"),
            (format!("{key}.r1").as_str(), "{\"value\":\"0.15\"}"),
        ]
    );
    // The same new content again: nothing more.
    let same = ledger
        .stage(run, &[row(record("a", "1.25"))], None, now, &difference)
        .await
        .unwrap();
    assert_eq!((same.corrections, same.unchanged), (0, 1));
}

/// `status` groups undelivered records with their reason: held ones, and pending ones after a
/// failed attempt. A correction waiting for its first attempt carries a note ("correction of
/// …"), which is not a failure: listed with the failures, every queued correction looked like
/// a record the sink would not take.
#[tokio::test]
async fn status_lists_failed_pending_records_but_not_corrections_waiting_for_their_first_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    // What the pipeline writes for a correction: its note names the original.
    let noted = |row: &StageRow, sent: &SentState| match difference(row, sent) {
        Correction::Send {
            mut row,
            difference,
        } => {
            row.note = Some(format!("correction of {}", sent.key));
            Correction::Send { row, difference }
        }
        other => other,
    };
    ledger
        .stage(run, &[row(record("a", "1.10"))], None, now, &noted)
        .await
        .unwrap();
    let offered = ledger.pending_batch("lago", 0, 100).await.unwrap();
    ledger
        .ack(
            run,
            &[(offered[0].id, Outcome::Failed("HTTP 503".into()))],
            now,
        )
        .await
        .unwrap();
    let c = ledger
        .stage(run, &[row(record("a", "1.25"))], None, now, &noted)
        .await
        .unwrap();
    assert_eq!(c.corrections, 1);
    let reasons = |st: billsync::ledger::LedgerStatus| {
        st.held_reasons
            .into_iter()
            .map(|h| (h.status, h.count, h.reason))
            .collect::<Vec<_>>()
    };
    let st = ledger.status().await.unwrap();
    assert_eq!(st.held_reason_groups, 1);
    assert_eq!(
        reasons(st),
        [("pending".to_string(), 1, "HTTP 503".to_string())]
    );
    // Once the correction's own attempt fails, it is a failure like any other.
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    let acks: Vec<_> = batch
        .iter()
        .map(|o| (o.id, Outcome::Failed("HTTP 502".into())))
        .collect();
    ledger.ack(run, &acks, now).await.unwrap();
    let st = ledger.status().await.unwrap();
    assert_eq!(
        reasons(st),
        [("pending".to_string(), 2, "HTTP 502".to_string())]
    );
}

/// A run's summary adds up what it sent per source, subscription and metric. Two values near
/// a decimal's limit (providers may send up to ±7.9e28) add up beyond it: that group's total is
/// left out (with a warning), the others are printed, and nothing panics after the records
/// were acknowledged.
#[tokio::test]
async fn a_run_total_beyond_a_decimals_range_is_left_out_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    let huge = "50000000000000000000000000000";
    let mut small = row(record("c", "1.25"));
    small.mapped.subscription = Some("sub_2".into());
    let rows = vec![row(record("a", huge)), row(record("b", huge)), small];
    ledger.stage(run, &rows, None, now, &by_hand).await.unwrap();
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    let acks: Vec<_> = batch.iter().map(|o| (o.id, Outcome::Delivered)).collect();
    ledger.ack(run, &acks, now).await.unwrap();
    let totals = ledger.sent_total_list(run).await.unwrap();
    assert_eq!(
        totals
            .iter()
            .map(|(_, sub, _, v)| (sub.to_string(), *v))
            .collect::<Vec<_>>(),
        [("sub_2".to_string(), Decimal::from_str("1.25").unwrap())]
    );
}

/// What no sink was ever offered (held: unmapped, ignored, provisional, rejected) is simply
/// staged again with its new content, in place.
#[tokio::test]
async fn a_held_record_that_changes_is_restaged_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    let provisional = |cost: &str| StageRow {
        status: Status::Provisional,
        ..row(record("a", cost))
    };
    ledger
        .stage(run, &[provisional("1.10")], None, now, &difference)
        .await
        .unwrap();
    let c = ledger
        .stage(run, &[row(record("a", "1.25"))], None, now, &difference)
        .await
        .unwrap();
    assert_eq!((c.restaged, c.corrections), (1, 0));
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].payload, "{\"value\":\"1.25\"}");
}

#[tokio::test]
async fn rejected_and_failed_outcomes_keep_the_record_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    ledger
        .stage(
            run,
            &[row(record("a", "1")), row(record("b", "2"))],
            None,
            now,
            &by_hand,
        )
        .await
        .unwrap();
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    ledger
        .ack(
            run,
            &[
                (batch[0].id, Outcome::Rejected("code: invalid".into())),
                (batch[1].id, Outcome::Failed("HTTP 503".into())),
            ],
            now,
        )
        .await
        .unwrap();
    let rejected = ledger
        .records_matching(&RecordFilter::status(Status::Rejected), 0, 10)
        .await
        .unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].key, batch[0].key);
    assert_eq!(ledger.pending_batch("lago", 0, 100).await.unwrap().len(), 1);
    assert_eq!(ledger.undelivered().await.unwrap(), 2);
    // Each keeps the reason its sink gave, shown by `export`.
    let mut csv = Vec::new();
    let all = RecordFilter {
        status: None,
        ..RecordFilter::status(Status::Sent)
    };
    ledger.export_csv(&all, &mut csv).await.unwrap();
    let csv = String::from_utf8(csv).unwrap();
    let line_of = |key: &str| {
        csv.lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("{key} exported: {csv}"))
            .to_string()
    };
    let (a, b) = (line_of(&batch[0].key), line_of(&batch[1].key));
    assert!(
        a.contains(",rejected,") && a.contains(",code: invalid,"),
        "{a}"
    );
    assert!(b.contains(",pending,") && b.contains(",HTTP 503,"), "{b}");
}

/// An acknowledgement moves only pending records. A late or repeated "delivered" for a record
/// that is no longer pending (rejected by the sink, or sent by an earlier run) changes nothing:
/// the rejected record stays rejected with its reason (a person must look at it), and the sent
/// one stays counted in the run that sent it, not again in the next.
#[tokio::test]
async fn an_acknowledgement_moves_only_pending_records() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let first = ledger.start_run("sync", now).await.unwrap();
    ledger
        .stage(
            first,
            &[row(record("a", "1")), row(record("b", "2"))],
            None,
            now,
            &by_hand,
        )
        .await
        .unwrap();
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    let (rejected, sent) = (&batch[0], &batch[1]);
    ledger
        .ack(
            first,
            &[
                (rejected.id, Outcome::Rejected("code: invalid".into())),
                (sent.id, Outcome::Delivered),
            ],
            now,
        )
        .await
        .unwrap();
    let sent_in_first = ledger.sent_totals(first).await.unwrap();
    assert_eq!(
        sent_in_first.values().copied().sum::<Decimal>(),
        Decimal::from(2)
    );

    let second = ledger.start_run("sync", now).await.unwrap();
    ledger
        .ack(
            second,
            &[
                (rejected.id, Outcome::Delivered),
                (sent.id, Outcome::AlreadyDelivered),
            ],
            now,
        )
        .await
        .unwrap();
    let still_rejected = ledger
        .records_matching(&RecordFilter::status(Status::Rejected), 0, 10)
        .await
        .unwrap();
    assert_eq!(
        still_rejected.iter().map(|r| &r.key).collect::<Vec<_>>(),
        [&rejected.key]
    );
    assert_eq!(ledger.undelivered().await.unwrap(), 1);
    assert_eq!(ledger.sent_totals(first).await.unwrap(), sent_in_first);
    assert!(ledger.sent_totals(second).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_lock_keeps_a_second_run_out_until_released_or_expired() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let ttl = Duration::from_secs(60);
    ledger.acquire_lock("run-a", now, ttl).await.unwrap();
    // Live up to its last second: refused at once and one second before it expires.
    for later in [0, 59] {
        match ledger
            .acquire_lock("run-b", now + chrono::Duration::seconds(later), ttl)
            .await
        {
            Err(LedgerError::Locked { holder, .. }) => assert_eq!(holder, "run-a", "+{later}s"),
            other => panic!("expected Locked at +{later}s, got {other:?}"),
        }
    }
    // A crashed holder's lock expires: from the second its ttl ends, another run takes it.
    ledger
        .acquire_lock("run-b", now + chrono::Duration::seconds(60), ttl)
        .await
        .unwrap();
    ledger.release_lock("run-b").await.unwrap();
    ledger.acquire_lock("run-c", now, ttl).await.unwrap();
}

/// Kubernetes retries a Job whose pod crashed (OOM kill, SIGKILL) with a new pod, and only once
/// the old one has ended. The retry takes over the lock its own Job's earlier attempt left
/// (holders named `job:<name>/…`, from `BILLSYNC_JOB_NAME`) instead of failing on it with
/// exit 3 for `lock_ttl`. Any other holder keeps it: another Job (the next hour's, a replay), a
/// run outside Kubernetes, a Job whose name only begins like this one's, and a second sync of
/// the same Job in the same pod (started by hand with `kubectl exec` beside the live run: a
/// retry is always a new pod, `restartPolicy: Never`, hence another host name). The attempt
/// taken over finds out at its next refresh.
#[tokio::test]
async fn a_retry_of_the_same_job_takes_over_its_crashed_attempts_lock_and_nobody_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let ttl = Duration::from_secs(900);
    let first = "job:billsync-29412345/billsync-29412345-x7k2p:1:0000abcd";
    ledger.acquire_lock(first, now, ttl).await.unwrap();
    for other in [
        "job:billsync-29412405/billsync-29412405-q9m4d:1:00001234",
        "job:billsync-2941234/billsync-2941234-aaaaa:1:00001234",
        "billsync-29412345-x7k2p:1:0000abcd",
        "host:42:00000001",
        "job:billsync-29412345/billsync-29412345-x7k2p:77:00005678",
    ] {
        match ledger.acquire_lock(other, now, ttl).await {
            Err(LedgerError::Locked { holder, .. }) => assert_eq!(holder, first, "{other}"),
            got => panic!("{other} took the lock: {got:?}"),
        }
    }
    let retry = "job:billsync-29412345/billsync-29412345-m3n8v:1:0000ef01";
    ledger
        .acquire_lock(retry, now + chrono::Duration::seconds(5), ttl)
        .await
        .unwrap();
    assert!(matches!(
        ledger
            .refresh_lock(first, now + chrono::Duration::seconds(30), ttl)
            .await,
        Err(LedgerError::Locked { .. })
    ));
    let st = ledger.status().await.unwrap();
    assert_eq!(st.lock.unwrap().0, retry);
}

#[tokio::test]
async fn a_ledger_from_a_newer_binary_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let ledger = Ledger::open(&path).await.unwrap();
    ledger.close().await;
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (9999, 'from the future', 1, x'00', 0)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let err = Ledger::open(&path).await.unwrap_err();
    assert!(
        matches!(err, LedgerError::Newer { version: 9999, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("newer billsync"), "{err}");
}

#[tokio::test]
async fn export_writes_filtered_csv_and_vacuum_prunes_only_old_sent_records() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    ledger
        .stage(
            run,
            &[row(record("a", "1.10")), row(record("b,with-comma", "2.5"))],
            None,
            now,
            &by_hand,
        )
        .await
        .unwrap();
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    ledger
        .ack(run, &[(batch[0].id, Outcome::Delivered)], now)
        .await
        .unwrap();

    let mut csv = Vec::new();
    let n = ledger
        .export_csv(&RecordFilter::status(Status::Sent), &mut csv)
        .await
        .unwrap();
    let csv = String::from_utf8(csv).unwrap();
    assert_eq!(n, 1);
    assert!(
        csv.starts_with("id,idem_key,source,provider,status,"),
        "{csv}"
    );
    assert!(csv.contains(",sent,"), "{csv}");
    let mut everything = Vec::new();
    ledger
        .export_csv(&RecordFilter::status(Status::Pending), &mut everything)
        .await
        .unwrap();
    assert!(
        String::from_utf8(everything)
            .unwrap()
            .contains("\"b,with-comma\""),
        "a comma in a field is quoted"
    );
    let all = RecordFilter {
        status: None,
        ..RecordFilter::status(Status::Sent)
    };
    let mut csv = Vec::new();
    assert_eq!(ledger.export_csv(&all, &mut csv).await.unwrap(), 2);

    // Nothing is old enough yet; then, a cutoff in the future prunes the sent record only.
    let ttl = Duration::from_secs(60);
    ledger.acquire_lock("vacuum", now, ttl).await.unwrap();
    assert_eq!(
        ledger
            .vacuum(now - chrono::Duration::days(1), "vacuum", ttl)
            .await
            .unwrap()
            .pruned,
        0
    );
    let later = now + chrono::Duration::days(400);
    assert_eq!(ledger.prunable(later).await.unwrap(), 1, "dry run counts");
    assert_eq!(ledger.vacuum(later, "vacuum", ttl).await.unwrap().pruned, 1);
    assert_eq!(
        ledger.vacuum(later, "vacuum", ttl).await.unwrap().pruned,
        0,
        "already pruned"
    );
    // Without the run lock, nothing is pruned.
    ledger.release_lock("vacuum").await.unwrap();
    assert!(matches!(
        ledger.vacuum(later, "vacuum", ttl).await,
        Err(LedgerError::Locked { .. })
    ));
    // The pending record is untouched and still goes out with its payload.
    let pending = ledger.pending_batch("lago", 0, 100).await.unwrap();
    assert_eq!(pending.len(), 1);
    // The tombstone still makes a re-read of the pruned record a no-op.
    let again = ledger
        .stage(run, &[row(record("a", "1.10"))], None, now, &by_hand)
        .await
        .unwrap();
    assert_eq!((again.new, again.unchanged), (0, 1));
}

/// A ledger written before record bodies had their own table (schema 0001) opens with every
/// record readable: its JSON body, its frozen payload (still sent byte for byte), its key.
#[tokio::test]
async fn a_ledger_from_schema_0001_keeps_its_records_and_payloads_after_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pool) = old_ledger::in_dir_at_schema_0001(dir.path()).await;
    let pending = record("instance:1", "1.25");
    let sent = record("instance:2", "2.50");
    for (id, r, status, payload) in [
        (1, &pending, "pending", "{\"frozen\":\"one\"}"),
        (2, &sent, "sent", "{\"frozen\":\"two\"}"),
    ] {
        sqlx::query(
            "INSERT INTO records (id, idem_key, source, provider, natural_key, content_hash, status,
                 is_final, charge_period_start, charge_period_end, billing_account_id,
                 sub_account_id, resource_type, resource_id, consumed_quantity, consumed_unit,
                 billed_cost, billing_currency, sink, payload, record_json, first_run, last_run,
                 staged_at, updated_at)
             VALUES (?1, ?2, 'ms', 'metalsoft', ?3, ?4, ?5, 1, '2026-10-05T00:00:00Z',
                 '2026-10-05T01:00:00Z', 'acct', '1', 'instance', ?6, '3600', 'seconds', ?7, 'GBP',
                 'lago', ?8, ?9, 1, 1, '2026-10-06T00:00:00Z', '2026-10-06T00:00:00Z')",
        )
        .bind(id)
        .bind(r.idempotency_key())
        .bind(r.natural_key_string())
        .bind(r.content_hash())
        .bind(status)
        .bind(r.resource_id.as_str())
        .bind(r.billed_cost.to_string())
        .bind(payload)
        .bind(serde_json::to_string(r).unwrap())
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;

    let ledger = Ledger::open(&path).await.unwrap();
    let run = ledger.start_run("sync", Utc::now()).await.unwrap();
    let batch = ledger.pending_batch("lago", 0, 10).await.unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].key, pending.idempotency_key());
    assert_eq!(batch[0].payload, "{\"frozen\":\"one\"}");
    let stored = ledger.record_by_id(2).await.unwrap().unwrap();
    assert_eq!(stored.billed_cost, Decimal::from_str("2.50").unwrap());
    assert_eq!(stored.resource_id, "instance:2");
    // Re-reading the same content is a no-op for both, and the sent one is never re-sent.
    let now = Utc::now();
    let counts = ledger
        .stage(
            run,
            &[row(pending.clone()), row(sent.clone())],
            None,
            now,
            &by_hand,
        )
        .await
        .unwrap();
    assert_eq!((counts.new, counts.unchanged), (0, 2));
    assert_eq!(ledger.pending_batch("lago", 0, 10).await.unwrap().len(), 1);
    // A new record after the upgrade gets the next id and a compressed body that reads back.
    let fresh = record("instance:3", "0.10");
    ledger
        .stage(run, &[row(fresh.clone())], None, now, &by_hand)
        .await
        .unwrap();
    let third = ledger.record_by_id(3).await.unwrap().unwrap();
    assert_eq!(third.resource_id, "instance:3");
    assert_eq!(third.billed_cost, fresh.billed_cost);
    // The upgrade rewrote the status CHECK too (migration 0004), and it still holds.
    let (pool, schema) = records_schema(&path).await;
    assert!(!schema.contains("status IN ("), "{schema}");
    assert!(
        sqlx::query("UPDATE records SET status = 'lost' WHERE id = 1")
            .execute(&pool)
            .await
            .is_err()
    );
}

/// A connection of its own to the ledger at `path`, and the `records` table's schema text.
async fn records_schema(path: &std::path::Path) -> (sqlx::SqlitePool, String) {
    let pool =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(path))
            .await
            .unwrap();
    let schema = sqlx::query_scalar(
        "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'records'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    (pool, schema)
}

/// The status CHECK accepts exactly the six statuses and nothing else, written so that SQLite
/// checks it without building a temporary B-tree per written row (a constant `IN` list of
/// more than two values is evaluated through one; migration 0004 rewrites it as comparisons).
/// (A ledger upgraded from schema 0001 is checked in the upgrade test above.)
#[tokio::test]
async fn the_status_check_allows_the_six_statuses_without_a_temporary_btree_per_row() {
    use sqlx::Row;
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let run = ledger.start_run("sync", Utc::now()).await.unwrap();
    ledger
        .stage(run, &[row(record("a", "1.00"))], None, Utc::now(), &by_hand)
        .await
        .unwrap();
    ledger.close().await;
    let (pool, schema) = records_schema(&dir.path().join("ledger.db")).await;
    assert!(!schema.contains("status IN ("), "{schema}");
    for status in [
        "pending",
        "sent",
        "unmapped",
        "ignored",
        "provisional",
        "rejected",
    ] {
        assert!(schema.contains(&format!("status = '{status}'")), "{schema}");
        sqlx::query("UPDATE records SET status = ?1 WHERE id = 1")
            .bind(status)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{status}: {e}"));
    }
    for wrong in ["Pending", "done", "", "sent "] {
        let err = sqlx::query("UPDATE records SET status = ?1 WHERE id = 1")
            .bind(wrong)
            .execute(&pool)
            .await
            .expect_err(wrong);
        assert!(err.to_string().contains("CHECK constraint failed"), "{err}");
    }
    // What staging and acknowledging execute: no ephemeral table opened for the check.
    for statement in [
        "EXPLAIN UPDATE records SET status = 'sent' WHERE id = 1",
        "EXPLAIN INSERT INTO records (status) VALUES ('pending')",
    ] {
        let opcodes: Vec<String> = sqlx::query(statement)
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>("opcode"))
            .collect();
        assert!(opcodes.iter().any(|o| o == "Halt"), "{opcodes:?}");
        assert!(
            !opcodes.iter().any(|o| o == "OpenEphemeral"),
            "{statement}: {opcodes:?}"
        );
    }
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test]
async fn a_checkpoint_copies_committed_pages_into_the_database_file() {
    // A sync checkpoints from the side so that its commits need not: what it copies must be
    // in the database file itself afterwards, not only in the WAL.
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let db = dir.path().join("ledger.db");
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    // Well below the 1,000 pages at which SQLite would checkpoint on its own.
    let rows: Vec<StageRow> = (0..500)
        .map(|i| row(record(&format!("r{i}"), "1.25")))
        .collect();
    ledger.stage(run, &rows, None, now, &by_hand).await.unwrap();
    let size = || std::fs::metadata(&db).unwrap().len();
    let before = size();

    ledger.checkpoint().await.unwrap();
    assert!(
        size() > before + 100 * 1024,
        "the staged pages reached the database file: {before} → {} bytes",
        size()
    );
    // Nothing left to copy: a second checkpoint changes nothing, and the records read back.
    let after = size();
    ledger.checkpoint().await.unwrap();
    assert_eq!(size(), after);
    assert_eq!(ledger.record_count().await.unwrap(), 500);
}

/// Pending records are read in id order, after the given id, at most `limit`; a pending record
/// whose frozen payload is gone is an error naming the record and the field, not a silent skip.
#[tokio::test]
async fn pending_records_read_in_order_and_a_missing_payload_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    let rows: Vec<StageRow> = (1..=5)
        .map(|i| row(record(&format!("instance:{i}"), "1.00")))
        .collect();
    ledger.stage(run, &rows, None, now, &by_hand).await.unwrap();
    let all = ledger.pending_batch("lago", 0, 100).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    let next = ledger.pending_batch("lago", all[1].id, 2).await.unwrap();
    let ids: Vec<i64> = next.iter().map(|o| o.id).collect();
    assert_eq!(ids, [all[2].id, all[3].id]);
    assert_eq!(next[0].key, all[2].key);
    assert_eq!(next[0].payload, all[2].payload);
    assert!(ledger
        .pending_batch("other-sink", 0, 100)
        .await
        .unwrap()
        .is_empty());

    let (pool, _) = records_schema(&dir.path().join("ledger.db")).await;
    sqlx::query("UPDATE record_bodies SET payload = NULL WHERE id = ?1")
        .bind(all[3].id)
        .execute(&pool)
        .await
        .unwrap();
    let err = ledger
        .pending_batch("lago", all[1].id, 10)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("payload"), "{err}");
    assert!(err.contains(&all[3].id.to_string()), "{err}");
}

/// A record SQLite refuses to write is named in the error, with SQLite's reason; the page's
/// transaction is rolled back whole (its other records and its cursor too), so nothing is half
/// staged and the next run pulls the page again.
#[tokio::test]
async fn a_record_sqlite_refuses_is_named_and_its_page_is_not_half_staged() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    let rows: Vec<StageRow> = ["a", "b", "c"]
        .iter()
        .map(|r| row(record(r, "1.00")))
        .collect();
    let refused = rows[1].key.clone();
    let cursor = Some(("ms", "user:1", "2026-10-05T01:00:00Z"));
    let (pool, _) = records_schema(&dir.path().join("ledger.db")).await;
    // The key is the test's own (letters, digits and dots): safe inside quotes.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TRIGGER refuse BEFORE INSERT ON records WHEN NEW.idem_key = '{refused}'
         BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
    )))
    .execute(&pool)
    .await
    .unwrap();

    let err = ledger
        .stage(run, &rows, cursor, now, &by_hand)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&refused), "{err}");
    assert!(err.contains("refused by a test trigger"), "{err}");
    assert!(!err.contains(&rows[0].key), "{err}");
    assert_eq!(ledger.record_count().await.unwrap(), 0);
    assert!(!ledger.cursors("ms").await.unwrap().contains_key("user:1"));

    // Once SQLite takes it, the same page stages whole.
    sqlx::query("DROP TRIGGER refuse")
        .execute(&pool)
        .await
        .unwrap();
    let counts = ledger
        .stage(run, &rows, cursor, now, &by_hand)
        .await
        .unwrap();
    assert_eq!(counts.new, 3);
    assert_eq!(ledger.record_count().await.unwrap(), 3);
    assert_eq!(
        ledger.cursors("ms").await.unwrap()["user:1"],
        "2026-10-05T01:00:00Z"
    );
}

/// A page that carries one key twice with two new contents (a provider repeating a record in
/// one answer): what goes out adds up to the last content, not to both changes.
#[tokio::test]
async fn a_key_changed_twice_in_one_page_is_corrected_once_to_its_last_content() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    ledger
        .stage(run, &[row(record("a", "1.10"))], None, now, &difference)
        .await
        .unwrap();
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    ledger
        .ack(run, &[(batch[0].id, Outcome::Delivered)], now)
        .await
        .unwrap();
    ledger
        .stage(
            run,
            &[row(record("a", "1.25")), row(record("a", "1.40"))],
            None,
            now,
            &difference,
        )
        .await
        .unwrap();
    let corrections = ledger.pending_batch("lago", 0, 100).await.unwrap();
    let payloads: Vec<&str> = corrections.iter().map(|o| o.payload.as_str()).collect();
    assert_eq!(payloads, ["{\"value\":\"0.30\"}"]);
}

/// Replay's writes (`remap`, `restage_correction`) change only records no sink was offered:
/// a pending or sent record's frozen payload stays what it is, whatever a caller asks. (The CLI
/// only replays unmapped or rejected records; this is the ledger's own guard.)
#[tokio::test]
async fn replay_writes_never_touch_the_payload_of_a_pending_or_sent_record() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    ledger
        .stage(
            run,
            &[row(record("a", "1.10")), row(record("b", "2.20"))],
            None,
            now,
            &by_hand,
        )
        .await
        .unwrap();
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    let (sent, pending) = (&batch[0], &batch[1]);
    ledger
        .ack(run, &[(sent.id, Outcome::Delivered)], now)
        .await
        .unwrap();

    let other = row(record("z", "9.99"));
    for id in [sent.id, pending.id] {
        ledger
            .restage_correction(run, id, &other, now)
            .await
            .unwrap();
        ledger
            .remap(run, id, Status::Pending, &other.mapped, None, now)
            .await
            .unwrap();
    }
    let still = ledger.pending_batch("lago", 0, 100).await.unwrap();
    assert_eq!(still.len(), 1);
    assert_eq!(
        (&still[0].key, &still[0].payload),
        (&pending.key, &pending.payload),
        "the pending record's payload was rewritten"
    );
    let stored = ledger
        .records_matching(&RecordFilter::status(Status::Sent), 0, 10)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].record.billed_cost,
        Decimal::from_str("1.10").unwrap()
    );
    let (pool, _) = records_schema(&dir.path().join("ledger.db")).await;
    let payload: String = sqlx::query_scalar("SELECT payload FROM record_bodies WHERE id = ?1")
        .bind(sent.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        payload, sent.payload,
        "the sent record's frozen payload was rewritten"
    );
}

/// A command that only reads (`status`, `ledger export`, …) opens an existing ledger as it is:
/// one of an older schema is refused with a clear error and left at its schema (an older
/// billsync, the one that runs the syncs, would refuse an upgraded one); `open` (sync,
/// replay) upgrades it, after which it opens for reading too.
#[tokio::test]
async fn reading_commands_never_upgrade_an_older_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pool) = old_ledger::in_dir_at_schema_0001(dir.path()).await;
    let version = || async {
        sqlx::query_scalar::<_, i64>("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    match Ledger::open_existing(&path).await {
        Err(LedgerError::Older {
            version: 1, known, ..
        }) => assert!(known > 1),
        Err(e) => panic!("expected Older, got {e}"),
        Ok(_) => panic!("an older ledger opened for reading"),
    }
    assert_eq!(version().await, 1, "left at its schema");

    Ledger::open(&path).await.unwrap();
    assert!(version().await > 1, "sync and replay upgrade it");
    Ledger::open_existing(&path).await.unwrap();
}

/// `ledger vacuum` prunes under the run lock. A prune that waits for SQLite's write lock (a
/// long transaction of another writer) or that itself lasts longer than `lock_ttl` outlives
/// its lock, and a sync may take the expired lock meanwhile: the vacuum must then change
/// nothing, instead of pruning and rewriting the file beside that sync. Its lock is checked and
/// extended in the prune's own transaction (and again before the VACUUM), where no other
/// writer can come in between.
#[tokio::test(flavor = "multi_thread")]
async fn a_vacuum_that_outlives_its_lock_prunes_nothing_once_a_sync_took_the_lock() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    ledger
        .stage(run, &[row(record("a", "1.10"))], None, now, &by_hand)
        .await
        .unwrap();
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    ledger
        .ack(run, &[(batch[0].id, Outcome::Delivered)], now)
        .await
        .unwrap();
    let later = now + chrono::Duration::days(400);

    let ttl = Duration::from_millis(300);
    ledger
        .acquire_lock("vacuum@ops:1", Utc::now(), ttl)
        .await
        .unwrap();
    // Another writer holds SQLite's write lock: the prune waits for it.
    let path = dir.path().join("ledger.db");
    let mut writer = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut writer)
        .await
        .unwrap();
    let vacuum = {
        let ledger = ledger.clone();
        tokio::spawn(async move { ledger.vacuum(later, "vacuum@ops:1", ttl).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Meanwhile the vacuum's lock expired, and a sync takes it.
    let taken = Utc::now();
    sqlx::query(
        "INSERT INTO locks (name, holder, acquired_at, expires_at) VALUES ('sync', ?1, ?2, ?3)
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
             acquired_at = excluded.acquired_at, expires_at = excluded.expires_at
         WHERE locks.expires_at <= excluded.acquired_at",
    )
    .bind("sync@cronjob-pod:7")
    .bind(billsync::ledger::ts(taken))
    .bind(billsync::ledger::ts(taken + chrono::Duration::minutes(15)))
    .execute(&mut writer)
    .await
    .unwrap();
    sqlx::query("COMMIT").execute(&mut writer).await.unwrap();

    let result = vacuum.await.unwrap();
    assert!(
        matches!(&result, Err(LedgerError::Locked { holder, .. }) if holder == "sync@cronjob-pod:7"),
        "the vacuum must stop once its lock is taken: {result:?}"
    );
    assert_eq!(
        ledger.prunable(later).await.unwrap(),
        1,
        "nothing was pruned beside the sync"
    );
}

/// While a `ledger vacuum` rewrites the file, SQLite's write lock keeps every other writer out
/// for as long as the VACUUM lasts. A sync started then must read the run lock and exit 3 ("another
/// run holds the lock", the Job is not retried), not wait for the write lock for the busy timeout
/// and fail with "database is locked" (exit 1, retried by the Job, and again).
#[tokio::test(flavor = "multi_thread")]
async fn a_run_beside_a_vacuum_that_holds_the_write_lock_is_told_the_ledger_is_locked_at_once() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    ledger
        .acquire_lock("vacuum@ops:1", now, Duration::from_secs(900))
        .await
        .unwrap();
    // The VACUUM: a writer holding SQLite's write lock.
    let path = dir.path().join("ledger.db");
    let mut vacuum = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut vacuum)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let sync = ledger
        .acquire_lock("sync@cronjob-pod:7", Utc::now(), Duration::from_secs(900))
        .await;
    let took = started.elapsed();
    sqlx::query("COMMIT").execute(&mut vacuum).await.unwrap();
    assert!(
        matches!(&sync, Err(LedgerError::Locked { holder, .. }) if holder == "vacuum@ops:1"),
        "{sync:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(2), "waited {took:?}");
}

/// A `ledger vacuum` that pruned (committed) and then lost its run lock before the VACUUM exits
/// 3 with the space still on SQLite's free list. The next vacuum finds nothing left to prune,
/// but must still compact the file (the pruned rows' pages go back to the file system), or the
/// ledger volume never shrinks: it runs the VACUUM whenever the free list is not empty, under
/// its lock, and says how many pages it gave back.
#[tokio::test(flavor = "multi_thread")]
async fn a_vacuum_after_one_that_lost_its_lock_before_the_vacuum_still_compacts_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    // Large payloads (noise, as bodies are compressed) spill to overflow pages, which a prune
    // frees.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let rows: Vec<StageRow> = (0..50)
        .map(|i| {
            let padding: String = (0..40_000)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    char::from(b'a' + (seed % 26) as u8)
                })
                .collect();
            let mut r = row(record(&format!("r{i}"), "1.10"));
            r.mapped.payload = Some(format!("{{\"value\":\"1.10\",\"pad\":\"{padding}\"}}"));
            r
        })
        .collect();
    ledger.stage(run, &rows, None, now, &by_hand).await.unwrap();
    let batch = ledger.pending_batch("lago", 0, 1000).await.unwrap();
    let acks: Vec<_> = batch.iter().map(|r| (r.id, Outcome::Delivered)).collect();
    ledger.ack(run, &acks, now).await.unwrap();
    let later = now + chrono::Duration::days(400);
    let ttl = Duration::from_secs(60);

    // The first vacuum prunes; a sync takes its lock as the prune commits (a trigger stands in
    // for the lock expiring meanwhile), so it stops before the VACUUM.
    let path = dir.path().join("ledger.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query(
        "CREATE TRIGGER take_lock AFTER UPDATE ON record_bodies BEGIN
             UPDATE locks SET holder = 'sync@cronjob-pod:7' WHERE name = 'sync';
         END",
    )
    .execute(&pool)
    .await
    .unwrap();
    ledger.acquire_lock("vacuum@ops:1", now, ttl).await.unwrap();
    let first = ledger.vacuum(later, "vacuum@ops:1", ttl).await;
    assert!(
        matches!(&first, Err(LedgerError::Locked { holder, .. }) if holder == "sync@cronjob-pod:7"),
        "{first:?}"
    );
    assert_eq!(ledger.prunable(later).await.unwrap(), 0, "the prune stayed");
    let free = || async {
        sqlx::query_scalar::<_, i64>("PRAGMA freelist_count")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let left = free().await;
    assert!(
        left > 50,
        "the pruned rows' pages wait on the free list: {left}"
    );

    // The sync is over; the next vacuum has nothing to prune, and compacts the file.
    sqlx::query("DROP TRIGGER take_lock")
        .execute(&pool)
        .await
        .unwrap();
    ledger.release_lock("sync@cronjob-pod:7").await.unwrap();
    ledger.acquire_lock("vacuum@ops:2", now, ttl).await.unwrap();
    let second = ledger.vacuum(later, "vacuum@ops:2", ttl).await.unwrap();
    assert_eq!(second.pruned, 0);
    assert_eq!(free().await, 0, "the file was compacted");
    assert!(
        second.pages_freed >= left as u64,
        "{second:?} gives back the {left} free pages"
    );
    // Nothing free, nothing to do: no VACUUM.
    let third = ledger.vacuum(later, "vacuum@ops:2", ttl).await.unwrap();
    assert_eq!((third.pruned, third.pages_freed), (0, 0));
}

/// A person who finds a rejected record in the sink (Stripe counted an event billsync held
/// back after an unclear answer) records it as delivered: `sent` in a run of its own, nothing
/// to send, no longer undelivered (every sync exited 4 for it), an audit line with the reason
/// and the refusal it replaces. Only a rejected record: a pending, sent or unknown one is
/// refused and left as it is.
#[tokio::test]
async fn a_rejected_record_found_in_the_sink_is_marked_delivered_by_hand_and_nothing_else_is() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    ledger
        .stage(
            run,
            &[row(record("a", "1")), row(record("b", "2"))],
            None,
            now,
            &by_hand,
        )
        .await
        .unwrap();
    let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
    let refusal = "not sent again: an earlier attempt ended unclear";
    ledger
        .ack(
            run,
            &[(batch[0].id, Outcome::Rejected(refusal.into()))],
            now,
        )
        .await
        .unwrap();
    assert_eq!(ledger.undelivered().await.unwrap(), 2);

    let by_hand_run = ledger.start_run("mark-delivered", now).await.unwrap();
    for (key, why) in [
        (batch[1].key.as_str(), "its status is `pending`"),
        ("no-such-key", "no record has this key"),
    ] {
        let err = ledger
            .mark_delivered(by_hand_run, key, "found in Stripe", now)
            .await
            .unwrap_err();
        assert!(
            matches!(err, LedgerError::NotMarkable { .. }) && err.to_string().contains(why),
            "{key}: {err}"
        );
    }
    let done = ledger
        .mark_delivered(
            by_hand_run,
            &batch[0].key,
            "Stripe counted it (reconcile 2026-10)",
            now,
        )
        .await
        .unwrap();
    assert_eq!(done.id, batch[0].id);
    assert_eq!(done.refusal.as_deref(), Some(refusal));
    assert_eq!(
        ledger.undelivered().await.unwrap(),
        1,
        "only the pending one"
    );
    assert!(ledger
        .records_matching(&RecordFilter::status(Status::Rejected), 0, 10)
        .await
        .unwrap()
        .is_empty());
    // Counted in that run's totals, never offered to a sink again.
    assert_eq!(ledger.sent_totals(by_hand_run).await.unwrap().len(), 1);
    let pending = ledger.pending_batch("lago", 0, 100).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, batch[1].id);
    let again = ledger
        .mark_delivered(by_hand_run, &batch[0].key, "twice", now)
        .await
        .unwrap_err();
    assert!(
        again.to_string().contains("its status is `sent`"),
        "{again}"
    );
    let audit: Vec<(String, String)> = {
        use sqlx::Row;
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", ledger.path().display()))
            .await
            .unwrap();
        sqlx::query("SELECT action, detail FROM audit")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let line = audit
        .iter()
        .find(|(action, _)| action == "mark-delivered")
        .expect("an audit line");
    assert!(
        line.1.contains("reconcile 2026-10") && line.1.contains(refusal),
        "{}",
        line.1
    );
}

/// A correction the sink refused does not count in what a later correction of its record is
/// measured against, so the later one carries its difference: recorded as delivered by hand
/// afterwards, it would count twice (1, a refused +2, then +4 to 5: marking the +2 makes 7).
/// That is refused, naming the later correction.
#[tokio::test]
async fn a_refused_correction_whose_difference_a_later_one_carried_cannot_be_marked_delivered() {
    for held_back_later in [false, true] {
        refused_correction_then_a_later_one(held_back_later).await;
    }
}

async fn refused_correction_then_a_later_one(held_back_later: bool) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let now = Utc::now();
    let run = ledger.start_run("sync", now).await.unwrap();
    let send_all = |outcome: Outcome| {
        let ledger = &ledger;
        async move {
            let batch = ledger.pending_batch("lago", 0, 100).await.unwrap();
            let acks: Vec<_> = batch.iter().map(|o| (o.id, outcome.clone())).collect();
            ledger.ack(run, &acks, now).await.unwrap();
            batch
        }
    };
    ledger
        .stage(run, &[row(record("a", "1"))], None, now, &difference)
        .await
        .unwrap();
    send_all(Outcome::Delivered).await;
    ledger
        .stage(run, &[row(record("a", "3"))], None, now, &difference)
        .await
        .unwrap();
    let r1 = send_all(Outcome::Rejected("refused".into())).await;
    assert!(r1[0].key.ends_with(".r1"), "{}", r1[0].key);
    ledger
        .stage(run, &[row(record("a", "5"))], None, now, &difference)
        .await
        .unwrap();
    // The later correction may be delivered, or held back after an unclear delivery (the
    // sink may hold it): either way it carried the refused one's difference.
    let r2 = if held_back_later {
        send_all(Outcome::Unclear("HTTP 502".into())).await;
        send_all(Outcome::HeldBack("not sent again".into())).await
    } else {
        send_all(Outcome::Delivered).await
    };
    assert_eq!(r2[0].payload, "{\"value\":\"4\"}");

    let by_hand_run = ledger.start_run("mark-delivered", now).await.unwrap();
    let err = ledger
        .mark_delivered(by_hand_run, &r1[0].key, "found in the sink", now)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("the later correction {}", r2[0].key)),
        "{err}"
    );
    let undelivered = if held_back_later { 2 } else { 1 };
    assert_eq!(
        ledger.undelivered().await.unwrap(),
        undelivered,
        "still rejected"
    );
}

/// What a sync's metrics read of the ledger (after every hourly run, when a Pushgateway is
/// set) costs what waits, not the ledger's history: the undelivered counts are looked up in
/// the status index, never by a pass over every record (on a 10M-record ledger that pass took
/// 9 s cached and a minute cold, in every run). `status` counts per status and sink from the
/// status index alone; the pass per source is `counts_by_source` (`status --by-source`). All
/// three agree.
#[tokio::test]
async fn metrics_and_status_count_records_without_reading_every_record() {
    use sqlx::Row;
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let run = ledger.start_run("sync", Utc::now()).await.unwrap();
    let rows: Vec<StageRow> = ["a", "b", "c", "d"]
        .iter()
        .map(|r| row(record(r, "1.00")))
        .collect();
    ledger
        .stage(run, &rows, None, Utc::now(), &by_hand)
        .await
        .unwrap();
    let batch = ledger.pending_batch("lago", 0, 10).await.unwrap();
    assert_eq!(batch.len(), 4);
    ledger
        .ack(
            run,
            &[
                (batch[0].id, Outcome::Delivered),
                (batch[1].id, Outcome::Rejected("no such metric".into())),
                (batch[2].id, Outcome::Failed("timeout".into())),
            ],
            Utc::now(),
        )
        .await
        .unwrap();
    let gauges = ledger.gauges().await.unwrap();
    let ms = |s: &str| ("ms".to_string(), s.to_string());
    assert_eq!(
        gauges.undelivered,
        [(ms("pending"), 2), (ms("rejected"), 1)]
            .into_iter()
            .collect()
    );
    let counts = ledger.counts_by_source().await.unwrap();
    assert_eq!(
        counts,
        [(ms("pending"), 2), (ms("rejected"), 1), (ms("sent"), 1)]
            .into_iter()
            .collect()
    );
    let lago = |s: &str| (s.to_string(), Some("lago".to_string()));
    assert_eq!(
        ledger.status().await.unwrap().by_status,
        [
            (lago("pending"), 2),
            (lago("rejected"), 1),
            (lago("sent"), 1)
        ]
        .into_iter()
        .collect()
    );
    ledger.close().await;

    let (pool, _) = records_schema(&dir.path().join("ledger.db")).await;
    let mut plans = Vec::new();
    for statement in [
        billsync::ledger::UNDELIVERED_BY_SOURCE,
        billsync::ledger::RECORDS_BY_STATUS_AND_SINK,
    ] {
        let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {statement}"
        )))
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>("detail"))
        .collect();
        plans.push(plan);
    }
    assert!(
        plans[0]
            .iter()
            .any(|d| d.starts_with("SEARCH records USING INDEX records_by_status (status=?)")),
        "{plans:?}"
    );
    assert!(
        !plans[0].iter().any(|d| d.starts_with("SCAN records")),
        "{plans:?}"
    );
    assert_eq!(
        plans[1],
        ["SCAN records USING COVERING INDEX records_by_status"],
        "{plans:?}"
    );
}
