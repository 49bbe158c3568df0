//! Sources of usage: one file per provider behind the [`Provider`] trait.
//!
//! A provider knows its API, its natural keys, its cursor and when a record is final. It knows
//! nothing of mappings, sinks or the ledger: the pipeline hands it the stored cursors and stores
//! what it returns.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::record::UsageRecord;

pub(crate) mod http;
pub mod jelastic;
pub mod metalsoft;
pub mod sakura;
pub mod softlayer;

/// A decimal from a JSON number or string, read from its text (never through a float):
/// `0.012846` stays `0.012846`, `"7.25925278"` too; a value needing more than 28 digits is
/// refused, not rounded. (`arbitrary_precision` keeps a number's text as sent.)
pub fn json_decimal(value: &serde_json::Value) -> Option<rust_decimal::Decimal> {
    let text = match value {
        serde_json::Value::String(s) => s.trim(),
        serde_json::Value::Number(n) => n.as_str(),
        _ => return None,
    };
    crate::record::exact_decimal(text)
}

/// The sum of amounts, `None` beyond a decimal's range: `Decimal`'s `+` and `sum` panic on
/// overflow, and a provider's amounts (each read exactly) may add up past it.
pub fn checked_sum(
    values: impl IntoIterator<Item = rust_decimal::Decimal>,
) -> Option<rust_decimal::Decimal> {
    values
        .into_iter()
        .try_fold(rust_decimal::Decimal::ZERO, |sum, v| sum.checked_add(v))
}

/// Stored cursor values of one source, by stream (e.g. `user:1`).
pub type Cursors = HashMap<String, String>;

/// The time up to which a stored cursor says everything is pulled, for its lag: an RFC 3339
/// time (a watermark) as it is, a SAKURA month (`YYYY-MM`) at its end (the 1st of the next
/// month, 00:00 JST). `None` for a cursor that is no time (a SoftLayer invoice id).
pub fn cursor_time(value: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Some(t.with_timezone(&Utc));
    }
    value
        .parse::<sakura::Month>()
        .ok()
        .map(sakura::Month::end_utc)
}

/// One unit of pulling work: small enough to hold in memory, staged in one transaction with
/// the cursor advance that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The cursor stream this chunk advances (e.g. `user:1`).
    pub stream: String,
    /// Start of the time window (inclusive).
    pub window_start: DateTime<Utc>,
    /// End of the time window (exclusive).
    pub window_end: DateTime<Utc>,
    /// Provider-specific detail (page number, bill id, ...), opaque to the pipeline.
    pub detail: String,
}

/// The chunks of one run, made one at a time as the pipeline takes them, so that a run over many
/// streams and windows holds a few chunks in memory rather than all of them.
pub struct Plan<'a> {
    /// How many chunks `chunks` yields (for progress and the log).
    pub len: usize,
    /// The chunks, in the order [`Provider::plan`] lists them.
    pub chunks: Box<dyn Iterator<Item = Chunk> + Send + 'a>,
}

impl Plan<'static> {
    /// A plan over chunks already in memory.
    pub fn from_vec(chunks: Vec<Chunk>) -> Self {
        Plan {
            len: chunks.len(),
            chunks: Box::new(chunks.into_iter()),
        }
    }
}

impl std::fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan").field("len", &self.len).finish()
    }
}

/// What one chunk yielded.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Normalized records, in provider order.
    pub records: Vec<UsageRecord>,
    /// The new cursor value of `chunk.stream`, stored in the same transaction as the records.
    /// `None` leaves the cursor as it is.
    pub cursor: Option<String>,
    /// Other cursors of the source, `(stream, value)`, stored in the same transaction: what the
    /// next plans check the stored cursors against (MetalSoft's `window`). Usually empty.
    pub also: Vec<(String, String)>,
}

/// The offset at which a provider's invoices are calendar months: SAKURA bills JST months,
/// the others are taken in UTC (MetalSoft and Jelastic have no invoices of their own; SoftLayer
/// invoices monthly on the account's anniversary day, not on calendar months).
pub fn invoice_month_offset(provider_kind: &str) -> chrono::FixedOffset {
    let hours = if provider_kind == sakura::KIND { 9 } else { 0 };
    chrono::FixedOffset::east_opt(hours * 3600)
        .unwrap_or(chrono::FixedOffset::east_opt(0).expect("UTC"))
}

/// Errors of a provider call. They always name the provider and the call.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The API answered with an error object of its own.
    #[error("{provider}: {call} returned error {code}: {message}")]
    Api {
        provider: String,
        call: String,
        code: String,
        message: String,
    },
    /// HTTP status without a usable error body.
    #[error("{provider}: {call} answered HTTP {status}: {body}")]
    Http {
        provider: String,
        call: String,
        status: u16,
        body: String,
    },
    /// Transport failure (connect, timeout, reset) after retries.
    #[error("{provider}: {call} failed: {message}")]
    Transport {
        provider: String,
        call: String,
        message: String,
    },
    /// The response did not have the documented shape.
    #[error("{provider}: {call} returned an unexpected response: {message}")]
    Shape {
        provider: String,
        call: String,
        message: String,
    },
    /// Configuration that cannot work (bad URL, missing user ids, ...).
    #[error("{provider}: configuration: {message}")]
    Config { provider: String, message: String },
}

impl ProviderError {
    /// The same error with the text that came from outside (the API's message, the HTTP body,
    /// the transport's reason) passed through `f`: to say which bill or window it concerns, or
    /// to redact a secret the server echoed. `Shape` and `Config` messages are billsync's own.
    pub fn map_remote_text(self, f: impl FnOnce(String) -> String) -> ProviderError {
        match self {
            ProviderError::Api {
                provider,
                call,
                code,
                message,
            } => ProviderError::Api {
                provider,
                call,
                code,
                message: f(message),
            },
            ProviderError::Http {
                provider,
                call,
                status,
                body,
            } => ProviderError::Http {
                provider,
                call,
                status,
                body: f(body),
            },
            ProviderError::Transport {
                provider,
                call,
                message,
            } => ProviderError::Transport {
                provider,
                call,
                message: f(message),
            },
            other => other,
        }
    }
}

/// A source of usage records.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Provider kind, e.g. `metalsoft`.
    fn kind(&self) -> &'static str;
    /// The configured source name.
    fn name(&self) -> &str;
    /// The chunks to pull in this run, in order, given the stored cursors and the current time.
    async fn plan(
        &self,
        cursors: &Cursors,
        now: DateTime<Utc>,
    ) -> Result<Vec<Chunk>, ProviderError>;
    /// The same chunks as [`Provider::plan`], made as they are taken. Errors (a bad stored
    /// cursor, ...) come here, before the first chunk. Providers whose plans can be long
    /// override it; the default lists them with `plan`.
    async fn plan_lazily<'a>(
        &'a self,
        cursors: &Cursors,
        now: DateTime<Utc>,
    ) -> Result<Plan<'a>, ProviderError> {
        Ok(Plan::from_vec(self.plan(cursors, now).await?))
    }
    /// How many chunks may be fetched at once (they are staged in plan order regardless).
    /// Providers whose chunks depend on each other, or whose API limits concurrency, keep 1.
    fn concurrent_fetches(&self) -> usize {
        1
    }
    /// Pull one chunk.
    async fn fetch(&self, chunk: &Chunk, now: DateTime<Utc>) -> Result<Page, ProviderError>;
    /// Whether records that are not final yet may be sent (configuration opt-in). When they
    /// later change, the pipeline sends corrections; by default they wait until final.
    fn push_provisional(&self) -> bool {
        false
    }
}
