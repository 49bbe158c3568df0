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
    /// Not delivered this time (retries exhausted on a transient failure); stays pending.
    Failed(String),
}

/// A failure that stops the sink for the rest of the run (bad or rotated key, no permission).
/// Records of the batch stay pending.
#[derive(Debug, thiserror::Error)]
#[error("sink {sink}: {message}")]
pub struct SinkStopped {
    pub sink: String,
    pub message: String,
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
    /// input order, or stops the sink.
    async fn deliver(&self, batch: &[Outgoing]) -> Result<Vec<Outcome>, SinkStopped>;
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
