//! The webhook sink: signed JSON batches to an in-house invoicing system.
//!
//! Contract (the receiver's side is documented in the README, "Webhook signature"):
//!
//! - **Body**: `{"batch_id":"<id>","records":[<record>,…]}` where each record is the payload
//!   frozen in the ledger at staging, copied verbatim. A record is
//!   `{"key":…,"subscription":…,"customer":…|null,"metric":…,"property":…,"value":"<decimal>",
//!   "timestamp":"<RFC 3339 UTC>","properties":{…}}`; `value` is a string so no JSON parser
//!   turns it into a float.
//! - **Idempotency**: `batch_id` (also sent as `Idempotency-Key`) is the SHA-256 of the
//!   batch's record keys, so a resend of the same records, in this run or after a crash
//!   between the receiver's answer and the ledger's acknowledgement, carries the same id. A
//!   batch after a crash can hold *more* records than the lost attempt (new records join the
//!   pending queue), so a receiver must in the end deduplicate by each record's `key`; the
//!   batch id is a shortcut. A **409** counts only when its body says which records the
//!   receiver has: `{"duplicates":"all"}` means "I already have this whole batch" (its
//!   `Idempotency-Key`, i.e. every one of its records) and the sink records them all as
//!   delivered before. A receiver that has only *some* of the records either stores the others
//!   and answers 2xx, or answers 409 with `{"duplicates":["<key>",…]}` naming the keys it
//!   already has and storing nothing of the request: exactly those are recorded as delivered
//!   before and the others are sent again at once as a new batch (new id). A listed 409 that
//!   names none of the batch's keys delivers nothing (the records stay pending). Any other 409
//!   (empty, problem+json, anything else) is transient: receivers following the IETF
//!   Idempotency-Key draft answer 409 to a retry while the original request with that key is
//!   *still being processed*, and that original may yet fail, so taking it for "delivered"
//!   would lose the records with nothing to show it (a webhook cannot be read back).
//! - **Signature**: `X-Billsync-Timestamp: <unix seconds>` and
//!   `X-Billsync-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>`. Each
//!   attempt is signed afresh (a retry has a new timestamp and signature over the same body),
//!   so the receiver can refuse stale timestamps against replay and must never use the
//!   signature as a deduplication key.
//! - **Retry classes** as for Lago: transport errors, timeouts, 408, 429, 5xx and a 409
//!   without a `duplicates` answer are retried with the same body and key ([`RetryPolicy`],
//!   honouring `Retry-After`), the records staying pending when the retries run out; 2xx =
//!   delivered; a 409 with `duplicates` = already delivered (as above); a 400 or 422 about a
//!   single record rejects it (held in the ledger with the answer), and about several records
//!   sends each half again as a new batch (its own id), down to single records, so one bad
//!   record never rejects good ones (at most 2n - 1 batches for n records); 401 and 403 stop
//!   the sink (records stay pending), and so do 404 (a wrong `url`) and 413 (a `batch_size` the
//!   receiver cannot take): the address or the size is at fault, not the records; anything
//!   else leaves the records pending for the next run.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::BackoffBuilder;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::Secret;
use crate::http::{retry_hint, shown_url, snippet, transport_reason, RetryPolicy};
use crate::mapping::MappedEvent;
use crate::sinks::jsonl::{decimal_text, utc_text};
use crate::sinks::{EncodeError, Outcome, Outgoing, Sink, SinkStopped};

/// Header carrying the batch id.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// Header carrying the signing time, Unix seconds.
pub const TIMESTAMP_HEADER: &str = "X-Billsync-Timestamp";
/// Header carrying `v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "X-Billsync-Signature";
/// The largest batch the sink sends.
pub const MAX_BATCH: usize = 1000;

fn default_batch_size() -> usize {
    100
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

/// An extra header value: plain text, or a secret read from `env:NAME` / `file:/path` (an
/// `Authorization` token, say), redacted in logs and `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub enum HeaderValue {
    /// Sent as written.
    Plain(String),
    /// Resolved at start-up from the environment or a file.
    Secret(Secret),
}

impl HeaderValue {
    fn expose(&self) -> &str {
        match self {
            HeaderValue::Plain(v) => v,
            HeaderValue::Secret(s) => s.expose(),
        }
    }
}

impl std::fmt::Debug for HeaderValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderValue::Plain(v) => write!(f, "{v:?}"),
            HeaderValue::Secret(_) => f.write_str("Secret(***)"),
        }
    }
}

impl<'de> Deserialize<'de> for HeaderValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.starts_with("env:") || text.starts_with("file:") {
            Secret::resolve(&text)
                .map(HeaderValue::Secret)
                .map_err(serde::de::Error::custom)
        } else {
            Ok(HeaderValue::Plain(text))
        }
    }
}

/// Settings of one webhook sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The URL batches are POSTed to (http or https).
    pub url: String,
    /// The HMAC-SHA256 signing key (`env:NAME` or `file:/path`).
    pub secret: Secret,
    /// Records per request, 1 to 1000. Default 100.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Extra static headers. A value written `env:NAME` or `file:/path` is read as a secret.
    /// The sink's own headers (`Content-Type`, `Idempotency-Key`, `X-Billsync-*`) cannot be
    /// overridden.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderValue>,
    /// Timeout of one HTTP request, e.g. `30s`. Default 30 seconds.
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    /// Retries of transient failures (transport errors, timeouts, 408, 429, 5xx, a 409 that does
    /// not say which records the receiver has).
    #[serde(default)]
    pub retry: RetryPolicy,
}

/// A webhook sink configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum WebhookConfigError {
    /// `batch_size` outside 1..=1000.
    #[error("sink {sink}: batch_size must be between 1 and {MAX_BATCH}, got {got}")]
    BatchSize { sink: String, got: usize },
    /// `url` is not an absolute http(s) URL.
    #[error("sink {sink}: url {url:?} {reason}")]
    Url {
        sink: String,
        url: String,
        reason: String,
    },
    /// `timeout` is zero.
    #[error("sink {sink}: timeout must be greater than zero")]
    Timeout { sink: String },
    /// A header name or value HTTP cannot carry, or one of the sink's own headers.
    #[error("sink {sink}: header {name:?}: {reason}")]
    Header {
        sink: String,
        name: String,
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("sink {sink}: cannot build the HTTP client: {message}")]
    Client { sink: String, message: String },
}

/// Delivers signed batches of frozen record payloads to a URL.
#[derive(Debug)]
pub struct WebhookSink {
    name: String,
    url: String,
    secret: Secret,
    batch_size: usize,
    headers: reqwest::header::HeaderMap,
    retry: RetryPolicy,
    client: reqwest::Client,
    /// 429 answers so far (see [`Sink::throttled`]).
    throttled: std::sync::atomic::AtomicU64,
}

/// The batch id of a list of record keys: hex SHA-256 over the keys, each followed by `\n`.
pub fn batch_id<'a>(keys: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    for k in keys {
        h.update(k.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`: the value of
/// [`SIGNATURE_HEADER`].
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex(&mac.finalize().into_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The request body of a batch: `{"batch_id":…,"records":[payloads verbatim]}`.
pub fn batch_body(batch_id: &str, payloads: &[&str]) -> String {
    let mut body = String::with_capacity(
        payloads.iter().map(|p| p.len() + 1).sum::<usize>() + batch_id.len() + 32,
    );
    body.push_str("{\"batch_id\":\"");
    body.push_str(batch_id);
    body.push_str("\",\"records\":[");
    for (i, p) in payloads.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(p);
    }
    body.push_str("]}");
    body
}

impl WebhookSink {
    /// Check the configuration and build the sink (no network access).
    pub fn new(name: String, config: WebhookConfig) -> Result<Self, WebhookConfigError> {
        if config.batch_size == 0 || config.batch_size > MAX_BATCH {
            return Err(WebhookConfigError::BatchSize {
                sink: name,
                got: config.batch_size,
            });
        }
        if config.timeout.is_zero() {
            return Err(WebhookConfigError::Timeout { sink: name });
        }
        let url = config.url.trim().to_string();
        // The URL may carry credentials: an error shows it without them.
        let parsed = reqwest::Url::parse(&url).map_err(|e| WebhookConfigError::Url {
            sink: name.clone(),
            url: shown_url(&url),
            reason: format!("is not a valid URL: {e}"),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(WebhookConfigError::Url {
                sink: name,
                url: shown_url(&url),
                reason: "must be an http:// or https:// URL with a host".into(),
            });
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for (key, value) in &config.headers {
            let header_error = |reason: &str| WebhookConfigError::Header {
                sink: name.clone(),
                name: key.clone(),
                reason: reason.to_string(),
            };
            let lower = key.to_ascii_lowercase();
            if lower == "content-type"
                || lower == "content-length"
                || lower == "host"
                || lower == IDEMPOTENCY_HEADER.to_ascii_lowercase()
                || lower.starts_with("x-billsync-")
            {
                return Err(header_error("is set by the sink and cannot be configured"));
            }
            // A credential written in the settings would sit in a ConfigMap and in every copy
            // of the file, as a literal `api_key` would (refused too).
            let credential = ["authorization", "cookie", "token", "secret", "password"]
                .iter()
                .any(|w| lower.contains(w))
                || lower.contains("api-key")
                || lower.contains("api_key")
                || lower.contains("apikey");
            if credential && matches!(value, HeaderValue::Plain(_)) {
                return Err(header_error(
                    "carries a credential: write its value `env:VARIABLE` or `file:/path`, never \
                     in the settings",
                ));
            }
            let header_name = reqwest::header::HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| header_error("is not a valid header name"))?;
            let mut header_value = reqwest::header::HeaderValue::from_str(value.expose())
                // The value may be a secret: never quote it.
                .map_err(|_| header_error("has a value HTTP cannot carry"))?;
            if matches!(value, HeaderValue::Secret(_)) {
                header_value.set_sensitive(true);
            }
            headers.insert(header_name, header_value);
        }
        // No redirects: reqwest would turn the POST into a bodiless GET.
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("billsync/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| WebhookConfigError::Client {
                sink: name.clone(),
                message: e.to_string(),
            })?;
        Ok(WebhookSink {
            name,
            url,
            secret: config.secret,
            batch_size: config.batch_size,
            headers,
            retry: config.retry,
            client,
            throttled: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The URL batches are posted to.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn stopped(&self, message: impl Into<String>) -> SinkStopped {
        SinkStopped::new(self.name.clone(), message)
    }

    /// Send one batch and settle each of its records: a 409 naming its duplicates settles
    /// those and sends the rest again as a new batch; a 400/422 about a batch of several
    /// records sends each half again as a new batch, down to single records, so only the
    /// records the receiver refuses are rejected (a binary tree: at most 2n - 1 batches for n
    /// records, about 2k·log2(n) when k of them are refused; each retried on transient failures
    /// like any batch). A stop on a later request carries what the earlier ones settled.
    async fn send(
        &self,
        records: &[&Outgoing],
        tally: &mut Tally,
    ) -> Result<Vec<Outcome>, SinkStopped> {
        tally.batches += 1;
        let duplicates = match self.send_once(records, tally).await? {
            Answer::All(Outcome::Rejected(reason)) if records.len() > 1 => {
                // Which record the receiver refused is unknown: each half is a new batch (its
                // own id, the hash of its keys), and only a single record is rejected.
                tally.splits += 1;
                tracing::debug!(sink = %self.name, records = records.len(), %reason,
                    "the receiver refused the batch; sending each half as a new batch");
                let mid = records.len() / 2;
                let (left, right) = records.split_at(mid);
                let mut outcomes = Box::pin(self.send(left, tally)).await?;
                match Box::pin(self.send(right, tally)).await {
                    Ok(more) => outcomes.extend(more),
                    // The left half is settled (the receiver may hold it): it goes with the stop.
                    Err(stop) => {
                        return Err(stop
                            .remap(|i| mid + i)
                            .after(outcomes.into_iter().map(Some)))
                    }
                }
                return Ok(outcomes);
            }
            Answer::All(outcome) => return Ok(vec![outcome; records.len()]),
            Answer::Duplicates(keys) => keys,
        };
        let known: Vec<bool> = records
            .iter()
            .map(|o| duplicates.contains(&o.key))
            .collect();
        if !known.contains(&true) {
            tracing::warn!(sink = %self.name, records = records.len(),
                "the receiver answered 409 listing none of the batch's keys; records stay pending");
            return Ok(vec![
                Outcome::Failed(
                    "the receiver answered 409 but listed none of this batch's records as duplicates; not delivered".into()
                );
                records.len()
            ]);
        }
        let rest: Vec<&Outgoing> = records
            .iter()
            .zip(&known)
            .filter(|(_, k)| !**k)
            .map(|(o, _)| *o)
            .collect();
        tracing::info!(sink = %self.name, duplicates = records.len() - rest.len(), rest = rest.len(),
            "the receiver already has some records of the batch; sending the others as a new batch");
        let mut rest_outcomes = if rest.is_empty() {
            Vec::new()
        } else {
            match Box::pin(self.send(&rest, tally)).await {
                Ok(o) => o,
                // The duplicates named are settled: they go with the stop.
                Err(stop) => {
                    let positions: Vec<usize> = (0..records.len()).filter(|&i| !known[i]).collect();
                    return Err(stop.remap(|i| positions[i]).after(
                        known
                            .iter()
                            .map(|&k| k.then_some(Outcome::AlreadyDelivered)),
                    ));
                }
            }
        }
        .into_iter();
        Ok(known
            .into_iter()
            .map(|k| {
                if k {
                    Outcome::AlreadyDelivered
                } else {
                    rest_outcomes
                        .next()
                        .unwrap_or_else(|| Outcome::Failed("internal: no outcome".into()))
                }
            })
            .collect())
    }

    /// Send one batch, retrying transient failures with the same body.
    async fn send_once(
        &self,
        records: &[&Outgoing],
        tally: &mut Tally,
    ) -> Result<Answer, SinkStopped> {
        let id = batch_id(records.iter().map(|o| o.key.as_str()));
        let payloads: Vec<&str> = records.iter().map(|o| o.payload.as_str()).collect();
        let body = batch_body(&id, &payloads);
        let mut delays = self.retry.backoff().build();
        let mut attempt = 0usize;
        loop {
            attempt += 1;
            tally.requests += 1;
            let started = Instant::now();
            let (reason, hint) = match self.attempt(&id, &body).await? {
                Attempt::Done(answer) => {
                    tracing::debug!(
                        sink = %self.name,
                        batch_id = %id,
                        records = records.len(),
                        attempt,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        answer = ?answer,
                        "webhook batch done"
                    );
                    return Ok(answer);
                }
                Attempt::Transient { reason, hint } => (reason, hint),
            };
            match self.retry.with_hint(delays.next(), hint) {
                Some(wait) => {
                    tracing::warn!(
                        sink = %self.name,
                        batch_id = %id,
                        attempt,
                        wait_ms = wait.as_millis() as u64,
                        %reason,
                        "webhook request failed, retrying the same body"
                    );
                    tokio::time::sleep(wait).await;
                }
                None => {
                    tracing::warn!(
                        sink = %self.name,
                        batch_id = %id,
                        attempt,
                        %reason,
                        "webhook request failed, retries exhausted; records stay pending"
                    );
                    return Ok(Answer::All(Outcome::Failed(format!(
                        "{reason} (gave up after {attempt} attempts)"
                    ))));
                }
            }
        }
    }

    /// One signed HTTP exchange.
    async fn attempt(&self, id: &str, body: &str) -> Result<Attempt, SinkStopped> {
        let timestamp = chrono::Utc::now().timestamp();
        let signature = signature(self.secret.expose().as_bytes(), timestamp, body.as_bytes());
        let response = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_HEADER, id)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(body.to_string())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                return Ok(Attempt::Transient {
                    reason: transport_reason(&e),
                    hint: None,
                })
            }
        };
        let status = response.status();
        let hint = retry_hint(status, response.headers());
        let text = match response.text().await {
            Ok(t) => t,
            Err(e) => {
                return Ok(Attempt::Transient {
                    reason: format!(
                        "HTTP {status}, reading the answer failed: {}",
                        transport_reason(&e)
                    ),
                    hint,
                })
            }
        };
        let outcome = match status.as_u16() {
            200..=299 => Outcome::Delivered,
            409 => match duplicates(&text) {
                Some(Duplicates::All) => Outcome::AlreadyDelivered,
                Some(Duplicates::Listed(keys)) => {
                    return Ok(Attempt::Done(Answer::Duplicates(keys)))
                }
                // Not "I have it": an IETF Idempotency-Key receiver answers a bare 409 while the
                // original request with this key is still being processed, and that one may
                // still fail. Ask again with the same key; it answers for the finished request.
                None => {
                    return Ok(Attempt::Transient {
                        reason: format!(
                            "HTTP {status} without a \"duplicates\" answer (not taken for delivered): {}",
                            snippet(&text)
                        ),
                        hint,
                    })
                }
            },
            401 | 403 => {
                return Err(self.stopped(format!(
                    "the receiver refused the signature or credentials (HTTP {status}): {}; records stay pending",
                    snippet(&text)
                )))
            }
            // The address or the batch size, not the records: stop, keep them pending.
            404 => {
                return Err(self.stopped(format!(
                    "the receiver answered 404 Not Found: check url; records stay pending: {}",
                    snippet(&text)
                )))
            }
            413 => {
                return Err(self.stopped(format!(
                    "the receiver answered 413 Payload Too Large: lower batch_size; records stay pending: {}",
                    snippet(&text)
                )))
            }
            400 | 422 => Outcome::Rejected(format!(
                "the receiver answered {status}: {}",
                snippet(&text)
            )),
            408 | 429 | 500..=599 => {
                if status.as_u16() == 429 {
                    // The pipeline halves the batches it keeps in flight when this grows.
                    self.throttled
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                return Ok(Attempt::Transient {
                    reason: format!("HTTP {status}: {}", snippet(&text)),
                    hint,
                })
            }
            _ => Outcome::Failed(format!("unexpected HTTP {status}: {}", snippet(&text))),
        };
        Ok(Attempt::Done(Answer::All(outcome)))
    }
}

/// What a 409 says the receiver already has.
#[derive(Debug, PartialEq, Eq)]
enum Duplicates {
    /// `{"duplicates":"all"}`: every record of the request (its `Idempotency-Key`).
    All,
    /// `{"duplicates":["<key>",…]}`: exactly these keys; nothing of the request was stored.
    Listed(HashSet<String>),
}

/// The `duplicates` answer of a 409; `None` for any other body (empty, problem+json, "in
/// progress"…), which says nothing about what the receiver stored.
fn duplicates(text: &str) -> Option<Duplicates> {
    let v: Value = serde_json::from_str(text).ok()?;
    match v.as_object()?.get("duplicates")? {
        Value::String(s) if s == "all" => Some(Duplicates::All),
        Value::Array(list) => Some(Duplicates::Listed(
            list.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
        )),
        _ => None,
    }
}

/// What settling one batch took: the batches sent (the first, its halves, resends after a
/// listed 409), the HTTP requests they took (retries included), and how many batches were
/// split after a 400/422.
#[derive(Debug, Default)]
struct Tally {
    batches: usize,
    requests: usize,
    splits: usize,
}

/// The receiver's verdict on one request.
#[derive(Debug)]
enum Answer {
    /// The same outcome for every record of the batch.
    All(Outcome),
    /// 409 naming the keys it already has; it stored nothing of this request.
    Duplicates(HashSet<String>),
}

enum Attempt {
    Done(Answer),
    Transient {
        reason: String,
        hint: Option<Duration>,
    },
}

#[async_trait]
impl Sink for WebhookSink {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn throttled(&self) -> u64 {
        self.throttled.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        self.batch_size
    }

    /// `{"key","subscription","customer","metric","property","value","timestamp","properties"}`
    /// in this order, compact; `value` a decimal string, `timestamp` RFC 3339 UTC, properties
    /// sorted by name.
    fn encode(&self, key: &str, event: &MappedEvent) -> Result<String, EncodeError> {
        let error = |message: &str| EncodeError {
            sink: self.name.clone(),
            key: key.to_string(),
            message: message.to_string(),
        };
        if key.trim().is_empty() {
            return Err(error("the ledger key is empty"));
        }
        if event.external_subscription_id.trim().is_empty() {
            return Err(error("the subscription is empty"));
        }
        if event.metric_code.trim().is_empty() {
            return Err(error("the metric code is empty"));
        }
        let mut o = Map::new();
        o.insert("key".into(), Value::from(key));
        o.insert(
            "subscription".into(),
            Value::from(event.external_subscription_id.as_str()),
        );
        o.insert(
            "customer".into(),
            event
                .external_customer_id
                .as_deref()
                .map_or(Value::Null, Value::from),
        );
        o.insert("metric".into(), Value::from(event.metric_code.as_str()));
        o.insert(
            "property".into(),
            Value::from(event.value_property.as_str()),
        );
        o.insert("value".into(), Value::from(decimal_text(event.value)));
        o.insert("timestamp".into(), Value::from(utc_text(event.timestamp)));
        o.insert(
            "properties".into(),
            Value::Object(
                event
                    .properties
                    .iter()
                    .map(|(k, v)| (k.to_string(), Value::from(v.as_str())))
                    .collect(),
            ),
        );
        serde_json::to_string(&Value::Object(o)).map_err(|e| error(&e.to_string()))
    }

    async fn deliver(&self, batch: &[Outgoing]) -> Result<Vec<Outcome>, SinkStopped> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(self.batch_size) {
            let records: Vec<&Outgoing> = chunk.iter().collect();
            let mut tally = Tally::default();
            let start = outcomes.len();
            let settled = match self.send(&records, &mut tally).await {
                Ok(settled) => settled,
                // What earlier chunks and requests settled goes with the stop.
                Err(stop) => {
                    return Err(stop
                        .remap(|i| start + i)
                        .after(outcomes.into_iter().map(Some)))
                }
            };
            if tally.splits > 0 {
                let rejected = settled
                    .iter()
                    .filter(|o| matches!(o, Outcome::Rejected(_)))
                    .count();
                tracing::warn!(
                    sink = %self.name,
                    records = records.len(),
                    rejected,
                    batches = tally.batches,
                    requests = tally.requests,
                    "the receiver refused records: isolated them by halving the batch"
                );
            }
            outcomes.extend(settled);
        }
        Ok(outcomes)
    }
}
