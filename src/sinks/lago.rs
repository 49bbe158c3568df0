//! The Lago sink: usage events to `POST {api_url}/api/v1/events/batch`.
//!
//! Why it looks the way it does (see `shared/reference/invoicing-systems.md`, 1.3–1.6):
//!
//! - **Idempotency rests on two frozen fields.** `transaction_id` is the ledger key and the
//!   `timestamp` is the event's own time, both written once into the payload at staging. On
//!   Lago's ClickHouse store the dedup key includes the timestamp, so a retry with another
//!   timestamp would be a second billable event; resending the stored bytes verbatim is the
//!   only safe retry. [`LagoSink::deliver`] therefore never re-serializes a payload.
//! - **Numbers travel as strings.** The spec types property values as `oneOf` string /
//!   integer / number, so an integer matches two branches and fails validation, and a JSON
//!   float loses precision. Every property value is a string (decimal, no exponent), and a
//!   sub-second timestamp is a string `"secs.millis"` (a JSON float fails the spec).
//! - **A 422 is split by array index.** On the Postgres store a batch is all-or-nothing: one
//!   duplicate rolls the whole batch back. Records reported only as
//!   `transaction_id: value_already_exist` were delivered earlier; records with any other
//!   error are rejected; every other record is resent in a new batch until all are resolved.
//!   A 422 not in Lago's error format (a WAF's or gateway's) is about the way to Lago, not the
//!   records: it stops the sink, as a non-Lago 400 or any 404 does.
//! - **Retries are for transient failures only** (transport errors, timeouts, 429, 5xx), with
//!   the shared [`RetryPolicy`] and the server's own wait hint: `Retry-After`, and on a 429
//!   `X-RateLimit-Reset` (Lago Cloud sends that on every answer, so it is no wait for a 5xx).
//!   401/403 stop the sink (records not settled by an earlier request of the batch stay
//!   pending) instead of burning retries, and so does a 400 (lago-api answers it only about the
//!   request as a whole: a body it cannot read, never one event); nothing is ever marked
//!   delivered without a 2xx or a per-record `value_already_exist`.
//! - **A batch Lago answers 5xx at every attempt is split to find a poison event**, one that
//!   Lago always fails on (a bug of its own on some value): otherwise the batch fails run after
//!   run, its batch-mates never billed. A 503 (Lago saying it is down), a 429 or a network
//!   error is not about the events and is never split. Halves, level by level, resent through
//!   the same queue as a 422's remainder, one attempt each for a 5xx; only with evidence
//!   Lago is up ([`Evidence`]: something it stored this run, or the run's one probe split),
//!   at most two levels without a part stored, and within a per-batch budget, so an outage
//!   costs a handful of extra requests, not a split of every batch.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::BackoffBuilder;
use serde::Deserialize;
use serde_json::Value;

use crate::config::Secret;
use crate::http::{
    get_text, retry_hint, shown_url, snippet, transport_reason, ReadFailure, RetryPolicy,
};
use crate::mapping::MappedEvent;
use crate::sinks::{EncodeError, Outcome, Outgoing, Sink, SinkStopped};

/// The largest batch Lago accepts (`LAGO_EVENTS_BATCH_MAX_LENGTH`, default 100).
pub const MAX_BATCH: usize = 100;

/// How often reconciliation's read-back reads a list that changes while it is read.
const READ_BACK_PASSES: usize = 3;

/// The path of the batch endpoint, below `api_url`.
pub const BATCH_PATH: &str = "/api/v1/events/batch";

fn default_batch_size() -> usize {
    MAX_BATCH
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Settings of one Lago sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LagoConfig {
    /// Base URL of the Lago API, without `/api/v1`: `https://api.getlago.com`,
    /// `https://api.eu.getlago.com` or the self-hosted host. Events go to
    /// `{api_url}/api/v1/events/batch`.
    pub api_url: String,
    /// The API key (`env:NAME` or `file:/path`), sent as `Authorization: Bearer …`. It needs
    /// `write` permission on events.
    pub api_key: Secret,
    /// Events per request, 1 to 100 (Lago's limit). Default 100.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Timeout of one HTTP request (connect + answer), e.g. `30s`. Default 30 seconds.
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    /// Retries of transient failures (transport errors, timeouts, 429, 5xx).
    #[serde(default)]
    pub retry: RetryPolicy,
}

/// A Lago sink configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum LagoConfigError {
    /// `batch_size` outside 1..=100.
    #[error("sink {sink}: batch_size must be between 1 and {MAX_BATCH}, got {got}")]
    BatchSize { sink: String, got: usize },
    /// `api_url` is not an absolute http(s) base URL.
    #[error("sink {sink}: api_url {url:?} {reason}")]
    ApiUrl {
        sink: String,
        url: String,
        reason: String,
    },
    /// `timeout` is zero.
    #[error("sink {sink}: timeout must be greater than zero")]
    Timeout { sink: String },
    /// The HTTP client could not be built.
    #[error("sink {sink}: cannot build the HTTP client: {message}")]
    Client { sink: String, message: String },
}

/// Delivers frozen event payloads to Lago's batch endpoint.
#[derive(Debug)]
pub struct LagoSink {
    name: String,
    base: String,
    endpoint: String,
    /// `endpoint` for messages: without the user info `api_url` may carry (messages are
    /// logged and stored as records' last errors).
    shown_endpoint: String,
    api_key: Secret,
    batch_size: usize,
    retry: RetryPolicy,
    client: reqwest::Client,
    /// Requests answered 429 so far.
    throttled: std::sync::atomic::AtomicU64,
    /// Spacing of requests once Lago has rate-limited us.
    pacer: std::sync::Mutex<Pacer>,
    /// Whether a batch Lago fails with 5xx may be split to find the event it fails on.
    evidence: Evidence,
}

/// Whether Lago is up, as this run has seen it: the evidence a batch answered 5xx at every
/// attempt needs before it is split to find the one event Lago fails on (a poison event).
/// Without it the 5xx is taken for an outage, where splitting only multiplies the requests.
#[derive(Debug, Default)]
struct Evidence {
    /// Requests Lago answered as a working Lago so far (its events answer, its own 422).
    answered: std::sync::atomic::AtomicU64,
    /// `answered` when a split last ended with every part failed and nothing answered
    /// meanwhile: Lago looks down until it answers again.
    doubted_at: std::sync::atomic::AtomicU64,
    /// The one split of the run made without evidence (its parts may be the evidence) is
    /// spent, or the evidence was withdrawn.
    probed: std::sync::atomic::AtomicBool,
}

impl Evidence {
    fn answered(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn saw_lago_answer(&self) {
        self.answered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many levels a split of a failed batch may go without a part stored in between:
    /// two when Lago answered since it last looked down (two poison events may fall into
    /// both halves), one for the run's single probe, `None`: no split (an outage).
    fn split_levels(&self) -> Option<u32> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.answered() > self.doubted_at.load(SeqCst) {
            Some(2)
        } else if !self.probed.swap(true, SeqCst) {
            Some(1)
        } else {
            None
        }
    }

    /// A split ended with nothing stored: until Lago answers again, no batch is split.
    fn doubt(&self, answered: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.doubted_at.fetch_max(answered, SeqCst);
        self.probed.store(true, SeqCst);
    }
}

/// A part of a batch split to find the event Lago fails on.
#[derive(Debug, Clone, Copy)]
struct SplitPart {
    /// [`Evidence::answered`] when the part was made.
    since: u64,
    /// Levels ended before this one without anything answered.
    misses: u32,
    /// Levels allowed without anything answered.
    levels: u32,
}

/// Records of one `deliver` still to send: a run of batch positions, and the split it comes
/// from (`None`: the batch itself, or its rest after a 422 by index).
struct Group {
    indices: Vec<usize>,
    split: Option<SplitPart>,
}

/// The most part requests one batch of `n` may cost: two per level for two poison events
/// (`2 × 2 × ⌈log2 n⌉`), bounding a flaky Lago's cost when every level has a success.
fn split_budget(n: usize) -> usize {
    4 * (usize::BITS - n.saturating_sub(1).leading_zeros()) as usize
}

/// Spaces requests once Lago answered 429, so a rate-limited run proceeds at the limit instead
/// of bouncing off it. Before the first 429 nothing is paced. A 429's `X-RateLimit-Limit`
/// (requests per second) sets the pace just under the limit; without it the pace halves.
/// Every 30 s without a 429 the pace probes 10 % higher, so a raised limit is found again.
#[derive(Debug)]
struct Pacer {
    /// Time between two requests; `None`: not paced.
    interval: Option<Duration>,
    /// The earliest start of the next request.
    next: Instant,
    /// When the pace was last lowered or probed.
    changed: Instant,
    /// Requests started in the current second and when it began (the observed rate).
    second: (Instant, u32),
    observed: u32,
}

/// How long the pace holds before probing higher.
const PACE_PROBE_AFTER: Duration = Duration::from_secs(30);

impl Pacer {
    fn new() -> Pacer {
        let now = Instant::now();
        Pacer {
            interval: None,
            next: now,
            changed: now,
            second: (now, 0),
            observed: 0,
        }
    }

    /// Reserve the next slot: how long to wait before sending.
    fn reserve(&mut self, now: Instant) -> Duration {
        if now.duration_since(self.second.0) >= Duration::from_secs(1) {
            self.observed = self.second.1;
            self.second = (now, 0);
        }
        self.second.1 += 1;
        let Some(interval) = self.interval else {
            return Duration::ZERO;
        };
        if now.duration_since(self.changed) >= PACE_PROBE_AFTER {
            self.interval = Some(interval.mul_f64(0.9));
            self.changed = now;
        }
        let slot = self.next.max(now);
        self.next = slot + self.interval.unwrap_or(interval);
        slot - now
    }

    /// A 429: slow down to the advertised limit (or half the observed rate) and wait `hint`.
    fn throttled(&mut self, now: Instant, limit: Option<f64>, hint: Option<Duration>) {
        let per_second = match limit.filter(|l| *l > 0.0) {
            Some(l) => l * 0.99,
            None => (f64::from(self.observed.max(self.second.1)) / 2.0).max(1.0),
        };
        let interval = Duration::from_secs_f64(1.0 / per_second);
        self.interval = Some(match self.interval {
            // Without a stated limit, keep halving while 429s keep coming.
            Some(old) if limit.is_none() => (old * 2).max(interval),
            _ => interval,
        });
        self.changed = now;
        if let Some(h) = hint {
            self.next = self.next.max(now + h);
        }
    }
}

impl LagoSink {
    /// Check the configuration and build the sink (no network access).
    pub fn new(name: String, config: LagoConfig) -> Result<Self, LagoConfigError> {
        if config.batch_size == 0 || config.batch_size > MAX_BATCH {
            return Err(LagoConfigError::BatchSize {
                sink: name,
                got: config.batch_size,
            });
        }
        if config.timeout.is_zero() {
            return Err(LagoConfigError::Timeout { sink: name });
        }
        let base = config.api_url.trim().trim_end_matches('/').to_string();
        // The URL may carry credentials: an error shows it without them.
        let url_error = |reason: &str| LagoConfigError::ApiUrl {
            sink: name.clone(),
            url: shown_url(config.api_url.trim()),
            reason: reason.to_string(),
        };
        let parsed = reqwest::Url::parse(&base)
            .map_err(|e| url_error(&format!("is not a valid URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(url_error("must be an http:// or https:// URL with a host"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(url_error("must not carry a query or fragment"));
        }
        if base.ends_with("/api/v1") {
            return Err(url_error(
                "must be the base URL without /api/v1 (the sink appends /api/v1/events/batch)",
            ));
        }
        // Our own client, like `crate::http::client` but without following redirects: reqwest
        // turns a redirected POST into a GET without body, whose answer says nothing about
        // our events.
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("billsync/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| LagoConfigError::Client {
                sink: name.clone(),
                message: e.to_string(),
            })?;
        let endpoint = format!("{base}{BATCH_PATH}");
        Ok(LagoSink {
            shown_endpoint: shown_url(&endpoint),
            endpoint,
            base,
            name,
            api_key: config.api_key,
            batch_size: config.batch_size,
            retry: config.retry,
            client,
            throttled: std::sync::atomic::AtomicU64::new(0),
            pacer: std::sync::Mutex::new(Pacer::new()),
            evidence: Evidence::default(),
        })
    }

    /// The URL events are posted to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn encode_error(&self, key: &str, message: impl Into<String>) -> EncodeError {
        EncodeError {
            sink: self.name.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn stopped(&self, message: impl Into<String>) -> SinkStopped {
        SinkStopped::new(self.name.clone(), message)
    }

    /// Send one request (retrying transient failures) and classify Lago's answer. `part`: the
    /// request is a part of a batch that Lago answered 5xx at every attempt, sent to find the
    /// event it fails on; a 5xx (not 503) ends it at once, the batch already had its retries
    /// (429s, 503s and network errors are still retried).
    async fn send(&self, payloads: &[&str], part: bool) -> Result<RequestResult, SinkStopped> {
        let mut body =
            String::with_capacity(payloads.iter().map(|p| p.len() + 1).sum::<usize>() + 13);
        body.push_str("{\"events\":[");
        for (i, p) in payloads.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(p);
        }
        body.push_str("]}");

        let mut delays = self.retry.backoff().build();
        let mut attempt = 0usize;
        // Every attempt so far answered a 5xx other than 503.
        let mut server_errors = true;
        loop {
            attempt += 1;
            let started = Instant::now();
            let (reason, hint) = match self.attempt(&body, payloads.len()).await? {
                Attempt::Done(result) => {
                    tracing::debug!(
                        sink = %self.name,
                        events = payloads.len(),
                        attempt,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        result = result.label(),
                        "lago batch request done"
                    );
                    return Ok(result);
                }
                Attempt::Transient {
                    reason,
                    hint,
                    server_error,
                } => {
                    server_errors &= server_error;
                    if part && server_error {
                        return Ok(RequestResult::ServerError(reason));
                    }
                    (reason, hint)
                }
            };
            match self.retry.with_hint(delays.next(), hint) {
                Some(wait) => {
                    tracing::warn!(
                        sink = %self.name,
                        events = payloads.len(),
                        attempt,
                        wait_ms = wait.as_millis() as u64,
                        %reason,
                        "lago batch request failed, retrying the same payload"
                    );
                    tokio::time::sleep(wait).await;
                }
                None => {
                    tracing::warn!(
                        sink = %self.name,
                        events = payloads.len(),
                        attempt,
                        %reason,
                        "lago batch request failed, retries exhausted; records stay pending"
                    );
                    let reason = format!("{reason} (gave up after {attempt} attempts)");
                    return Ok(if server_errors {
                        RequestResult::ServerError(reason)
                    } else {
                        RequestResult::Failed(reason)
                    });
                }
            }
        }
    }

    /// Decide on a request (`request`: batch positions) Lago answered 5xx at every attempt,
    /// once every part of the same level was sent: its two halves to send (to find the event
    /// Lago fails on, so that its batch-mates are delivered), or why not, as the end of the
    /// records' failure reason. A batch is split only with evidence Lago is up ([`Evidence`]);
    /// a part, only while a part was stored within its last `levels` levels and the batch's
    /// [`split_budget`] lasts.
    fn split_failed(
        &self,
        request: &[usize],
        split: Option<SplitPart>,
        budget: &mut usize,
    ) -> Result<(Vec<usize>, Vec<usize>, SplitPart), String> {
        let answered = self.evidence.answered();
        if request.len() == 1 {
            return Err(match split {
                Some(_) => {
                    "; Lago fails on this event alone: the others of its batch were sent without it"
                        .into()
                }
                None => String::new(),
            });
        }
        let (misses, levels) = match split {
            None => match self.evidence.split_levels() {
                Some(levels) => (0, levels),
                // Nothing shows Lago up: an outage, not an event.
                None => return Err(String::new()),
            },
            Some(part) => {
                let misses = if answered > part.since {
                    0
                } else {
                    part.misses + 1
                };
                if misses >= part.levels {
                    // Every part failed, and nothing was stored meanwhile: Lago looks down.
                    // No batch is split again until it stores something.
                    self.evidence.doubt(answered);
                    tracing::warn!(sink = %self.name, events = request.len(),
                        "no part of a batch Lago answered 5xx was stored: taken for an outage, no more splits until Lago stores again");
                    return Err(" (its batch was split to find an event Lago fails on, but Lago stored no part of it: taken for an outage)".into());
                }
                (misses, part.levels)
            }
        };
        if *budget < 2 {
            return Err(" (its batch was split as far as one batch may be)".into());
        }
        *budget -= 2;
        tracing::warn!(sink = %self.name, events = request.len(),
            "Lago answered 5xx to every attempt of a request; sending it in halves to find the event it fails on");
        let mid = request.len().div_ceil(2);
        Ok((
            request[..mid].to_vec(),
            request[mid..].to_vec(),
            SplitPart {
                since: answered,
                misses,
                levels,
            },
        ))
    }

    /// One HTTP exchange.
    async fn attempt(&self, body: &str, count: usize) -> Result<Attempt, SinkStopped> {
        let wait = match self.pacer.lock() {
            Ok(mut p) => p.reserve(Instant::now()),
            Err(_) => Duration::ZERO,
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let response = self
            .client
            .post(&self.endpoint)
            .bearer_auth(self.api_key.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.to_string())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                return Ok(Attempt::Transient {
                    reason: transport_reason(&e),
                    hint: None,
                    server_error: false,
                })
            }
        };
        let status = response.status();
        let hint = retry_hint(status, response.headers());
        if status.as_u16() == 429 {
            self.throttled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let limit = response
                .headers()
                .get("x-ratelimit-limit")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok());
            if let Ok(mut p) = self.pacer.lock() {
                p.throttled(
                    Instant::now(),
                    limit,
                    hint.map(|h| h.min(self.retry.max_delay)),
                );
            }
        }
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = match response.bytes().await {
            Ok(b) => b,
            // The answer was cut: we cannot know what Lago did, and resending is safe.
            Err(e) => {
                return Ok(Attempt::Transient {
                    reason: format!(
                        "HTTP {status}, reading the answer failed: {}",
                        transport_reason(&e)
                    ),
                    hint,
                    server_error: false,
                })
            }
        };
        // Validated in place: `text()` decoded every answer lossily into a copy (1 % of the
        // CPU of a 1M-record `billsync bench` run, for answers that are UTF-8 anyway).
        let text = match std::str::from_utf8(&body) {
            Ok(t) => std::borrow::Cow::Borrowed(t),
            Err(_) => String::from_utf8_lossy(&body),
        };
        let code = status.as_u16();
        let lago_error = match code {
            200..=299 => None,
            _ => serde_json::from_str::<LagoError>(&text)
                .ok()
                .filter(|e| e.status == code),
        };
        let result = match code {
            200..=299 => match BatchAnswer::read(&text) {
                Some(BatchAnswer {
                    events: Echoed(echoed),
                }) => {
                    if echoed != count {
                        tracing::warn!(sink = %self.name, sent = count, echoed, "Lago echoed another number of events than sent");
                    }
                    RequestResult::Delivered
                }
                // A 2xx that is not Lago's answer (a proxy, a wrong host): not proof of
                // delivery. Keep the records pending; resending later is idempotent.
                _ => RequestResult::Failed(format!(
                    "HTTP {status} but the answer is not a Lago events response: {}",
                    snippet(&text)
                )),
            },
            300..=399 => {
                return Err(self.stopped(format!(
                    "Lago answered {status} redirecting to {}: set api_url to the final address",
                    location.as_deref().unwrap_or("(no Location)")
                )))
            }
            401 => {
                return Err(self.stopped(
                    "Lago refused the API key (401): check the Lago api_key secret of this sink (missing, wrong or rotated); records stay pending",
                ))
            }
            403 => {
                let lago_code = lago_error
                    .as_ref()
                    .and_then(|e| e.code.clone())
                    .unwrap_or_else(|| "no code".into());
                return Err(self.stopped(format!(
                    "Lago forbids the request (403 {lago_code}): the API key needs write permission on events; records stay pending"
                )));
            }
            404 => {
                // The batch endpoint never answers 404 about an event. A 404 is a wrong
                // api_url: from what stands in front of Lago, or from Lago itself, whose
                // catch-all route answers any unknown path in its own format
                // (`{"status":404,…,"code":"resource_not_found"}`, lago-api `config/routes.rb`
                // `*unmatched`). Rejecting the records would quarantine every one of them.
                let lago_code = lago_error
                    .as_ref()
                    .and_then(|e| e.code.as_deref())
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default();
                return Err(self.stopped(format!(
                    "{} answered 404 Not Found{lago_code}: check api_url; records stay pending",
                    self.shown_endpoint
                )));
            }
            400 if lago_error.is_none() => {
                // Not Lago's answer: a proxy or gateway in front of it (nginx's "plain HTTP
                // request was sent to HTTPS port", say) refused the request itself.
                return Err(self.stopped(format!(
                    "{} answered 400 Bad Request, not in Lago's error format: check api_url (http or https, the proxy in front of Lago); records stay pending: {}",
                    self.shown_endpoint,
                    snippet(&text)
                )));
            }
            400 => {
                // lago-api answers 400 about the request as a whole, never about one of its
                // events: Rails' own answer to a body it cannot parse
                // (`{"status":400,"error":"Bad Request"}`) and `Api::BaseController`'s
                // `rescue_from ActionController::ParameterMissing` ("BadRequest: param is
                // missing…", for a required root; `batch` only permits `events`, a missing or
                // empty one is the 422 `no_events` below). Per-event faults are 422s by index.
                // So a 400 is a damaged request (a proxy that altered the body, a connector
                // bug) that every batch would meet: rejecting the records quarantined every
                // record of every batch. Stop; they stay pending.
                let said = lago_error
                    .as_ref()
                    .map_or_else(|| snippet(&text), |e| snippet(&e.error));
                return Err(self.stopped(format!(
                    "Lago answered 400 Bad Request ({said}): Lago could not read the request as a whole, not any record of it; check what stands between billsync and Lago (a proxy altering the body); records stay pending"
                )));
            }
            // Lago's 422 always carries `error_details` (lago-api `ApiErrors`:
            // `validation_errors`, `provider_error`, `thirdparty_error`), the only part that
            // speaks about the records.
            422 => match lago_error {
                Some(error) if error.error_details.is_some() => {
                    self.split_422(error, &text, count)?
                }
                _ => {
                    // Not Lago's answer: a WAF or gateway in front of it refused the request.
                    // It says nothing about the records and every batch would meet it:
                    // rejecting them quarantined the whole backlog. Stop; they stay pending.
                    return Err(self.stopped(format!(
                        "{} answered 422 Unprocessable Entity, not in Lago's error format: check what stands in front of Lago (a WAF or gateway refusing the request); records stay pending: {}",
                        self.shown_endpoint,
                        snippet(&text)
                    )));
                }
            },
            408 | 429 | 500..=599 => {
                return Ok(Attempt::Transient {
                    reason: format!("HTTP {status}: {}", snippet(&text)),
                    hint,
                    // A 5xx may be about the request (a Lago bug on one of its events, a
                    // worker that died on it); a 503 is Lago or its proxy saying it is down.
                    server_error: (500..=599).contains(&code) && code != 503,
                })
            }
            // Anything else is unexpected: do not quarantine records for it, keep them pending.
            _ => RequestResult::Failed(format!("unexpected HTTP {status}: {}", snippet(&text))),
        };
        Ok(Attempt::Done(result))
    }

    /// One read of `GET /api/v1/events`, page by page until `meta.next_page` is null: the
    /// events and `meta.total_count` of the first and of the last page.
    async fn read_back_pass(
        &self,
        url: &str,
        query: &crate::sinks::ReadBackQuery,
        to: &str,
    ) -> Result<(Vec<crate::sinks::ReadBackEvent>, Option<u64>, Option<u64>), String> {
        let from = query
            .from
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut page = 1u64;
        let mut out = Vec::new();
        let mut first = None;
        loop {
            let params = [
                ("external_subscription_id", query.subscription.as_str()),
                ("code", query.metric.as_str()),
                ("timestamp_from", from.as_str()),
                ("timestamp_to", to),
                ("page", &page.to_string()),
                ("per_page", "100"),
            ];
            let text = self.read_back_page(url, &params).await?;
            let body: Value = serde_json::from_str(&text)
                .map_err(|e| format!("sink {}: GET /api/v1/events: not JSON: {e}", self.name))?;
            let events = body
                .get("events")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    format!("sink {}: GET /api/v1/events: no `events` array", self.name)
                })?;
            for e in events {
                let key = e
                    .get("transaction_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let properties = e
                    .get("properties")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                out.push(crate::sinks::ReadBackEvent { key, properties });
            }
            let count = body.pointer("/meta/total_count").and_then(Value::as_u64);
            first = first.or(count);
            match body.pointer("/meta/next_page").and_then(Value::as_u64) {
                Some(next) if next > page => page = next,
                _ => return Ok((out, first, count)),
            }
        }
    }

    /// One page of `GET /api/v1/events`: its text once Lago answered 2xx. Transport errors,
    /// timeouts, a cut answer, 408, 429 and 5xx are retried with the sink's [`RetryPolicy`]
    /// and the server's wait hint (`Retry-After`), as the batch endpoint's are: a month-end
    /// reconcile reads hundreds of pages, and one rate-limited page must not leave a line
    /// without read-back. Any other answer is an error at once.
    async fn read_back_page(&self, url: &str, params: &[(&str, &str)]) -> Result<String, String> {
        let request = || {
            self.client
                .get(url)
                .bearer_auth(self.api_key.expose())
                .query(params)
        };
        let what = format!("sink {}: lago read-back", self.name);
        get_text(request, &self.retry, &what)
            .await
            .map_err(|failure| match failure {
                ReadFailure::Answered { status, body } => format!(
                    "sink {}: GET /api/v1/events answered HTTP {status}: {body}",
                    self.name
                ),
                ReadFailure::GaveUp { reason, attempts } => format!(
                    "sink {}: GET /api/v1/events: {reason} (gave up after {attempts} attempts)",
                    self.name
                ),
            })
    }

    /// Classify Lago's own 422 answer (`error`, parsed from `text` with `status` 422):
    /// per-index outcomes, or one verdict for the whole request.
    fn split_422(
        &self,
        error: LagoError,
        text: &str,
        count: usize,
    ) -> Result<RequestResult, SinkStopped> {
        let whole = |why: &str| {
            RequestResult::Rejected(format!("Lago answered 422 ({why}): {}", snippet(text)))
        };
        let details = match error.error_details {
            Some(Value::Object(map)) => map,
            _ => return Ok(whole("errors not per event")),
        };
        if let Some(Value::Array(list)) = details.get("events") {
            if list.iter().any(|e| e.as_str() == Some("no_events")) {
                // The sink never sends an empty batch: Lago did not find the `events` it was
                // sent (lago-api `Events::CreateBatchService`: `events_params.blank?`), e.g. a
                // proxy that dropped the body or changed its Content-Type. Not the records.
                return Err(self.stopped(format!(
                    "Lago found no events in a request of {count} (no_events): the body did not reach Lago as sent (a proxy, a changed Content-Type); records stay pending"
                )));
            }
            if list.iter().any(|e| e.as_str() == Some("too_many_events")) {
                // The server's batch limit is lower than ours: a configuration problem, not
                // a property of the records.
                return Err(self.stopped(format!(
                    "Lago refuses batches of {count} events (too_many_events): lower batch_size; records stay pending"
                )));
            }
        }
        let mut per_index = Vec::with_capacity(details.len());
        for (k, v) in &details {
            match k.parse::<usize>() {
                Ok(i) if i < count => per_index.push((i, v)),
                _ => return Ok(whole("errors not keyed by event index")),
            }
        }
        if per_index.is_empty() {
            return Ok(whole("no errors listed"));
        }
        let mut outcomes = vec![None; count];
        for (i, errors) in per_index {
            outcomes[i] = Some(if only_already_exists(errors) {
                Outcome::AlreadyDelivered
            } else {
                Outcome::Rejected(format!("Lago validation: {}", describe_errors(errors)))
            });
        }
        Ok(RequestResult::Split(outcomes))
    }
}

/// Lago's answer to a batch (`{"events": [...]}`): only how many events it echoes is read. The
/// events themselves (a dozen fields each) are not needed, and parsing them into `Value`s was a
/// quarter of the pusher thread's time in `billsync bench`.
#[derive(Deserialize)]
struct BatchAnswer {
    events: Echoed,
}

impl BatchAnswer {
    /// `None` unless the text is an object with an `events` array.
    fn read(text: &str) -> Option<Self> {
        if !text.trim_start().starts_with('{') {
            return None;
        }
        serde_json::from_str(text).ok()
    }
}

/// The length of a JSON array, its elements skipped.
struct Echoed(usize);

impl<'de> Deserialize<'de> for Echoed {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Count;
        impl<'de> serde::de::Visitor<'de> for Count {
            type Value = Echoed;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of events")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Echoed, A::Error> {
                let mut n = 0;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Echoed(n))
            }
        }
        deserializer.deserialize_seq(Count)
    }
}

/// Lago's error body (`ApiError*` in the spec: `status` and `error` always there). Only a
/// body of this shape, with the answer's own status, is Lago speaking about the records; any
/// other (a gateway's JSON, a proxy's HTML page) is about the way to Lago.
#[derive(Debug, Deserialize)]
struct LagoError {
    status: u16,
    error: String,
    code: Option<String>,
    error_details: Option<Value>,
}

enum Attempt {
    Done(RequestResult),
    Transient {
        reason: String,
        hint: Option<Duration>,
        /// A 5xx other than 503: possibly about this request's events.
        server_error: bool,
    },
}

/// The verdict on one request.
enum RequestResult {
    Delivered,
    Rejected(String),
    Failed(String),
    /// Not delivered, Lago having answered a 5xx other than 503 at every attempt: maybe an
    /// outage, maybe one event of the request that Lago always fails on.
    ServerError(String),
    /// A 422 by index: `Some` = resolved, `None` = not mentioned, to resend.
    Split(Vec<Option<Outcome>>),
}

impl RequestResult {
    fn label(&self) -> &'static str {
        match self {
            RequestResult::Delivered => "delivered",
            RequestResult::Rejected(_) => "rejected",
            RequestResult::Failed(_) => "failed",
            RequestResult::ServerError(_) => "server error",
            RequestResult::Split(_) => "split",
        }
    }
}

/// `{"transaction_id": ["value_already_exist"]}` and nothing else.
fn only_already_exists(errors: &Value) -> bool {
    let Some(map) = errors.as_object() else {
        return false;
    };
    map.len() == 1
        && map
            .get("transaction_id")
            .and_then(Value::as_array)
            .is_some_and(|list| {
                !list.is_empty()
                    && list
                        .iter()
                        .all(|e| e.as_str() == Some("value_already_exist"))
            })
}

/// `field: error, error; field: error` from a per-event error object.
fn describe_errors(errors: &Value) -> String {
    match errors {
        Value::Object(map) => map
            .iter()
            .map(|(field, list)| {
                let list = match list {
                    Value::Array(items) => items
                        .iter()
                        .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_string))
                        .collect::<Vec<_>>()
                        .join(", "),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                format!("{field}: {list}")
            })
            .collect::<Vec<_>>()
            .join("; "),
        Value::String(s) => s.clone(),
        other => snippet(&other.to_string()),
    }
}

/// A JSON string literal.
#[async_trait]
impl Sink for LagoSink {
    fn kind(&self) -> &'static str {
        "lago"
    }

    /// `GET /api/v1/events?external_subscription_id=&code=&timestamp_from=&timestamp_to=`,
    /// page by page (100 a page) until `meta.next_page` is null. Lago's `timestamp_to` is
    /// inclusive (`..timestamp_to`), so the query ends one millisecond before `to`: the sink
    /// sends event times to the millisecond and Lago answers them so (`iso8601(3)`); a query
    /// ending a whole second early missed events of the period's last second. A read whose
    /// `meta.total_count` changed between pages, or that ends short of it, is read again (at
    /// most three times, then an error): the list changed while it was paged.
    async fn read_back(
        &self,
        query: &crate::sinks::ReadBackQuery,
    ) -> Result<Option<Vec<crate::sinks::ReadBackEvent>>, String> {
        let url = format!("{}/api/v1/events", self.base);
        let to = (query.to - chrono::Duration::milliseconds(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        // Lago counts the list again on every page: a count that changed between the pages,
        // or a read that ends short of it, means events were added or removed meanwhile and
        // the offsets shifted (an event read twice, another never). Read it again.
        let mut counts = Vec::new();
        for _ in 0..READ_BACK_PASSES {
            let (events, first, last) = self.read_back_pass(&url, query, &to).await?;
            match (first, last) {
                (Some(first), Some(last)) if first != last || events.len() as u64 != last => {
                    counts.push(format!(
                        "{} read, {first} then {last} counted",
                        events.len()
                    ));
                }
                _ => return Ok(Some(events)),
            }
        }
        Err(format!(
            "sink {}: GET /api/v1/events for {} {}: the list kept changing while it was read ({}); run reconcile again",
            self.name,
            query.subscription,
            query.metric,
            counts.join("; ")
        ))
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        self.batch_size
    }

    /// `{"transaction_id":…,"external_subscription_id":…,"code":…,"timestamp":…,"properties":{…}}`,
    /// compact and in this order; the value property first, then the extra properties sorted,
    /// every value a string. The timestamp is integer seconds, or `"secs.mmm"` when the event
    /// time has a sub-second part (truncated to milliseconds, Lago's precision).
    fn encode(&self, key: &str, event: &MappedEvent) -> Result<String, EncodeError> {
        if key.trim().is_empty() {
            return Err(self.encode_error(key, "the transaction_id (ledger key) is empty"));
        }
        if event.external_subscription_id.trim().is_empty() {
            return Err(self.encode_error(key, "external_subscription_id is empty"));
        }
        if event.metric_code.trim().is_empty() {
            return Err(self.encode_error(key, "the metric code is empty"));
        }
        if event.value_property.trim().is_empty() {
            return Err(self.encode_error(key, "the value property name is empty"));
        }
        if event.properties.contains_key(&event.value_property) {
            return Err(self.encode_error(
                key,
                format!(
                    "extra property {:?} collides with the value property",
                    event.value_property
                ),
            ));
        }
        let secs = event.timestamp.timestamp();
        if secs < 0 {
            return Err(self.encode_error(key, "the timestamp is before 1970"));
        }
        // Lago keeps events in Postgres, whose text and jsonb refuse the NUL character: a
        // request carrying one is answered 500 as a whole, at every retry and every run, and
        // the events batched beside it would never be delivered either. Held here instead.
        let nul = [
            ("transaction_id", key),
            ("external_subscription_id", &*event.external_subscription_id),
            ("code", &*event.metric_code),
        ]
        .into_iter()
        .chain(
            event
                .properties
                .iter()
                .flat_map(|(k, v)| [("a property name", &**k), (&**k, &**v)]),
        )
        .find(|(_, text)| text.contains('\0'));
        if let Some((field, _)) = nul {
            return Err(self.encode_error(
                key,
                format!("{field} holds a NUL character, which Lago cannot store"),
            ));
        }
        // Written in place, strings escaped by serde_json straight into the buffer: one
        // allocation per event instead of one per field.
        use std::io::Write;
        let string = |out: &mut Vec<u8>, s: &str| {
            // Writing a &str as JSON into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, s);
        };
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"transaction_id\":");
        string(&mut out, key);
        out.extend_from_slice(b",\"external_subscription_id\":");
        string(&mut out, &event.external_subscription_id);
        out.extend_from_slice(b",\"code\":");
        string(&mut out, &event.metric_code);
        out.extend_from_slice(b",\"timestamp\":");
        if event.timestamp.timestamp_subsec_nanos() == 0 {
            let _ = write!(out, "{secs}");
        } else {
            let millis = event.timestamp.timestamp_subsec_millis();
            let _ = write!(out, "\"{secs}.{millis:03}\"");
        }
        out.extend_from_slice(b",\"properties\":{");
        string(&mut out, &event.value_property);
        out.push(b':');
        // The value as Lago should read it: a string of plain digits, no exponent, no trailing
        // zeros (`0` for any zero).
        if event.value.is_zero() {
            out.extend_from_slice(b"\"0\"");
        } else {
            let _ = write!(out, "\"{}\"", event.value.normalize());
        }
        // BTreeMap: already sorted by key.
        for (name, value) in &event.properties {
            out.push(b',');
            string(&mut out, name);
            out.push(b':');
            string(&mut out, value);
        }
        out.extend_from_slice(b"}}");
        // Only UTF-8 was written (JSON text of `str`s, ASCII around it).
        String::from_utf8(out).map_err(|_| self.encode_error(key, "the event is not UTF-8"))
    }

    fn throttled(&self) -> u64 {
        self.throttled.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn deliver(&self, batch: &[Outgoing]) -> Result<Vec<Outcome>, SinkStopped> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        // Records still to send, in input order; parts of a split go first, half by half.
        let mut queue: std::collections::VecDeque<Group> = std::collections::VecDeque::new();
        queue.push_back(Group {
            indices: (0..batch.len()).collect(),
            split: None,
        });
        // Requests (or parts of a split) Lago answered 5xx, decided once every part of the
        // same level was sent: a part stored beside them is the evidence Lago is up.
        let mut failed: Vec<(Vec<usize>, String, Option<SplitPart>)> = Vec::new();
        let mut budget = split_budget(batch.len());
        let mut requests = 0usize;
        loop {
            let Some(group) = queue.pop_front() else {
                if failed.is_empty() {
                    break;
                }
                for (request, reason, split) in std::mem::take(&mut failed) {
                    match self.split_failed(&request, split, &mut budget) {
                        Ok((left, right, part)) => {
                            queue.push_back(Group {
                                indices: left,
                                split: Some(part),
                            });
                            queue.push_back(Group {
                                indices: right,
                                split: Some(part),
                            });
                        }
                        Err(why) => {
                            let reason = format!("{reason}{why}");
                            for &i in &request {
                                outcomes[i] = Some(Outcome::Failed(reason.clone()));
                            }
                        }
                    }
                }
                continue;
            };
            if group.indices.is_empty() {
                continue;
            }
            // One request: at most batch_size records, never the same key twice (a repeated
            // key waits for a later request, where Lago reports it as already delivered).
            let mut keys = HashSet::new();
            let mut request = Vec::new();
            let mut later = Vec::new();
            for &i in &group.indices {
                if request.len() < self.batch_size && keys.insert(batch[i].key.as_str()) {
                    request.push(i);
                } else {
                    if request.len() < self.batch_size {
                        tracing::error!(sink = %self.name, "the same key twice in one batch: sending the repeat in a later request");
                    }
                    later.push(i);
                }
            }
            requests += 1;
            let payloads: Vec<&str> = request.iter().map(|&i| batch[i].payload.as_str()).collect();
            tracing::debug!(sink = %self.name, events = request.len(), request = requests, part = group.split.is_some(), "lago batch request");
            let mut unresolved = Vec::new();
            let result = match self.send(&payloads, group.split.is_some()).await {
                Ok(result) => result,
                // What earlier requests settled (a 422 by index, parts of a split) goes with
                // the stop; the rest stays pending.
                Err(stop) => return Err(stop.after(outcomes)),
            };
            if matches!(
                result,
                RequestResult::Delivered | RequestResult::Rejected(_) | RequestResult::Split(_)
            ) {
                self.evidence.saw_lago_answer();
            }
            match result {
                RequestResult::Delivered => {
                    for &i in &request {
                        outcomes[i] = Some(Outcome::Delivered);
                    }
                }
                RequestResult::Rejected(reason) => {
                    for &i in &request {
                        outcomes[i] = Some(Outcome::Rejected(reason.clone()));
                    }
                }
                RequestResult::Failed(reason) => {
                    for &i in &request {
                        outcomes[i] = Some(Outcome::Failed(reason.clone()));
                    }
                }
                RequestResult::ServerError(reason) => failed.push((request, reason, group.split)),
                RequestResult::Split(split) => {
                    let resolved = split.iter().filter(|o| o.is_some()).count();
                    tracing::debug!(
                        sink = %self.name,
                        resolved,
                        resend = request.len() - resolved,
                        "lago rejected the batch by index; resending the rest"
                    );
                    for (pos, outcome) in split.into_iter().enumerate() {
                        match outcome {
                            Some(o) => outcomes[request[pos]] = Some(o),
                            None => unresolved.push(request[pos]),
                        }
                    }
                }
            }
            // Each round resolves at least one record, or sets aside a request Lago failed
            // (split at most down to single records), so this loop ends.
            unresolved.extend(later);
            unresolved.sort_unstable();
            if !unresolved.is_empty() {
                queue.push_front(Group {
                    indices: unresolved,
                    split: group.split,
                });
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::Failed("internal: no outcome".into())))
            .collect())
    }
}
