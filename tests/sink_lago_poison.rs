//! A poison event: one event that Lago answers 5xx at every attempt (a Lago bug on one value)
//! takes its whole batch down with it. Without isolating it, the batch fails after its
//! retries, every record of it stays pending, the next run builds the same batch (pending
//! records in id order) and fails again: its batch-mates are never billed. The sink splits
//! such a batch in halves (the 422 resend path) to deliver them, but only with evidence that
//! Lago is up, so that a real outage does not become a request storm.

#[path = "common/lago.rs"]
mod lago_common;
#[path = "common/world.rs"]
mod world;

use billsync::simulators::lago::{Behaviour, LagoSim, LagoSimConfig, LagoSimHandle};
use billsync::sinks::lago::LagoSink;
use billsync::sinks::{Outcome, Outgoing, Sink};
use lago_common::*;

async fn sim() -> LagoSimHandle {
    LagoSim::start(LagoSimConfig {
        api_key: KEY.into(),
        behaviour: Behaviour::Postgres,
        ..LagoSimConfig::default()
    })
    .await
    .expect("simulator starts")
}

/// `n` events keyed `{prefix}0`, `{prefix}1`, …, one hour apart.
fn events(s: &LagoSink, prefix: &str, n: usize) -> Vec<Outgoing> {
    let keyed: Vec<(String, _)> = (0..n)
        .map(|i| {
            (
                format!("{prefix}{i}"),
                event("sub-1", "1.5", at(1_710_000_000 + 3600 * i as i64)),
            )
        })
        .collect();
    let pairs: Vec<(&str, _)> = keyed.iter().map(|(k, e)| (k.as_str(), e.clone())).collect();
    batch(s, &pairs)
}

/// Ten events, Lago answering 500 to any request holding `k3`, with nothing delivered before
/// in the run (the sink is fresh: the first run after a deploy, or a backlog of one batch).
/// The batch fails after its retries; its halves are the evidence that Lago is up (the half
/// without `k3` is stored), and the half holding `k3` is split on until `k3` is alone: nine
/// events delivered once each, in their frozen bytes, and `k3` failed with Lago's answer,
/// kept pending for the next run.
#[tokio::test]
async fn one_event_lago_always_fails_does_not_keep_its_batch_mates_pending() {
    let lago = sim().await;
    lago.crash_on_transaction("k3", 500);
    let s = sink(&lago.url, fast_retry(2));
    let b = events(&s, "k", 10);
    let out = s.deliver(&b).await.unwrap();
    let delivered = out.iter().filter(|o| **o == Outcome::Delivered).count();
    assert_eq!(delivered, 9, "the nine good events are delivered: {out:?}");
    match &out[3] {
        Outcome::Failed(reason) => {
            assert!(reason.contains("HTTP 500"), "{reason}");
            assert!(reason.contains("alone"), "{reason}");
        }
        other => panic!("k3 must fail (stay pending), got {other:?}"),
    }
    // Each good event stored once, with the bytes frozen at staging.
    let counts = lago.counts();
    assert_eq!(counts.len(), 9, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert!(!counts.contains_key("k3"));
    for body in lago.bodies() {
        let sent: serde_json::Value = serde_json::from_str(&body).unwrap();
        for e in sent["events"].as_array().unwrap() {
            let key = e["transaction_id"].as_str().unwrap();
            let frozen = &b.iter().find(|o| o.key == key).unwrap().payload;
            assert_eq!(e.to_string(), *frozen, "resent in its frozen bytes");
        }
    }
    // The whole batch: 3 attempts; then one attempt per part: 10 → 5+5, the 5 holding k3
    // → 3+2, the 2 → 1+1.
    assert_eq!(lago.request_count(), 3 + 6, "{:#?}", lago.bodies());
}

/// The isolation works the same when the evidence comes from elsewhere in the run (another
/// batch stored earlier), and with a 502 (a proxy in front of Lago whose worker died on the
/// event) as with a 500.
#[tokio::test]
async fn a_poison_event_is_isolated_after_another_batch_of_the_run_was_stored() {
    let lago = sim().await;
    let s = sink(&lago.url, fast_retry(1));
    let first = events(&s, "a", 4);
    assert_eq!(
        s.deliver(&first).await.unwrap(),
        vec![Outcome::Delivered; 4]
    );
    lago.crash_on_transaction("b6", 502);
    let b = events(&s, "b", 8);
    let out = s.deliver(&b).await.unwrap();
    for (i, o) in out.iter().enumerate() {
        if i == 6 {
            assert!(
                matches!(o, Outcome::Failed(r) if r.contains("502")),
                "{o:?}"
            );
        } else {
            assert_eq!(*o, Outcome::Delivered, "b{i}");
        }
    }
    assert_eq!(lago.counts().len(), 4 + 7);
}

/// Two poison events in one batch: both isolated, the rest delivered.
#[tokio::test]
async fn two_poison_events_in_one_batch_are_both_isolated() {
    let lago = sim().await;
    let s = sink(&lago.url, fast_retry(1));
    assert_eq!(
        s.deliver(&events(&s, "a", 2)).await.unwrap(),
        vec![Outcome::Delivered; 2]
    );
    lago.crash_on_transaction("b1", 500);
    lago.crash_on_transaction("b12", 500);
    let b = events(&s, "b", 16);
    let out = s.deliver(&b).await.unwrap();
    for (i, o) in out.iter().enumerate() {
        if i == 1 || i == 12 {
            assert!(matches!(o, Outcome::Failed(_)), "b{i}: {o:?}");
        } else {
            assert_eq!(*o, Outcome::Delivered, "b{i}");
        }
    }
    assert_eq!(lago.counts().len(), 2 + 14);
}

/// A full outage (Lago answers 500 to everything) on a fresh sink: the first failed batch is
/// split once into halves, a probe; both fail too, so nothing shows Lago up and no further
/// split is made, in this batch or any later one: a backlog of 100-event batches costs its
/// usual retries plus two requests in all, never a 100-way split. Every record stays pending.
#[tokio::test]
async fn a_full_outage_costs_one_probe_split_then_no_more() {
    let lago = sim().await;
    lago.fail_next(10_000, 500);
    let s = sink(&lago.url, fast_retry(2));
    for round in 0..3 {
        let b = events(&s, &format!("r{round}-"), 100);
        let out = s.deliver(&b).await.unwrap();
        assert!(
            out.iter()
                .all(|o| matches!(o, Outcome::Failed(r) if r.contains("HTTP 500"))),
            "{out:?}"
        );
    }
    // Three batches of 3 attempts each, and the probe's two halves (one attempt each).
    assert_eq!(lago.request_count(), 3 * 3 + 2);
    assert!(lago.events().is_empty());
}

/// An outage that starts after the run has stored batches: with that evidence the first failed
/// batch is split, two levels deep (halves, quarters: two poison events may fall into both
/// halves); every part fails with nothing stored meanwhile, which withdraws the evidence:
/// later failed batches are not split until Lago stores something again. When it does,
/// isolation works again.
#[tokio::test]
async fn an_outage_after_successes_withdraws_the_evidence_until_lago_stores_again() {
    let lago = sim().await;
    let s = sink(&lago.url, fast_retry(1));
    assert_eq!(
        s.deliver(&events(&s, "a", 3)).await.unwrap(),
        vec![Outcome::Delivered; 3]
    );
    lago.fail_next(10_000, 500);
    for round in 0..3 {
        let out = s
            .deliver(&events(&s, &format!("r{round}-"), 50))
            .await
            .unwrap();
        assert!(out.iter().all(|o| matches!(o, Outcome::Failed(_))));
    }
    // The first request, then per batch 2 attempts, and the first one's 2 halves, 4 quarters.
    assert_eq!(lago.request_count(), 1 + 3 * 2 + 2 + 4);
    // Lago is back: a batch stored, then a poison batch is isolated again.
    lago.clear_faults();
    assert_eq!(
        s.deliver(&events(&s, "c", 2)).await.unwrap(),
        vec![Outcome::Delivered; 2]
    );
    lago.crash_on_transaction("d0", 500);
    let out = s.deliver(&events(&s, "d", 4)).await.unwrap();
    assert!(matches!(out[0], Outcome::Failed(_)), "{out:?}");
    assert_eq!(out[1..].to_vec(), vec![Outcome::Delivered; 3]);
}

/// Only a 5xx at every attempt points at the events. 503 (Lago or its proxy saying it is
/// unavailable) and 429 are about Lago, not about the batch (so are network errors and
/// timeouts, classed with them): even with evidence that Lago was up, such a batch is not
/// split; its records stay pending.
#[tokio::test]
async fn unavailable_or_throttled_batches_are_not_split() {
    let lago = sim().await;
    let s = sink(&lago.url, fast_retry(1));
    assert_eq!(
        s.deliver(&events(&s, "a", 2)).await.unwrap(),
        vec![Outcome::Delivered; 2]
    );
    lago.fail_next(2, 503);
    let out = s.deliver(&events(&s, "b", 8)).await.unwrap();
    assert!(out
        .iter()
        .all(|o| matches!(o, Outcome::Failed(r) if r.contains("503"))));
    lago.rate_limit_next(2, Some(0));
    let out = s.deliver(&events(&s, "c", 8)).await.unwrap();
    assert!(out
        .iter()
        .all(|o| matches!(o, Outcome::Failed(r) if r.contains("429"))));
    // A 500 then a 503: not the same answer at every attempt, not a poison.
    lago.fail_next(1, 500);
    lago.fail_next(1, 503);
    let out = s.deliver(&events(&s, "d", 8)).await.unwrap();
    assert!(out.iter().all(|o| matches!(o, Outcome::Failed(_))));
    assert_eq!(lago.request_count(), 1 + 2 + 2 + 2);
}

/// End to end, the hourly run's view: the demo's records staged (batches of 25 in id order),
/// Lago failing on one of the first batch. The run delivers every other record and keeps the
/// poison one pending, with one attempt and Lago's answer as its last error; the next run
/// sends only that one. Before, its 24 batch-mates stayed pending with it, run after run.
#[tokio::test]
async fn a_sync_delivers_the_batch_mates_of_a_poison_event_and_keeps_it_pending() {
    use billsync::sync::SyncOptions;
    let world = world::World::start(Behaviour::Postgres).await;
    let opts = SyncOptions {
        now: Some(world::now()),
        ..Default::default()
    };
    // Stage only, to pick an event of the first batch.
    world
        .pipeline()
        .await
        .sync(&SyncOptions {
            skip_push: true,
            ..opts.clone()
        })
        .await
        .unwrap();
    let staged = lago_rows(&world).await;
    let pending: Vec<&String> = staged
        .iter()
        .filter(|r| r.1 == "pending")
        .map(|r| &r.0)
        .collect();
    assert!(pending.len() > 50, "{staged:?}");
    let poison = pending[10].clone();
    world.lago.crash_on_transaction(poison.clone(), 500);

    let run = world.pipeline().await.sync(&opts).await.unwrap();
    assert_eq!(
        (run.sent, run.failed),
        (pending.len() as u64 - 1, 1),
        "{run:?}"
    );
    for (key, status, attempts, last_error) in lago_rows(&world).await {
        if key == poison {
            assert_eq!((status.as_str(), attempts), ("pending", 1));
            let why = last_error.unwrap_or_default();
            assert!(why.contains("HTTP 500") && why.contains("alone"), "{why}");
        } else if pending.contains(&&key) {
            assert_eq!(status, "sent", "{key}");
        }
    }
    let counts = world.lago.counts();
    assert_eq!(counts.len(), pending.len() - 1);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");

    // The next run: only the poison event goes out, and stays pending.
    let before = world.lago.request_count();
    let next = world.pipeline().await.sync(&opts).await.unwrap();
    assert_eq!((next.sent, next.failed), (0, 1), "{next:?}");
    let sent_again: Vec<String> = world.lago.bodies()[before..].to_vec();
    assert!(
        sent_again
            .iter()
            .all(|b| b.matches("transaction_id").count() == 1
                && b.contains(&format!("\"{poison}\""))),
        "{sent_again:?}"
    );
}

/// The Lago sink's records in ledger id order: key, status, attempts, last error.
async fn lago_rows(world: &world::World) -> Vec<(String, String, i64, Option<String>)> {
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
