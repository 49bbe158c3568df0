//! MetalSoft (formerly Bigstep Metal Cloud): per-user utilization reports over JSON-RPC.
//!
//! MetalSoft has no invoice or billing-line API with ids and finality flags; what it offers is
//! `resource_utilization_detailed(user_id, start, end, infrastructure_ids, datacenter_names)`, a
//! report **computed for the requested window**: every line is an interval of one product
//! (instance, drive, subnet, data lake, …) with its quantity and cost inside the window. That
//! shapes everything here:
//!
//! * **Cursor = a watermark per user** (`user:<id>` → RFC 3339). Windows sit on a fixed grid
//!   counted from the Unix epoch, so a re-read asks for exactly the same window and gets lines
//!   with exactly the same natural keys. Only windows that ended at least `settle_delay` ago are
//!   requested; `look_back` re-reads windows before a stored watermark to pick up late lines
//!   (the first run starts at `start`, there is nothing before it to re-read), and the stored
//!   watermark itself never moves backwards.
//! * **Natural key** (reference 4.5): `(user_id_owner, infrastructure_id, resource_type,
//!   product_id, start_timestamp, is_reservation)`, plus `bucket`/`direction` for network
//!   waypoints: the line's own identity, never the window that was asked for (see below).
//!   Lines of one report that still share a key (two waypoints of one network clipped to the
//!   same window start) are separate charges: the second and later get an `occurrence` part
//!   (2, 3, … in report order) instead of overwriting each other in the ledger. A line repeated
//!   byte for byte is one charge listed twice and keeps the key of its first listing.
//! * **Window clipping**: the server computes the report for the requested window, so a
//!   resource running across a window boundary comes back as one clipped line per window, each
//!   starting and ending inside its window (`start_timestamp` = the window start, or
//!   `end_timestamp` = the window end, on the clipped side). Two rules follow, and each closes
//!   a way to bill the same usage twice:
//!   - *Every line must lie inside the requested window* (`window_start <= start_timestamp`
//!     and `end_timestamp <= window_end`). A line that does not is no answer to the question
//!     asked (a window that shifted between reads, a cached answer for another window, a server
//!     reading the bounds in another time zone or ignoring them), so the whole page is refused
//!     with an error naming the line, its interval and the window. Nothing of that page is
//!     staged (its other lines cannot be trusted to be this window's), the cursor does not
//!     move, the window is asked again on the next run, and the run fails loudly instead of
//!     guessing. Accepting the page would let the cursor pass a window whose own lines never
//!     arrived (lost), and a partly shifted page, clipped at other instants, would bill the
//!     overlap twice under keys that no key scheme can match.
//!   - *The key does not contain the requested window.* Clipped parts of one resource in
//!     consecutive windows start at different instants, so they stay distinct records; a line
//!     re-read by the same window has the same key. A look-back on *another* grid would cut the
//!     same usage at other instants, under other keys, so the grid is kept with the cursors
//!     (stream `window`) and a changed `window` is refused (see `check_grid`); and no window
//!     begins before `start`'s, so a source that replaces another re-reads nothing of it.
//!
//!   Reservation installments are exempt from the inside-the-window rule: their interval is
//!   the reservation period, which outlasts windows, and their key never had a window. When the
//!   report carries top-level `start_timestamp`/`end_timestamp` (the 2020 Bigstep example
//!   does), they must be the requested window, or the page is refused as well. Whether the
//!   real server clips is unverified (reference 4.5); one that does not would stop every run at
//!   its first line crossing a window boundary, with that line named. That is deliberate:
//!   a person decides, billsync does not guess.
//! * **Finality**: there is no flag. A line is final when its window is settled (ended at
//!   least `settle_delay` ago); a line of an unsettled window is provisional and will be
//!   re-read.
//! * **Money**: the wire mixes strings (`"7.25925278"`) and numbers (`0`, `119.81`); both are
//!   read from their text into [`Decimal`], never through a float.
//! * **Reading**: an answer is walked once over its text (module `text`); each line stays a
//!   slice of it until its record is made, and becomes the record's raw fields as its own JSON.
//!   A map of the report with a key given twice is refused (a parsed object would keep the last
//!   one's lines and drop the first's without a word); a line's own field given twice is read
//!   as its last value.
//!
//! Resource-type naming (documented choice):
//! * `detailed_report.<infra>.<type>[]` → `resource_type = <type>` for any key the server sends
//!   (`instance`, `drive`, `shared_drive`, `subnet`, `data_lake`, or a future one);
//!   `resource_id = "<type>:<product_id>"`.
//! * `network_report.<infra>.<bucket>.<direction>.metered_waypoints[]` → `resource_type =
//!   "<bucket>_<direction>"` (`network_download`, `network_upload`, `data_lake_download`,
//!   `data_lake_upload`), `resource_id = "<bucket>:<product_id>"` (the network or data lake the
//!   traffic crossed), attributes `bucket` and `direction`. The per-direction aggregates
//!   (numeric `cost`/`quantity`) are sums of their waypoints: they are *not* turned into records,
//!   only checked, and a mismatch is logged as a warning.
//! * `reservation_installments.server_types[]` → `resource_type = "reservation_installment"`,
//!   `resource_id = "server_type_reservation:<id>"`, quantity `1` of unit `installment`, cost as
//!   stated. An installment is a fixed charge for a whole reservation period that the server may
//!   repeat in every window overlapping it, so its natural key deliberately leaves out the
//!   window: however many windows report it, it is one record (the ledger upserts it). It is
//!   final once the window that reported it is settled (reservations are not affected by
//!   pricing changes, per the Bigstep docs).

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use crate::config::Secret;
use crate::http::{self, RetryPolicy};
use crate::providers::http::{describe_reqwest, send_with_retry, Attempt};
use crate::providers::{Chunk, Cursors, Page, Plan, Provider, ProviderError};
use crate::record::{utc_secs_text, Name, RawJson, Text, UsageRecord};
use compact_str::{format_compact, ToCompactString};

mod text;
use text::Fields;

/// The provider kind, also the `provider` field of every record.
pub const KIND: &str = "metalsoft";
/// The JSON-RPC method this provider calls.
pub const METHOD: &str = "resource_utilization_detailed";
/// The JSON-RPC path below the configured endpoint.
pub const RPC_PATH: &str = "/api/developer/developer";

/// Cursor stream holding the `window` (seconds) the source's watermarks were read on, stored
/// beside them (see [`MetalsoftProvider::check_grid`]).
pub const STREAM_WINDOW: &str = "window";

/// Settings of one MetalSoft source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetalsoftConfig {
    /// Base URL of the MetalSoft controller, e.g. `https://us01.metalsoft.io`; the call goes to
    /// `POST {endpoint}/api/developer/developer`.
    pub endpoint: String,
    /// API key of a user holding `utilization_reports_read` (`env:NAME` or `file:/path`).
    pub api_key: Secret,
    /// The owners (`user_id_owner`) whose utilization is reported; one cursor stream each.
    pub user_ids: Vec<u64>,
    /// Length of one report window. Windows are aligned to a fixed grid counted from the Unix
    /// epoch, so re-reads produce identical windows. Whole seconds, at least one second.
    #[serde(default = "default_window", with = "crate::config::duration::chrono")]
    pub window: chrono::Duration,
    /// How much to re-read before the watermark to catch late lines. Default: one window.
    #[serde(default, deserialize_with = "optional_chrono_duration")]
    pub look_back: Option<chrono::Duration>,
    /// Only windows that ended at least this long ago are requested (and can be final).
    #[serde(
        default = "default_settle_delay",
        with = "crate::config::duration::chrono"
    )]
    pub settle_delay: chrono::Duration,
    /// The first watermark of a user that has no stored cursor yet.
    pub start: DateTime<Utc>,
    /// Timeout of one HTTP request.
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    /// Retries of transient failures (network, timeouts, HTTP 5xx and 429).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Send the fifth positional parameter (`datacenter_names`, as `null`). Older servers reject
    /// a fifth parameter, so it is off by default.
    #[serde(default)]
    pub send_datacenter_param: bool,
    /// Restrict the report to these infrastructures (the fourth parameter); all when absent.
    #[serde(default)]
    pub infrastructure_ids: Option<Vec<u64>>,
    /// FOCUS `BillingAccountId` of the records; defaults to the endpoint's host name.
    #[serde(default)]
    pub billing_account_id: Option<String>,
    /// Report windows requested at once. Windows are independent reads and are staged in
    /// order whatever order the answers come in; 1 asks one at a time. Default 4.
    #[serde(default = "default_concurrent_requests")]
    pub concurrent_requests: usize,
}

fn default_concurrent_requests() -> usize {
    4
}

fn default_window() -> chrono::Duration {
    chrono::Duration::hours(1)
}

fn default_settle_delay() -> chrono::Duration {
    chrono::Duration::hours(1)
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

fn optional_chrono_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<chrono::Duration>, D::Error> {
    crate::config::duration::chrono::deserialize(d).map(Some)
}

impl MetalsoftConfig {
    /// A configuration with every optional setting at its default (tests, simulators, demo).
    pub fn new(
        endpoint: impl Into<String>,
        api_key: Secret,
        user_ids: Vec<u64>,
        start: DateTime<Utc>,
    ) -> Self {
        MetalsoftConfig {
            endpoint: endpoint.into(),
            api_key,
            user_ids,
            window: default_window(),
            look_back: None,
            settle_delay: default_settle_delay(),
            start,
            timeout: default_timeout(),
            retry: RetryPolicy::default(),
            send_datacenter_param: false,
            infrastructure_ids: None,
            billing_account_id: None,
            concurrent_requests: default_concurrent_requests(),
        }
    }

    /// The effective look-back: the configured one, or one window.
    pub fn effective_look_back(&self) -> chrono::Duration {
        self.look_back.unwrap_or(self.window)
    }
}

/// Everything [`parse_report`] needs to know besides the report itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportContext {
    /// The configured source name (`UsageRecord::source`; also names the provider in errors).
    pub source: Text,
    /// `UsageRecord::billing_account_id`.
    pub billing_account_id: Text,
    /// The `user_id_owner` the report was requested for.
    pub user_id: u64,
    /// Start of the requested window (inclusive).
    pub window_start: DateTime<Utc>,
    /// End of the requested window (exclusive).
    pub window_end: DateTime<Utc>,
    /// Whether the window ended at least `settle_delay` ago; lines of an unsettled window are
    /// never final.
    pub settled: bool,
}

/// The MetalSoft provider: one configured source.
#[derive(Debug)]
pub struct MetalsoftProvider {
    name: String,
    config: MetalsoftConfig,
    url: reqwest::Url,
    billing_account_id: String,
    client: reqwest::Client,
    window_secs: i64,
    next_id: AtomicU64,
    /// The stored watermarks the last plan read, by user, so `fetch` never returns an older
    /// cursor.
    watermarks: Mutex<Arc<HashMap<u64, DateTime<Utc>>>>,
    /// The ledger does not hold the window yet (no `window` stream): pages carry it.
    window_unrecorded: AtomicBool,
}

impl MetalsoftProvider {
    /// Validate the configuration and build the HTTP client.
    pub fn new(name: String, config: MetalsoftConfig) -> Result<Self, ProviderError> {
        let bad = |message: String| ProviderError::Config {
            provider: name.clone(),
            message,
        };
        let base = config.endpoint.trim().trim_end_matches('/');
        let url = reqwest::Url::parse(&format!("{base}{RPC_PATH}")).map_err(|e| {
            bad(format!(
                "endpoint {:?} is not a URL: {e}",
                crate::http::shown_url(&config.endpoint)
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!(
                "endpoint {:?} must be http or https",
                crate::http::shown_url(&config.endpoint)
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| bad(format!("endpoint {:?} has no host", config.endpoint)))?
            .to_string();
        if config.user_ids.is_empty() {
            return Err(bad(
                "user_ids is empty: name at least one user to report on".into(),
            ));
        }
        if config.window < chrono::Duration::seconds(1) || config.window.subsec_nanos() != 0 {
            return Err(bad(format!(
                "window must be a whole number of seconds, at least 1s (got {}s)",
                config.window.num_seconds()
            )));
        }
        if config.effective_look_back() < chrono::Duration::zero() {
            return Err(bad("look_back must not be negative".into()));
        }
        if config.settle_delay < chrono::Duration::zero() {
            return Err(bad("settle_delay must not be negative".into()));
        }
        if config.api_key.expose().is_empty() {
            return Err(bad("api_key is empty".into()));
        }
        let billing_account_id = config.billing_account_id.clone().unwrap_or(host);
        Ok(MetalsoftProvider {
            client: http::client(config.timeout),
            window_secs: config.window.num_seconds(),
            name,
            config,
            url,
            billing_account_id,
            next_id: AtomicU64::new(1),
            watermarks: Mutex::new(Arc::new(HashMap::new())),
            window_unrecorded: AtomicBool::new(false),
        })
    }

    /// The configuration in effect.
    pub fn config(&self) -> &MetalsoftConfig {
        &self.config
    }

    /// The full JSON-RPC URL.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// The start of the grid window containing `t` (windows are counted from the Unix epoch).
    pub fn align_down(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        align_down(t, self.window_secs)
    }

    /// The cursor stream of a user.
    pub fn stream_of(user_id: u64) -> String {
        format!("user:{user_id}")
    }

    /// Refuses a plan on another grid than the one the stored watermarks were read on. The
    /// server clips every line to the window asked for, so a look-back re-read on another grid
    /// returns the same usage cut at other instants, under other keys: a day read as one line over hours already staged as 24
    /// lines bills 23 of them twice, and an hour re-read at the edge of a day staged whole bills
    /// that hour twice. Returns whether the window still has to be stored (the `window`
    /// stream is absent).
    fn check_grid(&self, cursors: &Cursors) -> Result<bool, ProviderError> {
        let bad = |message: String| ProviderError::Config {
            provider: self.name.clone(),
            message,
        };
        let how = "keep the window the source was read with, or change it as the README says \
                   (MetalSoft, `window`): a new source whose `start` is this one's watermarks \
                   once they are on the new grid";
        let shown = |secs: i64| {
            humantime::format_duration(std::time::Duration::from_secs(secs.unsigned_abs()))
                .to_string()
        };
        let record = match cursors.get(STREAM_WINDOW) {
            Some(text) => {
                let was: i64 = text.trim().parse().map_err(|_| {
                    bad(format!(
                        "stored cursor {STREAM_WINDOW} = {text:?} is not a number of seconds"
                    ))
                })?;
                if was != self.window_secs {
                    return Err(bad(format!(
                        "`window` is {} but this source's watermarks were read with windows of {}: \
                         the server clips lines to the window asked for, so re-reading the \
                         look-back on the new grid would bill the overlap twice; {how}",
                        shown(self.window_secs),
                        shown(was)
                    )));
                }
                false
            }
            None => true,
        };
        Ok(record)
    }

    fn shape(&self, message: String) -> ProviderError {
        ProviderError::Shape {
            provider: self.name.clone(),
            call: METHOD.into(),
            message,
        }
    }

    /// The positional parameters of one call.
    fn params(&self, user_id: u64, chunk: &Chunk) -> Value {
        let mut params = vec![
            json!(user_id),
            json!(wire_time(chunk.window_start)),
            json!(wire_time(chunk.window_end)),
        ];
        if self.config.infrastructure_ids.is_some() || self.config.send_datacenter_param {
            params.push(match &self.config.infrastructure_ids {
                Some(ids) => json!(ids),
                None => Value::Null,
            });
        }
        if self.config.send_datacenter_param {
            params.push(Value::Null);
        }
        Value::Array(params)
    }

    /// One HTTP exchange; classifies the outcome for the retry loop.
    async fn call_once(&self, body: &Value) -> Result<String, Attempt> {
        let transport = |message: String| Attempt::Retry {
            error: ProviderError::Transport {
                provider: self.name.clone(),
                call: METHOD.into(),
                message,
            },
            hint: None,
        };
        let resp = self
            .client
            .post(self.url.clone())
            .bearer_auth(self.config.api_key.expose())
            .json(body)
            .send()
            .await
            .map_err(|e| transport(describe_reqwest(&e)))?;
        let status = resp.status();
        let hint = http::retry_hint(status, resp.headers());
        let body = resp
            .bytes()
            .await
            .map_err(|e| transport(format!("reading the body: {}", describe_reqwest(&e))))?;
        // What `text()` does, without copying a valid body to check it (a report is tens of
        // kilobytes, read once per window): invalid bytes become U+FFFD.
        let text = String::from_utf8(Vec::from(body))
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        let http_error = |body: String| ProviderError::Http {
            provider: self.name.clone(),
            call: METHOD.into(),
            status: status.as_u16(),
            body,
        };
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(Attempt::Retry {
                error: http_error(http::snippet(&text)),
                hint,
            });
        }
        if status.as_u16() == 401 || status.as_u16() == 403 {
            let said = rpc_error_of(&text)
                .map(|(code, message)| format!("{code} {message}"))
                .unwrap_or_else(|| http::snippet(&text));
            return Err(Attempt::Fatal(http_error(format!(
                "authentication failed: the API key was rejected or its user lacks the \
                 utilization_reports_read permission (server said: {said})"
            ))));
        }
        if !status.is_success() {
            if let Some((code, message)) = rpc_error_of(&text) {
                return Err(Attempt::Fatal(self.api_error(code, message)));
            }
            return Err(Attempt::Fatal(http_error(http::snippet(&text))));
        }
        Ok(text)
    }

    /// The records of a JSON-RPC answer's text, or the error it states or is.
    fn parse_answer(
        &self,
        text: &str,
        ctx: &ReportContext,
    ) -> Result<Vec<UsageRecord>, ProviderError> {
        let answer = text::read_answer(text).map_err(|e| {
            self.shape(format!(
                "the body is not JSON ({e}): {}",
                http::snippet(text)
            ))
        })?;
        if !answer.is_object {
            return Err(self.shape("the body is not a JSON-RPC response object".into()));
        }
        if let Some(error) = answer.error.filter(|e| !text::is_null(e)) {
            let error: Value = serde_json::from_str(error.get()).unwrap_or(Value::Null);
            let (code, message) = rpc_error_fields(&error);
            return Err(self.api_error(code, message));
        }
        match answer.result {
            Some(report) => records_of(report, ctx),
            None => {
                Err(self.shape("the JSON-RPC response has neither `result` nor `error`".into()))
            }
        }
    }

    fn api_error(&self, code: String, message: String) -> ProviderError {
        ProviderError::Api {
            provider: self.name.clone(),
            call: METHOD.into(),
            code,
            message,
        }
    }

    /// Call `resource_utilization_detailed` with retries; returns the answer's text.
    async fn call(&self, params: Value) -> Result<String, ProviderError> {
        let policy = self.config.retry.clone();
        let params = &params;
        let attempt = || async move {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let body = json!({"jsonrpc": "2.0", "id": id, "method": METHOD, "params": params});
            debug!(source = %self.name, id, params = %body["params"], "metalsoft: calling {METHOD}");
            self.call_once(&body).await
        };
        send_with_retry(&policy, KIND, &self.name, METHOD, attempt).await
    }
}

/// The `(code, message)` of a JSON-RPC error body, if the text is one.
fn rpc_error_of(text: &str) -> Option<(String, String)> {
    let value: Value = serde_json::from_str(text).ok()?;
    let error = value.get("error").filter(|e| e.is_object())?;
    Some(rpc_error_fields(error))
}

fn rpc_error_fields(error: &Value) -> (String, String) {
    let code = match error.get("code") {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        _ => "(no code)".to_string(),
    };
    let mut message = match error.get("message") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => http::snippet(&error.to_string()),
    };
    if let Some(data) = error.get("data").filter(|d| !d.is_null()) {
        message.push_str(" (data: ");
        message.push_str(&http::snippet(&data.to_string()));
        message.push(')');
    }
    (code, message)
}

#[async_trait]
impl Provider for MetalsoftProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn concurrent_fetches(&self) -> usize {
        self.config.concurrent_requests.max(1)
    }

    async fn plan(
        &self,
        cursors: &Cursors,
        now: DateTime<Utc>,
    ) -> Result<Vec<Chunk>, ProviderError> {
        Ok(self.plan_lazily(cursors, now).await?.chunks.collect())
    }

    /// User by user, window by window. Nothing per chunk is held: each user's windows follow
    /// from its watermark, and each chunk is made when the iterator is advanced (a run over
    /// many users and windows would otherwise hold all of them at once).
    async fn plan_lazily<'a>(
        &'a self,
        cursors: &Cursors,
        now: DateTime<Utc>,
    ) -> Result<Plan<'a>, ProviderError> {
        let window = self.config.window;
        let window_secs = self.window_secs;
        let upper = self.align_down(now - self.config.settle_delay);
        // With a stored cursor, re-read `look_back` before it; on the first run nothing was
        // read before `start`, so there is nothing to re-read.
        let look_back = self.config.effective_look_back();
        let first_run = self.align_down(self.config.start);
        // Never before `start`'s window, look-back or not: what lies before it is another
        // system's (or another source's, after a change of `window`) to bill.
        let first_window = move |stored: Option<&DateTime<Utc>>| match stored {
            Some(watermark) => align_down(*watermark - look_back, window_secs).max(first_run),
            None => first_run,
        };
        // The windows `first + k·window` that end by `upper`.
        let windows_from = move |first: DateTime<Utc>| {
            (upper - first).num_seconds().div_euclid(window_secs).max(0)
        };

        let mut stored = HashMap::new();
        let mut len: usize = 0;
        for &user_id in &self.config.user_ids {
            let stream = Self::stream_of(user_id);
            if let Some(text) = cursors.get(&stream) {
                let watermark = parse_time(text).ok_or_else(|| ProviderError::Config {
                    provider: self.name.clone(),
                    message: format!("stored cursor {stream} = {text:?} is not an RFC 3339 time"),
                })?;
                stored.insert(user_id, watermark);
            }
            let windows = windows_from(first_window(stored.get(&user_id)));
            debug!(source = %self.name, user_id, %upper, windows, "metalsoft: planned");
            len += windows as usize;
        }
        // Until the ledger holds the window, every page of this run carries it.
        let unrecorded = self.check_grid(cursors)?;
        self.window_unrecorded.store(unrecorded, Ordering::Relaxed);
        // One map serves the iterator and `fetch`. Users without a stored cursor are not in
        // it: their watermark is `start`, and every window they are planned ends after it.
        let stored = Arc::new(stored);
        if let Ok(mut map) = self.watermarks.lock() {
            *map = Arc::clone(&stored);
        }
        info!(source = %self.name, chunks = len, "metalsoft: plan ready");
        let chunks = self.config.user_ids.iter().flat_map(move |&user_id| {
            let first = first_window(stored.get(&user_id));
            let stream = Self::stream_of(user_id);
            let detail = user_id.to_string();
            (0..windows_from(first)).map(move |k| {
                let window_start = first + chrono::Duration::seconds(k * window_secs);
                Chunk {
                    stream: stream.clone(),
                    window_start,
                    window_end: window_start + window,
                    detail: detail.clone(),
                }
            })
        });
        Ok(Plan {
            len,
            chunks: Box::new(chunks),
        })
    }

    async fn fetch(&self, chunk: &Chunk, now: DateTime<Utc>) -> Result<Page, ProviderError> {
        let user_id: u64 = chunk.detail.parse().map_err(|_| ProviderError::Config {
            provider: self.name.clone(),
            message: format!("chunk detail {:?} is not a user id", chunk.detail),
        })?;
        let answer = self.call(self.params(user_id, chunk)).await?;
        let ctx = ReportContext {
            source: self.name.as_str().into(),
            billing_account_id: self.billing_account_id.as_str().into(),
            user_id,
            window_start: chunk.window_start,
            window_end: chunk.window_end,
            settled: chunk.window_end <= now - self.config.settle_delay,
        };
        let records = self.parse_answer(&answer, &ctx)?;
        // The page's cursor is its window's end, never below what `plan` saw (a look-back
        // re-read must not move a cursor back). Read-only here: pages may be fetched
        // concurrently, and a later window's answer must not lend its end to an earlier page.
        let cursor = match self.watermarks.lock() {
            Ok(map) => map
                .get(&user_id)
                .map_or(chunk.window_end, |w| (*w).max(chunk.window_end)),
            Err(_) => chunk.window_end,
        };
        debug!(
            source = %self.name,
            user_id,
            window_start = %chunk.window_start,
            window_end = %chunk.window_end,
            records = records.len(),
            "metalsoft: window fetched"
        );
        let also = if self.window_unrecorded.load(Ordering::Relaxed) {
            vec![(STREAM_WINDOW.to_string(), self.window_secs.to_string())]
        } else {
            Vec::new()
        };
        Ok(Page {
            records,
            cursor: Some(cursor.to_rfc3339_opts(SecondsFormat::Secs, true)),
            also,
        })
    }
}

/// The start of the `window_secs` grid cell containing `t`, counted from the Unix epoch.
pub fn align_down(t: DateTime<Utc>, window_secs: i64) -> DateTime<Utc> {
    let w = window_secs.max(1);
    let secs = t.timestamp().div_euclid(w) * w;
    Utc.timestamp_opt(secs, 0).single().unwrap_or(t)
}

/// A time as MetalSoft's parameters want it: `YYYY-MM-DDTHH:MM:SSZ`.
pub fn wire_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    // Some MySQL-backed fields come without zone; MetalSoft states UTC throughout.
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|n| n.and_utc())
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub use super::json_decimal as decimal_of;

/// A non-negative integer from a JSON string or number (`"3600"` or `3600`).
pub fn integer_of(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64().or_else(|| n.as_str().parse::<u64>().ok()),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
}

/// Where in the report a line sits, for error messages and keys.
struct Site<'a> {
    infra: &'a str,
    resource_type: &'a str,
    index: usize,
    /// Path of the list the line is in (`detailed_report.<infra>.<type>`); the line itself is
    /// `{path}[{index}]`, written out only into an error.
    path: &'a str,
}

impl Site<'_> {
    /// The line's own path, `{path}[{index}]`, for an error message.
    fn line_path(&self) -> LinePath<'_> {
        LinePath(self.path, self.index)
    }
}

/// `{path}[{index}]`, written out only when displayed.
struct LinePath<'a>(&'a str, usize);

impl std::fmt::Display for LinePath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.0, self.1)
    }
}

/// Entry fields that become record fields rather than pass-through attributes.
const KNOWN_FIELDS: &[&str] = &[
    "cost",
    "cost_currency",
    "cost_per_unit",
    "quantity",
    "measurement_unit",
    "measurement_period",
    "is_reservation",
    "start_timestamp",
    "end_timestamp",
    "product_id",
    "product_label",
    "product_subdomain",
];

/// Parse a report given as JSON text (the JSON-RPC `result` object).
///
/// Reads every resource type under `detailed_report`, every waypoint under `network_report`
/// (the numeric aggregates are only checked against them) and every reservation installment.
/// Empty maps may arrive as `[]` (PHP's encoding of an empty array) and are accepted; a map
/// with a key given twice is refused. A line without `cost`, or with an unreadable timestamp,
/// is an error naming where it sits; so is a line that does not lie inside `ctx`'s window,
/// which refuses the whole report (module doc, "Window clipping"). Each record's raw fields
/// are its line's own text.
pub fn parse_report_str(
    text: &str,
    ctx: &ReportContext,
) -> Result<Vec<UsageRecord>, ProviderError> {
    let report = text::read_report(text).map_err(|e| ProviderError::Shape {
        provider: ctx.source.to_string(),
        call: METHOD.into(),
        message: format!("the report is not JSON: {e}"),
    })?;
    records_of(report, ctx)
}

/// [`parse_report_str`] of a parsed report.
pub fn parse_report(
    result: &Value,
    ctx: &ReportContext,
) -> Result<Vec<UsageRecord>, ProviderError> {
    parse_report_str(&result.to_string(), ctx)
}

/// The records of a walked report (see [`parse_report_str`]).
fn records_of(
    mut report: text::Report<'_>,
    ctx: &ReportContext,
) -> Result<Vec<UsageRecord>, ProviderError> {
    let shape = |message: String| ProviderError::Shape {
        provider: ctx.source.to_string(),
        call: METHOD.into(),
        message,
    };
    if let Some(kind) = report.not_an_object {
        return Err(shape(format!("the result is not an object but {kind}")));
    }
    if !report.has_report {
        return Err(shape(
            "the result has neither `detailed_report` nor `network_report`".into(),
        ));
    }
    check_report_window(&report, ctx).map_err(&shape)?;
    if let Some(problem) = report.problem.take() {
        return Err(shape(problem));
    }
    // Detailed lines first, then waypoints, each in the report's order.
    report.groups.sort_by_key(|g| g.network.is_some());
    let label_of = |infra: &str| {
        report
            .labels
            .iter()
            .rev()
            .find(|(id, _)| id == infra)
            .map(|(_, label)| label.as_ref())
    };
    let lines = report.groups.iter().map(|g| g.lines.len()).sum::<usize>();
    let mut records = Vec::with_capacity(lines + report.installments.len());
    let mut fields = Fields::new();
    for group in &report.groups {
        let first = records.len();
        let network = group
            .network
            .as_ref()
            .map(|(bucket, direction)| (bucket.as_ref(), direction.as_ref()));
        for (index, line) in group.lines.iter().enumerate() {
            let site = Site {
                infra: &group.infra,
                resource_type: &group.resource_type,
                index,
                path: &group.path,
            };
            fields.read(line).map_err(|_| {
                shape(format!(
                    "infrastructure {}, {} line {}: not an object ({})",
                    site.infra,
                    site.resource_type,
                    site.index,
                    site.line_path()
                ))
            })?;
            let mut record =
                line_record(&fields, &site, network, label_of(site.infra), ctx).map_err(&shape)?;
            record.raw = RawJson::from_raw(line);
            records.push(record);
        }
        if let Some(aggregate) = &group.aggregate {
            check_aggregate(aggregate, &records[first..], ctx);
        }
    }
    for (index, entry) in report.installments.iter().enumerate() {
        let path = format!("reservation_installments.server_types[{index}]");
        fields
            .read(entry)
            .map_err(|_| shape(format!("reservation installment {path}: not an object")))?;
        let mut record = installment_record(&fields, &path, ctx).map_err(&shape)?;
        record.raw = RawJson::from_raw(entry);
        records.push(record);
    }
    disambiguate(&mut records, ctx);
    Ok(records)
}

/// Give lines of one report that share a natural key but differ an `occurrence` part (2, 3, …
/// in report order): they are separate charges (two waypoints of one network clipped to the
/// same window start, …), and under one key the ledger would keep only the last one's amount.
/// The first keeps its key, so a line that is unique keeps the key it always had. A line that
/// repeats an earlier one byte for byte is the same charge listed twice: it takes that line's
/// key, and the ledger stages it once.
fn disambiguate(records: &mut [UsageRecord], ctx: &ReportContext) {
    // Each record's key against the first record that had it; nothing more is kept for the
    // common case, a report without repeats (this runs for every line of every report, so
    // on hashbrown's default hasher and without an allocation per line).
    let repeats: Vec<(usize, usize)> = {
        let mut first_of: hashbrown::HashMap<&[(Name, Text)], usize> =
            hashbrown::HashMap::with_capacity(records.len());
        records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let first = *first_of.entry(r.natural_key.as_slice()).or_insert(i);
                (first != i).then_some((i, first))
            })
            .collect()
    };
    if repeats.is_empty() {
        return;
    }
    // Per first record, the distinct lines under its key in report order: a repeat takes the
    // occurrence of the equal line before it, or the next one.
    let mut lines: HashMap<usize, Vec<String>> = HashMap::new();
    let mut occurrences = Vec::with_capacity(repeats.len());
    for (i, first) in repeats {
        let seen = lines
            .entry(first)
            .or_insert_with(|| vec![records[first].raw.get().to_string()]);
        let line = records[i].raw.get();
        let n = match seen.iter().position(|l| l == line) {
            Some(p) => p + 1,
            None => {
                seen.push(line.to_string());
                seen.len()
            }
        };
        if n > 1 {
            occurrences.push((i, n));
        }
    }
    for (i, n) in occurrences {
        let r = &mut records[i];
        warn!(source = %ctx.source, user_id = ctx.user_id, key = %r.natural_key_string(), occurrence = n,
            "metalsoft: a report repeats a natural key with another line; kept as a separate record");
        r.natural_key
            .push(("occurrence".into(), n.to_compact_string()));
    }
}

/// The top-level `start_timestamp`/`end_timestamp` some servers add (the 2020 Bigstep example)
/// must be the requested window; absent or `null` is fine.
fn check_report_window(report: &text::Report<'_>, ctx: &ReportContext) -> Result<(), String> {
    for (field, stated, asked) in [
        ("start_timestamp", report.start_timestamp, ctx.window_start),
        ("end_timestamp", report.end_timestamp, ctx.window_end),
    ] {
        let Some(v) = stated.filter(|v| !text::is_null(v)) else {
            continue;
        };
        let stated = text::as_str(v)
            .and_then(|t| parse_time(&t))
            .ok_or_else(|| format!("the report's `{field}` is not a UTC timestamp: {}", v.get()))?;
        if stated != asked {
            return Err(format!(
                "the report's `{field}` is {}, but the requested window is {} → {}: the page \
                 is not this window's answer, so none of it is staged and the window is asked \
                 again on the next run",
                rfc3339(stated),
                rfc3339(ctx.window_start),
                rfc3339(ctx.window_end)
            ));
        }
    }
    Ok(())
}

/// Log (not fail) when an aggregate disagrees with the sum of its waypoints.
fn check_aggregate(aggregate: &text::Aggregate<'_>, lines: &[UsageRecord], ctx: &ReportContext) {
    // `sum` would panic beyond a decimal's range; such waypoints cannot match any aggregate.
    let cost = super::checked_sum(lines.iter().map(|r| r.billed_cost));
    let quantity = super::checked_sum(lines.iter().map(|r| r.consumed_quantity));
    let path = &aggregate.path;
    for (field, stated, sum) in [
        ("cost", aggregate.cost, cost),
        ("quantity", aggregate.quantity, quantity),
    ] {
        if let Some(stated) = stated.and_then(text::decimal) {
            if Some(stated) != sum {
                let sum = sum.map_or_else(|| "beyond a decimal".to_string(), |s| s.to_string());
                warn!(source = %ctx.source, user_id = ctx.user_id, "metalsoft: {path}.{field} is {stated} but its waypoints sum to {sum}");
            }
        }
    }
}

fn service_name_of(resource_type: &str) -> Name {
    match resource_type {
        "instance" => "compute",
        "drive" | "shared_drive" => "storage",
        "subnet" => "network",
        "data_lake" => "data_lake",
        "reservation_installment" => "reservations",
        t if t.ends_with("_download") || t.ends_with("_upload") => "traffic",
        other => return Name::Owned(other.to_string()),
    }
    .into()
}

/// One line of `detailed_report` or one network waypoint.
fn line_record(
    e: &Fields<'_>,
    site: &Site<'_>,
    network: Option<(&str, &str)>,
    label: Option<&str>,
    ctx: &ReportContext,
) -> Result<UsageRecord, String> {
    let err = |field: &str, what: &str| {
        format!(
            "infrastructure {}, {} line {}: field `{field}` {what} ({}.{field})",
            site.infra,
            site.resource_type,
            site.index,
            site.line_path()
        )
    };
    let present = |field: &str| e.present(field).ok_or_else(|| err(field, "is missing"));
    let decimal = |field: &str| -> Result<Decimal, String> {
        let v = present(field)?;
        text::decimal(v).ok_or_else(|| err(field, &format!("is not a decimal: {}", v.get())))
    };
    let time = |field: &str| -> Result<DateTime<Utc>, String> {
        let v = present(field)?;
        text::as_str(v)
            .and_then(|t| parse_time(&t))
            .ok_or_else(|| err(field, &format!("is not a UTC timestamp: {}", v.get())))
    };
    let string = |field: &str| -> Result<Text, String> {
        let v = present(field)?;
        match text::as_str(v) {
            Some(s) if !s.is_empty() => Ok(Text::from(s.as_ref())),
            _ => Err(err(field, &format!("is not a string: {}", v.get()))),
        }
    };
    let optional_text = |field: &str| {
        e.get(field)
            .and_then(text::scalar_text)
            .map(|t| Text::from(t.as_ref()))
    };

    let cost = decimal("cost")?;
    let quantity = decimal("quantity")?;
    let currency = string("cost_currency")?;
    let unit = string("measurement_unit")?;
    let start = time("start_timestamp")?;
    let end = time("end_timestamp")?;
    if start < ctx.window_start || end > ctx.window_end {
        return Err(format!(
            "infrastructure {}, {} line {}: runs {} → {}, outside the requested window {} → {} \
             ({}); the page is not this window's answer, so none of it is staged and the \
             window is asked again on the next run",
            site.infra,
            site.resource_type,
            site.index,
            rfc3339(start),
            rfc3339(end),
            rfc3339(ctx.window_start),
            rfc3339(ctx.window_end),
            site.line_path()
        ));
    }
    let product_id = present("product_id").and_then(|v| {
        text::integer(v).ok_or_else(|| err("product_id", &format!("is not an id: {}", v.get())))
    })?;
    let is_reservation = match e.present("is_reservation") {
        None => false,
        Some(v) => match text::scalar_text(v).as_deref().map(str::trim) {
            Some("0") | Some("false") => false,
            Some("1") | Some("true") => true,
            _ => {
                return Err(err(
                    "is_reservation",
                    &format!("is not 0 or 1: {}", v.get()),
                ))
            }
        },
    };
    let measurement_period = match e.present("measurement_period") {
        None => None,
        Some(v) => Some(text::integer(v).ok_or_else(|| {
            err(
                "measurement_period",
                &format!("is not a whole number of seconds: {}", v.get()),
            )
        })?),
    };
    let cost_per_unit = match e.present("cost_per_unit") {
        None => None,
        Some(v) => Some(
            text::decimal(v)
                .ok_or_else(|| err("cost_per_unit", &format!("is not a decimal: {}", v.get())))?,
        ),
    };

    let mut attributes = BTreeMap::new();
    attributes.insert("infrastructure_id".into(), Text::from(site.infra));
    if let Some(label) = label {
        attributes.insert("infrastructure_label".into(), Text::from(label));
    }
    attributes.insert("is_reservation".into(), is_reservation.to_compact_string());
    if let Some(p) = measurement_period {
        attributes.insert("measurement_period".into(), p.to_compact_string());
    }
    if let Some(c) = cost_per_unit {
        attributes.insert("cost_per_unit".into(), c.to_compact_string());
    }
    if let Some(s) = optional_text("product_subdomain") {
        attributes.insert("product_subdomain".into(), s);
    }
    for (k, v) in e.iter() {
        if !KNOWN_FIELDS.contains(&k) {
            if let Some(t) = text::scalar_text(v) {
                attributes.insert(Name::Owned(k.to_string()), Text::from(t.as_ref()));
            }
        }
    }

    let (resource_id, sku_id) = match network {
        Some((bucket, direction)) => {
            attributes.insert("bucket".into(), Text::from(bucket));
            attributes.insert("direction".into(), Text::from(direction));
            (
                format_compact!("{bucket}:{product_id}"),
                Text::from(site.resource_type),
            )
        }
        None => {
            let sku = e
                .get("server_type_id")
                .and_then(text::integer)
                .map(|id| format_compact!("server_type:{id}"))
                .unwrap_or_else(|| Text::from(site.resource_type));
            (format_compact!("{}:{product_id}", site.resource_type), sku)
        }
    };

    let user_id = ctx.user_id.to_compact_string();
    let mut natural_key = Vec::with_capacity(if network.is_some() { 8 } else { 6 });
    natural_key.extend([
        ("user_id_owner".into(), user_id.clone()),
        ("infrastructure_id".into(), Text::from(site.infra)),
        ("resource_type".into(), Text::from(site.resource_type)),
        ("product_id".into(), product_id.to_compact_string()),
        ("start_timestamp".into(), utc_secs_text(start)),
        (
            "is_reservation".into(),
            Text::const_new(if is_reservation { "1" } else { "0" }),
        ),
    ]);
    if let Some((bucket, direction)) = network {
        natural_key.push(("bucket".into(), Text::from(bucket)));
        natural_key.push(("direction".into(), Text::from(direction)));
    }

    let label = optional_text("product_label");
    Ok(UsageRecord {
        provider: KIND.into(),
        source: ctx.source.clone(),
        billing_account_id: ctx.billing_account_id.clone(),
        sub_account_id: user_id.clone(),
        resource_id,
        resource_name: label.clone(),
        resource_type: Text::from(site.resource_type),
        service_name: service_name_of(site.resource_type),
        sku_id: Some(sku_id),
        charge_description: label,
        charge_period_start: start,
        charge_period_end: end,
        consumed_quantity: quantity,
        consumed_unit: unit,
        billed_cost: cost,
        billing_currency: currency,
        scope: user_id,
        natural_key,
        is_final: ctx.settled,
        attributes,
        raw: RawJson::null(),
    })
}

/// One `reservation_installments.server_types[]` entry (see the module doc for the choices).
fn installment_record(
    e: &Fields<'_>,
    path: &str,
    ctx: &ReportContext,
) -> Result<UsageRecord, String> {
    let err =
        |field: &str, what: &str| format!("reservation installment {path}: field `{field}` {what}");
    let present = |field: &str| e.present(field).ok_or_else(|| err(field, "is missing"));
    let cost = present("cost").and_then(|v| {
        text::decimal(v).ok_or_else(|| err("cost", &format!("is not a decimal: {}", v.get())))
    })?;
    let time = |field: &str| -> Result<DateTime<Utc>, String> {
        let v = present(field)?;
        text::as_str(v)
            .and_then(|t| parse_time(&t))
            .ok_or_else(|| err(field, &format!("is not a UTC timestamp: {}", v.get())))
    };
    let start = time("start_timestamp")?;
    let end = time("end_timestamp")?;
    let currency = e
        .get("cost_currency")
        .and_then(text::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err("cost_currency", "is missing"))
        .map(|c| Text::from(c.as_ref()))?;
    let reservation_id = e
        .get("server_type_reservation_id")
        .and_then(text::integer)
        .ok_or_else(|| err("server_type_reservation_id", "is missing or not an id"))?;
    let name = e
        .get("server_type_name")
        .and_then(text::scalar_text)
        .map(|n| Text::from(n.as_ref()));

    let mut attributes = BTreeMap::new();
    attributes.insert("is_reservation".into(), Text::const_new("true"));
    for (k, v) in e.iter() {
        if !matches!(
            k,
            "cost" | "cost_currency" | "start_timestamp" | "end_timestamp"
        ) {
            if let Some(t) = text::scalar_text(v) {
                attributes.insert(Name::Owned(k.to_string()), Text::from(t.as_ref()));
            }
        }
    }
    let resource_type = Text::const_new("reservation_installment");
    Ok(UsageRecord {
        provider: KIND.into(),
        source: ctx.source.clone(),
        billing_account_id: ctx.billing_account_id.clone(),
        sub_account_id: ctx.user_id.to_compact_string(),
        resource_id: format_compact!("server_type_reservation:{reservation_id}"),
        resource_name: name.clone(),
        service_name: service_name_of(&resource_type),
        sku_id: Some(name.clone().unwrap_or_else(|| resource_type.clone())),
        charge_description: name.map(|n| format_compact!("reservation installment {n}")),
        charge_period_start: start,
        charge_period_end: end,
        consumed_quantity: Decimal::ONE,
        consumed_unit: Text::const_new("installment"),
        billed_cost: cost,
        billing_currency: currency,
        scope: ctx.user_id.to_compact_string(),
        natural_key: vec![
            ("user_id_owner".into(), ctx.user_id.to_compact_string()),
            ("infrastructure_id".into(), Text::default()),
            ("resource_type".into(), resource_type.clone()),
            ("product_id".into(), reservation_id.to_compact_string()),
            ("start_timestamp".into(), utc_secs_text(start)),
            ("is_reservation".into(), Text::const_new("1")),
        ],
        resource_type,
        is_final: ctx.settled,
        attributes,
        raw: RawJson::null(),
    })
}

impl FromStr for MetalsoftConfig {
    type Err = String;

    /// Read a configuration from YAML text (tests and examples).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }
}
