//! A loopback simulator of SoftLayer's REST v3.1 billing calls.
//!
//! It serves invoices and their top-level items from a dataset, so paging, cursors, credits,
//! open invoices and attribution can be tested end to end without an account:
//!
//! * `GET /SoftLayer_Account/getInvoices.json` honours the object filter's
//!   `invoices.id.operation` (`> N`, `>= N`, `< N`, `<= N`, `N`) and
//!   `invoices.statusCode.operation` (equality), and `resultLimit=<offset>,<limit>`; the
//!   `SoftLayer-Total-Items` header carries the filtered total. Rows come in `createDate`
//!   order, then `id` (as the provider's filter asks).
//! * `GET /SoftLayer_Billing_Invoice/{id}/getInvoiceTopLevelItems.json`: the invoice's items,
//!   by id, paged the same way; nested `billingItem.orderItem.order.userRecord` and `children`.
//!
//! **Object masks are applied** to every answer, as SoftLayer does: only the properties the
//! `objectMask` names come back, at every depth (`mask[id,billingItem[id,orderItem[id]]]`);
//! a count property (`childrenCount`) is computed from the list it counts. A property the
//! provider reads but its mask forgets is therefore missing here too. Without a mask the
//! dataset is sent whole.
//! * `GET /SoftLayer_Account/getNextInvoiceTopLevelBillingItems.json`: the next-invoice items.
//! * `GET /SoftLayer_Account/getObject.json`: `{"id": <account id>}`.
//!
//! Amounts keep the fixtures' mixed encodings: strings (`"18.03"`), JSON numbers (`55.5`) and
//! leading-dot strings (`".048"`). Errors use SoftLayer's body `{"error": …, "code": …}`: a bad
//! Basic user/key answers 401 `SoftLayer_Exception_Public` "Access Denied."; an unknown method
//! 404 with the fixture's message shape; an unknown invoice 404 `SoftLayer_Exception_ObjectNotFound`.
//! Faults (rate-limit exception, 5xx, any exception body) are injected through
//! [`SoftlayerSimHandle`], which also records every request.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::{DateTime, Duration, FixedOffset, Months, TimeZone};
use rust_decimal::Decimal;
use serde_json::{json, Map, Number, Value};

/// `getNextInvoiceTopLevelBillingItems` as posted on Stack Overflow (no mask; `".048"`).
pub const FIXTURE_NEXT_ITEMS: &str =
    include_str!("data/softlayer/SoftLayer_Account.getNextInvoiceTopLevelBillingItems.json");
/// `getAllTopLevelBillingItems` with an orderItem/userRecord mask (softlayer-python fixture).
pub const FIXTURE_ALL_ITEMS: &str =
    include_str!("data/softlayer/SoftLayer_Account.getAllTopLevelBillingItems.json");
/// `getInvoices` (softlayer-python fixture).
pub const FIXTURE_INVOICES: &str =
    include_str!("data/softlayer/SoftLayer_Account.getInvoices.json");
/// `getBillingInfo` (softlayer-python fixture).
pub const FIXTURE_BILLING_INFO: &str =
    include_str!("data/softlayer/SoftLayer_Account.getBillingInfo.json");
/// `getInvoiceTopLevelItems` with children (softlayer-python fixture; strings and numbers).
pub const FIXTURE_TOP_LEVEL_ITEMS: &str =
    include_str!("data/softlayer/SoftLayer_Billing_Invoice.getInvoiceTopLevelItems.json");
/// `SoftLayer_Billing_Item::getObject` (softlayer-python fixture).
pub const FIXTURE_BILLING_ITEM: &str =
    include_str!("data/softlayer/SoftLayer_Billing_Item.getObject.json");
/// The SLDN example error body.
pub const FIXTURE_ERROR_PUBLIC: &str =
    include_str!("data/softlayer/error.SoftLayer_Exception_Public.json");

/// The rate-limit exception code.
pub const RATE_LIMIT_CODE: &str = "SoftLayer_Exception_WebService_RateLimitExceeded";
/// The rate-limit message SoftLayer sends (softlayer-go#75).
pub const RATE_LIMIT_MESSAGE: &str = "Rate limit of 50 requests for every 1 second(s) exceeded.";

/// One invoice: its header (as `getInvoices` sends it) and its top-level items (as
/// `getInvoiceTopLevelItems` sends them).
#[derive(Debug, Clone, PartialEq)]
pub struct SimInvoice {
    /// Invoice id.
    pub id: u64,
    /// The header object (`id`, `accountId`, `createDate`, `statusCode`, `typeCode`,
    /// `invoiceTotalAmount`, ...).
    pub header: Value,
    /// Top-level items, wire form.
    pub items: Vec<Value>,
}

/// The simulated account.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SoftlayerDataset {
    /// The account id (`getObject`, invoices' `accountId`).
    pub account_id: u64,
    /// Invoices, any order.
    pub invoices: Vec<SimInvoice>,
    /// `getNextInvoiceTopLevelBillingItems`, wire form.
    pub next_items: Vec<Value>,
}

/// Errors building a dataset from fixtures.
#[derive(Debug, thiserror::Error)]
#[error("softlayer simulator fixture: {0}")]
pub struct DatasetError(String);

/// How an amount is written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// A JSON string, `"18.03"`.
    Text,
    /// A JSON number, `55.5`.
    Number,
    /// A JSON string without the leading zero, `".048"` (falls back to text for |x| ≥ 1).
    LeadingDot,
}

/// An amount in the requested wire encoding (never through a float).
pub fn wire_amount(d: Decimal, encoding: Encoding) -> Value {
    let text = d.to_string();
    match encoding {
        Encoding::Text => Value::String(text),
        Encoding::Number => Number::from_str(&text)
            .map(Value::Number)
            .unwrap_or(Value::String(text)),
        Encoding::LeadingDot => {
            let dotted = if let Some(rest) = text.strip_prefix("-0.") {
                format!("-.{rest}")
            } else if let Some(rest) = text.strip_prefix("0.") {
                format!(".{rest}")
            } else {
                text
            };
            Value::String(dotted)
        }
    }
}

fn decimal_of(v: &Value) -> Option<Decimal> {
    let text = match v {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let text = if let Some(rest) = text.strip_prefix("-.") {
        format!("-0.{rest}")
    } else if let Some(rest) = text.strip_prefix('.') {
        format!("0.{rest}")
    } else {
        text
    };
    Decimal::from_str_exact(&text).ok()
}

fn line_amount(v: &Value) -> Decimal {
    [
        "recurringAfterTaxAmount",
        "oneTimeAfterTaxAmount",
        "setupAfterTaxAmount",
        "laborAfterTaxAmount",
    ]
    .iter()
    .filter_map(|k| v.get(*k).and_then(decimal_of))
    .sum()
}

/// A top-level item's own lines plus its children's, at every depth.
fn item_total(item: &Value) -> Decimal {
    let children: Decimal = item
        .get("children")
        .and_then(Value::as_array)
        .map(|c| c.iter().map(item_total).sum())
        .unwrap_or_default();
    line_amount(item) + children
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

/// What [`SoftlayerDataset::generate`] builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOptions {
    /// Seed of the generator.
    pub seed: u64,
    /// Number of invoices (the last is `OPEN`; every fifth is a `CREDIT`).
    pub invoices: usize,
    /// Top-level items per recurring invoice.
    pub items_per_invoice: usize,
    /// Distinct portal users the items are ordered by (`user-000`, ...).
    pub users: usize,
    /// Next-invoice billing items.
    pub next_items: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            seed: 7,
            invoices: 12,
            items_per_invoice: 8,
            users: 25,
            next_items: 10,
        }
    }
}

fn central(secs: i64) -> DateTime<FixedOffset> {
    let tz = FixedOffset::west_opt(6 * 3600).unwrap_or_else(|| FixedOffset::east_opt(0).unwrap());
    tz.timestamp_opt(secs, 0)
        .single()
        .unwrap_or_else(|| tz.timestamp_opt(0, 0).unwrap())
}

impl SoftlayerDataset {
    /// An empty account.
    pub fn new(account_id: u64) -> Self {
        SoftlayerDataset {
            account_id,
            ..Default::default()
        }
    }

    /// The fixtures as an account: one closed `RECURRING` invoice (id 1001) holding the
    /// documented `getInvoiceTopLevelItems` (no billing item: attributed to the account),
    /// plus the Stack Overflow next-invoice item. Its `invoiceTotalAmount` is the sum of the
    /// items and children (`85.96`). The account id is `getBillingInfo`'s `accountId` (123).
    pub fn from_fixtures() -> Result<Self, DatasetError> {
        let parse = |name: &str, text: &str| {
            serde_json::from_str::<Value>(text).map_err(|e| DatasetError(format!("{name}: {e}")))
        };
        let info = parse("getBillingInfo", FIXTURE_BILLING_INFO)?;
        let account_id = info
            .pointer("/0/accountId")
            .and_then(Value::as_u64)
            .ok_or_else(|| DatasetError("getBillingInfo has no accountId".into()))?;
        let items = match parse("getInvoiceTopLevelItems", FIXTURE_TOP_LEVEL_ITEMS)? {
            Value::Array(a) => a,
            _ => {
                return Err(DatasetError(
                    "getInvoiceTopLevelItems is not an array".into(),
                ))
            }
        };
        let next_items = match parse("getNextInvoiceTopLevelBillingItems", FIXTURE_NEXT_ITEMS)? {
            Value::Array(a) => a,
            _ => return Err(DatasetError("next items are not an array".into())),
        };
        let mut ds = SoftlayerDataset::new(account_id);
        ds.add_invoice(
            1001,
            "2024-07-04T00:17:42-06:00",
            "CLOSED",
            "RECURRING",
            items,
        );
        ds.next_items = next_items;
        Ok(ds)
    }

    /// Add an invoice; its `invoiceTotalAmount` is the signed sum of its lines (as a string).
    pub fn add_invoice(
        &mut self,
        id: u64,
        create_date: &str,
        status: &str,
        type_code: &str,
        items: Vec<Value>,
    ) {
        let total: Decimal = items.iter().map(item_total).sum();
        let header = json!({
            "id": id,
            "accountId": self.account_id,
            "createDate": create_date,
            "modifyDate": create_date,
            "statusCode": status,
            "typeCode": type_code,
            "invoiceTopLevelItemCount": items.len(),
            "invoiceTotalAmount": total.to_string(),
        });
        self.invoices.push(SimInvoice { id, header, items });
    }

    /// Close an open invoice (payment received).
    pub fn close_invoice(&mut self, id: u64) {
        for inv in &mut self.invoices {
            if inv.id == id {
                inv.header["statusCode"] = json!("CLOSED");
            }
        }
    }

    /// A deterministic account: `options.invoices` monthly invoices (ids rising by uneven
    /// steps, created on the 4th at 00:17:42 US Central), the last one `OPEN`, every fifth a
    /// `CREDIT` with negative amounts; items ordered by many users, every seventh item without
    /// an order item (attributed to the account), some with children, amounts in all three
    /// encodings.
    pub fn generate(options: &GenerateOptions) -> Self {
        let mut rng = SplitMix(options.seed);
        let mut ds = SoftlayerDataset::new(1_234_567);
        let mut id = 40_000_000u64;
        let mut item_id = 900_000_000u64;
        let first = central(1_735_971_462); // 2025-01-04T00:17:42-06:00
        let categories = [
            ("guest_core", "Computing Instance", "1 x 2.0 GHz Core"),
            ("ram", "RAM", "4 GB"),
            ("server", "Server", "Dual E5-2690 v3 (12 Cores, 2.60 GHz)"),
            (
                "storage_as_a_service",
                "Storage As A Service",
                "Endurance Storage",
            ),
            ("bandwidth", "Public Bandwidth", "250 GB Bandwidth"),
        ];
        let encodings = [Encoding::Text, Encoding::Number, Encoding::LeadingDot];
        let amount = |rng: &mut SplitMix, big: bool| {
            let cents = if big {
                rng.below(50_000) + 1
            } else {
                rng.below(99) + 1
            };
            Decimal::new(cents as i64, 2)
        };
        for n in 0..options.invoices {
            id += 1 + rng.below(1000);
            let created = first
                .checked_add_months(Months::new(n as u32))
                .unwrap_or(first);
            let credit = n % 5 == 4;
            let status = if n + 1 == options.invoices {
                "OPEN"
            } else {
                "CLOSED"
            };
            let count = if credit { 2 } else { options.items_per_invoice };
            let mut items = Vec::with_capacity(count);
            for k in 0..count {
                item_id += 1 + rng.below(50);
                let (code, name, desc) = categories[rng.below(categories.len() as u64) as usize];
                let enc = encodings[rng.below(3) as usize];
                let small = enc == Encoding::LeadingDot;
                let mut recurring = amount(&mut rng, !small);
                if credit {
                    recurring = -recurring;
                }
                let user = rng.below(options.users.max(1) as u64);
                let mut item = Map::new();
                item.insert("id".into(), json!(item_id));
                item.insert("invoiceId".into(), json!(id));
                item.insert("billingItemId".into(), json!(item_id + 7_000_000));
                item.insert("categoryCode".into(), json!(code));
                item.insert("category".into(), json!({"name": name}));
                item.insert("description".into(), json!(desc));
                item.insert("hostName".into(), json!(format!("host{k}")));
                item.insert("domainName".into(), json!("example.com"));
                item.insert("createDate".into(), json!(created.to_rfc3339()));
                item.insert(
                    "recurringAfterTaxAmount".into(),
                    wire_amount(recurring, enc),
                );
                item.insert("oneTimeAfterTaxAmount".into(), json!("0"));
                let order_item = if k % 7 == 6 {
                    Value::Null
                } else {
                    json!({"id": item_id + 1_000, "order": {"id": 5_000_000 + user,
                        "userRecordId": 100_000 + user,
                        "userRecord": {"id": 100_000 + user, "username": format!("user-{user:03}")}}})
                };
                let mut billing_item = json!({"id": item_id + 7_000_000});
                if !order_item.is_null() {
                    billing_item["orderItem"] = order_item;
                }
                item.insert("billingItem".into(), billing_item);
                if !credit && k % 3 == 0 {
                    let child = amount(&mut rng, false);
                    item.insert(
                        "children".into(),
                        json!([{"id": item_id + 500_000_000, "categoryCode": "ram",
                            "category": {"name": "RAM"}, "description": "child",
                            "oneTimeAfterTaxAmount": wire_amount(Decimal::ZERO, Encoding::Number),
                            "recurringAfterTaxAmount": wire_amount(child, Encoding::LeadingDot)}]),
                    );
                }
                items.push(Value::Object(item));
            }
            let type_code = if credit { "CREDIT" } else { "RECURRING" };
            ds.add_invoice(id, &created.to_rfc3339(), status, type_code, items);
        }
        let last = first
            .checked_add_months(Months::new(options.invoices as u32))
            .unwrap_or(first);
        for k in 0..options.next_items {
            let user = rng.below(options.users.max(1) as u64);
            let rate = Decimal::new(rng.below(90) as i64 + 10, 3);
            let hours = Decimal::from(rng.below(700) + 1);
            let charge = rate * hours;
            ds.next_items.push(json!({
                "id": 60_000_000 + k as u64,
                "categoryCode": "guest_core",
                "category": {"name": "Computing Instance"},
                "description": "1 x 2.0 GHz Core",
                "hostName": format!("next{k}"),
                "domainName": "example.com",
                "hourlyFlag": true,
                "hourlyRecurringFee": wire_amount(rate, Encoding::LeadingDot),
                "hoursUsed": hours.to_string(),
                "currentHourlyCharge": wire_amount(charge, Encoding::Text),
                "lastBillDate": (last - Duration::days(30)).to_rfc3339(),
                "nextBillDate": last.to_rfc3339(),
                "orderItem": {"id": 70_000 + k as u64, "order": {"id": 80_000 + k as u64,
                    "userRecordId": 100_000 + user,
                    "userRecord": {"id": 100_000 + user, "username": format!("user-{user:03}")}}},
            }));
        }
        ds
    }

    /// The signed amount a correct client books for one invoice: the sum of its lines and
    /// children, negative for a credit or refund.
    pub fn invoice_cost(&self, id: u64) -> Decimal {
        let Some(inv) = self.invoices.iter().find(|i| i.id == id) else {
            return Decimal::ZERO;
        };
        let sum: Decimal = inv.items.iter().map(item_total).sum();
        let t = inv.header["typeCode"].as_str().unwrap_or_default();
        if t == "CREDIT" || t == "REFUND" {
            -sum.abs()
        } else {
            sum
        }
    }

    /// Ids of the closed invoices, ascending.
    pub fn closed_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .invoices
            .iter()
            .filter(|i| {
                i.header["statusCode"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("CLOSED"))
            })
            .map(|i| i.id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// A failure the simulator answers instead of the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The rate-limit exception body (`SoftLayer_Exception_WebService_RateLimitExceeded`)
    /// with HTTP 500, as observed (softlayer-go#75).
    RateLimitException,
    /// HTTP 429 with `Retry-After: <secs>` and the rate-limit body.
    TooManyRequests {
        /// `Retry-After`, seconds.
        retry_after_secs: u64,
    },
    /// An HTTP status with a plain-text body (no exception object).
    Http(u16),
    /// An exception body `{"error": message, "code": code}` with this status.
    Exception {
        /// HTTP status.
        status: u16,
        /// The exception class.
        code: String,
        /// The message.
        message: String,
    },
    /// A raw body with this status (e.g. the SLDN fixture).
    Body {
        /// HTTP status.
        status: u16,
        /// The body, sent as JSON.
        body: String,
    },
}

/// One request the simulator received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedCall {
    /// `Service::method`, e.g. `SoftLayer_Account::getInvoices`.
    pub call: String,
    /// The init id (`SoftLayer_Billing_Invoice/{id}/…`).
    pub init_id: Option<u64>,
    /// Query parameters (`objectMask`, `objectFilter`, `resultLimit`).
    pub query: BTreeMap<String, String>,
    /// Whether the Basic credentials were right.
    pub authorized: bool,
}

#[derive(Debug)]
struct SimState {
    dataset: Mutex<SoftlayerDataset>,
    authorization: String,
    faults: Mutex<VecDeque<(Option<String>, Fault)>>,
    requests: AtomicUsize,
    calls: Mutex<Vec<RecordedCall>>,
}

/// Entry point of the simulator.
pub struct SoftlayerSim;

impl SoftlayerSim {
    /// Serve `dataset` on `127.0.0.1:<free port>` for Basic `username:api_key`, until the
    /// handle is dropped or shut down.
    pub async fn start(
        dataset: SoftlayerDataset,
        username: &str,
        api_key: &str,
    ) -> std::io::Result<SoftlayerSimHandle> {
        let state = Arc::new(SimState {
            dataset: Mutex::new(dataset),
            authorization: super::basic_auth_header(username, api_key),
            faults: Mutex::new(VecDeque::new()),
            requests: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(serve).with_state(state.clone());
        let server = super::Server::start("softlayer", app).await?;
        let addr = server.addr;
        Ok(SoftlayerSimHandle {
            url: format!("http://{addr}/rest/v3.1"),
            addr,
            state,
            server,
        })
    }
}

/// A running simulator. `url` is the `endpoint` to configure; dropping the handle stops it.
pub struct SoftlayerSimHandle {
    /// REST base (`http://127.0.0.1:<port>/rest/v3.1`).
    pub url: String,
    /// The bound address.
    pub addr: SocketAddr,
    state: Arc<SimState>,
    server: super::Server,
}

impl std::fmt::Debug for SoftlayerSimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftlayerSimHandle")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl SoftlayerSimHandle {
    /// A copy of the dataset being served.
    pub fn dataset(&self) -> SoftlayerDataset {
        self.state
            .dataset
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    /// Change the dataset while serving (new invoices, an invoice closing, ...).
    pub fn update(&self, f: impl FnOnce(&mut SoftlayerDataset)) {
        if let Ok(mut d) = self.state.dataset.lock() {
            f(&mut d);
        }
    }

    /// Answer the next `n` requests with `fault` (queued after earlier faults).
    pub fn fail_next(&self, n: usize, fault: Fault) {
        if let Ok(mut q) = self.state.faults.lock() {
            q.extend(std::iter::repeat_n((None, fault), n));
        }
    }

    /// Answer the next `n` requests of `call` (`SoftLayer_Account::getInvoices`, ...) with
    /// `fault`; other calls are served normally.
    pub fn fail_call(&self, call: &str, n: usize, fault: Fault) {
        if let Ok(mut q) = self.state.faults.lock() {
            q.extend(std::iter::repeat_n((Some(call.to_string()), fault), n));
        }
    }

    /// Requests received so far.
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

fn exception(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": message, "code": code}))).into_response()
}

fn fault_response(fault: Fault) -> Response {
    match fault {
        Fault::RateLimitException => exception(
            StatusCode::INTERNAL_SERVER_ERROR,
            RATE_LIMIT_CODE,
            RATE_LIMIT_MESSAGE,
        ),
        Fault::TooManyRequests { retry_after_secs } => {
            let mut h = HeaderMap::new();
            h.insert("retry-after", HeaderValue::from(retry_after_secs));
            (
                StatusCode::TOO_MANY_REQUESTS,
                h,
                Json(json!({"error": RATE_LIMIT_MESSAGE, "code": RATE_LIMIT_CODE})),
            )
                .into_response()
        }
        Fault::Http(status) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "simulated failure",
        )
            .into_response(),
        Fault::Exception {
            status,
            code,
            message,
        } => exception(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &code,
            &message,
        ),
        Fault::Body { status, body } => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [("content-type", "application/json")],
            body,
        )
            .into_response(),
    }
}

/// An object mask as a tree: each named property and the mask of its own properties (empty:
/// the property as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectMask(BTreeMap<String, ObjectMask>);

impl ObjectMask {
    /// Read `mask[a,b[c,d],e.f]` (the `mask` word is optional). `None` when it is not a mask.
    pub fn parse(text: &str) -> Option<ObjectMask> {
        let text = text.trim();
        let text = text.strip_prefix("mask").unwrap_or(text).trim_start();
        let mut chars = text.chars().peekable();
        if chars.next() != Some('[') {
            return None;
        }
        let mask = Self::parse_list(&mut chars)?;
        chars.all(char::is_whitespace).then_some(mask)
    }

    /// The properties up to the closing `]` (consumed).
    fn parse_list(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<ObjectMask> {
        let mut mask = ObjectMask::default();
        let mut name = String::new();
        loop {
            match chars.next()? {
                ',' => {
                    mask.add(&name, ObjectMask::default());
                    name.clear();
                }
                '[' => {
                    let sub = Self::parse_list(chars)?;
                    mask.add(&name, sub);
                    name.clear();
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                ']' => {
                    mask.add(&name, ObjectMask::default());
                    return Some(mask);
                }
                c if c.is_whitespace() => {}
                c => name.push(c),
            }
        }
    }

    /// Add `a.b.c` with `sub` as the mask of its last part, merging with what is there.
    fn add(&mut self, name: &str, sub: ObjectMask) {
        let name = name.trim();
        if name.is_empty() {
            return;
        }
        match name.split_once('.') {
            Some((head, rest)) => self.0.entry(head.to_string()).or_default().add(rest, sub),
            None => {
                let entry = self.0.entry(name.to_string()).or_default();
                for (k, v) in sub.0 {
                    entry.0.insert(k, v);
                }
            }
        }
    }

    /// `value` with only the masked properties, at every depth. A masked `xCount` missing from
    /// the data is the length of the list `x`.
    pub fn apply(&self, value: &Value) -> Value {
        match value {
            Value::Array(items) => Value::Array(items.iter().map(|v| self.apply(v)).collect()),
            Value::Object(obj) => {
                let mut out = Map::new();
                for (name, sub) in &self.0 {
                    let kept = match obj.get(name) {
                        Some(v) if sub.0.is_empty() => Some(v.clone()),
                        Some(v) => Some(sub.apply(v)),
                        None => name.strip_suffix("Count").map(|list| match obj.get(list) {
                            Some(Value::Array(a)) => json!(a.len()),
                            _ => json!(0),
                        }),
                    };
                    if let Some(v) = kept {
                        out.insert(name.clone(), v);
                    }
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }
}

/// The request's `objectMask` applied to `value` (unchanged without a mask).
fn masked(value: Value, query: &BTreeMap<String, String>) -> Value {
    match query.get("objectMask").and_then(|m| ObjectMask::parse(m)) {
        Some(mask) => mask.apply(&value),
        None => value,
    }
}

/// `"offset,limit"` → (offset, limit).
fn result_limit(query: &BTreeMap<String, String>) -> Option<(usize, usize)> {
    let text = query.get("resultLimit")?;
    let (o, l) = text.split_once(',')?;
    Some((o.trim().parse().ok()?, l.trim().parse().ok()?))
}

/// Apply a `resultLimit` and add the total header.
fn paged(rows: Vec<Value>, query: &BTreeMap<String, String>) -> Response {
    let total = rows.len();
    let rows: Vec<Value> = match result_limit(query) {
        Some((offset, limit)) => rows.into_iter().skip(offset).take(limit).collect(),
        None => rows,
    };
    let mut h = HeaderMap::new();
    h.insert("softlayer-total-items", HeaderValue::from(total));
    (h, Json(masked(Value::Array(rows), query))).into_response()
}

/// Does `id` pass an object-filter operation such as `"> 123"`?
fn id_matches(operation: &Value, id: u64) -> bool {
    let text = match operation {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        _ => return true,
    };
    let (op, rest) = [">=", "<=", "!=", ">", "<"]
        .iter()
        .find_map(|op| text.strip_prefix(op).map(|r| (*op, r.trim())))
        .unwrap_or(("=", text.as_str()));
    let Ok(n) = rest.parse::<u64>() else {
        return true; // SoftLayer ignores filters it cannot use
    };
    match op {
        ">=" => id >= n,
        "<=" => id <= n,
        "!=" => id != n,
        ">" => id > n,
        "<" => id < n,
        _ => id == n,
    }
}

fn list_invoices(ds: &SoftlayerDataset, query: &BTreeMap<String, String>) -> Response {
    let filter: Value = query
        .get("objectFilter")
        .and_then(|f| serde_json::from_str(f).ok())
        .unwrap_or(Value::Null);
    let id_op = filter.pointer("/invoices/id/operation").cloned();
    let status_op = filter
        .pointer("/invoices/statusCode/operation")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut invoices: Vec<&SimInvoice> = ds
        .invoices
        .iter()
        .filter(|i| id_op.as_ref().is_none_or(|op| id_matches(op, i.id)))
        .filter(|i| {
            status_op
                .as_ref()
                .is_none_or(|s| i.header["statusCode"].as_str() == Some(s.as_str()))
        })
        .collect();
    invoices.sort_by_key(|i| {
        let created = i.header["createDate"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp())
            .unwrap_or_default();
        (created, i.id)
    });
    paged(
        invoices.into_iter().map(|i| i.header.clone()).collect(),
        query,
    )
}

async fn serve(
    State(state): State<Arc<SimState>>,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == state.authorization);
    let path = uri.path();
    let rest = path
        .strip_prefix("/rest/v3.1/")
        .or_else(|| path.strip_prefix("/rest/v3/"))
        .unwrap_or(path.trim_start_matches('/'));
    let rest = rest.strip_suffix(".json").unwrap_or(rest);
    let parts: Vec<&str> = rest.split('/').collect();
    let (service, init_id, method) = match parts.as_slice() {
        [service, method] => (*service, None, *method),
        [service, id, method] => (*service, id.parse::<u64>().ok(), *method),
        _ => ("", None, ""),
    };
    let call = format!("{service}::{method}");
    if let Ok(mut calls) = state.calls.lock() {
        calls.push(RecordedCall {
            call: call.clone(),
            init_id,
            query: query.clone(),
            authorized,
        });
    }
    let fault = state.faults.lock().ok().and_then(|mut q| {
        let at = q
            .iter()
            .position(|(c, _)| c.as_deref().is_none_or(|c| c == call))?;
        q.remove(at).map(|(_, f)| f)
    });
    if let Some(fault) = fault {
        return fault_response(fault);
    }
    if !authorized {
        return exception(
            StatusCode::UNAUTHORIZED,
            "SoftLayer_Exception_Public",
            "Access Denied. ",
        );
    }
    let Ok(ds) = state.dataset.lock() else {
        return exception(
            StatusCode::INTERNAL_SERVER_ERROR,
            "SoftLayer_Exception_Public",
            "Internal Error",
        );
    };
    match (service, method) {
        ("SoftLayer_Account", "getInvoices") => list_invoices(&ds, &query),
        ("SoftLayer_Account", "getObject") => {
            Json(masked(json!({"id": ds.account_id}), &query)).into_response()
        }
        ("SoftLayer_Account", "getNextInvoiceTopLevelBillingItems") => {
            Json(masked(Value::Array(ds.next_items.clone()), &query)).into_response()
        }
        ("SoftLayer_Billing_Invoice", "getInvoiceTopLevelItems") => {
            match init_id.and_then(|id| ds.invoices.iter().find(|i| i.id == id)) {
                Some(inv) => {
                    let mut items = inv.items.clone();
                    items.sort_by_key(|i| i.get("id").and_then(Value::as_u64).unwrap_or(0));
                    paged(items, &query)
                }
                None => exception(
                    StatusCode::NOT_FOUND,
                    "SoftLayer_Exception_ObjectNotFound",
                    &format!(
                        "Unable to find object with id of '{}'.",
                        parts.get(1).unwrap_or(&"")
                    ),
                ),
            }
        }
        _ => exception(
            StatusCode::NOT_FOUND,
            "SoftLayer_Exception_Public",
            &format!("Function (\"{method}\") is not a valid method for this service."),
        ),
    }
}
