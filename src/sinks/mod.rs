//! Destinations of mapped usage: one file per invoicing system behind the [`Sink`] trait.
//!
//! A sink turns a mapped event into the exact bytes it will send (frozen in the ledger at
//! staging, so every retry is byte-identical) and delivers batches of those frozen payloads,
//! reporting an outcome per record. It never touches the ledger.

use async_trait::async_trait;

use crate::mapping::MappedEvent;

pub mod focus;
pub mod jsonl;
pub mod lago;
pub mod lago_admin;
pub mod stripe;
pub mod webhook;

/// One frozen payload on its way out.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Ledger row id, echoed back in the outcome.
    pub id: i64,
    /// The idempotency key (Lago `transaction_id`).
    pub key: String,
    /// The frozen payload, exactly as staged.
    pub payload: String,
    /// When a delivery of this record first ended unclear ([`Outcome::Unclear`]: the sink may
    /// hold it already), if one did since it was queued or last replayed. A sink whose
    /// deduplication is time-limited ([`Sink::dedup_window`]) is not sent it once that is too
    /// long ago.
    pub unclear_since: Option<chrono::DateTime<chrono::Utc>>,
}

/// What happened to one record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sink stored it now.
    Delivered,
    /// The sink already had it (e.g. Lago `value_already_exist`): delivered by an earlier attempt.
    AlreadyDelivered,
    /// The sink refused it for a reason a retry cannot fix; kept in the ledger as `rejected`.
    Rejected(String),
    /// Not delivered this time, and the sink did not take it (a refused connection, a 429, a
    /// time the sink will take later; retries exhausted); stays pending.
    Failed(String),
    /// Not confirmed this time, and the sink may have taken it (a timeout, a connection cut
    /// after the request went out, a 5xx: it may have stored the event before failing); stays
    /// pending like [`Outcome::Failed`], and the ledger keeps the time of the first such
    /// attempt ([`Outgoing::unclear_since`]). A resend is safe only while the sink still
    /// deduplicates the key ([`Sink::dedup_window`]).
    Unclear(String),
    /// Not sent again by the push loop, a delivery of it having ended unclear longer ago than
    /// the sink deduplicates keys ([`Sink::dedup_window`]): `rejected` like [`Outcome::Rejected`],
    /// but the sink may hold it, so the time of that delivery is kept (a later correction of
    /// the record counts it as gone out, and `reconcile` names it).
    HeldBack(String),
    /// Refused like [`Outcome::Rejected`], by an answer that shows the sink does not hold the
    /// record: an earlier unclear delivery of it is forgotten (Stripe v1: a refusal with
    /// Stripe's error, to a request under the record's Idempotency-Key, which Stripe would
    /// have answered with the stored result had an earlier one been taken). Any other
    /// refusal ([`Outcome::Rejected`]: a local check, the v2 stream's, whose validation comes
    /// later) keeps it.
    RejectedNotStored(String),
}

/// How long a sink deduplicates a record's key: a resend of a record whose earlier delivery
/// ended unclear is counted once only within `window` of that delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupWindow {
    /// The invoicing system, as the person reading a rejection knows it (`Stripe`).
    pub system: &'static str,
    /// The sink's documented deduplication window (Stripe: at least 24 hours).
    pub window: chrono::Duration,
    /// Kept off the end of the window: clocks differ, and a record read at the start of a
    /// push may be sent minutes later.
    pub margin: chrono::Duration,
}

impl DedupWindow {
    /// The time before which a first unclear delivery is too old to resend at `now`.
    pub fn resend_cutoff(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> chrono::DateTime<chrono::Utc> {
        now - (self.window - self.margin)
    }
}

/// A failure that stops the sink for the rest of the run (bad or rotated key, no permission).
///
/// A stop can come in the middle of a batch, after some of its records were settled by earlier
/// requests of the same `deliver` (half of a refused batch stored, duplicates named by a 409, a
/// 422 by index): those outcomes travel with the stop in `settled`, and the pipeline records
/// them like any other; every other record of the batch stays pending. Dropping them would
/// leave records the sink already holds pending, sent again by the next run.
#[derive(Debug, thiserror::Error)]
#[error("sink {sink}: {message}")]
pub struct SinkStopped {
    pub sink: String,
    pub message: String,
    /// Outcomes settled before the stop, by position in the batch given to `deliver` (each
    /// position at most once, in ascending order). Empty when nothing was settled.
    pub settled: Vec<(usize, Outcome)>,
}

impl SinkStopped {
    /// A stop with nothing settled.
    pub fn new(sink: impl Into<String>, message: impl Into<String>) -> SinkStopped {
        SinkStopped {
            sink: sink.into(),
            message: message.into(),
            settled: Vec::new(),
        }
    }

    /// Add what `outcomes` settled before the stop: one slot per record of the batch, in
    /// batch order, `None` for a record not settled.
    pub fn after(mut self, outcomes: impl IntoIterator<Item = Option<Outcome>>) -> SinkStopped {
        self.settled.extend(
            outcomes
                .into_iter()
                .enumerate()
                .filter_map(|(i, o)| o.map(|o| (i, o))),
        );
        self.settled.sort_by_key(|(i, _)| *i);
        self
    }

    /// Re-base `settled` from a sub-batch onto the batch it was taken from: the record at
    /// position `i` of the sub-batch is at `position(i)` of the batch.
    pub fn remap(mut self, position: impl Fn(usize) -> usize) -> SinkStopped {
        for (i, _) in &mut self.settled {
            *i = position(*i);
        }
        self.settled.sort_by_key(|(i, _)| *i);
        self
    }
}

/// Errors encoding an event into a payload.
#[derive(Debug, thiserror::Error)]
#[error("sink {sink}: cannot encode event {key}: {message}")]
pub struct EncodeError {
    pub sink: String,
    pub key: String,
    pub message: String,
}

/// An invoicing system.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The sink kind, e.g. `lago`.
    fn kind(&self) -> &'static str;
    /// The configured sink name.
    fn name(&self) -> &str;
    /// The largest batch `deliver` accepts.
    fn max_batch(&self) -> usize;
    /// The frozen payload of one event, keyed by `key`.
    fn encode(&self, key: &str, event: &MappedEvent) -> Result<String, EncodeError>;
    /// The frozen payload when the sink also needs the normalized record (a FOCUS export writes
    /// provider columns); by default the mapped event is enough. The pipeline calls this one.
    fn encode_record(
        &self,
        key: &str,
        event: &MappedEvent,
        _record: &crate::record::UsageRecord,
    ) -> Result<String, EncodeError> {
        self.encode(key, event)
    }
    /// Deliver a batch (at most `max_batch`, keys unique). Returns one outcome per input, in
    /// input order, or stops the sink, with the outcomes settled before the stop
    /// ([`SinkStopped::settled`]).
    async fn deliver(&self, batch: &[Outgoing]) -> Result<Vec<Outcome>, SinkStopped>;
    /// How long the sink deduplicates a record's key, when that is time-limited: a pending
    /// record whose first unclear delivery ([`Outgoing::unclear_since`]) is older than the
    /// window minus its margin is then not sent again but rejected, for a person to check what
    /// the sink counted and replay it or not. `None` (default): the sink's deduplication never
    /// expires (Lago's `transaction_id`), or there is none to rely on within any window.
    ///
    /// With a window, the ledger marks records as being sent before they are handed to
    /// [`Sink::deliver`], so that a crash before their acknowledgement counts as an unclear
    /// delivery. Such a sink must settle, in a stop, every record a request of which may have
    /// reached it (as [`Outcome::Unclear`]): the others of the batch lose the mark.
    fn dedup_window(&self) -> Option<DedupWindow> {
        None
    }
    /// How many requests the sink has answered 429 (rate limited) so far. The push loop halves
    /// the number of batches it keeps in flight when this grows. Default: never throttled.
    fn throttled(&self) -> u64 {
        0
    }
    /// Read back what the sink stored for one subscription and metric in `[from, to)`, for
    /// reconciliation. `Ok(None)`: this sink cannot be read back.
    async fn read_back(
        &self,
        _query: &ReadBackQuery,
    ) -> Result<Option<Vec<ReadBackEvent>>, String> {
        Ok(None)
    }
    /// Read back what the sink *counted* for one subscription (for Stripe: customer) and metric
    /// in `[from, to)`, as one total, for a sink that keeps no readable events, only aggregates
    /// (Stripe's meter event summaries). Reconcile asks this when [`Sink::read_back`] gives
    /// `Ok(None)`. `Ok(None)`: this sink cannot be read back so either.
    async fn read_back_total(
        &self,
        _query: &ReadBackQuery,
    ) -> Result<Option<ReadBackTotal>, String> {
        Ok(None)
    }
}

/// What a sink counted in all, for one subscription and metric over a window.
#[derive(Debug, Clone)]
pub struct ReadBackTotal {
    /// The counted total, exact.
    pub total: rust_decimal::Decimal,
    /// Where it comes from, for the report (e.g. `meter mtr_… sum, customer cus_…`).
    pub source: String,
    /// Why the sink counted what it did, when the reader knows (Stripe: no meter has the event
    /// name, so it counted nothing): shown beside the difference.
    pub note: Option<String>,
}

/// What to read back from a sink.
#[derive(Debug, Clone)]
pub struct ReadBackQuery {
    pub subscription: String,
    pub metric: String,
    pub from: chrono::DateTime<chrono::Utc>,
    pub to: chrono::DateTime<chrono::Utc>,
}

/// One event as the sink stored it.
#[derive(Debug, Clone)]
pub struct ReadBackEvent {
    pub key: String,
    pub properties: serde_json::Map<String, serde_json::Value>,
}
