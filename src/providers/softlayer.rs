//! SoftLayer (IBM Cloud classic infrastructure): invoices over REST v3.1, basic auth.
//!
//! SoftLayer has a real invoice API, so the source of truth is the **closed invoice**; the
//! next-invoice forecast is only an optional estimate. That shapes everything here:
//!
//! * **Listing.** `SoftLayer_Account::getInvoices` with an object filter `id > <cursor>`,
//!   paged with `resultLimit=<offset>,<limit>` until the `SoftLayer-Total-Items` header total
//!   is reached, or, without that header, until an empty page (a short page may be the
//!   server's own cap, not the end); a page of rows already read, or more than `max_pages`
//!   pages, is an error. SLDN states that one property cannot be
//!   both filtered and sorted, so the filter is on `id` and the server sort on `createDate`
//!   ASC; the client then de-duplicates by id, checks that it saw as many distinct invoices as
//!   the total header announced (an unstable server order across pages would otherwise lose
//!   rows silently) and sorts by id itself.
//! * **Finality.** Every line is final when it is read, whatever the invoice's `statusCode`:
//!   that code tracks *payment* (`OPEN` = SoftLayer has not received payment, `CLOSED` = paid,
//!   `CLOSED_FAILED` = closed without payment; softlayer-go `Billing_Invoice.StatusCode`), not
//!   whether the lines may change. An invoice's lines are a copy of the billing items made when
//!   SoftLayer creates it (`Billing_Invoice_Item`), and corrections come as invoices of their
//!   own (`CREDIT`, `REFUND`; reference 1.9). Holding an unpaid invoice's lines until the
//!   reseller pays SoftLayer delayed its customers' bills by SoftLayer's payment terms, and
//!   never sent them for an invoice that stays unpaid; re-reading an open invoice would also
//!   count an in-place change beside the refund that carries it. No server-side status
//!   filter either (an invoice with a lower id may close after one with a higher id).
//! * **Cursor** (stream `invoices`): the highest invoice id read and staged, open or closed:
//!   every invoice is read once. An invoice's items must number its
//!   `invoiceTopLevelItemCount`: fewer is an error naming the invoice (nothing of it staged,
//!   the cursor stays below it, the next run reads it again), so a read that caught an invoice
//!   while its lines were still being written is never taken as the whole invoice.
//! * **One chunk per invoice.** Its top-level items are paged too (`resultLimit`), so memory
//!   is one invoice at a time.
//! * **Natural key** (reference 1.9): `(invoice_id, invoice_item_id)` of the top-level item.
//! * **Amounts.** `recurringAfterTaxAmount + oneTimeAfterTaxAmount + setupAfterTaxAmount +
//!   laborAfterTaxAmount` of the top-level line
//!   **plus the same of each child, at every depth** (children's children are read too, and
//!   a `childrenCount` above what came is an error): the `*AfterTaxAmount` fields cover one line only, never
//!   its children (the documentation example: a parent `18.03` with children `10.00` and
//!   `2.33`), so adding them never double counts; one record per top-level item keeps the
//!   seed's "item with children" granularity. After-tax, because that is what was billed.
//!   The invoice's `invoiceTotalAmount` is compared with the sum and a mismatch is logged.
//! * **Credits.** `CREDIT` and `REFUND` invoices are corrections: every line becomes a
//!   negative record (`-|amount|`, whatever sign the wire used). `MANUAL_PAYMENT_CREDIT`
//!   records a payment, not usage, and yields no records. Other types keep the wire's sign.
//! * **Period.** `[invoice createDate, + 1 month)` in UTC: SoftLayer bills monthly on the
//!   account's anniversary day and sends offset-bearing times (US Central by default).
//! * **Attribution** (seed `000_…`): `billingItem.orderItem.order.userRecord.username`; an
//!   item without an order item (the seed warns they exist) or without a user is kept and
//!   attributed to the account (`attributes.attributed_to_account = "true"`).
//! * **Provisional estimates** (optional): `getNextInvoiceTopLevelBillingItems` with the
//!   seed's mask, stream `next_invoice`, never final, keyed by `(billing_item_id,
//!   next_bill_date)`; a new billing cycle yields new keys, so an estimate is never merged
//!   into an invoice line. Mark them apart in mappings (`attributes.record_kind = estimate`).
//! * **Money** is read from its JSON text (strings, numbers, `".048"`) into [`Decimal`].
//! * **Errors.** The body `{"error": "...", "code": "SoftLayer_Exception_..."}` becomes
//!   [`ProviderError::Api`] naming the call; `SoftLayer_Exception_WebService_RateLimitExceeded`
//!   and HTTP 429 are retried (honouring `Retry-After`), other exceptions fail at once; 5xx
//!   without an exception body and network failures are retried; 401/403 fail clearly.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Months, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use crate::config::Secret;
use crate::http::{self, RetryPolicy};
use crate::providers::http::{describe_reqwest, send_with_retry, Attempt};
use crate::providers::{Chunk, Cursors, Page, Provider, ProviderError};
use crate::record::{Name, RawJson, Text, UsageRecord};
use compact_str::ToCompactString;

/// The provider kind, also the `provider` field of every record.
pub const KIND: &str = "softlayer";
/// Cursor stream of closed invoices.
pub const STREAM_INVOICES: &str = "invoices";
/// Stream of the next-invoice estimates (never has a cursor).
pub const STREAM_NEXT: &str = "next_invoice";
/// `SoftLayer_Account::getInvoices`.
pub const CALL_INVOICES: &str = "SoftLayer_Account::getInvoices";
/// `SoftLayer_Billing_Invoice::getInvoiceTopLevelItems`.
pub const CALL_ITEMS: &str = "SoftLayer_Billing_Invoice::getInvoiceTopLevelItems";
/// `SoftLayer_Account::getNextInvoiceTopLevelBillingItems`.
pub const CALL_NEXT: &str = "SoftLayer_Account::getNextInvoiceTopLevelBillingItems";
/// `SoftLayer_Account::getObject` (the account id).
pub const CALL_ACCOUNT: &str = "SoftLayer_Account::getObject";
/// The exception code of SoftLayer's rate limit ("Rate limit of 50 requests for every 1
/// second(s) exceeded.").
pub const RATE_LIMIT_CODE: &str = "SoftLayer_Exception_WebService_RateLimitExceeded";

/// Object mask of the invoice listing.
pub const INVOICE_MASK: &str = "mask[id,accountId,createDate,modifyDate,closedDate,statusCode,\
typeCode,invoiceTotalAmount,invoiceTopLevelItemCount]";
/// Object mask of an invoice's top-level items: amounts, naming, children and their own
/// children (a server's components and their sub-items), `childrenCount` at every level (so a
/// level deeper than this mask reaches is an error, not lost lines) and the seed's per-user
/// chain `billingItem.orderItem.order.userRecord.username` (relational ids included, as the
/// seed says masks need them).
pub const ITEM_MASK: &str = "mask[id,invoiceId,billingItemId,parentId,categoryCode,description,\
hostName,domainName,createDate,hourlyFlag,hourlyRecurringFee,recurringFee,\
oneTimeAfterTaxAmount,recurringAfterTaxAmount,setupAfterTaxAmount,laborAfterTaxAmount,\
category[name],location[name],\
billingItem[id,orderItem[id,order[id,userRecordId,userRecord[id,username]]]],\
childrenCount,\
children[id,billingItemId,categoryCode,description,oneTimeAfterTaxAmount,\
recurringAfterTaxAmount,setupAfterTaxAmount,laborAfterTaxAmount,category[name],childrenCount,\
children[id,billingItemId,categoryCode,description,oneTimeAfterTaxAmount,\
recurringAfterTaxAmount,setupAfterTaxAmount,laborAfterTaxAmount,category[name],childrenCount]]]";
/// Object mask of the next-invoice items: the seed's mask
/// (`mask[id,orderItem[id,order[userRecordId,userRecord[username]]],invoiceItem[id,totalRecurringAmount]]`)
/// plus the local properties an estimate needs.
pub const NEXT_MASK: &str = "mask[id,categoryCode,description,hostName,domainName,createDate,\
cancellationDate,cycleStartDate,lastBillDate,nextBillDate,hourlyFlag,hoursUsed,\
hourlyRecurringFee,currentHourlyCharge,recurringFee,oneTimeFee,setupFee,laborFee,\
nextInvoiceTotalRecurringAmount,nextInvoiceTotalOneTimeAmount,\
nextInvoiceTotalRecurringTaxAmount,nextInvoiceTotalOneTimeTaxAmount,category[name],\
location[name],orderItem[id,order[id,userRecordId,userRecord[id,username]]],\
invoiceItem[id,totalRecurringAmount]]";

/// Settings of one SoftLayer source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftlayerConfig {
    /// REST base URL; calls go to `{endpoint}/{Service}[/{id}]/{method}.json`. The private
    /// network endpoint is `https://api.service.softlayer.com/rest/v3.1`.
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// API user name (HTTP Basic user).
    pub username: String,
    /// API key of that user (HTTP Basic password; `env:NAME` or `file:/path`). The user needs
    /// "view account summary" (`ACCOUNT_SUMMARY_VIEW`).
    pub api_key: Secret,
    /// Rows per request (`resultLimit`), for invoices and for invoice items.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Most pages one listing may take; a listing still not at its end after that many is an
    /// error (a server that never ends a listing), not an endless loop.
    #[serde(default = "default_max_pages")]
    pub max_pages: u32,
    /// Only invoices created at or after this time yield records; older ones are skipped (the
    /// cursor still moves past them). All invoices when absent.
    #[serde(default)]
    pub start: Option<DateTime<Utc>>,
    /// Timeout of one HTTP request.
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    /// Retries of transient failures (network, 5xx, 429, the rate-limit exception).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Also pull the next invoice's items (`getNextInvoiceTopLevelBillingItems`) as provisional
    /// estimates. They are never final.
    #[serde(default)]
    pub provisional: bool,
    /// Let the pipeline send records that are not final: the next-invoice estimates (invoice
    /// lines are final when read, paid or not). Estimates and invoice lines have different
    /// keys: map estimates to a separate metric (`attributes.record_kind = estimate`) or they
    /// are billed twice.
    #[serde(default)]
    pub push_provisional: bool,
    /// `BillingCurrency` of the records (SoftLayer states amounts in USD).
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Only invoices created at least this long ago are read (the first younger one, and every
    /// invoice after it, waits for a later run). Every invoice is read once, so a read must not
    /// catch one while SoftLayer is still writing its lines, which the item count it announces
    /// cannot tell (it counts the lines there at the time). Default 1h.
    #[serde(
        default = "default_invoice_settle_delay",
        with = "crate::config::duration::chrono"
    )]
    pub settle_delay: chrono::Duration,
}

fn default_endpoint() -> String {
    "https://api.softlayer.com/rest/v3.1".into()
}

fn default_page_size() -> u32 {
    100
}

fn default_max_pages() -> u32 {
    10_000
}

fn default_timeout() -> Duration {
    Duration::from_secs(120)
}

fn default_currency() -> String {
    "USD".into()
}

fn default_invoice_settle_delay() -> chrono::Duration {
    chrono::Duration::hours(1)
}

impl SoftlayerConfig {
    /// A configuration with every optional setting at its default (tests, simulators, demo).
    pub fn new(endpoint: impl Into<String>, username: impl Into<String>, api_key: Secret) -> Self {
        SoftlayerConfig {
            endpoint: endpoint.into(),
            username: username.into(),
            api_key,
            page_size: default_page_size(),
            max_pages: default_max_pages(),
            start: None,
            timeout: default_timeout(),
            retry: RetryPolicy::default(),
            provisional: false,
            push_provisional: false,
            currency: default_currency(),
            settle_delay: default_invoice_settle_delay(),
        }
    }
}

impl FromStr for SoftlayerConfig {
    type Err = String;

    /// Read a configuration from YAML text (tests and examples).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }
}

/// The invoice fields a chunk carries from the listing to the fetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceHeader {
    /// Invoice id.
    pub id: u64,
    /// `accountId`, when the listing sent it.
    pub account_id: Option<u64>,
    /// `createDate`, in UTC.
    pub create_date: DateTime<Utc>,
    /// `createDate` as sent (with its offset), for audit.
    pub create_date_text: String,
    /// `statusCode` (`OPEN`, `CLOSED`, `CLOSED_FAILED`).
    pub status_code: String,
    /// `typeCode` (`NEW`, `RECURRING`, `ONE-TIME-CHARGE`, `CREDIT`, `REFUND`, ...).
    pub type_code: String,
    /// `invoiceTotalAmount` (after tax), when sent.
    pub total: Option<Decimal>,
}

impl InvoiceHeader {
    /// Read one element of `getInvoices`.
    pub fn from_value(v: &Value) -> Result<Self, String> {
        let id = v.get("id").and_then(id_of).ok_or_else(|| {
            format!(
                "invoice without a usable id: {}",
                http::snippet(&v.to_string())
            )
        })?;
        let text = v
            .get("createDate")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("invoice {id}: createDate is missing"))?;
        let create_date = time_of(text)
            .ok_or_else(|| format!("invoice {id}: createDate {text:?} is not a time"))?;
        let total = match v.get("invoiceTotalAmount") {
            None | Some(Value::Null) => None,
            Some(t) => Some(decimal_of(t).ok_or_else(|| {
                format!("invoice {id}: invoiceTotalAmount is not a decimal: {t}")
            })?),
        };
        let text_of = |name: &str| {
            v.get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .trim()
                .to_uppercase()
        };
        Ok(InvoiceHeader {
            id,
            account_id: v.get("accountId").and_then(id_of),
            create_date,
            create_date_text: text.to_string(),
            status_code: text_of("statusCode"),
            type_code: text_of("typeCode"),
            total,
        })
    }

    /// Closed (`CLOSED`, `CLOSED_FAILED`, ...): paid, or closed unpaid. Payment, not
    /// finality: every invoice's lines are final when read (module doc).
    pub fn is_closed(&self) -> bool {
        self.status_code.starts_with("CLOSED")
    }

    /// A credit or refund: its lines are negative records.
    pub fn is_credit(&self) -> bool {
        matches!(self.type_code.as_str(), "CREDIT" | "REFUND")
    }

    /// A payment record, not usage: no records.
    pub fn is_payment(&self) -> bool {
        self.type_code == "MANUAL_PAYMENT_CREDIT"
    }

    /// The charge period of its lines: `[createDate, createDate + 1 month)`, UTC.
    pub fn period(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        let end = self
            .create_date
            .checked_add_months(Months::new(1))
            .unwrap_or(self.create_date);
        (self.create_date, end)
    }
}

/// What the chunk of one invoice carries (`Chunk::detail`, as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InvoiceChunk {
    invoice: InvoiceHeader,
    /// The cursor after this invoice is staged: its id.
    cursor: Option<String>,
    /// Created before `start`: skip its items.
    skip: bool,
    /// `invoiceTopLevelItemCount` of the listing: the items a complete read brings.
    #[serde(default)]
    items: Option<u64>,
}

/// Everything the record builders need besides the item itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceContext {
    /// The configured source name.
    pub source: String,
    /// `BillingAccountId` (the invoice's `accountId`, else the account's id).
    pub account_id: String,
    /// `BillingCurrency`.
    pub currency: String,
    /// The invoice the items belong to.
    pub invoice: InvoiceHeader,
}

/// Context of next-invoice estimates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextContext {
    /// The configured source name.
    pub source: String,
    /// `BillingAccountId`.
    pub account_id: String,
    /// `BillingCurrency`.
    pub currency: String,
}

/// The SoftLayer provider: one configured source.
#[derive(Debug)]
pub struct SoftlayerProvider {
    name: String,
    config: SoftlayerConfig,
    base: String,
    client: reqwest::Client,
    account_id: Mutex<Option<String>>,
}

/// One page of a list call: rows and the `SoftLayer-Total-Items` header.
struct ListPage {
    rows: Vec<Value>,
    total: Option<u64>,
}

impl SoftlayerProvider {
    /// Validate the configuration and build the HTTP client.
    pub fn new(name: String, config: SoftlayerConfig) -> Result<Self, ProviderError> {
        let bad = |message: String| ProviderError::Config {
            provider: name.clone(),
            message,
        };
        let base = config.endpoint.trim().trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&format!("{base}/")).map_err(|e| {
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
        if config.username.trim().is_empty() {
            return Err(bad("username is empty".into()));
        }
        if config.api_key.expose().is_empty() {
            return Err(bad("api_key is empty".into()));
        }
        if config.page_size == 0 {
            return Err(bad("page_size must be at least 1".into()));
        }
        if config.max_pages == 0 {
            return Err(bad("max_pages must be at least 1".into()));
        }
        if config.push_provisional && config.provisional {
            warn!(source = %name, "softlayer: push_provisional with provisional estimates: map estimates (attributes.record_kind = estimate) apart from invoice lines, or they are billed twice; and an estimate whose period start SoftLayer moves within a cycle (lastBillDate) gets a new key, a second record rather than a correction");
        }
        Ok(SoftlayerProvider {
            client: http::client(config.timeout),
            name,
            config,
            base,
            account_id: Mutex::new(None),
        })
    }

    /// The configuration in effect.
    pub fn config(&self) -> &SoftlayerConfig {
        &self.config
    }

    fn url(&self, service_path: &str) -> String {
        format!("{}/{service_path}.json", self.base)
    }

    fn api_error(&self, call: &str, code: String, message: String) -> ProviderError {
        ProviderError::Api {
            provider: self.name.clone(),
            call: call.into(),
            code,
            message,
        }
    }

    fn shape(&self, call: &str, message: String) -> ProviderError {
        ProviderError::Shape {
            provider: self.name.clone(),
            call: call.into(),
            message,
        }
    }

    /// One HTTP exchange; classifies the outcome for the retry loop.
    async fn get_once(
        &self,
        call: &str,
        url: &str,
        query: &[(&str, String)],
    ) -> Result<(Value, Option<u64>), Attempt> {
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
            .get(url)
            .basic_auth(&self.config.username, Some(self.config.api_key.expose()))
            .query(query)
            .send()
            .await
            .map_err(|e| transport(describe_reqwest(&e)))?;
        let status = resp.status();
        let hint = http::retry_hint(status, resp.headers());
        let total = resp
            .headers()
            .get("softlayer-total-items")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
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
        let exception = exception_of(&text);
        if let Some((code, message)) = &exception {
            if code == RATE_LIMIT_CODE {
                return Err(Attempt::Retry {
                    error: self.api_error(call, code.clone(), message.clone()),
                    hint,
                });
            }
        }
        if status.as_u16() == 401 || status.as_u16() == 403 {
            let said = exception
                .map(|(code, message)| format!("{code}: {message}"))
                .unwrap_or_else(|| http::snippet(&text));
            return Err(Attempt::Fatal(http_error(format!(
                "authentication failed: the username or API key was rejected, or the user lacks \
                 \"view account summary\" (server said: {said})"
            ))));
        }
        if let Some((code, message)) = exception {
            // SoftLayer answers exceptions with 4xx/5xx, and sometimes with 200.
            return Err(Attempt::Fatal(self.api_error(call, code, message)));
        }
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(Attempt::Retry {
                error: http_error(http::snippet(&text)),
                hint,
            });
        }
        if !status.is_success() {
            return Err(Attempt::Fatal(http_error(http::snippet(&text))));
        }
        if text.trim().is_empty() {
            // An empty 200 is a known transient failure (softlayer-go treats it as an error).
            return Err(Attempt::Retry {
                error: self.shape(call, "the body is empty".into()),
                hint,
            });
        }
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            Attempt::Fatal(self.shape(
                call,
                format!("the body is not JSON ({e}): {}", http::snippet(&text)),
            ))
        })?;
        Ok((value, total))
    }

    /// A GET with retries.
    async fn get(
        &self,
        call: &str,
        service_path: &str,
        query: Vec<(&str, String)>,
    ) -> Result<(Value, Option<u64>), ProviderError> {
        let policy = self.config.retry.clone();
        let url = self.url(service_path);
        let (url, query) = (&url, &query);
        let attempt = || async move {
            debug!(source = %self.name, call, ?query, "softlayer: calling");
            self.get_once(call, url, query).await
        };
        send_with_retry(&policy, KIND, &self.name, call, attempt).await
    }

    /// One page of a list call.
    async fn list_page(
        &self,
        call: &str,
        service_path: &str,
        mask: &str,
        filter: &Value,
        offset: u64,
    ) -> Result<ListPage, ProviderError> {
        let query = vec![
            ("objectMask", mask.to_string()),
            ("objectFilter", filter.to_string()),
            ("resultLimit", format!("{offset},{}", self.config.page_size)),
        ];
        let (value, total) = self.get(call, service_path, query).await?;
        match value {
            Value::Array(rows) => Ok(ListPage { rows, total }),
            other => Err(self.shape(
                call,
                format!(
                    "expected an array, got {}",
                    http::snippet(&other.to_string())
                ),
            )),
        }
    }

    /// Every row of a list call, paged; de-duplicated by `id` and checked against the total
    /// header (the server order is not guaranteed stable across pages).
    ///
    /// A short page is not the end: SoftLayer may cap a page below the `resultLimit` asked
    /// for. With `SoftLayer-Total-Items` paging goes on until the announced total is reached;
    /// without it, until an empty page. A page that brings no row not already read (a server
    /// ignoring the offset) and more than `max_pages` pages are errors naming the call, never
    /// an endless loop and never a silent stop.
    async fn list_all(
        &self,
        call: &str,
        service_path: &str,
        mask: &str,
        filter: &Value,
    ) -> Result<Vec<Value>, ProviderError> {
        let mut rows: BTreeMap<u64, Value> = BTreeMap::new();
        let mut offset = 0u64;
        let mut announced = None;
        let mut pages = 0u32;
        loop {
            if pages >= self.config.max_pages {
                return Err(self.shape(
                    call,
                    format!(
                        "still not at the end after {pages} pages ({} rows, max_pages = {}): \
                         the listing does not end; nothing was staged",
                        rows.len(),
                        self.config.max_pages
                    ),
                ));
            }
            let page = self
                .list_page(call, service_path, mask, filter, offset)
                .await?;
            pages += 1;
            let n = page.rows.len() as u64;
            announced = page.total.or(announced);
            let mut fresh = 0u64;
            for row in page.rows {
                let id = row.get("id").and_then(id_of).ok_or_else(|| {
                    self.shape(
                        call,
                        format!(
                            "a row without a usable id: {}",
                            http::snippet(&row.to_string())
                        ),
                    )
                })?;
                if rows.insert(id, row).is_none() {
                    fresh += 1;
                }
            }
            if n == 0 {
                break;
            }
            if fresh == 0 {
                return Err(self.shape(
                    call,
                    format!(
                        "paging makes no progress: the page at offset {offset} holds {n} rows \
                         already read (the server ignores resultLimit?); nothing was staged"
                    ),
                ));
            }
            offset += n;
            if announced.is_some_and(|total| offset >= total) {
                break;
            }
        }
        if let Some(total) = announced {
            if (rows.len() as u64) < total {
                return Err(self.shape(
                    call,
                    format!(
                        "SoftLayer-Total-Items announced {total} rows but {} distinct ones came \
                         in {pages} pages (unstable order?); nothing was staged, run again",
                        rows.len()
                    ),
                ));
            }
        }
        debug!(source = %self.name, call, rows = rows.len(), pages, "softlayer: listed");
        Ok(rows.into_values().collect())
    }

    /// The account id (`SoftLayer_Account::getObject`), asked once per process.
    async fn account_id(&self) -> Result<String, ProviderError> {
        if let Some(id) = self.account_id.lock().ok().and_then(|g| g.clone()) {
            return Ok(id);
        }
        let (value, _) = self
            .get(
                CALL_ACCOUNT,
                "SoftLayer_Account/getObject",
                vec![("objectMask", "mask[id]".to_string())],
            )
            .await?;
        let id = value
            .get("id")
            .and_then(id_of)
            .ok_or_else(|| self.shape(CALL_ACCOUNT, "the account has no id".into()))?
            .to_string();
        if let Ok(mut g) = self.account_id.lock() {
            *g = Some(id.clone());
        }
        Ok(id)
    }

    async fn fetch_invoice(&self, detail: &InvoiceChunk) -> Result<Page, ProviderError> {
        let inv = &detail.invoice;
        if detail.skip || inv.is_payment() {
            debug!(source = %self.name, invoice = inv.id, type_code = %inv.type_code, "softlayer: invoice skipped");
            return Ok(Page {
                records: Vec::new(),
                cursor: detail.cursor.clone(),
                also: Vec::new(),
            });
        }
        let account_id = match inv.account_id {
            Some(id) => id.to_string(),
            None => self.account_id().await?,
        };
        let filter = json!({"invoiceTopLevelItems": {"id": {"operation": "orderBy",
            "options": [{"name": "sort", "value": ["ASC"]}]}}});
        let items = self
            .list_all(
                CALL_ITEMS,
                &format!(
                    "SoftLayer_Billing_Invoice/{}/getInvoiceTopLevelItems",
                    inv.id
                ),
                ITEM_MASK,
                &filter,
            )
            .await?;
        if let Some(announced) = detail.items {
            if (items.len() as u64) < announced {
                return Err(self.shape(
                    CALL_ITEMS,
                    format!(
                        "invoice {} announces {announced} top-level items \
                         (invoiceTopLevelItemCount) but {} came; nothing of it was staged and it \
                         is read again next run",
                        inv.id,
                        items.len()
                    ),
                ));
            }
        }
        let ctx = InvoiceContext {
            source: self.name.clone(),
            account_id,
            currency: self.config.currency.clone(),
            invoice: inv.clone(),
        };
        let records = parse_invoice_items(&Value::Array(items), &ctx)?;
        check_total(&records, &ctx);
        info!(source = %self.name, invoice = inv.id, status = %inv.status_code, type_code = %inv.type_code, records = records.len(), "softlayer: invoice fetched");
        Ok(Page {
            records,
            cursor: detail.cursor.clone(),
            also: Vec::new(),
        })
    }

    async fn fetch_next(&self) -> Result<Page, ProviderError> {
        let account_id = self.account_id().await?;
        let (value, _) = self
            .get(
                CALL_NEXT,
                "SoftLayer_Account/getNextInvoiceTopLevelBillingItems",
                vec![("objectMask", NEXT_MASK.to_string())],
            )
            .await?;
        let ctx = NextContext {
            source: self.name.clone(),
            account_id,
            currency: self.config.currency.clone(),
        };
        let records = parse_next_items(&value, &ctx)?;
        info!(source = %self.name, records = records.len(), "softlayer: next-invoice estimates fetched");
        Ok(Page {
            records,
            cursor: None,
            also: Vec::new(),
        })
    }
}

/// Log (not fail) when an invoice's stated total disagrees with its records.
fn check_total(records: &[UsageRecord], ctx: &InvoiceContext) {
    let Some(total) = ctx.invoice.total else {
        return;
    };
    match super::checked_sum(records.iter().map(|r| r.billed_cost)) {
        Some(sum) if sum.abs() == total.abs() => {}
        Some(sum) => {
            warn!(source = %ctx.source, invoice = ctx.invoice.id, %total, %sum, "softlayer: invoiceTotalAmount differs from the sum of its top-level items and children");
        }
        None => {
            warn!(source = %ctx.source, invoice = ctx.invoice.id, %total, "softlayer: invoiceTotalAmount differs from the sum of its top-level items and children (beyond the range of a decimal)");
        }
    }
}

/// The `(code, message)` of a SoftLayer error body `{"error": "...", "code": "..."}`.
pub fn exception_of(text: &str) -> Option<(String, String)> {
    let value: Value = serde_json::from_str(text).ok()?;
    let obj = value.as_object()?;
    let message = obj.get("error")?.as_str()?.to_string();
    let code = obj
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or("(no code)")
        .to_string();
    Some((code, message))
}

#[async_trait]
impl Provider for SoftlayerProvider {
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
        let after: u64 = match cursors.get(STREAM_INVOICES) {
            Some(text) => text.trim().parse().map_err(|_| ProviderError::Config {
                provider: self.name.clone(),
                message: format!("stored cursor {STREAM_INVOICES} = {text:?} is not an invoice id"),
            })?,
            None => 0,
        };
        let filter = json!({"invoices": {
            "id": {"operation": format!("> {after}")},
            "createDate": {"operation": "orderBy", "options": [{"name": "sort", "value": ["ASC"]}]},
        }});
        let rows = self
            .list_all(
                CALL_INVOICES,
                "SoftLayer_Account/getInvoices",
                INVOICE_MASK,
                &filter,
            )
            .await?;
        let mut headers = rows
            .iter()
            .map(|row| {
                let items = match row.get("invoiceTopLevelItemCount") {
                    None | Some(Value::Null) => None,
                    Some(n) => Some(id_of(n).ok_or_else(|| {
                        let id = row.get("id").unwrap_or(&Value::Null);
                        format!("invoice {id}: invoiceTopLevelItemCount {n} is not a count")
                    })?),
                };
                InvoiceHeader::from_value(row).map(|h| (h, items))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| self.shape(CALL_INVOICES, m))?;
        headers.retain(|(h, _)| h.id > after);
        headers.sort_by_key(|(h, _)| h.id);
        // An invoice younger than `settle_delay` may still be being written: it and every
        // invoice after it wait (the cursor never passes an invoice that was not read).
        if let Some(young) = headers
            .iter()
            .position(|(h, _)| now - h.create_date < self.config.settle_delay)
        {
            let (h, _) = &headers[young];
            info!(source = %self.name, invoice = h.id, created = %h.create_date,
                waiting = headers.len() - young, "softlayer: invoices created less than settle_delay ago wait for a later run");
            headers.truncate(young);
        }
        let mut chunks = Vec::with_capacity(headers.len() + 1);
        let mut open = 0usize;
        for (invoice, items) in headers {
            if !invoice.is_closed() {
                open += 1;
            }
            let (window_start, window_end) = invoice.period();
            let skip = self.config.start.is_some_and(|s| invoice.create_date < s);
            let detail = InvoiceChunk {
                cursor: Some(invoice.id.to_string()),
                skip,
                items,
                invoice,
            };
            chunks.push(Chunk {
                stream: STREAM_INVOICES.into(),
                window_start,
                window_end,
                detail: serde_json::to_string(&detail).map_err(|e| ProviderError::Config {
                    provider: self.name.clone(),
                    message: format!("cannot encode a chunk: {e}"),
                })?,
            });
        }
        let invoices = chunks.len();
        if self.config.provisional {
            chunks.push(Chunk {
                stream: STREAM_NEXT.into(),
                window_start: now,
                window_end: now,
                detail: String::new(),
            });
        }
        info!(source = %self.name, after, invoices, open, provisional = self.config.provisional, "softlayer: plan ready");
        Ok(chunks)
    }

    async fn fetch(&self, chunk: &Chunk, _now: DateTime<Utc>) -> Result<Page, ProviderError> {
        if chunk.stream == STREAM_NEXT {
            return self.fetch_next().await;
        }
        let detail: InvoiceChunk =
            serde_json::from_str(&chunk.detail).map_err(|e| ProviderError::Config {
                provider: self.name.clone(),
                message: format!("chunk detail is not an invoice chunk: {e}"),
            })?;
        self.fetch_invoice(&detail).await
    }

    fn push_provisional(&self) -> bool {
        self.config.push_provisional
    }
}

// ---------------------------------------------------------------------------------------------
// Wire values
// ---------------------------------------------------------------------------------------------

/// A decimal from a JSON string or number, read from its text (never through a float).
/// Accepts SoftLayer's leading-dot form (`".048"`, `"-.5"`). `null`, `""` and the SDK
/// placeholder `"None"` are absent (`None`).
pub fn decimal_of(value: &Value) -> Option<Decimal> {
    let text = match value {
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
    crate::record::exact_decimal(&text)
}

/// An id from a JSON number or string (`"53897671"`); `"None"` and `null` are absent.
pub fn id_of(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A SoftLayer time (ISO 8601 with offset) in UTC.
pub fn time_of(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A non-empty string field (`"None"` counts as absent).
fn text_field(v: &Value, name: &str) -> Option<String> {
    match v.get(name)? {
        Value::String(s) if !s.trim().is_empty() && s != "None" => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An optional decimal field: absent is `None`, present but unreadable is an error.
fn decimal_field(v: &Value, name: &str, site: &str) -> Result<Option<Decimal>, String> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() || s == "None" => Ok(None),
        Some(x) => decimal_of(x)
            .map(Some)
            .ok_or_else(|| format!("{site}: `{name}` is not a decimal: {x}")),
    }
}

/// Who an item is attributed to: `(sub_account_id, attribution)`.
///
/// `orderItem.order.userRecord.username`, else the user record's id (a mask without
/// `username`), else the account.
fn attribution(order_item: Option<&Value>, account_id: &str) -> (String, &'static str) {
    let order = order_item.and_then(|o| o.get("order"));
    let user = order.and_then(|o| o.get("userRecord"));
    if let Some(name) = user.and_then(|u| text_field(u, "username")) {
        return (name, "username");
    }
    if let Some(id) = user
        .and_then(|u| u.get("id"))
        .or_else(|| order.and_then(|o| o.get("userRecordId")))
        .and_then(id_of)
    {
        return (format!("user:{id}"), "user_id");
    }
    (account_id.to_string(), "account")
}

fn hourly(v: &Value) -> bool {
    match v.get("hourlyFlag") {
        Some(Value::Bool(b)) => *b,
        Some(x) => matches!(id_of(x), Some(1)),
        None => false,
    }
}

/// Common record fields of an invoice line or a billing item.
fn naming(v: &Value, attributes: &mut BTreeMap<Name, Text>) -> (String, String, Option<String>) {
    let category_code = text_field(v, "categoryCode");
    let category_name = v.get("category").and_then(|c| text_field(c, "name"));
    for (name, value) in [
        ("category_code", category_code.clone()),
        ("category_name", category_name.clone()),
        ("host_name", text_field(v, "hostName")),
        ("domain_name", text_field(v, "domainName")),
        (
            "location",
            v.get("location").and_then(|l| text_field(l, "name")),
        ),
    ] {
        if let Some(value) = value {
            attributes.insert(name.into(), value.into());
        }
    }
    let resource_type = category_code.clone().unwrap_or_else(|| "item".into());
    let service_name = category_name.unwrap_or_else(|| resource_type.clone());
    let fqdn = match (text_field(v, "hostName"), text_field(v, "domainName")) {
        (Some(h), Some(d)) => Some(format!("{h}.{d}")),
        (Some(h), None) => Some(h),
        _ => None,
    };
    (resource_type, service_name, fqdn)
}

// ---------------------------------------------------------------------------------------------
// Closed invoices
// ---------------------------------------------------------------------------------------------

/// The after-tax amounts of one line (children not included): SLDN documents a separate
/// "fee total after taxes" for the recurring, one-time, setup and labor fees.
const LINE_AMOUNTS: [&str; 4] = [
    "recurringAfterTaxAmount",
    "oneTimeAfterTaxAmount",
    "setupAfterTaxAmount",
    "laborAfterTaxAmount",
];

/// The sum of [`LINE_AMOUNTS`] of one line (children not included).
fn line_amount(v: &Value, site: &str) -> Result<Decimal, String> {
    let mut sum = None;
    for name in LINE_AMOUNTS {
        if let Some(d) = decimal_field(v, name, site)? {
            sum = Some(add(sum.unwrap_or(Decimal::ZERO), d, site)?);
        }
    }
    sum.ok_or_else(|| format!("{site}: none of {} is present", LINE_AMOUNTS.join(", ")))
}

/// `a + b`, or an error naming the line when the sum is beyond a decimal's range (`+` would
/// panic, ending every run at this invoice).
fn add(a: Decimal, b: Decimal, site: &str) -> Result<Decimal, String> {
    a.checked_add(b).ok_or_else(|| {
        format!("{site}: the amounts add up beyond the range of a decimal ({a} + {b})")
    })
}

/// How deep `children` may nest under a top-level item before the lines are refused.
const MAX_CHILD_DEPTH: usize = 16;

/// The cost of every line below `v` (children, their children, ...) and how many lines that
/// is. Each line's `*AfterTaxAmount` covers that line alone, so adding every level never
/// counts anything twice. A `childrenCount` larger than the children that came means lines the
/// mask did not reach (or a cut list): an error, never a silent shortfall.
fn descendants_cost(v: &Value, site: &str, depth: usize) -> Result<(Decimal, usize), String> {
    let list = match v.get("children") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(list)) => list.as_slice(),
        Some(_) => return Err(format!("{site}: children is not an array")),
    };
    if let Some(announced) = v.get("childrenCount").and_then(id_of) {
        if announced > list.len() as u64 {
            return Err(format!(
                "{site}: childrenCount is {announced} but {} children came; their lines would \
                 be lost (nested deeper than the object mask reaches?)",
                list.len()
            ));
        }
    }
    if !list.is_empty() && depth >= MAX_CHILD_DEPTH {
        return Err(format!(
            "{site}: children nested more than {MAX_CHILD_DEPTH} levels deep"
        ));
    }
    let mut cost = Decimal::ZERO;
    let mut lines = 0usize;
    for (i, child) in list.iter().enumerate() {
        let child_site = format!("{site} child {i}");
        let (below, below_lines) = descendants_cost(child, &child_site, depth + 1)?;
        let line = add(line_amount(child, &child_site)?, below, &child_site)?;
        cost = add(cost, line, site)?;
        lines += 1 + below_lines;
    }
    Ok((cost, lines))
}

/// One record from one top-level invoice item (see the module doc for every choice).
pub fn invoice_item_record(item: &Value, ctx: &InvoiceContext) -> Result<UsageRecord, String> {
    let inv = &ctx.invoice;
    let id = item
        .get("id")
        .and_then(id_of)
        .ok_or_else(|| format!("invoice {}: an item without a usable id", inv.id))?;
    let site = format!("invoice {} item {id}", inv.id);
    let own = line_amount(item, &site)?;
    let (children_cost, children) = descendants_cost(item, &site, 0)?;
    let mut cost = add(own, children_cost, &site)?;
    if inv.is_credit() {
        cost = -cost.abs();
    }

    let mut attributes: BTreeMap<Name, Text> = BTreeMap::new();
    let (resource_type, service_name, fqdn) = naming(item, &mut attributes);
    let billing_item = item.get("billingItem").filter(|b| b.is_object());
    let billing_item_id = item
        .get("billingItemId")
        .and_then(id_of)
        .or_else(|| billing_item.and_then(|b| b.get("id")).and_then(id_of));
    let (sub_account, how) = attribution(
        billing_item
            .and_then(|b| b.get("orderItem"))
            .filter(|o| o.is_object()),
        &ctx.account_id,
    );
    attributes.insert("attribution".into(), how.into());
    if how == "account" {
        attributes.insert("attributed_to_account".into(), "true".into());
    }
    attributes.insert("record_kind".into(), "invoice".into());
    attributes.insert("invoice_id".into(), inv.id.to_compact_string());
    attributes.insert("invoice_type".into(), inv.type_code.as_str().into());
    attributes.insert("invoice_status".into(), inv.status_code.as_str().into());
    attributes.insert(
        "invoice_create_date".into(),
        inv.create_date_text.as_str().into(),
    );
    attributes.insert("own_cost".into(), own.to_compact_string());
    attributes.insert("children_cost".into(), children_cost.to_compact_string());
    attributes.insert("children".into(), children.to_compact_string());
    if let Some(b) = billing_item_id {
        attributes.insert("billing_item_id".into(), b.to_compact_string());
    }
    if let Some(c) = text_field(item, "createDate") {
        attributes.insert("item_create_date".into(), c.into());
    }

    // Quantity: hours for an hourly line when recurringFee / hourlyRecurringFee is whole,
    // otherwise one line of the monthly cycle.
    let hours = match (
        hourly(item),
        decimal_field(item, "recurringFee", &site)?,
        decimal_field(item, "hourlyRecurringFee", &site)?,
    ) {
        // checked: a quotient beyond a decimal's range is not hours, and must not panic
        (true, Some(fee), Some(rate)) => fee.checked_div(rate).filter(|h| h.fract().is_zero()),
        _ => None,
    };
    let (quantity, unit) = match hours {
        Some(h) => (h.normalize(), "hours"),
        None => (Decimal::ONE, "month"),
    };
    let (start, end) = inv.period();
    Ok(UsageRecord {
        provider: KIND.into(),
        source: ctx.source.as_str().into(),
        billing_account_id: ctx.account_id.as_str().into(),
        sub_account_id: sub_account.into(),
        resource_id: billing_item_id
            .map(|b| format!("billing_item:{b}"))
            .unwrap_or_else(|| format!("invoice_item:{id}"))
            .into(),
        resource_name: fqdn.map(Text::from),
        sku_id: Some(resource_type.as_str().into()),
        resource_type: resource_type.into(),
        service_name: service_name.into(),
        charge_description: text_field(item, "description").map(Text::from),
        charge_period_start: start,
        charge_period_end: end,
        consumed_quantity: quantity,
        consumed_unit: unit.into(),
        billed_cost: cost,
        billing_currency: ctx.currency.as_str().into(),
        scope: ctx.account_id.as_str().into(),
        natural_key: vec![
            ("invoice_id".into(), inv.id.to_compact_string()),
            ("invoice_item_id".into(), id.to_compact_string()),
        ],
        // Final when read: `statusCode` is payment, not finality (module doc).
        is_final: true,
        attributes,
        raw: RawJson::from_value(item),
    })
}

/// Turn `getInvoiceTopLevelItems` (an array) into records, one per top-level item.
pub fn parse_invoice_items(
    items: &Value,
    ctx: &InvoiceContext,
) -> Result<Vec<UsageRecord>, ProviderError> {
    let shape = |message: String| ProviderError::Shape {
        provider: ctx.source.clone(),
        call: CALL_ITEMS.into(),
        message,
    };
    let list = items
        .as_array()
        .ok_or_else(|| shape("the items are not an array".into()))?;
    list.iter()
        .map(|item| invoice_item_record(item, ctx).map_err(shape))
        .collect()
}

/// Parse `getInvoiceTopLevelItems` given as JSON text.
pub fn parse_invoice_items_str(
    text: &str,
    ctx: &InvoiceContext,
) -> Result<Vec<UsageRecord>, ProviderError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ProviderError::Shape {
        provider: ctx.source.clone(),
        call: CALL_ITEMS.into(),
        message: format!("not JSON: {e}"),
    })?;
    parse_invoice_items(&value, ctx)
}

// ---------------------------------------------------------------------------------------------
// Next-invoice estimates
// ---------------------------------------------------------------------------------------------

/// The estimated amount of a billing item on the next invoice and where it came from:
/// `nextInvoiceTotal{Recurring,OneTime}[Tax]Amount` when masked (includes children), else
/// `currentHourlyCharge` for an hourly item, else `recurringFee + oneTimeFee + setupFee +
/// laborFee`.
fn estimate(v: &Value, site: &str) -> Result<(Decimal, &'static str), String> {
    let mut next = None;
    for name in [
        "nextInvoiceTotalRecurringAmount",
        "nextInvoiceTotalOneTimeAmount",
        "nextInvoiceTotalRecurringTaxAmount",
        "nextInvoiceTotalOneTimeTaxAmount",
    ] {
        if let Some(d) = decimal_field(v, name, site)? {
            next = Some(add(next.unwrap_or(Decimal::ZERO), d, site)?);
        }
    }
    if let Some(d) = next {
        return Ok((d, "next_invoice_total"));
    }
    let is_hourly = hourly(v) || v.get("hoursUsed").is_some_and(|h| decimal_of(h).is_some());
    if is_hourly {
        if let Some(d) = decimal_field(v, "currentHourlyCharge", site)? {
            return Ok((d, "current_hourly_charge"));
        }
    }
    // The setup and labor fees are one-time fees too (SLDN), counted like invoice lines count
    // setupAfterTaxAmount and laborAfterTaxAmount.
    let mut sum = None;
    for name in ["recurringFee", "oneTimeFee", "setupFee", "laborFee"] {
        if let Some(d) = decimal_field(v, name, site)? {
            sum = Some(add(sum.unwrap_or(Decimal::ZERO), d, site)?);
        }
    }
    let sum = sum.ok_or_else(|| {
        format!(
            "{site}: no amount (nextInvoiceTotal*, currentHourlyCharge, recurringFee, \
             oneTimeFee, setupFee, laborFee)"
        )
    })?;
    Ok((sum, "fees"))
}

/// One provisional record from one `SoftLayer_Billing_Item` of the next invoice.
pub fn billing_item_record(item: &Value, ctx: &NextContext) -> Result<UsageRecord, String> {
    let id = item
        .get("id")
        .and_then(id_of)
        .ok_or_else(|| "a billing item without a usable id".to_string())?;
    let site = format!("billing item {id}");
    let (cost, source) = estimate(item, &site)?;
    let time = |name: &str| -> Result<Option<DateTime<Utc>>, String> {
        match text_field(item, name) {
            None => Ok(None),
            Some(t) => time_of(&t)
                .map(Some)
                .ok_or_else(|| format!("{site}: `{name}` {t:?} is not a time")),
        }
    };
    let start = match time("lastBillDate")? {
        Some(t) => t,
        None => match time("cycleStartDate")? {
            Some(t) => t,
            None => time("createDate")?.ok_or_else(|| {
                format!("{site}: none of lastBillDate, cycleStartDate, createDate is present")
            })?,
        },
    };
    let end = match time("nextBillDate")? {
        Some(t) if t > start => t,
        _ => start.checked_add_months(Months::new(1)).unwrap_or(start),
    };
    let mut attributes: BTreeMap<Name, Text> = BTreeMap::new();
    let (resource_type, service_name, fqdn) = naming(item, &mut attributes);
    let (sub_account, how) = attribution(
        item.get("orderItem").filter(|o| o.is_object()),
        &ctx.account_id,
    );
    attributes.insert("attribution".into(), how.into());
    if how == "account" {
        attributes.insert("attributed_to_account".into(), "true".into());
    }
    attributes.insert("record_kind".into(), "estimate".into());
    attributes.insert("amount_source".into(), source.into());
    attributes.insert("billing_item_id".into(), id.to_compact_string());
    if let Some(c) = text_field(item, "cancellationDate") {
        attributes.insert("cancellation_date".into(), c.into());
    }
    if let Some(total) = item
        .get("invoiceItem")
        .and_then(|i| i.get("totalRecurringAmount"))
        .and_then(decimal_of)
    {
        attributes.insert(
            "invoice_item_total_recurring_amount".into(),
            total.to_compact_string(),
        );
    }
    let (quantity, unit) = match decimal_field(item, "hoursUsed", &site)? {
        Some(h) => (h, "hours"),
        None => (Decimal::ONE, "month"),
    };
    Ok(UsageRecord {
        provider: KIND.into(),
        source: ctx.source.as_str().into(),
        billing_account_id: ctx.account_id.as_str().into(),
        sub_account_id: sub_account.into(),
        resource_id: format!("billing_item:{id}").into(),
        resource_name: fqdn.map(Text::from),
        sku_id: Some(resource_type.as_str().into()),
        resource_type: resource_type.into(),
        service_name: service_name.into(),
        charge_description: text_field(item, "description").map(Text::from),
        charge_period_start: start,
        charge_period_end: end,
        consumed_quantity: quantity,
        consumed_unit: unit.into(),
        billed_cost: cost,
        billing_currency: ctx.currency.as_str().into(),
        scope: ctx.account_id.as_str().into(),
        natural_key: vec![
            ("kind".into(), STREAM_NEXT.into()),
            ("billing_item_id".into(), id.to_compact_string()),
            ("next_bill_date".into(), rfc3339(end).into()),
        ],
        is_final: false,
        attributes,
        raw: RawJson::from_value(item),
    })
}

/// Turn `getNextInvoiceTopLevelBillingItems` (or any `SoftLayer_Billing_Item[]`) into
/// provisional records.
pub fn parse_next_items(
    items: &Value,
    ctx: &NextContext,
) -> Result<Vec<UsageRecord>, ProviderError> {
    let shape = |message: String| ProviderError::Shape {
        provider: ctx.source.clone(),
        call: CALL_NEXT.into(),
        message,
    };
    let list = items
        .as_array()
        .ok_or_else(|| shape("the billing items are not an array".into()))?;
    list.iter()
        .map(|item| billing_item_record(item, ctx).map_err(shape))
        .collect()
}

/// Parse billing items given as JSON text.
pub fn parse_next_items_str(
    text: &str,
    ctx: &NextContext,
) -> Result<Vec<UsageRecord>, ProviderError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ProviderError::Shape {
        provider: ctx.source.clone(),
        call: CALL_NEXT.into(),
        message: format!("not JSON: {e}"),
    })?;
    parse_next_items(&value, ctx)
}
