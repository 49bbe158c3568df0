//! Reconciliation: the demo data agrees to the cent; an event lost by the sink is reported
//! with its exact value and key, and the command exits 7; events stored by the sink but not yet
//! acknowledged by the ledger are explained, not alarming.

#[path = "common/world.rs"]
mod world;

use std::str::FromStr;

use billsync::reconcile::{reconcile, to_csv, to_table};
use billsync::simulators::lago::Behaviour;
use billsync::sinks::Sink;
use billsync::sync::SyncOptions;
use chrono::FixedOffset;
use rust_decimal::Decimal;
use world::{now, World, LAGO_KEY};

fn utc() -> FixedOffset {
    FixedOffset::east_opt(0).unwrap()
}

/// A sync of the demo world at its fixed clock, pushing everything.
async fn sync_demo(pipeline: &billsync::sync::Pipeline) {
    pipeline
        .sync(&SyncOptions {
            now: Some(now()),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn the_demo_month_agrees_to_the_cent_and_a_lost_event_is_an_exact_unexplained_difference() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    sync_demo(&pipeline).await;

    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(report.is_reconciled(), "{}", to_table(&report));
    let storage = report
        .lines
        .values()
        .find(|(k, _)| k.subscription == "sub_acme_main" && k.metric == "storage_cost")
        .map(|(_, l)| l.clone())
        .unwrap();
    assert_eq!(storage.read_back, Some(storage.sent));
    assert_eq!(storage.mapped, storage.sent);
    let held = report
        .lines
        .values()
        .find(|(k, _)| k.subscription == "(unmapped)")
        .map(|(_, l)| l.clone())
        .unwrap();
    assert_eq!(held.records, 1);
    assert_eq!(held.provider_cost, Decimal::from_str("119.81").unwrap());

    // Lago loses one storage event: reconcile names it and its exact value.
    let lost = world
        .lago
        .events()
        .into_iter()
        .find(|e| e.code == "storage_cost" && e.external_subscription_id == "sub_acme_main")
        .unwrap();
    let lost_value = Decimal::from_str(lost.properties["amount"].as_str().unwrap()).unwrap();
    assert_eq!(world.lago.delete_event(&lost.transaction_id), 1);
    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(!report.is_reconciled());
    let (_, line) = report
        .lines
        .values()
        .find(|(k, _)| k.subscription == "sub_acme_main" && k.metric == "storage_cost")
        .unwrap();
    assert_eq!(line.unexplained, -lost_value);
    assert!(
        line.notes.iter().any(|n| n.contains(&lost.transaction_id)),
        "{:?}",
        line.notes
    );
    let csv = to_csv(&report);
    assert!(csv.starts_with("source,billing_account_id,subscription,metric,sink,"));
    assert!(csv.contains(&format!("-{lost_value}")), "{csv}");
}

#[tokio::test]
async fn events_stored_by_the_sink_but_not_yet_acknowledged_are_explained() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    pipeline
        .sync(&SyncOptions {
            now: Some(now()),
            skip_push: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // Lago stores one batch; the ledger never hears about it (a crash).
    let batch = pipeline.ledger.pending_batch("lago", 0, 25).await.unwrap();
    world.sink_with_key(LAGO_KEY).deliver(&batch).await.unwrap();
    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(report.is_reconciled(), "{}", to_table(&report));
    let unacknowledged: Decimal = report
        .lines
        .values()
        .map(|(_, l)| l.in_sink_unacknowledged)
        .sum();
    assert!(unacknowledged > Decimal::ZERO);
    assert!(to_table(&report).contains("not yet acknowledged"));
}

/// Differences of single events that cancel out in the sums (one event stored higher than sent,
/// another as much lower) are still differences: the report is not reconciled, and names both.
#[tokio::test]
async fn key_level_differences_that_cancel_out_in_the_sums_are_not_reconciled() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    sync_demo(&pipeline).await;
    let storage: Vec<_> = world
        .lago
        .events()
        .into_iter()
        .filter(|e| e.code == "storage_cost" && e.external_subscription_id == "sub_acme_main")
        .collect();
    assert!(storage.len() >= 2, "two storage events to alter");
    let amount = |e: &billsync::simulators::lago::StoredEvent| {
        Decimal::from_str(e.properties["amount"].as_str().unwrap()).unwrap()
    };
    let (up, down) = (&storage[0], &storage[1]);
    let shift = Decimal::from_str("0.01").unwrap();
    for (event, value) in [(up, amount(up) + shift), (down, amount(down) - shift)] {
        assert_eq!(
            world.lago.set_event_property(
                &event.transaction_id,
                "amount",
                serde_json::Value::String(value.to_string())
            ),
            1
        );
    }

    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    let (_, line) = report
        .lines
        .values()
        .find(|(k, _)| k.subscription == "sub_acme_main" && k.metric == "storage_cost")
        .unwrap();
    assert_eq!(line.unexplained, Decimal::ZERO, "the sums agree");
    assert!(!report.is_reconciled(), "{}", to_table(&report));
    for event in [up, down] {
        assert!(
            line.notes.iter().any(|n| n.contains(&event.transaction_id)),
            "{:?}",
            line.notes
        );
    }
}

/// "Stored by the sink, not yet acknowledged" explains an event only when it is the record's
/// frozen payload that the next run will confirm: a pending record whose event the sink holds
/// with the value the ledger would send. A held event of another value (another ledger or an
/// older mapping sent that key first: the next run gets `value_already_exist` and records the
/// ledger's value as sent while Lago bills its own), or an event the ledger has rejected (no
/// run ever sends it, yet Lago bills it), is an unexplained difference.
#[tokio::test]
async fn events_held_by_the_sink_for_unacknowledged_records_must_match_them() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    pipeline
        .sync(&SyncOptions {
            now: Some(now()),
            skip_push: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let batch = pipeline.ledger.pending_batch("lago", 0, 25).await.unwrap();
    assert!(batch.len() >= 2, "two pending records");
    world.sink_with_key(LAGO_KEY).deliver(&batch).await.unwrap();
    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(report.is_reconciled(), "{}", to_table(&report));

    // Lago holds another value under a pending record's key.
    let other = &batch[0].key;
    let property = world
        .lago
        .events()
        .into_iter()
        .find(|e| &e.transaction_id == other)
        .map(|e| World::value_property(&e.code))
        .unwrap();
    let held = world.lago_value_of(other);
    assert_eq!(
        world.lago.set_event_property(
            other,
            property,
            serde_json::Value::String((held + Decimal::ONE).to_string())
        ),
        1
    );
    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(!report.is_reconciled(), "{}", to_table(&report));
    assert!(
        report
            .lines
            .values()
            .any(|(_, l)| l.notes.iter().any(|n| n.contains(other.as_str()))),
        "{}",
        to_table(&report)
    );
    world
        .lago
        .set_event_property(other, property, serde_json::Value::String(held.to_string()));

    // The ledger rejected a record whose event Lago holds.
    let rejected = &batch[1];
    let run = pipeline.ledger.start_run("test", now()).await.unwrap();
    pipeline
        .ledger
        .ack(
            run,
            &[(
                rejected.id,
                billsync::sinks::Outcome::Rejected(
                    "Lago validation: properties: invalid_value".into(),
                ),
            )],
            now(),
        )
        .await
        .unwrap();
    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(!report.is_reconciled(), "{}", to_table(&report));
    assert!(
        report
            .lines
            .values()
            .any(|(_, l)| l.notes.iter().any(|n| n.contains(rejected.key.as_str()))),
        "{}",
        to_table(&report)
    );
}

/// An event is matched to the ledger within the subscription and metric it was read back
/// under. Lago holding a record's key under another subscription (billed to another customer)
/// is a difference on both sides: the record's own line misses it, and the subscription Lago
/// holds it under has an event the ledger does not have there. It was counted into the
/// record's own line instead, whose sum then agreed, and the subscription billed for it looked
/// clean.
#[tokio::test]
async fn an_event_held_under_another_subscription_is_a_difference_of_both_lines() {
    use billsync::sinks::Outgoing;
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    sync_demo(&pipeline).await;
    let moved = world
        .lago
        .events()
        .into_iter()
        .find(|e| e.code == "storage_cost" && e.external_subscription_id == "sub_acme_main")
        .unwrap();
    let value = world.lago_value_of(&moved.transaction_id);
    assert_eq!(world.lago.delete_event(&moved.transaction_id), 1);
    let sink = world.sink_with_key(LAGO_KEY);
    let payload = sink
        .encode(
            &moved.transaction_id,
            &billsync::mapping::MappedEvent {
                rule: "test".into(),
                sink: None,
                external_subscription_id: "sub_globex_main".into(),
                external_customer_id: None,
                metric_code: "storage_cost".into(),
                value_property: "amount".into(),
                value,
                properties: Default::default(),
                timestamp: moved.timestamp,
            },
        )
        .unwrap();
    sink.deliver(&[Outgoing {
        id: 1,
        key: moved.transaction_id.clone(),
        payload,
        unclear_since: None,
    }])
    .await
    .unwrap();

    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(!report.is_reconciled(), "{}", to_table(&report));
    let line = |sub: &str| {
        report
            .lines
            .values()
            .find(|(k, _)| k.subscription == sub && k.metric == "storage_cost")
            .map(|(_, l)| l.clone())
            .unwrap()
    };
    assert_eq!(
        line("sub_acme_main").unexplained,
        -value,
        "{}",
        to_table(&report)
    );
    // Like any event the ledger does not have for the line it was read back under.
    assert!(
        report
            .unknown_events
            .iter()
            .map(ToString::to_string)
            .any(|n| n.contains(&moved.transaction_id)
                && n.contains("sub_globex_main")
                && n.contains("sub_acme_main")),
        "{}",
        to_table(&report)
    );
}

/// Amounts that add up beyond a decimal's range (about ±7.9e28; a corrupted ledger, a hostile
/// provider line) make `reconcile` fail naming the line, instead of panicking on an overflow
/// in its sums ("Addition overflowed", a crash with no report at all).
#[tokio::test]
async fn sums_beyond_a_decimals_range_are_an_error_naming_the_line_not_a_panic() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    sync_demo(&pipeline).await;
    {
        use sqlx::Connection;
        let url = format!("sqlite://{}", pipeline.ledger.path().display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let changed = sqlx::query(
            "UPDATE records SET value = '60000000000000000000000000000'
             WHERE id IN (SELECT id FROM records WHERE status = 'sent'
                 AND subscription = 'sub_acme_main' AND metric = 'storage_cost' LIMIT 2)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        assert_eq!(changed.rows_affected(), 2);
    }
    let err = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .expect_err("the sums leave a decimal's range");
    let message = err.to_string();
    assert!(
        message.contains("sub_acme_main / storage_cost") && message.contains("range of a decimal"),
        "{message}"
    );
}

/// Reconcile matches the sink's events group by group — (sink, subscription, metric) — so
/// that its memory follows the report's lines, not the month's records. The records of the
/// groups are interleaved in the ledger (a run stages them in the provider's order) and spread
/// over the month: each group's difference still lands on its own line, and on no other. Here
/// Lago loses one event of every other group and holds another value for one event of each of
/// the rest; every line says exactly its own difference and names only its own key.
#[tokio::test]
async fn every_group_is_matched_against_its_own_read_back_however_its_records_interleave() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    sync_demo(&pipeline).await;
    // The groups' records interleave in id order.
    {
        use sqlx::{Connection, Row};
        let url = format!("sqlite://{}", pipeline.ledger.path().display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let ranges: Vec<(i64, i64)> = sqlx::query(
            "SELECT MIN(id), MAX(id) FROM records WHERE status = 'sent'
             GROUP BY sink, subscription, metric",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        let overlapping = ranges
            .iter()
            .enumerate()
            .any(|(i, a)| ranges[i + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1));
        assert!(overlapping, "groups interleaved in id order: {ranges:?}");
    }
    let mut groups: std::collections::BTreeMap<(String, String), Vec<_>> = Default::default();
    for e in world.lago.events() {
        groups
            .entry((e.external_subscription_id.clone(), e.code.clone()))
            .or_default()
            .push(e);
    }
    assert!(groups.len() >= 4, "several groups: {:?}", groups.keys());
    // Per group: the altered key and the difference it makes.
    let mut altered: Vec<((String, String), String, Decimal)> = Vec::new();
    for (i, (group, events)) in groups.iter().enumerate() {
        let event = &events[events.len() / 2];
        let value = world.lago_value_of(&event.transaction_id);
        if i % 2 == 0 {
            assert_eq!(world.lago.delete_event(&event.transaction_id), 1);
            altered.push((group.clone(), event.transaction_id.clone(), -value));
        } else {
            let property = World::value_property(&event.code);
            assert_eq!(
                world.lago.set_event_property(
                    &event.transaction_id,
                    property,
                    serde_json::Value::String((value + Decimal::ONE).to_string())
                ),
                1
            );
            altered.push((group.clone(), event.transaction_id.clone(), Decimal::ONE));
        }
    }

    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(!report.is_reconciled());
    assert!(report.unknown_events.is_empty(), "{}", to_table(&report));
    for ((subscription, metric), key, difference) in &altered {
        let lines: Vec<_> = report
            .lines
            .values()
            .filter(|(k, _)| &k.subscription == subscription && &k.metric == metric)
            .collect();
        let unexplained: Decimal = lines.iter().map(|(_, l)| l.unexplained).sum();
        let keys: u64 = lines.iter().map(|(_, l)| l.unexplained_keys).sum();
        assert_eq!(
            (unexplained, keys),
            (*difference, 1),
            "{subscription} {metric}\n{}",
            to_table(&report)
        );
        // Its key is named on its own line only.
        for (k, l) in report.lines.values() {
            let named = l.notes.iter().any(|n| n.contains(key.as_str()));
            let own = &k.subscription == subscription && &k.metric == metric;
            assert_eq!(named, own, "{key} on {k:?}\n{}", to_table(&report));
        }
    }
}

/// A line reports the first 20 of its notes (sorted), however many events the sink lost:
/// reconcile keeps no more than that per line once its group is checked (a sink that lost a
/// month would otherwise keep a note per record of the month), while every lost event still
/// counts in `unexplained_keys` and in the difference.
#[tokio::test]
async fn a_line_names_its_first_20_lost_events_and_counts_them_all() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    sync_demo(&pipeline).await;
    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(report.is_reconciled(), "{}", to_table(&report));
    // The line with the most records.
    let (key, line) = report
        .lines
        .values()
        .filter(|(k, _)| !k.metric.is_empty())
        .max_by_key(|(_, l)| l.records)
        .cloned()
        .unwrap();
    let lost: Vec<_> = world
        .lago
        .events()
        .into_iter()
        .filter(|e| e.external_subscription_id == key.subscription && e.code == key.metric)
        .collect();
    assert!(
        lost.len() > 20,
        "more lost events than notes: {}",
        lost.len()
    );
    for e in &lost {
        assert_eq!(world.lago.delete_event(&e.transaction_id), 1);
    }
    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    let (_, after) = report.lines.values().find(|(k, _)| k == &key).unwrap();
    assert_eq!(after.read_back, Some(Decimal::ZERO));
    assert_eq!(after.unexplained, -line.sent);
    assert_eq!(after.unexplained_keys, lost.len() as u64);
    // The 20 smallest keys, each as a lost event.
    let mut keys: Vec<&str> = lost.iter().map(|e| e.transaction_id.as_str()).collect();
    keys.sort();
    keys.truncate(20);
    let named: Vec<&str> = after
        .notes
        .iter()
        .map(|n| {
            assert!(n.ends_with("but not in the sink"), "{n}");
            n.split(':').next().unwrap()
        })
        .collect();
    assert_eq!(named, keys);
}

/// Events the ledger does not have are listed in the order of the report's lines (by source,
/// billing account, subscription, metric, sink), whatever order reconcile reads the groups
/// back in: Lago holds one foreign event under every (subscription, metric) of the month.
#[tokio::test]
async fn events_the_ledger_does_not_have_are_listed_in_the_order_of_the_lines() {
    use billsync::sinks::Outgoing;
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    sync_demo(&pipeline).await;
    let groups: std::collections::BTreeMap<(String, String), _> = world
        .lago
        .events()
        .into_iter()
        .map(|e| ((e.external_subscription_id.clone(), e.code.clone()), e))
        .collect();
    assert!(groups.len() >= 4, "several groups: {:?}", groups.keys());
    let sink = world.sink_with_key(LAGO_KEY);
    let foreign = |subscription: &str, metric: &str| format!("foreign.{subscription}.{metric}");
    // Delivered in reverse order, so that neither Lago's order nor the groups' makes the list.
    for (i, ((subscription, metric), e)) in groups.iter().rev().enumerate() {
        let key = foreign(subscription, metric);
        let payload = sink
            .encode(
                &key,
                &billsync::mapping::MappedEvent {
                    rule: "test".into(),
                    sink: None,
                    external_subscription_id: subscription.as_str().into(),
                    external_customer_id: None,
                    metric_code: metric.as_str().into(),
                    value_property: World::value_property(metric).into(),
                    value: Decimal::ONE,
                    properties: Default::default(),
                    timestamp: e.timestamp,
                },
            )
            .unwrap();
        sink.deliver(&[Outgoing {
            id: i as i64 + 1,
            key,
            payload,
            unclear_since: None,
        }])
        .await
        .unwrap();
    }

    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(!report.is_reconciled());
    let mut expected: Vec<String> = Vec::new();
    for (k, _) in report.lines.values().filter(|(k, _)| !k.metric.is_empty()) {
        let key = foreign(&k.subscription, &k.metric);
        if !expected.contains(&key) {
            expected.push(key);
        }
    }
    assert_eq!(
        report.unknown_events.len(),
        expected.len(),
        "{}",
        to_table(&report)
    );
    for (event, key) in report.unknown_events.iter().zip(&expected) {
        assert!(
            event
                .to_string()
                .contains(&format!("event {key} is not in the ledger")),
            "{event} / {key}\n{}",
            to_table(&report)
        );
    }
}

/// Reconcile reads the month twice, the lines' sums and then the records group by group, in
/// one snapshot of the ledger: a run that commits between the two reads (here it delivers the
/// pending records and records them as sent) changes neither, or a record counted pending in
/// the sums and matched as sent would read as an unexplained difference. The snapshot does not
/// hold that run up (a WAL reader does not block writers), and the next snapshot sees it.
#[tokio::test]
async fn both_reads_of_a_month_see_one_state_of_the_ledger_while_a_run_commits() {
    use billsync::ledger::{Ledger, Status};
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    pipeline
        .sync(&SyncOptions {
            now: Some(now()),
            skip_push: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let (from, to) = billsync::reconcile::month_bounds("2026-10", utc()).unwrap();
    // Reconcile's own ledger, as the command opens it beside the CronJob's run.
    let reader = Ledger::open_existing(pipeline.ledger.path()).await.unwrap();
    let pending_in = |rows: &[billsync::ledger::PeriodRow]| {
        rows.iter()
            .filter(|r| r.status == Status::Pending && r.value.is_some() && r.metric.is_some())
            .count()
    };
    let mut snapshot = reader.period_snapshot(from, to).await.unwrap();
    let mut all = Vec::new();
    snapshot.for_each(|row| all.push(row)).await.unwrap();
    let pending = pending_in(&all);
    assert!(pending > 0, "records pending before the run");

    // The run pushes while the snapshot is open.
    sync_demo(&pipeline).await;

    let mut grouped = Vec::new();
    let mut groups = snapshot.groups();
    while let Some((_, records)) = groups.next_group().await.unwrap() {
        grouped.extend(records);
    }
    drop(groups);
    assert_eq!(
        pending_in(&grouped),
        pending,
        "the second read sees the first's state"
    );
    snapshot.close().await.unwrap();

    let mut after = Vec::new();
    let mut snapshot = reader.period_snapshot(from, to).await.unwrap();
    snapshot.for_each(|row| after.push(row)).await.unwrap();
    snapshot.close().await.unwrap();
    assert_eq!(pending_in(&after), 0, "the run committed meanwhile");
}

/// A rule may map records the provider billed in different currencies to one metric of one
/// subscription. The report's provider cost is per currency: one line per currency, each
/// summing only its own records. (Added up in one line, 100 GBP and 50 USD showed as
/// "150 USD", labelled with whichever record came last.) What was sent and read back is in
/// the metric's unit and is matched event by event as before.
#[tokio::test]
async fn a_line_whose_records_were_billed_in_two_currencies_is_one_line_per_currency() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    sync_demo(&pipeline).await;
    let line_of = |report: &billsync::reconcile::Report| {
        report
            .lines
            .values()
            .filter(|(k, _)| k.subscription == "sub_acme_main" && k.metric == "storage_cost")
            .map(|(_, l)| l.clone())
            .collect::<Vec<_>>()
    };
    let before = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    let before = line_of(&before);
    assert_eq!(before.len(), 1, "one currency, one line");
    let (currency, total, records) = (
        before[0].currency.clone(),
        before[0].provider_cost,
        before[0].records,
    );
    assert!(records >= 2, "two records to tell apart");

    // One of the line's records was billed in another currency.
    let moved: Decimal = {
        use sqlx::{Connection, Row};
        let url = format!("sqlite://{}", pipeline.ledger.path().display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let row = sqlx::query(
            "UPDATE records SET billing_currency = 'ZZZ'
             WHERE id = (SELECT MIN(id) FROM records WHERE status = 'sent'
                 AND subscription = 'sub_acme_main' AND metric = 'storage_cost')
             RETURNING billed_cost",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        Decimal::from_str(&row.get::<String, _>(0)).unwrap()
    };
    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(report.is_reconciled(), "{}", to_table(&report));
    let mut lines = line_of(&report);
    lines.sort_by(|a, b| a.currency.cmp(&b.currency));
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (own, other) = if lines[0].currency == "ZZZ" {
        (&lines[1], &lines[0])
    } else {
        (&lines[0], &lines[1])
    };
    assert_eq!(own.currency, currency);
    assert_eq!(other.currency, "ZZZ");
    assert_eq!(other.records, 1);
    assert_eq!(other.provider_cost, moved);
    assert_eq!(own.records, records - 1);
    assert_eq!(own.provider_cost, total - moved);
    assert_eq!(own.sent + other.sent, before[0].sent);
    assert_eq!(own.read_back, Some(own.sent));
    assert_eq!(other.read_back, Some(other.sent));
    let csv = to_csv(&report);
    assert!(csv.contains(",ZZZ,1,"), "{csv}");
}

/// The sink's value is read exactly, as a provider's amount is. A Lago event whose value
/// property holds the sent value plus 10^-29 (more places than a decimal holds: someone
/// else's event under the key, a corrupted store) does not hold the ledger's value. Read with
/// a rounding parse it was taken for the sent value and the month reconciled; now the key is
/// named as an unexplained difference.
#[tokio::test]
async fn a_read_back_value_with_more_places_than_a_decimal_is_not_rounded_into_a_match() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    sync_demo(&pipeline).await;
    let event = world
        .lago
        .events()
        .into_iter()
        .find(|e| e.code == "storage_cost" && e.external_subscription_id == "sub_acme_main")
        .unwrap();
    let sent = event.properties["amount"].as_str().unwrap().to_string();
    let mut beyond = if sent.contains('.') {
        sent.clone()
    } else {
        format!("{sent}.")
    };
    while beyond.split('.').nth(1).unwrap().len() < 28 {
        beyond.push('0');
    }
    beyond.push('1');
    assert_eq!(
        world.lago.set_event_property(
            &event.transaction_id,
            "amount",
            serde_json::Value::String(beyond.clone())
        ),
        1
    );
    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(!report.is_reconciled(), "{beyond}: {}", to_table(&report));
    let (_, line) = report
        .lines
        .values()
        .find(|(k, _)| k.subscription == "sub_acme_main" && k.metric == "storage_cost")
        .unwrap();
    assert!(
        line.notes
            .iter()
            .any(|n| n.contains(&event.transaction_id) && n.contains("exactly")),
        "{:?}",
        line.notes
    );

    // The same value in exponent form is the same value.
    let sent_value = Decimal::from_str(&sent).unwrap();
    let exponent_form = format!("{}e-{}", sent_value.mantissa(), sent_value.scale());
    world.lago.set_event_property(
        &event.transaction_id,
        "amount",
        serde_json::Value::String(exponent_form.clone()),
    );
    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(
        report.is_reconciled(),
        "{exponent_form}: {}",
        to_table(&report)
    );
}

/// Lago holds one event, `foreign.1` worth 5.25, under a subscription and metric the ledger
/// sent to, whose key the ledger does not have (sent by something else): Lago bills 5.25 more
/// than billsync sent. The CSV used to show every line with `read_back == sent` and
/// `unexplained = 0` and nothing else (only the table listed the event, without its value),
/// and the table said "agrees" on that line. Now the CSV carries the event as a row of its own
/// (`(not in ledger)`, its key and value, the value under `read_back` and `unexplained`, so
/// the columns add up to what Lago bills), every other row as before, and the line says in
/// both forms that the sink holds more there.
#[tokio::test]
async fn an_event_the_ledger_does_not_have_is_a_csv_row_with_its_value_and_its_line_does_not_agree()
{
    use billsync::sinks::Outgoing;
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    sync_demo(&pipeline).await;
    let clean = to_csv(
        &reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
            .await
            .unwrap(),
    );
    let at = world
        .lago
        .events()
        .into_iter()
        .find(|e| e.code == "storage_cost" && e.external_subscription_id == "sub_acme_main")
        .unwrap()
        .timestamp;
    let sink = world.sink_with_key(LAGO_KEY);
    let payload = sink
        .encode(
            "foreign.1",
            &billsync::mapping::MappedEvent {
                rule: "test".into(),
                sink: None,
                external_subscription_id: "sub_acme_main".into(),
                external_customer_id: None,
                metric_code: "storage_cost".into(),
                value_property: World::value_property("storage_cost").into(),
                value: Decimal::from_str("5.25").unwrap(),
                properties: Default::default(),
                timestamp: at,
            },
        )
        .unwrap();
    sink.deliver(&[Outgoing {
        id: 1,
        key: "foreign.1".into(),
        payload,
        unclear_since: None,
    }])
    .await
    .unwrap();

    let report = reconcile(&pipeline.ledger, &pipeline.sinks, "2026-10", utc())
        .await
        .unwrap();
    assert!(!report.is_reconciled());
    let csv = to_csv(&report);
    let rows: Vec<&str> = csv.lines().collect();
    let foreign: Vec<&&str> = rows.iter().filter(|r| r.contains("foreign.1")).collect();
    assert_eq!(foreign.len(), 1, "{csv}");
    let fields: Vec<&str> = foreign[0].split(',').collect();
    assert_eq!(fields.len(), 19, "{csv}");
    assert_eq!(
        fields[..5],
        [
            "(not in ledger)",
            "",
            "sub_acme_main",
            "storage_cost",
            "lago"
        ],
        "{csv}"
    );
    // read_back and unexplained carry its value.
    assert_eq!((fields[14], fields[17]), ("5.25", "5.25"), "{csv}");
    assert!(fields[18].starts_with("foreign.1: "), "{csv}");
    // The unexplained column adds up to what Lago bills beyond what was sent.
    let unexplained: Decimal = rows[1..]
        .iter()
        .map(|r| {
            let f: Vec<&str> = r.split(',').collect();
            Decimal::from_str(f[17]).unwrap_or_default()
        })
        .sum();
    assert_eq!(unexplained, Decimal::from_str("5.25").unwrap(), "{csv}");
    // Lines of other subscriptions and metrics are the rows they were.
    for row in clean.lines() {
        if !row.contains("sub_acme_main") {
            assert!(rows.contains(&row), "{row} changed:\n{csv}");
        }
    }

    // Both forms say so on the line itself, and the table gives the event's value.
    let (_, line) = report
        .lines
        .values()
        .find(|(k, _)| k.subscription == "sub_acme_main" && k.metric == "storage_cost")
        .unwrap();
    assert!(
        line.notes.iter().any(|n| n.contains("5.25")),
        "{:?}",
        line.notes
    );
    let table = to_table(&report);
    let line_text = table
        .lines()
        .find(|l| l.contains("sub_acme_main storage_cost [lago]"))
        .unwrap();
    assert!(!line_text.ends_with("agrees"), "{table}");
    assert!(line_text.contains("5.25"), "{table}");
    let listed = table
        .lines()
        .find(|l| l.starts_with("UNEXPLAINED:") && l.contains("foreign.1"))
        .unwrap();
    assert!(listed.contains("5.25"), "{table}");
}
