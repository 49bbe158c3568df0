//! Pushing while the pull is still running. Records a run has staged go to the sink while
//! later pages are pulled, and the promise stays the same: each key once in Lago, Lago's
//! totals equal to the provider's. A record that a later page of the same run changes while a
//! sink request carries its first content is neither overwritten nor lost: the first content
//! is acknowledged as sent, and the change goes out as a correction.

#[path = "common/world.rs"]
mod world;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use billsync::ledger::{RecordFilter, Status};
use billsync::mapping::{MapOutcome, MappingSet};
use billsync::providers::metalsoft::MetalsoftProvider;
use billsync::providers::{Chunk, Cursors, Page, Provider, ProviderError};
use billsync::record::UsageRecord;
use billsync::simulators::lago::Behaviour;
use billsync::sync::{Pipeline, RunOutcome, SyncOptions};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use world::{now, World};

/// Chunks pulled in each run of these tests.
const CHUNKS: usize = 5;

/// The MetalSoft provider of the test world, slowed down and with a last page that waits for
/// Lago: it is fetched only once Lago has stored an event of this run, which can happen only
/// if records are pushed before the pull ends. With `repeat_changed`, that last page also
/// carries the first mapped record of the first page again, with twice its quantity and cost.
struct SlowProvider {
    inner: MetalsoftProvider,
    world: Arc<World>,
    plan: Mutex<Vec<Chunk>>,
    first_mapped: Mutex<Option<UsageRecord>>,
    repeat_changed: bool,
    /// The first page reports its first mapped record as not final yet (held as provisional),
    /// the last page reports it again, final.
    first_provisional: bool,
}

#[async_trait]
impl Provider for SlowProvider {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn plan(
        &self,
        cursors: &Cursors,
        now: DateTime<Utc>,
    ) -> Result<Vec<Chunk>, ProviderError> {
        // The first chunks that hold records (the demo's first days may be empty).
        let mut chunks = Vec::new();
        for chunk in self.inner.plan(cursors, now).await? {
            if chunks.len() == CHUNKS {
                break;
            }
            if !self.inner.fetch(&chunk, now).await?.records.is_empty() {
                chunks.push(chunk);
            }
        }
        *self.plan.lock().unwrap() = chunks.clone();
        Ok(chunks)
    }
    async fn fetch(&self, chunk: &Chunk, now: DateTime<Utc>) -> Result<Page, ProviderError> {
        let index = self
            .plan
            .lock()
            .unwrap()
            .iter()
            .position(|c| c == chunk)
            .expect("a planned chunk");
        let stalled = |message: &str| ProviderError::Transport {
            provider: "test".into(),
            call: "fetch".into(),
            message: message.into(),
        };
        let mut page = self.inner.fetch(chunk, now).await?;
        if index == 0 {
            let mappings = MappingSet::examples().unwrap();
            let first = page
                .records
                .iter_mut()
                .find(|r| matches!(mappings.apply(r), MapOutcome::Mapped(_)));
            let kept = first.as_deref().cloned();
            if self.first_provisional {
                if let Some(r) = first {
                    assert!(r.is_final, "the simulator's past days are final");
                    r.is_final = false;
                }
            }
            *self.first_mapped.lock().unwrap() = kept;
        } else if index + 1 < CHUNKS {
            // Slow pages: the stager commits what has waited a second, so the pusher has
            // records before the last page.
            tokio::time::sleep(Duration::from_millis(400)).await;
        } else {
            let waited = std::time::Instant::now();
            while self.world.lago.event_count() == 0 {
                if waited.elapsed() > Duration::from_secs(15) {
                    return Err(stalled("nothing reached Lago while the pull was running"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if self.repeat_changed {
                let mut changed = self
                    .first_mapped
                    .lock()
                    .unwrap()
                    .clone()
                    .expect("a mapped record");
                changed.consumed_quantity *= Decimal::TWO;
                changed.billed_cost *= Decimal::TWO;
                page.records.push(changed);
            }
            if self.first_provisional {
                let now_final = self
                    .first_mapped
                    .lock()
                    .unwrap()
                    .clone()
                    .expect("a mapped record");
                page.records.push(now_final);
            }
        }
        Ok(page)
    }
}

async fn pipeline(world: &Arc<World>, repeat_changed: bool) -> (Pipeline, Arc<SlowProvider>) {
    pipeline_with(world, repeat_changed, false).await
}

async fn pipeline_with(
    world: &Arc<World>,
    repeat_changed: bool,
    first_provisional: bool,
) -> (Pipeline, Arc<SlowProvider>) {
    let mut pipeline = world.pipeline().await;
    let provider = Arc::new(SlowProvider {
        inner: world.provider(),
        world: world.clone(),
        plan: Mutex::new(Vec::new()),
        first_mapped: Mutex::new(None),
        repeat_changed,
        first_provisional,
    });
    pipeline.providers = vec![Box::new(Shared(provider.clone()))];
    (pipeline, provider)
}

/// The provider, shared with the test so that it can read what the provider saw.
struct Shared(Arc<SlowProvider>);

#[async_trait]
impl Provider for Shared {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn name(&self) -> &str {
        self.0.name()
    }
    async fn plan(
        &self,
        cursors: &Cursors,
        now: DateTime<Utc>,
    ) -> Result<Vec<Chunk>, ProviderError> {
        self.0.plan(cursors, now).await
    }
    async fn fetch(&self, chunk: &Chunk, now: DateTime<Utc>) -> Result<Page, ProviderError> {
        self.0.fetch(chunk, now).await
    }
}

fn opts() -> SyncOptions {
    SyncOptions {
        now: Some(now()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_lago_while_the_pull_is_still_running_and_each_key_once() {
    let world = Arc::new(World::start(Behaviour::Postgres).await);
    let (pipeline, _) = pipeline(&world, false).await;

    let summary = pipeline.sync(&opts()).await.unwrap();
    assert_eq!(summary.outcome, RunOutcome::Ok, "{summary:?}");
    assert!(
        summary.sources.values().all(|s| s.error.is_none()),
        "{summary:?}"
    );
    assert!(summary.sent > 0);

    // Every pending record went out once; the run's totals are what Lago holds.
    let ledger = &pipeline.ledger;
    assert_eq!(ledger.pending_count("lago").await.unwrap(), 0);
    let counts = world.lago.counts();
    assert_eq!(counts.len() as u64, summary.sent);
    assert!(
        counts.values().all(|&n| n == 1),
        "a key stored twice: {counts:?}"
    );
    let run_totals: std::collections::BTreeMap<(String, String), Decimal> = summary
        .totals
        .iter()
        .map(|t| ((t.subscription.to_string(), t.metric.to_string()), t.value))
        .collect();
    assert_eq!(run_totals, world.lago_totals());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_changed_while_a_request_carries_it_is_sent_then_corrected() {
    let world = Arc::new(World::start(Behaviour::Postgres).await);
    // Lago stores each batch, then answers 1.5 s later: the last page (with the change)
    // arrives while the request carrying the first content is unanswered.
    world.lago.set_answer_delay(Duration::from_millis(1500));
    let (pipeline, provider) = pipeline(&world, true).await;

    let summary = pipeline.sync(&opts()).await.unwrap();
    assert_eq!(summary.outcome, RunOutcome::Ok, "{summary:?}");
    assert!(
        summary.sources.values().all(|s| s.error.is_none()),
        "{summary:?}"
    );
    assert_eq!(summary.corrections, 1, "{summary:?}");
    assert_eq!(
        summary.restaged, 0,
        "the carried record was not restaged: {summary:?}"
    );

    let first = provider.first_mapped.lock().unwrap().clone().unwrap();
    let key = first.idempotency_key();
    let mappings = MappingSet::examples().unwrap();
    let MapOutcome::Mapped(sent) = mappings.apply(&first) else {
        panic!("the first record maps");
    };
    let mut doubled = first.clone();
    doubled.consumed_quantity *= Decimal::TWO;
    doubled.billed_cost *= Decimal::TWO;
    let MapOutcome::Mapped(latest) = mappings.apply(&doubled) else {
        panic!("the changed record maps");
    };
    assert_ne!(sent.value, latest.value);

    // Lago holds the first content under the record's key and the difference under the
    // correction's: together, the latest content.
    let stored: Vec<_> = world
        .lago
        .events()
        .into_iter()
        .filter(|e| e.transaction_id == key || e.transaction_id.starts_with(&format!("{key}.r")))
        .collect();
    assert_eq!(stored.len(), 2, "{stored:?}");
    let property = World::value_property(&latest.metric_code);
    let value = |transaction_id: &str| -> Decimal {
        let e = stored
            .iter()
            .find(|e| e.transaction_id == transaction_id)
            .unwrap();
        e.properties[property].as_str().unwrap().parse().unwrap()
    };
    assert_eq!(value(&key), sent.value);
    assert_eq!(value(&format!("{key}.r1")), latest.value - sent.value);

    // The ledger says the same: the original sent with its first content, the correction
    // (the difference: the first quantity again) sent.
    let records = pipeline
        .ledger
        .records_matching(&RecordFilter::status(Status::Sent), 0, 10_000)
        .await
        .unwrap();
    let original = records.iter().find(|r| r.key == key).unwrap();
    assert_eq!(original.status, Status::Sent);
    assert_eq!(original.record.consumed_quantity, first.consumed_quantity);
    let correction = records
        .iter()
        .find(|r| r.key == format!("{key}.r1"))
        .unwrap();
    assert_eq!(correction.status, Status::Sent);
    assert_eq!(correction.correction_of, Some(original.id));
    assert_eq!(correction.record.consumed_quantity, first.consumed_quantity);

    // Each key once, and Lago's totals are the ledger's.
    let counts = world.lago.counts();
    assert!(
        counts.values().all(|&n| n == 1),
        "a key stored twice: {counts:?}"
    );
}

/// The test world's Lago sink, except that Lago refuses the first mapped record the first time
/// a request carries it (a 422 for that event alone, as for a subscription not created yet);
/// the rest of that request is stored.
struct RejectsFirstOnce {
    inner: billsync::sinks::lago::LagoSink,
    provider: Arc<SlowProvider>,
    rejected: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl billsync::sinks::Sink for RejectsFirstOnce {
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
        use std::sync::atomic::Ordering;
        let key = self
            .provider
            .first_mapped
            .lock()
            .unwrap()
            .as_ref()
            .map(|r| r.idempotency_key());
        let Some(at) = key.and_then(|k| batch.iter().position(|o| o.key == k)) else {
            return self.inner.deliver(batch).await;
        };
        if self.rejected.swap(true, Ordering::SeqCst) {
            return self.inner.deliver(batch).await;
        }
        let rest: Vec<_> = batch
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != at)
            .map(|(_, o)| o.clone())
            .collect();
        let mut outcomes = if rest.is_empty() {
            Vec::new()
        } else {
            self.inner.deliver(&rest).await?
        };
        outcomes.insert(
            at,
            billsync::sinks::Outcome::Rejected("Lago validation: subscription: not_found".into()),
        );
        Ok(outcomes)
    }
    fn throttled(&self) -> u64 {
        self.inner.throttled()
    }
}

/// A record that a later page changes while a request carries it, and that Lago refuses in that
/// request: its change is staged once the refusal is acknowledged, in place of the refused
/// content, and goes out whole. Never a correction of the refused original: Lago would then
/// hold the difference alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_changed_while_a_request_carries_it_and_refused_goes_out_whole() {
    let world = Arc::new(World::start(Behaviour::Postgres).await);
    // Lago stores each batch, then answers 1.5 s later: the last page (with the change)
    // arrives while the request carrying the first content is unanswered.
    world.lago.set_answer_delay(Duration::from_millis(1500));
    let (mut pipeline, provider) = pipeline(&world, true).await;
    pipeline.sinks = vec![Box::new(RejectsFirstOnce {
        inner: world.sink_with_key(world::LAGO_KEY),
        provider: provider.clone(),
        rejected: std::sync::atomic::AtomicBool::new(false),
    })];

    let summary = pipeline.sync(&opts()).await.unwrap();
    assert_eq!(summary.outcome, RunOutcome::Ok, "{summary:?}");
    assert_eq!(
        (summary.rejected, summary.restaged, summary.corrections),
        (1, 1, 0),
        "{summary:?}"
    );
    assert_eq!(pipeline.ledger.pending_count("lago").await.unwrap(), 0);

    let first = provider.first_mapped.lock().unwrap().clone().unwrap();
    let key = first.idempotency_key();
    let mut doubled = first.clone();
    doubled.consumed_quantity *= Decimal::TWO;
    doubled.billed_cost *= Decimal::TWO;
    let MapOutcome::Mapped(latest) = MappingSet::examples().unwrap().apply(&doubled) else {
        panic!("the changed record maps");
    };
    // One event, under the record's own key, with the latest content.
    let stored: Vec<_> = world
        .lago
        .events()
        .into_iter()
        .filter(|e| e.transaction_id == key || e.transaction_id.starts_with(&format!("{key}.r")))
        .map(|e| e.transaction_id)
        .collect();
    assert_eq!(stored, std::slice::from_ref(&key));
    assert_eq!(world.lago_value_of(&key), latest.value);
    let sent = pipeline
        .ledger
        .records_matching(&RecordFilter::status(Status::Sent), 0, 10_000)
        .await
        .unwrap();
    let record = sent.iter().find(|r| r.key == key).expect("the record sent");
    assert_eq!(record.record.consumed_quantity, doubled.consumed_quantity);
}

/// The test world's Lago sink, except that the request carrying the first mapped record loses
/// its answer after Lago stored it: what `LagoSink::deliver` reports (`Failed`, records stay
/// pending) when Lago stores a batch and then does not answer until the retries are spent
/// (timeouts, a 503 burst).
struct LosesFirstAnswer {
    inner: billsync::sinks::lago::LagoSink,
    provider: Arc<SlowProvider>,
    lost: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl billsync::sinks::Sink for LosesFirstAnswer {
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
    fn encode_record(
        &self,
        key: &str,
        event: &billsync::mapping::MappedEvent,
        record: &UsageRecord,
    ) -> Result<String, billsync::sinks::EncodeError> {
        self.inner.encode_record(key, event, record)
    }
    async fn deliver(
        &self,
        batch: &[billsync::sinks::Outgoing],
    ) -> Result<Vec<billsync::sinks::Outcome>, billsync::sinks::SinkStopped> {
        use std::sync::atomic::Ordering;
        let key = self
            .provider
            .first_mapped
            .lock()
            .unwrap()
            .as_ref()
            .map(|r| r.idempotency_key());
        let outcomes = self.inner.deliver(batch).await?;
        if key.is_some_and(|k| batch.iter().any(|o| o.key == k))
            && !self.lost.swap(true, Ordering::SeqCst)
        {
            return Ok(vec![
                billsync::sinks::Outcome::Failed(
                    "timed out (gave up after 4 attempts)".into()
                );
                batch.len()
            ]);
        }
        Ok(outcomes)
    }
    fn throttled(&self) -> u64 {
        self.inner.throttled()
    }
}

/// A record whose request was stored by Lago but whose answer was lost stays pending; if a
/// later page of the same run changes it, it must not be restaged in place (Lago holds the
/// first content under its key and will refuse the second as a duplicate): the change must
/// reach Lago (as a correction), or the difference is never billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_changed_after_its_answer_was_lost_reaches_lago_in_full() {
    let world = Arc::new(World::start(Behaviour::Postgres).await);
    let (mut pipeline, provider) = pipeline(&world, true).await;
    pipeline.sinks = vec![Box::new(LosesFirstAnswer {
        inner: world.sink_with_key(world::LAGO_KEY),
        provider: provider.clone(),
        lost: std::sync::atomic::AtomicBool::new(false),
    })];
    let first_run = pipeline.sync(&opts()).await.unwrap();
    assert!(first_run.failed > 0, "{first_run:?}");
    // Pending after its lost answer, the record's change is a correction, not a restage.
    assert_eq!(
        (first_run.restaged, first_run.corrections),
        (0, 1),
        "{first_run:?}"
    );

    // The next run (Lago answering again) pushes what is left.
    pipeline.providers = vec![];
    pipeline.sinks = vec![Box::new(world.sink_with_key(world::LAGO_KEY))];
    let second_run = pipeline.sync(&opts()).await.unwrap();
    assert!(second_run.already_delivered > 0, "{second_run:?}");
    assert_eq!(pipeline.ledger.pending_count("lago").await.unwrap(), 0);

    let first = provider.first_mapped.lock().unwrap().clone().unwrap();
    let key = first.idempotency_key();
    let mut doubled = first.clone();
    doubled.consumed_quantity *= Decimal::TWO;
    doubled.billed_cost *= Decimal::TWO;
    let mappings = MappingSet::examples().unwrap();
    let MapOutcome::Mapped(latest) = mappings.apply(&doubled) else {
        panic!("the changed record maps");
    };
    let in_lago = world.lago_value_of(&key);
    assert_eq!(
        in_lago, latest.value,
        "Lago holds {in_lago} for {key} and its corrections; the provider's latest content maps to {}",
        latest.value
    );
}

/// A record held as provisional by an early page becomes final in a later page of the same
/// run, while the pusher has already gone past its id: it is pushed in this run all the same,
/// not left pending for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_record_that_becomes_final_later_in_the_run_is_sent_in_that_run() {
    let world = Arc::new(World::start(Behaviour::Postgres).await);
    let (pipeline, provider) = pipeline_with(&world, false, true).await;

    let summary = pipeline.sync(&opts()).await.unwrap();
    assert_eq!(summary.outcome, RunOutcome::Ok, "{summary:?}");
    assert!(
        summary.sources.values().all(|s| s.error.is_none()),
        "{summary:?}"
    );
    assert_eq!(
        (summary.restaged, summary.corrections),
        (1, 0),
        "{summary:?}"
    );

    let first = provider.first_mapped.lock().unwrap().clone().unwrap();
    let key = first.idempotency_key();
    let MapOutcome::Mapped(event) = MappingSet::examples().unwrap().apply(&first) else {
        panic!("the record maps");
    };
    assert_eq!(
        pipeline.ledger.pending_count("lago").await.unwrap(),
        0,
        "something was left pending for the next run"
    );
    assert_eq!(world.lago_value_of(&key), event.value);
    let counts = world.lago.counts();
    assert_eq!(counts.len() as u64, summary.sent);
    assert!(
        counts.values().all(|&n| n == 1),
        "a key stored twice: {counts:?}"
    );
}
