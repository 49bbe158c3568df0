//! Jelastic / Virtuozzo Application Platform: the account's billing history, bucketed by hour
//! or day, from `billing/account/rest/getaccountbillinghistorybyperiod`.
//!
//! The platform has no invoice lines with ids; what it offers is
//! `GetAccountBillingHistoryByPeriod(session, starttime, endtime, period, timeOffset)`, a
//! history **aggregated into buckets of `period`** (one row per bucket, environment, node and
//! charge type). That shapes everything here:
//!
//! * **Transport** (reference 3.1): `POST {hoster_url}/1.0/billing/account/rest/
//!   getaccountbillinghistorybyperiod` with an `application/x-www-form-urlencoded` body, as the
//!   platform's quick-start documents it (a query string on a POST or a GET also appear in
//!   public code; the form body keeps the session out of URLs and access logs). `session`
//!   carries a session or — recommended — a personal access token restricted to this method.
//! * **Errors**: the platform answers HTTP 200 even for failures; `result != 0` is an error and
//!   `error` (plus `reason` when present) is the platform's message. It is never retried: it is
//!   the platform's verdict, not a transient failure. Result codes that mean the session or
//!   token is not good enough ([`AUTH_RESULT_CODES`]) are reported as authentication failures.
//!   HTTP 5xx, 429 and network failures are retried with the configured policy.
//! * **Time**: timestamps on the wire are naive (`yyyy-MM-dd HH:mm:ss`, no zone) and are
//!   interpreted in the configured `time_offset`; `timeOffset` is **always** sent so the
//!   platform buckets in the same zone we convert with (reference 3.4). Every time inside
//!   billsync is UTC: `utc = naive − offset`. The unit of `timeOffset` on the wire is not
//!   documented; it is `minutes` by default and configurable (`time_offset_unit`).
//! * **Cursor = a watermark per stream** (`account`, or `env:<appid>` when the history is
//!   restricted to given environments) → RFC 3339 UTC. Buckets sit on the `period` grid of the
//!   configured offset (a DAY bucket starts at local midnight), so a re-read asks for exactly
//!   the same buckets and gets rows with exactly the same natural keys. Only buckets that ended
//!   at least `settle_delay` ago are requested; each run re-reads the last `look_back_buckets`
//!   buckets before the stored watermark (late charges), and the stored watermark never moves
//!   backwards. A long backfill is split into requests of at most `max_buckets_per_request`
//!   buckets (the API has no pagination: the window is the only bound on a response). No
//!   window begins before `start`'s bucket, look-back or not. The grid (`period` and
//!   `time_offset`) is kept beside the watermarks (stream `grid`) and a plan on another grid is
//!   refused: the natural key holds the period and the bucket start, so a look-back re-read on
//!   another grid would bring back usage already staged under other keys, billed twice.
//! * **Answers**: only an `array` list is an answer about the window (`[]`: no usage); a
//!   success without one is refused (read as empty, its window would be passed and lost).
//!   Rows of buckets outside the window asked for are dropped and, except the bucket at the
//!   window's end (an inclusive `endtime`), warned about once per response with their count:
//!   on a grid-aligned window they mean the platform read the window or offset otherwise.
//! * **Natural key** (reference 3.4): `(appid, nodeid, type, resourceType,
//!   hostGroupUniqueName, period, bucket start in UTC)`. Two rows with the same key in one
//!   response are merged (costs and counts added, a warning logged) rather than one silently
//!   replacing the other in the ledger.
//! * **Finality**: a bucket is final once it ended at least `settle_delay` ago. The reference
//!   suggests also waiting for `isPaid || isWithdrawn || isBonus`; that is opt-in
//!   (`final_requires_charge`), because an account that is never charged through these flags
//!   would otherwise hold every record provisional forever. The cursor of a stream stops at
//!   the first bucket that still holds a provisional record (not settled yet, or with
//!   `final_requires_charge` not charged yet), so that bucket is read again until it is final
//!   (a cursor past it, out of the look-back's reach, would leave it provisional, never sent).
//! * **Money**: `cost` is a JSON float on the wire (`0.012846`). With serde_json's
//!   `arbitrary_precision` a number keeps its text, which is read into [`Decimal`] exactly; no
//!   amount ever passes through a binary float. The payload has no currency: it is configuration.
//!
//! Record shape (documented choice): one record per row; `sub_account_id` = the environment's
//! `appid` (stable; the `domain` can be renamed and is kept as an attribute), `resource_id` =
//! `nodeid`, `resource_type` = `type` (e.g. `ip`), `service_name` = `resourceType` in lower case
//! (e.g. `option`), `consumed_quantity` = `count` in unit `count` (the number of charges the
//! bucket aggregates; the documented example's 3 matches three hourly charges), `billed_cost`
//! = `cost`. Every other scalar field becomes an attribute under its payload name, except the
//! charge-state flags `isPaid`/`isWithdrawn`, which change after the fact and are kept in `raw`
//! only (so a flag flip is not mistaken for a change of a final record).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use tracing::{debug, info, warn};

use crate::config::Secret;
use crate::http::{self, RetryPolicy};
use crate::providers::http::{describe_reqwest, send_with_retry, Attempt};
use crate::providers::{Chunk, Cursors, Page, Provider, ProviderError};
use crate::record::{Name, RawJson, Text, UsageRecord};
use compact_str::ToCompactString;

/// The provider kind, also the `provider` field of every record.
pub const KIND: &str = "jelastic";
/// The API method this provider calls (named in errors).
pub const METHOD: &str = "GetAccountBillingHistoryByPeriod";
/// The REST path below the hoster URL.
pub const REST_PATH: &str = "/1.0/billing/account/rest/getaccountbillinghistorybyperiod";
/// Result codes that mean the session or token was refused: `8202` (permission denied, the
/// token lacks the method; reference 3.3) and `702` (session invalid or expired; not confirmed
/// by a public source, also what the simulator answers).
pub const AUTH_RESULT_CODES: &[i64] = &[702, 8202];
/// The naive time format of the wire.
pub const WIRE_TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";
/// Cursor stream holding the grid (`period` and `time_offset`, e.g. `DAY +02:00`) the source's
/// watermarks were read on, stored beside them (see [`JelasticProvider::check_grid`]).
pub const STREAM_GRID: &str = "grid";

/// The bucket size of the history (`period`). Only the two the sync can use are offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Period {
    /// One bucket per hour.
    #[default]
    #[serde(alias = "hour")]
    Hour,
    /// One bucket per (local) day.
    #[serde(alias = "day")]
    Day,
}

impl Period {
    /// The value of the `period` parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "HOUR",
            Period::Day => "DAY",
        }
    }

    /// Length of one bucket in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            Period::Hour => 3600,
            Period::Day => 86_400,
        }
    }

    /// Length of one bucket.
    pub fn duration(self) -> chrono::Duration {
        chrono::Duration::seconds(self.seconds())
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The zone of the API's naive timestamps, as a fixed offset east of UTC in whole minutes.
/// Written `+02:00`, `-05:30`, `+0530` or `Z`/`UTC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeOffset {
    minutes: i32,
}

impl TimeOffset {
    /// UTC.
    pub const UTC: TimeOffset = TimeOffset { minutes: 0 };

    /// An offset of `minutes` east of UTC (negative: west). At most ±18 hours.
    pub fn from_minutes(minutes: i32) -> Option<Self> {
        (minutes.abs() <= 18 * 60).then_some(TimeOffset { minutes })
    }

    /// Minutes east of UTC.
    pub fn minutes(self) -> i32 {
        self.minutes
    }

    /// Seconds east of UTC.
    pub fn seconds(self) -> i64 {
        i64::from(self.minutes) * 60
    }

    /// The naive wall-clock time of `t` in this offset.
    pub fn to_local(self, t: DateTime<Utc>) -> NaiveDateTime {
        t.naive_utc() + chrono::Duration::seconds(self.seconds())
    }

    /// The UTC instant of a naive wall-clock time in this offset.
    pub fn to_utc(self, local: NaiveDateTime) -> DateTime<Utc> {
        (local - chrono::Duration::seconds(self.seconds())).and_utc()
    }
}

impl fmt::Display for TimeOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.minutes < 0 { '-' } else { '+' };
        let m = self.minutes.abs();
        write!(f, "{sign}{:02}:{:02}", m / 60, m % 60)
    }
}

impl FromStr for TimeOffset {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let t = text.trim();
        if matches!(t, "Z" | "z" | "UTC" | "utc" | "0") {
            return Ok(TimeOffset::UTC);
        }
        let bad = || format!("time offset {text:?} must look like +02:00, -05:30 or Z");
        let (sign, rest) = match t.as_bytes().first() {
            Some(b'+') => (1, &t[1..]),
            Some(b'-') => (-1, &t[1..]),
            _ => return Err(bad()),
        };
        let (h, m) = match rest.split_once(':') {
            Some((h, m)) => (h, m),
            None if rest.len() == 4 => rest.split_at(2),
            None => (rest, "0"),
        };
        let h: i32 = h.parse().map_err(|_| bad())?;
        let m: i32 = m.parse().map_err(|_| bad())?;
        if !(0..60).contains(&m) {
            return Err(bad());
        }
        TimeOffset::from_minutes(sign * (h * 60 + m))
            .ok_or_else(|| format!("{} (at most ±18:00)", bad()))
    }
}

impl<'de> Deserialize<'de> for TimeOffset {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The unit `timeOffset` is sent in (the platform does not document it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetUnit {
    /// Signed minutes east of UTC (`+02:00` → `120`).
    #[default]
    Minutes,
    /// Signed hours east of UTC (`+02:00` → `2`); the offset must be whole hours.
    Hours,
}

/// Settings of one Jelastic / Virtuozzo source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JelasticConfig {
    /// Base URL of the hoster's API, e.g. `https://app.jelastic.example.com`; the call goes to
    /// `POST {hoster_url}/1.0/billing/account/rest/getaccountbillinghistorybyperiod`.
    pub hoster_url: String,
    /// Session or (recommended) personal access token, restricted to
    /// `billing.account.GetAccountBillingHistoryByPeriod` (`env:NAME` or `file:/path`).
    pub session: Secret,
    /// The `appid` parameter (target application of the call), sent only when set; some
    /// platforms want `cluster` or a platform-wide id.
    #[serde(default)]
    pub appid: Option<String>,
    /// Restrict the history to these environments (`targetAppid`, one request and one cursor
    /// stream `env:<appid>` each). Empty (the default): the whole account, stream `account`.
    #[serde(default)]
    pub target_appids: Vec<String>,
    /// Bucket size: `HOUR` (default) or `DAY`.
    #[serde(default)]
    pub period: Period,
    /// Buckets before the stored watermark that every run re-reads, to pick up late charges.
    #[serde(default = "default_look_back_buckets")]
    pub look_back_buckets: u32,
    /// Only buckets that ended at least this long ago are requested (and are final).
    #[serde(
        default = "default_settle_delay",
        with = "crate::config::duration::chrono"
    )]
    pub settle_delay: chrono::Duration,
    /// The first watermark of a stream with no stored cursor; nothing before it is ever read.
    pub start: DateTime<Utc>,
    /// The zone of the platform's naive timestamps (`+02:00`, `-05:00`, `Z`; default UTC).
    /// Always sent as `timeOffset`, so the platform buckets in the same zone.
    #[serde(default)]
    pub time_offset: TimeOffset,
    /// The unit of `timeOffset` on the wire: `minutes` (default) or `hours`.
    #[serde(default)]
    pub time_offset_unit: OffsetUnit,
    /// ISO 4217 currency of `cost` (the hoster's currency; the payload has none).
    pub currency: String,
    /// FOCUS `BillingAccountId` of the records (e.g. the account's uid or e-mail); defaults to
    /// the hoster's host name.
    #[serde(default)]
    pub billing_account_id: Option<String>,
    /// Most buckets one request covers; a longer window (a backfill) is split.
    #[serde(default = "default_max_buckets")]
    pub max_buckets_per_request: u32,
    /// Timeout of one HTTP request.
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    /// Retries of transient failures (network, timeouts, HTTP 5xx and 429).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Send records that are not final yet (they are corrected when they change).
    #[serde(default)]
    pub push_provisional: bool,
    /// A row is final only when also charged (`isPaid`, `isWithdrawn` or `isBonus`), as the
    /// reference suggests. Off by default: rows that are never flagged would never be final.
    #[serde(default)]
    pub final_requires_charge: bool,
}

fn default_look_back_buckets() -> u32 {
    2
}

fn default_settle_delay() -> chrono::Duration {
    chrono::Duration::hours(1)
}

fn default_max_buckets() -> u32 {
    24
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

impl JelasticConfig {
    /// A configuration with every optional setting at its default (tests, simulators, demo).
    pub fn new(
        hoster_url: impl Into<String>,
        session: Secret,
        currency: impl Into<String>,
        start: DateTime<Utc>,
    ) -> Self {
        JelasticConfig {
            hoster_url: hoster_url.into(),
            session,
            appid: None,
            target_appids: Vec::new(),
            period: Period::default(),
            look_back_buckets: default_look_back_buckets(),
            settle_delay: default_settle_delay(),
            start,
            time_offset: TimeOffset::UTC,
            time_offset_unit: OffsetUnit::default(),
            currency: currency.into(),
            billing_account_id: None,
            max_buckets_per_request: default_max_buckets(),
            timeout: default_timeout(),
            retry: RetryPolicy::default(),
            push_provisional: false,
            final_requires_charge: false,
        }
    }
}

impl FromStr for JelasticConfig {
    type Err = String;

    /// Read a configuration from YAML text (tests and examples).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }
}

/// The bucket grid of a period in a time offset: buckets start at whole local hours or local
/// midnights, counted from the local epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    /// Bucket size.
    pub period: Period,
    /// Zone of the buckets.
    pub offset: TimeOffset,
}

impl Grid {
    /// The start of the bucket containing `t`.
    pub fn align_down(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let b = self.period.seconds();
        let off = self.offset.seconds();
        let secs = (t.timestamp() + off).div_euclid(b) * b - off;
        Utc.timestamp_opt(secs, 0).single().unwrap_or(t)
    }

    /// Whether `t` is a bucket start.
    pub fn is_aligned(&self, t: DateTime<Utc>) -> bool {
        self.align_down(t) == t
    }
}

impl fmt::Display for Grid {
    /// `HOUR +00:00`, `DAY +02:00`: the value of the `grid` cursor stream.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.period, self.offset)
    }
}

/// Everything [`parse_response`] needs besides the response itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryContext {
    /// The configured source name (`UsageRecord::source`; also names the provider in errors).
    pub source: String,
    /// `UsageRecord::billing_account_id`.
    pub billing_account_id: String,
    /// `UsageRecord::billing_currency`.
    pub currency: String,
    /// The bucket size that was requested.
    pub period: Period,
    /// The zone the naive `dateTime` values are in.
    pub time_offset: TimeOffset,
    /// Start of the requested window (inclusive, UTC).
    pub window_start: DateTime<Utc>,
    /// End of the requested window (exclusive, UTC).
    pub window_end: DateTime<Utc>,
    /// Buckets ending at or before this instant (`now − settle_delay`) are settled.
    pub settled_before: DateTime<Utc>,
    /// See [`JelasticConfig::final_requires_charge`].
    pub final_requires_charge: bool,
}

impl HistoryContext {
    fn grid(&self) -> Grid {
        Grid {
            period: self.period,
            offset: self.time_offset,
        }
    }

    /// The requested window, for messages.
    fn window(&self) -> String {
        format!(
            "[{}, {})",
            rfc3339(self.window_start),
            rfc3339(self.window_end)
        )
    }
}

/// The Jelastic provider: one configured source.
#[derive(Debug)]
pub struct JelasticProvider {
    name: String,
    config: JelasticConfig,
    url: reqwest::Url,
    billing_account_id: String,
    client: reqwest::Client,
    /// The watermark `plan` saw per stream, so `fetch` never returns an older cursor.
    watermarks: Mutex<HashMap<String, DateTime<Utc>>>,
    /// Per stream, the start of the earliest bucket of this run that held a provisional record
    /// (settled but not charged yet, with `final_requires_charge`): no page's cursor passes it,
    /// so the bucket is read again until it is final. Cleared by `plan`.
    pins: Mutex<HashMap<String, DateTime<Utc>>>,
    /// The ledger does not hold the grid yet (no `grid` stream): pages carry it.
    grid_unrecorded: AtomicBool,
}

impl JelasticProvider {
    /// Validate the configuration and build the HTTP client.
    pub fn new(name: String, config: JelasticConfig) -> Result<Self, ProviderError> {
        let bad = |message: String| ProviderError::Config {
            provider: name.clone(),
            message,
        };
        let base = config.hoster_url.trim().trim_end_matches('/');
        let url = reqwest::Url::parse(&format!("{base}{REST_PATH}")).map_err(|e| {
            bad(format!(
                "hoster_url {:?} is not a URL: {e}",
                crate::http::shown_url(&config.hoster_url)
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!(
                "hoster_url {:?} must be http or https",
                crate::http::shown_url(&config.hoster_url)
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| bad(format!("hoster_url {:?} has no host", config.hoster_url)))?
            .to_string();
        if config.session.expose().trim().is_empty() {
            return Err(bad("session is empty".into()));
        }
        let currency = config.currency.trim();
        if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(bad(format!(
                "currency {:?} must be an ISO 4217 code such as EUR (the payload has none)",
                config.currency
            )));
        }
        if config.settle_delay < chrono::Duration::zero() {
            return Err(bad("settle_delay must not be negative".into()));
        }
        if config.max_buckets_per_request == 0 {
            return Err(bad("max_buckets_per_request must be at least 1".into()));
        }
        if config.time_offset_unit == OffsetUnit::Hours && config.time_offset.minutes() % 60 != 0 {
            return Err(bad(format!(
                "time_offset {} is not whole hours, but time_offset_unit is hours",
                config.time_offset
            )));
        }
        if config.target_appids.iter().any(|a| a.trim().is_empty()) {
            return Err(bad("target_appids holds an empty appid".into()));
        }
        let billing_account_id = config.billing_account_id.clone().unwrap_or(host);
        Ok(JelasticProvider {
            client: http::client(config.timeout),
            name,
            config,
            url,
            billing_account_id,
            watermarks: Mutex::new(HashMap::new()),
            pins: Mutex::new(HashMap::new()),
            grid_unrecorded: AtomicBool::new(false),
        })
    }

    /// The configuration in effect.
    pub fn config(&self) -> &JelasticConfig {
        &self.config
    }

    /// The full REST URL.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// The bucket grid of this source.
    pub fn grid(&self) -> Grid {
        Grid {
            period: self.config.period,
            offset: self.config.time_offset,
        }
    }

    /// Refuses a plan on another grid than the one the stored watermarks were read on. A
    /// record's key holds the period and the bucket start (in UTC), so a look-back re-read on
    /// another grid returns usage already staged under other keys: HOUR buckets staged, then
    /// the same day read as one DAY row (or a DAY bucket moved by another `time_offset`) bills
    /// the overlap twice. Returns whether the grid still has to be stored (the `grid` stream is
    /// absent).
    fn check_grid(&self, cursors: &Cursors) -> Result<bool, ProviderError> {
        let configured = self.grid().to_string();
        match cursors.get(STREAM_GRID).map(|t| t.trim()) {
            Some(was) if was == configured => Ok(false),
            Some(was) => Err(ProviderError::Config {
                provider: self.name.clone(),
                message: format!(
                    "`period` and `time_offset` are {configured} but this source's watermarks \
                     were read on buckets of {was}: a record's key holds the period and the \
                     bucket start, so re-reading the look-back on the new grid would bill the \
                     overlap twice; keep the period and time_offset the source was read with, \
                     or change them as the README says (Jelastic, `period`): a new source whose \
                     `start` is this one's watermarks once they are on the new grid"
                ),
            }),
            None => Ok(true),
        }
    }

    /// The cursor streams: `account`, or `env:<appid>` per configured target environment.
    pub fn streams(&self) -> Vec<(String, Option<String>)> {
        if self.config.target_appids.is_empty() {
            vec![("account".into(), None)]
        } else {
            self.config
                .target_appids
                .iter()
                .map(|a| (format!("env:{a}"), Some(a.clone())))
                .collect()
        }
    }

    /// The value of `timeOffset` on the wire.
    pub fn time_offset_param(&self) -> String {
        match self.config.time_offset_unit {
            OffsetUnit::Minutes => self.config.time_offset.minutes().to_string(),
            OffsetUnit::Hours => (self.config.time_offset.minutes() / 60).to_string(),
        }
    }

    /// The form fields of one call, without the session (safe to log).
    pub fn params(&self, chunk: &Chunk) -> Vec<(&'static str, String)> {
        let offset = self.config.time_offset;
        let mut p = Vec::with_capacity(7);
        if let Some(appid) = &self.config.appid {
            p.push(("appid", appid.clone()));
        }
        p.push((
            "starttime",
            offset
                .to_local(chunk.window_start)
                .format(WIRE_TIME_FORMAT)
                .to_string(),
        ));
        p.push((
            "endtime",
            offset
                .to_local(chunk.window_end)
                .format(WIRE_TIME_FORMAT)
                .to_string(),
        ));
        p.push(("period", self.config.period.as_str().to_string()));
        p.push(("timeOffset", self.time_offset_param()));
        if !chunk.detail.is_empty() {
            p.push(("targetAppid", chunk.detail.clone()));
        }
        p
    }

    /// Replace every occurrence of the session in platform text (some platforms echo it).
    fn redact(&self, text: &str) -> String {
        let secret = self.config.session.expose();
        if secret.len() >= 4 {
            text.replace(secret, "***")
        } else {
            text.to_string()
        }
    }

    fn http_error(&self, status: u16, body: String) -> ProviderError {
        ProviderError::Http {
            provider: self.name.clone(),
            call: METHOD.into(),
            status,
            body: self.redact(&body),
        }
    }

    /// One HTTP exchange; classifies the outcome for the retry loop. Returns the body text of
    /// an HTTP 2xx answer (its `result` is checked by [`parse_response`]).
    async fn call_once(&self, form: &[(&str, String)]) -> Result<String, Attempt> {
        let transport = |message: String| Attempt::Retry {
            error: ProviderError::Transport {
                provider: self.name.clone(),
                call: METHOD.into(),
                message: self.redact(&message),
            },
            hint: None,
        };
        let resp = self
            .client
            .post(self.url.clone())
            .form(form)
            .send()
            .await
            .map_err(|e| transport(describe_reqwest(&e)))?;
        let status = resp.status();
        let hint = http::retry_hint(status, resp.headers());
        let text = resp
            .text()
            .await
            .map_err(|e| transport(format!("reading the body: {}", describe_reqwest(&e))))?;
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(Attempt::Retry {
                error: self.http_error(status.as_u16(), http::snippet(&text)),
                hint,
            });
        }
        if status.as_u16() == 401 || status.as_u16() == 403 {
            return Err(Attempt::Fatal(self.http_error(
                status.as_u16(),
                format!(
                    "authentication failed: the session or token was refused (server said: {})",
                    http::snippet(&text)
                ),
            )));
        }
        if status.as_u16() == 404 {
            return Err(Attempt::Fatal(self.http_error(
                404,
                format!(
                    "endpoint not found: check hoster_url ({}) (server said: {})",
                    self.config.hoster_url,
                    http::snippet(&text)
                ),
            )));
        }
        if !status.is_success() {
            if let Some(err) = self.result_error_of(&text) {
                return Err(Attempt::Fatal(err));
            }
            return Err(Attempt::Fatal(
                self.http_error(status.as_u16(), http::snippet(&text)),
            ));
        }
        Ok(text)
    }

    /// The platform's error, if `text` is an envelope with `result != 0`.
    fn result_error_of(&self, text: &str) -> Option<ProviderError> {
        let value: Value = serde_json::from_str(text).ok()?;
        match result_error(&value, &self.name) {
            Err(ProviderError::Api {
                provider,
                call,
                code,
                message,
            }) => Some(ProviderError::Api {
                provider,
                call,
                code,
                message: self.redact(&message),
            }),
            _ => None,
        }
    }

    /// Call the API with retries; returns the body of a successful HTTP exchange.
    async fn call(&self, chunk: &Chunk) -> Result<String, ProviderError> {
        let policy = self.config.retry.clone();
        let params = self.params(chunk);
        let mut form: Vec<(&str, String)> = Vec::with_capacity(params.len() + 1);
        form.push(("session", self.config.session.expose().to_string()));
        form.extend(params.iter().cloned());
        let form = &form;
        let params = &params;
        let attempt = || async move {
            debug!(source = %self.name, ?params, "jelastic: calling {METHOD}");
            self.call_once(form).await
        };
        send_with_retry(&policy, KIND, &self.name, METHOD, attempt).await
    }
}

#[async_trait]
impl Provider for JelasticProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn name(&self) -> &str {
        &self.name
    }

    async fn plan(
        &self,
        cursors: &Cursors,
        now: DateTime<Utc>,
    ) -> Result<Vec<Chunk>, ProviderError> {
        // Refused before anything is asked; until the ledger holds the grid, every page of
        // this run carries it.
        let unrecorded = self.check_grid(cursors)?;
        self.grid_unrecorded.store(unrecorded, Ordering::Relaxed);
        let grid = self.grid();
        let bucket = self.config.period.duration();
        let upper = grid.align_down(now - self.config.settle_delay);
        let floor = grid.align_down(self.config.start);
        let per_request = bucket * self.config.max_buckets_per_request.min(100_000) as i32;
        let look_back = bucket * self.config.look_back_buckets.min(100_000) as i32;
        let mut chunks = Vec::new();
        let mut seen = HashMap::new();
        for (stream, target) in self.streams() {
            // With a stored cursor, re-read the last N buckets before it; on the first run
            // nothing was read before `start`, so there is nothing to re-read. Never before
            // `start` either way.
            let (watermark, from) = match cursors.get(&stream) {
                Some(text) => {
                    let wm = parse_cursor(text).ok_or_else(|| ProviderError::Config {
                        provider: self.name.clone(),
                        message: format!(
                            "stored cursor {stream} = {text:?} is not an RFC 3339 time"
                        ),
                    })?;
                    (wm, grid.align_down(wm - look_back).max(floor))
                }
                None => (self.config.start, floor),
            };
            seen.insert(stream.clone(), watermark);
            let before = chunks.len();
            let mut window_start = from;
            while window_start < upper {
                let window_end = (window_start + per_request).min(upper);
                chunks.push(Chunk {
                    stream: stream.clone(),
                    window_start,
                    window_end,
                    detail: target.clone().unwrap_or_default(),
                });
                window_start = window_end;
            }
            debug!(source = %self.name, %stream, %watermark, %upper, requests = chunks.len() - before, "jelastic: planned");
        }
        if let Ok(mut map) = self.watermarks.lock() {
            map.extend(seen);
        }
        if let Ok(mut pins) = self.pins.lock() {
            pins.clear();
        }
        info!(source = %self.name, chunks = chunks.len(), "jelastic: plan ready");
        Ok(chunks)
    }

    async fn fetch(&self, chunk: &Chunk, now: DateTime<Utc>) -> Result<Page, ProviderError> {
        let text = self.call(chunk).await?;
        let ctx = HistoryContext {
            source: self.name.clone(),
            billing_account_id: self.billing_account_id.clone(),
            currency: self.config.currency.trim().to_string(),
            period: self.config.period,
            time_offset: self.config.time_offset,
            window_start: chunk.window_start,
            window_end: chunk.window_end,
            settled_before: now - self.config.settle_delay,
            final_requires_charge: self.config.final_requires_charge,
        };
        let records = parse_response(&text, &ctx)
            .map_err(|e| e.map_remote_text(|text| self.redact(&text)))?;
        // The page's cursor is its window's end, never below what `plan` saw (a look-back
        // re-read must not move a cursor back). Read-only here: pages may be fetched
        // concurrently, and a later window's answer must not lend its end to an earlier page.
        //
        // A provisional record (a settled bucket not charged yet) pins the cursor of its
        // stream at its bucket for the rest of the run: a cursor past it would leave it
        // provisional for ever once the look-back no longer reaches it. (Chunks are fetched
        // one at a time, in plan order, so a pin is set before any later page is made.)
        let provisional = records
            .iter()
            .filter(|r| !r.is_final)
            .map(|r| r.charge_period_start)
            .min();
        let pin = match self.pins.lock() {
            Ok(mut pins) => {
                if let Some(p) = provisional {
                    let at = pins.entry(chunk.stream.clone()).or_insert(p);
                    *at = (*at).min(p);
                }
                pins.get(&chunk.stream).copied()
            }
            Err(_) => provisional,
        };
        let end = pin.map_or(chunk.window_end, |p| p.min(chunk.window_end));
        let cursor = match self.watermarks.lock() {
            Ok(map) => map.get(&chunk.stream).map_or(end, |w| (*w).max(end)),
            Err(_) => end,
        };
        debug!(
            source = %self.name,
            stream = %chunk.stream,
            window_start = %chunk.window_start,
            window_end = %chunk.window_end,
            records = records.len(),
            "jelastic: window fetched"
        );
        let also = if self.grid_unrecorded.load(Ordering::Relaxed) {
            vec![(STREAM_GRID.to_string(), self.grid().to_string())]
        } else {
            Vec::new()
        };
        Ok(Page {
            records,
            cursor: Some(cursor.to_rfc3339_opts(SecondsFormat::Secs, true)),
            also,
        })
    }

    fn push_provisional(&self) -> bool {
        self.config.push_provisional
    }
}

fn parse_cursor(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub use super::json_decimal as decimal_of;

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `Err(Api)` when the envelope says `result != 0`, with the platform's `error`/`reason`.
fn result_error(envelope: &Value, source: &str) -> Result<(), ProviderError> {
    let shape = |message: String| ProviderError::Shape {
        provider: source.to_string(),
        call: METHOD.into(),
        message,
    };
    let Some(obj) = envelope.as_object() else {
        return Err(shape("the body is not a JSON object".into()));
    };
    let result = match obj.get("result") {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| shape(format!("`result` is not an integer: {n}")))?,
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| shape(format!("`result` is not an integer: {s:?}")))?,
        Some(other) => return Err(shape(format!("`result` is not an integer: {other}"))),
        None => return Err(shape("the response has no `result`".into())),
    };
    if result == 0 {
        return Ok(());
    }
    let said = |field: &str| {
        obj.get(field)
            .and_then(scalar_text)
            .filter(|s| !s.is_empty())
    };
    let mut message = said("error").unwrap_or_else(|| "(no error message)".to_string());
    if let Some(reason) = said("reason") {
        message.push_str(&format!(" (reason: {reason})"));
    }
    if AUTH_RESULT_CODES.contains(&result) {
        message = format!(
            "authentication failed: the session or token is invalid, expired or lacks \
             billing.account.{METHOD} (platform said: {message})"
        );
    }
    Err(ProviderError::Api {
        provider: source.to_string(),
        call: METHOD.into(),
        code: result.to_string(),
        message,
    })
}

/// Row fields that become record fields or are kept out of the attributes.
const NOT_ATTRIBUTES: &[&str] = &["cost", "dateTime", "isPaid", "isWithdrawn"];

/// Parse a whole response body: `result` must be `0`, then every row of `array` becomes a
/// record (rows outside the requested window are dropped, counted and logged).
///
/// `result != 0` is [`ProviderError::Api`] with the platform's message; a success without an
/// `array` list (missing or `null`; an empty history is `[]`), or a row without `dateTime`,
/// `cost` or environment, or with a `cost` that is not an exact decimal, is
/// [`ProviderError::Shape`] naming the window or the row.
pub fn parse_response(text: &str, ctx: &HistoryContext) -> Result<Vec<UsageRecord>, ProviderError> {
    let shape = |message: String| ProviderError::Shape {
        provider: ctx.source.clone(),
        call: METHOD.into(),
        message,
    };
    let envelope: Value = serde_json::from_str(text).map_err(|e| {
        shape(format!(
            "the body is not JSON ({e}): {}",
            http::snippet(text)
        ))
    })?;
    result_error(&envelope, &ctx.source)?;
    // Only a list is an answer about the window: read as no usage, an answer without one
    // would move the cursor past the window, which is then never asked again (its records
    // lost). The platform's empty history is `[]`; `null` is not documented anywhere.
    let rows = match envelope.get("array") {
        Some(Value::Array(a)) => a.as_slice(),
        None => {
            return Err(shape(format!(
                "the answer for the window {} has `result` 0 but no `array` (the history); \
                 nothing of it is staged and the window is asked again",
                ctx.window()
            )))
        }
        Some(Value::Null) => {
            return Err(shape(format!(
                "the answer for the window {} has `array`: null instead of a list (an empty \
                 history is []); nothing of it is staged and the window is asked again",
                ctx.window()
            )))
        }
        Some(_) => {
            return Err(shape(format!(
                "the answer for the window {}: `array` is not an array",
                ctx.window()
            )))
        }
    };
    let grid = ctx.grid();
    let mut records: Vec<UsageRecord> = Vec::with_capacity(rows.len());
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut off_grid = 0usize;
    // Rows of buckets outside the window asked for: `at_end` those starting exactly at its
    // end (what an inclusive `endtime` adds: the next window, or the next run past the
    // cursor, reads that bucket as its first), `outside` every other one.
    let (mut at_end, mut outside) = (0usize, 0usize);
    let (mut earliest, mut latest): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = (None, None);
    for (index, row) in rows.iter().enumerate() {
        let record = match row_record(row, index, ctx).map_err(&shape)? {
            Row::Record(record) => *record,
            Row::Outside(start) if start == ctx.window_end => {
                at_end += 1;
                continue;
            }
            Row::Outside(start) => {
                outside += 1;
                earliest = Some(earliest.map_or(start, |e| e.min(start)));
                latest = Some(latest.map_or(start, |l| l.max(start)));
                continue;
            }
        };
        if !grid.is_aligned(record.charge_period_start) {
            off_grid += 1;
        }
        match by_key.get(&record.natural_key_string()) {
            Some(&i) => {
                warn!(source = %ctx.source, key = %record.natural_key_string(), "jelastic: two rows share a natural key; adding them up");
                merge(&mut records[i], &record).map_err(&shape)?;
            }
            None => {
                by_key.insert(record.natural_key_string(), records.len());
                records.push(record);
            }
        }
    }
    if at_end > 0 {
        debug!(source = %ctx.source, rows = at_end, window = %ctx.window(),
            "jelastic: rows of the bucket at the window's end dropped (an inclusive endtime; the next window reads it)");
    }
    if outside > 0 {
        // The windows are on the grid, so the platform read the window (or the offset)
        // otherwise than it was asked: buckets at the window's edges may be missing from every
        // answer, unbilled.
        warn!(source = %ctx.source, rows = outside, window = %ctx.window(),
            earliest = %earliest.map(rfc3339).unwrap_or_default(), latest = %latest.map(rfc3339).unwrap_or_default(),
            period = %ctx.period, time_offset = %ctx.time_offset,
            "jelastic: rows outside the requested window dropped; the platform reads the window or the offset otherwise: check time_offset and time_offset_unit (edge buckets may be lost)");
    }
    if off_grid > 0 {
        warn!(source = %ctx.source, rows = off_grid, period = %ctx.period, time_offset = %ctx.time_offset,
            "jelastic: bucket starts are not on the expected grid; check time_offset and time_offset_unit");
    }
    Ok(records)
}

/// Add a second row with the same natural key into the first; sums beyond a decimal's range
/// refuse the answer (`+=` would panic, ending every run at this window).
fn merge(into: &mut UsageRecord, other: &UsageRecord) -> Result<(), String> {
    let key = into.natural_key_string();
    let beyond =
        |what: &str| format!("two rows of {key} add up to a {what} beyond the range of a decimal");
    into.billed_cost = into
        .billed_cost
        .checked_add(other.billed_cost)
        .ok_or_else(|| beyond("cost"))?;
    into.consumed_quantity = into
        .consumed_quantity
        .checked_add(other.consumed_quantity)
        .ok_or_else(|| beyond("count"))?;
    into.is_final &= other.is_final;
    let merged = into
        .attributes
        .get("merged_rows")
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(1)
        + 1;
    into.attributes
        .insert("merged_rows".into(), merged.to_compact_string());
    into.raw = match into.raw.to_value() {
        Value::Array(mut rows) => {
            rows.push(other.raw.to_value());
            Value::Array(rows)
        }
        first => Value::Array(vec![first, other.raw.to_value()]),
    }
    .into();
    Ok(())
}

/// What one row of `array` is.
enum Row {
    /// A record of the requested window.
    Record(Box<UsageRecord>),
    /// A bucket (starting at this instant) outside the requested window: dropped.
    Outside(DateTime<Utc>),
}

/// One row of `array`.
fn row_record(row: &Value, index: usize, ctx: &HistoryContext) -> Result<Row, String> {
    let Value::Object(r) = row else {
        return Err(format!("array[{index}] is not an object"));
    };
    let err = |field: &str, what: &str| format!("array[{index}].{field} {what}");
    let text = |field: &str| -> Option<String> {
        r.get(field)
            .and_then(scalar_text)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let flag = |field: &str| -> bool {
        match r.get(field) {
            Some(Value::Bool(b)) => *b,
            Some(v) => matches!(scalar_text(v).as_deref(), Some("true" | "1")),
            None => false,
        }
    };

    let local_text = text("dateTime").ok_or_else(|| err("dateTime", "is missing"))?;
    let local = NaiveDateTime::parse_from_str(&local_text, WIRE_TIME_FORMAT).map_err(|_| {
        err(
            "dateTime",
            &format!("is not yyyy-MM-dd HH:mm:ss: {local_text:?}"),
        )
    })?;
    let start = ctx.time_offset.to_utc(local);
    let end = start + ctx.period.duration();
    if start < ctx.window_start || start >= ctx.window_end {
        debug!(source = %ctx.source, bucket = %start, "jelastic: row outside the requested window dropped");
        return Ok(Row::Outside(start));
    }
    let cost_value = r
        .get("cost")
        .filter(|v| !v.is_null())
        .ok_or_else(|| err("cost", "is missing"))?;
    let cost = decimal_of(cost_value)
        .ok_or_else(|| err("cost", &format!("is not an exact decimal: {cost_value}")))?;
    let quantity = match r.get("count").filter(|v| !v.is_null()) {
        Some(v) => decimal_of(v).ok_or_else(|| err("count", &format!("is not a number: {v}")))?,
        None => Decimal::ONE,
    };
    let appid = text("appid")
        .or_else(|| text("domain"))
        .ok_or_else(|| err("appid", "and domain are both missing"))?;
    let domain = text("domain");
    let nodeid = text("nodeid").unwrap_or_default();
    let kind = text("type");
    let resource_kind = text("resourceType");
    let (resource_type, service_name) = match (&kind, &resource_kind) {
        (Some(t), Some(rt)) => (t.clone(), rt.to_lowercase()),
        (Some(t), None) => (t.clone(), t.clone()),
        (None, Some(rt)) => (rt.to_lowercase(), rt.to_lowercase()),
        (None, None) => return Err(err("type", "and resourceType are both missing")),
    };
    let host_group = text("hostGroupUniqueName").unwrap_or_default();

    let mut attributes: BTreeMap<Name, Text> = BTreeMap::new();
    for (k, v) in r {
        if !NOT_ATTRIBUTES.contains(&k.as_str()) {
            if let Some(t) = scalar_text(v) {
                attributes.insert(Name::Owned(k.clone()), t.into());
            }
        }
    }
    attributes.insert("period".into(), ctx.period.as_str().to_compact_string());
    attributes.insert("bucket_local".into(), local_text.as_str().into());
    attributes.insert("time_offset".into(), ctx.time_offset.to_compact_string());

    let charged = flag("isPaid") || flag("isWithdrawn") || flag("isBonus");
    let settled = end <= ctx.settled_before;
    let is_final = settled && (!ctx.final_requires_charge || charged);

    let natural_key: Vec<(Name, Text)> = vec![
        ("appid".into(), appid.as_str().into()),
        ("nodeid".into(), nodeid.as_str().into()),
        ("type".into(), kind.clone().unwrap_or_default().into()),
        (
            "resourceType".into(),
            resource_kind.clone().unwrap_or_default().into(),
        ),
        ("hostGroupUniqueName".into(), host_group.into()),
        ("period".into(), ctx.period.as_str().to_compact_string()),
        ("bucket_start".into(), rfc3339(start).into()),
    ];
    let resource_id = if nodeid.is_empty() {
        appid.clone()
    } else {
        nodeid.clone()
    };
    let env_name = domain.clone().unwrap_or_else(|| appid.clone());
    Ok(Row::Record(Box::new(UsageRecord {
        provider: KIND.into(),
        source: ctx.source.as_str().into(),
        billing_account_id: ctx.billing_account_id.as_str().into(),
        sub_account_id: appid.as_str().into(),
        resource_id: resource_id.into(),
        resource_name: Some(if nodeid.is_empty() {
            env_name.into()
        } else {
            format!("{env_name}/{nodeid}").into()
        }),
        resource_type: resource_type.as_str().into(),
        service_name: service_name.into(),
        sku_id: Some(
            format!(
                "{}:{}",
                resource_kind.as_deref().unwrap_or(""),
                kind.as_deref().unwrap_or("")
            )
            .into(),
        ),
        charge_description: Some(match &resource_kind {
            Some(rt) => format!("{rt} {resource_type}").into(),
            None => resource_type.into(),
        }),
        charge_period_start: start,
        charge_period_end: end,
        consumed_quantity: quantity,
        consumed_unit: "count".into(),
        billed_cost: cost,
        billing_currency: ctx.currency.as_str().into(),
        scope: appid.into(),
        natural_key,
        is_final,
        attributes,
        raw: RawJson::from_value(&Value::Object(Map::clone(r))),
    })))
}
