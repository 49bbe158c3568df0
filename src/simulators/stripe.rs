//! A Stripe Billing meter events simulator on loopback, for tests, `billsync demo` and benchmarks.
//!
//! Why: the Stripe sink is only correct if Stripe's two dedup layers and its time window behave
//! as the sink assumes (`shared/reference/invoicing-systems.md` 2.1–2.4). This server enforces
//! them:
//!
//! - `POST /v1/billing/meter_events`: form body (`event_name`, `payload[…]`, `identifier`,
//!   `timestamp`, `expand[]`), Bearer secret key; unknown or missing parameters → 400;
//!   `identifier` unique over a rolling window (24 h) → 400 "An event already exists with
//!   identifier …"; timestamps older than 35 days or more than 5 minutes ahead → 400 with
//!   `param: timestamp` and Stripe's meter event error code (`timestamp_too_far_in_past`,
//!   `timestamp_in_future`: the codes Stripe documents for meter event errors; that the
//!   synchronous answer carries them is an assumption the sink does not depend on);
//!   `Idempotency-Key`: the same key with the same body replays the saved answer (header
//!   `Idempotent-Replayed: true`), with another body → 400 `idempotency_error`. Only answers of
//!   requests that passed validation are saved, as Stripe documents.
//! - `POST /v2/billing/meter_event_session` → `authentication_token` + `expires_at` (15 minutes);
//!   `POST /v2/billing/meter_event_stream` (Bearer = session token, JSON, ≤ 100 events): an
//!   expired token → 401 `billing_meter_event_session_expired`; validation is asynchronous as on
//!   Stripe (the request is accepted; refused events are listed by [`StripeSimHandle::async_errors`],
//!   duplicates are dropped silently).
//! - Value checks that Stripe makes asynchronously (missing customer key, value not a whole
//!   number) are not HTTP errors either: the event is stored and an async error recorded.
//!
//! - Read-back: `GET /v1/billing/meters` (newest first, `status`, `limit` 1–100 default 10,
//!   `starting_after`) and `GET /v1/billing/meters/{id}/event_summaries` (`customer`,
//!   `start_time`, `end_time` required, Unix seconds on minute boundaries, end exclusive;
//!   `value_grouping_window` `hour`/`day` needs hour/day boundaries and gives one summary per
//!   window; paged like any list; `aggregated_value` an exact JSON number by the meter's
//!   `sum`/`count`/`last`). Only events no async check refused are counted:
//!   [`StripeSimHandle::drop_next_asynchronously`] accepts an event and then drops it, as Stripe
//!   does for an unknown customer (reported by [`StripeSimHandle::async_errors`] only).
//!
//! Where the read-back differs from Stripe: summaries are exact at once (Stripe's are eventually
//! consistent and lag recent events); with [`StripeSimConfig::auto_meters`] (the default) a meter
//! springs up for each new event name (on Stripe an event without a meter is dropped, `no_meter`,
//! as the simulator does with `auto_meters: false`); customers are not checked (no
//! `meter_event_customer_not_found` unless injected); a refused window alignment is a 400
//! `invalid_request_error` naming the parameter, with the simulator's own wording and no code
//! (Stripe documents the rule, not its error); `ending_before` is refused as not simulated;
//! meter objects carry only the fields read-back uses (fixed `created`), summary ids are
//! synthetic.
//!
//! Error wording is the simulator's own where Stripe's exact text is not documented (the time
//! window messages); the identifier duplicate text follows what Stripe was observed to answer.
//! Faults ([`StripeSimHandle`]): 5xx and 429 (with `Retry-After`) for the next N ingestion
//! requests, a delay, "store then lose the answer" (502 or a stall past the client's timeout),
//! and a 5xx saved under the `Idempotency-Key` (so that Stripe replays it).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::Path;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct StripeSimConfig {
    /// The secret key accepted as `Authorization: Bearer <key>`.
    pub api_key: String,
    /// Oldest accepted event time (Stripe: 35 days).
    pub max_age: Duration,
    /// Latest accepted event time ahead of now (Stripe: 5 minutes).
    pub max_future: Duration,
    /// How long identifiers and idempotency keys are remembered (Stripe: at least 24 h).
    pub dedup_window: Duration,
    /// Lifetime of a v2 session token (Stripe: 15 minutes).
    pub session_ttl: Duration,
    /// The meter's value key, for totals and async checks.
    pub value_key: String,
    /// Largest stream request.
    pub max_stream_events: usize,
    /// Create a meter (sum of `value_key`, customers by `stripe_customer_id`) for each new
    /// event name, as a test account set up for its mapping would have. Off: only meters
    /// added with [`StripeSimHandle::add_meter`] count, and an event without one is dropped
    /// asynchronously (`no_meter`).
    pub auto_meters: bool,
}

impl Default for StripeSimConfig {
    fn default() -> Self {
        StripeSimConfig {
            api_key: "sk_test_sim".into(),
            max_age: Duration::from_secs(35 * 86_400),
            max_future: Duration::from_secs(300),
            dedup_window: Duration::from_secs(86_400),
            session_ttl: Duration::from_secs(900),
            value_key: "value".into(),
            max_stream_events: 100,
            auto_meters: true,
        }
    }
}

/// Which API stored an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/billing/meter_events`.
    V1,
    /// `POST /v2/billing/meter_event_stream`.
    V2Stream,
}

/// One stored meter event.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMeterEvent {
    /// The identifier (the client's, or generated).
    pub identifier: String,
    /// The meter's event name.
    pub event_name: String,
    /// `payload[stripe_customer_id]` (empty when missing).
    pub customer: String,
    /// The whole payload.
    pub payload: BTreeMap<String, String>,
    /// Event time, Unix seconds.
    pub timestamp: i64,
    /// When the simulator stored it.
    pub created: DateTime<Utc>,
    /// Which API carried it.
    pub api: Api,
}

/// A `billing.meter`, as far as the simulator models it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimMeter {
    /// `mtr_…`.
    pub id: String,
    pub event_name: String,
    /// `default_aggregation.formula`: `sum`, `count` or `last`.
    pub formula: String,
    /// `customer_mapping.event_payload_key`.
    pub customer_key: String,
    /// `value_settings.event_payload_key`.
    pub value_key: String,
    /// `active` or `inactive`.
    pub status: String,
    /// `event_time_window` (`hour`, `day`), `None` for none.
    pub event_time_window: Option<String>,
}

impl SimMeter {
    /// An active sum meter of `event_name` with Stripe's default keys.
    pub fn sum(id: impl Into<String>, event_name: impl Into<String>) -> SimMeter {
        SimMeter {
            id: id.into(),
            event_name: event_name.into(),
            formula: "sum".into(),
            customer_key: "stripe_customer_id".into(),
            value_key: "value".into(),
            status: "active".into(),
            event_time_window: None,
        }
    }

    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "billing.meter",
            "created": 1_700_000_000,
            "customer_mapping": { "event_payload_key": self.customer_key, "type": "by_id" },
            "default_aggregation": { "formula": self.formula },
            "display_name": self.event_name,
            "event_name": self.event_name,
            "event_time_window": self.event_time_window,
            "livemode": false,
            "status": self.status,
            "status_transitions": { "deactivated_at": null },
            "updated": 1_700_000_000,
            "value_settings": { "event_payload_key": self.value_key },
        })
    }
}

/// How a "store then lose the answer" fault loses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropMode {
    /// Store, then answer 502 (a proxy lost Stripe's answer). The success stays saved under the
    /// `Idempotency-Key`, so a retry gets the replayed 200.
    Status502,
    /// Store, then wait this long before answering (longer than the client's timeout).
    Stall(Duration),
}

#[derive(Debug, Clone)]
enum Injected {
    /// Answer normally (a gap between injected faults).
    Pass,
    Status(u16),
    RateLimited {
        retry_after: Option<u64>,
    },
}

#[derive(Debug, Default)]
struct Faults {
    queue: VecDeque<Injected>,
    delay: Duration,
    drop_after_store: VecDeque<DropMode>,
    /// Statuses answered *and saved* under the request's Idempotency-Key.
    saved_failures: VecDeque<u16>,
    /// Error codes for the next events stored: accepted, then dropped asynchronously.
    async_drops: VecDeque<String>,
    /// Statuses for the next read-back (GET) requests.
    read_failures: VecDeque<u16>,
}

#[derive(Debug, Clone)]
struct Saved {
    body: String,
    status: u16,
    response: String,
    at: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct Store {
    events: Vec<StoredMeterEvent>,
    idempotency: HashMap<String, Saved>,
    sessions: HashMap<String, DateTime<Utc>>,
    sessions_created: usize,
    generated: u64,
    async_errors: Vec<(String, String)>,
    meters: Vec<SimMeter>,
    /// Identifiers of stored events Stripe would not count (refused asynchronously).
    uncounted: std::collections::HashSet<String>,
}

/// A request the simulator received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRequest {
    /// `POST /v1/billing/meter_events`, …
    pub route: String,
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The `Authorization` header (test keys only).
    pub authorization: Option<String>,
    /// The raw body.
    pub body: String,
}

#[derive(Debug)]
struct Shared {
    config: StripeSimConfig,
    store: Mutex<Store>,
    faults: Mutex<Faults>,
    requests: Mutex<Vec<ReceivedRequest>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running simulator. Serves until [`StripeSimHandle::shutdown`] or drop.
#[derive(Debug)]
pub struct StripeSimHandle {
    /// Base URL, e.g. `http://127.0.0.1:41234`: both the sink's `api_url` and `meter_events_url`.
    pub url: String,
    /// The bound address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Entry point: `StripeSim::start(config)`.
#[derive(Debug)]
pub struct StripeSim;

const V1_ROUTE: &str = "POST /v1/billing/meter_events";
const STREAM_ROUTE: &str = "POST /v2/billing/meter_event_stream";
const SESSION_ROUTE: &str = "POST /v2/billing/meter_event_session";
const METERS_ROUTE: &str = "GET /v1/billing/meters";
const SUMMARIES_ROUTE: &str = "GET /v1/billing/meters/{id}/event_summaries";

impl StripeSim {
    /// Bind `127.0.0.1:0` and serve in a background task of the current Tokio runtime.
    pub async fn start(config: StripeSimConfig) -> io::Result<StripeSimHandle> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            store: Mutex::new(Store::default()),
            faults: Mutex::new(Faults::default()),
            requests: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/billing/meter_events", post(post_v1))
            .route("/v2/billing/meter_event_session", post(post_session))
            .route("/v2/billing/meter_event_stream", post(post_stream))
            .route("/v1/billing/meters", get(list_meters))
            .route(
                "/v1/billing/meters/{id}/event_summaries",
                get(list_summaries),
            )
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "stripe simulator stopped with an error");
            }
        });
        Ok(StripeSimHandle {
            url: format!("http://{addr}"),
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }
}

impl StripeSimHandle {
    /// Stop serving and wait for the server task.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    // --- faults ---------------------------------------------------------------------------

    /// Answer the next `n` ingestion requests (v1 or stream) with `status`, storing and saving
    /// nothing (a failure in front of the API).
    pub fn fail_next(&self, n: usize, status: u16) {
        lock(&self.shared.faults)
            .queue
            .extend(std::iter::repeat_n(Injected::Status(status), n));
    }

    /// Let the next `n` ingestion requests through untouched: faults queued after them apply
    /// to the requests that follow (e.g. a 400, then a success, then a 403).
    pub fn pass_next(&self, n: usize) {
        lock(&self.shared.faults)
            .queue
            .extend(std::iter::repeat_n(Injected::Pass, n));
    }

    /// Answer the next `n` ingestion requests 429, with `Retry-After: <secs>` when given.
    pub fn rate_limit_next(&self, n: usize, retry_after: Option<u64>) {
        lock(&self.shared.faults).queue.extend(std::iter::repeat_n(
            Injected::RateLimited { retry_after },
            n,
        ));
    }

    /// Wait this long before handling each ingestion request.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.shared.faults).delay = delay;
    }

    /// For the next `n` ingestion requests that store events: store, then lose the answer.
    pub fn store_then_drop_next(&self, n: usize, mode: DropMode) {
        lock(&self.shared.faults)
            .drop_after_store
            .extend(std::iter::repeat_n(mode, n));
    }

    /// Answer the next v1 request with `status` and save that answer under its
    /// `Idempotency-Key`, as Stripe does for a 500 once the endpoint started executing.
    pub fn fail_and_save_next(&self, status: u16) {
        lock(&self.shared.faults).saved_failures.push_back(status);
    }

    /// Accept the next `n` events stored (v1 or stream) as usual, then drop each
    /// asynchronously with Stripe's meter event error `code` (e.g.
    /// `meter_event_customer_not_found`): the HTTP answer is a success, the event is listed by
    /// [`StripeSimHandle::async_errors`] and no meter counts it.
    pub fn drop_next_asynchronously(&self, n: usize, code: &str) {
        lock(&self.shared.faults)
            .async_drops
            .extend(std::iter::repeat_n(code.to_string(), n));
    }

    /// Answer the next `n` read-back requests (`GET /v1/billing/meters…`) with `status`.
    pub fn fail_next_reads(&self, n: usize, status: u16) {
        lock(&self.shared.faults)
            .read_failures
            .extend(std::iter::repeat_n(status, n));
    }

    /// Add a meter (served by `GET /v1/billing/meters`).
    pub fn add_meter(&self, meter: SimMeter) {
        lock(&self.shared.store).meters.push(meter);
    }

    /// The meters, in creation order.
    pub fn meters(&self) -> Vec<SimMeter> {
        lock(&self.shared.store).meters.clone()
    }

    /// Expire every v2 session token now.
    pub fn expire_sessions(&self) {
        let past = Utc::now() - chrono::Duration::seconds(1);
        for t in lock(&self.shared.store).sessions.values_mut() {
            *t = past;
        }
    }

    /// Forget saved idempotency keys (as Stripe prunes them after 24 h); identifiers stay.
    pub fn forget_idempotency_keys(&self) {
        lock(&self.shared.store).idempotency.clear();
    }

    /// Remove every pending fault and the delay.
    pub fn clear_faults(&self) {
        *lock(&self.shared.faults) = Faults::default();
    }

    // --- inspection -----------------------------------------------------------------------

    /// Every stored event, in storage order.
    pub fn events(&self) -> Vec<StoredMeterEvent> {
        lock(&self.shared.store).events.clone()
    }

    /// Stored events with this identifier.
    pub fn count(&self, identifier: &str) -> usize {
        lock(&self.shared.store)
            .events
            .iter()
            .filter(|e| e.identifier == identifier)
            .count()
    }

    /// Stored events per identifier.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for e in &lock(&self.shared.store).events {
            *out.entry(e.identifier.clone()).or_insert(0) += 1;
        }
        out
    }

    /// Sum of the value key over the events of (customer, event name), exactly; values that are
    /// not numbers are skipped. `None` on overflow.
    pub fn total(&self, customer: &str, event_name: &str) -> Option<Decimal> {
        let key = &self.shared.config.value_key;
        lock(&self.shared.store)
            .events
            .iter()
            .filter(|e| e.customer == customer && e.event_name == event_name)
            .filter_map(|e| {
                e.payload
                    .get(key)
                    .and_then(|v| Decimal::from_str_exact(v).ok())
            })
            .try_fold(Decimal::ZERO, |acc, d| acc.checked_add(d))
    }

    /// Sums of the value key per (customer, event name); `None` for a sum that overflows.
    pub fn totals(&self) -> BTreeMap<(String, String), Option<Decimal>> {
        let key = &self.shared.config.value_key;
        let mut out: BTreeMap<(String, String), Option<Decimal>> = BTreeMap::new();
        for e in &lock(&self.shared.store).events {
            if let Some(d) = e
                .payload
                .get(key)
                .and_then(|v| Decimal::from_str_exact(v).ok())
            {
                let sum = out
                    .entry((e.customer.clone(), e.event_name.clone()))
                    .or_insert(Some(Decimal::ZERO));
                *sum = sum.and_then(|s| s.checked_add(d));
            }
        }
        out
    }

    /// Errors Stripe would report asynchronously (identifier, reason): stream events outside the
    /// time window, missing customer key, values that are not whole numbers.
    pub fn async_errors(&self) -> Vec<(String, String)> {
        lock(&self.shared.store).async_errors.clone()
    }

    /// v2 sessions created so far.
    pub fn sessions_created(&self) -> usize {
        lock(&self.shared.store).sessions_created
    }

    /// Every request received.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Ingestion requests received (v1 and stream), refused ones included.
    pub fn request_count(&self) -> usize {
        self.ingestion().count()
    }

    /// Raw bodies of the ingestion requests, in arrival order.
    pub fn bodies(&self) -> Vec<String> {
        self.ingestion().map(|r| r.body).collect()
    }

    fn ingestion(&self) -> impl Iterator<Item = ReceivedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.route == V1_ROUTE || r.route == STREAM_ROUTE)
    }
}

impl Drop for StripeSimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

// --- handlers -----------------------------------------------------------------------------

type Sim = State<Arc<Shared>>;

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn record(shared: &Shared, route: &str, headers: &HeaderMap, body: &str) {
    lock(&shared.requests).push(ReceivedRequest {
        route: route.to_string(),
        idempotency_key: header(headers, "idempotency-key"),
        content_type: header(headers, "content-type"),
        authorization: header(headers, "authorization"),
        body: body.to_string(),
    });
}

fn stripe_error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    let mut error = json!({ "type": kind, "message": message });
    if let Some(c) = code {
        error["code"] = json!(c);
    }
    (status, Json(json!({ "error": error }))).into_response()
}

fn invalid(message: &str, param: Option<&str>) -> Response {
    let mut error = json!({ "type": "invalid_request_error", "message": message });
    if let Some(p) = param {
        error["param"] = json!(p);
    }
    (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    header(headers, "authorization")
        .and_then(|a| a.strip_prefix("Bearer ").map(|t| t.trim().to_string()))
}

#[allow(clippy::result_large_err)]
fn authorize_secret(shared: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    match bearer(headers) {
        Some(k) if k == shared.config.api_key => Ok(()),
        Some(k) => {
            let shown: String = k.chars().take(8).collect();
            Err(stripe_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                &format!("Invalid API Key provided: {shown}****"),
            ))
        }
        None => Err(stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            "You did not provide an API key.",
        )),
    }
}

/// Delay, then an injected answer if one is queued.
async fn injected(shared: &Shared) -> Option<Response> {
    let delay = lock(&shared.faults).delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let next = lock(&shared.faults).queue.pop_front()?;
    Some(match next {
        Injected::Pass => return None,
        Injected::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            stripe_error(status, "api_error", None, "simulated failure")
        }
        Injected::RateLimited { retry_after } => {
            let mut r = stripe_error(
                StatusCode::TOO_MANY_REQUESTS,
                "invalid_request_error",
                Some("rate_limit"),
                "Too many requests hit the API too quickly.",
            );
            if let Some(s) = retry_after {
                if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                    r.headers_mut().insert("retry-after", v);
                }
            }
            r
        }
    })
}

/// The time window check; `Err((code, message))` when Stripe would refuse the time.
fn window(
    shared: &Shared,
    ts: i64,
    now: DateTime<Utc>,
) -> Result<(), (Option<&'static str>, String)> {
    let max_age = chrono::Duration::from_std(shared.config.max_age).unwrap_or_default();
    let max_future = chrono::Duration::from_std(shared.config.max_future).unwrap_or_default();
    let Some(t) = Utc.timestamp_opt(ts, 0).single() else {
        return Err((None, format!("Invalid timestamp: {ts}")));
    };
    if t < now - max_age {
        return Err((
            Some("timestamp_too_far_in_past"),
            format!(
                "The timestamp {ts} is too far in the past: meter events must be within the past {} calendar days.",
                max_age.num_days()
            ),
        ));
    }
    if t > now + max_future {
        return Err((
            Some("timestamp_in_future"),
            format!(
                "The timestamp {ts} is too far in the future: meter events may be at most {} seconds ahead.",
                max_future.num_seconds()
            ),
        ));
    }
    Ok(())
}

fn is_duplicate(store: &Store, shared: &Shared, identifier: &str, now: DateTime<Utc>) -> bool {
    let window = chrono::Duration::from_std(shared.config.dedup_window).unwrap_or_default();
    store
        .events
        .iter()
        .any(|e| e.identifier == identifier && e.created > now - window)
}

/// Async checks Stripe makes after accepting an event. An event refused here is stored (for
/// inspection) but no meter counts it.
fn async_checks(shared: &Shared, store: &mut Store, e: &StoredMeterEvent) {
    let before = store.async_errors.len();
    async_value_checks(shared, store, e);
    if shared.config.auto_meters && !store.meters.iter().any(|m| m.event_name == e.event_name) {
        let id = format!("mtr_sim_{}", store.meters.len() + 1);
        let mut meter = SimMeter::sum(id, e.event_name.clone());
        meter.value_key = shared.config.value_key.clone();
        store.meters.push(meter);
    }
    if !store
        .meters
        .iter()
        .any(|m| m.event_name == e.event_name && m.status == "active")
    {
        store
            .async_errors
            .push((e.identifier.clone(), "no_meter".into()));
    }
    if let Some(code) = lock(&shared.faults).async_drops.pop_front() {
        store.async_errors.push((e.identifier.clone(), code));
    }
    if store.async_errors.len() > before {
        store.uncounted.insert(e.identifier.clone());
    }
}

fn async_value_checks(shared: &Shared, store: &mut Store, e: &StoredMeterEvent) {
    if e.customer.is_empty() {
        store
            .async_errors
            .push((e.identifier.clone(), "missing stripe_customer_id".into()));
    }
    match e.payload.get(&shared.config.value_key) {
        None => store
            .async_errors
            .push((e.identifier.clone(), "missing value".into())),
        Some(v) if v.parse::<i64>().is_err() => store.async_errors.push((
            e.identifier.clone(),
            format!("value {v:?} is not a whole number"),
        )),
        _ => {}
    }
}

fn event_json(e: &StoredMeterEvent) -> Value {
    json!({
        "object": "billing.meter_event",
        "created": e.created.timestamp(),
        "event_name": e.event_name,
        "identifier": e.identifier,
        "livemode": false,
        "payload": e.payload,
        "timestamp": e.timestamp,
    })
}

async fn post_v1(State(shared): Sim, headers: HeaderMap, body: String) -> Response {
    record(&shared, V1_ROUTE, &headers, &body);
    if let Err(r) = authorize_secret(&shared, &headers) {
        return r;
    }
    if let Some(r) = injected(&shared).await {
        return r;
    }
    let now = Utc::now();
    let key = header(&headers, "idempotency-key");
    if let Some(k) = &key {
        let window = chrono::Duration::from_std(shared.config.dedup_window).unwrap_or_default();
        let saved = lock(&shared.store)
            .idempotency
            .get(k)
            .filter(|s| s.at > now - window)
            .cloned();
        if let Some(saved) = saved {
            if saved.body != body {
                return stripe_error(
                    StatusCode::BAD_REQUEST,
                    "idempotency_error",
                    None,
                    &format!("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{k}' if you meant to execute a different request."),
                );
            }
            let status = StatusCode::from_u16(saved.status).unwrap_or(StatusCode::OK);
            let mut r = (
                status,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                saved.response,
            )
                .into_response();
            r.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return r;
        }
    }
    let uri: Uri = match format!("http://sim/?{body}").parse() {
        Ok(u) => u,
        Err(_) => return invalid("The request body could not be parsed.", None),
    };
    let pairs = match Query::<Vec<(String, String)>>::try_from_uri(&uri) {
        Ok(Query(p)) => p,
        Err(_) => return invalid("The request body could not be parsed.", None),
    };
    let mut event_name = None;
    let mut identifier = None;
    let mut timestamp = None;
    let mut payload = BTreeMap::new();
    for (k, v) in pairs {
        if let Some(name) = k.strip_prefix("payload[").and_then(|r| r.strip_suffix(']')) {
            payload.insert(name.to_string(), v);
            continue;
        }
        match k.as_str() {
            "event_name" => event_name = Some(v),
            "identifier" => identifier = Some(v),
            "timestamp" => match v.parse::<i64>() {
                Ok(t) => timestamp = Some(t),
                Err(_) => return invalid(&format!("Invalid integer: {v}"), Some("timestamp")),
            },
            k if k.starts_with("expand[") => {}
            other => return invalid(&format!("Received unknown parameter: {other}"), Some(other)),
        }
    }
    let Some(event_name) = event_name.filter(|e| !e.is_empty()) else {
        return invalid("Missing required param: event_name.", Some("event_name"));
    };
    if event_name.chars().count() > 100 {
        return invalid(
            "event_name is too long (maximum 100 characters).",
            Some("event_name"),
        );
    }
    if payload.is_empty() {
        return invalid("Missing required param: payload.", Some("payload"));
    }
    if identifier.as_ref().is_some_and(|i| i.chars().count() > 100) {
        return invalid(
            "identifier is too long (maximum 100 characters).",
            Some("identifier"),
        );
    }
    let timestamp = timestamp.unwrap_or_else(|| now.timestamp());
    if let Err((code, m)) = window(&shared, timestamp, now) {
        let mut error =
            json!({ "type": "invalid_request_error", "message": m, "param": "timestamp" });
        if let Some(c) = code {
            error["code"] = json!(c);
        }
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response();
    }
    if let Some(code) = lock(&shared.faults).saved_failures.pop_front() {
        let response =
            json!({"error": {"type": "api_error", "message": "simulated failure (saved)"}})
                .to_string();
        if let Some(k) = &key {
            lock(&shared.store).idempotency.insert(
                k.clone(),
                Saved {
                    body: body.clone(),
                    status: code,
                    response: response.clone(),
                    at: now,
                },
            );
        }
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            response,
        )
            .into_response();
    }
    let stored = {
        let mut store = lock(&shared.store);
        let identifier = match identifier {
            Some(i) => i,
            None => {
                store.generated += 1;
                format!("sim_{}", store.generated)
            }
        };
        if is_duplicate(&store, &shared, &identifier, now) {
            drop(store);
            return invalid(
                &format!("An event already exists with identifier {identifier}."),
                Some("identifier"),
            );
        }
        let e = StoredMeterEvent {
            identifier,
            event_name,
            customer: payload
                .get("stripe_customer_id")
                .cloned()
                .unwrap_or_default(),
            payload,
            timestamp,
            created: now,
            api: Api::V1,
        };
        async_checks(&shared, &mut store, &e);
        store.events.push(e.clone());
        let response = event_json(&e).to_string();
        if let Some(k) = &key {
            store.idempotency.insert(
                k.clone(),
                Saved {
                    body: body.clone(),
                    status: 200,
                    response: response.clone(),
                    at: now,
                },
            );
        }
        response
    };
    if let Some(r) = maybe_drop(&shared).await {
        return r;
    }
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        stored,
    )
        .into_response()
}

/// After storing: lose the answer if a drop fault is armed.
async fn maybe_drop(shared: &Shared) -> Option<Response> {
    let mode = lock(&shared.faults).drop_after_store.pop_front()?;
    match mode {
        DropMode::Status502 => Some((StatusCode::BAD_GATEWAY, "Bad Gateway").into_response()),
        DropMode::Stall(d) => {
            tokio::time::sleep(d).await;
            None
        }
    }
}

async fn post_session(State(shared): Sim, headers: HeaderMap, body: String) -> Response {
    record(&shared, SESSION_ROUTE, &headers, &body);
    if let Err(r) = authorize_secret(&shared, &headers) {
        return r;
    }
    let now = Utc::now();
    let ttl = chrono::Duration::from_std(shared.config.session_ttl).unwrap_or_default();
    let mut store = lock(&shared.store);
    store.sessions_created += 1;
    let n = store.sessions_created;
    let token = format!("mes_tok_sim_{n}");
    store.sessions.insert(token.clone(), now + ttl);
    (
        StatusCode::OK,
        Json(json!({
            "id": format!("mes_sim_{n}"),
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": now.to_rfc3339_opts(SecondsFormat::Millis, true),
            "expires_at": (now + ttl).to_rfc3339_opts(SecondsFormat::Millis, true),
            "livemode": false,
        })),
    )
        .into_response()
}

async fn post_stream(State(shared): Sim, headers: HeaderMap, body: String) -> Response {
    record(&shared, STREAM_ROUTE, &headers, &body);
    let now = Utc::now();
    let token = bearer(&headers).unwrap_or_default();
    let expires = lock(&shared.store).sessions.get(&token).copied();
    match expires {
        None => {
            return stripe_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("unauthorized"),
                "The meter event session token is not valid.",
            )
        }
        Some(t) if t <= now => {
            return stripe_error(
                StatusCode::UNAUTHORIZED,
                "temporary_session_expired",
                Some("billing_meter_event_session_expired"),
                "The meter event session has expired. Create a new session.",
            )
        }
        Some(_) => {}
    }
    if let Some(r) = injected(&shared).await {
        return r;
    }
    let parsed: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(_) => return invalid("The request body is not valid JSON.", None),
    };
    let Some(events) = parsed.get("events").and_then(Value::as_array) else {
        return invalid("Missing required param: events.", Some("events"));
    };
    if events.is_empty() || events.len() > shared.config.max_stream_events {
        return invalid(
            &format!(
                "events must hold between 1 and {} events.",
                shared.config.max_stream_events
            ),
            Some("events"),
        );
    }
    // Structural validation of the whole request first: nothing is stored if any event is
    // malformed.
    let mut incoming = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let Some(obj) = e.as_object() else {
            return invalid(&format!("events[{i}] must be an object."), Some("events"));
        };
        if let Some(k) = obj.keys().find(|k| {
            !matches!(
                k.as_str(),
                "event_name" | "identifier" | "timestamp" | "payload"
            )
        }) {
            return invalid(
                &format!("Received unknown parameter: events[{i}].{k}"),
                None,
            );
        }
        let Some(event_name) = obj.get("event_name").and_then(Value::as_str) else {
            return invalid(&format!("events[{i}].event_name is required."), None);
        };
        let Some(payload) = obj.get("payload").and_then(Value::as_object) else {
            return invalid(&format!("events[{i}].payload is required."), None);
        };
        let mut map = BTreeMap::new();
        for (k, v) in payload {
            let Some(s) = v.as_str() else {
                return invalid(&format!("events[{i}].payload.{k} must be a string."), None);
            };
            map.insert(k.clone(), s.to_string());
        }
        let identifier = match obj.get("identifier") {
            None => None,
            Some(Value::String(s)) if s.chars().count() <= 100 => Some(s.clone()),
            Some(_) => return invalid(&format!("events[{i}].identifier is invalid."), None),
        };
        let timestamp = match obj.get("timestamp") {
            None => now.timestamp(),
            Some(Value::String(s)) => match DateTime::parse_from_rfc3339(s) {
                Ok(t) => t.timestamp(),
                Err(_) => return invalid(&format!("events[{i}].timestamp is not RFC 3339."), None),
            },
            Some(_) => return invalid(&format!("events[{i}].timestamp must be a string."), None),
        };
        incoming.push((event_name.to_string(), identifier, timestamp, map));
    }
    {
        let mut store = lock(&shared.store);
        for (event_name, identifier, timestamp, payload) in incoming {
            let identifier = match identifier {
                Some(i) => i,
                None => {
                    store.generated += 1;
                    format!("sim_{}", store.generated)
                }
            };
            if let Err((_, m)) = window(&shared, timestamp, now) {
                store.async_errors.push((identifier, m));
                continue;
            }
            if is_duplicate(&store, &shared, &identifier, now) {
                // Dropped silently, as the stream does.
                continue;
            }
            let e = StoredMeterEvent {
                identifier,
                event_name,
                customer: payload
                    .get("stripe_customer_id")
                    .cloned()
                    .unwrap_or_default(),
                payload,
                timestamp,
                created: now,
                api: Api::V2Stream,
            };
            async_checks(&shared, &mut store, &e);
            store.events.push(e);
        }
    }
    if let Some(r) = maybe_drop(&shared).await {
        return r;
    }
    (StatusCode::OK, Json(Value::Object(Map::new()))).into_response()
}

// --- read-back: meters and their event summaries -------------------------------------------

/// The query pairs of a GET, refusing parameters outside `allowed` as Stripe does.
#[allow(clippy::result_large_err)]
fn get_params(uri: &Uri, allowed: &[&str]) -> Result<BTreeMap<String, String>, Response> {
    let pairs = match Query::<Vec<(String, String)>>::try_from_uri(uri) {
        Ok(Query(p)) => p,
        Err(_) => return Err(invalid("The query string could not be parsed.", None)),
    };
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        if !allowed.contains(&k.as_str()) && !k.starts_with("expand[") {
            return Err(invalid(
                &format!("Received unknown parameter: {k}"),
                Some(&k),
            ));
        }
        out.insert(k, v);
    }
    Ok(out)
}

/// `limit`: 1 to 100, default 10.
#[allow(clippy::result_large_err)]
fn list_limit(params: &BTreeMap<String, String>) -> Result<usize, Response> {
    match params.get("limit") {
        None => Ok(10),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => Ok(n),
            _ => Err(invalid_code(
                &format!("Invalid limit: must be between 1 and 100, got {v}"),
                "limit",
                "parameter_invalid_integer",
            )),
        },
    }
}

fn invalid_code(message: &str, param: &str, code: &str) -> Response {
    let error = json!({
        "type": "invalid_request_error",
        "message": message,
        "param": param,
        "code": code,
    });
    (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response()
}

/// One page of `items` (ids first) after `starting_after`, as a Stripe list.
#[allow(clippy::result_large_err)]
fn list_page(
    items: Vec<(String, Value)>,
    params: &BTreeMap<String, String>,
    url: &str,
    what: &str,
) -> Result<Response, Response> {
    let limit = list_limit(params)?;
    let start = match params.get("starting_after") {
        None => 0,
        Some(after) => match items.iter().position(|(id, _)| id == after) {
            Some(i) => i + 1,
            None => {
                return Err(invalid_code(
                    &format!("No such {what}: '{after}'"),
                    "starting_after",
                    "resource_missing",
                ))
            }
        },
    };
    let rest: Vec<Value> = items.into_iter().skip(start).map(|(_, v)| v).collect();
    let has_more = rest.len() > limit;
    let data: Vec<Value> = rest.into_iter().take(limit).collect();
    Ok((
        StatusCode::OK,
        Json(json!({ "object": "list", "data": data, "has_more": has_more, "url": url })),
    )
        .into_response())
}

/// Authorization and injected read failures of a GET.
#[allow(clippy::result_large_err)]
fn read_gate(shared: &Shared, route: &str, headers: &HeaderMap, uri: &Uri) -> Result<(), Response> {
    record(shared, route, headers, uri.query().unwrap_or(""));
    authorize_secret(shared, headers)?;
    if let Some(code) = lock(&shared.faults).read_failures.pop_front() {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(stripe_error(status, "api_error", None, "simulated failure"));
    }
    Ok(())
}

/// `GET /v1/billing/meters`: newest first, `status` filter, `limit`, `starting_after`.
async fn list_meters(State(shared): Sim, headers: HeaderMap, uri: Uri) -> Response {
    if let Err(r) = read_gate(&shared, METERS_ROUTE, &headers, &uri) {
        return r;
    }
    let params = match get_params(
        &uri,
        &["limit", "starting_after", "ending_before", "status"],
    ) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if params.contains_key("ending_before") {
        return invalid("ending_before is not simulated.", Some("ending_before"));
    }
    let status = params.get("status").cloned();
    let items: Vec<(String, Value)> = lock(&shared.store)
        .meters
        .iter()
        .rev()
        .filter(|m| status.as_ref().is_none_or(|s| *s == m.status))
        .map(|m| (m.id.clone(), m.json()))
        .collect();
    list_page(items, &params, "/v1/billing/meters", "billing meter").unwrap_or_else(|r| r)
}

/// `GET /v1/billing/meters/{id}/event_summaries`: `customer`, `start_time`, `end_time`
/// (Unix seconds on minute boundaries, or hour/day boundaries with `value_grouping_window`),
/// one summary per window, chronological, paged.
async fn list_summaries(
    State(shared): Sim,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Err(r) = read_gate(&shared, SUMMARIES_ROUTE, &headers, &uri) {
        return r;
    }
    let params = match get_params(
        &uri,
        &[
            "customer",
            "start_time",
            "end_time",
            "value_grouping_window",
            "limit",
            "starting_after",
            "ending_before",
        ],
    ) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(meter) = lock(&shared.store)
        .meters
        .iter()
        .find(|m| m.id == id)
        .cloned()
    else {
        return stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("resource_missing"),
            &format!("No such billing meter: '{id}'"),
        );
    };
    if params.contains_key("ending_before") {
        return invalid("ending_before is not simulated.", Some("ending_before"));
    }
    let Some(customer) = params.get("customer").filter(|c| !c.is_empty()).cloned() else {
        return invalid_code(
            "Missing required param: customer.",
            "customer",
            "parameter_missing",
        );
    };
    let mut bounds = [0i64; 2];
    for (slot, name) in bounds.iter_mut().zip(["start_time", "end_time"]) {
        let Some(v) = params.get(name) else {
            return invalid_code(
                &format!("Missing required param: {name}."),
                name,
                "parameter_missing",
            );
        };
        match v.parse::<i64>() {
            Ok(t) => *slot = t,
            Err(_) => {
                return invalid_code(
                    &format!("Invalid integer: {v}"),
                    name,
                    "parameter_invalid_integer",
                )
            }
        }
    }
    let [start, end] = bounds;
    let (step, unit) = match params.get("value_grouping_window").map(String::as_str) {
        None => (None, 60),
        Some("hour") => (Some(3_600), 3_600),
        Some("day") => (Some(86_400), 86_400),
        Some(other) => {
            return invalid(
                &format!("Invalid value_grouping_window: must be one of day or hour, got {other}"),
                Some("value_grouping_window"),
            )
        }
    };
    for (name, t) in [("start_time", start), ("end_time", end)] {
        if t.rem_euclid(unit) != 0 {
            let boundary = match unit {
                60 => "minute",
                3_600 => "hour",
                _ => "day (00:00 UTC)",
            };
            return invalid(
                &format!("{name} {t} must be aligned with {boundary} boundaries."),
                Some(name),
            );
        }
    }
    if start >= end {
        return invalid("start_time must be before end_time.", Some("start_time"));
    }
    let windows: Vec<(i64, i64)> = match step {
        None => vec![(start, end)],
        Some(step) => (0..)
            .map(|i| start + i * step)
            .take_while(|s| *s < end)
            .map(|s| (s, (s + step).min(end)))
            .collect(),
    };
    let store = lock(&shared.store);
    let events: Vec<&StoredMeterEvent> = store
        .events
        .iter()
        .filter(|e| {
            e.event_name == meter.event_name
                && e.payload.get(&meter.customer_key) == Some(&customer)
                && !store.uncounted.contains(&e.identifier)
        })
        .collect();
    let mut items = Vec::with_capacity(windows.len());
    for (s, e) in windows {
        let inside: Vec<&&StoredMeterEvent> = events
            .iter()
            .filter(|ev| ev.timestamp >= s && ev.timestamp < e)
            .collect();
        let value = |ev: &StoredMeterEvent| {
            ev.payload
                .get(&meter.value_key)
                .and_then(|v| Decimal::from_str_exact(v).ok())
                .unwrap_or_default()
        };
        let aggregated = match meter.formula.as_str() {
            "count" => Decimal::from(inside.len()),
            "last" => inside
                .iter()
                .max_by_key(|ev| ev.timestamp)
                .map(|ev| value(ev))
                .unwrap_or_default(),
            _ => inside.iter().map(|ev| value(ev)).sum(),
        };
        // The exact number (serde_json keeps its text), as Stripe writes a JSON number.
        let number: Value =
            serde_json::from_str(&aggregated.normalize().to_string()).unwrap_or(Value::Null);
        let sid = format!("mtrusg_sim_{}_{s}_{e}", meter.id);
        items.push((
            sid.clone(),
            json!({
                "id": sid,
                "object": "billing.meter_event_summary",
                "aggregated_value": number,
                "end_time": e,
                "livemode": false,
                "meter": meter.id,
                "start_time": s,
            }),
        ));
    }
    drop(store);
    let url = format!("/v1/billing/meters/{}/event_summaries", meter.id);
    list_page(items, &params, &url, "billing meter event summary").unwrap_or_else(|r| r)
}
