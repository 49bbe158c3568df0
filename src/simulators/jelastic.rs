//! A loopback simulator of Jelastic / Virtuozzo `GetAccountBillingHistoryByPeriod`.
//!
//! The real API aggregates the account's hourly charges **into buckets of the requested
//! period, in the requested time zone**, so a canned answer cannot test windowing, offsets or
//! re-reads. This simulator holds a dataset of charges (environment → node → charge type with
//! an hourly cost) and computes every answer from it:
//!
//! * the platform charges at every whole UTC hour `h` a charge is active (`start ≤ h < end`);
//!   a request `[starttime, endtime)` covers the charges with `starttime ≤ h < endtime`
//!   (start inclusive, end exclusive — the real bounds are not documented);
//! * `starttime`, `endtime` and every `dateTime` are naive local times of `timeOffset`
//!   (**signed minutes east of UTC**, `0` when absent); buckets start at whole local hours
//!   (`HOUR`) or local midnights (`DAY`);
//! * a row is one (bucket, environment, node, charge type): `count` = charges in the bucket,
//!   `cost` = `count × hourly cost`, exact, written as a JSON float with all its digits
//!   (`0.012846`, or seventeen significant digits);
//! * `isPaid`/`isWithdrawn` are `true` for buckets ending at or before
//!   [`JelasticDataset::paid_before`], `false` otherwise (as in the documented example).
//!
//! Behaviour choices (documented so tests can rely on them; real codes are unverified):
//! * a wrong or missing `session` answers HTTP 200 with `result: 702`;
//! * a missing or malformed parameter, or a `period` other than `HOUR`/`DAY`, answers HTTP 200
//!   with `result: 1` and the reason in `error`;
//! * parameters are read from the query string and from a form body, names case-insensitive;
//!   `GET` and `POST` are both accepted.
//!
//! Fault injection and request recording go through [`JelasticSimHandle`].

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Map, Number, Value};

use crate::providers::jelastic::{Grid, Period, TimeOffset, REST_PATH, WIRE_TIME_FORMAT};

/// The documented example response (the platform's quick-start page), as the simulator's seed
/// data and the tests' fixture. Origin: `src/simulators/data/README.md`.
pub const FIXTURE: &str =
    include_str!("data/jelastic/billing.account.GetAccountBillingHistoryByPeriod.json");

/// Result code of a refused session (simulator choice).
pub const RESULT_INVALID_SESSION: i64 = 702;
/// Result code of invalid parameters (simulator choice).
pub const RESULT_INVALID_PARAM: i64 = 1;

/// One charge type on one node: charged every whole UTC hour in `[start, end)`.
#[derive(Debug, Clone, PartialEq)]
pub struct SimCharge {
    /// `type`, e.g. `ip`, `cloudlet`, `storage`.
    pub kind: String,
    /// `resourceType`, e.g. `OPTION`, `NODE`.
    pub resource_type: String,
    /// Cost of one hourly charge.
    pub hourly_cost: Decimal,
    /// First charged hour (inclusive).
    pub start: DateTime<Utc>,
    /// End of charging (exclusive).
    pub end: DateTime<Utc>,
    /// Further row fields copied as they are (`usedCloudletsAmount`, `group`, …).
    pub extras: Map<String, Value>,
}

/// One node of an environment.
#[derive(Debug, Clone, PartialEq)]
pub struct SimNode {
    /// `nodeid`.
    pub nodeid: u64,
    /// The charge types of the node (at most one per `type`/`resourceType`).
    pub charges: Vec<SimCharge>,
}

/// One environment.
#[derive(Debug, Clone, PartialEq)]
pub struct SimEnv {
    /// `appid` (32 hex).
    pub appid: String,
    /// `domain`.
    pub domain: String,
    /// `hostGroupUniqueName`.
    pub host_group: String,
    /// `hostGroupDisplayName`.
    pub host_group_display: String,
    /// Its nodes.
    pub nodes: Vec<SimNode>,
}

/// The simulated account.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JelasticDataset {
    /// Environments, in response order.
    pub envs: Vec<SimEnv>,
    /// Buckets ending at or before this instant are reported as paid and withdrawn.
    pub paid_before: Option<DateTime<Utc>>,
}

/// Errors building a dataset from a fixture.
#[derive(Debug, thiserror::Error)]
#[error("jelastic simulator fixture: {0}")]
pub struct DatasetError(String);

/// How to generate a dataset deterministically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenSpec {
    /// Seed of the generator: the same seed yields the same dataset.
    pub seed: u64,
    /// Number of environments.
    pub environments: usize,
    /// Nodes per environment.
    pub nodes_per_env: usize,
    /// Charges start at or after this hour…
    pub start: DateTime<Utc>,
    /// …and end at or before this one.
    pub end: DateTime<Utc>,
}

/// A JSON number with exactly the decimal's digits (serde_json's `arbitrary_precision`).
pub fn number(d: Decimal) -> Value {
    Number::from_str(&d.normalize().to_string())
        .map(Value::Number)
        .unwrap_or_else(|_| Value::String(d.to_string()))
}

fn decimal_of(v: &Value) -> Option<Decimal> {
    let text = match v {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    Decimal::from_str_exact(&text).ok()
}

/// The first whole UTC hour at or after `t`.
fn ceil_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let s = t.timestamp();
    let h = s.div_euclid(3600) * 3600;
    let h = if h < s { h + 3600 } else { h };
    DateTime::from_timestamp(h, 0).unwrap_or(t)
}

/// A small deterministic generator (SplitMix64), so generated datasets never change with a
/// dependency upgrade.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Charge types the generator uses (invented labels besides the documented `ip`/`OPTION`).
const GEN_KINDS: &[(&str, &str)] = &[
    ("cloudlet", "NODE"),
    ("storage", "NODE"),
    ("traffic", "NODE"),
    ("ip", "OPTION"),
    ("ssl", "OPTION"),
];

/// Row fields of the documented example that the simulator sends as zero/false unless a
/// charge's extras say otherwise.
const ZERO_FIELDS: &[&str] = &[
    "resourceFreeCost",
    "billNetworkExtAmount",
    "usedStorageAmount",
    "licenceHours",
    "fixedCloudletsCost",
    "storageCost",
    "resourceBillableAmount",
    "networkExtCost",
    "flexibleCloudletsFreeAmount",
    "flexibleCloudletsCost",
    "networkExtFreeAmount",
    "group",
    "usedCloudletsAmount",
    "fixedCloudletsFreeAmount",
    "flexibleCloudletsAmount",
    "resourceFreeAmount",
    "fixedCloudletsAmount",
    "resourceCost",
    "minFeeResourceAmount",
    "billStorageAmount",
    "usedNetworkExtAmount",
    "storageFreeAmount",
];

/// Fields the simulator computes for every row (never taken from extras).
const COMPUTED_FIELDS: &[&str] = &[
    "dateTime",
    "appid",
    "domain",
    "nodeid",
    "type",
    "resourceType",
    "hostGroupUniqueName",
    "hostGroupDisplayName",
    "count",
    "nodeCount",
    "cost",
    "isPaid",
    "isWithdrawn",
];

impl JelasticDataset {
    /// An empty dataset.
    pub fn new() -> Self {
        Self::default()
    }

    /// Build a dataset from a documented response (the envelope with `array`), read as
    /// `period` buckets in UTC: every row becomes a charge of its environment and node whose
    /// hourly cost is `cost / count` (it must divide exactly) and whose `count` hours are the
    /// **last** hours of the row's bucket. The documented DAY row (`2024-04-01`, count 3, asked
    /// from `20:23:55`) thus becomes an IP charged at 21:00, 22:00 and 23:00 at `0.004282` each,
    /// and the documented request is answered with exactly the documented row.
    pub fn from_fixture_json(text: &str, period: Period) -> Result<Self, DatasetError> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| DatasetError(format!("not JSON: {e}")))?;
        let rows = root
            .get("array")
            .and_then(Value::as_array)
            .ok_or_else(|| DatasetError("no `array`".into()))?;
        let mut dataset = JelasticDataset::new();
        for (i, row) in rows.iter().enumerate() {
            let r = row
                .as_object()
                .ok_or_else(|| DatasetError(format!("array[{i}] is not an object")))?;
            let bad = |f: &str| DatasetError(format!("array[{i}].{f} is missing or malformed"));
            let s = |f: &str| r.get(f).and_then(Value::as_str).ok_or_else(|| bad(f));
            let local = NaiveDateTime::parse_from_str(s("dateTime")?, WIRE_TIME_FORMAT)
                .map_err(|_| bad("dateTime"))?;
            let bucket_end = local.and_utc() + period.duration();
            let count = r
                .get("count")
                .and_then(Value::as_u64)
                .filter(|c| *c > 0)
                .ok_or_else(|| bad("count"))?;
            let cost = r
                .get("cost")
                .and_then(decimal_of)
                .ok_or_else(|| bad("cost"))?;
            let hourly_cost = cost / Decimal::from(count);
            if hourly_cost * Decimal::from(count) != cost {
                return Err(DatasetError(format!(
                    "array[{i}]: cost {cost} does not divide into {count} equal hourly charges"
                )));
            }
            let extras: Map<String, Value> = r
                .iter()
                .filter(|(k, _)| !COMPUTED_FIELDS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let charge = SimCharge {
                kind: s("type")?.to_string(),
                resource_type: s("resourceType")?.to_string(),
                hourly_cost,
                start: bucket_end - Duration::hours(count as i64),
                end: bucket_end,
                extras,
            };
            let appid = s("appid")?.to_string();
            let nodeid = r
                .get("nodeid")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("nodeid"))?;
            let env = match dataset.envs.iter().position(|e| e.appid == appid) {
                Some(p) => &mut dataset.envs[p],
                None => {
                    dataset.envs.push(SimEnv {
                        appid: appid.clone(),
                        domain: s("domain")?.to_string(),
                        host_group: s("hostGroupUniqueName").unwrap_or_default().to_string(),
                        host_group_display: s("hostGroupDisplayName")
                            .unwrap_or_default()
                            .to_string(),
                        nodes: Vec::new(),
                    });
                    let last = dataset.envs.len() - 1;
                    &mut dataset.envs[last]
                }
            };
            match env.nodes.iter_mut().find(|n| n.nodeid == nodeid) {
                Some(node) => node.charges.push(charge),
                None => env.nodes.push(SimNode {
                    nodeid,
                    charges: vec![charge],
                }),
            }
        }
        Ok(dataset)
    }

    /// A deterministic dataset of many environments and nodes. Each node has one to three
    /// distinct charge types, active for a random stretch of `[start, end)`, with an hourly cost
    /// of 6 to 17 significant digits (e.g. `0.012846`, `0.04213958820331452`).
    pub fn generate(spec: &GenSpec) -> Self {
        let mut rng = SplitMix(spec.seed);
        let first = ceil_hour(spec.start);
        let hours = ((spec.end - first).num_hours()).max(1) as u64;
        let mut envs = Vec::with_capacity(spec.environments);
        let mut nodeid = 1000 + rng.below(1000);
        for e in 0..spec.environments {
            let appid = format!("{:016x}{:016x}", rng.next(), rng.next());
            let groups = [("user_host_group", "Users"), ("eu_host_group", "Europe")];
            let (host_group, display) = groups[rng.below(groups.len() as u64) as usize];
            let mut nodes = Vec::with_capacity(spec.nodes_per_env);
            for _ in 0..spec.nodes_per_env {
                nodeid += 1 + rng.below(7);
                let n_kinds = 1 + rng.below(3) as usize;
                let offset = rng.below(GEN_KINDS.len() as u64) as usize;
                let mut charges = Vec::with_capacity(n_kinds);
                for k in 0..n_kinds {
                    let (kind, resource_type) = GEN_KINDS[(offset + k) % GEN_KINDS.len()];
                    let digits = 6 + rng.below(12) as u32; // 6..=17 significant digits
                    let low = 10u64.pow(digits - 1);
                    let mantissa = low + rng.below(9 * low);
                    let hourly_cost = Decimal::from_i128_with_scale(mantissa as i128, digits + 1);
                    let from = rng.below(hours);
                    let to = from + 1 + rng.below(hours - from);
                    let mut extras = Map::new();
                    if resource_type == "NODE" {
                        extras.insert("usedCloudletsAmount".into(), json!(1 + rng.below(16)));
                    }
                    charges.push(SimCharge {
                        kind: kind.to_string(),
                        resource_type: resource_type.to_string(),
                        hourly_cost,
                        start: first + Duration::hours(from as i64),
                        end: first + Duration::hours(to as i64),
                        extras,
                    });
                }
                nodes.push(SimNode { nodeid, charges });
            }
            envs.push(SimEnv {
                appid,
                domain: format!("env-{:07}", 1_000_000 + e as u64 * 7919 + rng.below(7919)),
                host_group: host_group.to_string(),
                host_group_display: display.to_string(),
                nodes,
            });
        }
        JelasticDataset {
            envs,
            paid_before: None,
        }
    }

    /// Add the environments of `other` (their appids must differ).
    pub fn merge(mut self, other: JelasticDataset) -> Self {
        self.envs.extend(other.envs);
        self
    }

    /// The total cost of every hourly charge in `[start, end)` (UTC), optionally of one
    /// environment: what a correct client must add up to, however it buckets.
    pub fn total_cost(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        target: Option<&str>,
    ) -> Decimal {
        let mut sum = Decimal::ZERO;
        for env in self
            .envs
            .iter()
            .filter(|e| target.is_none_or(|t| t == e.appid))
        {
            for node in &env.nodes {
                for c in &node.charges {
                    sum += c.hourly_cost * Decimal::from(hours_in(c, start, end).len() as u64);
                }
            }
        }
        sum
    }

    /// The rows of the history for `[start, end)` (UTC), bucketed by `period` in `offset`.
    pub fn history(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        period: Period,
        offset: TimeOffset,
        target: Option<&str>,
    ) -> Vec<Value> {
        let grid = Grid { period, offset };
        // (bucket, env index, node index, charge index) → count
        let mut buckets: BTreeMap<(DateTime<Utc>, usize, usize, usize), u64> = BTreeMap::new();
        for (ei, env) in self.envs.iter().enumerate() {
            if target.is_some_and(|t| t != env.appid) {
                continue;
            }
            for (ni, node) in env.nodes.iter().enumerate() {
                for (ci, c) in node.charges.iter().enumerate() {
                    for h in hours_in(c, start, end) {
                        *buckets.entry((grid.align_down(h), ei, ni, ci)).or_default() += 1;
                    }
                }
            }
        }
        buckets
            .into_iter()
            .map(|((bucket, ei, ni, ci), count)| {
                let env = &self.envs[ei];
                let node = &env.nodes[ni];
                let c = &node.charges[ci];
                let paid = self
                    .paid_before
                    .is_some_and(|p| bucket + period.duration() <= p);
                let mut row = Map::new();
                for f in ZERO_FIELDS {
                    row.insert((*f).to_string(), json!(0));
                }
                for flag in ["isBonus", "isRemote"] {
                    row.insert(flag.to_string(), json!(false));
                }
                for (k, v) in &c.extras {
                    row.insert(k.clone(), v.clone());
                }
                row.insert(
                    "dateTime".into(),
                    json!(offset.to_local(bucket).format(WIRE_TIME_FORMAT).to_string()),
                );
                row.insert("appid".into(), json!(env.appid));
                row.insert("domain".into(), json!(env.domain));
                row.insert("nodeid".into(), json!(node.nodeid));
                row.insert("type".into(), json!(c.kind));
                row.insert("resourceType".into(), json!(c.resource_type));
                row.insert("hostGroupUniqueName".into(), json!(env.host_group));
                row.insert("hostGroupDisplayName".into(), json!(env.host_group_display));
                row.insert("nodeCount".into(), json!(1));
                row.insert("count".into(), json!(count));
                row.insert("cost".into(), number(c.hourly_cost * Decimal::from(count)));
                row.insert("isPaid".into(), json!(paid));
                row.insert("isWithdrawn".into(), json!(paid));
                Value::Object(row)
            })
            .collect()
    }
}

/// The whole UTC hours `h` with `start ≤ h < end` at which the charge is active.
fn hours_in(c: &SimCharge, start: DateTime<Utc>, end: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let from = ceil_hour(start.max(c.start));
    let to = end.min(c.end);
    let mut out = Vec::new();
    let mut h = from;
    while h < to {
        out.push(h);
        h += Duration::hours(1);
    }
    out
}

/// A failure the simulator answers instead of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// An HTTP status (e.g. 500, 503) with a plain-text body.
    Http(u16),
    /// HTTP 429 with `Retry-After: <secs>`.
    RateLimited {
        /// The `Retry-After` value, in seconds.
        retry_after_secs: u64,
    },
    /// HTTP 200 with `result: code` and `error: message`.
    Result {
        /// The `result` code.
        code: i64,
        /// The `error` message.
        message: String,
    },
}

/// One request the simulator received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedCall {
    /// `GET` or `POST`.
    pub method: String,
    /// Whether parameters came in a form body (as opposed to only the query string).
    pub form_body: bool,
    /// The parameters as sent (names lower-cased), **without** `session`.
    pub params: BTreeMap<String, String>,
    /// Whether the session was right.
    pub authorized: bool,
}

#[derive(Debug)]
struct SimState {
    dataset: JelasticDataset,
    session: String,
    faults: Mutex<VecDeque<Fault>>,
    requests: AtomicUsize,
    calls: Mutex<Vec<RecordedCall>>,
}

/// Entry point of the simulator.
pub struct JelasticSim;

impl JelasticSim {
    /// Serve `dataset` on `127.0.0.1:<free port>`, accepting `session`, until the handle is
    /// dropped or shut down.
    pub async fn start(
        dataset: JelasticDataset,
        session: impl Into<String>,
    ) -> std::io::Result<JelasticSimHandle> {
        let state = Arc::new(SimState {
            dataset,
            session: session.into(),
            faults: Mutex::new(VecDeque::new()),
            requests: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route(REST_PATH, any(history))
            .with_state(state.clone());
        let server = super::Server::start("jelastic", app).await?;
        let addr = server.addr;
        Ok(JelasticSimHandle {
            url: format!("http://{addr}"),
            addr,
            state,
            server,
        })
    }
}

/// A running simulator. `url` is the `hoster_url` to configure; dropping the handle stops it.
pub struct JelasticSimHandle {
    /// Base URL (`http://127.0.0.1:<port>`), without the REST path.
    pub url: String,
    /// The bound address.
    pub addr: SocketAddr,
    state: Arc<SimState>,
    server: super::Server,
}

impl std::fmt::Debug for JelasticSimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JelasticSimHandle")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl JelasticSimHandle {
    /// The dataset being served.
    pub fn dataset(&self) -> &JelasticDataset {
        &self.state.dataset
    }

    /// Answer the next `n` requests with `fault` (queued after earlier faults).
    pub fn fail_next(&self, n: usize, fault: Fault) {
        if let Ok(mut q) = self.state.faults.lock() {
            q.extend(std::iter::repeat_n(fault, n));
        }
    }

    /// Requests received so far (including failed and unauthorized ones).
    pub fn request_count(&self) -> usize {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Every request received so far, in order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.state
            .calls
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Forget the recorded calls and reset the request counter.
    pub fn clear_calls(&self) {
        if let Ok(mut c) = self.state.calls.lock() {
            c.clear();
        }
        self.state.requests.store(0, Ordering::Relaxed);
    }

    /// Stop serving and wait for the server task to end.
    pub async fn shutdown(self) {
        self.server.stop().await;
    }
}

fn error_result(code: i64, message: &str) -> Response {
    Json(json!({"result": code, "source": "billing", "error": message})).into_response()
}

/// Parse `a=b&c=d` (URL-encoded) into lower-cased names; later values win.
fn parse_params(text: &str, into: &mut BTreeMap<String, String>) {
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        into.insert(percent_decode(k).to_ascii_lowercase(), percent_decode(v));
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn history(
    State(state): State<Arc<SimState>>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let mut params = BTreeMap::new();
    if let Some(q) = &query {
        parse_params(q, &mut params);
    }
    let form_body = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if form_body {
        parse_params(&String::from_utf8_lossy(&body), &mut params);
    }
    let session = params.remove("session");
    let authorized = session.as_deref() == Some(state.session.as_str());
    if let Ok(mut calls) = state.calls.lock() {
        calls.push(RecordedCall {
            method: method.to_string(),
            form_body,
            params: params.clone(),
            authorized,
        });
    }
    let fault = state.faults.lock().ok().and_then(|mut q| q.pop_front());
    match fault {
        Some(Fault::Http(status)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, "simulated failure").into_response();
        }
        Some(Fault::RateLimited { retry_after_secs }) => {
            let mut h = HeaderMap::new();
            h.insert("retry-after", HeaderValue::from(retry_after_secs));
            return (StatusCode::TOO_MANY_REQUESTS, h, "rate limited").into_response();
        }
        Some(Fault::Result { code, message }) => return error_result(code, &message),
        None => {}
    }
    if !authorized {
        return error_result(
            RESULT_INVALID_SESSION,
            "User is not authenticated: the session is invalid or expired",
        );
    }
    match check_params(&params) {
        Ok(q) => {
            let rows =
                state
                    .dataset
                    .history(q.start, q.end, q.period, q.offset, q.target.as_deref());
            Json(json!({"result": 0, "array": rows})).into_response()
        }
        Err(message) => error_result(RESULT_INVALID_PARAM, &message),
    }
}

struct Query {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    period: Period,
    offset: TimeOffset,
    target: Option<String>,
}

fn check_params(p: &BTreeMap<String, String>) -> Result<Query, String> {
    let offset = match p
        .get("timeoffset")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        None => TimeOffset::UTC,
        Some(text) => text
            .parse::<i32>()
            .ok()
            .and_then(TimeOffset::from_minutes)
            .ok_or_else(|| {
                format!("invalid param timeOffset: {text:?} is not a number of minutes")
            })?,
    };
    let time = |name: &str| {
        let text = p
            .get(name)
            .ok_or_else(|| format!("invalid param {name}: required"))?;
        NaiveDateTime::parse_from_str(text.trim(), WIRE_TIME_FORMAT)
            .map(|n| offset.to_utc(n))
            .map_err(|_| format!("invalid param {name}: {text:?} is not yyyy-MM-dd HH:mm:ss"))
    };
    let start = time("starttime")?;
    let end = time("endtime")?;
    if end <= start {
        return Err("invalid param endtime: must be after starttime".into());
    }
    let period = match p
        .get("period")
        .map(|s| s.trim().to_ascii_uppercase())
        .as_deref()
    {
        Some("HOUR") => Period::Hour,
        Some("DAY") => Period::Day,
        Some(other @ ("YEAR" | "MONTH" | "WEEK")) => {
            return Err(format!(
                "invalid param period: {other} is not supported by the simulator"
            ))
        }
        Some(other) => return Err(format!("invalid param period: {other:?}")),
        None => return Err("invalid param period: required".into()),
    };
    let target = p
        .get("targetappid")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    Ok(Query {
        start,
        end,
        period,
        offset,
        target,
    })
}
