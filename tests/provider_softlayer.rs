//! Specification of the SoftLayer provider: the documented fixtures parse to exact decimals,
//! items are attributed to the ordering user (or the account), credits are negative, estimates
//! are never final; against the loopback simulator: paging with `SoftLayer-Total-Items`, the
//! invoice-id cursor, the rate-limit exception, SoftLayer's `{"error","code"}` bodies.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::providers::softlayer::{
    decimal_of, parse_invoice_items, parse_invoice_items_str, parse_next_items_str, InvoiceContext,
    InvoiceHeader, NextContext, SoftlayerConfig, SoftlayerProvider, CALL_INVOICES, CALL_ITEMS,
    ITEM_MASK, STREAM_INVOICES, STREAM_NEXT,
};
use billsync::providers::{Cursors, Provider, ProviderError};
use billsync::record::UsageRecord;
use billsync::simulators::softlayer::{
    Fault, GenerateOptions, SoftlayerDataset, SoftlayerSim, SoftlayerSimHandle, FIXTURE_ALL_ITEMS,
    FIXTURE_BILLING_ITEM, FIXTURE_ERROR_PUBLIC, FIXTURE_INVOICES, FIXTURE_NEXT_ITEMS,
    FIXTURE_TOP_LEVEL_ITEMS,
};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const USER: &str = "SL123456";
const KEY: &str = "sl-test-key";

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).expect("test decimal")
}

fn t(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("test time")
        .with_timezone(&Utc)
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap()
}

fn header(id: u64, status: &str, type_code: &str) -> InvoiceHeader {
    InvoiceHeader {
        id,
        account_id: Some(123),
        create_date: t("2024-07-04T06:17:42Z"),
        create_date_text: "2024-07-04T00:17:42-06:00".into(),
        status_code: status.into(),
        type_code: type_code.into(),
        total: None,
    }
}

fn ctx(invoice: InvoiceHeader) -> InvoiceContext {
    InvoiceContext {
        source: "sl-test".into(),
        account_id: "123".into(),
        currency: "USD".into(),
        invoice,
    }
}

fn next_ctx() -> NextContext {
    NextContext {
        source: "sl-test".into(),
        account_id: "123".into(),
        currency: "USD".into(),
    }
}

fn total(records: &[UsageRecord]) -> Decimal {
    records.iter().map(|r| r.billed_cost).sum()
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 4,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
    }
}

fn provider_at(endpoint: &str, page_size: u32) -> SoftlayerProvider {
    let mut config = SoftlayerConfig::new(endpoint, USER, Secret::new(KEY));
    config.retry = fast_retry();
    config.timeout = Duration::from_secs(5);
    config.page_size = page_size;
    SoftlayerProvider::new("sl-test".into(), config).expect("valid config")
}

/// One run as the pipeline does it: plan, fetch every chunk in order, keep the cursors the
/// pages return. Returns the records.
async fn run(
    p: &SoftlayerProvider,
    cursors: &mut Cursors,
) -> Result<Vec<UsageRecord>, ProviderError> {
    let chunks = p.plan(cursors, now()).await?;
    let mut records = Vec::new();
    for chunk in &chunks {
        let page = p.fetch(chunk, now()).await?;
        if let Some(c) = page.cursor {
            cursors.insert(chunk.stream.clone(), c);
        }
        records.extend(page.records);
    }
    Ok(records)
}

async fn sim(dataset: SoftlayerDataset) -> SoftlayerSimHandle {
    SoftlayerSim::start(dataset, USER, KEY)
        .await
        .expect("simulator starts")
}

// ---------------------------------------------------------------------------------------------
// Exact money from the wire
// ---------------------------------------------------------------------------------------------

#[test]
fn leading_dot_and_mixed_encodings_are_exact() {
    assert_eq!(decimal_of(&json!(".048")), Some(dec("0.048")));
    assert_eq!(decimal_of(&json!("-.5")), Some(dec("-0.5")));
    assert_eq!(decimal_of(&json!("18.03")), Some(dec("18.03")));
    let number: Value = serde_json::from_str("55.50").expect("json");
    assert_eq!(decimal_of(&number), Some(dec("55.50")));
    let tiny: Value = serde_json::from_str("0.1").expect("json");
    assert_eq!(decimal_of(&tiny), Some(dec("0.1")));
    assert_eq!(decimal_of(&json!("None")), None);
    assert_eq!(decimal_of(&Value::Null), None);
}

#[test]
fn top_level_items_fixture_sums_lines_and_children_exactly() {
    let records = parse_invoice_items_str(
        FIXTURE_TOP_LEVEL_ITEMS,
        &ctx(header(1001, "CLOSED", "RECURRING")),
    )
    .expect("parses");
    assert_eq!(records.len(), 2, "one record per top-level item");
    // 0 + 0 (own, strings) + 55.5 + 0.1 (child, numbers)
    assert_eq!(records[0].billed_cost, dec("55.6"));
    // 18.03 (own) + 10.00 + 2.33 (children): *AfterTaxAmount never includes children
    assert_eq!(records[1].billed_cost, dec("30.36"));
    assert_eq!(total(&records), dec("85.96"));
    let r = &records[1];
    assert_eq!(r.attributes["own_cost"], "18.03");
    assert_eq!(r.attributes["children_cost"], "12.33");
    assert_eq!(r.resource_type, "reserved_capacity");
    assert_eq!(r.sku_id.as_deref(), Some("reserved_capacity"));
    assert_eq!(r.service_name, "Reserved Capacity");
    assert_eq!(
        r.charge_description.as_deref(),
        Some("B1.1x2 (1 Year Term) (721hrs * .025)")
    );
    assert_eq!(r.attributes["location"], "dal10");
    assert_eq!(records[0].resource_name.as_deref(), Some("bleg.beh.com"));
    assert!(records
        .iter()
        .all(|r| r.is_final && r.billing_currency == "USD"));
}

#[test]
fn invoices_fixture_headers_parse_and_convert_to_utc() {
    let list: Value = serde_json::from_str(FIXTURE_INVOICES).expect("json");
    let headers: Vec<InvoiceHeader> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|v| InvoiceHeader::from_value(v).expect("header"))
        .collect();
    assert_eq!(headers.len(), 2);
    let sum: Decimal = headers.iter().filter_map(|h| h.total).sum();
    assert_eq!(sum, dec("12461.32")); // 6230.66 × 2
                                      // "2019-03-04T00:17:42-06:00" is 06:17:42 UTC.
    assert_eq!(headers[0].create_date, t("2019-03-04T06:17:42Z"));
    assert_eq!(headers[0].period().1, t("2019-04-04T06:17:42Z"));
    // OPEN means unpaid (payment, not finality: their lines are final all the same).
    assert!(headers.iter().all(|h| !h.is_closed()));
}

#[test]
fn next_invoice_fixture_is_a_provisional_hourly_estimate_of_exactly_048() {
    let records = parse_next_items_str(FIXTURE_NEXT_ITEMS, &next_ctx()).expect("parses");
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.billed_cost, dec("0.048")); // currentHourlyCharge ".048"
    assert_eq!(r.consumed_quantity, dec("2")); // hoursUsed "2"
    assert_eq!(r.consumed_unit, "hours");
    assert!(!r.is_final);
    assert_eq!(r.attributes["record_kind"], "estimate");
    assert_eq!(r.attributes["amount_source"], "current_hourly_charge");
    assert_eq!(
        r.attributes["cancellation_date"],
        "2017-02-27T08:49:26-06:00"
    );
    // No mask, no orderItem: attributed to the account.
    assert_eq!(r.sub_account_id, "123");
    assert_eq!(r.attributes["attributed_to_account"], "true");
    // Period = [lastBillDate, nextBillDate) in UTC.
    assert_eq!(r.charge_period_start, t("2017-02-27T13:01:23Z"));
    assert_eq!(r.charge_period_end, t("2017-03-20T05:00:00Z"));
    let names: Vec<&str> = r.natural_key.iter().map(|(k, _)| k.as_ref()).collect();
    assert_eq!(names, ["kind", "billing_item_id", "next_bill_date"]);
    assert_eq!(r.natural_key[1].1, "153540813");
}

#[test]
fn billing_item_fixtures_parse_with_user_ids_and_none_placeholders() {
    // Both SDK fixtures carry userRecord without `username` (their mask did not ask for it):
    // the user record id is the next best attribution. nextInvoiceTotalRecurringAmount is 0.
    let all = parse_next_items_str(FIXTURE_ALL_ITEMS, &next_ctx()).expect("parses");
    assert_eq!(all.len(), 2);
    assert_eq!(total(&all), dec("0"));
    assert!(all.iter().all(|r| r.sub_account_id == "user:167758"));
    assert!(all.iter().all(|r| r.attributes["attribution"] == "user_id"));
    assert!(all
        .iter()
        .all(|r| r.attributes["amount_source"] == "next_invoice_total"));

    let one = format!("[{FIXTURE_BILLING_ITEM}]");
    let records = parse_next_items_str(&one, &next_ctx()).expect("parses");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].billed_cost, dec("0"));
    assert_eq!(records[0].sub_account_id, "user:167758");
    assert_eq!(
        records[0].resource_name.as_deref(),
        Some("testsangeles101.sl-test.com")
    );
}

// ---------------------------------------------------------------------------------------------
// Attribution, credits, finality, keys
// ---------------------------------------------------------------------------------------------

/// The fixture's items, with the seed's mask result added to the first one.
fn attributed_items() -> Value {
    let mut items: Value = serde_json::from_str(FIXTURE_TOP_LEVEL_ITEMS).expect("json");
    items[0]["billingItemId"] = json!(53897671);
    items[0]["billingItem"] = json!({"id": 53897671, "orderItem": {"id": 68634907,
        "order": {"id": 4546175, "userRecordId": 167758,
                  "userRecord": {"id": 167758, "username": "SL167758_alice"}}}});
    // The second item's billing item has no order item (the seed's warning).
    items[1]["billingItem"] = json!({"id": 99});
    items
}

#[test]
fn items_land_on_the_ordering_username_or_the_account() {
    let records = parse_invoice_items(
        &attributed_items(),
        &ctx(header(1001, "CLOSED", "RECURRING")),
    )
    .expect("parses");
    assert_eq!(records[0].sub_account_id, "SL167758_alice");
    assert_eq!(records[0].attributes["attribution"], "username");
    assert!(!records[0].attributes.contains_key("attributed_to_account"));
    assert_eq!(records[0].resource_id, "billing_item:53897671");
    // Kept, not dropped: attributed to the account.
    assert_eq!(records[1].sub_account_id, "123");
    assert_eq!(records[1].attributes["attributed_to_account"], "true");
    assert_eq!(records[1].resource_id, "billing_item:99");
    assert_eq!(total(&records), dec("85.96"));
    assert!(records.iter().all(|r| r.billing_account_id == "123"));
}

#[test]
fn credit_and_refund_invoices_become_negative_records() {
    for type_code in ["CREDIT", "REFUND"] {
        let records =
            parse_invoice_items(&attributed_items(), &ctx(header(1002, "CLOSED", type_code)))
                .expect("parses");
        assert_eq!(total(&records), dec("-85.96"), "{type_code}");
        assert!(records.iter().all(|r| r.billed_cost <= Decimal::ZERO));
    }
    // A credit whose wire amounts are already negative stays negative (never double-negated).
    let items =
        json!([{"id": 1, "recurringAfterTaxAmount": "-12.50", "oneTimeAfterTaxAmount": "0"}]);
    let records =
        parse_invoice_items(&items, &ctx(header(1003, "CLOSED", "CREDIT"))).expect("parses");
    assert_eq!(records[0].billed_cost, dec("-12.50"));
}

#[test]
fn invoice_lines_are_keyed_by_invoice_and_item_and_monthly_ones_dated_to_the_cycle_they_open() {
    let closed = parse_invoice_items(
        &attributed_items(),
        &ctx(header(1001, "CLOSED", "RECURRING")),
    )
    .expect("parses");
    assert!(closed.iter().all(|r| r.is_final));
    assert_eq!(
        closed[1].natural_key,
        vec![
            ("invoice_id".into(), "1001".into()),
            ("invoice_item_id".into(), "1111222".into())
        ]
    );
    // Period: the invoice's monthly cycle from its creation, in UTC.
    assert_eq!(closed[0].charge_period_start, t("2024-07-04T06:17:42Z"));
    assert_eq!(closed[0].charge_period_end, t("2024-08-04T06:17:42Z"));
}

#[test]
fn config_reads_yaml_with_defaults_and_rejects_unknown_keys() {
    std::env::set_var("BILLSYNC_TEST_SL_KEY", "k");
    let c = SoftlayerConfig::from_str("username: SL1\napi_key: env:BILLSYNC_TEST_SL_KEY\n")
        .expect("valid");
    assert_eq!(c.endpoint, "https://api.softlayer.com/rest/v3.1");
    assert_eq!(c.page_size, 100);
    assert_eq!(c.currency, "USD");
    assert!(!c.provisional && !c.push_provisional);
    assert!(format!("{c:?}").contains("Secret(***)"));
    let err = SoftlayerConfig::from_str(
        "username: SL1\napi_key: env:BILLSYNC_TEST_SL_KEY\npagesize: 5\n",
    )
    .expect_err("unknown key");
    assert!(err.contains("pagesize"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Against the simulator
// ---------------------------------------------------------------------------------------------

fn all_closed(options: &GenerateOptions) -> SoftlayerDataset {
    let mut ds = SoftlayerDataset::generate(options);
    let ids: Vec<u64> = ds.invoices.iter().map(|i| i.id).collect();
    for id in ids {
        ds.close_invoice(id);
    }
    ds
}

#[tokio::test]
async fn pages_across_several_pages_then_a_second_run_pulls_nothing_new() {
    let options = GenerateOptions {
        invoices: 11,
        ..Default::default()
    };
    let ds = all_closed(&options);
    let expected: Decimal = ds.invoices.iter().map(|i| ds.invoice_cost(i.id)).sum();
    let max_id = ds.invoices.iter().map(|i| i.id).max().expect("invoices");
    let sim = sim(ds.clone()).await;
    let p = provider_at(&sim.url, 4); // 11 invoices → pages of 4, 4, 3

    let mut cursors = Cursors::new();
    let records = run(&p, &mut cursors).await.expect("first run");
    assert_eq!(total(&records), expected);
    assert_eq!(cursors[STREAM_INVOICES], max_id.to_string());
    let listing: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.call == "SoftLayer_Account::getInvoices")
        .collect();
    let limits: Vec<&str> = listing
        .iter()
        .map(|c| c.query["resultLimit"].as_str())
        .collect();
    assert_eq!(limits, ["0,4", "4,4", "8,4"]);
    assert!(listing.iter().all(|c| c.authorized));
    let filter: Value = serde_json::from_str(&listing[0].query["objectFilter"]).expect("json");
    assert_eq!(filter["invoices"]["id"]["operation"], "> 0");
    assert!(listing[0].query["objectMask"].contains("invoiceTotalAmount"));
    let items_call = sim
        .calls()
        .into_iter()
        .find(|c| c.call == "SoftLayer_Billing_Invoice::getInvoiceTopLevelItems")
        .expect("items call");
    assert!(items_call.query["objectMask"]
        .contains("billingItem[id,orderItem[id,order[id,userRecordId,userRecord[id,username]]]]"));

    // Natural keys are unique; many users; some items on the account; a credit is negative.
    let keys: HashSet<String> = records.iter().map(|r| r.natural_key_string()).collect();
    assert_eq!(keys.len(), records.len());
    let users: HashSet<&str> = records.iter().map(|r| r.sub_account_id.as_str()).collect();
    assert!(users.len() > 10, "{} users", users.len());
    assert!(records
        .iter()
        .any(|r| r.attributes.contains_key("attributed_to_account")));
    let credits: Vec<&UsageRecord> = records
        .iter()
        .filter(|r| r.attributes["invoice_type"] == "CREDIT")
        .collect();
    assert!(!credits.is_empty() && credits.iter().all(|r| r.billed_cost < Decimal::ZERO));
    assert!(records.iter().all(|r| r.is_final));

    // Second run with the stored cursor: one listing call (empty), no invoice read.
    sim.clear_calls();
    let again = run(&p, &mut cursors).await.expect("second run");
    assert!(again.is_empty());
    let calls = sim.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let filter: Value = serde_json::from_str(&calls[0].query["objectFilter"]).expect("json");
    assert_eq!(filter["invoices"]["id"]["operation"], format!("> {max_id}"));
}

#[tokio::test]
async fn start_skips_older_invoices_but_moves_the_cursor_past_them() {
    let ds = all_closed(&GenerateOptions {
        invoices: 4,
        ..Default::default()
    });
    let ids = ds.closed_ids();
    let sim = sim(ds).await;
    let mut config = SoftlayerConfig::new(&sim.url, USER, Secret::new(KEY));
    config.retry = fast_retry();
    config.start = Some(t("2025-03-01T00:00:00Z")); // invoices of Jan and Feb 2025 are older
    let p = SoftlayerProvider::new("sl-test".into(), config).expect("valid");
    let mut cursors = Cursors::new();
    let records = run(&p, &mut cursors).await.expect("run");
    let invoices: HashSet<&str> = records
        .iter()
        .map(|r| r.natural_key[0].1.as_str())
        .collect();
    assert_eq!(invoices.len(), 2);
    assert_eq!(cursors[STREAM_INVOICES], ids[3].to_string());
}

#[tokio::test]
async fn the_rate_limit_exception_is_retried_then_succeeds() {
    let ds = SoftlayerDataset::from_fixtures().expect("fixtures");
    let sim = sim(ds).await;
    sim.fail_next(2, Fault::RateLimitException);
    sim.fail_call(
        CALL_ITEMS,
        1,
        Fault::TooManyRequests {
            retry_after_secs: 0,
        },
    );
    sim.fail_call(CALL_ITEMS, 1, Fault::Http(503));
    let p = provider_at(&sim.url, 100);
    let records = run(&p, &mut Cursors::new()).await.expect("retried");
    assert_eq!(total(&records), dec("85.96"));
    let listing = sim
        .calls()
        .iter()
        .filter(|c| c.call == CALL_INVOICES)
        .count();
    assert_eq!(listing, 3, "two rate-limited attempts, then success");
}

#[tokio::test]
async fn the_rate_limit_gives_up_after_the_configured_retries_with_the_apis_message() {
    let sim = sim(SoftlayerDataset::from_fixtures().expect("fixtures")).await;
    sim.fail_next(10, Fault::RateLimitException);
    let p = provider_at(&sim.url, 100);
    let err = p.plan(&Cursors::new(), now()).await.expect_err("gives up");
    let text = err.to_string();
    assert!(
        text.contains("SoftLayer_Exception_WebService_RateLimitExceeded"),
        "{text}"
    );
    assert!(text.contains("Rate limit of 50 requests"), "{text}");
    assert_eq!(sim.request_count(), 5); // 1 + max_retries 4
}

#[tokio::test]
async fn an_error_body_names_provider_call_and_message_and_is_not_retried() {
    let sim = sim(SoftlayerDataset::from_fixtures().expect("fixtures")).await;
    sim.fail_call(
        CALL_INVOICES,
        1,
        Fault::Body {
            status: 500,
            body: FIXTURE_ERROR_PUBLIC.to_string(),
        },
    );
    let p = provider_at(&sim.url, 100);
    let err = p.plan(&Cursors::new(), now()).await.expect_err("fails");
    match &err {
        ProviderError::Api {
            provider,
            call,
            code,
            message,
        } => {
            assert_eq!(provider, "sl-test");
            assert_eq!(call, "SoftLayer_Account::getInvoices");
            assert_eq!(code, "SoftLayer_Exception_Public");
            assert_eq!(
                message,
                "Function (\"BlockDeviceTemplateGroups1\") is not a valid method for this service."
            );
        }
        other => panic!("expected an Api error, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "sl-test: SoftLayer_Account::getInvoices returned error SoftLayer_Exception_Public: \
         Function (\"BlockDeviceTemplateGroups1\") is not a valid method for this service."
    );
    assert_eq!(
        sim.request_count(),
        1,
        "an exception other than the rate limit is final"
    );
}

#[tokio::test]
async fn wrong_credentials_fail_clearly_without_showing_the_key() {
    let sim = sim(SoftlayerDataset::from_fixtures().expect("fixtures")).await;
    let mut config = SoftlayerConfig::new(&sim.url, USER, Secret::new("wrong-key-987"));
    config.retry = fast_retry();
    let p = SoftlayerProvider::new("sl-test".into(), config).expect("valid");
    let err = p.plan(&Cursors::new(), now()).await.expect_err("401");
    let text = err.to_string();
    assert!(
        matches!(err, ProviderError::Http { status: 401, .. }),
        "{text}"
    );
    assert!(
        text.contains("authentication failed") && text.contains("Access Denied"),
        "{text}"
    );
    assert!(!text.contains("wrong-key-987"));
    assert_eq!(sim.request_count(), 1);
}

#[tokio::test]
async fn provisional_mode_adds_never_final_estimates_and_the_push_flag_is_the_config() {
    let ds = SoftlayerDataset::generate(&GenerateOptions {
        invoices: 2,
        next_items: 5,
        ..Default::default()
    });
    let sim = sim(ds).await;
    let mut config = SoftlayerConfig::new(&sim.url, USER, Secret::new(KEY));
    config.retry = fast_retry();
    config.provisional = true;
    config.push_provisional = true;
    let p = SoftlayerProvider::new("sl-test".into(), config).expect("valid");
    assert!(p.push_provisional());
    let chunks = p.plan(&Cursors::new(), now()).await.expect("plan");
    let next = chunks
        .iter()
        .find(|c| c.stream == STREAM_NEXT)
        .expect("next chunk");
    let page = p.fetch(next, now()).await.expect("estimates");
    assert_eq!(page.records.len(), 5);
    assert!(page.cursor.is_none());
    assert!(page.records.iter().all(|r| !r.is_final
        && r.attributes["record_kind"] == "estimate"
        && r.consumed_unit == "hours"
        && r.sub_account_id.starts_with("user-")
        && r.billing_account_id == "1234567"));
    let call = sim
        .calls()
        .into_iter()
        .find(|c| c.call == "SoftLayer_Account::getNextInvoiceTopLevelBillingItems")
        .expect("called");
    assert!(call.query["objectMask"]
        .contains("orderItem[id,order[id,userRecordId,userRecord[id,username]]]"));
    assert!(call.query["objectMask"].contains("invoiceItem[id,totalRecurringAmount]"));
    assert!(!provider_at(&sim.url, 10).push_provisional());
}

// ---------------------------------------------------------------------------------------------
// Wiremock: shapes a simulator would not produce
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn total_header_stops_paging_and_a_short_count_is_an_error() {
    // The header announces 4 invoices; the second page repeats one row of the first (an
    // unstable server order would look like this): after 4 rows the total is reached, but only
    // 3 distinct invoices were seen.
    let server = invoices_server(
        |offset, _| if offset == 0 { vec![5, 6] } else { vec![6, 7] },
        Some(4),
    )
    .await;
    let p = provider_at(&server.uri(), 2);
    let err = p.plan(&Cursors::new(), now()).await.expect_err("short");
    assert!(err.to_string().contains("announced 4"), "{err}");
    let requests = server.received_requests().await.expect("recorded").len();
    assert_eq!(requests, 2, "the header's total ends paging");
}

#[tokio::test]
async fn an_exception_on_http_200_is_still_an_error() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/SoftLayer_Account/getInvoices.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"error": "Internal Error", "code": "SoftLayer_Exception_Public"}),
        ))
        .mount(&server)
        .await;
    let p = provider_at(&server.uri(), 100);
    let err = p.plan(&Cursors::new(), now()).await.expect_err("error");
    assert!(
        matches!(err, ProviderError::Api { ref code, .. } if code == "SoftLayer_Exception_Public")
    );
}

#[test]
fn every_fixture_is_embedded_byte_for_byte() {
    let dir = std::path::Path::new("/work/shared/fixtures/providers/softlayer");
    if !dir.exists() {
        return; // the shared tree is not part of every checkout
    }
    let embedded: BTreeMap<&str, &str> = [
        (
            "SoftLayer_Account.getNextInvoiceTopLevelBillingItems.json",
            FIXTURE_NEXT_ITEMS,
        ),
        (
            "SoftLayer_Account.getAllTopLevelBillingItems.json",
            FIXTURE_ALL_ITEMS,
        ),
        ("SoftLayer_Account.getInvoices.json", FIXTURE_INVOICES),
        (
            "SoftLayer_Billing_Invoice.getInvoiceTopLevelItems.json",
            FIXTURE_TOP_LEVEL_ITEMS,
        ),
        (
            "SoftLayer_Billing_Item.getObject.json",
            FIXTURE_BILLING_ITEM,
        ),
        (
            "error.SoftLayer_Exception_Public.json",
            FIXTURE_ERROR_PUBLIC,
        ),
    ]
    .into_iter()
    .collect();
    for (name, text) in embedded {
        let original = std::fs::read_to_string(dir.join(name)).expect("readable");
        assert_eq!(original, text, "{name}");
    }
}

#[test]
fn settings_accept_a_softlayer_source() {
    std::env::set_var("BILLSYNC_TEST_SL_KEY2", "k");
    let yaml =
        "kind: softlayer\nusername: SL1\napi_key: env:BILLSYNC_TEST_SL_KEY2\nprovisional: true\n";
    let settings: billsync::config::ProviderSettings =
        serde_yaml_ng::from_str(yaml).expect("valid settings");
    let billsync::config::ProviderSettings::Softlayer(c) = settings else {
        panic!("not a softlayer source");
    };
    assert!(c.provisional);
    let p = SoftlayerProvider::new("sl".into(), c).expect("valid");
    assert_eq!(p.kind(), "softlayer");
}

/// SLDN `SoftLayer_Billing_Invoice_Item` documents four after-tax totals of one line, each
/// "not including any child invoice items": `recurringAfterTaxAmount`,
/// `oneTimeAfterTaxAmount`, `setupAfterTaxAmount` and `laborAfterTaxAmount` (the labor fee is
/// "a one-time fee of a special type", with its own tax rate and tax amount). A line's cost is
/// all four, for the top-level item and for each child; and the mask must ask for them, since
/// SoftLayer only sends the properties a mask names.
#[test]
fn setup_and_labor_fees_are_part_of_a_lines_cost() {
    let items = json!([{
        "id": 7,
        "recurringAfterTaxAmount": "100",
        "oneTimeAfterTaxAmount": "0",
        "setupAfterTaxAmount": "25.50",
        "laborAfterTaxAmount": ".75",
        "children": [
            {"id": 8, "recurringAfterTaxAmount": "10", "oneTimeAfterTaxAmount": "0",
             "setupAfterTaxAmount": 5, "laborAfterTaxAmount": "0"},
            {"id": 9, "setupAfterTaxAmount": "1.25"}
        ]
    }, {
        "id": 10,
        "laborAfterTaxAmount": "60"
    }]);
    let records = parse_invoice_items(&items, &ctx(header(1004, "CLOSED", "ONE-TIME-CHARGE")))
        .expect("parses");
    assert_eq!(records[0].billed_cost, dec("142.50"));
    assert_eq!(records[0].attributes["own_cost"], "126.25");
    assert_eq!(records[0].attributes["children_cost"], "16.25");
    assert_eq!(records[1].billed_cost, dec("60"), "a labor-only line");
    let top_level = ITEM_MASK.split("children[").next().expect("mask");
    let children = ITEM_MASK.split("children[").nth(1).expect("children mask");
    for field in ["setupAfterTaxAmount", "laborAfterTaxAmount"] {
        assert!(top_level.contains(field), "the item mask asks for {field}");
        assert!(
            children.contains(field),
            "the children mask asks for {field}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Paging without `SoftLayer-Total-Items`
// ---------------------------------------------------------------------------------------------

/// A `getInvoices` server: `rows(offset, limit)` decides what a page holds; `total` is the
/// `SoftLayer-Total-Items` header, never sent when `None`.
struct Pages<F: Fn(u64, u64) -> Vec<u64> + Send + Sync + 'static> {
    rows: F,
    total: Option<u64>,
}

impl<F: Fn(u64, u64) -> Vec<u64> + Send + Sync + 'static> wiremock::Respond for Pages<F> {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let (offset, limit) = request
            .url
            .query_pairs()
            .find(|(k, _)| k == "resultLimit")
            .and_then(|(_, v)| {
                let (o, l) = v.split_once(',')?;
                Some((o.parse().ok()?, l.parse().ok()?))
            })
            .unwrap_or((0, 100));
        let rows: Vec<Value> = (self.rows)(offset, limit)
            .into_iter()
            .map(|id| {
                json!({"id": id, "createDate": "2025-01-04T00:00:00-06:00",
                       "statusCode": "CLOSED", "typeCode": "RECURRING"})
            })
            .collect();
        let response = ResponseTemplate::new(200).set_body_json(Value::Array(rows));
        match self.total {
            Some(total) => response.insert_header("SoftLayer-Total-Items", total.to_string()),
            None => response,
        }
    }
}

async fn invoices_server<F: Fn(u64, u64) -> Vec<u64> + Send + Sync + 'static>(
    rows: F,
    total: Option<u64>,
) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/SoftLayer_Account/getInvoices.json"))
        .respond_with(Pages { rows, total })
        .mount(&server)
        .await;
    server
}

async fn headerless_invoices<F: Fn(u64, u64) -> Vec<u64> + Send + Sync + 'static>(
    rows: F,
) -> MockServer {
    invoices_server(rows, None).await
}

/// SoftLayer caps a page below the `resultLimit` asked for; without `SoftLayer-Total-Items` a
/// short page is not the end: paging goes on until an empty page, and no invoice is lost.
#[tokio::test]
async fn without_the_total_header_a_page_capped_by_the_server_does_not_end_the_listing() {
    // 7 invoices, never more than 2 a page, whatever the limit asked.
    let server = headerless_invoices(|offset, limit| {
        (offset..(offset + limit.min(2)).min(7))
            .map(|i| 100 + i)
            .collect()
    })
    .await;
    let p = provider_at(&server.uri(), 5);
    let chunks = tokio::time::timeout(Duration::from_secs(10), p.plan(&Cursors::new(), now()))
        .await
        .expect("paging ends")
        .expect("plan");
    let ids: Vec<u64> = chunks
        .iter()
        .map(|c| {
            let detail: Value = serde_json::from_str(&c.detail).expect("detail");
            detail["invoice"]["id"].as_u64().expect("id")
        })
        .collect();
    assert_eq!(
        ids,
        (100..107).collect::<Vec<u64>>(),
        "every invoice listed"
    );
}

/// A server that ignores the offset answers the same full page for ever: that is an error
/// naming the call, never an endless loop and never a silent stop.
#[tokio::test]
async fn without_the_total_header_a_page_repeating_rows_already_read_is_an_error() {
    let server = headerless_invoices(|_, limit| (1..=limit).collect()).await;
    let p = provider_at(&server.uri(), 3);
    let err = tokio::time::timeout(Duration::from_secs(10), p.plan(&Cursors::new(), now()))
        .await
        .expect("paging must not loop for ever")
        .expect_err("no progress");
    let text = err.to_string();
    assert!(matches!(err, ProviderError::Shape { .. }), "{text}");
    assert!(text.contains(CALL_INVOICES), "{text}");
    assert!(text.contains("no progress"), "{text}");
}

/// A server that answers full pages of new rows for ever (no header to stop at) is cut off at
/// `max_pages`, naming the call.
#[tokio::test]
async fn without_the_total_header_an_endless_stream_of_pages_is_an_error() {
    let server = headerless_invoices(|offset, limit| (offset + 1..=offset + limit).collect()).await;
    let mut config = SoftlayerConfig::new(server.uri(), USER, Secret::new(KEY));
    config.retry = fast_retry();
    config.page_size = 4;
    config.max_pages = 25;
    let p = SoftlayerProvider::new("sl-test".into(), config).expect("valid");
    let err = tokio::time::timeout(Duration::from_secs(10), p.plan(&Cursors::new(), now()))
        .await
        .expect("paging must not loop for ever")
        .expect_err("endless");
    let text = err.to_string();
    assert!(text.contains(CALL_INVOICES), "{text}");
    assert!(text.contains("max_pages"), "{text}");
    let requests = server.received_requests().await.expect("recorded").len();
    assert_eq!(requests, 25, "stops at max_pages");
}

// ---------------------------------------------------------------------------------------------
// Object masks: the simulator sends only what a mask asks for, as SoftLayer does
// ---------------------------------------------------------------------------------------------

async fn sim_get(sim: &SoftlayerSimHandle, path: &str, mask: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}/{path}.json", sim.url))
        .basic_auth(USER, Some(KEY))
        .query(&[("objectMask", mask)])
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json")
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

/// SoftLayer returns only the properties an object mask names (local and relational, at every
/// depth); the simulator does the same, so a property the provider reads but its mask forgets
/// is missing in tests too.
#[tokio::test]
async fn the_simulator_returns_only_the_properties_the_mask_names() {
    let ds = SoftlayerDataset::generate(&GenerateOptions {
        invoices: 1,
        items_per_invoice: 4,
        next_items: 2,
        ..Default::default()
    });
    let invoice = ds.invoices[0].id;
    let sim = sim(ds).await;

    let items = sim_get(
        &sim,
        &format!("SoftLayer_Billing_Invoice/{invoice}/getInvoiceTopLevelItems"),
        "mask[id,recurringAfterTaxAmount,billingItem[id,orderItem[order[userRecord[id]]]],\
         children[id,childrenCount]]",
    )
    .await;
    let items = items.as_array().expect("array");
    assert_eq!(items.len(), 4);
    for item in items {
        let k = keys(item);
        assert!(
            k.iter()
                .all(|k| ["billingItem", "children", "id", "recurringAfterTaxAmount"].contains(k)),
            "{k:?}"
        );
        assert!(k.contains(&"id") && k.contains(&"recurringAfterTaxAmount"));
        if let Some(user) = item.pointer("/billingItem/orderItem/order/userRecord") {
            assert_eq!(keys(user), ["id"], "no username unless masked");
        }
        assert_eq!(keys(&item["billingItem"])[0], "id");
        for child in item["children"].as_array().into_iter().flatten() {
            assert_eq!(keys(child), ["childrenCount", "id"]);
            assert_eq!(child["childrenCount"], 0, "a count property is computed");
        }
    }
    assert!(items.iter().any(|i| i["children"].is_array()));
    assert!(items.iter().any(|i| i
        .pointer("/billingItem/orderItem/order/userRecord")
        .is_some()));

    let invoices = sim_get(&sim, "SoftLayer_Account/getInvoices", "mask[id,statusCode]").await;
    assert_eq!(keys(&invoices[0]), ["id", "statusCode"]);

    let next = sim_get(
        &sim,
        "SoftLayer_Account/getNextInvoiceTopLevelBillingItems",
        "mask[id,orderItem[id]]",
    )
    .await;
    assert_eq!(keys(&next[0]), ["id", "orderItem"]);
    assert_eq!(keys(&next[0]["orderItem"]), ["id"]);
}

/// An invoice line carrying every property the provider reads (and some it does not), with a
/// child: what SoftLayer would send for a mask asking for everything.
fn rich_item(id: u64, invoice: u64, username: &str) -> Value {
    json!({
        "id": id, "invoiceId": invoice, "billingItemId": id + 10, "parentId": null,
        "categoryCode": "server", "description": "Dual E5-2690 v3", "hostName": "web1",
        "domainName": "example.com", "createDate": "2025-03-03T22:08:36-06:00",
        "hourlyFlag": true, "hourlyRecurringFee": ".5", "recurringFee": "360",
        "recurringAfterTaxAmount": "360", "oneTimeAfterTaxAmount": 1.5,
        "setupAfterTaxAmount": "20", "laborAfterTaxAmount": ".25",
        "recurringTaxAmount": "0", "notes": "not read",
        "category": {"name": "Server", "categoryCode": "server"},
        "location": {"name": "dal10", "longName": "Dallas 10"},
        "billingItem": {"id": id + 10, "recurringFee": "360", "orderItem": {"id": id + 20,
            "order": {"id": id + 30, "userRecordId": 14,
                "userRecord": {"id": 14, "username": username, "email": "not read"}}}},
        "children": [{"id": id + 1, "billingItemId": id + 11, "categoryCode": "ram",
            "description": "16 GB", "recurringAfterTaxAmount": "10", "oneTimeAfterTaxAmount": "0",
            "setupAfterTaxAmount": "1", "laborAfterTaxAmount": "2", "notes": "not read",
            "category": {"name": "RAM"}}]
    })
}

/// A next-invoice billing item carrying every property the provider reads.
fn rich_billing_item(id: u64, username: &str) -> Value {
    json!({
        "id": id, "categoryCode": "guest_core", "description": "1 x 2.0 GHz Core",
        "hostName": "next1", "domainName": "example.com",
        "createDate": "2025-02-27T06:58:38-06:00", "cancellationDate": "2025-04-01T00:00:00-06:00",
        "cycleStartDate": "2025-03-04T00:00:00-06:00", "lastBillDate": "2025-03-04T00:00:00-06:00",
        "nextBillDate": "2025-04-04T00:00:00-05:00", "hourlyFlag": true, "hoursUsed": "20",
        "hourlyRecurringFee": ".024", "currentHourlyCharge": ".48", "recurringFee": ".024",
        "oneTimeFee": "0", "setupFee": "0", "laborFee": "0",
        "nextInvoiceTotalRecurringAmount": "12.5", "nextInvoiceTotalOneTimeAmount": 0,
        "nextInvoiceTotalRecurringTaxAmount": "1.25", "nextInvoiceTotalOneTimeTaxAmount": "0",
        "resourceTableId": 9, "notes": "not read",
        "category": {"name": "Computing Instance"}, "location": {"name": "ams01"},
        "orderItem": {"id": id + 1, "order": {"id": id + 2, "userRecordId": 15,
            "userRecord": {"id": 15, "username": username}}},
        "invoiceItem": {"id": id + 3, "totalRecurringAmount": "12.5"}
    })
}

fn without_raw(mut records: Vec<UsageRecord>) -> Vec<UsageRecord> {
    for r in &mut records {
        r.raw = billsync::record::RawJson::null();
    }
    records
}

/// Through the simulator (which applies the provider's own masks) the records are exactly
/// those the full, unmasked data gives: the masks ask for every property the provider reads.
#[tokio::test]
async fn the_provider_masks_ask_for_every_property_it_reads() {
    let mut ds = SoftlayerDataset::new(123);
    ds.add_invoice(
        501,
        "2025-03-04T00:17:42-06:00",
        "CLOSED",
        "RECURRING",
        vec![rich_item(1, 501, "alice"), rich_item(5, 501, "bob")],
    );
    ds.next_items = vec![rich_billing_item(70, "carol")];
    let raw_items = Value::Array(ds.invoices[0].items.clone());
    let header = InvoiceHeader::from_value(&ds.invoices[0].header).expect("header");
    let expected_lines = parse_invoice_items(&raw_items, &ctx(header)).expect("parses");
    let expected_next = billsync::providers::softlayer::parse_next_items(
        &Value::Array(ds.next_items.clone()),
        &next_ctx(),
    )
    .expect("parses");
    assert_eq!(expected_lines[0].sub_account_id, "alice");
    assert_eq!(expected_next[0].sub_account_id, "carol");

    let sim = sim(ds).await;
    let mut config = SoftlayerConfig::new(&sim.url, USER, Secret::new(KEY));
    config.retry = fast_retry();
    config.provisional = true;
    let p = SoftlayerProvider::new("sl-test".into(), config).expect("valid");
    let records = run(&p, &mut Cursors::new()).await.expect("run");
    let (next, lines): (Vec<UsageRecord>, Vec<UsageRecord>) = records
        .into_iter()
        .partition(|r| r.attributes["record_kind"] == "estimate");
    assert_eq!(without_raw(lines), without_raw(expected_lines));
    assert_eq!(without_raw(next), without_raw(expected_next));
}

// ---------------------------------------------------------------------------------------------
// Children at every depth
// ---------------------------------------------------------------------------------------------

/// A server line, its components (children) and their own sub-items (grandchildren). SLDN: every
/// `*AfterTaxAmount` covers "this line only, not including any child invoice items", so each
/// level carries its own cost and adding them never counts anything twice.
fn server_with_grandchildren() -> Value {
    json!([{
        "id": 100, "categoryCode": "server", "recurringAfterTaxAmount": "500",
        "oneTimeAfterTaxAmount": "0", "childrenCount": 2,
        "children": [
            {"id": 101, "categoryCode": "ram", "recurringAfterTaxAmount": "40",
             "oneTimeAfterTaxAmount": "0", "childrenCount": 0, "children": []},
            {"id": 102, "categoryCode": "disk_controller", "recurringAfterTaxAmount": "30",
             "oneTimeAfterTaxAmount": "0", "childrenCount": 2,
             "children": [
                 {"id": 103, "categoryCode": "disk0", "recurringAfterTaxAmount": "12.25",
                  "setupAfterTaxAmount": ".75", "childrenCount": 0},
                 {"id": 104, "categoryCode": "disk1", "recurringAfterTaxAmount": 7,
                  "laborAfterTaxAmount": "1"}
             ]}
        ]
    }])
}

#[test]
fn grandchildren_lines_are_part_of_the_top_level_items_cost() {
    let records = parse_invoice_items(
        &server_with_grandchildren(),
        &ctx(header(2001, "CLOSED", "RECURRING")),
    )
    .expect("parses");
    assert_eq!(records.len(), 1, "one record per top-level item");
    // 500 + 40 + 30 + (12.25 + .75) + (7 + 1)
    assert_eq!(records[0].billed_cost, dec("591"));
    assert_eq!(records[0].attributes["own_cost"], "500");
    assert_eq!(records[0].attributes["children_cost"], "91.00");
    assert_eq!(records[0].attributes["children"], "4");
}

/// `childrenCount` larger than the children that came (a level deeper than the mask reaches,
/// or a cut list) would lose lines: an error naming the line, never a silent shortfall.
#[test]
fn children_announced_but_missing_are_an_error() {
    let mut items = server_with_grandchildren();
    items[0]["children"][1]["children"] = Value::Null;
    let err = parse_invoice_items(&items, &ctx(header(2001, "CLOSED", "RECURRING")))
        .expect_err("lines missing");
    let text = err.to_string();
    assert!(text.contains("invoice 2001 item 100"), "{text}");
    assert!(text.contains("childrenCount"), "{text}");
}

/// Through the simulator (masks applied): the item mask reaches the grandchildren, so the
/// invoice's lines add up to what SoftLayer billed.
#[tokio::test]
async fn the_item_mask_reaches_grandchildren() {
    let mut ds = SoftlayerDataset::new(77);
    let items = server_with_grandchildren()
        .as_array()
        .expect("array")
        .clone();
    ds.add_invoice(
        2001,
        "2025-03-04T00:00:00-06:00",
        "CLOSED",
        "RECURRING",
        items,
    );
    assert_eq!(ds.invoice_cost(2001), dec("591"));
    assert_eq!(ds.invoices[0].header["invoiceTotalAmount"], "591.00");
    let sim = sim(ds).await;
    let p = provider_at(&sim.url, 100);
    let records = run(&p, &mut Cursors::new()).await.expect("run");
    assert_eq!(total(&records), dec("591"));
}

// ---------------------------------------------------------------------------------------------
// Estimates: every one-time fee kind, like invoice lines
// ---------------------------------------------------------------------------------------------

/// A billing item without `nextInvoiceTotal*` is estimated from its fees. SLDN: the setup fee is
/// "normally a one-time fee" and the labor fee is "also a one-time fee of a special type";
/// invoice lines count `setupAfterTaxAmount` and `laborAfterTaxAmount`, so the estimate counts
/// `setupFee` and `laborFee` along with `oneTimeFee`, and the mask asks for them.
#[tokio::test]
async fn an_estimate_from_fees_counts_setup_and_labor_fees_like_invoice_lines() {
    let item = json!({"id": 71, "createDate": "2025-03-01T00:00:00-06:00",
        "nextBillDate": "2025-04-04T00:00:00-05:00", "hourlyFlag": false,
        "recurringFee": "10", "oneTimeFee": "1", "setupFee": "5", "laborFee": ".5"});
    let records = parse_next_items_str(&Value::Array(vec![item.clone()]).to_string(), &next_ctx())
        .expect("parses");
    assert_eq!(records[0].billed_cost, dec("16.5"));
    assert_eq!(records[0].attributes["amount_source"], "fees");

    // Through the simulator, which applies the provider's mask.
    let mut ds = SoftlayerDataset::new(123);
    ds.next_items = vec![item];
    let sim = sim(ds).await;
    let mut config = SoftlayerConfig::new(&sim.url, USER, Secret::new(KEY));
    config.retry = fast_retry();
    config.provisional = true;
    let p = SoftlayerProvider::new("sl-test".into(), config).expect("valid");
    let records = run(&p, &mut Cursors::new()).await.expect("run");
    assert_eq!(total(&records), dec("16.5"));
}

/// The hours of an hourly line are `recurringFee / hourlyRecurringFee`; a quotient beyond what a
/// decimal holds must not panic the run (the whole sync would crash for one odd line).
#[test]
fn an_hours_quotient_too_large_for_a_decimal_does_not_panic() {
    let items = json!([{"id": 1, "hourlyFlag": true,
        "recurringFee": "79000000000000000000000000000", "hourlyRecurringFee": ".001",
        "recurringAfterTaxAmount": "12.5"}]);
    let records = std::panic::catch_unwind(|| {
        parse_invoice_items(&items, &ctx(header(3001, "CLOSED", "RECURRING")))
    })
    .expect("no panic")
    .expect("parses");
    assert_eq!(records[0].billed_cost, dec("12.5"));
    assert_eq!(records[0].consumed_unit, "month");
    assert_eq!(records[0].consumed_quantity, dec("1"));
}

// ---------------------------------------------------------------------------------------------
// Finality: an invoice's lines are fixed when it is created; OPEN only means "not paid yet"
// ---------------------------------------------------------------------------------------------

#[test]
fn lines_of_an_unpaid_invoice_are_final_under_the_keys_they_always_had() {
    // softlayer-go `Billing_Invoice.StatusCode`: OPEN = SoftLayer has not received payment,
    // CLOSED = paid, CLOSED_FAILED = closed without payment. Lines are a copy of the billing
    // items made when the invoice is created (`Billing_Invoice_Item`; reference 1.9).
    let open = parse_invoice_items(&attributed_items(), &ctx(header(1001, "OPEN", "RECURRING")))
        .expect("parses");
    let closed = parse_invoice_items(
        &attributed_items(),
        &ctx(header(1001, "CLOSED", "RECURRING")),
    )
    .expect("parses");
    assert!(
        open.iter().all(|r| r.is_final),
        "an unpaid invoice is final"
    );
    for (o, c) in open.iter().zip(&closed) {
        assert_eq!(o.idempotency_key(), c.idempotency_key());
        assert_eq!(o.billed_cost, c.billed_cost);
    }
}

#[tokio::test]
async fn the_cursor_moves_past_an_unpaid_invoice_which_is_read_once() {
    let mut ds = SoftlayerDataset::new(77);
    let item = |id: u64, amount: &str| json!({"id": id, "recurringAfterTaxAmount": amount, "oneTimeAfterTaxAmount": "0"});
    ds.add_invoice(
        10,
        "2025-01-04T00:00:00-06:00",
        "CLOSED",
        "RECURRING",
        vec![item(1, "1.10")],
    );
    ds.add_invoice(
        11,
        "2025-02-04T00:00:00-06:00",
        "OPEN",
        "RECURRING",
        vec![item(2, "2.20")],
    );
    ds.add_invoice(
        12,
        "2025-03-04T00:00:00-06:00",
        "CLOSED",
        "RECURRING",
        vec![item(3, "3.30")],
    );
    let sim = sim(ds).await;
    let p = provider_at(&sim.url, 100);
    let mut cursors = Cursors::new();
    let first = run(&p, &mut cursors).await.expect("first run");
    assert_eq!(total(&first), dec("6.60"));
    assert!(first.iter().all(|r| r.is_final));
    assert_eq!(cursors[STREAM_INVOICES], "12");
    // Paid meanwhile: not read again, nothing new.
    sim.update(|d| d.close_invoice(11));
    sim.clear_calls();
    assert!(run(&p, &mut cursors).await.expect("second run").is_empty());
    assert!(sim.calls().iter().all(|c| c.call == CALL_INVOICES));
}

#[tokio::test]
async fn an_invoice_read_with_fewer_items_than_it_announces_fails_and_is_read_again() {
    // Read once, an invoice caught while its lines were still being written would lose the
    // rest for ever: its items must number its invoiceTopLevelItemCount.
    let mut ds = SoftlayerDataset::new(77);
    let item = |id: u64, amount: &str| json!({"id": id, "recurringAfterTaxAmount": amount, "oneTimeAfterTaxAmount": "0"});
    ds.add_invoice(
        10,
        "2025-01-04T00:00:00-06:00",
        "OPEN",
        "RECURRING",
        vec![item(1, "1.10"), item(2, "2.20")],
    );
    ds.invoices[0].header["invoiceTopLevelItemCount"] = json!(3);
    let sim = sim(ds).await;
    let p = provider_at(&sim.url, 100);
    let mut cursors = Cursors::new();
    let err = run(&p, &mut cursors).await.expect_err("incomplete invoice");
    let text = err.to_string();
    assert!(text.contains("invoice 10") && text.contains('3'), "{text}");
    assert!(!cursors.contains_key(STREAM_INVOICES));

    // The third line is there by the next run: the whole invoice is read.
    sim.update(|d| d.invoices[0].items.push(item(3, "3.30")));
    let records = run(&p, &mut cursors).await.expect("complete");
    assert_eq!(total(&records), dec("6.60"));
    assert_eq!(cursors[STREAM_INVOICES], "10");
}

#[tokio::test]
async fn an_invoice_younger_than_settle_delay_and_those_after_it_wait_for_a_later_run() {
    // Every invoice is read once: one read while SoftLayer is still writing its lines would
    // lose the rest (the item count it announces counts the lines there at the time). So an
    // invoice is read only once it is `settle_delay` old, and nothing after it before it.
    let mut ds = SoftlayerDataset::new(77);
    let item = |id: u64, amount: &str| json!({"id": id, "recurringAfterTaxAmount": amount, "oneTimeAfterTaxAmount": "0"});
    ds.add_invoice(
        10,
        "2025-01-04T00:00:00-06:00",
        "CLOSED",
        "RECURRING",
        vec![item(1, "1.10")],
    );
    ds.add_invoice(
        11,
        "2025-02-04T00:00:00-06:00",
        "OPEN",
        "RECURRING",
        vec![item(2, "2.20")],
    );
    let sim = sim(ds).await;
    let p = provider_at(&sim.url, 100);
    let created = DateTime::parse_from_rfc3339("2025-02-04T00:00:00-06:00")
        .unwrap()
        .with_timezone(&Utc);
    let read = |now: DateTime<Utc>| {
        let p = &p;
        async move {
            let mut cursors = Cursors::new();
            let mut records = Vec::new();
            for chunk in p.plan(&cursors, now).await.unwrap() {
                let page = p.fetch(&chunk, now).await.unwrap();
                if let Some(c) = page.cursor {
                    cursors.insert(chunk.stream.clone(), c);
                }
                records.extend(page.records);
            }
            (records, cursors.get(STREAM_INVOICES).cloned())
        }
    };
    // Half an hour after invoice 11 was made (default settle_delay 1h): only invoice 10.
    let (early, cursor) = read(created + chrono::Duration::minutes(30)).await;
    assert_eq!(total(&early), dec("1.10"));
    assert_eq!(cursor.as_deref(), Some("10"));
    // Two hours after: both.
    let (later, cursor) = read(created + chrono::Duration::hours(2)).await;
    assert_eq!(total(&later), dec("3.30"));
    assert_eq!(cursor.as_deref(), Some("11"));
}
