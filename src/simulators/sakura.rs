//! A loopback simulator of SAKURA Cloud's billing API (and the two resource-API calls it needs).
//!
//! It holds a dataset of bills, each a JST month with detail lines that know both their
//! tax-excluded price and their tax, and serves it the way the manual and the reference describe:
//! the JSON details carry the tax-included `Amount` and only a `ServiceClassID`; the CSV details
//! (a JSON object whose `Body` is the CSV text, CRLF, all fields quoted) carry the Japanese
//! product name from the price list, the price excluding tax and the tax. Bill amounts are
//! always the sum of their lines, so a changed line changes its bill.
//!
//! SAKURA has no finality flag on the wire: a month is confirmed on the 1st of the next month.
//! To let tests model "the running month changes, then settles", the handle can change a line
//! ([`SakuraSimHandle::set_detail_amount`]), add one, and **finalize** a month, after which its
//! lines refuse changes (the provider decides finality from the clock; the simulator only
//! guarantees that a confirmed month no longer moves). It can also leave a bill's last lines out
//! of its details while the bill's `Amount` counts them ([`SakuraSimHandle::withhold_details`]),
//! as a read may find details not generated yet, and list a bill late ([`SakuraSimHandle::add_bill`]).
//!
//! Routes (all `GET`, HTTP Basic `token:secret`, any zone):
//! * `/cloud/zone/{zone}/api/cloud/1.1/auth-status`
//! * `/cloud/zone/{zone}/api/cloud/1.1/public/price` (`?{"From":n,"Count":m}` pages it)
//! * `/cloud/zone/{zone}/api/system/1.0/bill/by-contract/{account}[/{year}[/{month}]]`
//! * `/cloud/zone/{zone}/api/system/1.0/bill/id/{bill}`
//! * `/cloud/zone/{zone}/api/system/1.0/billdetail/{member}/{bill}[/csv]` (envelope `Total`,
//!   `From`, `Count`; paged with `?{"From":n,"Count":m}` once a page size is set)
//!
//! Errors use SAKURA's body `{"is_fatal", "serial", "status", "error_code", "error_msg"}`:
//! 401 for bad credentials, 403 when the key lacks the `bill` permission, 404 for an unknown
//! account, member, bill or path. Fault injection and a request log go through the handle.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::{DateTime, Duration, FixedOffset, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Number, Value};

use crate::providers::sakura::Month;

/// The manual's `auth-status` example. Origin: `src/simulators/data/README.md`.
pub const FIXTURE_AUTH_STATUS: &str = include_str!("data/sakura/auth-status.json");
/// The manual's `bill/by-contract/{accountID}` example (2 bills).
pub const FIXTURE_BILLS: &str = include_str!("data/sakura/bill.by-contract.json");
/// The manual's `billdetail/{member}/{bill}` example (3 lines).
pub const FIXTURE_DETAILS: &str = include_str!("data/sakura/billdetail.json");
/// The manual's CSV detail example: the `Body` text (one row, no header).
pub const FIXTURE_CSV_BODY: &str = include_str!("data/sakura/billdetail.csv.Body.csv");
/// A **synthetic** price list naming the fixtures' service classes.
pub const FIXTURE_PRICE_SYNTHETIC: &str = include_str!("data/sakura/public.price.synthetic.json");

fn jst() -> FixedOffset {
    FixedOffset::east_opt(9 * 3600).expect("+09:00 is a valid offset")
}

/// One detail line of a bill.
#[derive(Debug, Clone, PartialEq)]
pub struct SimLine {
    /// `Index`, the sequence inside the bill (also the CSV's first column).
    pub index: u32,
    /// `ContractID` / the CSV's resource ID.
    pub contract_id: String,
    /// `ServiceClassID` / the CSV's product ID.
    pub service_class_id: u64,
    /// `Usage`, seconds.
    pub usage: u64,
    /// Price excluding tax, JPY.
    pub price_excl_tax: Decimal,
    /// Consumption tax, JPY.
    pub tax: Decimal,
    /// Zone id (`is1b`), empty for global resources.
    pub zone_id: String,
    /// Zone name (`石狩第2ゾーン`), empty for global resources.
    pub zone_name: String,
    /// Days of use (CSV).
    pub days: u32,
    /// Remaining hours of use (CSV).
    pub hours: u32,
    /// The resource's name (CSV).
    pub resource_name: String,
}

impl SimLine {
    /// The tax-included amount (`Amount` of the JSON details).
    pub fn amount(&self) -> Decimal {
        self.price_excl_tax + self.tax
    }
}

/// One monthly bill.
#[derive(Debug, Clone, PartialEq)]
pub struct SimBill {
    /// `BillID`.
    pub bill_id: u64,
    /// The JST month it bills.
    pub month: Month,
    /// `Date`, the billing date (shown in JST).
    pub date: DateTime<Utc>,
    /// `Paid`.
    pub paid: bool,
    /// `PaymentClassID`.
    pub payment_class_id: u64,
    /// The lines.
    pub lines: Vec<SimLine>,
    /// Confirmed: the lines no longer change.
    pub finalized: bool,
}

impl SimBill {
    /// `Amount`: the sum of the lines, tax included.
    pub fn amount(&self) -> Decimal {
        self.lines.iter().map(SimLine::amount).sum()
    }
}

/// One price-list entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SimServiceClass {
    /// `ServiceClassID`.
    pub id: u64,
    /// `ServiceClassName`.
    pub name: String,
    /// `ServiceClassPath`.
    pub path: String,
    /// `DisplayName` (Japanese): also the CSV's product name.
    pub display_name: String,
    /// `Price`, served as it is (object or `[]`).
    pub price: Value,
}

/// The simulated account: who it is, its bills and its price list.
#[derive(Debug, Clone, PartialEq)]
pub struct SakuraDataset {
    /// `Account.ID`.
    pub account_id: String,
    /// `Account.Code`.
    pub account_code: String,
    /// `Account.Name`.
    pub account_name: String,
    /// `Member.Code`.
    pub member_code: String,
    /// `ExternalPermission` of the key (`bill` grants the billing API).
    pub external_permission: String,
    /// The bills.
    pub bills: Vec<SimBill>,
    /// The price list.
    pub price_list: Vec<SimServiceClass>,
}

/// Errors building a dataset from the fixtures.
#[derive(Debug, thiserror::Error)]
#[error("sakura simulator fixture: {0}")]
pub struct DatasetError(String);

fn int_of(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn dec_text(s: &str) -> Option<Decimal> {
    Decimal::from_str_exact(s.trim()).ok()
}

/// Split a tax-included amount at `rate` percent: net rounded half up, tax the rest.
fn split_tax(amount: Decimal, rate: u32) -> (Decimal, Decimal) {
    let net = (amount * Decimal::from(100) / Decimal::from(100 + rate))
        .round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero);
    (net, amount - net)
}

/// A JSON number with exactly the decimal's digits.
fn number(d: Decimal) -> Value {
    Number::from_str(&d.normalize().to_string())
        .map(Value::Number)
        .unwrap_or_else(|_| Value::String(d.to_string()))
}

/// A small deterministic generator (SplitMix64).
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

impl SakuraDataset {
    /// The manual's account with no bills and the synthetic price list.
    pub fn empty() -> Result<Self, DatasetError> {
        let auth: Value = serde_json::from_str(FIXTURE_AUTH_STATUS)
            .map_err(|e| DatasetError(format!("auth-status.json: {e}")))?;
        let text = |p: &str| {
            auth.pointer(p)
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| DatasetError(format!("auth-status.json: {p} is missing")))
        };
        let price: Value = serde_json::from_str(FIXTURE_PRICE_SYNTHETIC)
            .map_err(|e| DatasetError(format!("public.price.synthetic.json: {e}")))?;
        let mut price_list = Vec::new();
        for c in price["ServiceClasses"].as_array().into_iter().flatten() {
            let s = |k: &str| {
                c.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            price_list.push(SimServiceClass {
                id: c
                    .get("ServiceClassID")
                    .and_then(int_of)
                    .ok_or_else(|| DatasetError("price list: ServiceClassID".into()))?,
                name: s("ServiceClassName"),
                path: s("ServiceClassPath"),
                display_name: s("DisplayName"),
                price: c.get("Price").cloned().unwrap_or(json!([])),
            });
        }
        Ok(SakuraDataset {
            account_id: text("/Account/ID")?,
            account_code: text("/Account/Code")?,
            account_name: text("/Account/Name")?,
            member_code: text("/Member/Code")?,
            external_permission: text("/ExternalPermission")?,
            bills: Vec::new(),
            price_list,
        })
    }

    /// The manual's examples as one world: the account of `auth-status.json`; the two bills of
    /// `bill.by-contract.json` (2016-05 and 2016-06, by their `Date`), each with the three
    /// lines of `billdetail.json`. Line 50118 takes its CSV fields from the manual's CSV row
    /// (100 + 8 tax, 30 days, is1b); the other lines split their amount at the 8 % of 2016.
    /// Bill amounts are recomputed from the lines (648), not the manual's 4330: the manual's
    /// detail example belongs to a bill it does not show.
    pub fn from_fixtures() -> Result<Self, DatasetError> {
        let mut ds = Self::empty()?;
        let details: Value = serde_json::from_str(FIXTURE_DETAILS)
            .map_err(|e| DatasetError(format!("billdetail.json: {e}")))?;
        let csv_row: Vec<String> = {
            let mut r = csv::ReaderBuilder::new()
                .has_headers(false)
                .from_reader(FIXTURE_CSV_BODY.as_bytes());
            r.records()
                .next()
                .and_then(Result::ok)
                .map(|row| row.iter().map(String::from).collect())
                .ok_or_else(|| DatasetError("billdetail.csv.Body.csv: no row".into()))?
        };
        if csv_row.len() != 16 {
            return Err(DatasetError(
                "billdetail.csv.Body.csv: not 16 columns".into(),
            ));
        }
        let mut lines = Vec::new();
        for (i, d) in details["BillDetails"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let field = |k: &str| {
                d.get(k)
                    .ok_or_else(|| DatasetError(format!("BillDetails[{i}].{k} is missing")))
            };
            let amount = dec_text(&field("Amount")?.to_string())
                .ok_or_else(|| DatasetError(format!("BillDetails[{i}].Amount")))?;
            let usage = int_of(field("Usage")?).unwrap_or(0);
            let contract_id = field("ContractID")?
                .as_str()
                .unwrap_or_default()
                .to_string();
            let service_class_id = int_of(field("ServiceClassID")?).unwrap_or(0);
            let mut line = SimLine {
                index: int_of(field("Index")?).unwrap_or(i as u64 + 1) as u32,
                contract_id,
                service_class_id,
                usage,
                price_excl_tax: Decimal::ZERO,
                tax: Decimal::ZERO,
                zone_id: "is1b".into(),
                zone_name: "石狩第2ゾーン".into(),
                days: (usage / 86_400) as u32,
                hours: ((usage % 86_400) / 3_600) as u32,
                resource_name: String::new(),
            };
            (line.price_excl_tax, line.tax) = split_tax(amount, 8);
            if csv_row[6] == line.contract_id && csv_row[7] == service_class_id.to_string() {
                line.zone_id = csv_row[9].clone();
                line.zone_name = csv_row[10].clone();
                line.days = csv_row[11].parse().unwrap_or(line.days);
                line.hours = csv_row[12].parse().unwrap_or(line.hours);
                line.price_excl_tax = dec_text(&csv_row[13]).unwrap_or(line.price_excl_tax);
                line.tax = dec_text(&csv_row[14]).unwrap_or(line.tax);
                line.resource_name = csv_row[15].clone();
            }
            lines.push(line);
        }
        let bills: Value = serde_json::from_str(FIXTURE_BILLS)
            .map_err(|e| DatasetError(format!("bill.by-contract.json: {e}")))?;
        for (i, b) in bills["Bills"].as_array().into_iter().flatten().enumerate() {
            let date = b
                .get("Date")
                .and_then(Value::as_str)
                .and_then(|d| DateTime::parse_from_rfc3339(d).ok())
                .ok_or_else(|| DatasetError(format!("Bills[{i}].Date")))?
                .with_timezone(&Utc);
            ds.bills.push(SimBill {
                bill_id: b
                    .get("BillID")
                    .and_then(int_of)
                    .ok_or_else(|| DatasetError(format!("Bills[{i}].BillID")))?,
                month: Month::of(date),
                date,
                paid: b.get("Paid").and_then(Value::as_bool).unwrap_or(false),
                payment_class_id: b.get("PaymentClassID").and_then(int_of).unwrap_or(200),
                lines: lines.clone(),
                finalized: false,
            });
        }
        ds.bills.sort_by_key(|b| b.month);
        Ok(ds)
    }

    /// A deterministic world: `months` monthly bills from `first`, each with `lines` lines of
    /// the price list's classes, prices from 0 to 9,999 JPY and 10 % tax (rounded down).
    /// The same seed always gives the same dataset.
    pub fn generate(
        seed: u64,
        first: Month,
        months: u32,
        lines: u32,
    ) -> Result<Self, DatasetError> {
        let mut ds = Self::empty()?;
        let mut rng = SplitMix(seed);
        let mut month = first;
        let classes: Vec<u64> = ds.price_list.iter().map(|c| c.id).collect();
        for m in 0..months {
            let mut bill_lines = Vec::new();
            for i in 0..lines {
                let net = Decimal::from(rng.below(10_000));
                let usage = rng.below(31 * 86_400);
                bill_lines.push(SimLine {
                    index: i + 1,
                    contract_id: format!("1127{:08}", 100_000 + u64::from(i) * 7 + rng.below(7)),
                    service_class_id: classes
                        .get(rng.below(classes.len() as u64) as usize)
                        .copied()
                        .unwrap_or(50_000),
                    usage,
                    price_excl_tax: net,
                    tax: (net / Decimal::from(10)).floor(),
                    zone_id: "is1b".into(),
                    zone_name: "石狩第2ゾーン".into(),
                    days: (usage / 86_400) as u32,
                    hours: ((usage % 86_400) / 3_600) as u32,
                    resource_name: format!("サーバー{}", i + 1),
                });
            }
            ds.bills.push(SimBill {
                bill_id: 20_000_000 + seed % 1000 * 1000 + u64::from(m),
                month,
                date: billing_date(month),
                paid: false,
                payment_class_id: 200,
                lines: bill_lines,
                finalized: false,
            });
            month = month.next();
        }
        Ok(ds)
    }

    /// The bills of one month.
    pub fn bills_of(&self, month: Month) -> Vec<&SimBill> {
        self.bills.iter().filter(|b| b.month == month).collect()
    }

    /// The sum of all line amounts of one month, tax included.
    pub fn month_total(&self, month: Month) -> Decimal {
        self.bills_of(month).iter().map(|b| b.amount()).sum()
    }

    fn class(&self, id: u64) -> Option<&SimServiceClass> {
        self.price_list.iter().find(|c| c.id == id)
    }

    fn bill_json(&self, b: &SimBill) -> Value {
        let date = b.date.with_timezone(&jst());
        let limit = b.month.next().start_utc().with_timezone(&jst()) + Duration::days(29);
        json!({
            "PaymentClassID": b.payment_class_id,
            "PayLimit": limit.format("%Y-%m-%dT00:00:00+09:00").to_string(),
            "Paid": b.paid,
            "MemberID": self.member_code,
            "Date": date.to_rfc3339(),
            "BillID": b.bill_id,
            "Amount": number(b.amount()),
        })
    }

    fn details_json(&self, b: &SimBill) -> Vec<Value> {
        b.lines
            .iter()
            .map(|l| {
                json!({
                    "Usage": l.usage,
                    "ServiceClassID": l.service_class_id,
                    "Index": l.index,
                    "ContractID": l.contract_id,
                    "Amount": number(l.amount()),
                })
            })
            .collect()
    }

    /// The CSV text of a bill's details: every field quoted, CRLF, optionally a header row.
    pub fn details_csv(&self, b: &SimBill, header: bool) -> String {
        let mut out = String::new();
        let mut row = |fields: &[String]| {
            let quoted: Vec<String> = fields
                .iter()
                .map(|f| format!("\"{}\"", f.replace('"', "\"\"")))
                .collect();
            out.push_str(&quoted.join(","));
            out.push_str("\r\n");
        };
        if header {
            // The real header text is not published; these are descriptive Japanese labels.
            let h = [
                "連番",
                "請求書番号",
                "利用月",
                "支払状況",
                "会員ID",
                "アカウントコード",
                "リソースID",
                "商品ID",
                "商品名",
                "ゾーンID",
                "ゾーン名",
                "日数",
                "時間",
                "税抜価格",
                "消費税",
                "リソース名",
            ];
            row(&h.map(String::from));
        }
        let status = if b.paid { "入金済み" } else { "未入金" };
        for l in &b.lines {
            row(&[
                l.index.to_string(),
                format!("{:09}", b.bill_id % 1_000_000_000),
                format!("{:04}/{:02}", b.month.year, b.month.month),
                status.to_string(),
                self.member_code.clone(),
                self.account_code.clone(),
                l.contract_id.clone(),
                l.service_class_id.to_string(),
                self.class(l.service_class_id)
                    .map(|c| c.display_name.clone())
                    .unwrap_or_default(),
                l.zone_id.clone(),
                l.zone_name.clone(),
                l.days.to_string(),
                l.hours.to_string(),
                l.price_excl_tax.normalize().to_string(),
                l.tax.normalize().to_string(),
                l.resource_name.clone(),
            ]);
        }
        out
    }
}

/// A failure the simulator answers instead of the real response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// An HTTP status (e.g. 500, 503) with a plain-text body.
    Http(u16),
    /// HTTP 429 with `Retry-After: <secs>`.
    RateLimited {
        /// The `Retry-After` value, in seconds.
        retry_after_secs: u64,
    },
    /// A SAKURA error body with this HTTP status.
    Api {
        /// HTTP status.
        status: u16,
        /// `error_code`.
        code: String,
        /// `error_msg`.
        message: String,
    },
}

/// One request the simulator received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The path (from `/cloud/zone/…`).
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// Whether the Basic credentials were right.
    pub authorized: bool,
}

#[derive(Debug)]
struct SimState {
    dataset: Mutex<SakuraDataset>,
    auth_header: String,
    /// Faults with an optional path filter (a substring the path must contain).
    faults: Mutex<VecDeque<(Option<String>, Fault)>>,
    requests: Mutex<Vec<RecordedRequest>>,
    csv_header: std::sync::atomic::AtomicBool,
    price_page_size: AtomicU64,
    detail_page_size: AtomicU64,
    serial: AtomicU64,
    /// Per bill, how many of its last lines the details do not list yet (the bill's `Amount`
    /// counts them): details still being generated.
    withheld: Mutex<HashMap<u64, usize>>,
}

/// Entry point of the simulator.
pub struct SakuraSim;

impl SakuraSim {
    /// Serve `dataset` on `127.0.0.1:<free port>` with Basic credentials `token:secret`, until
    /// the handle is dropped or shut down.
    pub async fn start(
        dataset: SakuraDataset,
        token: &str,
        secret: &str,
    ) -> std::io::Result<SakuraSimHandle> {
        let state = Arc::new(SimState {
            dataset: Mutex::new(dataset),
            auth_header: super::basic_auth_header(token, secret),
            faults: Mutex::new(VecDeque::new()),
            requests: Mutex::new(Vec::new()),
            csv_header: std::sync::atomic::AtomicBool::new(true),
            price_page_size: AtomicU64::new(0),
            detail_page_size: AtomicU64::new(0),
            serial: AtomicU64::new(1),
            withheld: Mutex::new(HashMap::new()),
        });
        let st = state.clone();
        let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
            let st = st.clone();
            async move { handle(st, method, uri, headers) }
        });
        let server = super::Server::start("sakura", app).await?;
        let addr = server.addr;
        let url = format!("http://{addr}");
        Ok(SakuraSimHandle {
            endpoint: format!("{url}/cloud/zone/is1a/api/system/1.0"),
            url,
            addr,
            state,
            server,
        })
    }
}

/// A running simulator. `endpoint` is the billing API base to configure; dropping the handle
/// stops it.
pub struct SakuraSimHandle {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The billing API base: `{url}/cloud/zone/is1a/api/system/1.0`.
    pub endpoint: String,
    /// The bound address.
    pub addr: SocketAddr,
    state: Arc<SimState>,
    server: super::Server,
}

impl std::fmt::Debug for SakuraSimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SakuraSimHandle")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl SakuraSimHandle {
    /// A copy of the dataset being served.
    pub fn dataset(&self) -> SakuraDataset {
        self.with(|d| d.clone())
    }

    fn with<T>(&self, f: impl FnOnce(&mut SakuraDataset) -> T) -> T {
        let mut guard = match self.state.dataset.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Change one line of a bill (by `Index`): the running month's data is regenerated daily,
    /// so a re-read may see a new amount. Refused once the bill's month is finalized.
    pub fn set_detail_amount(
        &self,
        bill_id: u64,
        index: u32,
        price_excl_tax: Decimal,
        tax: Decimal,
    ) -> Result<(), String> {
        self.with(|d| {
            let bill = d
                .bills
                .iter_mut()
                .find(|b| b.bill_id == bill_id)
                .ok_or_else(|| format!("no bill {bill_id}"))?;
            if bill.finalized {
                return Err(format!("bill {bill_id} ({}) is final", bill.month));
            }
            let line = bill
                .lines
                .iter_mut()
                .find(|l| l.index == index)
                .ok_or_else(|| format!("bill {bill_id} has no line {index}"))?;
            line.price_excl_tax = price_excl_tax;
            line.tax = tax;
            Ok(())
        })
    }

    /// Add a line to a bill (new usage in the running month). Refused once finalized.
    pub fn add_line(&self, bill_id: u64, line: SimLine) -> Result<(), String> {
        self.with(|d| {
            let bill = d
                .bills
                .iter_mut()
                .find(|b| b.bill_id == bill_id)
                .ok_or_else(|| format!("no bill {bill_id}"))?;
            if bill.finalized {
                return Err(format!("bill {bill_id} ({}) is final", bill.month));
            }
            bill.lines.push(line);
            Ok(())
        })
    }

    /// Add a bill.
    pub fn add_bill(&self, bill: SimBill) {
        self.with(|d| d.bills.push(bill));
    }

    /// Confirm a month (what SAKURA does on the 1st of the next month): its bills refuse any
    /// further change. Nothing on the wire says so; clients judge finality by the date.
    pub fn finalize_month(&self, month: Month) {
        self.with(|d| {
            for b in d.bills.iter_mut().filter(|b| b.month == month) {
                b.finalized = true;
            }
        });
    }

    /// Mark a month's bills paid (changes `Paid` and the CSV's payment status, not amounts).
    pub fn set_paid(&self, month: Month, paid: bool) {
        self.with(|d| {
            for b in d.bills.iter_mut().filter(|b| b.month == month) {
                b.paid = paid;
            }
        });
    }

    /// The key's `ExternalPermission` (`bill` grants the billing API; anything else gives 403).
    pub fn set_external_permission(&self, perm: &str) {
        self.with(|d| d.external_permission = perm.to_string());
    }

    /// Whether the CSV body starts with a header row (default true, as the Go SDK expects; the
    /// manual's example has none).
    pub fn set_csv_header(&self, header: bool) {
        self.state.csv_header.store(header, Ordering::Relaxed);
    }

    /// Serve the price list in pages of `n` entries (0: all at once, the default).
    pub fn set_price_page_size(&self, n: u64) {
        self.state.price_page_size.store(n, Ordering::Relaxed);
    }

    /// Answer bill details (JSON and CSV) in pages of at most `n` lines (0: all at once, the
    /// default), as a find-style API caps its page size: the envelope then says `Total` (all
    /// lines of the bill), `From` and `Count` (this page), and `?{"From":n,"Count":m}` asks for
    /// the next page (a larger `Count` than the cap is cut to the cap).
    pub fn set_detail_page_size(&self, n: u64) {
        self.state.detail_page_size.store(n, Ordering::Relaxed);
    }

    /// Leave the last `n` lines of a bill out of its details (JSON and CSV, `Total` included)
    /// while its `Amount` still counts them: SAKURA's data is generated after the fact ("if
    /// billing data have not been updated, please obtain the data again after a while"), so a
    /// read may find a bill whose lines are not all listed yet. `0` lists them all again.
    pub fn withhold_details(&self, bill_id: u64, n: usize) {
        if let Ok(mut w) = self.state.withheld.lock() {
            if n == 0 {
                w.remove(&bill_id);
            } else {
                w.insert(bill_id, n);
            }
        }
    }

    /// Answer the next `n` requests with `fault` (queued after earlier faults).
    pub fn fail_next(&self, n: usize, fault: Fault) {
        if let Ok(mut q) = self.state.faults.lock() {
            q.extend(std::iter::repeat_n((None, fault), n));
        }
    }

    /// Answer the next `n` requests whose path contains `path_part` with `fault`.
    pub fn fail_next_on(&self, path_part: &str, n: usize, fault: Fault) {
        if let Ok(mut q) = self.state.faults.lock() {
            q.extend(std::iter::repeat_n((Some(path_part.to_string()), fault), n));
        }
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// How many requests had a path containing `part`.
    pub fn count(&self, part: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.path.contains(part))
            .count()
    }

    /// Forget the request log.
    pub fn clear_requests(&self) {
        if let Ok(mut r) = self.state.requests.lock() {
            r.clear();
        }
    }

    /// Stop serving and wait for the server task to end.
    pub async fn shutdown(self) {
        self.server.stop().await;
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `(From, Count)` of a find-style query `?{"From":n,"Count":m}` (URL-encoded JSON), capped at
/// `cap` when `cap > 0`; no `Count` and no cap means everything from `From`.
fn page_of(query: Option<&str>, cap: u64, total: usize) -> (usize, usize) {
    let params: Value = query
        .map(percent_decode)
        .and_then(|q| serde_json::from_str(&q).ok())
        .unwrap_or(Value::Null);
    let from = params.get("From").and_then(int_of).unwrap_or(0) as usize;
    let asked = params.get("Count").and_then(int_of).filter(|c| *c > 0);
    let count = match (asked, cap) {
        (Some(c), 0) => c as usize,
        (Some(c), cap) => c.min(cap) as usize,
        (None, 0) => total,
        (None, cap) => cap as usize,
    };
    (from, count)
}

fn error_body(state: &SimState, status: StatusCode, code: &str, message: &str) -> Response {
    let serial = state.serial.fetch_add(1, Ordering::Relaxed);
    (
        status,
        Json(json!({
            "is_fatal": true,
            "serial": format!("{serial:032x}"),
            "status": format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")),
            "error_code": code,
            "error_msg": message,
        })),
    )
        .into_response()
}

fn responsed_at() -> String {
    Utc::now()
        .with_timezone(&jst())
        .format("%Y-%m-%dT%H:%M:%S+09:00")
        .to_string()
}

fn handle(state: Arc<SimState>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().map(String::from);
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == state.auth_header);
    if let Ok(mut r) = state.requests.lock() {
        r.push(RecordedRequest {
            path: path.clone(),
            query: query.clone(),
            authorized,
        });
    }
    let fault = state.faults.lock().ok().and_then(|mut q| {
        let at = q
            .iter()
            .position(|(filter, _)| filter.as_deref().is_none_or(|f| path.contains(f)))?;
        q.remove(at).map(|(_, f)| f)
    });
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
        Some(Fault::Api {
            status,
            code,
            message,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            return error_body(&state, status, &code, &message);
        }
        None => {}
    }
    if !authorized {
        return error_body(
            &state,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "認証に失敗しました / authentication failed",
        );
    }
    if method != Method::GET {
        return error_body(
            &state,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "GET only",
        );
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    // cloud / zone / {zone} / api / {system|cloud} / {1.0|1.1} / …
    let not_found = || {
        error_body(
            &state,
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no such resource: {path}"),
        )
    };
    if segs.len() < 7 || segs[0] != "cloud" || segs[1] != "zone" || segs[3] != "api" {
        return not_found();
    }
    let api = (segs[4], segs[5]);
    let rest = &segs[6..];
    let ds = match state.dataset.lock() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    };
    let bill_perm = ds.external_permission.split('+').any(|p| p == "bill");
    let forbidden = || {
        error_body(
            &state,
            StatusCode::FORBIDDEN,
            "access_forbidden",
            "この操作を行う権限がありません (Billing Information permission required)",
        )
    };
    match (api, rest) {
        (("cloud", "1.1"), ["auth-status"]) => Json(json!({
            "is_ok": true,
            "Member": {"Errors": null, "Code": ds.member_code, "Class": "sakura"},
            "User": null,
            "AuthMethod": "apikey",
            "AuthClass": "account",
            "Permission": "view",
            "ExternalPermission": ds.external_permission,
            "RESTFilter": null,
            "IsAPIKey": true,
            "OperationPenalty": "none",
            "Account": {"Code": ds.account_code, "Name": ds.account_name, "Class": "account", "ID": ds.account_id},
        }))
        .into_response(),
        (("cloud", "1.1"), ["public", "price"]) => {
            let params: Value = query
                .as_deref()
                .map(percent_decode)
                .and_then(|q| serde_json::from_str(&q).ok())
                .unwrap_or(Value::Null);
            let total = ds.price_list.len();
            let from = params.get("From").and_then(int_of).unwrap_or(0) as usize;
            let page = state.price_page_size.load(Ordering::Relaxed) as usize;
            let count = params
                .get("Count")
                .and_then(int_of)
                .map(|c| c as usize)
                .filter(|c| *c > 0)
                .or((page > 0).then_some(page))
                .unwrap_or(total);
            let classes: Vec<Value> = ds
                .price_list
                .iter()
                .skip(from)
                .take(count)
                .map(|c| {
                    json!({
                        "ServiceClassID": c.id,
                        "ServiceClassName": c.name,
                        "ServiceClassPath": c.path,
                        "DisplayName": c.display_name,
                        "IsPublic": true,
                        "Price": c.price,
                    })
                })
                .collect();
            Json(json!({
                "is_ok": true,
                "Total": total,
                "From": from,
                "Count": classes.len(),
                "ServiceClasses": classes,
            }))
            .into_response()
        }
        (("system", "1.0"), ["bill", "by-contract", account, when @ ..]) if when.len() <= 2 => {
            if !bill_perm {
                return forbidden();
            }
            if *account != ds.account_id {
                return not_found();
            }
            let year: Option<i32> = match when.first().map(|y| y.parse()) {
                Some(Ok(y)) => Some(y),
                Some(Err(_)) => return not_found(),
                None => None,
            };
            let month: Option<u32> = match when.get(1).map(|m| m.parse()) {
                Some(Ok(m)) => Some(m),
                Some(Err(_)) => return not_found(),
                None => None,
            };
            let mut bills: Vec<&SimBill> = ds
                .bills
                .iter()
                .filter(|b| year.is_none_or(|y| b.month.year == y))
                .filter(|b| month.is_none_or(|m| b.month.month == m))
                .collect();
            bills.sort_by(|a, b| b.month.cmp(&a.month).then(b.bill_id.cmp(&a.bill_id)));
            let list: Vec<Value> = bills.iter().map(|b| ds.bill_json(b)).collect();
            Json(json!({
                "is_ok": true,
                "ResponsedAt": responsed_at(),
                "Count": list.len(),
                "Total": list.len(),
                "From": 0,
                "Bills": list,
            }))
            .into_response()
        }
        (("system", "1.0"), ["bill", "id", bill]) => {
            if !bill_perm {
                return forbidden();
            }
            match ds.bills.iter().find(|b| b.bill_id.to_string() == *bill) {
                Some(b) => Json(json!({
                    "is_ok": true,
                    "ResponsedAt": responsed_at(),
                    "Count": 1,
                    "Bills": [ds.bill_json(b)],
                }))
                .into_response(),
                None => not_found(),
            }
        }
        (("system", "1.0"), ["billdetail", member, bill, tail @ ..])
            if tail.is_empty() || tail == ["csv"] =>
        {
            if !bill_perm {
                return forbidden();
            }
            if *member != ds.member_code {
                return not_found();
            }
            let Some(b) = ds.bills.iter().find(|b| b.bill_id.to_string() == *bill) else {
                return not_found();
            };
            let withheld = state
                .withheld
                .lock()
                .ok()
                .and_then(|w| w.get(&b.bill_id).copied())
                .unwrap_or(0);
            let total = b.lines.len().saturating_sub(withheld);
            let cap = state.detail_page_size.load(Ordering::Relaxed);
            let (from, count) = page_of(query.as_deref(), cap, total);
            let mut page = b.clone();
            page.lines = b.lines[..total]
                .iter()
                .skip(from)
                .take(count)
                .cloned()
                .collect();
            if tail.is_empty() {
                let details = ds.details_json(&page);
                Json(json!({
                    "is_ok": true,
                    "ResponsedAt": responsed_at(),
                    "Total": total,
                    "From": from,
                    "Count": details.len(),
                    "BillDetails": details,
                }))
                .into_response()
            } else {
                let body = ds.details_csv(&page, state.csv_header.load(Ordering::Relaxed));
                Json(json!({
                    "is_ok": true,
                    "ResponsedAt": responsed_at(),
                    "Total": total,
                    "From": from,
                    "Count": page.lines.len(),
                    "Filename": format!("sakura_cloud_{}_{:04}{:02}.csv", b.bill_id, b.month.year, b.month.month),
                    "Body": body,
                }))
                .into_response()
            }
        }
        _ => not_found(),
    }
}

/// The JST billing date a generated or fixture bill uses for `month` (the 10th, 00:00 JST).
pub fn billing_date(month: Month) -> DateTime<Utc> {
    month.start_utc() + Duration::days(9)
}
