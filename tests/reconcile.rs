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

#[tokio::test]
async fn the_demo_month_agrees_to_the_cent_and_a_lost_event_is_an_exact_unexplained_difference() {
    let world = World::start(Behaviour::Postgres).await;
    let pipeline = world.pipeline().await;
    pipeline
        .sync(&SyncOptions {
            now: Some(now()),
            ..Default::default()
        })
        .await
        .unwrap();

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
    pipeline
        .sync(&SyncOptions {
            now: Some(now()),
            ..Default::default()
        })
        .await
        .unwrap();
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
    pipeline
        .sync(&SyncOptions {
            now: Some(now()),
            ..Default::default()
        })
        .await
        .unwrap();
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
    pipeline
        .sync(&SyncOptions {
            now: Some(now()),
            ..Default::default()
        })
        .await
        .unwrap();
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
