//! A Lago event-ingestion simulator on loopback, for `billsync demo`, tests and benchmarks.
//!
//! Why: the sink's correctness hinges on Lago's exact idempotency and error semantics
//! (`shared/reference/invoicing-systems.md` 1.1–1.7), which a generic mock would not enforce.
//! This server reproduces them:
//!
//! - `POST /api/v1/events/batch` and `POST /api/v1/events`, Bearer auth (401 / 403 shapes);
//! - per-index validation (`value_is_mandatory`, `invalid_format`), `no_events`,
//!   `too_many_events`;
//! - the two event stores, chosen at start ([`Behaviour`]): **Postgres** (dedup on
//!   subscription + transaction id; a batch with any duplicate, or with one transaction id for
//!   two subscriptions, is refused whole with 422 and nothing stored) and **ClickHouse** (dedup on code + subscription + timestamp +
//!   transaction id; same key and timestamp replaces, another timestamp is a second
//!   billable event; never a 422 for duplicates);
//! - read-back: `GET /api/v1/events` (filters, pagination `meta`) and
//!   `GET /api/v1/events/{transaction_id}`.
//!
//! Faults are injected through the [`LagoSimHandle`] (5xx, 429, slowness, "store then lose
//! the answer", per-transaction validation errors), and the handle exposes what was stored
//! and received so tests can count events and sum values exactly (as [`Decimal`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Which Lago event store to imitate (they deduplicate differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Self-hosted default: unique (external_subscription_id, transaction_id); a batch holding
    /// any duplicate is rolled back whole and answered 422 `value_already_exist` per index.
    #[default]
    Postgres,
    /// High-volume pipeline: key (code, external_subscription_id, timestamp, transaction_id);
    /// the same key replaces, the same transaction id with another timestamp is a new event.
    ClickHouse,
}

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct LagoSimConfig {
    /// The API key accepted as `Authorization: Bearer <key>`.
    pub api_key: String,
    /// The event store to imitate.
    pub behaviour: Behaviour,
    /// Optional key that authenticates but may not write events (403
    /// `write_action_not_allowed_for_event`).
    pub read_only_api_key: Option<String>,
    /// Largest accepted batch (Lago's `LAGO_EVENTS_BATCH_MAX_LENGTH`, default 100).
    pub max_batch: usize,
}

impl Default for LagoSimConfig {
    fn default() -> Self {
        LagoSimConfig {
            api_key: "lago-sim-key".into(),
            behaviour: Behaviour::Postgres,
            read_only_api_key: None,
            max_batch: 100,
        }
    }
}

/// How a "store then drop the response" fault loses the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropMode {
    /// Answer 500 although the events were stored.
    Status500,
    /// Close the connection without writing any answer.
    CloseConnection,
    /// Answer 200 with the real answer cut in the middle (truncated JSON).
    TruncatedJson,
    /// Answer 200 with a body that is not JSON.
    MalformedJson,
    /// Answer 200 with valid JSON of the wrong shape (no `events` array).
    WrongShape,
}

/// One stored event, as Lago keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Lago's id of the row.
    pub lago_id: String,
    /// The client's idempotency key.
    pub transaction_id: String,
    /// The subscription the event targets.
    pub external_subscription_id: String,
    /// The billable metric code.
    pub code: String,
    /// The event time (millisecond precision, as Lago parses it).
    pub timestamp: DateTime<Utc>,
    /// The properties, as received.
    pub properties: Map<String, Value>,
    /// `precise_total_amount_cents`, when sent.
    pub precise_total_amount_cents: Option<String>,
    /// When the simulator stored it.
    pub created_at: DateTime<Utc>,
}

impl StoredEvent {
    fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("an event always serialises")
    }
}

/// The event as Lago answers it. Written straight from the stored event (not through a
/// `Value`): the simulator answers every batch of the benchmark harness, on the cores billsync
/// runs on.
impl serde::Serialize for StoredEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut e = serializer.serialize_struct("Event", 10)?;
        e.serialize_field("lago_id", &self.lago_id)?;
        e.serialize_field("transaction_id", &self.transaction_id)?;
        e.serialize_field("lago_customer_id", &None::<()>)?;
        e.serialize_field("code", &self.code)?;
        e.serialize_field("timestamp", &time(&self.timestamp))?;
        e.serialize_field("lago_subscription_id", &None::<()>)?;
        e.serialize_field("external_subscription_id", &self.external_subscription_id)?;
        e.serialize_field(
            "precise_total_amount_cents",
            &self.precise_total_amount_cents,
        )?;
        e.serialize_field("properties", &self.properties)?;
        e.serialize_field("created_at", &time(&self.created_at))?;
        e.end()
    }
}

/// The answer to a batch: `{"events": [...]}`.
#[derive(serde::Serialize)]
struct EventList<'a> {
    events: &'a [StoredEvent],
}

/// An injected answer for the next ingestion requests.
#[derive(Debug, Clone)]
enum Injected {
    Status(u16),
    RateLimited { retry_after: Option<u64> },
    Body { status: u16, body: String },
}

#[derive(Debug, Default)]
struct Faults {
    queue: VecDeque<Injected>,
    delay: Duration,
    /// Wait this long after storing a batch, before answering.
    answer_delay: Duration,
    drop_after_store: VecDeque<DropMode>,
    /// transaction_id → (field, error).
    reject: HashMap<String, (String, String)>,
    /// transaction_id → the status a batch holding it is answered (a Lago bug on one event).
    crash: HashMap<String, u16>,
    /// A sustained rate limit (see [`LagoSimHandle::set_rate_limit`]).
    rate: Option<RateWindow>,
}

/// A fixed-window rate limiter: at most `limit` ingestion requests per second; the windows
/// are whole seconds counted from the first request.
#[derive(Debug)]
struct RateWindow {
    limit: u32,
    started: Option<Instant>,
    used: u32,
}

/// A registered customer: its own timezone, its own invoice grace period, its billing entity.
type SimCustomer = (Option<String>, Option<i64>, Option<String>);

#[derive(Debug, Default)]
struct Store {
    events: Vec<StoredEvent>,
    /// (external_subscription_id, transaction_id) of every stored event: the Postgres
    /// unique index, so a duplicate check does not scan every event.
    keys: HashSet<(String, String)>,
    next_id: u64,
    /// Registered billable metrics: (code, aggregation_type, field_name).
    metrics: Vec<(String, String, Option<String>)>,
    /// Registered subscriptions: (external_id, external_customer_id, status), and each one's
    /// plan (`None`: listed without `plan_code`).
    subscriptions: Vec<(String, String, String)>,
    subscription_plans: Vec<Option<String>>,
    /// Registered plans: code → the billable metric codes it has a charge for.
    plans: BTreeMap<String, Vec<String>>,
    /// Registered billing entities: (code, invoice_grace_period, timezone). None registered:
    /// one default entity `default`, grace period 0, UTC (Lago's defaults).
    billing_entities: Vec<(String, i64, String)>,
    /// Registered customers: external_id → (timezone, invoice_grace_period, billing entity).
    /// A subscription's customer not registered is listed with neither (its entity's).
    customers: BTreeMap<String, SimCustomer>,
    /// What lean mode keeps instead of `events` and `keys`.
    lean: LeanStore,
}

/// Lean mode's store (benchmarks): a count and a 128-bit digest of each event's unique key,
/// nothing else. Kept whole, an event is ~1.2 KB of the simulator's memory: a 10M-record
/// benchmark's simulator grew to ~10 GB beside a 12 GB ledger on a 24 GB machine, and the
/// run measured the simulator's memory rather than billsync. Two SipHash digests with random
/// keys: a false duplicate among 10M keys has a probability of about 10^-25.
#[derive(Debug, Default)]
struct LeanStore {
    count: usize,
    /// The digests are random already: hashbrown's default hasher (foldhash) costs a fraction
    /// of std's SipHash on them, and the set gets one insert per event of a benchmark.
    digests: hashbrown::HashSet<u128>,
    hashers: [std::hash::RandomState; 2],
}

impl LeanStore {
    fn digest(&self, parts: &[&str]) -> u128 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let one = |state: &std::hash::RandomState| {
            let mut h = state.build_hasher();
            // `str`'s Hash ends each part with a separator byte, so parts cannot run together.
            parts.iter().for_each(|p| p.hash(&mut h));
            h.finish()
        };
        (u128::from(one(&self.hashers[0])) << 64) | u128::from(one(&self.hashers[1]))
    }

    /// The key that makes an event a duplicate on each store (see [`Behaviour`]).
    fn key(&self, behaviour: Behaviour, e: &Incoming) -> u128 {
        match behaviour {
            Behaviour::Postgres => self.digest(&[&e.external_subscription_id, &e.transaction_id]),
            Behaviour::ClickHouse => self.digest(&[
                &e.code,
                &e.external_subscription_id,
                &e.transaction_id,
                &e.timestamp.timestamp_millis().to_string(),
            ]),
        }
    }
}

#[derive(Debug)]
struct Shared {
    config: LagoSimConfig,
    store: Mutex<Store>,
    faults: Mutex<Faults>,
    requests: Mutex<Vec<ReceivedRequest>>,
    /// Ingestion requests received (refused ones included).
    ingest_requests: AtomicUsize,
    /// Ingestion requests answered 429 by the sustained rate limit.
    throttled: AtomicUsize,
    /// Keep no request bodies (benchmarks: millions of requests).
    lean: AtomicBool,
}

/// A request the simulator received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRequest {
    /// `POST /api/v1/events/batch`, `GET /api/v1/events`, …
    pub route: String,
    /// The raw body.
    pub body: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these plain collections half-updated in a
    // way that matters for a simulator; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running simulator. Serves until [`LagoSimHandle::shutdown`] or drop.
#[derive(Debug)]
pub struct LagoSimHandle {
    /// Base URL, e.g. `http://127.0.0.1:41234` (configure it as the sink's `api_url`).
    pub url: String,
    /// The bound address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Entry point: `LagoSim::start(config)`.
#[derive(Debug)]
pub struct LagoSim;

impl LagoSim {
    /// Bind `127.0.0.1:0` and serve in a background task of the current Tokio runtime.
    pub async fn start(config: LagoSimConfig) -> io::Result<LagoSimHandle> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            store: Mutex::new(Store::default()),
            faults: Mutex::new(Faults::default()),
            requests: Mutex::new(Vec::new()),
            ingest_requests: AtomicUsize::new(0),
            throttled: AtomicUsize::new(0),
            lean: AtomicBool::new(false),
        });
        let app = Router::new()
            .route("/api/v1/events/batch", post(post_batch))
            .route("/api/v1/events", post(post_single).get(list_events))
            .route("/api/v1/events/{transaction_id}", get(show_event))
            .route("/api/v1/billable_metrics", get(list_metrics))
            .route("/api/v1/subscriptions", get(list_subscriptions))
            .route("/api/v1/billing_entities", get(list_billing_entities))
            .route("/api/v1/plans", get(list_plans))
            .route("/api/v1/plans/{code}", get(show_plan))
            .route("/api/v1/customers", get(list_customers))
            .route(
                "/api/v1/customers/{external_customer_id}",
                get(show_customer),
            )
            .fallback(unmatched)
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(
                KillableListener(listener),
                app.into_make_service_with_connect_info::<KillSwitch>(),
            )
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "lago simulator stopped with an error");
            }
        });
        Ok(LagoSimHandle {
            url: format!("http://{addr}"),
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }
}

impl LagoSimHandle {
    /// Stop serving and wait for the server task (open connections finish first).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    // --- faults -------------------------------------------------------------------------

    /// Answer the next `n` ingestion requests with `status` (e.g. 500, 502, 503), storing nothing.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut f = lock(&self.shared.faults);
        f.queue
            .extend(std::iter::repeat_n(Injected::Status(status), n));
    }

    /// Answer the next `n` ingestion requests 429, with `Retry-After: <secs>` when given.
    pub fn rate_limit_next(&self, n: usize, retry_after: Option<u64>) {
        let mut f = lock(&self.shared.faults);
        f.queue.extend(std::iter::repeat_n(
            Injected::RateLimited { retry_after },
            n,
        ));
    }

    /// Answer the next `n` ingestion requests with `status` and this exact body (truncated or
    /// malformed JSON, valid JSON of the wrong shape…), storing nothing.
    pub fn answer_next(&self, n: usize, status: u16, body: &str) {
        let mut f = lock(&self.shared.faults);
        f.queue.extend(std::iter::repeat_n(
            Injected::Body {
                status,
                body: body.to_string(),
            },
            n,
        ));
    }

    /// Wait this long before handling each ingestion request (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.shared.faults).delay = delay;
    }

    /// A sustained rate limit: at most `per_second` ingestion requests in each whole second
    /// (fixed windows from the first request); the excess is answered 429 with
    /// `Retry-After` and `X-RateLimit-Limit/Remaining/Reset`, as Lago Cloud does. `None` lifts it.
    pub fn set_rate_limit(&self, per_second: Option<u32>) {
        lock(&self.shared.faults).rate = per_second.map(|limit| RateWindow {
            limit: limit.max(1),
            started: None,
            used: 0,
        });
    }

    /// Ingestion requests answered 429 by the sustained rate limit so far.
    pub fn throttled_count(&self) -> usize {
        self.shared.throttled.load(Ordering::Relaxed)
    }

    /// Keep no request bodies and no events, for benchmarks with millions of them: the
    /// idempotency of the store stays (duplicates refused or replaced as without it), the
    /// answers are the same, [`LagoSimHandle::event_count`] and the request counts still work;
    /// [`LagoSimHandle::bodies`], [`LagoSimHandle::requests`], [`LagoSimHandle::events`] and
    /// the totals see only what was stored before.
    pub fn set_lean(&self, lean: bool) {
        self.shared.lean.store(lean, Ordering::Relaxed);
    }

    /// Number of stored events (cheaper than `events().len()`), lean mode's included.
    pub fn event_count(&self) -> usize {
        let store = lock(&self.shared.store);
        store.events.len() + store.lean.count
    }

    /// Wait this long after storing each batch before answering: a client that dies (or
    /// times out) meanwhile leaves events stored that it never heard about.
    pub fn set_answer_delay(&self, delay: Duration) {
        lock(&self.shared.faults).answer_delay = delay;
    }

    /// For the next `n` ingestion requests that store events: store them, then lose the answer.
    pub fn store_then_drop_next(&self, n: usize, mode: DropMode) {
        let mut f = lock(&self.shared.faults);
        f.drop_after_store.extend(std::iter::repeat_n(mode, n));
    }

    /// Refuse any event with this transaction id: 422 `{"<i>":{"properties":["invalid_value"]}}`.
    pub fn reject_transaction(&self, transaction_id: impl Into<String>) {
        self.reject_transaction_with(transaction_id, "properties", "invalid_value");
    }

    /// Refuse any event with this transaction id with the given field and error code.
    pub fn reject_transaction_with(
        &self,
        transaction_id: impl Into<String>,
        field: impl Into<String>,
        error: impl Into<String>,
    ) {
        lock(&self.shared.faults)
            .reject
            .insert(transaction_id.into(), (field.into(), error.into()));
    }

    /// Answer `status` (e.g. 500) to every batch holding an event with this transaction id,
    /// storing none of the batch: a Lago bug on one event's value fails its whole request,
    /// at every retry (the batch is one Postgres transaction, rolled back).
    pub fn crash_on_transaction(&self, transaction_id: impl Into<String>, status: u16) {
        lock(&self.shared.faults)
            .crash
            .insert(transaction_id.into(), status);
    }

    /// Remove every pending fault, the delay and the rejections.
    pub fn clear_faults(&self) {
        *lock(&self.shared.faults) = Faults::default();
    }

    // --- catalogue (for `billsync mappings check --remote`) -----------------------------

    /// Register a billable metric, listed by `GET /api/v1/billable_metrics`.
    pub fn register_metric(&self, code: &str, aggregation_type: &str, field_name: Option<&str>) {
        lock(&self.shared.store).metrics.push((
            code.to_string(),
            aggregation_type.to_string(),
            field_name.map(str::to_string),
        ));
    }

    /// Register an active subscription, listed by `GET /api/v1/subscriptions`.
    pub fn register_subscription(&self, external_id: &str, external_customer_id: &str) {
        self.register_subscription_with_status(external_id, external_customer_id, "active");
    }

    /// Register a subscription in a given status (`active`, `pending`, `terminated`,
    /// `canceled`): listed by `GET /api/v1/subscriptions` when the request asks for that status
    /// (`status[]=…`); without a status filter Lago lists the active ones only.
    pub fn register_subscription_with_status(
        &self,
        external_id: &str,
        external_customer_id: &str,
        status: &str,
    ) {
        let mut store = lock(&self.shared.store);
        store.subscriptions.push((
            external_id.to_string(),
            external_customer_id.to_string(),
            status.to_string(),
        ));
        store.subscription_plans.push(None);
    }

    /// [`Self::register_subscription_with_status`] on the plan `plan_code` (listed as the
    /// subscription's `plan_code`; see [`Self::register_plan`]). One external id may be
    /// registered twice, as Lago lists it after a plan change: terminated on the old plan,
    /// active on the new one.
    pub fn register_subscription_on_plan(
        &self,
        external_id: &str,
        external_customer_id: &str,
        status: &str,
        plan_code: &str,
    ) {
        self.register_subscription_with_status(external_id, external_customer_id, status);
        *lock(&self.shared.store)
            .subscription_plans
            .last_mut()
            .expect("just registered") = Some(plan_code.to_string());
    }

    /// Register a plan with a charge for each of `metric_codes` (`GET /api/v1/plans/{code}`,
    /// `GET /api/v1/plans`).
    pub fn register_plan(&self, code: &str, metric_codes: &[&str]) {
        lock(&self.shared.store).plans.insert(
            code.to_string(),
            metric_codes.iter().map(|m| m.to_string()).collect(),
        );
    }

    /// Register a billing entity (`GET /api/v1/billing_entities`); the first registered is
    /// the default one. Without any, Lago's default entity is listed: `default`, grace period
    /// 0 days, UTC.
    pub fn register_billing_entity(&self, code: &str, invoice_grace_period: i64, timezone: &str) {
        lock(&self.shared.store).billing_entities.push((
            code.to_string(),
            invoice_grace_period,
            timezone.to_string(),
        ));
    }

    /// Register a customer (`GET /api/v1/customers[/{external_id}]`) with its own timezone
    /// and invoice grace period (`None`: its billing entity's) and billing entity (`None`: the
    /// default one).
    pub fn register_customer(
        &self,
        external_id: &str,
        timezone: Option<&str>,
        invoice_grace_period: Option<i64>,
        billing_entity: Option<&str>,
    ) {
        lock(&self.shared.store).customers.insert(
            external_id.to_string(),
            (
                timezone.map(str::to_string),
                invoice_grace_period,
                billing_entity.map(str::to_string),
            ),
        );
    }

    // --- inspection ---------------------------------------------------------------------

    /// Every stored event, in storage order.
    pub fn events(&self) -> Vec<StoredEvent> {
        lock(&self.shared.store).events.clone()
    }

    /// Remove every stored event with this transaction id (an event lost on Lago's side, for
    /// reconciliation tests). Returns how many were removed.
    pub fn delete_event(&self, transaction_id: &str) -> usize {
        let mut store = lock(&self.shared.store);
        let before = store.events.len();
        store.events.retain(|e| e.transaction_id != transaction_id);
        store.keys.retain(|(_, t)| t != transaction_id);
        before - store.events.len()
    }

    /// Overwrite one property of every stored event with this transaction id (a sink whose
    /// stored value differs from what was sent, for reconciliation tests). Returns how many
    /// events changed.
    pub fn set_event_property(&self, transaction_id: &str, property: &str, value: Value) -> usize {
        let mut store = lock(&self.shared.store);
        let mut changed = 0;
        for e in store
            .events
            .iter_mut()
            .filter(|e| e.transaction_id == transaction_id)
        {
            e.properties.insert(property.to_string(), value.clone());
            changed += 1;
        }
        changed
    }

    /// How many stored events carry this transaction id (any subscription).
    pub fn count(&self, transaction_id: &str) -> usize {
        lock(&self.shared.store)
            .events
            .iter()
            .filter(|e| e.transaction_id == transaction_id)
            .count()
    }

    /// Stored events per transaction id.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for e in &lock(&self.shared.store).events {
            *out.entry(e.transaction_id.clone()).or_insert(0) += 1;
        }
        out
    }

    /// Sum of `property` over the stored events of (subscription, code), parsed exactly
    /// (no float on the way). Values that are not numbers are skipped, as Lago skips them
    /// when aggregating. `None` if the sum overflows [`Decimal`].
    pub fn total(
        &self,
        external_subscription_id: &str,
        code: &str,
        property: &str,
    ) -> Option<Decimal> {
        lock(&self.shared.store)
            .events
            .iter()
            .filter(|e| e.external_subscription_id == external_subscription_id && e.code == code)
            .filter_map(|e| e.properties.get(property).and_then(decimal_of))
            .try_fold(Decimal::ZERO, |acc, d| acc.checked_add(d))
    }

    /// Sums per (subscription, code, property) of every numeric property value; `None` for a
    /// sum that overflows [`Decimal`].
    pub fn totals(&self) -> BTreeMap<(String, String, String), Option<Decimal>> {
        let mut out: BTreeMap<(String, String, String), Option<Decimal>> = BTreeMap::new();
        for e in &lock(&self.shared.store).events {
            for (name, value) in &e.properties {
                if let Some(d) = decimal_of(value) {
                    let sum = out
                        .entry((
                            e.external_subscription_id.clone(),
                            e.code.clone(),
                            name.clone(),
                        ))
                        .or_insert(Some(Decimal::ZERO));
                    *sum = sum.and_then(|s| s.checked_add(d));
                }
            }
        }
        out
    }

    /// Number of ingestion requests received (`POST` batch or single), including refused ones.
    pub fn request_count(&self) -> usize {
        self.shared.ingest_requests.load(Ordering::Relaxed)
    }

    /// The raw bodies of the ingestion requests, in arrival order.
    pub fn bodies(&self) -> Vec<String> {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.route.starts_with("POST"))
            .map(|r| r.body.clone())
            .collect()
    }

    /// Every request received (ingestion and read-back).
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        lock(&self.shared.requests).clone()
    }
}

impl Drop for LagoSimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A property value as an exact decimal: a string or a JSON number (no float on the way).
fn decimal_of(value: &Value) -> Option<Decimal> {
    let text = match value {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    Decimal::from_str_exact(&text)
        .ok()
        .or_else(|| Decimal::from_scientific(&text).ok())
}

// --- connection killing ---------------------------------------------------------------------

/// Per-connection switch: once set, the connection fails every write, so the client gets
/// no answer at all (the "crashed after storing" case).
#[derive(Debug, Clone, Default)]
struct KillSwitch(Arc<AtomicBool>);

struct KillableListener(TcpListener);

struct KillableStream {
    inner: TcpStream,
    kill: KillSwitch,
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableStream;
    type Addr = KillSwitch;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((inner, _)) => {
                    let kill = KillSwitch::default();
                    return (
                        KillableStream {
                            inner,
                            kill: kill.clone(),
                        },
                        kill,
                    );
                }
                Err(e) => {
                    tracing::debug!(error = %e, "lago simulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(KillSwitch::default())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, KillableListener>>
    for KillSwitch
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, KillableListener>) -> Self {
        stream.remote_addr().clone()
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.kill.0.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "simulated crash: connection dropped",
            )));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// --- handlers -------------------------------------------------------------------------------

type Sim = State<Arc<Shared>>;

fn error_body(status: StatusCode, extra: Value) -> Response {
    let mut body = json!({
        "status": status.as_u16(),
        "error": status.canonical_reason().unwrap_or("Error"),
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    (status, Json(body)).into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"status": 401, "error": "Unauthorized"})),
    )
        .into_response()
}

fn validation_errors(details: Value) -> Response {
    error_body(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({"code": "validation_errors", "error_details": details}),
    )
}

/// A JSON body Rails cannot parse: `ActionDispatch::Http::Parameters::ParseError`, which no
/// lago-api controller rescues, is a 400 rendered by Rails' public exceptions app in the
/// request's format: `{"status":400,"error":"Bad Request"}`.
fn unparsable_body() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"status": 400, "error": "Bad Request"})),
    )
        .into_response()
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"status": 400, "error": format!("BadRequest: {message}")})),
    )
        .into_response()
}

/// Access check as Lago does it: the second whitespace-separated token of `Authorization`.
// The error is the ready answer, returned once per request: its size does not matter.
#[allow(clippy::result_large_err)]
fn authorize(shared: &Shared, headers: &HeaderMap, write: bool) -> Result<(), Response> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_whitespace().nth(1));
    match token {
        Some(t) if t == shared.config.api_key => Ok(()),
        Some(t) if shared.config.read_only_api_key.as_deref() == Some(t) => {
            if write {
                Err(error_body(
                    StatusCode::FORBIDDEN,
                    json!({"code": "write_action_not_allowed_for_event"}),
                ))
            } else {
                Ok(())
            }
        }
        _ => Err(unauthorized()),
    }
}

fn record(shared: &Shared, route: &str, body: &str) {
    if route.starts_with("POST") {
        shared.ingest_requests.fetch_add(1, Ordering::Relaxed);
    }
    if shared.lean.load(Ordering::Relaxed) {
        return;
    }
    lock(&shared.requests).push(ReceivedRequest {
        route: route.to_string(),
        body: body.to_string(),
    });
}

/// Delay and one-shot injected answers, applied to ingestion requests after auth.
async fn injected(shared: &Shared) -> Option<Response> {
    let delay = lock(&shared.faults).delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (next, throttled) = {
        let mut f = lock(&shared.faults);
        let next = f.queue.pop_front();
        let throttled = match (&next, f.rate.as_mut()) {
            (None, Some(rate)) => rate.admit(Instant::now()),
            _ => None,
        };
        (next, throttled)
    };
    if let Some((limit, reset)) = throttled {
        shared.throttled.fetch_add(1, Ordering::Relaxed);
        let mut resp = error_body(StatusCode::TOO_MANY_REQUESTS, json!({}));
        let headers = resp.headers_mut();
        for (name, value) in [
            ("x-ratelimit-limit", limit.to_string()),
            ("x-ratelimit-remaining", "0".to_string()),
            ("x-ratelimit-reset", reset.to_string()),
            ("retry-after", reset.to_string()),
        ] {
            if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        }
        return Some(resp);
    }
    match next? {
        Injected::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Some(error_body(status, json!({})))
        }
        Injected::RateLimited { retry_after } => {
            let mut resp = error_body(StatusCode::TOO_MANY_REQUESTS, json!({}));
            let headers = resp.headers_mut();
            headers.insert(
                "x-ratelimit-limit",
                axum::http::HeaderValue::from_static("500"),
            );
            headers.insert(
                "x-ratelimit-remaining",
                axum::http::HeaderValue::from_static("0"),
            );
            if let Some(secs) = retry_after {
                if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                    headers.insert(axum::http::header::RETRY_AFTER, v);
                }
            }
            Some(resp)
        }
        Injected::Body { status, body } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Some((status, [("content-type", "application/json")], body).into_response())
        }
    }
}

impl RateWindow {
    /// Count one request at `now`: `None` when admitted, else `(limit, seconds to the reset)`.
    fn admit(&mut self, now: Instant) -> Option<(u32, u64)> {
        let started = *self.started.get_or_insert(now);
        let elapsed = now.duration_since(started).as_secs();
        if elapsed > 0 {
            self.started = Some(started + Duration::from_secs(elapsed));
            self.used = 0;
        }
        if self.used < self.limit {
            self.used += 1;
            return None;
        }
        // Whole seconds, rounded up, as the header carries them: at least 1.
        Some((self.limit, 1))
    }
}

/// A validated incoming event.
struct Incoming {
    transaction_id: String,
    external_subscription_id: String,
    code: String,
    timestamp: DateTime<Utc>,
    properties: Map<String, Value>,
    precise_total_amount_cents: Option<String>,
}

/// Lago's `BigDecimal(timestamp.to_s)`: integer, number or numeric string of Unix seconds,
/// kept to the millisecond.
fn parse_timestamp(value: &Value) -> Option<DateTime<Utc>> {
    let text = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        _ => return None,
    };
    let secs = Decimal::from_str(&text)
        .ok()
        .or_else(|| Decimal::from_scientific(&text).ok())?;
    let millis = (secs * Decimal::from(1000)).trunc();
    let millis = i64::try_from(millis).ok()?;
    DateTime::from_timestamp_millis(millis)
}

fn mandatory_string(obj: &mut Map<String, Value>, field: &str) -> Option<String> {
    match obj.remove(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// Validate one event; `Err` holds `{field: [errors]}`. The event is taken apart, not copied
/// (the benchmark harness sends millions through the simulator, on billsync's cores).
fn validate(
    shared: &Shared,
    event: Value,
    now: DateTime<Utc>,
) -> Result<Incoming, Map<String, Value>> {
    let mut errors = Map::new();
    let Value::Object(mut obj) = event else {
        errors.insert("event".into(), json!(["invalid_format"]));
        return Err(errors);
    };
    let mut need = |field: &str| {
        let v = mandatory_string(&mut obj, field);
        if v.is_none() {
            errors.insert(field.to_string(), json!(["value_is_mandatory"]));
        }
        v
    };
    let transaction_id = need("transaction_id");
    let code = need("code");
    let external_subscription_id = need("external_subscription_id");
    let timestamp = match obj.get("timestamp") {
        None | Some(Value::Null) => Some(now),
        Some(v) => {
            let t = parse_timestamp(v);
            if t.is_none() {
                errors.insert("timestamp".into(), json!(["invalid_format"]));
            }
            t
        }
    };
    let properties = match obj.remove("properties") {
        None | Some(Value::Null) => Some(Map::new()),
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            errors.insert("properties".into(), json!(["invalid_format"]));
            None
        }
    };
    if let Some(tid) = &transaction_id {
        if let Some((field, error)) = lock(&shared.faults).reject.get(tid) {
            errors.insert(field.clone(), json!([error]));
        }
    }
    let precise_total_amount_cents =
        obj.remove("precise_total_amount_cents")
            .and_then(|v| match v {
                Value::String(s) => Some(s),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
    match (
        transaction_id,
        code,
        external_subscription_id,
        timestamp,
        properties,
    ) {
        (
            Some(transaction_id),
            Some(code),
            Some(external_subscription_id),
            Some(timestamp),
            Some(properties),
        ) if errors.is_empty() => Ok(Incoming {
            transaction_id,
            external_subscription_id,
            code,
            timestamp,
            properties,
            precise_total_amount_cents,
        }),
        _ => Err(errors),
    }
}

/// Store validated events according to the behaviour. `Err` holds, per position, the
/// duplicates that made a Postgres insert roll back (nothing stored then).
fn store(
    shared: &Shared,
    incoming: Vec<Incoming>,
    now: DateTime<Utc>,
) -> Result<Vec<StoredEvent>, Vec<usize>> {
    let mut store = lock(&shared.store);
    if shared.lean.load(Ordering::Relaxed) {
        return store_lean(&mut store, shared.config.behaviour, incoming, now);
    }
    match shared.config.behaviour {
        Behaviour::Postgres => {
            let keys: Vec<(String, String)> = incoming
                .iter()
                .map(|e| (e.external_subscription_id.clone(), e.transaction_id.clone()))
                .collect();
            let duplicates = postgres_duplicates(&incoming, |i| store.keys.contains(&keys[i]));
            if !duplicates.is_empty() {
                return Err(duplicates);
            }
            store.keys.extend(keys);
            let stored: Vec<StoredEvent> = incoming
                .into_iter()
                .map(|e| new_stored(&mut store, e, now))
                .collect();
            store.events.extend(stored.iter().cloned());
            Ok(stored)
        }
        Behaviour::ClickHouse => {
            let mut stored = Vec::with_capacity(incoming.len());
            for e in incoming {
                let event = new_stored(&mut store, e, now);
                let same = store.events.iter().position(|s| {
                    s.code == event.code
                        && s.external_subscription_id == event.external_subscription_id
                        && s.timestamp == event.timestamp
                        && s.transaction_id == event.transaction_id
                });
                match same {
                    Some(pos) => store.events[pos] = event.clone(),
                    None => {
                        store.keys.insert((
                            event.external_subscription_id.clone(),
                            event.transaction_id.clone(),
                        ));
                        store.events.push(event.clone())
                    }
                }
                stored.push(event);
            }
            Ok(stored)
        }
    }
}

/// The positions lago-api reports `value_already_exist` for in a batch on the Postgres store
/// (`Events::CreateBatchService#bulk_insert_events`): `insert_all` stores every event whose
/// (external_subscription_id, transaction_id) is neither stored (`stored(i)`) nor taken by an
/// earlier event of the batch; the stored rows are then matched back to the events by
/// `transaction_id` alone, in order, each stored row once. So an event is reported when no
/// stored row of its transaction id is left: a repeat of a stored key, and also the second
/// of one transaction id sent for two subscriptions (stored, but its row went to the first).
fn postgres_duplicates(incoming: &[Incoming], stored: impl Fn(usize) -> bool) -> Vec<usize> {
    // hashbrown's (foldhash) sets, as the lean store's: the benchmark's simulator shares the
    // cores with billsync, and SipHash over every key of every batch is its own cost.
    let mut taken: hashbrown::HashSet<(&str, &str)> =
        hashbrown::HashSet::with_capacity(incoming.len());
    let mut inserted: hashbrown::HashSet<&str> = hashbrown::HashSet::with_capacity(incoming.len());
    for (i, e) in incoming.iter().enumerate() {
        let key = (
            e.external_subscription_id.as_str(),
            e.transaction_id.as_str(),
        );
        if !stored(i) && taken.insert(key) {
            inserted.insert(e.transaction_id.as_str());
        }
    }
    incoming
        .iter()
        .enumerate()
        .filter(|(_, e)| !inserted.remove(e.transaction_id.as_str()))
        .map(|(i, _)| i)
        .collect()
}

/// [`store`] in lean mode: the same answers and the same duplicates, only digests kept.
fn store_lean(
    store: &mut Store,
    behaviour: Behaviour,
    incoming: Vec<Incoming>,
    now: DateTime<Utc>,
) -> Result<Vec<StoredEvent>, Vec<usize>> {
    let keys: Vec<u128> = incoming
        .iter()
        .map(|e| store.lean.key(behaviour, e))
        .collect();
    match behaviour {
        Behaviour::Postgres => {
            let duplicates = postgres_duplicates(&incoming, |i| {
                let e = &incoming[i];
                store.lean.digests.contains(&keys[i])
                    // An event stored before lean mode was switched on.
                    || (!store.keys.is_empty()
                        && store.keys.contains(&(
                            e.external_subscription_id.clone(),
                            e.transaction_id.clone(),
                        )))
            });
            if !duplicates.is_empty() {
                return Err(duplicates);
            }
            store.lean.count += keys.len();
            store.lean.digests.extend(keys);
        }
        // A repeat replaces the earlier row: stored again, not counted again.
        Behaviour::ClickHouse => {
            for key in keys {
                if store.lean.digests.insert(key) {
                    store.lean.count += 1;
                }
            }
        }
    }
    Ok(incoming
        .into_iter()
        .map(|e| new_stored(store, e, now))
        .collect())
}

fn new_stored(store: &mut Store, e: Incoming, now: DateTime<Utc>) -> StoredEvent {
    store.next_id += 1;
    StoredEvent {
        lago_id: format!("00000000-0000-4000-8000-{:012x}", store.next_id),
        transaction_id: e.transaction_id,
        external_subscription_id: e.external_subscription_id,
        code: e.code,
        timestamp: e.timestamp,
        properties: e.properties,
        precise_total_amount_cents: e.precise_total_amount_cents,
        created_at: now,
    }
}

/// After storing: lose the answer if a drop fault is armed.
fn maybe_drop(shared: &Shared, kill: &KillSwitch, stored: &[StoredEvent]) -> Option<Response> {
    let mode = lock(&shared.faults).drop_after_store.pop_front()?;
    let json_200 = |body: String| {
        Some((StatusCode::OK, [("content-type", "application/json")], body).into_response())
    };
    match mode {
        DropMode::TruncatedJson => {
            let events: Vec<Value> = stored.iter().map(StoredEvent::to_json).collect();
            let full = json!({ "events": events }).to_string();
            let cut = (0..=full.len() / 2)
                .rev()
                .find(|&i| full.is_char_boundary(i))
                .unwrap_or(0);
            json_200(full[..cut].to_string())
        }
        DropMode::MalformedJson => json_200("<html><body>502 Bad Gateway</body></html>".into()),
        DropMode::WrongShape => json_200(json!({"event": {"status": "ok"}}).to_string()),
        DropMode::Status500 => Some(error_body(StatusCode::INTERNAL_SERVER_ERROR, json!({}))),
        DropMode::CloseConnection => {
            kill.0.store(true, Ordering::SeqCst);
            Some(StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
    }
}

async fn post_batch(
    State(shared): Sim,
    ConnectInfo(kill): ConnectInfo<KillSwitch>,
    headers: HeaderMap,
    body: String,
) -> Response {
    record(&shared, "POST /api/v1/events/batch", &body);
    if let Err(r) = authorize(&shared, &headers, true) {
        return r;
    }
    if let Some(r) = injected(&shared).await {
        return r;
    }
    let Ok(mut parsed) = serde_json::from_str::<Value>(&body) else {
        return unparsable_body();
    };
    // lago-api's `batch_params` only *permits* `events` (an array of event hashes), it does not
    // require it: a missing root, or one that is not an array, is dropped, and
    // `Events::CreateBatchService#call` answers the blank list with 422 `no_events`, as it
    // does an empty one. There is no 400 ParameterMissing on this endpoint.
    let events = match parsed.get_mut("events").map(Value::take) {
        Some(Value::Array(events)) if !events.is_empty() => events,
        _ => return validation_errors(json!({"events": ["no_events"]})),
    };
    if events.len() > shared.config.max_batch {
        return validation_errors(json!({"events": ["too_many_events"]}));
    }
    let crashed = {
        let f = lock(&shared.faults);
        events.iter().find_map(|e| {
            let tid = e.get("transaction_id").and_then(Value::as_str)?;
            f.crash.get(tid).copied()
        })
    };
    if let Some(code) = crashed {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error_body(status, json!({}));
    }
    let now = Utc::now();
    let mut valid = Vec::with_capacity(events.len());
    let mut errors = Map::new();
    for (i, e) in events.into_iter().enumerate() {
        match validate(&shared, e, now) {
            Ok(v) => valid.push(v),
            Err(errs) => {
                errors.insert(i.to_string(), Value::Object(errs));
            }
        }
    }
    if !errors.is_empty() {
        return validation_errors(Value::Object(errors));
    }
    match store(&shared, valid, now) {
        Err(duplicates) => {
            let details: Map<String, Value> = duplicates
                .into_iter()
                .map(|i| {
                    (
                        i.to_string(),
                        json!({"transaction_id": ["value_already_exist"]}),
                    )
                })
                .collect();
            validation_errors(Value::Object(details))
        }
        Ok(stored) => {
            let answer_delay = lock(&shared.faults).answer_delay;
            if !answer_delay.is_zero() {
                tokio::time::sleep(answer_delay).await;
            }
            if let Some(r) = maybe_drop(&shared, &kill, &stored) {
                return r;
            }
            (StatusCode::OK, Json(EventList { events: &stored })).into_response()
        }
    }
}

async fn post_single(
    State(shared): Sim,
    ConnectInfo(kill): ConnectInfo<KillSwitch>,
    headers: HeaderMap,
    body: String,
) -> Response {
    record(&shared, "POST /api/v1/events", &body);
    if let Err(r) = authorize(&shared, &headers, true) {
        return r;
    }
    if let Some(r) = injected(&shared).await {
        return r;
    }
    let Ok(mut parsed) = serde_json::from_str::<Value>(&body) else {
        return unparsable_body();
    };
    let Some(event) = parsed
        .get_mut("event")
        .filter(|e| e.is_object())
        .map(Value::take)
    else {
        return bad_request("param is missing or the value is empty: event");
    };
    let now = Utc::now();
    let valid = match validate(&shared, event, now) {
        Ok(v) => v,
        Err(errs) => return validation_errors(Value::Object(errs)),
    };
    match store(&shared, vec![valid], now) {
        Err(_) => validation_errors(json!({"transaction_id": ["value_already_exist"]})),
        Ok(stored) => {
            if let Some(r) = maybe_drop(&shared, &kill, &stored) {
                return r;
            }
            let event = stored
                .first()
                .map(StoredEvent::to_json)
                .unwrap_or(Value::Null);
            (StatusCode::OK, Json(json!({ "event": event }))).into_response()
        }
    }
}

/// Query of `GET /api/v1/events`.
#[derive(Debug, Deserialize)]
struct ListQuery {
    page: Option<String>,
    per_page: Option<String>,
    external_subscription_id: Option<String>,
    code: Option<String>,
    timestamp_from: Option<String>,
    timestamp_to: Option<String>,
}

#[allow(clippy::result_large_err)]
fn parse_time(field: &str, text: &Option<String>) -> Result<Option<DateTime<Utc>>, Response> {
    match text.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => DateTime::parse_from_rfc3339(t)
            .map(|d| Some(d.with_timezone(&Utc)))
            .map_err(|_| validation_errors(json!({ field: ["invalid_date"] }))),
    }
}

async fn list_events(
    State(shared): Sim,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    record(&shared, "GET /api/v1/events", "");
    if let Err(r) = authorize(&shared, &headers, false) {
        return r;
    }
    let from = match parse_time("timestamp_from", &q.timestamp_from) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let to = match parse_time("timestamp_to", &q.timestamp_to) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let page = q
        .page
        .as_deref()
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p > 0)
        .unwrap_or(1);
    let per_page = q
        .per_page
        .as_deref()
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p > 0)
        .unwrap_or(20)
        .min(100);
    let mut matching: Vec<StoredEvent> = lock(&shared.store)
        .events
        .iter()
        .filter(|e| {
            q.external_subscription_id
                .as_deref()
                .is_none_or(|s| e.external_subscription_id == s)
                && q.code.as_deref().is_none_or(|c| e.code == c)
                && from.is_none_or(|f| e.timestamp >= f)
                && to.is_none_or(|t| e.timestamp <= t)
        })
        .cloned()
        .collect();
    // Newest first, as Lago lists them; storage order breaks ties.
    matching.sort_by_key(|e| std::cmp::Reverse(e.timestamp));
    let total_count = matching.len();
    let total_pages = total_count.div_ceil(per_page);
    let events: Vec<Value> = matching
        .iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .map(StoredEvent::to_json)
        .collect();
    let meta = json!({
        "current_page": page,
        "next_page": if page < total_pages { Some(page + 1) } else { None },
        "prev_page": if page > 1 { Some(page - 1) } else { None },
        "total_pages": total_pages,
        "total_count": total_count,
    });
    (
        StatusCode::OK,
        Json(json!({ "events": events, "meta": meta })),
    )
        .into_response()
}

async fn show_event(
    State(shared): Sim,
    headers: HeaderMap,
    Path(transaction_id): Path<String>,
) -> Response {
    record(&shared, "GET /api/v1/events/{transaction_id}", "");
    if let Err(r) = authorize(&shared, &headers, false) {
        return r;
    }
    let found = lock(&shared.store)
        .events
        .iter()
        .find(|e| e.transaction_id == transaction_id)
        .map(StoredEvent::to_json);
    match found {
        Some(event) => (StatusCode::OK, Json(json!({ "event": event }))).into_response(),
        None => error_body(StatusCode::NOT_FOUND, json!({"code": "event_not_found"})),
    }
}

/// Any other route, as lago-api answers it (`match "*unmatched" => "application#not_found"`
/// in `config/routes.rb`): a 404 in Lago's own error format, not an empty one. A sink whose
/// api_url carries a wrong path meets this answer from a real Lago.
async fn unmatched() -> Response {
    error_body(StatusCode::NOT_FOUND, json!({"code": "resource_not_found"}))
}

// --- catalogue listings ---------------------------------------------------------------------

/// `page` / `per_page` query of the catalogue listings.
#[derive(Debug, Deserialize)]
struct PageQuery {
    page: Option<String>,
    per_page: Option<String>,
}

/// One page of `items` under `key`, with Lago's pagination `meta`.
fn paginate(key: &str, items: Vec<Value>, q: &PageQuery) -> Response {
    let page = q
        .page
        .as_deref()
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p > 0)
        .unwrap_or(1);
    let per_page = q
        .per_page
        .as_deref()
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p > 0)
        .unwrap_or(20)
        .min(100);
    let total_count = items.len();
    let total_pages = total_count.div_ceil(per_page);
    let page_items: Vec<Value> = items
        .into_iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .collect();
    let meta = json!({
        "current_page": page,
        "next_page": if page < total_pages { Some(page + 1) } else { None },
        "prev_page": if page > 1 { Some(page - 1) } else { None },
        "total_pages": total_pages,
        "total_count": total_count,
    });
    (
        StatusCode::OK,
        Json(json!({ key: page_items, "meta": meta })),
    )
        .into_response()
}

async fn list_metrics(
    State(shared): Sim,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    record(&shared, "GET /api/v1/billable_metrics", "");
    if let Err(r) = authorize(&shared, &headers, false) {
        return r;
    }
    let items: Vec<Value> = lock(&shared.store)
        .metrics
        .iter()
        .map(|(code, agg, field)| {
            json!({
                "lago_id": format!("bm_{code}"),
                "name": code,
                "code": code,
                "aggregation_type": agg,
                "field_name": field,
                "recurring": false,
            })
        })
        .collect();
    paginate("billable_metrics", items, &q)
}

/// `GET /api/v1/subscriptions`: filtered on `status[]`, the active ones when no status is asked
/// for (lago-api `SubscriptionIndex`: `filters[:status] = ["active"] if filters[:status].blank?`).
async fn list_subscriptions(
    State(shared): Sim,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
    RawQuery(raw): RawQuery,
) -> Response {
    record(&shared, "GET /api/v1/subscriptions", "");
    if let Err(r) = authorize(&shared, &headers, false) {
        return r;
    }
    let mut statuses: Vec<String> = reqwest::Url::parse(&format!(
        "http://sim/?{}",
        raw.as_deref().unwrap_or_default()
    ))
    .map(|u| {
        u.query_pairs()
            .filter(|(k, v)| k == "status[]" && !v.is_empty())
            .map(|(_, v)| v.into_owned())
            .collect()
    })
    .unwrap_or_default();
    if statuses.is_empty() {
        statuses.push("active".into());
    }
    let store = lock(&shared.store);
    let items: Vec<Value> = store
        .subscriptions
        .iter()
        .zip(&store.subscription_plans)
        .filter(|((_, _, status), _)| statuses.contains(status))
        .map(|((id, customer, status), plan)| {
            let mut s = json!({
                "lago_id": format!("sub_{id}"),
                "external_id": id,
                "external_customer_id": customer,
                "status": status,
                "terminated_at": (status == "terminated").then_some(SIM_TERMINATED_AT),
            });
            if let Some(plan) = plan {
                s["plan_code"] = plan.as_str().into();
            }
            s
        })
        .collect();
    drop(store);
    paginate("subscriptions", items, &q)
}

/// When the simulator's terminated subscriptions were terminated.
pub const SIM_TERMINATED_AT: &str = "2026-10-15T00:00:00Z";

/// A registered plan as Lago's `PlanObject`, with one `standard` charge per metric.
fn plan_json(code: &str, metrics: &[String]) -> Value {
    let charges: Vec<Value> = metrics
        .iter()
        .map(|m| {
            json!({
                "lago_id": format!("ch_{code}_{m}"),
                "lago_billable_metric_id": format!("bm_{m}"),
                "billable_metric_code": m,
                "created_at": "2026-01-01T00:00:00Z",
                "charge_model": "standard",
                "invoiceable": true,
                "regroup_paid_fees": null,
                "pay_in_advance": false,
                "prorated": false,
                "min_amount_cents": 0,
                "properties": { "amount": "1" },
                "filters": [],
            })
        })
        .collect();
    json!({
        "lago_id": format!("plan_{code}"),
        "name": code,
        "created_at": "2026-01-01T00:00:00Z",
        "code": code,
        "interval": "monthly",
        "amount_cents": 0,
        "amount_currency": "EUR",
        "charges": charges,
    })
}

/// `GET /api/v1/plans`, paginated.
async fn list_plans(
    State(shared): Sim,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    record(&shared, "GET /api/v1/plans", "");
    if let Err(r) = authorize(&shared, &headers, false) {
        return r;
    }
    let items: Vec<Value> = lock(&shared.store)
        .plans
        .iter()
        .map(|(code, metrics)| plan_json(code, metrics))
        .collect();
    paginate("plans", items, &q)
}

/// `GET /api/v1/plans/{code}`: `{"plan": …}`, or 404.
async fn show_plan(
    State(shared): Sim,
    headers: HeaderMap,
    axum::extract::Path(code): axum::extract::Path<String>,
) -> Response {
    record(&shared, "GET /api/v1/plans/{code}", "");
    if let Err(r) = authorize(&shared, &headers, false) {
        return r;
    }
    match lock(&shared.store).plans.get(&code) {
        Some(metrics) => (
            StatusCode::OK,
            Json(json!({ "plan": plan_json(&code, metrics) })),
        )
            .into_response(),
        None => error_body(StatusCode::NOT_FOUND, json!({"code": "plan_not_found"})),
    }
}

/// The billing entities, the default one first.
fn billing_entities(store: &Store) -> Vec<(String, i64, String)> {
    if store.billing_entities.is_empty() {
        vec![("default".to_string(), 0, "UTC".to_string())]
    } else {
        store.billing_entities.clone()
    }
}

/// `GET /api/v1/billing_entities`: as the spec documents it, one answer without `meta`.
async fn list_billing_entities(State(shared): Sim, headers: HeaderMap) -> Response {
    record(&shared, "GET /api/v1/billing_entities", "");
    if let Err(r) = authorize(&shared, &headers, false) {
        return r;
    }
    let items: Vec<Value> = billing_entities(&lock(&shared.store))
        .into_iter()
        .enumerate()
        .map(|(i, (code, grace, timezone))| {
            json!({
                "lago_id": format!("be_{code}"),
                "code": code,
                "name": code,
                "default_currency": "USD",
                "document_locale": "en",
                "document_numbering": "per_customer",
                "finalize_zero_amount_invoice": true,
                "invoice_grace_period": grace,
                "net_payment_term": 0,
                "timezone": timezone,
                "is_default": i == 0,
                "created_at": "2026-01-01T00:00:00Z",
                "updated_at": "2026-01-01T00:00:00Z",
            })
        })
        .collect();
    (StatusCode::OK, Json(json!({ "billing_entities": items }))).into_response()
}

/// Every customer: the registered ones and the subscriptions' others, as `CustomerObject`s.
fn customers(store: &Store) -> Vec<Value> {
    let entities = billing_entities(store);
    let mut all = store.customers.clone();
    for (_, customer, _) in &store.subscriptions {
        all.entry(customer.clone()).or_insert((None, None, None));
    }
    all.into_iter()
        .enumerate()
        .map(|(i, (id, (timezone, grace, entity)))| {
            let entity = entity.unwrap_or_else(|| entities[0].0.clone());
            let entity_tz = entities
                .iter()
                .find(|e| e.0 == entity)
                .map_or("UTC", |e| e.2.as_str())
                .to_string();
            json!({
                "lago_id": format!("cus_{id}"),
                "sequential_id": i + 1,
                "slug": format!("SIM-{:04}", i + 1),
                "external_id": id,
                "billing_entity_code": entity,
                "applicable_timezone": timezone.clone().unwrap_or(entity_tz),
                "timezone": timezone,
                "created_at": "2026-01-01T00:00:00Z",
                "billing_configuration": { "invoice_grace_period": grace },
            })
        })
        .collect()
}

/// `GET /api/v1/customers`, paginated.
async fn list_customers(
    State(shared): Sim,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    record(&shared, "GET /api/v1/customers", "");
    if let Err(r) = authorize(&shared, &headers, false) {
        return r;
    }
    let items = customers(&lock(&shared.store));
    paginate("customers", items, &q)
}

/// `GET /api/v1/customers/{external_customer_id}`: `{"customer": …}`, or 404.
async fn show_customer(
    State(shared): Sim,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    record(&shared, "GET /api/v1/customers/{external_customer_id}", "");
    if let Err(r) = authorize(&shared, &headers, false) {
        return r;
    }
    match customers(&lock(&shared.store))
        .into_iter()
        .find(|c| c["external_id"] == id.as_str())
    {
        Some(c) => (StatusCode::OK, Json(json!({ "customer": c }))).into_response(),
        None => error_body(StatusCode::NOT_FOUND, json!({"code": "customer_not_found"})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn an_event_is_answered_with_lagos_fields_in_lagos_order() {
        let event = StoredEvent {
            lago_id: "00000000-0000-4000-8000-000000000001".into(),
            transaction_id: "tx-1".into(),
            external_subscription_id: "sub-1".into(),
            code: "cpu_hours".into(),
            timestamp: Utc.with_ymd_and_hms(2026, 10, 1, 12, 0, 0).unwrap(),
            properties: json!({"value": "1.5", "region": "eu"})
                .as_object()
                .unwrap()
                .clone(),
            precise_total_amount_cents: None,
            created_at: Utc.timestamp_millis_opt(1_790_000_000_123).unwrap(),
        };
        let expected = r#"{"lago_id":"00000000-0000-4000-8000-000000000001","transaction_id":"tx-1","lago_customer_id":null,"code":"cpu_hours","timestamp":"2026-10-01T12:00:00.000Z","lago_subscription_id":null,"external_subscription_id":"sub-1","precise_total_amount_cents":null,"properties":{"value":"1.5","region":"eu"},"created_at":"2026-09-21T14:13:20.123Z"}"#;
        assert_eq!(serde_json::to_string(&event).unwrap(), expected);
        assert_eq!(event.to_json().to_string(), expected);
        let list = serde_json::to_string(&EventList {
            events: std::slice::from_ref(&event),
        })
        .unwrap();
        assert_eq!(list, format!(r#"{{"events":[{expected}]}}"#));
    }
}
