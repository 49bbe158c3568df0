//! SAKURA Cloud: monthly bills and their details from the billing API (`api/system/1.0`).
//!
//! SAKURA bills **per account and JST calendar month**; there is no usage-event feed and no
//! finality flag. The manual says the running month's data is regenerated every day (D+1) and
//! the month's confirmed amounts are created on the 1st of the following month. That shapes
//! everything here:
//!
//! * **Calls** (all `GET`, HTTP Basic `token:secret`): `auth-status` on the resource API base
//!   (`…/api/cloud/1.1/auth-status`, as the Go SDK does) gives the account id and member code;
//!   `bill/by-contract/{account}/{year}/{month}` lists a month's bills;
//!   `billdetail/{member}/{bill}` gives JSON lines that carry only a `ServiceClassID`, so the
//!   price list (`…/api/cloud/1.1/public/price`) names them — it is read **once per run**, and
//!   only when JSON details are used; `billdetail/{member}/{bill}/csv` gives the same lines as
//!   CSV inside a JSON object (`Body`), with Japanese product names, the tax-excluded price and
//!   the consumption tax separately.
//! * **Paging**: list answers carry `Total`, `From` and `Count`. When `Total` says more than
//!   was read, the next page is asked with find-style JSON in the query
//!   (`?{"From":n,"Count":m}`) until `Total` is reached; an answer without `Total` (the
//!   manual's examples) is complete. A bill that cannot be read completely is an error naming
//!   it, never a silent truncation: lost lines are lost revenue. Nor is one whose pages disagree
//!   (SAKURA regenerated it between two pages): a `Total` that changes, or a line's sequence
//!   number (CSV "seq no. in bill", JSON `Index`) that an earlier page already carried, means
//!   the pages shifted and would bill one line twice and skip another. Such a bill is read
//!   again from the start once, then fails the month (nothing staged, the cursor stays).
//! * **Cursor** (`account:<id>` → `YYYY-MM`): the last **final** month that was fully staged,
//!   every month up to it with lines that add up to their bills. A bill whose lines miss its
//!   `Amount` by more than tax rounding (a yen per line) is incomplete (details not generated
//!   yet, or lost on the way): its month is **held** — its lines are staged, a warning names the
//!   bills, and neither its page nor any later page of the run moves the cursor, so every run
//!   reads it again until it adds up (or a person moves the cursor with `ledger set-cursor`).
//!   A final month with no bill at all adds up and moves the cursor (an account may have no
//!   usage in a month; holding it would stop the cursor for good): a bill listed for it later
//!   is found by the look-back below.
//!   A run plans every month after the cursor (or from `start_month`) through the running JST
//!   month, and before them the last `look_back_months` (default 3) up to the cursor again:
//!   SAKURA may list a bill for a month, or complete its lines, after the cursor passed it
//!   ("if billing data have not been updated, please obtain the data again after a while").
//!   Lines read again unchanged are no-ops in the ledger (same keys, same content: `Paid` is
//!   not content), a late bill's lines are new records. A look-back page never moves the
//!   cursor, neither back nor forward; one that no longer adds up is warned about and read
//!   again while it stays within the look-back.
//!   A month is final once `now ≥ 1st of the next month 00:00 JST + final_lag`; months that are
//!   not final are re-read on every run and the cursor never passes them, so the running and
//!   the previous month are pulled again until they settle.
//! * **Natural key** (reference 2.5): `(account_id, bill_id, contract_id, service_class_id)`.
//!   The CSV's resource ID is the JSON `ContractID` and its product ID the `ServiceClassID`
//!   (the manual's example shows the same line both ways), so both detail sources yield the
//!   same keys. `Index` is left out on purpose: it is a position, and a new line in a re-read
//!   provisional month could shift it, turning a changed amount into a "new" record. The
//!   manual documents bill no. + resource ID as unique; the product id is added because one
//!   contract may carry several service classes. Should a bill still repeat a key, the second
//!   and later lines get an `occurrence` part (2, 3, …) in provider order.
//! * **Money**: JPY integers, read from their JSON/CSV text into [`Decimal`], never a float.
//!   JSON `Amount` is tax-included (the manual's line 50118 is 108 in JSON and 100 + 8 tax in
//!   CSV); with CSV, `billed_cost = price excluding tax + tax` and both parts are attributes.
//! * **Periods**: `[1st 00:00 JST, next 1st 00:00 JST)` of the bill's month, in UTC.
//!
//! The payment state (`Paid`, the CSV's payment status) changes after the month is final but
//! not its amounts: it is kept in `raw` only, never in attributes, so it cannot make a record
//! look changed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::{debug, info, warn};

use crate::config::Secret;
use crate::http::{self, RetryPolicy};
use crate::providers::http::{describe_reqwest, send_with_retry, Attempt};
use crate::providers::{Chunk, Cursors, Page, Provider, ProviderError};
use crate::record::{Name, RawJson, Text, UsageRecord};
use compact_str::ToCompactString;

/// The provider kind, also the `provider` field of every record.
pub const KIND: &str = "sakura";
/// The default billing API base (any zone answers the same: billing is per account).
pub const DEFAULT_ENDPOINT: &str = "https://secure.sakura.ad.jp/cloud/zone/is1a/api/system/1.0";
/// The billing API's path suffix, replaced by [`CLOUD_API_SUFFIX`] to derive the resource base.
pub const BILLING_API_SUFFIX: &str = "api/system/1.0";
/// The resource API's path suffix (`auth-status`, `public/price`).
pub const CLOUD_API_SUFFIX: &str = "api/cloud/1.1";
/// The currency of every SAKURA amount.
pub const CURRENCY: &str = "JPY";

/// Call names used in errors and logs.
pub mod calls {
    /// `GET …/api/cloud/1.1/auth-status`.
    pub const AUTH_STATUS: &str = "auth-status";
    /// `GET …/bill/by-contract/{account}/{year}/{month}`.
    pub const BILLS: &str = "bill/by-contract";
    /// `GET …/billdetail/{member}/{bill}`.
    pub const DETAILS: &str = "billdetail";
    /// `GET …/billdetail/{member}/{bill}/csv`.
    pub const DETAILS_CSV: &str = "billdetail/csv";
    /// `GET …/api/cloud/1.1/public/price`.
    pub const PRICE: &str = "public/price";
}

fn jst() -> FixedOffset {
    FixedOffset::east_opt(9 * 3600).expect("+09:00 is a valid offset")
}

/// A JST calendar month, SAKURA's billing period. Written `YYYY-MM` (`YYYY/MM` is accepted too,
/// as the CSV writes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    /// Calendar year.
    pub year: i32,
    /// 1 to 12.
    pub month: u32,
}

impl Month {
    /// A month, if `month` is 1 to 12 and the year is representable.
    pub fn new(year: i32, month: u32) -> Option<Month> {
        NaiveDate::from_ymd_opt(year, month, 1).map(|_| Month { year, month })
    }

    /// The month after this one.
    pub fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The month before this one.
    pub fn prev(self) -> Month {
        if self.month == 1 {
            Month {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Month {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    /// The month `n` months before this one.
    pub fn back(self, n: u32) -> Month {
        let index = i64::from(self.year) * 12 + i64::from(self.month) - 1 - i64::from(n);
        Month {
            year: i32::try_from(index.div_euclid(12)).unwrap_or(i32::MIN),
            month: index.rem_euclid(12) as u32 + 1,
        }
    }

    /// The JST month containing `t`.
    pub fn of(t: DateTime<Utc>) -> Month {
        let local = t.with_timezone(&jst());
        Month {
            year: local.year(),
            month: local.month(),
        }
    }

    /// The 1st of the month, 00:00 JST, as UTC (the period start, inclusive).
    pub fn start_utc(self) -> DateTime<Utc> {
        NaiveDate::from_ymd_opt(self.year, self.month, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .and_then(|n| jst().from_local_datetime(&n).single())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// The 1st of the next month, 00:00 JST, as UTC (the period end, exclusive).
    pub fn end_utc(self) -> DateTime<Utc> {
        self.next().start_utc()
    }

    /// When the month becomes final: the 1st of the next month JST plus `lag`.
    pub fn final_at(self, lag: chrono::Duration) -> DateTime<Utc> {
        self.end_utc() + lag
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl FromStr for Month {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let bad = || format!("month {s:?} is not YYYY-MM");
        let (y, m) = t.split_once(['-', '/']).ok_or_else(bad)?;
        if y.len() != 4 || m.is_empty() || m.len() > 2 {
            return Err(bad());
        }
        let year: i32 = y.parse().map_err(|_| bad())?;
        let month: u32 = m.parse().map_err(|_| bad())?;
        Month::new(year, month).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for Month {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Settings of one SAKURA Cloud source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SakuraConfig {
    /// Billing API base, `https://secure.sakura.ad.jp/cloud/zone/{zone}/api/system/1.0` with any
    /// zone (`is1a`, `is1b`, `tk1a`, `tk1v`): billing is per account, every zone answers alike.
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// Resource API base for `auth-status` and `public/price`; by default the endpoint with
    /// `api/system/1.0` replaced by `api/cloud/1.1`.
    #[serde(default)]
    pub cloud_endpoint: Option<String>,
    /// API access token (HTTP Basic user; `env:NAME` or `file:/path`). Treated as a secret: it is
    /// half of the credential and never logged.
    pub token: Secret,
    /// API access token secret (HTTP Basic password; `env:NAME` or `file:/path`). The key needs
    /// the access level "View Resources" and the external permission "Billing Information".
    pub secret: Secret,
    /// The first month to pull (`YYYY-MM`, JST) when the source has no cursor yet.
    pub start_month: Month,
    /// How long after the 1st of the next month (00:00 JST) a month becomes final. SAKURA
    /// confirms a month on the 1st without saying at what hour; until then it is re-read.
    #[serde(
        default = "default_final_lag",
        with = "crate::config::duration::chrono"
    )]
    pub final_lag: chrono::Duration,
    /// Read the CSV details (tax-excluded price and tax separately, Japanese product and
    /// resource names) instead of the JSON ones (tax-included amount and usage seconds, named
    /// through the price list). Default: true.
    #[serde(default = "default_true")]
    pub use_csv: bool,
    /// Timeout of one HTTP request.
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    /// Retries of transient failures (network, timeouts, HTTP 5xx and 429).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Send records of months that are not final yet (corrections follow as they change).
    #[serde(default)]
    pub push_provisional: bool,
    /// How many final months up to the cursor every run reads again, for bills SAKURA lists
    /// (or completes) after the cursor passed their month. Lines read again unchanged are
    /// no-ops in the ledger (same keys, same content); a late bill's lines are new records, a
    /// changed line a correction. 0 reads nothing the cursor passed. Default: 3.
    #[serde(default = "default_look_back_months")]
    pub look_back_months: u32,
}

fn default_endpoint() -> String {
    DEFAULT_ENDPOINT.to_string()
}

fn default_final_lag() -> chrono::Duration {
    chrono::Duration::days(1)
}

fn default_look_back_months() -> u32 {
    3
}

fn default_true() -> bool {
    true
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

impl SakuraConfig {
    /// A configuration with every optional setting at its default (tests, simulators, demo).
    pub fn new(
        endpoint: impl Into<String>,
        token: Secret,
        secret: Secret,
        start_month: Month,
    ) -> Self {
        SakuraConfig {
            endpoint: endpoint.into(),
            cloud_endpoint: None,
            token,
            secret,
            start_month,
            final_lag: default_final_lag(),
            use_csv: true,
            timeout: default_timeout(),
            retry: RetryPolicy::default(),
            push_provisional: false,
            look_back_months: default_look_back_months(),
        }
    }
}

impl FromStr for SakuraConfig {
    type Err = String;

    /// Read a configuration from YAML text (tests and examples).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }
}

/// Who the API key belongs to (from `auth-status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountInfo {
    /// `Account.ID`, a 12-digit string: the `{accountID}` of bill calls.
    pub account_id: String,
    /// `Account.Code`.
    pub account_code: String,
    /// `Account.Name` (often Japanese).
    pub account_name: String,
    /// `Member.Code`: the `{memberCode}` of bill-detail calls.
    pub member_code: String,
}

/// One bill of `bill/by-contract`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bill {
    /// `BillID` (number or string on the wire), as text.
    pub bill_id: String,
    /// `Amount`: JPY, tax included.
    pub amount: Decimal,
    /// `Date`, the billing date (`+09:00`).
    pub date: Option<DateTime<FixedOffset>>,
    /// `MemberID`.
    pub member_id: Option<String>,
    /// `Paid` (changes after the month is final; never part of a record's content).
    pub paid: Option<bool>,
    /// The whole bill object as sent.
    pub raw: Value,
}

/// One entry of the price list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceClass {
    /// `ServiceClassID`, as text.
    pub id: String,
    /// `DisplayName` (Japanese), or `ServiceClassName` when it has none.
    pub name: String,
    /// `ServiceClassPath`, e.g. `cloud/iso-image/5g`.
    pub path: Option<String>,
}

/// The price list by `ServiceClassID`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceList {
    /// Service classes by id.
    pub classes: HashMap<String, ServiceClass>,
}

impl PriceList {
    /// The class of an id, if listed.
    pub fn get(&self, id: &str) -> Option<&ServiceClass> {
        self.classes.get(id)
    }
}

/// Everything the detail parsers need besides the details themselves.
#[derive(Debug, Clone, PartialEq)]
pub struct LineContext {
    /// The configured source name (also names the provider in errors).
    pub source: String,
    /// The account the bill belongs to.
    pub account: AccountInfo,
    /// The bill id the details were requested for.
    pub bill_id: String,
    /// The JST month of the bill.
    pub month: Month,
    /// Whether the month is final (`now ≥ 1st of next month JST + final_lag`).
    pub is_final: bool,
}

/// The SAKURA Cloud provider: one configured source.
#[derive(Debug)]
pub struct SakuraProvider {
    name: String,
    config: SakuraConfig,
    billing_base: reqwest::Url,
    cloud_base: reqwest::Url,
    client: reqwest::Client,
    /// The account `plan` found, for `fetch`.
    account: Mutex<Option<AccountInfo>>,
    /// The price list of this run (cleared by `plan`, read at most once per run).
    prices: Mutex<Option<Arc<PriceList>>>,
    /// Per cursor stream, the earliest final month of this run whose lines do not add up to its
    /// bills (cleared by `plan`): no page's cursor passes it.
    holds: Mutex<HashMap<String, Month>>,
    /// Per cursor stream, the month its stored cursor named when `plan` ran: months up to it
    /// are look-back re-reads, which never move the cursor.
    planned_cursors: Mutex<HashMap<String, Month>>,
}

fn parse_base(name: &str, what: &str, text: &str) -> Result<reqwest::Url, ProviderError> {
    let bad = |message: String| ProviderError::Config {
        provider: name.to_string(),
        message,
    };
    // Shown without credentials or query, should the text carry any.
    let shown = crate::http::shown_url(text);
    let url = reqwest::Url::parse(text.trim().trim_end_matches('/'))
        .map_err(|e| bad(format!("{what} {shown:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!("{what} {shown:?} must be http or https")));
    }
    if url.host_str().is_none() {
        return Err(bad(format!("{what} {shown:?} has no host")));
    }
    Ok(url)
}

impl SakuraProvider {
    /// Validate the configuration and build the HTTP client.
    pub fn new(name: String, config: SakuraConfig) -> Result<Self, ProviderError> {
        let bad = |message: String| ProviderError::Config {
            provider: name.clone(),
            message,
        };
        let billing_base = parse_base(&name, "endpoint", &config.endpoint)?;
        let cloud_text = match &config.cloud_endpoint {
            Some(c) => c.clone(),
            None => {
                let b = config.endpoint.trim().trim_end_matches('/');
                match b.strip_suffix(BILLING_API_SUFFIX) {
                    Some(prefix) => format!("{prefix}{CLOUD_API_SUFFIX}"),
                    None => {
                        return Err(bad(format!(
                            "endpoint {:?} does not end in {BILLING_API_SUFFIX}: set \
                             cloud_endpoint (the base of auth-status and public/price)",
                            config.endpoint
                        )))
                    }
                }
            }
        };
        let cloud_base = parse_base(&name, "cloud_endpoint", &cloud_text)?;
        if config.token.expose().is_empty() || config.secret.expose().is_empty() {
            return Err(bad("token and secret must not be empty".into()));
        }
        if config.final_lag < chrono::Duration::zero() {
            return Err(bad("final_lag must not be negative".into()));
        }
        Ok(SakuraProvider {
            client: http::client(config.timeout),
            name,
            config,
            billing_base,
            cloud_base,
            account: Mutex::new(None),
            prices: Mutex::new(None),
            holds: Mutex::new(HashMap::new()),
            planned_cursors: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration in effect.
    pub fn config(&self) -> &SakuraConfig {
        &self.config
    }

    /// The cursor stream of an account.
    pub fn stream_of(account_id: &str) -> String {
        format!("account:{account_id}")
    }

    /// Whether `month` is final at `now`.
    pub fn is_final(&self, month: Month, now: DateTime<Utc>) -> bool {
        now >= month.final_at(self.config.final_lag)
    }

    /// Whether `month` is a look-back re-read: at or before the cursor `plan` found. Its page
    /// leaves the cursor as it is (never back: a person may have accepted a month with
    /// `ledger set-cursor`), and it holds no later month. A chunk fetched without a `plan` in
    /// this process counts as after the cursor (its page may then name an earlier month than
    /// the one stored: read again, never skipped).
    fn is_look_back(&self, stream: &str, month: Month) -> bool {
        self.planned_cursors
            .lock()
            .ok()
            .and_then(|p| p.get(stream).copied())
            .is_some_and(|c| month <= c)
    }

    /// The cursor a page of `month` after the stored cursor leaves: the month, once it is final and its lines add up to
    /// its bills (`reconciled`), and no earlier month of this run was held. A final month whose
    /// lines do not add up is held for the rest of the run (chunks are fetched one at a time, in
    /// plan order, so the hold is set before any later page is made): the cursor stays before
    /// it, so the next run reads it again instead of passing it for good with lines missing.
    fn page_cursor(
        &self,
        stream: &str,
        month: Month,
        is_final: bool,
        reconciled: bool,
    ) -> Option<String> {
        if !is_final {
            return None;
        }
        let held = match self.holds.lock() {
            Ok(mut holds) => {
                if !reconciled {
                    let at = holds.entry(stream.to_string()).or_insert(month);
                    *at = (*at).min(month);
                }
                holds.get(stream).copied()
            }
            Err(_) => (!reconciled).then_some(month),
        };
        match held {
            Some(h) if h <= month => None,
            _ => Some(month.to_string()),
        }
    }

    fn url(&self, cloud: bool, segments: &[&str]) -> reqwest::Url {
        let mut url = if cloud {
            self.cloud_base.clone()
        } else {
            self.billing_base.clone()
        };
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn shape(&self, call: &str, message: String) -> ProviderError {
        ProviderError::Shape {
            provider: self.name.clone(),
            call: call.into(),
            message,
        }
    }

    /// One HTTP exchange; classifies the outcome for the retry loop.
    async fn get_once(&self, call: &str, url: &reqwest::Url) -> Result<Value, Attempt> {
        let transport = |message: String| Attempt::Retry {
            error: ProviderError::Transport {
                provider: self.name.clone(),
                call: call.into(),
                message,
            },
            hint: None,
        };
        let resp = self
            .client
            .get(url.clone())
            .basic_auth(
                self.config.token.expose(),
                Some(self.config.secret.expose()),
            )
            .send()
            .await
            .map_err(|e| transport(describe_reqwest(&e)))?;
        let status = resp.status();
        let hint = http::retry_hint(status, resp.headers());
        let text = resp
            .text()
            .await
            .map_err(|e| transport(format!("reading the body: {}", describe_reqwest(&e))))?;
        let http_error = |body: String| ProviderError::Http {
            provider: self.name.clone(),
            call: call.into(),
            status: status.as_u16(),
            body,
        };
        let said = || {
            sakura_error_of(&text)
                .map(|e| e.to_string())
                .unwrap_or_else(|| http::snippet(&text))
        };
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(Attempt::Retry {
                error: match sakura_error_of(&text) {
                    Some(e) => self.api_error(call, e),
                    None => http_error(http::snippet(&text)),
                },
                hint,
            });
        }
        if status.as_u16() == 401 {
            return Err(Attempt::Fatal(http_error(format!(
                "authentication failed: the access token or its secret was rejected (server \
                 said: {})",
                said()
            ))));
        }
        if status.as_u16() == 403 {
            return Err(Attempt::Fatal(http_error(format!(
                "permission denied: the API key needs the access level \"View Resources\" and the \
                 external permission \"Billing Information\" (server said: {})",
                said()
            ))));
        }
        if !status.is_success() {
            return Err(Attempt::Fatal(match sakura_error_of(&text) {
                Some(e) => self.api_error(call, e),
                None => http_error(http::snippet(&text)),
            }));
        }
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            Attempt::Fatal(self.shape(
                call,
                format!("the body is not JSON ({e}): {}", http::snippet(&text)),
            ))
        })?;
        if let Some(e) = sakura_error_fields(&value) {
            return Err(Attempt::Fatal(self.api_error(call, e)));
        }
        if value.get("is_ok") == Some(&Value::Bool(false)) {
            return Err(Attempt::Fatal(ProviderError::Api {
                provider: self.name.clone(),
                call: call.into(),
                code: "is_ok=false".into(),
                message: http::snippet(&text),
            }));
        }
        if !value.is_object() {
            return Err(Attempt::Fatal(
                self.shape(call, "the body is not a JSON object".into()),
            ));
        }
        Ok(value)
    }

    fn api_error(&self, call: &str, e: SakuraError) -> ProviderError {
        let mut message = e.message;
        if let Some(serial) = e.serial {
            message.push_str(&format!(" (serial {serial})"));
        }
        ProviderError::Api {
            provider: self.name.clone(),
            call: call.into(),
            code: e.code,
            message,
        }
    }

    /// `GET url` with retries; returns the JSON object.
    async fn get(&self, call: &str, url: reqwest::Url) -> Result<Value, ProviderError> {
        let policy = self.config.retry.clone();
        let url = &url;
        let attempt = || async move {
            debug!(source = %self.name, call, path = url.path(), "sakura: GET");
            self.get_once(call, url).await
        };
        send_with_retry(&policy, KIND, &self.name, call, attempt).await
    }

    /// Ask `auth-status` who the key belongs to.
    pub async fn auth_status(&self) -> Result<AccountInfo, ProviderError> {
        let value = self
            .get(calls::AUTH_STATUS, self.url(true, &["auth-status"]))
            .await?;
        parse_auth_status(&value, &self.name)
    }

    /// The price list of this run: fetched on first use, then cached until the next `plan`.
    pub async fn price_list(&self) -> Result<Arc<PriceList>, ProviderError> {
        if let Some(p) = self.prices.lock().ok().and_then(|g| g.clone()) {
            return Ok(p);
        }
        let mut list = PriceList::default();
        let mut from: u64 = 0;
        loop {
            let mut url = self.url(true, &["public", "price"]);
            if from > 0 {
                // SAKURA's find operations take their parameters as JSON in the query string.
                url.set_query(Some(&format!("{{\"From\":{from}}}")));
            }
            let value = self.get(calls::PRICE, url).await?;
            let page = parse_price_list(&value, &self.name)?;
            let got = page.count;
            list.classes.extend(page.list.classes);
            from += got;
            match page.total {
                Some(total) if got > 0 && from < total => continue,
                _ => break,
            }
        }
        info!(source = %self.name, classes = list.classes.len(), "sakura: price list read");
        let list = Arc::new(list);
        if let Ok(mut g) = self.prices.lock() {
            *g = Some(list.clone());
        }
        Ok(list)
    }

    /// The bills of one month.
    pub async fn bills(&self, account_id: &str, month: Month) -> Result<Vec<Bill>, ProviderError> {
        let (y, m) = (month.year.to_string(), month.month.to_string());
        let what = format!("the bills of {month}");
        self.read_pages(
            calls::BILLS,
            &["bill", "by-contract", account_id, &y, &m],
            &what,
            false,
            |bill: &Bill| Some(format!("bill {}", bill.bill_id)),
            |value| parse_bills(value, &self.name),
        )
        .await
    }

    /// Every page of a list call. SAKURA's list envelopes carry `Total` (all entries), `From`
    /// (where this answer starts) and `Count` (entries in this answer); a later page is asked
    /// for with find-style JSON in the query, `?{"From":n,"Count":m}`. An answer without
    /// `Total` (the manual's examples) is complete. Whatever cannot be read completely is an
    /// error naming `what`, never a silent truncation and never an endless loop:
    /// * `Count` larger than the entries carried (when `check_count`): entries are missing;
    /// * a page that starts elsewhere than asked (or does not say where, after the first): the
    ///   server does not page, and its pages would repeat or skip entries;
    /// * an empty page before `Total` is reached, or more entries than `Total`;
    /// * pages that disagree: a `Total` other than the first page's (or none), or an entry whose
    ///   `identity` (a line's sequence number, a bill's id) an earlier page already carried.
    ///   SAKURA regenerates a month's data while it is read: an entry inserted or removed ahead
    ///   of a page boundary shifts the later pages, which would repeat one entry (billed twice)
    ///   and skip another. Such a read is started over once (the regeneration is over by then,
    ///   as a rule); pages that still disagree fail the whole list, so none of it is staged.
    ///   Entries without an identity are checked by `Total` alone.
    async fn read_pages<T>(
        &self,
        call: &str,
        segments: &[&str],
        what: &str,
        check_count: bool,
        identity: impl Fn(&T) -> Option<String>,
        mut read_page: impl FnMut(&Value) -> Result<Vec<T>, ProviderError>,
    ) -> Result<Vec<T>, ProviderError> {
        let args = (call, segments, what, check_count);
        match self.read_pages_once(args, &identity, &mut read_page).await {
            Err(Paged::Disagree(e)) => {
                warn!(source = %self.name, call, what, error = %e,
                    "sakura: the pages disagree (the data changed while being read); reading it again from the start");
                match self.read_pages_once(args, &identity, &mut read_page).await {
                    Ok(items) => Ok(items),
                    Err(Paged::Disagree(e) | Paged::Failed(e)) => Err(e),
                }
            }
            Ok(items) => Ok(items),
            Err(Paged::Failed(e)) => Err(e),
        }
    }

    /// One read of every page of a list call, from the start (see [`Self::read_pages`]).
    async fn read_pages_once<T>(
        &self,
        (call, segments, what, check_count): (&str, &[&str], &str, bool),
        identity: &impl Fn(&T) -> Option<String>,
        read_page: &mut impl FnMut(&Value) -> Result<Vec<T>, ProviderError>,
    ) -> Result<Vec<T>, Paged> {
        /// More pages than any bill has lines: a server that keeps raising `Total`.
        const MAX_PAGES: usize = 10_000;
        let bad = |message: String| Paged::Failed(self.shape(call, format!("{what}: {message}")));
        let disagree =
            |message: String| Paged::Disagree(self.shape(call, format!("{what}: {message}")));
        let mut items = Vec::new();
        let mut read: u64 = 0;
        let mut page_size: Option<u64> = None;
        // The first page's `Total`, which every later page must repeat.
        let mut first_total: Option<u64> = None;
        // The identities of the entries of earlier pages.
        let mut seen: HashSet<String> = HashSet::new();
        for _ in 0..MAX_PAGES {
            let mut url = self.url(false, segments);
            if read > 0 {
                let query = match page_size {
                    Some(n) => format!("{{\"From\":{read},\"Count\":{n}}}"),
                    None => format!("{{\"From\":{read}}}"),
                };
                url.set_query(Some(&query));
            }
            let value = self
                .get(call, url)
                .await
                .map_err(|e| Paged::Failed(about(what, e)))?;
            let page = read_page(&value).map_err(Paged::Failed)?;
            let got = page.len() as u64;
            let field = |k: &str| value.get(k).and_then(count_of);
            if let Some(count) = field("Count").filter(|c| check_count && *c > got) {
                return Err(bad(format!(
                    "the answer from entry {read} says `Count` {count} but carries {got}: \
                     entries are missing"
                )));
            }
            match field("From") {
                Some(from) if from != read => {
                    return Err(bad(format!(
                        "asked for the entries from {read}, the answer starts at {from}: the \
                         server does not page as asked (its pages would repeat or skip entries)"
                    )))
                }
                None if read > 0 => {
                    return Err(bad(format!(
                        "the page asked from entry {read} does not say where it starts \
                         (`From`): the server may not page, so its entries could repeat"
                    )))
                }
                _ => {}
            }
            let total = field("Total");
            if read == 0 {
                first_total = total;
            } else if total != first_total {
                let shown =
                    |t: Option<u64>| t.map_or_else(|| "absent".to_string(), |t| t.to_string());
                return Err(disagree(format!(
                    "`Total` was {} on the first page and is {} on the page from entry {read}: \
                     the data changed while being read, so its pages may repeat or skip entries",
                    shown(first_total),
                    shown(total)
                )));
            }
            let ids: Vec<String> = page.iter().filter_map(identity).collect();
            if let Some(id) = ids.iter().find(|id| seen.contains(*id)) {
                return Err(disagree(format!(
                    "the page from entry {read} repeats {id}, which an earlier page carried: \
                     the data changed while being read and the pages shifted (an entry would be \
                     read twice and another skipped)"
                )));
            }
            seen.extend(ids);
            items.extend(page);
            read += got;
            match total {
                Some(total) if read < total => {
                    if got == 0 {
                        return Err(bad(format!(
                            "`Total` is {total} but the answer from entry {read} is empty: the \
                             server makes no progress"
                        )));
                    }
                    page_size.get_or_insert(got);
                }
                Some(total) if read > total => {
                    return Err(bad(format!(
                        "read {read} entries, more than `Total` {total}"
                    )))
                }
                _ => return Ok(items),
            }
        }
        Err(bad(format!(
            "still not complete after {MAX_PAGES} pages ({read} entries)"
        )))
    }

    /// Every detail line of a bill, from all pages, with repeated keys disambiguated over the
    /// whole bill.
    async fn details(&self, ctx: &LineContext) -> Result<Vec<UsageRecord>, ProviderError> {
        let member = ctx.account.member_code.as_str();
        let what = format!("bill {}", ctx.bill_id);
        let mut records = if self.config.use_csv {
            self.read_pages(
                calls::DETAILS_CSV,
                &["billdetail", member, &ctx.bill_id, "csv"],
                &what,
                true,
                |r: &UsageRecord| line_identity(r, "seq"),
                |value| {
                    let body = value.get("Body").and_then(Value::as_str).ok_or_else(|| {
                        self.shape(
                            calls::DETAILS_CSV,
                            format!("bill {}: `Body` is missing", ctx.bill_id),
                        )
                    })?;
                    csv_lines(body, ctx)
                },
            )
            .await?
        } else {
            let prices = self.price_list().await?;
            self.read_pages(
                calls::DETAILS,
                &["billdetail", member, &ctx.bill_id],
                &what,
                true,
                |r: &UsageRecord| line_identity(r, "index"),
                |value| json_lines(value, ctx, &prices),
            )
            .await?
        };
        disambiguate(&mut records);
        Ok(records)
    }
}

/// How a paged read failed: its pages disagree with each other (the data changed while it was
/// read; a fresh read may succeed), or anything else.
enum Paged {
    Disagree(ProviderError),
    Failed(ProviderError),
}

/// A detail line's own sequence number in its bill (CSV column 0 "seq no. in bill", kept as the
/// attribute `seq`; JSON `Index`, kept as `index`), to tell a line repeated by a shifted page
/// from a distinct line with the same content.
fn line_identity(record: &UsageRecord, attribute: &str) -> Option<String> {
    record
        .attributes
        .get(attribute)
        .map(|s| format!("the line with sequence number {s}"))
}

/// `error` with `what` (the bill, or the month of a bill list) in front of its message, so an
/// HTTP, API or transport failure says which bill it stopped at (`Shape` errors already do).
fn about(what: &str, error: ProviderError) -> ProviderError {
    error.map_remote_text(|text| format!("{what}: {text}"))
}

/// A count of an envelope (`Total`, `From`, `Count`): a JSON number or a string of digits.
fn count_of(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A SAKURA error body: `{"is_fatal", "serial", "status", "error_code", "error_msg"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SakuraError {
    code: String,
    message: String,
    serial: Option<String>,
}

impl fmt::Display for SakuraError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

fn sakura_error_of(text: &str) -> Option<SakuraError> {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| sakura_error_fields(&v))
}

fn sakura_error_fields(v: &Value) -> Option<SakuraError> {
    let o = v.as_object()?;
    if !o.contains_key("error_code") && !o.contains_key("error_msg") {
        return None;
    }
    let text = |k: &str| o.get(k).and_then(scalar_text).filter(|s| !s.is_empty());
    Some(SakuraError {
        code: text("error_code").unwrap_or_else(|| "(no error_code)".into()),
        message: text("error_msg")
            .or_else(|| text("status"))
            .unwrap_or_else(|| "(no error_msg)".into()),
        serial: text("serial"),
    })
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A decimal from a JSON string or number, read from its text (never through a float).
pub fn decimal_of(value: &Value) -> Option<Decimal> {
    let text = match value {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    decimal_text(&text)
}

/// A decimal from text; thousands separators (`1,080`) are accepted.
fn decimal_text(text: &str) -> Option<Decimal> {
    let t: String = text.trim().chars().filter(|c| *c != ',').collect();
    if t.is_empty() {
        return None;
    }
    crate::record::exact_decimal(&t)
}

/// An id (number or string on the wire) as text.
fn id_of(value: &Value) -> Option<String> {
    match value {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => None,
    }
}

/// Read `auth-status`: the account id and member code, and check the billing permission.
pub fn parse_auth_status(value: &Value, source: &str) -> Result<AccountInfo, ProviderError> {
    let shape = |message: String| ProviderError::Shape {
        provider: source.to_string(),
        call: calls::AUTH_STATUS.into(),
        message,
    };
    let account = value
        .get("Account")
        .filter(|a| a.is_object())
        .ok_or_else(|| shape("`Account` is missing".into()))?;
    let account_id = account
        .get("ID")
        .and_then(id_of)
        .ok_or_else(|| shape("`Account.ID` is missing".into()))?;
    let member_code = value
        .pointer("/Member/Code")
        .and_then(id_of)
        .ok_or_else(|| shape("`Member.Code` is missing".into()))?;
    if let Some(perm) = value.get("ExternalPermission").and_then(Value::as_str) {
        if !perm.split(['+', ',', ' ']).any(|p| p == "bill") {
            return Err(ProviderError::Config {
                provider: source.to_string(),
                message: format!(
                    "the API key lacks the external permission \"Billing Information\" \
                     (auth-status ExternalPermission = {perm:?})"
                ),
            });
        }
    }
    let text = |k: &str| account.get(k).and_then(scalar_text).unwrap_or_default();
    Ok(AccountInfo {
        account_id,
        account_code: text("Code"),
        account_name: text("Name"),
        member_code,
    })
}

/// Read `bill/by-contract`: the `Bills` array.
pub fn parse_bills(value: &Value, source: &str) -> Result<Vec<Bill>, ProviderError> {
    let shape = |message: String| ProviderError::Shape {
        provider: source.to_string(),
        call: calls::BILLS.into(),
        message,
    };
    let bills = match value.get("Bills") {
        Some(Value::Array(a)) => a.as_slice(),
        Some(Value::Null) => &[],
        None => return Err(shape("`Bills` is missing".into())),
        Some(_) => return Err(shape("`Bills` is not an array".into())),
    };
    bills
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let bill_id = b
                .get("BillID")
                .and_then(id_of)
                .ok_or_else(|| shape(format!("Bills[{i}].BillID is missing")))?;
            let amount = b
                .get("Amount")
                .and_then(decimal_of)
                .ok_or_else(|| shape(format!("Bills[{i}] (bill {bill_id}).Amount is missing")))?;
            let date =
                match b.get("Date").and_then(Value::as_str) {
                    Some(d) => Some(DateTime::parse_from_rfc3339(d).map_err(|e| {
                        shape(format!("Bills[{i}] (bill {bill_id}).Date {d:?}: {e}"))
                    })?),
                    None => None,
                };
            Ok(Bill {
                bill_id,
                amount,
                date,
                member_id: b.get("MemberID").and_then(scalar_text),
                paid: b.get("Paid").and_then(Value::as_bool),
                raw: b.clone(),
            })
        })
        .collect()
}

/// One page of the price list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricePage {
    /// The classes of this page.
    pub list: PriceList,
    /// Entries on this page.
    pub count: u64,
    /// `Total`, when sent.
    pub total: Option<u64>,
}

/// Read `public/price`: `ServiceClasses[]` (`Price` may be an object or an empty array; prices
/// are not used, only the names).
pub fn parse_price_list(value: &Value, source: &str) -> Result<PricePage, ProviderError> {
    let shape = |message: String| ProviderError::Shape {
        provider: source.to_string(),
        call: calls::PRICE.into(),
        message,
    };
    let classes = value
        .get("ServiceClasses")
        .and_then(Value::as_array)
        .ok_or_else(|| shape("`ServiceClasses` is missing or not an array".into()))?;
    let mut list = PriceList::default();
    for (i, c) in classes.iter().enumerate() {
        let id = c
            .get("ServiceClassID")
            .and_then(id_of)
            .ok_or_else(|| shape(format!("ServiceClasses[{i}].ServiceClassID is missing")))?;
        let text = |k: &str| {
            c.get(k)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
        };
        let name = text("DisplayName")
            .or_else(|| text("ServiceClassName"))
            .unwrap_or_else(|| format!("ServiceClassID {id}"));
        list.classes.insert(
            id.clone(),
            ServiceClass {
                id,
                name,
                path: text("ServiceClassPath"),
            },
        );
    }
    let count = value
        .get("Count")
        .and_then(Value::as_u64)
        .unwrap_or(classes.len() as u64);
    Ok(PricePage {
        list,
        count: count.max(classes.len() as u64),
        total: value.get("Total").and_then(Value::as_u64),
    })
}

/// `cloud/iso-image/5g` → `iso-image`.
fn category_of(path: Option<&str>) -> String {
    path.map(|p| p.trim_start_matches('/'))
        .map(|p| p.strip_prefix("cloud/").unwrap_or(p))
        .and_then(|p| p.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("cloud")
        .to_string()
}

/// The fields one detail line (JSON or CSV) contributes to a record.
struct Line {
    contract_id: String,
    service_class_id: String,
    product_name: Option<String>,
    class_path: Option<String>,
    resource_name: Option<String>,
    quantity: Decimal,
    unit: &'static str,
    cost: Decimal,
    attributes: BTreeMap<Name, Text>,
    raw: Value,
}

fn record_of(line: Line, ctx: &LineContext) -> UsageRecord {
    let mut attributes = line.attributes;
    attributes.insert(
        "account_code".into(),
        ctx.account.account_code.as_str().into(),
    );
    attributes.insert(
        "member_code".into(),
        ctx.account.member_code.as_str().into(),
    );
    attributes.insert("bill_id".into(), ctx.bill_id.as_str().into());
    attributes.insert("month".into(), ctx.month.to_compact_string());
    if let Some(p) = &line.class_path {
        attributes.insert("service_class_path".into(), p.as_str().into());
    }
    UsageRecord {
        provider: KIND.into(),
        source: ctx.source.as_str().into(),
        billing_account_id: ctx.account.account_id.as_str().into(),
        sub_account_id: ctx.account.account_id.as_str().into(),
        resource_id: line.contract_id.as_str().into(),
        resource_name: line.resource_name.map(Text::from),
        resource_type: "contract".into(),
        service_name: category_of(line.class_path.as_deref()).into(),
        sku_id: Some(line.service_class_id.as_str().into()),
        charge_description: line.product_name.map(Text::from),
        charge_period_start: ctx.month.start_utc(),
        charge_period_end: ctx.month.end_utc(),
        consumed_quantity: line.quantity,
        consumed_unit: line.unit.to_compact_string(),
        billed_cost: line.cost,
        billing_currency: CURRENCY.to_compact_string(),
        scope: ctx.account.account_id.as_str().into(),
        natural_key: vec![
            ("account_id".into(), ctx.account.account_id.as_str().into()),
            ("bill_id".into(), ctx.bill_id.as_str().into()),
            ("contract_id".into(), line.contract_id.into()),
            ("service_class_id".into(), line.service_class_id.into()),
        ],
        is_final: ctx.is_final,
        attributes,
        raw: RawJson::from_value(&line.raw),
    }
}

/// Give repeated natural keys inside one bill an `occurrence` part (2, 3, … in provider order).
fn disambiguate(records: &mut [UsageRecord]) {
    let mut seen: HashMap<Vec<(Name, Text)>, u32> = HashMap::new();
    for r in records.iter_mut() {
        let n = seen.entry(r.natural_key.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            warn!(source = %r.source, key = %r.natural_key_string(), occurrence = *n, "sakura: a bill repeats a contract and service class");
            r.natural_key
                .push(("occurrence".into(), n.to_compact_string()));
        }
    }
}

/// Read `billdetail/{member}/{bill}` (`BillDetails[]`) into records, naming each product by its
/// `ServiceClassID` through the price list. A class missing from the list keeps no name (logged).
pub fn parse_bill_details(
    value: &Value,
    ctx: &LineContext,
    prices: &PriceList,
) -> Result<Vec<UsageRecord>, ProviderError> {
    let mut records = json_lines(value, ctx, prices)?;
    disambiguate(&mut records);
    Ok(records)
}

/// The records of one answer of JSON details, one per `BillDetails[]` entry (not disambiguated:
/// a bill may come in pages).
fn json_lines(
    value: &Value,
    ctx: &LineContext,
    prices: &PriceList,
) -> Result<Vec<UsageRecord>, ProviderError> {
    let shape = |message: String| ProviderError::Shape {
        provider: ctx.source.clone(),
        call: calls::DETAILS.into(),
        message,
    };
    let details = match value.get("BillDetails") {
        Some(Value::Array(a)) => a.as_slice(),
        Some(Value::Null) => &[],
        None => {
            return Err(shape(format!(
                "bill {}: `BillDetails` is missing",
                ctx.bill_id
            )))
        }
        Some(_) => {
            return Err(shape(format!(
                "bill {}: `BillDetails` is not an array",
                ctx.bill_id
            )))
        }
    };
    let mut records = Vec::with_capacity(details.len());
    for (i, d) in details.iter().enumerate() {
        let Value::Object(o) = d else {
            return Err(shape(format!(
                "bill {} BillDetails[{i}] is not an object",
                ctx.bill_id
            )));
        };
        let missing = |f: &str| {
            shape(format!(
                "bill {} BillDetails[{i}].{f} is missing or not a number",
                ctx.bill_id
            ))
        };
        let contract_id = o
            .get("ContractID")
            .and_then(id_of)
            .ok_or_else(|| missing("ContractID"))?;
        let class_id = o
            .get("ServiceClassID")
            .and_then(id_of)
            .ok_or_else(|| missing("ServiceClassID"))?;
        let cost = o
            .get("Amount")
            .and_then(decimal_of)
            .ok_or_else(|| missing("Amount"))?;
        let quantity = match o.get("Usage") {
            None | Some(Value::Null) => Decimal::ZERO,
            Some(v) => decimal_of(v).ok_or_else(|| missing("Usage"))?,
        };
        let class = prices.get(&class_id);
        if class.is_none() {
            warn!(source = %ctx.source, bill_id = %ctx.bill_id, service_class_id = %class_id, "sakura: ServiceClassID not in the price list; the line stays unnamed");
        }
        let mut attributes: BTreeMap<Name, Text> = BTreeMap::new();
        attributes.insert("detail_source".into(), "json".into());
        for (k, attr) in [
            ("Index", "index"),
            ("Zone", "zone"),
            ("ServiceUsagePath", "service_usage_path"),
            ("FormattedUsage", "formatted_usage"),
            ("Description", "description"),
            ("ContractEndAt", "contract_end_at"),
        ] {
            if let Some(v) = o.get(k).and_then(scalar_text).filter(|s| !s.is_empty()) {
                attributes.insert(attr.into(), v.into());
            }
        }
        let class_path = o
            .get("ServiceClassPath")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .or_else(|| class.and_then(|c| c.path.clone()));
        records.push(record_of(
            Line {
                contract_id,
                service_class_id: class_id,
                product_name: class.map(|c| c.name.clone()),
                class_path,
                resource_name: None,
                quantity,
                unit: "seconds",
                cost,
                attributes,
                raw: d.clone(),
            },
            ctx,
        ));
    }
    Ok(records)
}

/// The 16 columns of the CSV details, in the manual's order.
pub const CSV_COLUMNS: [&str; 16] = [
    "seq",
    "bill_no",
    "month_of_use",
    "payment_status",
    "member_id",
    "account_code",
    "resource_id",
    "product_id",
    "product_name",
    "zone_id",
    "zone_name",
    "days",
    "hours",
    "price_excl_tax",
    "tax",
    "resource_name",
];

/// Read the `Body` of `billdetail/{member}/{bill}/csv` into records.
///
/// The manual shows rows without a header while the Go SDK expects one: a first row whose
/// sequence number is not a number is taken as the header and skipped. CRLF or LF, a UTF-8 BOM
/// and quoted fields with Japanese text are accepted. Every row must have the 16 documented
/// columns; `billed_cost = price excluding tax + tax`, quantity = days × 24 + hours (`hours`).
pub fn parse_bill_csv(body: &str, ctx: &LineContext) -> Result<Vec<UsageRecord>, ProviderError> {
    let mut records = csv_lines(body, ctx)?;
    disambiguate(&mut records);
    Ok(records)
}

/// The records of one CSV body, one per data row (not disambiguated: a bill may come in pages).
fn csv_lines(body: &str, ctx: &LineContext) -> Result<Vec<UsageRecord>, ProviderError> {
    let shape = |message: String| ProviderError::Shape {
        provider: ctx.source.clone(),
        call: calls::DETAILS_CSV.into(),
        message,
    };
    let body = body.strip_prefix('\u{feff}').unwrap_or(body);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(body.as_bytes());
    let mut records = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let row =
            row.map_err(|e| shape(format!("bill {}: CSV row {}: {e}", ctx.bill_id, i + 1)))?;
        if row.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        let first = row.get(0).unwrap_or_default().trim();
        if i == 0 && !first.chars().all(|c| c.is_ascii_digit()) {
            debug!(source = %ctx.source, bill_id = %ctx.bill_id, "sakura: CSV header row skipped");
            continue;
        }
        if row.len() != CSV_COLUMNS.len() {
            return Err(shape(format!(
                "bill {}: CSV row {} has {} columns, expected {}",
                ctx.bill_id,
                i + 1,
                row.len(),
                CSV_COLUMNS.len()
            )));
        }
        let field = |c: usize| row.get(c).unwrap_or_default().trim().to_string();
        let number = |c: usize| {
            let text = field(c);
            decimal_text(&text).ok_or_else(|| {
                shape(format!(
                    "bill {}: CSV row {} column {} ({}) is not a number: {text:?}",
                    ctx.bill_id,
                    i + 1,
                    c + 1,
                    CSV_COLUMNS[c]
                ))
            })
        };
        let net = number(13)?;
        let tax = number(14)?;
        let days = number(11)?;
        let hours = number(12)?;
        let contract_id = field(6);
        let class_id = field(7);
        if contract_id.is_empty() || class_id.is_empty() {
            return Err(shape(format!(
                "bill {}: CSV row {} has no resource ID or product ID",
                ctx.bill_id,
                i + 1
            )));
        }
        let month_of_use = field(2);
        if let Ok(m) = month_of_use.parse::<Month>() {
            if m != ctx.month {
                warn!(source = %ctx.source, bill_id = %ctx.bill_id, month_of_use, month = %ctx.month, "sakura: CSV month of use differs from the bill's month");
            }
        }
        let mut raw = Map::new();
        for (c, name) in CSV_COLUMNS.iter().enumerate() {
            raw.insert((*name).into(), Value::String(field(c)));
        }
        let mut attributes: BTreeMap<Name, Text> = BTreeMap::new();
        attributes.insert("detail_source".into(), "csv".into());
        attributes.insert("price_excl_tax".into(), net.to_compact_string());
        attributes.insert("tax".into(), tax.to_compact_string());
        attributes.insert("days".into(), days.to_compact_string());
        attributes.insert("hours".into(), hours.to_compact_string());
        for (c, attr) in [
            (0, "seq"),
            (1, "csv_bill_no"),
            (2, "month_of_use"),
            (9, "zone"),
            (10, "zone_name"),
        ] {
            let v = field(c);
            if !v.is_empty() {
                attributes.insert(attr.into(), v.into());
            }
        }
        let nonempty = |c: usize| Some(field(c)).filter(|s| !s.is_empty());
        // Each figure is read exactly; their sums may still be beyond a decimal's range, where
        // `+` and `*` would panic.
        let beyond = |what: &str| {
            shape(format!(
                "bill {}: CSV row {}: its {what} is beyond the range of a decimal",
                ctx.bill_id,
                i + 1
            ))
        };
        let quantity = days
            .checked_mul(Decimal::from(24))
            .and_then(|h| h.checked_add(hours))
            .ok_or_else(|| beyond("hours (days × 24 + hours)"))?;
        let cost = net
            .checked_add(tax)
            .ok_or_else(|| beyond("amount (price + tax)"))?;
        records.push(record_of(
            Line {
                contract_id,
                service_class_id: class_id,
                product_name: nonempty(8),
                class_path: None,
                resource_name: nonempty(15),
                quantity,
                unit: "hours",
                cost,
                attributes,
                raw: Value::Object(raw),
            },
            ctx,
        ));
    }
    Ok(records)
}

/// `"<account_id>|<member_code>|<YYYY-MM>"`: what `fetch` needs, carried by the chunk.
fn chunk_detail(account: &AccountInfo, month: Month) -> String {
    format!("{}|{}|{month}", account.account_id, account.member_code)
}

#[async_trait]
impl Provider for SakuraProvider {
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
        // A new run: forget the previous run's price list and held months.
        if let Ok(mut p) = self.prices.lock() {
            *p = None;
        }
        if let Ok(mut h) = self.holds.lock() {
            h.clear();
        }
        let account = self.auth_status().await?;
        let stream = Self::stream_of(&account.account_id);
        let stored = match cursors.get(&stream) {
            Some(text) => Some(text.parse::<Month>().map_err(|e| ProviderError::Config {
                provider: self.name.clone(),
                message: format!("stored cursor {stream} = {text:?}: {e}"),
            })?),
            None => None,
        };
        // The months after the cursor, and the last `look_back_months` up to it again (bills
        // SAKURA lists late); never before `start_month`.
        let first = match stored {
            Some(c) => c
                .next()
                .back(self.config.look_back_months)
                .max(self.config.start_month),
            None => self.config.start_month,
        };
        if let Ok(mut planned) = self.planned_cursors.lock() {
            match stored {
                Some(c) => planned.insert(stream.clone(), c),
                None => planned.remove(&stream),
            };
        }
        let running = Month::of(now);
        let mut chunks = Vec::new();
        let mut month = first;
        while month <= running {
            chunks.push(Chunk {
                stream: stream.clone(),
                window_start: month.start_utc(),
                window_end: month.end_utc(),
                detail: chunk_detail(&account, month),
            });
            month = month.next();
        }
        let provisional = chunks
            .iter()
            .filter(|c| now < c.window_end + self.config.final_lag)
            .count();
        let look_back = stored.map_or(0, |c| {
            chunks
                .iter()
                .filter(|ch| Month::of(ch.window_start) <= c)
                .count()
        });
        info!(source = %self.name, account_id = %account.account_id, from = %first, to = %running,
            months = chunks.len(), provisional, look_back, "sakura: plan ready");
        if let Ok(mut a) = self.account.lock() {
            *a = Some(account);
        }
        Ok(chunks)
    }

    async fn fetch(&self, chunk: &Chunk, now: DateTime<Utc>) -> Result<Page, ProviderError> {
        let bad_detail = || ProviderError::Config {
            provider: self.name.clone(),
            message: format!(
                "chunk detail {:?} is not account|member|month",
                chunk.detail
            ),
        };
        let mut parts = chunk.detail.splitn(3, '|');
        let (Some(account_id), Some(member_code), Some(month)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad_detail());
        };
        let month: Month = month.parse().map_err(|_| bad_detail())?;
        // The account `plan` found; a chunk fetched without a plan in this process asks again,
        // so records always carry the same account attributes (they are part of the content).
        let account = match self.account.lock().ok().and_then(|a| a.clone()) {
            Some(a) if a.account_id == account_id && a.member_code == member_code => a,
            _ => {
                let a = self.auth_status().await?;
                if a.account_id != account_id || a.member_code != member_code {
                    return Err(ProviderError::Config {
                        provider: self.name.clone(),
                        message: format!(
                            "chunk for account {account_id} (member {member_code}), but the API \
                             key belongs to account {} (member {})",
                            a.account_id, a.member_code
                        ),
                    });
                }
                if let Ok(mut cached) = self.account.lock() {
                    *cached = Some(a.clone());
                }
                a
            }
        };
        let is_final = self.is_final(month, now);
        let bills = self.bills(account_id, month).await?;
        let mut records = Vec::new();
        // Bills whose lines add up to another amount than the bill: `bill id (lines/amount)`.
        let mut unreconciled = Vec::new();
        for bill in &bills {
            if let Some(d) = bill.date {
                let m = Month {
                    year: d.year(),
                    month: d.month(),
                };
                if m != month {
                    warn!(source = %self.name, bill_id = %bill.bill_id, date = %d, %month, "sakura: bill dated outside the month it was listed for");
                }
            }
            let ctx = LineContext {
                source: self.name.clone(),
                account: account.clone(),
                bill_id: bill.bill_id.clone(),
                month,
                is_final,
            };
            let lines = self.details(&ctx).await?;
            // Beyond a decimal's range, the lines cannot add up to the bill's amount.
            let sum = super::checked_sum(lines.iter().map(|r| r.billed_cost));
            let apart = sum.and_then(|s| s.checked_sub(bill.amount));
            // Tax rounded once per bill against once per line: up to a yen per line apart.
            // More than that looks like lines missing from the details (or extra ones).
            let rounding = Decimal::from(lines.len().max(1));
            let sum = sum.map_or_else(|| "beyond a decimal".to_string(), |s| s.to_string());
            if apart.is_none_or(|d| d.abs() > rounding) {
                warn!(source = %self.name, bill_id = %bill.bill_id, bill_amount = %bill.amount, lines = %sum,
                    "sakura: the bill's lines add up to another amount than the bill (more than tax rounding): details missing?");
                unreconciled.push(format!("{} ({sum}/{})", bill.bill_id, bill.amount));
            } else if apart.is_some_and(|d| !d.is_zero()) {
                debug!(source = %self.name, bill_id = %bill.bill_id, bill_amount = %bill.amount, lines = %sum,
                    "sakura: bill amount differs from the sum of its lines (tax rounding)");
            }
            records.extend(lines);
        }
        info!(source = %self.name, %month, bills = bills.len(), records = records.len(), is_final,
            "sakura: month fetched");
        let look_back = self.is_look_back(&chunk.stream, month);
        if look_back && !unreconciled.is_empty() {
            warn!(source = %self.name, %month, bills = %unreconciled.join(", "),
                "sakura: a month the cursor passed no longer adds up to its bills (lines/bill JPY): \
                 its lines are staged and it is read again while within look_back_months; the \
                 cursor does not move back (check the bill with SAKURA)");
        } else if is_final && !unreconciled.is_empty() {
            warn!(source = %self.name, %month, bills = %unreconciled.join(", "),
                "sakura: a final month whose lines do not add up to its bills (lines/bill JPY) is held: \
                 its lines are staged, the cursor stays before it and every run reads it again until \
                 they do (check the bill with SAKURA; `ledger set-cursor --allow-forward` accepts it as it is)");
        }
        let cursor = if look_back {
            None
        } else {
            self.page_cursor(&chunk.stream, month, is_final, unreconciled.is_empty())
        };
        Ok(Page {
            records,
            cursor,
            also: Vec::new(),
        })
    }

    fn push_provisional(&self) -> bool {
        self.config.push_provisional
    }
}
