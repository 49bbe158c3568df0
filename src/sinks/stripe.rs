//! The Stripe Billing meter events sink: `POST {api_url}/v1/billing/meter_events`, or the v2
//! high-throughput meter event stream.
//!
//! How a mapped event becomes a Stripe meter event: a mapping rule that targets a Stripe sink
//! puts the Stripe **customer id** (`cus_…`) where a Lago rule puts the subscription
//! (`external_subscription_id`), and the meter's **`event_name`** where a Lago rule puts the
//! metric code (`metric_code`). The value goes to `payload[value]` (or the meter's own value key,
//! [`StripeConfig::value_property`]); extra properties become `payload[<name>]`.
//!
//! Why it looks the way it does (see `shared/reference/invoicing-systems.md`, 2.1–2.4, 6):
//!
//! - **One frozen form body.** At staging the sink freezes the exact v1 body
//!   (`event_name=…&identifier=<key>&timestamp=<unix seconds>&payload[stripe_customer_id]=…&
//!   payload[value]=…&payload[<extra>]=…`). Every retry resends those bytes with the header
//!   `Idempotency-Key: <key>`; the `identifier` is the same key. Stripe deduplicates on both for
//!   about 24 hours; the ledger is the authority after that. A record whose delivery ended
//!   unclear ([`Outcome::Unclear`]: a timeout, a cut connection, a 408 or 5xx, a 2xx that is not
//!   Stripe's answer; not a refused connection, a 409 or a 429, which Stripe did not run) is
//!   resent by later runs only within 23 hours of that first unclear delivery; after that the
//!   push loop rejects it for a person ([`Sink::dedup_window`]), in both modes.
//! - **Whole-number values only.** Stripe's documentation says meter event values accept whole
//!   numbers only; a fraction would be refused asynchronously (an error report, not an HTTP
//!   error), i.e. silently unbilled. So a non-integer value is an encode error at staging (the
//!   record is held as `unmapped` with the reason): convert to a smaller unit in the mapping.
//!   Integers travel as plain digits (`-3`, `25`), never with an exponent or `.0`.
//! - **Integer timestamps.** Stripe wants Unix seconds; a sub-second event time is truncated
//!   (floored) at staging, so the frozen body never changes.
//! - **The 35-day window is checked before any request.** Stripe refuses events older than 35
//!   days or more than 5 minutes ahead. A record too old is rejected (quarantined in the ledger
//!   with that reason) without being sent; one too early stays pending (failed, with the reason)
//!   and goes out on a later run once its time is inside the window. `billsync status` warns
//!   when pending records approach the 35-day limit.
//! - **Stripe's own clock decides in the end.** Its time window answers are classified by
//!   Stripe's documented meter event error codes, not by their wording: `timestamp_in_future`
//!   (and any refusal of the `timestamp` parameter without a code) only says "not yet" (a clock
//!   ahead of Stripe's, a looser `max_future`): the record stays pending (failed) and is sent
//!   again on a later run; `timestamp_too_far_in_past` is final: the record is rejected with a
//!   reason naming it (Stripe can never take it; bill it another way). The codes are those
//!   Stripe lists for meter event errors (`v1.billing.meter.error_report_triggered`); that the
//!   synchronous v1 answer carries them is not documented, hence the `param` fallback, which
//!   errs on the side of waiting: our own guard rejects the record once it is past `max_age`.
//! - **Duplicates are success, narrowly.** A `2xx` with `Idempotent-Replayed: true` is Stripe
//!   replaying the stored answer of an earlier attempt → already delivered. A 400
//!   `invalid_request_error` whose message says an event *already exists with identifier
//!   `<this key>`* is Stripe's identifier dedup → already delivered (Stripe documents no error
//!   code for it; one about another parameter, or carrying a documented meter event error
//!   code, never counts). Every other 400 is a rejection with Stripe's `error.message`.
//! - **Retries** (shared [`RetryPolicy`], honouring `Retry-After`) only for transport errors,
//!   timeouts, 408/409/429 and 5xx, always with the identical body and key. A 5xx marked
//!   `Idempotent-Replayed` is Stripe replaying a stored failure for this key: retrying within
//!   the run cannot help, so the record stays pending at once. 401/403 stop the sink (records stay
//!   pending); 402/404 with a Stripe error body reject the record, except an unknown URL or
//!   API version (a wrong `api_url` or `api_version`), which stops the sink.
//! - **v1 has no batch endpoint**: one request per record, `concurrency` requests at a time, but
//!   records of the same (customer, event name) are sent one after another, since Stripe allows
//!   one concurrent call per customer per meter.
//! - **v2 stream** (`mode: v2_stream`): a session (`POST {api_url}/v2/billing/meter_event_session`)
//!   yields a short-lived token; events go to `POST {meter_events_url}/v2/billing/meter_event_stream`
//!   as JSON, at most 100 per request, converted deterministically from the frozen form body (so
//!   switching modes needs no re-staging). The session is renewed shortly before `expires_at`
//!   and on a 401 from the stream (e.g. `billing_meter_event_session_expired`), then the same
//!   events are resent. Validation on the stream is asynchronous: a 200 means accepted, not
//!   billed, and duplicates are dropped silently by Stripe (reported here as delivered).
//!   The v2 shapes come from Stripe's documentation (reference 2.3), not from a spec file, and
//!   were checked only against billsync's own simulator.
//! - **Read-back is a total** ([`Sink::read_back_total`], for `reconcile`): Stripe keeps no
//!   readable list of meter events, only what its meters counted. The meter whose `event_name`
//!   is the metric (`GET /v1/billing/meters`, listed once per sink, 100 a page while
//!   `has_more`), then the customer's event summary over the window
//!   (`GET /v1/billing/meters/{id}/event_summaries`, Unix seconds on minute boundaries, end
//!   exclusive), `aggregated_value` read exactly from the JSON number. A meter that does not sum
//!   what this sink sends (another formula, customer key or value key, pre-aggregated) gives an
//!   error, not an incomparable number. Shapes from Stripe's OpenAPI description and API
//!   reference (`GetBillingMeters`, `GetBillingMetersIdEventSummaries`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::BackoffBuilder;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::Secret;
use crate::http::{
    get_text, retry_hint, shown_url, snippet, transport_reason, ReadFailure, RetryPolicy,
};
use crate::mapping::MappedEvent;
use crate::sinks::{
    DedupWindow, EncodeError, Outcome, Outgoing, ReadBackQuery, ReadBackTotal, Sink, SinkStopped,
};

/// The v1 endpoint, below `api_url`.
pub const V1_PATH: &str = "/v1/billing/meter_events";
/// The v2 session endpoint, below `api_url`.
pub const SESSION_PATH: &str = "/v2/billing/meter_event_session";
/// The v2 stream endpoint, below `meter_events_url`.
pub const STREAM_PATH: &str = "/v2/billing/meter_event_stream";
/// Stripe's limit on `identifier` and `event_name`.
pub const MAX_IDENTIFIER: usize = 100;
/// Stripe's limit on a payload value (response schema).
pub const MAX_PAYLOAD_VALUE: usize = 100;
/// Events per v2 stream request.
pub const STREAM_MAX_EVENTS: usize = 100;
/// The payload key of the customer (Stripe's default `customer_mapping.event_payload_key`).
pub const CUSTOMER_KEY: &str = "stripe_customer_id";
/// The records `deliver` accepts at once.
pub const MAX_BATCH: usize = 100;
/// Stripe's meter event error code for an event time more than 5 minutes ahead.
pub const TIMESTAMP_IN_FUTURE: &str = "timestamp_in_future";
/// Stripe's meter event error code for an event time older than 35 days.
pub const TIMESTAMP_TOO_FAR_IN_PAST: &str = "timestamp_too_far_in_past";
/// The error codes Stripe documents for meter events (`v1.billing.meter.error_report_triggered`):
/// each names a fault other than a duplicate identifier.
const METER_EVENT_ERROR_CODES: [&str; 10] = [
    "archived_meter",
    "meter_event_customer_not_found",
    "meter_event_dimension_count_too_high",
    "meter_event_invalid_value",
    "meter_event_no_customer_defined",
    "meter_event_value_too_many_digits",
    "missing_dimension_payload_keys",
    "no_meter",
    TIMESTAMP_IN_FUTURE,
    TIMESTAMP_TOO_FAR_IN_PAST,
];
/// Stripe's deduplication window of an `identifier` (and an `Idempotency-Key`), in hours: at
/// least 24 (see [`Sink::dedup_window`] of [`StripeSink`]).
pub const DEDUP_WINDOW_HOURS: i64 = 24;
/// Hours kept off the end of [`DEDUP_WINDOW_HOURS`] before a record whose delivery ended
/// unclear is held back instead of resent.
pub const DEDUP_MARGIN_HOURS: i64 = 1;
/// Renew a v2 session this long before it expires.
const SESSION_MARGIN: Duration = Duration::from_secs(60);

/// Which Stripe API carries the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StripeMode {
    /// `POST /v1/billing/meter_events`, one request per event, synchronous validation.
    #[default]
    V1,
    /// The v2 meter event stream: session token, 100 events per request, asynchronous validation.
    V2Stream,
}

fn default_api_url() -> String {
    "https://api.stripe.com".into()
}

fn default_meter_events_url() -> String {
    "https://meter-events.stripe.com".into()
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Stripe's limit on an event's age: `max_age` unless set.
pub(crate) fn default_max_age() -> Duration {
    Duration::from_secs(35 * 86_400)
}

fn default_max_future() -> Duration {
    Duration::from_secs(5 * 60)
}

fn default_value_property() -> String {
    "value".into()
}

/// The default number of v1 requests in flight.
pub const DEFAULT_CONCURRENCY: usize = 4;

/// Settings of one Stripe sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeConfig {
    /// Base URL of the Stripe API. Default `https://api.stripe.com`.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// The secret key (`sk_…`, or a restricted `rk_…` key with write access to meter events),
    /// as `env:NAME` or `file:/path`; sent as `Authorization: Bearer …`.
    pub api_key: Secret,
    /// `v1` (default) or `v2_stream`.
    #[serde(default)]
    pub mode: StripeMode,
    /// Host of the v2 meter event stream. Default `https://meter-events.stripe.com`.
    #[serde(default = "default_meter_events_url")]
    pub meter_events_url: String,
    /// v1 requests in flight at once (1 to 64). Default 4.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Timeout of one HTTP request, e.g. `30s`. Default 30 seconds.
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    /// Retries of transient failures (transport errors, timeouts, 409, 429, 5xx).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Oldest event time sent, relative to now. Default `35d` (Stripe's limit); older records
    /// are rejected without a request.
    #[serde(default = "default_max_age", with = "crate::config::duration")]
    pub max_age: Duration,
    /// Latest event time sent, relative to now. Default `5m` (Stripe's limit).
    #[serde(default = "default_max_future", with = "crate::config::duration")]
    pub max_future: Duration,
    /// The payload key of the value: the meter's `value_settings.event_payload_key`. Default
    /// `value`. (The mapping rule's `property` is not used by this sink.)
    #[serde(default = "default_value_property")]
    pub value_property: String,
    /// Optional `Stripe-Version` header on every request (e.g. `2026-07-29.dahlia`). Without it
    /// the account's default API version applies.
    #[serde(default)]
    pub api_version: Option<String>,
}

impl StripeConfig {
    /// A configuration with every default, for tests and simulators.
    pub fn new(api_url: impl Into<String>, api_key: Secret) -> Self {
        StripeConfig {
            api_url: api_url.into(),
            api_key,
            mode: StripeMode::V1,
            meter_events_url: default_meter_events_url(),
            concurrency: None,
            timeout: default_timeout(),
            retry: RetryPolicy::default(),
            max_age: default_max_age(),
            max_future: default_max_future(),
            value_property: default_value_property(),
            api_version: None,
        }
    }
}

/// A Stripe sink configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("sink {sink}: {message}")]
pub struct StripeConfigError {
    /// The sink name.
    pub sink: String,
    /// What is wrong.
    pub message: String,
}

/// The v2 session currently in use.
#[derive(Debug, Clone)]
struct Session {
    token: Secret,
    expires_at: DateTime<Utc>,
}

/// Delivers frozen meter events to Stripe.
#[derive(Debug)]
pub struct StripeSink {
    name: String,
    endpoint: String,
    session_url: String,
    stream_url: String,
    api_key: Secret,
    api_version: Option<String>,
    mode: StripeMode,
    concurrency: usize,
    retry: RetryPolicy,
    max_age: chrono::Duration,
    max_future: chrono::Duration,
    value_property: String,
    client: reqwest::Client,
    session: tokio::sync::Mutex<Option<Session>>,
    /// `api_url` without trailing slash (read-back: meters and their event summaries).
    api: String,
    /// The account's meters, listed once per sink for read-back.
    meters: tokio::sync::Mutex<Option<Vec<Meter>>>,
    /// 429 answers so far (see [`Sink::throttled`]).
    throttled: std::sync::atomic::AtomicU64,
}

/// Check a base URL: absolute http(s), host, no query; returned without trailing slash.
fn base_url(sink: &str, field: &str, url: &str) -> Result<String, StripeConfigError> {
    let base = url.trim().trim_end_matches('/').to_string();
    let err = |m: String| StripeConfigError {
        sink: sink.to_string(),
        // The URL may carry credentials: shown without them.
        message: format!("{field} {:?} {m}", shown_url(url.trim())),
    };
    let parsed = reqwest::Url::parse(&base).map_err(|e| err(format!("is not a valid URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(err("must be an http:// or https:// URL with a host".into()));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(err("must not carry a query or fragment".into()));
    }
    if base.ends_with("/v1") || base.ends_with("/v2") {
        return Err(err(
            "must be the base URL without /v1 or /v2 (the sink appends the paths)".into(),
        ));
    }
    Ok(base)
}

impl StripeSink {
    /// Count a 429: the pipeline halves the batches it keeps in flight when this grows
    /// (Stripe limits meter events per account and per customer and meter at a time).
    fn count_throttled(&self, code: u16) {
        if code == 429 {
            self.throttled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Check the configuration and build the sink (no network access).
    pub fn new(name: String, config: StripeConfig) -> Result<Self, StripeConfigError> {
        let fail = |message: String| StripeConfigError {
            sink: name.clone(),
            message,
        };
        let concurrency = config.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        if !(1..=64).contains(&concurrency) {
            return Err(fail(format!(
                "concurrency must be between 1 and 64, got {concurrency}"
            )));
        }
        if config.timeout.is_zero() {
            return Err(fail("timeout must be greater than zero".into()));
        }
        if config.api_key.expose().starts_with("pk_") {
            return Err(fail(
                "api_key is a publishable key (pk_…): meter events need a secret key (sk_…) or a restricted key (rk_…)".into(),
            ));
        }
        let value_property = config.value_property.trim().to_string();
        if value_property.is_empty() || value_property == CUSTOMER_KEY {
            return Err(fail(format!(
                "value_property must be a payload key other than {CUSTOMER_KEY}, got {:?}",
                config.value_property
            )));
        }
        if value_property.contains(['[', ']']) {
            return Err(fail("value_property must not contain brackets".into()));
        }
        let max_age = chrono::Duration::from_std(config.max_age)
            .map_err(|_| fail("max_age is too large".into()))?;
        let max_future = chrono::Duration::from_std(config.max_future)
            .map_err(|_| fail("max_future is too large".into()))?;
        let api = base_url(&name, "api_url", &config.api_url)?;
        let stream = base_url(&name, "meter_events_url", &config.meter_events_url)?;
        // Like the Lago sink: no redirects (a redirected POST becomes a GET without body).
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("billsync/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| fail(format!("cannot build the HTTP client: {e}")))?;
        Ok(StripeSink {
            endpoint: format!("{api}{V1_PATH}"),
            session_url: format!("{api}{SESSION_PATH}"),
            stream_url: format!("{stream}{STREAM_PATH}"),
            api_key: config.api_key,
            api_version: config.api_version,
            mode: config.mode,
            concurrency,
            retry: config.retry,
            max_age,
            max_future,
            value_property,
            client,
            session: tokio::sync::Mutex::new(None),
            api,
            meters: tokio::sync::Mutex::new(None),
            throttled: std::sync::atomic::AtomicU64::new(0),
            name,
        })
    }

    /// The v1 URL events are posted to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The mode in use.
    pub fn mode(&self) -> StripeMode {
        self.mode
    }

    /// The oldest event age this sink sends (Stripe's 35 days by default).
    pub fn max_age(&self) -> chrono::Duration {
        self.max_age
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

    fn request(&self, url: &str, bearer: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .client
            .post(url)
            .bearer_auth(bearer)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(v) = &self.api_version {
            r = r.header("Stripe-Version", v);
        }
        r
    }

    /// The time guard: `Some(outcome)` if Stripe would refuse this event time now. Too old is
    /// for good (rejected); too early only for now: the record stays pending (failed) and goes
    /// out on a later run, once its time is inside the window.
    fn out_of_window(&self, timestamp: i64, now: DateTime<Utc>) -> Option<Outcome> {
        let when = Utc.timestamp_opt(timestamp, 0).single()?;
        let shown = when.to_rfc3339_opts(SecondsFormat::Secs, true);
        if when < now - self.max_age {
            let age = now - when;
            return Some(Outcome::Rejected(format!(
                "Stripe refuses meter events older than {} (timestamp {shown} is {} days old)",
                human(self.max_age),
                age.num_days()
            )));
        }
        if when > now + self.max_future {
            let ahead = when - now;
            return Some(Outcome::Failed(format!(
                "Stripe refuses meter events more than {} in the future (timestamp {shown} is {} ahead); kept pending until then",
                human(self.max_future),
                human(ahead)
            )));
        }
        None
    }

    /// Parse and check each record before any request: `Err(outcome)` settles it at once.
    fn prepare(&self, batch: &[Outgoing]) -> Vec<Result<FormEvent, Outcome>> {
        let now = Utc::now();
        batch
            .iter()
            .map(|out| {
                let event = FormEvent::parse(&out.payload).map_err(|e| {
                    Outcome::Rejected(format!("stored Stripe payload is unreadable: {e}"))
                })?;
                if event.identifier != out.key {
                    return Err(Outcome::Rejected(format!(
                        "stored Stripe payload has identifier {:?}, not the record key",
                        event.identifier
                    )));
                }
                if let Some(outcome) = self.out_of_window(event.timestamp, now) {
                    tracing::warn!(sink = %self.name, key = %out.key, ?outcome, "meter event outside Stripe's time window; not sent");
                    return Err(outcome);
                }
                Ok(event)
            })
            .collect()
    }

    // --- v1 -------------------------------------------------------------------------------

    async fn deliver_v1(&self, batch: &[Outgoing]) -> Result<Vec<Outcome>, SinkStopped> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        // Lanes: records of one (customer, event name) go one after another.
        let mut lanes: Vec<Vec<usize>> = Vec::new();
        let mut lane_of: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (i, prepared) in self.prepare(batch).into_iter().enumerate() {
            match prepared {
                Err(o) => outcomes[i] = Some(o),
                Ok(e) => {
                    let lane = *lane_of
                        .entry((e.customer().to_string(), e.event_name.clone()))
                        .or_insert_with(|| {
                            lanes.push(Vec::new());
                            lanes.len() - 1
                        });
                    lanes[lane].push(i);
                }
            }
        }
        let stop = AtomicBool::new(false);
        let stop_reason = std::sync::Mutex::new(None::<String>);
        let results: Vec<Vec<(usize, Outcome)>> = futures_util::stream::iter(lanes)
            .map(|lane| {
                let stop = &stop;
                let stop_reason = &stop_reason;
                async move {
                    let mut done = Vec::with_capacity(lane.len());
                    for i in lane {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        match self.send_v1(&batch[i]).await {
                            V1::Outcome(o) => done.push((i, o)),
                            V1::Stop(reason, settled) => {
                                // An earlier attempt of this record may have reached Stripe:
                                // recorded with the stop (see `send_v1`).
                                done.extend(settled.map(|o| (i, o)));
                                stop.store(true, Ordering::SeqCst);
                                let mut r = stop_reason.lock().unwrap_or_else(|e| e.into_inner());
                                r.get_or_insert(reason);
                                break;
                            }
                        }
                    }
                    done
                }
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for (i, o) in results.into_iter().flatten() {
            outcomes[i] = Some(o);
        }
        let reason = stop_reason.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(reason) = reason {
            // Records of this batch settled before the refusal go with the stop, so the ledger
            // records them now (resending them after Stripe's 24 h dedup window would bill
            // twice); the rest stays pending.
            return Err(self.stopped(reason).after(outcomes));
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::Failed("internal: no outcome".into())))
            .collect())
    }

    /// One record through v1, retrying transient failures with the same bytes and key.
    ///
    /// A record not delivered in the end is [`Outcome::Unclear`] when any of its attempts may
    /// have reached Stripe ([`Attempt::Transient::unclear`]): the ledger keeps when, since
    /// Stripe deduplicates its `identifier` only for about 24 hours ([`Sink::dedup_window`]).
    /// A stop after such an attempt carries that outcome, so it is recorded all the same.
    async fn send_v1(&self, out: &Outgoing) -> V1 {
        let mut delays = self.retry.backoff().build();
        let mut attempt = 0usize;
        let mut unclear = false;
        loop {
            attempt += 1;
            let started = Instant::now();
            let (reason, hint) = match self.attempt_v1(out).await {
                Attempt::Done(v) => {
                    tracing::debug!(sink = %self.name, key = %out.key, attempt,
                        elapsed_ms = started.elapsed().as_millis() as u64, "stripe meter event request done");
                    return match v {
                        V1::Outcome(Outcome::Failed(reason)) if unclear => {
                            V1::Outcome(Outcome::Unclear(format!(
                                "{reason} (an earlier attempt may have reached Stripe)"
                            )))
                        }
                        V1::Stop(reason, None) if unclear => V1::Stop(
                            reason,
                            Some(Outcome::Unclear(format!(
                                "the sink stopped after an attempt that may have reached Stripe (attempt {attempt})"
                            ))),
                        ),
                        v => v,
                    };
                }
                Attempt::Transient {
                    reason,
                    hint,
                    unclear: maybe_taken,
                } => {
                    unclear |= maybe_taken;
                    (reason, hint)
                }
            };
            match self.retry.with_hint(delays.next(), hint) {
                Some(wait) => {
                    tracing::warn!(sink = %self.name, key = %out.key, attempt,
                        wait_ms = wait.as_millis() as u64, %reason,
                        "stripe meter event failed, retrying with the same body and Idempotency-Key");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    tracing::warn!(sink = %self.name, key = %out.key, attempt, %reason,
                        "stripe meter event failed, retries exhausted; the record stays pending");
                    let reason = format!("{reason} (gave up after {attempt} attempts)");
                    return V1::Outcome(if unclear {
                        Outcome::Unclear(reason)
                    } else {
                        Outcome::Failed(reason)
                    });
                }
            }
        }
    }

    async fn attempt_v1(&self, out: &Outgoing) -> Attempt<V1> {
        let response = self
            .request(&self.endpoint, self.api_key.expose())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header("Idempotency-Key", &out.key)
            .body(out.payload.clone())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Transient {
                    reason: transport_reason(&e),
                    hint: None,
                    unclear: maybe_sent(&e),
                }
            }
        };
        let status = response.status();
        let code = status.as_u16();
        let hint = retry_hint(status, response.headers());
        let replayed = header_is_true(response.headers(), "idempotent-replayed");
        let text = match response.text().await {
            Ok(t) => t,
            Err(e) => {
                // The answer was cut: Stripe may have stored the event; resending is safe.
                return Attempt::Transient {
                    reason: format!(
                        "HTTP {code}, reading the answer failed: {}",
                        transport_reason(&e)
                    ),
                    hint,
                    unclear: true,
                };
            }
        };
        let error = StripeError::parse(&text);
        // Stripe's verdict on the address or the API version, not on the record.
        let configuration = error
            .as_ref()
            .and_then(|e| Some((e.describe(), e.configuration_problem()?)));
        let verdict = match code {
            // A 2xx that is not Stripe's meter event for this record (a proxy's page, a wrong
            // host) is no proof of delivery: the record stays pending, resent with its key.
            // Unclear: whatever answered may have passed the request on to Stripe.
            200..=299 if !is_meter_event_for(&text, &out.key) => {
                V1::Outcome(Outcome::Unclear(format!(
                    "HTTP {code} but the answer is not Stripe's meter event {} (a proxy or a wrong api_url?): {}",
                    out.key,
                    snippet(&text)
                )))
            }
            200..=299 if replayed => V1::Outcome(Outcome::AlreadyDelivered),
            200..=299 => V1::Outcome(Outcome::Delivered),
            400 | 402 | 404 if configuration.is_some() => {
                let (described, check) = configuration.unwrap_or_default();
                V1::Stop(
                    format!("Stripe answered {code}: {described} ({check}); records stay pending"),
                    None,
                )
            }
            400 => match &error {
                Some(e) if e.is_identifier_duplicate(&out.key) => {
                    V1::Outcome(Outcome::AlreadyDelivered)
                }
                Some(e) if e.time_window().is_some() => {
                    V1::Outcome(self.time_window_outcome(&out.key, e))
                }
                Some(e) if e.kind.as_deref() == Some("idempotency_error") => {
                    V1::Outcome(Outcome::Rejected(format!(
                        "Stripe refused the Idempotency-Key (used earlier with other parameters): {}",
                        e.describe()
                    )))
                }
                Some(e) => V1::Outcome(Outcome::RejectedNotStored(format!(
                    "Stripe answered 400: {}",
                    e.describe()
                ))),
                None => V1::Outcome(Outcome::Rejected(format!(
                    "Stripe answered 400: {}",
                    snippet(&text)
                ))),
            },
            401 => V1::Stop(
                format!(
                    "Stripe refused the API key (401{}): check api_key; records stay pending",
                    error.as_ref().map(|e| format!(": {}", e.describe())).unwrap_or_default()
                ),
                None,
            ),
            403 => V1::Stop(
                format!(
                    "the API key may not create meter events (403{}): use a key with that permission; records stay pending",
                    error.as_ref().map(|e| format!(": {}", e.describe())).unwrap_or_default()
                ),
                None,
            ),
            402 | 404 => match &error {
                Some(e) => V1::Outcome(Outcome::RejectedNotStored(format!(
                    "Stripe answered {code}: {}",
                    e.describe()
                ))),
                // A 404 without a Stripe error body is the wrong host or path, not the record.
                None => V1::Stop(
                    format!(
                        "{} answered {code} without a Stripe error: check api_url; records stay pending",
                        self.endpoint
                    ),
                    None,
                ),
            },
            // Stripe saves an answer once it started on the request: whether the event was
            // stored before the failure cannot be told, and the key replays that answer until
            // Stripe prunes it (after 24 h), when the record is held back for a person.
            500..=599 if replayed => V1::Outcome(Outcome::Unclear(format!(
                "Stripe replays a stored HTTP {code} for this Idempotency-Key (it may or may not hold the event): {}",
                snippet(&text)
            ))),
            // 409 (the same key in use by another request) and 429 (rate limited): Stripe did
            // not run this request. A 5xx, or a 408 from whichever hop timed out, may come
            // after Stripe stored the event (it saves even a 500 once it started on a request).
            408 | 409 | 429 | 500..=599 => {
                self.count_throttled(code);
                return Attempt::Transient {
                    reason: format!("HTTP {code}: {}", snippet(&text)),
                    hint,
                    unclear: !matches!(code, 409 | 429),
                };
            }
            // Unexpected: keep the record pending rather than quarantine it.
            _ => V1::Outcome(Outcome::Failed(format!(
                "unexpected HTTP {code}: {}",
                snippet(&text)
            ))),
        };
        Attempt::Done(verdict)
    }

    /// Stripe refused the event time: too old is final, anything else waits for a later run.
    fn time_window_outcome(&self, key: &str, e: &StripeError) -> Outcome {
        let described = e.describe();
        match e.time_window() {
            Some(TimeWindow::TooOld) => {
                tracing::warn!(sink = %self.name, %key, error = %described,
                    "Stripe refuses the record as older than its window; it can never be sent to Stripe");
                Outcome::Rejected(format!(
                    "Stripe refused record {key} for good: its timestamp is older than Stripe accepts (the past 35 calendar days), so it can never be billed through Stripe: {described}"
                ))
            }
            _ => {
                tracing::warn!(sink = %self.name, %key, error = %described,
                    "Stripe refused the record's time for now; it stays pending");
                Outcome::Failed(format!(
                    "Stripe refused the timestamp for now (not yet inside its window, or the clocks differ); kept pending and sent again on a later run: {described}"
                ))
            }
        }
    }

    // --- v2 stream ------------------------------------------------------------------------

    async fn deliver_v2(&self, batch: &[Outgoing]) -> Result<Vec<Outcome>, SinkStopped> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut ready: Vec<(usize, Value)> = Vec::new();
        for (i, prepared) in self.prepare(batch).into_iter().enumerate() {
            match prepared {
                Err(o) => outcomes[i] = Some(o),
                Ok(e) => ready.push((i, e.to_stream_json())),
            }
        }
        for chunk in ready.chunks(STREAM_MAX_EVENTS) {
            // Outcomes settled before a stop (events resent one by one, and earlier chunks) go
            // with it: they reached Stripe, and left pending they would be billed twice after
            // its 24 h window.
            let (list, stop) = self.send_stream(chunk).await;
            for (i, o) in list {
                outcomes[i] = Some(o);
            }
            if let Some(stop) = stop {
                return Err(stop.after(outcomes));
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::Failed("internal: no outcome".into())))
            .collect())
    }

    /// One stream request (≤ 100 events). A 400 on several events is resent event by event,
    /// so one malformed event does not quarantine the others. Returns the outcomes settled, and
    /// the stop if the sink stopped: events resent one by one before it keep their outcome.
    async fn send_stream(
        &self,
        events: &[(usize, Value)],
    ) -> (Vec<(usize, Outcome)>, Option<SinkStopped>) {
        let list: Vec<Value> = events.iter().map(|(_, e)| e.clone()).collect();
        let body = serde_json::json!({ "events": list }).to_string();
        let mut unclear = false;
        let result = match self.stream_request(&body, &mut unclear).await {
            Ok(r) => r,
            // An earlier attempt may have reached Stripe: its events are recorded as unclear
            // with the stop, the time kept (see `Sink::dedup_window`).
            Err(stop) if unclear => {
                let reason = format!(
                    "the sink stopped after a stream request that may have reached Stripe: {}",
                    stop.message
                );
                return (
                    events
                        .iter()
                        .map(|(i, _)| (*i, Outcome::Unclear(reason.clone())))
                        .collect(),
                    Some(stop),
                );
            }
            Err(stop) => return (Vec::new(), Some(stop)),
        };
        let result = match result {
            StreamResult::Failed(reason) if unclear => StreamResult::Unclear(reason),
            r => r,
        };
        match result {
            StreamResult::Accepted => (
                events
                    .iter()
                    .map(|(i, _)| (*i, Outcome::Delivered))
                    .collect(),
                None,
            ),
            StreamResult::Failed(reason) => (
                events
                    .iter()
                    .map(|(i, _)| (*i, Outcome::Failed(reason.clone())))
                    .collect(),
                None,
            ),
            StreamResult::Unclear(reason) => (
                events
                    .iter()
                    .map(|(i, _)| (*i, Outcome::Unclear(reason.clone())))
                    .collect(),
                None,
            ),
            StreamResult::Rejected(reason) if events.len() == 1 => {
                (vec![(events[0].0, Outcome::Rejected(reason))], None)
            }
            StreamResult::Rejected(reason) => {
                tracing::warn!(sink = %self.name, events = events.len(), %reason,
                    "stripe stream refused a request; resending its events one by one");
                let mut out = Vec::with_capacity(events.len());
                for one in events {
                    let (done, stop) = Box::pin(self.send_stream(std::slice::from_ref(one))).await;
                    out.extend(done);
                    if stop.is_some() {
                        return (out, stop);
                    }
                }
                (out, None)
            }
        }
    }

    /// POST one stream body, renewing the session when needed, retrying transient failures.
    /// `unclear` is set when an attempt may have reached Stripe (a timeout, a cut connection, a
    /// 408 or 5xx; not a refused connection, a 409 or a 429).
    async fn stream_request(
        &self,
        body: &str,
        unclear: &mut bool,
    ) -> Result<StreamResult, SinkStopped> {
        let mut delays = self.retry.backoff().build();
        let mut attempt = 0usize;
        let mut renewals = 0usize;
        loop {
            attempt += 1;
            let token = match self.session(false).await? {
                Ok(t) => t,
                Err(reason) => return Ok(StreamResult::Failed(reason)),
            };
            let response = self
                .request(&self.stream_url, token.expose())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            let (reason, hint) = match response {
                Err(e) => {
                    *unclear |= maybe_sent(&e);
                    (transport_reason(&e), None)
                }
                Ok(response) => {
                    let code = response.status().as_u16();
                    let hint = retry_hint(response.status(), response.headers());
                    let text = response.text().await.unwrap_or_default();
                    let error = StripeError::parse(&text);
                    match code {
                        200..=299 => return Ok(StreamResult::Accepted),
                        401 if renewals < 2 => {
                            // Expired session (`billing_meter_event_session_expired`, or the
                            // SDKs' `temporary_session_expired`) or a token Stripe no longer
                            // knows: a new session, then the same events again.
                            renewals += 1;
                            tracing::info!(sink = %self.name, error = %error.as_ref().map(StripeError::describe).unwrap_or_default(),
                                "stripe stream session refused; creating a new session");
                            *self.session.lock().await = None;
                            continue;
                        }
                        401 | 403 => {
                            return Err(self.stopped(format!(
                                "the meter event stream refused new session tokens ({code}{}); records stay pending",
                                error.as_ref().map(|e| format!(": {}", e.describe())).unwrap_or_default()
                            )))
                        }
                        400 | 402 | 404 | 422 => match &error {
                            Some(e) if e.configuration_problem().is_some() => {
                                return Err(self.stopped(format!(
                                    "Stripe stream answered {code}: {} ({}); records stay pending",
                                    e.describe(),
                                    e.configuration_problem().unwrap_or_default()
                                )))
                            }
                            Some(e) => {
                                return Ok(StreamResult::Rejected(format!(
                                    "Stripe stream answered {code}: {}",
                                    e.describe()
                                )))
                            }
                            None => {
                                return Err(self.stopped(format!(
                                    "{} answered {code} without a Stripe error: check meter_events_url; records stay pending",
                                    self.stream_url
                                )))
                            }
                        },
                        408 | 409 | 429 | 500..=599 => {
                            // As in v1 (`attempt_v1`): only a 409 or 429 says Stripe did not
                            // take the events.
                            *unclear |= !matches!(code, 409 | 429);
                            self.count_throttled(code);
                            (format!("HTTP {code}: {}", snippet(&text)), hint)
                        }
                        _ => {
                            return Ok(StreamResult::Failed(format!(
                                "unexpected HTTP {code}: {}",
                                snippet(&text)
                            )))
                        }
                    }
                }
            };
            match self.retry.with_hint(delays.next(), hint) {
                Some(wait) => {
                    tracing::warn!(sink = %self.name, attempt, wait_ms = wait.as_millis() as u64, %reason,
                        "stripe stream request failed, retrying the same events");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    return Ok(StreamResult::Failed(format!(
                        "{reason} (gave up after {attempt} attempts)"
                    )))
                }
            }
        }
    }

    /// The current session token, created or renewed when missing or about to expire.
    /// `Ok(Err(reason))`: a transient failure creating it, retries exhausted.
    async fn session(&self, force: bool) -> Result<Result<Secret, String>, SinkStopped> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            let margin = chrono::Duration::from_std(SESSION_MARGIN).unwrap_or_default();
            if !force && s.expires_at - margin > Utc::now() {
                return Ok(Ok(s.token.clone()));
            }
        }
        let mut delays = self.retry.backoff().build();
        let mut attempt = 0usize;
        loop {
            attempt += 1;
            let response = self
                .request(&self.session_url, self.api_key.expose())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body("{}")
                .send()
                .await;
            let (reason, hint) = match response {
                Err(e) => (transport_reason(&e), None),
                Ok(response) => {
                    let code = response.status().as_u16();
                    let hint = retry_hint(response.status(), response.headers());
                    let text = response.text().await.unwrap_or_default();
                    match code {
                        200..=299 => {
                            let s = parse_session(&text).map_err(|m| {
                                self.stopped(format!("meter event session answer unreadable: {m}"))
                            })?;
                            tracing::debug!(sink = %self.name, expires_at = %s.expires_at, "stripe meter event session created");
                            let token = s.token.clone();
                            *guard = Some(s);
                            return Ok(Ok(token));
                        }
                        408 | 409 | 429 | 500..=599 => {
                            self.count_throttled(code);
                            (format!("HTTP {code}: {}", snippet(&text)), hint)
                        }
                        401 => {
                            return Err(self.stopped(
                                "Stripe refused the API key creating a meter event session (401): check api_key; records stay pending",
                            ))
                        }
                        _ => {
                            let detail = StripeError::parse(&text)
                                .map(|e| e.describe())
                                .unwrap_or_else(|| snippet(&text));
                            return Err(self.stopped(format!(
                                "cannot create a meter event session ({code}: {detail}); check api_url, api_version and the key's permissions; records stay pending"
                            )));
                        }
                    }
                }
            };
            match self.retry.with_hint(delays.next(), hint) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => {
                    return Ok(Err(format!(
                    "creating a meter event session: {reason} (gave up after {attempt} attempts)"
                )))
                }
            }
        }
    }
}

// --- read-back ----------------------------------------------------------------------------

/// The meters list, below `api_url`.
pub const METERS_PATH: &str = "/v1/billing/meters";
/// Objects per page of Stripe's list endpoints (its maximum).
const LIST_LIMIT: &str = "100";
/// Pages read of one list before giving up (10,000 objects: a loop, not a real account).
const MAX_PAGES: usize = 100;

/// What read-back needs of a `billing.meter`.
#[derive(Debug, Clone, Deserialize)]
struct Meter {
    id: String,
    event_name: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    default_aggregation: Option<MeterAggregation>,
    #[serde(default)]
    customer_mapping: Option<MeterKey>,
    #[serde(default)]
    value_settings: Option<MeterKey>,
    #[serde(default)]
    event_time_window: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct MeterAggregation {
    formula: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct MeterKey {
    event_payload_key: Option<String>,
}

/// One page of a Stripe list: `{"object":"list","data":[…],"has_more":…}`.
#[derive(Debug, Deserialize)]
struct ListPage {
    data: Vec<Value>,
    has_more: bool,
}

/// A JSON number as an exact decimal (this crate's `serde_json` keeps a number's text:
/// `arbitrary_precision`), never through `f64`.
fn exact_number(v: &Value) -> Option<rust_decimal::Decimal> {
    let Value::Number(n) = v else {
        return None;
    };
    crate::record::exact_decimal(&n.to_string())
}

impl StripeSink {
    /// One page of a read-only Stripe list, retried like the Lago read-back (transport
    /// errors, timeouts, 408, 429, 5xx); any other answer is an error naming Stripe's.
    async fn read_page(&self, path: &str, params: &[(&str, &str)]) -> Result<ListPage, String> {
        let url = format!("{}{path}", self.api);
        let request = || {
            let mut r = self
                .client
                .get(&url)
                .bearer_auth(self.api_key.expose())
                .header(reqwest::header::ACCEPT, "application/json")
                .query(params);
            if let Some(v) = &self.api_version {
                r = r.header("Stripe-Version", v);
            }
            r
        };
        let what = format!("sink {}: stripe read-back", self.name);
        let text =
            get_text(request, &self.retry, &what)
                .await
                .map_err(|failure| match failure {
                    ReadFailure::Answered { status, body } => {
                        let detail = StripeError::parse(&body)
                            .map(|e| e.describe())
                            .unwrap_or(body);
                        format!(
                            "sink {}: GET {path} answered HTTP {status}: {detail}",
                            self.name
                        )
                    }
                    ReadFailure::GaveUp { reason, attempts } => format!(
                        "sink {}: GET {path}: {reason} (gave up after {attempts} attempts)",
                        self.name
                    ),
                })?;
        serde_json::from_str::<ListPage>(&text).map_err(|e| {
            format!(
                "sink {}: GET {path}: not a Stripe list ({e}): {}",
                self.name,
                snippet(&text)
            )
        })
    }

    /// Every meter of the account (`GET /v1/billing/meters`, 100 a page, `starting_after`
    /// the last id while `has_more`), read once per sink.
    async fn meters(&self) -> Result<Vec<Meter>, String> {
        let mut cache = self.meters.lock().await;
        if let Some(m) = cache.as_ref() {
            return Ok(m.clone());
        }
        let mut out: Vec<Meter> = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut params = vec![("limit", LIST_LIMIT)];
            if let Some(a) = after.as_deref() {
                params.push(("starting_after", a));
            }
            let page = self.read_page(METERS_PATH, &params).await?;
            let before = out.len();
            for m in page.data {
                out.push(serde_json::from_value::<Meter>(m).map_err(|e| {
                    format!(
                        "sink {}: GET {METERS_PATH}: unreadable meter: {e}",
                        self.name
                    )
                })?);
            }
            let last = out[before..].last().map(|m| m.id.clone());
            match (page.has_more, last) {
                (true, Some(last)) => after = Some(last),
                // `has_more` with an empty page would ask for the same page again.
                _ => {
                    *cache = Some(out.clone());
                    return Ok(out);
                }
            }
        }
        Err(format!(
            "sink {}: GET {METERS_PATH}: more than {MAX_PAGES} pages of meters",
            self.name
        ))
    }

    /// The meter whose `event_name` is `metric`, checked to count what the sink sends: summed
    /// values of the sink's value key, per customer by `stripe_customer_id`, not pre-aggregated.
    /// An active meter is preferred over inactive ones of the same name. `None`: no meter has
    /// that name.
    async fn meter_for(&self, metric: &str) -> Result<Option<Meter>, String> {
        let meters = self.meters().await?;
        let named: Vec<&Meter> = meters.iter().filter(|m| m.event_name == metric).collect();
        let active: Vec<&Meter> = named
            .iter()
            .copied()
            .filter(|m| m.status.as_deref() != Some("inactive"))
            .collect();
        let meter = match (active.as_slice(), named.as_slice()) {
            ([one], _) => *one,
            ([], [one]) => *one,
            ([], []) => return Ok(None),
            (list, all) => {
                let ids: Vec<&str> = if list.is_empty() { all } else { list }
                    .iter()
                    .map(|m| m.id.as_str())
                    .collect();
                return Err(format!(
                    "sink {}: several Stripe meters have event_name {metric:?} ({}): cannot tell which one bills these events",
                    self.name,
                    ids.join(", ")
                ));
            }
        };
        let formula = meter
            .default_aggregation
            .as_ref()
            .and_then(|a| a.formula.as_deref())
            .unwrap_or("");
        let customer_key = meter
            .customer_mapping
            .as_ref()
            .and_then(|k| k.event_payload_key.as_deref())
            .unwrap_or(CUSTOMER_KEY);
        let value_key = meter
            .value_settings
            .as_ref()
            .and_then(|k| k.event_payload_key.as_deref())
            .unwrap_or("value");
        let unlike = |what: String| {
            Err(format!(
                "sink {}: Stripe meter {} ({metric}) {what}: its summaries do not count what billsync sends, so they cannot be compared",
                self.name, meter.id
            ))
        };
        if formula != "sum" {
            return unlike(format!("aggregates with {formula:?}, not \"sum\""));
        }
        if customer_key != CUSTOMER_KEY {
            return unlike(format!(
                "maps customers by payload key {customer_key:?}, the sink sends {CUSTOMER_KEY:?}"
            ));
        }
        if value_key != self.value_property {
            return unlike(format!(
                "reads the value from payload key {value_key:?}, the sink sends {:?} (value_property)",
                self.value_property
            ));
        }
        if let Some(window) = meter.event_time_window.as_deref() {
            return unlike(format!(
                "is pre-aggregated per {window} (event_time_window: only the last event of each {window} counts)"
            ));
        }
        Ok(Some(meter.clone()))
    }
}

enum Attempt<T> {
    Done(T),
    Transient {
        reason: String,
        hint: Option<Duration>,
        /// Stripe may have stored the event (a timeout, a cut answer, a 5xx), unlike a
        /// refused connection, a 409 or a 429.
        unclear: bool,
    },
}

/// The verdict on one v1 record.
enum V1 {
    Outcome(Outcome),
    /// Stop the sink; with the record's outcome when an earlier attempt may have reached
    /// Stripe ([`Outcome::Unclear`]), else it stays pending as it was.
    Stop(String, Option<Outcome>),
}

enum StreamResult {
    Accepted,
    Rejected(String),
    Failed(String),
    /// Not accepted, and an attempt may have reached Stripe.
    Unclear(String),
}

/// Which side of Stripe's time window an answer refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeWindow {
    /// `timestamp_too_far_in_past`: never acceptable.
    TooOld,
    /// `timestamp_in_future`: acceptable later.
    TooEarly,
    /// The `timestamp` parameter refused without either code: time-dependent, so it waits.
    Unspecified,
}

/// `{"error": {"type", "code", "message", "param"}}`.
#[derive(Debug, Deserialize)]
struct StripeError {
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<String>,
    message: Option<String>,
    param: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorEnvelope {
    error: StripeError,
}

impl StripeError {
    fn parse(text: &str) -> Option<StripeError> {
        serde_json::from_str::<ErrorEnvelope>(text)
            .ok()
            .map(|e| e.error)
    }

    /// What Stripe says about the request's address or API version rather than about the
    /// event: an unknown URL (404 "Unrecognized request URL", a wrong `api_url`) or an
    /// unknown `Stripe-Version` (400 "Invalid Stripe API version", a wrong `api_version`).
    /// Records are not at fault: the sink stops and they stay pending.
    fn configuration_problem(&self) -> Option<&'static str> {
        let message = self.message.as_deref()?;
        if message.starts_with("Unrecognized request URL") {
            Some("check api_url")
        } else if message.starts_with("Invalid Stripe API version") {
            Some("check api_version")
        } else {
            None
        }
    }

    /// A refusal of the event time, by Stripe's documented codes (or the `timestamp` parameter
    /// named without a code).
    fn time_window(&self) -> Option<TimeWindow> {
        match self.code.as_deref() {
            Some(TIMESTAMP_TOO_FAR_IN_PAST) => Some(TimeWindow::TooOld),
            Some(TIMESTAMP_IN_FUTURE) => Some(TimeWindow::TooEarly),
            None if self.param.as_deref() == Some("timestamp") => Some(TimeWindow::Unspecified),
            _ => None,
        }
    }

    /// Stripe's identifier dedup: a 400 `invalid_request_error` saying that an event with
    /// *this* identifier already exists (observed text: "An event already exists with
    /// identifier <id>."). Stripe documents no error code for it (the answer was observed
    /// without one), so the message decides, narrowly: Stripe's error envelope (a `type`),
    /// about the `identifier` parameter when it names one, no documented meter event error
    /// code saying something else, and this identifier as the word right after "identifier".
    /// Taking anything else for "already delivered" would lose the record.
    fn is_identifier_duplicate(&self, identifier: &str) -> bool {
        if self.kind.as_deref() != Some("invalid_request_error") {
            return false;
        }
        if self.param.as_deref().is_some_and(|p| p != "identifier") {
            return false;
        }
        if self
            .code
            .as_deref()
            .is_some_and(|c| METER_EVENT_ERROR_CODES.contains(&c))
        {
            return false;
        }
        let Some(message) = self.message.as_deref() else {
            return false;
        };
        if !message.to_ascii_lowercase().contains("already exists") {
            return false;
        }
        let words: Vec<&str> = message.split_whitespace().collect();
        words.windows(2).any(|w| {
            let named = w[1].strip_suffix('.').unwrap_or(w[1]);
            let named = named.trim_matches(|c: char| matches!(c, '\'' | '"' | '`' | '(' | ')'));
            w[0].eq_ignore_ascii_case("identifier") && named == identifier
        })
    }

    fn describe(&self) -> String {
        let mut s = self.message.clone().unwrap_or_else(|| "no message".into());
        let tags: Vec<String> = [
            self.kind.as_deref().map(|k| format!("type {k}")),
            self.code.as_deref().map(|c| format!("code {c}")),
            self.param.as_deref().map(|p| format!("param {p}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !tags.is_empty() {
            s.push_str(&format!(" ({})", tags.join(", ")));
        }
        snippet(&s)
    }
}

fn parse_session(text: &str) -> Result<Session, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let token = v
        .get("authentication_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or("no authentication_token")?;
    let expires_at = match v.get("expires_at") {
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .map_err(|e| format!("expires_at {s:?}: {e}"))?,
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|s| Utc.timestamp_opt(s, 0).single())
            .ok_or("expires_at is not a Unix time")?,
        _ => return Err("no expires_at".into()),
    };
    Ok(Session {
        token: Secret::new(token),
        expires_at,
    })
}

/// Whether a v1 answer is Stripe's meter event object for `identifier` (what Stripe, and its
/// replay of a stored answer, returns for a created event).
fn is_meter_event_for(text: &str, identifier: &str) -> bool {
    #[derive(Deserialize)]
    struct Answer {
        object: Option<String>,
        identifier: Option<String>,
    }
    serde_json::from_str::<Answer>(text).is_ok_and(|a| {
        a.object.as_deref() == Some("billing.meter_event")
            && a.identifier.as_deref() == Some(identifier)
    })
}

/// Whether a request that failed in transport may have reached Stripe: anything but a
/// connection that was never made (or a request never built) may have been sent in full.
fn maybe_sent(e: &reqwest::Error) -> bool {
    !(e.is_connect() || e.is_builder())
}

fn header_is_true(headers: &reqwest::header::HeaderMap, name: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// `35 days`, `5m`, `36h`: whole days when the duration is whole days.
pub fn human(d: chrono::Duration) -> String {
    let secs = d.num_seconds().max(0);
    if secs > 0 && secs % 86_400 == 0 {
        let days = secs / 86_400;
        return format!("{days} day{}", if days == 1 { "" } else { "s" });
    }
    humantime::format_duration(Duration::from_secs(secs as u64)).to_string()
}

// --- the form body ------------------------------------------------------------------------

/// `application/x-www-form-urlencoded` byte encoding: unreserved bytes stay, space is `+`,
/// everything else is `%XX` (upper case), as browsers and `serde_urlencoded` do.
pub fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The inverse of [`form_encode`] (accepting lower-case hex too).
pub fn form_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {text:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8"))
}

/// Split a form body into decoded `(name, value)` pairs, in order.
pub fn form_pairs(body: &str) -> Result<Vec<(String, String)>, String> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((form_decode(k)?, form_decode(v)?))
        })
        .collect()
}

/// A frozen v1 body read back.
#[derive(Debug, Clone, PartialEq)]
struct FormEvent {
    event_name: String,
    identifier: String,
    timestamp: i64,
    /// `payload[k]` pairs in body order.
    payload: Vec<(String, String)>,
}

impl FormEvent {
    fn parse(body: &str) -> Result<FormEvent, String> {
        let mut event_name = None;
        let mut identifier = None;
        let mut timestamp = None;
        let mut payload = Vec::new();
        for (k, v) in form_pairs(body)? {
            match k.as_str() {
                "event_name" => event_name = Some(v),
                "identifier" => identifier = Some(v),
                "timestamp" => {
                    timestamp = Some(
                        v.parse::<i64>()
                            .map_err(|_| format!("timestamp {v:?} is not an integer"))?,
                    )
                }
                _ => match k.strip_prefix("payload[").and_then(|r| r.strip_suffix(']')) {
                    Some(name) => payload.push((name.to_string(), v)),
                    None => return Err(format!("unexpected field {k:?}")),
                },
            }
        }
        Ok(FormEvent {
            event_name: event_name.ok_or("no event_name")?,
            identifier: identifier.ok_or("no identifier")?,
            timestamp: timestamp.ok_or("no timestamp")?,
            payload,
        })
    }

    fn customer(&self) -> &str {
        self.payload
            .iter()
            .find(|(k, _)| k == CUSTOMER_KEY)
            .map_or("", |(_, v)| v.as_str())
    }

    /// The same event as a v2 stream JSON object (timestamp as RFC 3339).
    fn to_stream_json(&self) -> Value {
        let timestamp = Utc
            .timestamp_opt(self.timestamp, 0)
            .single()
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
            .unwrap_or_default();
        let payload: Map<String, Value> = self
            .payload
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        serde_json::json!({
            "event_name": self.event_name,
            "identifier": self.identifier,
            "timestamp": timestamp,
            "payload": payload,
        })
    }
}

/// A whole decimal as Stripe reads it: plain digits, optional minus, no exponent.
fn integer_text(value: rust_decimal::Decimal) -> Option<String> {
    if !value.fract().is_zero() {
        return None;
    }
    if value.is_zero() {
        return Some("0".into());
    }
    Some(value.trunc().normalize().to_string())
}

#[async_trait]
impl Sink for StripeSink {
    fn kind(&self) -> &'static str {
        "stripe"
    }

    /// Stripe "enforces uniqueness within a rolling period of at least 24 hours" of a meter
    /// event's `identifier` (OpenAPI `PostBillingMeterEvents`, `identifier`; the v2 stream's
    /// `identifier` is "unique over a rolling 24 h" too, reference 2.1 and 2.3), and may prune
    /// an `Idempotency-Key` after 24 hours (reference 2.1, docs.stripe.com/idempotency). So a
    /// record whose delivery ended unclear is resent only within 23 hours of that delivery,
    /// in both modes: an hour off the window for clocks that differ and pushes that take time.
    fn dedup_window(&self) -> Option<DedupWindow> {
        Some(DedupWindow {
            system: "Stripe",
            window: chrono::Duration::hours(DEDUP_WINDOW_HOURS),
            margin: chrono::Duration::hours(DEDUP_MARGIN_HOURS),
        })
    }

    fn throttled(&self) -> u64 {
        self.throttled.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    /// `event_name=…&identifier=<key>&timestamp=<secs>&payload[stripe_customer_id]=…&
    /// payload[<value key>]=…` and the extra properties as `payload[<name>]=…`, sorted by name.
    /// `event_name` is the mapping's metric code, the customer its subscription field.
    fn encode(&self, key: &str, event: &MappedEvent) -> Result<String, EncodeError> {
        if key.trim().is_empty() {
            return Err(self.encode_error(key, "the identifier (ledger key) is empty"));
        }
        if key.len() > MAX_IDENTIFIER {
            return Err(self.encode_error(
                key,
                format!(
                    "the key is {} characters; Stripe's identifier allows {MAX_IDENTIFIER}",
                    key.len()
                ),
            ));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(self.encode_error(
                key,
                "the key must be printable ASCII (it is also the Idempotency-Key header)",
            ));
        }
        let event_name = event.metric_code.trim();
        if event_name.is_empty() {
            return Err(self.encode_error(key, "the meter event_name (metric code) is empty"));
        }
        if event_name.chars().count() > MAX_IDENTIFIER {
            return Err(self.encode_error(
                key,
                format!("event_name {event_name:?} is longer than {MAX_IDENTIFIER} characters"),
            ));
        }
        let customer = event.external_subscription_id.trim();
        if !customer.starts_with("cus_") || customer.len() <= 4 {
            return Err(self.encode_error(
                key,
                format!(
                    "a Stripe sink needs a customer id (cus_…) in the mapping's subscription field, got {customer:?}"
                ),
            ));
        }
        let Some(value) = integer_text(event.value) else {
            return Err(self.encode_error(
                key,
                format!(
                    "Stripe meter values must be whole numbers, got {}: convert to a smaller unit or round in the mapping",
                    event.value.normalize()
                ),
            ));
        };
        let secs = event.timestamp.timestamp();
        if secs < 0 {
            return Err(self.encode_error(key, "the timestamp is before 1970"));
        }
        let mut payload: Vec<(&str, &str)> = vec![
            (CUSTOMER_KEY, customer),
            (self.value_property.as_str(), value.as_str()),
        ];
        for (name, v) in &event.properties {
            if name == CUSTOMER_KEY || *name == self.value_property {
                return Err(self.encode_error(
                    key,
                    format!("extra property {name:?} collides with the customer or value key"),
                ));
            }
            if name.is_empty() || name.contains(['[', ']']) {
                return Err(self.encode_error(
                    key,
                    format!("extra property name {name:?} is empty or contains brackets"),
                ));
            }
            payload.push((name.as_str(), v.as_str()));
        }
        if let Some((name, _)) = payload
            .iter()
            .find(|(_, v)| v.chars().count() > MAX_PAYLOAD_VALUE)
        {
            return Err(self.encode_error(
                key,
                format!("payload value {name:?} is longer than {MAX_PAYLOAD_VALUE} characters"),
            ));
        }
        let mut out = String::with_capacity(256);
        out.push_str("event_name=");
        out.push_str(&form_encode(event_name));
        out.push_str("&identifier=");
        out.push_str(&form_encode(key));
        out.push_str("&timestamp=");
        out.push_str(&secs.to_string());
        for (name, v) in payload {
            out.push_str("&payload[");
            out.push_str(&form_encode(name));
            out.push_str("]=");
            out.push_str(&form_encode(v));
        }
        Ok(out)
    }

    async fn deliver(&self, batch: &[Outgoing]) -> Result<Vec<Outcome>, SinkStopped> {
        match self.mode {
            StripeMode::V1 => self.deliver_v1(batch).await,
            StripeMode::V2Stream => self.deliver_v2(batch).await,
        }
    }

    /// Stripe keeps no readable list of meter events, only what its meters counted: the meter
    /// whose `event_name` is the metric (`GET /v1/billing/meters`), then its event summary for
    /// the customer over `[from, to)` (`GET /v1/billing/meters/{id}/event_summaries`, no
    /// `value_grouping_window`: one summary for the whole range; every page read while
    /// `has_more`). Stripe wants both bounds as Unix seconds on minute boundaries (end
    /// exclusive); a window that is not is refused here, without a request. The aggregated
    /// value is read exactly from the JSON number. Summaries are eventually consistent: events
    /// sent in the last minutes may not be counted yet.
    async fn read_back_total(
        &self,
        query: &ReadBackQuery,
    ) -> Result<Option<ReadBackTotal>, String> {
        let (start, end) = (query.from.timestamp(), query.to.timestamp());
        if start % 60 != 0
            || end % 60 != 0
            || query.from.timestamp_subsec_nanos() != 0
            || query.to.timestamp_subsec_nanos() != 0
            || start >= end
        {
            return Err(format!(
                "sink {}: Stripe sums meter events only between minute boundaries, and [{}, {}) is not such a window",
                self.name,
                query.from.to_rfc3339(),
                query.to.to_rfc3339()
            ));
        }
        // As `encode` sent them: customer and event name trimmed.
        let customer = query.subscription.trim();
        let Some(meter) = self.meter_for(query.metric.trim()).await? else {
            // Stripe takes meter events of an unknown event name and counts none of them
            // (`no_meter` in its error reports): it holds nothing of what was sent, a shortfall
            // of money (reconcile's exit 7), not a check that could not be made.
            return Ok(Some(ReadBackTotal {
                total: rust_decimal::Decimal::ZERO,
                source: format!("no Stripe meter has event_name {:?}", query.metric.trim()),
                note: Some(format!(
                    "no Stripe meter has event_name {:?}: Stripe counts none of these events (no_meter); create the meter or fix the mapping's metric",
                    query.metric.trim()
                )),
            }));
        };
        let path = format!("{METERS_PATH}/{}/event_summaries", form_encode(&meter.id));
        let (start_s, end_s) = (start.to_string(), end.to_string());
        let mut total = rust_decimal::Decimal::ZERO;
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut params = vec![
                ("customer", customer),
                ("start_time", start_s.as_str()),
                ("end_time", end_s.as_str()),
                ("limit", LIST_LIMIT),
            ];
            if let Some(a) = after.as_deref() {
                params.push(("starting_after", a));
            }
            let page = self.read_page(&path, &params).await?;
            let mut last = None;
            for summary in &page.data {
                let value = summary
                    .get("aggregated_value")
                    .and_then(exact_number)
                    .ok_or_else(|| {
                        format!(
                            "sink {}: GET {path}: a summary without a readable aggregated_value: {}",
                            self.name,
                            snippet(&summary.to_string())
                        )
                    })?;
                total = total.checked_add(value).ok_or_else(|| {
                    format!("sink {}: GET {path}: the summaries overflow", self.name)
                })?;
                last = summary
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
            match (page.has_more, last) {
                (true, Some(last)) => after = Some(last),
                (true, None) => {
                    return Err(format!(
                        "sink {}: GET {path}: has_more without a summary id to continue from",
                        self.name
                    ))
                }
                (false, _) => {
                    return Ok(Some(ReadBackTotal {
                        total,
                        source: format!(
                            "Stripe meter {} (event_name {}), customer {}, summed over [{}, {})",
                            meter.id, meter.event_name, customer, start, end
                        ),
                        note: None,
                    }))
                }
            }
        }
        Err(format!(
            "sink {}: GET {path}: more than {MAX_PAGES} pages of summaries",
            self.name
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_round_trip() {
        let s = "a b&c=d/é[x]%";
        assert_eq!(form_decode(&form_encode(s)).unwrap(), s);
        assert_eq!(form_encode("a b"), "a+b");
    }

    #[test]
    fn integer_values() {
        let d = |s: &str| s.parse::<rust_decimal::Decimal>().unwrap();
        assert_eq!(integer_text(d("25.000")).as_deref(), Some("25"));
        assert_eq!(integer_text(d("-3")).as_deref(), Some("-3"));
        assert_eq!(integer_text(d("0.0")).as_deref(), Some("0"));
        assert_eq!(integer_text(d("1e3")).as_deref(), Some("1000"));
        assert_eq!(integer_text(d("2.5")), None);
    }

    #[test]
    fn duplicate_detection_is_narrow() {
        let e = |kind: &str, msg: &str| StripeError {
            kind: Some(kind.into()),
            code: None,
            message: Some(msg.into()),
            param: None,
        };
        let k = "ms.a.20260101T000000.abc";
        assert!(e(
            "invalid_request_error",
            &format!("An event already exists with identifier {k}.")
        )
        .is_identifier_duplicate(k));
        assert!(!e(
            "invalid_request_error",
            &format!("An event already exists with identifier {k}x.")
        )
        .is_identifier_duplicate(k));
        assert!(!e("invalid_request_error", "No such meter: foo").is_identifier_duplicate(k));
        assert!(!e(
            "api_error",
            &format!("An event already exists with identifier {k}.")
        )
        .is_identifier_duplicate(k));
    }

    /// Only Stripe's own identifier answer counts as delivered: its error envelope with type
    /// `invalid_request_error`, about the `identifier` parameter when it names one, and with no
    /// documented meter event error code saying something else; the message must name this
    /// identifier right after the word "identifier".
    #[test]
    fn a_duplicate_is_only_stripes_identifier_answer() {
        let k = "ms.a.20260101T000000.abc";
        let dup = format!("An event already exists with identifier {k}.");
        let e =
            |kind: Option<&str>, code: Option<&str>, param: Option<&str>, msg: &str| StripeError {
                kind: kind.map(str::to_string),
                code: code.map(str::to_string),
                message: Some(msg.into()),
                param: param.map(str::to_string),
            };
        let yes = Some("invalid_request_error");
        assert!(e(yes, None, None, &dup).is_identifier_duplicate(k));
        assert!(e(yes, None, Some("identifier"), &dup).is_identifier_duplicate(k));
        assert!(e(
            yes,
            None,
            None,
            &format!("An event already exists with identifier '{k}'.")
        )
        .is_identifier_duplicate(k));
        // Not Stripe's error envelope (no type): a proxy or something else answered.
        assert!(!e(None, None, None, &dup).is_identifier_duplicate(k));
        // About another parameter, or with a documented code that says something else.
        assert!(!e(yes, None, Some("timestamp"), &dup).is_identifier_duplicate(k));
        for code in [
            TIMESTAMP_IN_FUTURE,
            TIMESTAMP_TOO_FAR_IN_PAST,
            "meter_event_invalid_value",
        ] {
            assert!(
                !e(yes, Some(code), None, &dup).is_identifier_duplicate(k),
                "{code}"
            );
        }
        // The identifier named is not the one right after "identifier".
        assert!(!e(
            yes,
            None,
            None,
            &format!("An event already exists with identifier other.1 (not {k}).")
        )
        .is_identifier_duplicate(k));
    }
}
