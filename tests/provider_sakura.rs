//! Specification of the SAKURA Cloud provider: the manual's examples parse to exact JPY sums,
//! Japanese names survive, JSON lines are named through the price list, months are JST, months
//! stay provisional (and are re-read) until the 1st of the next month plus the lag, errors name
//! provider, call and message, and a changed provisional line keeps its natural key.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::providers::sakura::{
    parse_auth_status, parse_bill_csv, parse_bill_details, parse_bills, parse_price_list,
    AccountInfo, LineContext, Month, SakuraConfig, SakuraProvider,
};
use billsync::providers::{Cursors, Provider, ProviderError};
use billsync::record::UsageRecord;
use billsync::simulators::sakura::{
    billing_date, Fault, SakuraDataset, SakuraSim, SakuraSimHandle, SimBill, FIXTURE_AUTH_STATUS,
    FIXTURE_BILLS, FIXTURE_CSV_BODY, FIXTURE_DETAILS, FIXTURE_PRICE_SYNTHETIC,
};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;

const TOKEN: &str = "test-token";
const SECRET: &str = "test-secret";
const SOURCE: &str = "sakura-test";
/// The manual's June 2016 bill (the running month in most tests) and May 2016 bill.
const JUNE_BILL: u64 = 13481639;
const MAY_BILL: u64 = 13327977;

fn t(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("test timestamp")
        .with_timezone(&Utc)
}

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).expect("test decimal")
}

fn month(text: &str) -> Month {
    text.parse().expect("test month")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).expect("fixture JSON")
}

fn account() -> AccountInfo {
    parse_auth_status(&json(FIXTURE_AUTH_STATUS), SOURCE).expect("auth-status")
}

fn ctx(bill_id: &str, m: &str, is_final: bool) -> LineContext {
    LineContext {
        source: SOURCE.into(),
        account: account(),
        bill_id: bill_id.into(),
        month: month(m),
        is_final,
    }
}

fn cost(records: &[UsageRecord]) -> Decimal {
    records.iter().map(|r| r.billed_cost).sum()
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

fn provider(sim: &SakuraSimHandle, start: &str, use_csv: bool) -> SakuraProvider {
    let mut config = SakuraConfig::new(
        sim.endpoint.clone(),
        Secret::new(TOKEN),
        Secret::new(SECRET),
        month(start),
    );
    config.use_csv = use_csv;
    config.retry = fast_retry();
    config.timeout = Duration::from_secs(5);
    SakuraProvider::new(SOURCE.into(), config).expect("valid config")
}

async fn fixture_sim() -> SakuraSimHandle {
    SakuraSim::start(
        SakuraDataset::from_fixtures().expect("dataset"),
        TOKEN,
        SECRET,
    )
    .await
    .expect("simulator")
}

/// What one pipeline run does with a provider: plan, fetch every chunk in order, keep each
/// page's cursor. Returns the records of the run, and the months that were planned.
async fn run(
    p: &SakuraProvider,
    cursors: &mut Cursors,
    now: DateTime<Utc>,
) -> Result<(Vec<UsageRecord>, Vec<Month>), ProviderError> {
    let chunks = p.plan(cursors, now).await?;
    let mut records = Vec::new();
    let mut months = Vec::new();
    for chunk in &chunks {
        months.push(Month::of(chunk.window_start));
        let page = p.fetch(chunk, now).await?;
        records.extend(page.records);
        if let Some(c) = page.cursor {
            cursors.insert(chunk.stream.clone(), c);
        }
    }
    Ok((records, months))
}

fn by_key(records: &[UsageRecord]) -> BTreeMap<String, &UsageRecord> {
    records
        .iter()
        .map(|r| (r.natural_key_string(), r))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The manual's examples
// ---------------------------------------------------------------------------------------------

#[test]
fn auth_status_gives_account_id_and_member_code() {
    let a = account();
    assert_eq!(a.account_id, "000000526782");
    assert_eq!(a.member_code, "xxx000001");
    assert_eq!(a.account_code, "billTest");
    assert_eq!(a.account_name, "APIテスト用");
}

#[test]
fn auth_status_without_the_bill_permission_is_a_clear_error() {
    let text = FIXTURE_AUTH_STATUS.replace(
        r#""ExternalPermission": "bill""#,
        r#""ExternalPermission": "eventlog""#,
    );
    let err = parse_auth_status(&json(&text), SOURCE).expect_err("no bill permission");
    let msg = err.to_string();
    assert!(
        msg.contains(SOURCE) && msg.contains("Billing Information"),
        "{msg}"
    );
    // `bill+eventlog+cdn` style lists grant it.
    let text = FIXTURE_AUTH_STATUS.replace(
        r#""ExternalPermission": "bill""#,
        r#""ExternalPermission": "eventlog+bill+cdn""#,
    );
    assert!(parse_auth_status(&json(&text), SOURCE).is_ok());
}

#[test]
fn bills_fixture_parses_to_exact_sums() {
    let bills = parse_bills(&json(FIXTURE_BILLS), SOURCE).expect("bills");
    assert_eq!(bills.len(), 2);
    // 4330 + 4330 JPY, tax included.
    assert_eq!(bills.iter().map(|b| b.amount).sum::<Decimal>(), dec("8660"));
    assert_eq!(bills[0].bill_id, JUNE_BILL.to_string());
    assert_eq!(bills[1].bill_id, MAY_BILL.to_string());
    assert_eq!(bills[1].paid, Some(true));
    assert_eq!(
        bills[1].date.map(|d| Month::of(d.with_timezone(&Utc))),
        Some(month("2016-05"))
    );
}

#[test]
fn json_details_parse_to_exact_sums_and_are_named_through_the_price_list() {
    let prices = parse_price_list(&json(FIXTURE_PRICE_SYNTHETIC), SOURCE)
        .expect("price list")
        .list;
    let records = parse_bill_details(
        &json(FIXTURE_DETAILS),
        &ctx("13327977", "2016-05", true),
        &prices,
    )
    .expect("details");
    assert_eq!(records.len(), 3);
    // 0 + 108 + 540 JPY
    assert_eq!(cost(&records), dec("648"));
    // 2592000 + 2592000 + 2474113 seconds
    let usage: Decimal = records.iter().map(|r| r.consumed_quantity).sum();
    assert_eq!(usage, dec("7658113"));
    let iso = &records[1];
    assert_eq!(iso.sku_id.as_deref(), Some("50118"));
    assert_eq!(
        iso.charge_description.as_deref(),
        Some("ISOイメージアップロード/5GB")
    );
    assert_eq!(iso.service_name, "iso-image");
    assert_eq!(iso.resource_id, "112700654736");
    assert_eq!(iso.billed_cost, dec("108"));
    assert_eq!(iso.billing_currency, "JPY");
    assert_eq!(iso.consumed_unit, "seconds");
    assert_eq!(
        iso.natural_key,
        vec![
            ("account_id".into(), "000000526782".into()),
            ("bill_id".into(), "13327977".into()),
            ("contract_id".into(), "112700654736".into()),
            ("service_class_id".into(), "50118".into()),
        ]
    );
    assert!(records
        .iter()
        .all(|r| r.is_final && r.scope == "000000526782"));
}

#[test]
fn a_service_class_missing_from_the_price_list_stays_unnamed() {
    let records = parse_bill_details(
        &json(FIXTURE_DETAILS),
        &ctx("13327977", "2016-05", true),
        &Default::default(),
    )
    .expect("details");
    assert!(records.iter().all(|r| r.charge_description.is_none()));
    assert_eq!(cost(&records), dec("648"));
}

#[test]
fn csv_fixture_is_tax_excluded_price_plus_tax_with_japanese_names() {
    let records = parse_bill_csv(FIXTURE_CSV_BODY, &ctx("13327977", "2016-05", true)).expect("csv");
    assert_eq!(records.len(), 1);
    let r = &records[0];
    // 100 JPY excluding tax + 8 JPY consumption tax
    assert_eq!(r.billed_cost, dec("108"));
    assert_eq!(r.attributes["price_excl_tax"], "100");
    assert_eq!(r.attributes["tax"], "8");
    assert_eq!(
        r.charge_description.as_deref(),
        Some("ISOイメージアップロード/5GB")
    );
    assert_eq!(
        r.resource_name.as_deref(),
        Some("名称未設定 ISOイメージ 14ef10fedac")
    );
    assert_eq!(r.attributes["zone_name"], "石狩第2ゾーン");
    assert_eq!(r.attributes["month_of_use"], "2015/09");
    // 30 days × 24 + 0 hours
    assert_eq!(r.consumed_quantity, dec("720"));
    assert_eq!(r.consumed_unit, "hours");
    // The payment status changes after the month is final: never part of the content.
    assert!(!r.attributes.values().any(|v| v == "入金済み"));
}

#[test]
fn csv_and_json_details_give_the_same_natural_key_for_the_same_line() {
    let prices = parse_price_list(&json(FIXTURE_PRICE_SYNTHETIC), SOURCE)
        .unwrap()
        .list;
    let c = ctx("13327977", "2016-05", true);
    let from_json = parse_bill_details(&json(FIXTURE_DETAILS), &c, &prices).unwrap();
    let from_csv = parse_bill_csv(FIXTURE_CSV_BODY, &c).unwrap();
    assert_eq!(from_csv[0].natural_key, from_json[1].natural_key);
    assert_eq!(from_csv[0].billed_cost, from_json[1].billed_cost);
}

#[test]
fn csv_with_header_row_crlf_and_bom_reads_the_same_as_without() {
    let c = ctx("13327977", "2016-05", true);
    let plain = parse_bill_csv(FIXTURE_CSV_BODY, &c).unwrap();
    let header = "\"連番\",\"請求書番号\",\"利用月\",\"支払状況\",\"会員ID\",\"アカウントコード\",\"リソースID\",\"商品ID\",\"商品名\",\"ゾーンID\",\"ゾーン名\",\"日数\",\"時間\",\"税抜価格\",\"消費税\",\"リソース名\"";
    let body = format!("\u{feff}{header}\r\n{}\r\n", FIXTURE_CSV_BODY.trim_end());
    let with_header = parse_bill_csv(&body, &c).unwrap();
    assert_eq!(plain, with_header);
}

#[test]
fn csv_rows_with_the_wrong_column_count_are_refused() {
    let err =
        parse_bill_csv("\"1\",\"2\",\"3\"\r\n", &ctx("1", "2016-05", true)).expect_err("3 columns");
    let msg = err.to_string();
    assert!(
        msg.contains("billdetail/csv") && msg.contains("3 columns"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// Months, JST and finality
// ---------------------------------------------------------------------------------------------

#[test]
fn months_are_jst_calendar_months_in_utc() {
    let may = month("2016-05");
    assert_eq!(may.start_utc(), t("2016-04-30T15:00:00Z"));
    assert_eq!(may.end_utc(), t("2016-05-31T15:00:00Z"));
    assert_eq!(Month::of(t("2016-05-31T14:59:59Z")), may);
    assert_eq!(Month::of(t("2016-05-31T15:00:00Z")), month("2016-06"));
    assert_eq!(month("2015/09"), Month::new(2015, 9).unwrap());
    assert_eq!(month("2016-12").next(), month("2017-01"));
    assert!("2016-13".parse::<Month>().is_err());

    let r = &parse_bill_csv(FIXTURE_CSV_BODY, &ctx("1", "2016-05", true)).unwrap()[0];
    assert_eq!(r.charge_period_start, t("2016-04-30T15:00:00Z"));
    assert_eq!(r.charge_period_end, t("2016-05-31T15:00:00Z"));
}

#[tokio::test]
async fn a_month_becomes_final_after_the_first_of_the_next_month_plus_the_lag() {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-05", true);
    let may = month("2016-05");
    // Lag 1 day: final from 2016-06-02 00:00 JST = 2016-06-01T15:00:00Z.
    assert!(!p.is_final(may, t("2016-05-31T15:00:00Z")));
    assert!(!p.is_final(may, t("2016-06-01T14:59:59Z")));
    assert!(p.is_final(may, t("2016-06-01T15:00:00Z")));
}

#[tokio::test]
async fn running_and_previous_month_are_re_read_until_final_then_the_cursor_passes_them() {
    let sim = fixture_sim().await;
    // Without the look-back, which reads the months up to the cursor again (specified below).
    let p = provider_from_yaml(&sim, "start_month: 2016-04\nlook_back_months: 0\n");
    let mut cursors = Cursors::new();
    let stream = "account:000000526782";

    // 2016-06-01 10:00 JST: May is closed by SAKURA but within the lag; June is running.
    let now = t("2016-06-01T01:00:00Z");
    let (records, months) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(
        months,
        vec![month("2016-04"), month("2016-05"), month("2016-06")]
    );
    assert_eq!(records.len(), 6);
    assert!(records.iter().all(|r| !r.is_final));
    // April has no bill and is final: the cursor stops there.
    assert_eq!(cursors.get(stream).map(String::as_str), Some("2016-04"));

    // The same day again: May and June are read again.
    let (_, months) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(months, vec![month("2016-05"), month("2016-06")]);

    // 2016-06-02 01:00 JST: May is final, the cursor passes it; June is still re-read.
    let now = t("2016-06-01T16:00:00Z");
    let (records, months) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(months, vec![month("2016-05"), month("2016-06")]);
    let finals: Vec<bool> = records.iter().map(|r| r.is_final).collect();
    assert_eq!(finals, vec![true, true, true, false, false, false]);
    assert_eq!(cursors.get(stream).map(String::as_str), Some("2016-05"));
    let (_, months) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(months, vec![month("2016-06")]);

    // 2016-07-05: June is final too; after that only the running month (no bill) is asked.
    let now = t("2016-07-05T00:00:00Z");
    let (records, months) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(months, vec![month("2016-06"), month("2016-07")]);
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r.is_final));
    assert_eq!(cursors.get(stream).map(String::as_str), Some("2016-06"));

    sim.clear_requests();
    let (records, months) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(months, vec![month("2016-07")]);
    assert!(records.is_empty());
    // auth-status + the running month's bill list, nothing else.
    assert_eq!(sim.requests().len(), 2);
}

#[tokio::test]
async fn a_provisional_line_that_changes_keeps_its_natural_key_and_changes_its_content_hash() {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-06", true);
    let mut cursors = Cursors::new();
    let now = t("2016-06-15T00:00:00Z");
    let (first, _) = run(&p, &mut cursors, now).await.unwrap();

    // SAKURA regenerates the running month: line 2 (ISO image) now costs 200 + 16 tax.
    sim.set_detail_amount(JUNE_BILL, 2, dec("200"), dec("16"))
        .unwrap();
    let (second, _) = run(&p, &mut cursors, now).await.unwrap();

    let (a, b) = (by_key(&first), by_key(&second));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let changed: Vec<&String> = a
        .iter()
        .filter(|(k, r)| r.content_hash() != b[*k].content_hash())
        .map(|(k, _)| k)
        .collect();
    assert_eq!(changed.len(), 1);
    let after = b[changed[0]];
    assert_eq!(after.sku_id.as_deref(), Some("50118"));
    assert_eq!(after.billed_cost, dec("216"));
    assert_eq!(a[changed[0]].idempotency_key(), after.idempotency_key());
    assert_eq!(cost(&second), cost(&first) + dec("108"));

    // Once confirmed, the month no longer changes, and the final read differs only by finality.
    sim.finalize_month(month("2016-06"));
    assert!(sim
        .set_detail_amount(JUNE_BILL, 2, dec("1"), dec("0"))
        .is_err());
    let (last, _) = run(&p, &mut cursors, t("2016-07-02T00:00:00Z"))
        .await
        .unwrap();
    let c = by_key(&last);
    assert_eq!(c.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, r) in &c {
        assert!(r.is_final);
        assert_eq!(r.billed_cost, b[k].billed_cost);
        assert_ne!(r.content_hash(), b[k].content_hash());
    }
}

#[tokio::test]
async fn paying_a_bill_does_not_change_any_record() {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-05", true);
    let now = t("2016-07-05T00:00:00Z");
    let (before, _) = run(&p, &mut Cursors::new(), now).await.unwrap();
    sim.set_paid(month("2016-06"), true);
    let (after, _) = run(&p, &mut Cursors::new(), now).await.unwrap();
    let hashes = |rs: &[UsageRecord]| rs.iter().map(|r| r.content_hash()).collect::<Vec<_>>();
    assert_eq!(hashes(&before), hashes(&after));
}

// ---------------------------------------------------------------------------------------------
// JSON details and the price list through the simulator
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn json_mode_reads_the_price_list_once_per_run_and_names_every_line() {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-05", false);
    let now = t("2016-06-15T00:00:00Z");
    let (records, _) = run(&p, &mut Cursors::new(), now).await.unwrap();
    assert_eq!(records.len(), 6);
    assert_eq!(cost(&records), dec("1296"));
    assert!(records.iter().all(|r| r.charge_description.is_some()));
    assert!(records
        .iter()
        .all(|r| r.attributes["detail_source"] == "json"));
    assert_eq!(sim.count("public/price"), 1);
    // A second run reads it again (prices may change between runs), once.
    run(&p, &mut Cursors::new(), now).await.unwrap();
    assert_eq!(sim.count("public/price"), 2);
}

#[tokio::test]
async fn a_paged_price_list_is_read_to_the_end() {
    let sim = fixture_sim().await;
    sim.set_price_page_size(2);
    let p = provider(&sim, "2016-05", false);
    let prices = p.price_list().await.unwrap();
    assert_eq!(prices.classes.len(), 3);
    assert_eq!(sim.count("public/price"), 2);
}

#[tokio::test]
async fn csv_mode_and_json_mode_agree_on_keys_and_amounts() {
    let sim = fixture_sim().await;
    let now = t("2016-07-05T00:00:00Z");
    let (csv, _) = run(&provider(&sim, "2016-05", true), &mut Cursors::new(), now)
        .await
        .unwrap();
    let (js, _) = run(&provider(&sim, "2016-05", false), &mut Cursors::new(), now)
        .await
        .unwrap();
    let (a, b) = (by_key(&csv), by_key(&js));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, r) in &a {
        assert_eq!(r.billed_cost, b[k].billed_cost, "{k}");
        assert_eq!(r.charge_description, b[k].charge_description, "{k}");
    }
}

#[tokio::test]
async fn csv_without_header_row_from_the_simulator_reads_the_same() {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-05", true);
    let now = t("2016-07-05T00:00:00Z");
    let (with, _) = run(&p, &mut Cursors::new(), now).await.unwrap();
    sim.set_csv_header(false);
    let (without, _) = run(&p, &mut Cursors::new(), now).await.unwrap();
    assert_eq!(with, without);
}

#[tokio::test]
async fn generated_datasets_are_deterministic_and_sum_exactly() {
    let a = SakuraDataset::generate(7, month("2025-01"), 6, 25).unwrap();
    assert_eq!(
        a,
        SakuraDataset::generate(7, month("2025-01"), 6, 25).unwrap()
    );
    assert_ne!(
        a,
        SakuraDataset::generate(8, month("2025-01"), 6, 25).unwrap()
    );
    let expected: Decimal = (0..6)
        .scan(month("2025-01"), |m, _| {
            let this = *m;
            *m = m.next();
            Some(a.month_total(this))
        })
        .sum();
    let sim = SakuraSim::start(a, TOKEN, SECRET).await.unwrap();
    for use_csv in [true, false] {
        let p = provider(&sim, "2025-01", use_csv);
        let (records, _) = run(&p, &mut Cursors::new(), t("2025-08-01T00:00:00Z"))
            .await
            .unwrap();
        assert_eq!(records.len(), 150);
        assert_eq!(cost(&records), expected);
        let keys: HashMap<String, ()> = records
            .iter()
            .map(|r| (r.natural_key_string(), ()))
            .collect();
        assert_eq!(keys.len(), 150, "natural keys are unique");
    }
}

// ---------------------------------------------------------------------------------------------
// Paged bill details (envelope `Total`, `From`, `Count`; `?{"From":n,"Count":m}`)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bill_details_served_in_pages_are_read_to_the_last_line() {
    let ds = SakuraDataset::generate(3, month("2025-01"), 1, 7).unwrap();
    let expected = ds.month_total(month("2025-01"));
    let sim = SakuraSim::start(ds, TOKEN, SECRET).await.unwrap();
    // The API caps a page; the bill has 7 lines, a page 3: pages of 3, 3 and 1.
    sim.set_detail_page_size(3);
    for use_csv in [true, false] {
        sim.clear_requests();
        let p = provider(&sim, "2025-01", use_csv);
        let (records, _) = run(&p, &mut Cursors::new(), t("2025-03-01T00:00:00Z"))
            .await
            .unwrap();
        assert_eq!(
            records.len(),
            7,
            "use_csv {use_csv}: every line of the bill"
        );
        assert_eq!(cost(&records), expected, "use_csv {use_csv}");
        assert_eq!(by_key(&records).len(), 7, "no line read twice");
        assert!(
            records
                .iter()
                .all(|r| !r.natural_key_string().contains("occurrence")),
            "pages never repeat a line"
        );
        assert_eq!(sim.count("billdetail"), 3, "use_csv {use_csv}: three pages");
    }
}

/// A wiremock SAKURA whose detail calls answer `detail(from)` for the `From` asked (0 when the
/// query has none); the month 2016-06 has the one bill `JUNE_BILL`.
async fn paging_server(
    detail: impl Fn(u64) -> Value + Send + Sync + 'static,
) -> wiremock::MockServer {
    use wiremock::matchers::{method, path, path_regex};
    use wiremock::{Mock, MockServer, Request, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/cloud/zone/is1a/api/cloud/1.1/auth-status"))
        .respond_with(ResponseTemplate::new(200).set_body_string(FIXTURE_AUTH_STATUS))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/cloud/zone/is1a/api/cloud/1.1/public/price"))
        .respond_with(ResponseTemplate::new(200).set_body_string(FIXTURE_PRICE_SYNTHETIC))
        .mount(&server)
        .await;
    let bills = serde_json::json!({
        "is_ok": true, "Count": 1,
        "Bills": [{"PaymentClassID": 200, "Paid": false, "MemberID": "xxx000001",
                   "Date": "2016-06-10T00:00:00+09:00", "BillID": JUNE_BILL, "Amount": 540}]
    });
    Mock::given(method("GET"))
        .and(path_regex(r"/bill/by-contract/"))
        .respond_with(ResponseTemplate::new(200).set_body_json(bills))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path_regex(r"/billdetail/"))
        .respond_with(move |req: &Request| {
            let from = req
                .url
                .query()
                .map(|q| {
                    let q = q
                        .replace("%22", "\"")
                        .replace("%7B", "{")
                        .replace("%7D", "}");
                    serde_json::from_str::<Value>(&q).unwrap_or(Value::Null)
                })
                .and_then(|v| v.get("From").and_then(Value::as_u64))
                .unwrap_or(0);
            ResponseTemplate::new(200).set_body_json(detail(from))
        })
        .mount(&server)
        .await;
    server
}

fn wiremock_provider(server: &wiremock::MockServer, use_csv: bool) -> SakuraProvider {
    let mut config = SakuraConfig::new(
        format!("{}/cloud/zone/is1a/api/system/1.0", server.uri()),
        Secret::new(TOKEN),
        Secret::new(SECRET),
        month("2016-06"),
    );
    config.use_csv = use_csv;
    config.retry = fast_retry();
    config.timeout = Duration::from_secs(5);
    SakuraProvider::new(SOURCE.into(), config).expect("valid config")
}

fn csv_rows(indexes: &[u64]) -> String {
    indexes
        .iter()
        .map(|i| {
            format!(
                "\"{i}\",\"000000000\",\"2016/06\",\"未入金\",\"xxx000001\",\"billTest\",\"1127000000{i:02}\",\"50118\",\"ISOイメージアップロード/5GB\",\"is1b\",\"石狩第2ゾーン\",\"30\",\"0\",\"100\",\"8\",\"r{i}\"\r\n"
            )
        })
        .collect()
}

fn json_lines(indexes: &[u64]) -> Value {
    Value::Array(
        indexes
            .iter()
            .map(|i| {
                serde_json::json!({"Usage": 2592000, "ServiceClassID": 50118, "Index": i,
                                   "ContractID": format!("1127000000{i:02}"), "Amount": 108})
            })
            .collect(),
    )
}

async fn fetch_june(p: &SakuraProvider) -> Result<Vec<UsageRecord>, ProviderError> {
    let fetched = tokio::time::timeout(
        Duration::from_secs(10),
        run(p, &mut Cursors::new(), t("2016-06-20T00:00:00Z")),
    )
    .await
    .expect("the provider stops (no endless paging)");
    fetched.map(|(records, _)| records)
}

#[tokio::test]
async fn a_server_that_ignores_from_is_an_error_naming_the_bill_not_a_truncation() {
    // Total says 5 lines; every answer is the first page (From 0, 2 lines), whatever was asked.
    let server = paging_server(|_| {
        serde_json::json!({"is_ok": true, "Total": 5, "From": 0, "Count": 2,
            "BillDetails": json_lines(&[1, 2]), "Body": csv_rows(&[1, 2])})
    })
    .await;
    for use_csv in [true, false] {
        let err = fetch_june(&wiremock_provider(&server, use_csv))
            .await
            .expect_err("5 lines announced, 2 reachable: an error, not 2 records");
        let msg = err.to_string();
        assert!(
            msg.contains(SOURCE) && msg.contains(&JUNE_BILL.to_string()),
            "use_csv {use_csv}: names source and bill: {msg}"
        );
    }
}

#[tokio::test]
async fn a_server_that_answers_an_empty_page_before_the_total_is_an_error() {
    // Honours From, but the lines after the first page never come.
    let server = paging_server(|from| {
        let lines: Vec<u64> = if from == 0 { vec![1, 2] } else { vec![] };
        serde_json::json!({"is_ok": true, "Total": 5, "From": from, "Count": lines.len(),
            "BillDetails": json_lines(&lines), "Body": csv_rows(&lines)})
    })
    .await;
    for use_csv in [true, false] {
        let err = fetch_june(&wiremock_provider(&server, use_csv))
            .await
            .expect_err("no progress: an error");
        assert!(
            err.to_string().contains(&JUNE_BILL.to_string()),
            "use_csv {use_csv}: {err}"
        );
    }
}

#[tokio::test]
async fn a_page_that_counts_more_lines_than_it_carries_is_an_error() {
    // No Total, but Count 3 with 2 lines: a line is missing from the answer.
    let server = paging_server(|_| {
        serde_json::json!({"is_ok": true, "Count": 3,
            "BillDetails": json_lines(&[1, 2]), "Body": csv_rows(&[1, 2])})
    })
    .await;
    for use_csv in [true, false] {
        let err = fetch_june(&wiremock_provider(&server, use_csv))
            .await
            .expect_err("Count 3, 2 lines");
        assert!(
            err.to_string().contains(&JUNE_BILL.to_string()),
            "use_csv {use_csv}: {err}"
        );
    }
}

#[tokio::test]
async fn the_manuals_single_page_answer_without_total_is_read_as_complete() {
    let server = paging_server(|_| {
        serde_json::json!({"is_ok": true, "Count": 3,
            "BillDetails": json_lines(&[1, 2, 3]), "Body": csv_rows(&[1, 2, 3])})
    })
    .await;
    for use_csv in [true, false] {
        let records = fetch_june(&wiremock_provider(&server, use_csv))
            .await
            .unwrap();
        assert_eq!(records.len(), 3, "use_csv {use_csv}");
    }
}

/// Plan a run at 2016-07-05 (June is final, July running) and fetch only June's chunk (the
/// paging server lists its bill for every month), keeping the page's cursor like the pipeline.
async fn fetch_final_june(
    p: &SakuraProvider,
    cursors: &mut Cursors,
) -> Result<Vec<UsageRecord>, ProviderError> {
    let now = t("2016-07-05T00:00:00Z");
    let fetched = tokio::time::timeout(Duration::from_secs(10), async {
        let chunks = p.plan(cursors, now).await?;
        let june = chunks
            .iter()
            .find(|c| Month::of(c.window_start) == month("2016-06"))
            .expect("June is planned");
        let page = p.fetch(june, now).await?;
        if let Some(c) = page.cursor {
            cursors.insert(june.stream.clone(), c);
        }
        Ok(page.records)
    })
    .await;
    fetched.expect("the provider stops (no endless paging)")
}

/// [`fetch_final_june`], which must refuse the month: its error message (a panic naming what
/// was accepted otherwise).
async fn refused_final_june(p: &SakuraProvider, cursors: &mut Cursors, use_csv: bool) -> String {
    match fetch_final_june(p, cursors).await {
        Err(e) => e.to_string(),
        Ok(records) => panic!(
            "use_csv {use_csv}: accepted {} records, sequence numbers {:?}, cursor {:?}",
            records.len(),
            seqs(&records),
            cursors
        ),
    }
}

/// The sequence numbers (CSV `seq`, JSON `index`) of the records, in order.
fn seqs(records: &[UsageRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            let a = &r.attributes;
            a.get("seq")
                .or_else(|| a.get("index"))
                .map(|s| s.to_string())
                .unwrap_or_default()
        })
        .collect()
}

/// A page of the paging server's bill: `Total`, `From` and the lines with these sequence
/// numbers (108 JPY each; five make the bill's 540), as JSON lines and as a CSV body.
fn detail_page(total: u64, from: u64, lines: &[u64]) -> Value {
    serde_json::json!({"is_ok": true, "Total": total, "From": from, "Count": lines.len(),
        "BillDetails": json_lines(lines), "Body": csv_rows(lines)})
}

/// The reviewer's scenario. The bill's details come in pages of two. Page 1 says `Total` 4 and
/// carries lines 1 and 2; before page 2 is asked SAKURA regenerates the details with a line 0
/// inserted ahead of the boundary, so page 2 (`From` 2) says `Total` 5 and carries lines 2, 3
/// and 4. Accepted, line 2 would be two records (the second keyed `occurrence=2`) and line 0
/// never read; 1+2+2+3+4 still add up to the bill's 540 JPY, so the final month would not be
/// held and the cursor would pass it: line 2 billed twice, for good. Pages whose `Total`
/// differ are refused as a whole (read again once, then an error naming the bill and both
/// totals): nothing of the month is returned, the cursor stays, and a later run that gets a
/// consistent answer reads every line once.
#[tokio::test]
async fn pages_whose_total_changes_between_pages_fail_the_bill_and_keep_the_cursor() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    for use_csv in [true, false] {
        let settled = Arc::new(AtomicBool::new(false));
        let s = settled.clone();
        let server = paging_server(move |from| match (s.load(Ordering::SeqCst), from) {
            (false, 0) => detail_page(4, 0, &[1, 2]),
            (false, _) => detail_page(5, from, &[2, 3, 4]),
            (true, 0) => detail_page(5, 0, &[0, 1]),
            (true, _) => detail_page(5, from, &[2, 3, 4]),
        })
        .await;
        let p = wiremock_provider(&server, use_csv);
        let mut cursors = Cursors::new();
        let msg = refused_final_june(&p, &mut cursors, use_csv).await;
        assert!(
            msg.contains(SOURCE)
                && msg.contains(&JUNE_BILL.to_string())
                && msg.contains("billdetail")
                && msg.contains("`Total` was 4")
                && msg.contains("is 5"),
            "use_csv {use_csv}: names source, bill, call and both totals: {msg}"
        );
        assert!(cursors.is_empty(), "use_csv {use_csv}: cursor unchanged");

        // SAKURA has finished regenerating: the next run reads each line once.
        settled.store(true, Ordering::SeqCst);
        let records = fetch_final_june(&p, &mut cursors).await.unwrap();
        assert_eq!(
            seqs(&records),
            ["0", "1", "2", "3", "4"],
            "use_csv {use_csv}"
        );
        assert_eq!(cost(&records), dec("540"), "use_csv {use_csv}");
        assert!(
            records
                .iter()
                .all(|r| !r.natural_key_string().contains("occurrence")),
            "use_csv {use_csv}: no line twice"
        );
        assert_eq!(
            cursors.values().next().map(String::as_str),
            Some("2016-06"),
            "use_csv {use_csv}: the consistent final month moves the cursor"
        );
    }
}

/// The same regeneration, once: the first read's pages disagree (`Total` 4, then 5), so the
/// bill is read again from the start within the same fetch, and that read is consistent. Every
/// line comes once and the month moves the cursor without waiting for the next run.
#[tokio::test]
async fn pages_that_disagree_once_are_read_again_within_the_same_fetch() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    for use_csv in [true, false] {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let server = paging_server(move |from| {
            // Only the very first detail answer predates the regeneration.
            let old = c.fetch_add(1, Ordering::SeqCst) == 0;
            match (old, from) {
                (true, _) => detail_page(4, 0, &[1, 2]),
                (false, 0) => detail_page(5, 0, &[0, 1]),
                (false, _) => detail_page(5, from, &[2, 3, 4]),
            }
        })
        .await;
        let p = wiremock_provider(&server, use_csv);
        let mut cursors = Cursors::new();
        let records = fetch_final_june(&p, &mut cursors).await.unwrap();
        assert_eq!(
            seqs(&records),
            ["0", "1", "2", "3", "4"],
            "use_csv {use_csv}"
        );
        assert_eq!(cost(&records), dec("540"), "use_csv {use_csv}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "use_csv {use_csv}: two reads of two pages"
        );
        assert_eq!(
            cursors.values().next().map(String::as_str),
            Some("2016-06"),
            "use_csv {use_csv}"
        );
    }
}

/// A page that repeats a line of an earlier page (the same sequence number: CSV "seq no. in
/// bill", JSON `Index`) has shifted even when `Total` stayed the same (a line removed ahead of
/// the boundary and another added after it): the repeated line would be billed twice. Refused
/// like a changed `Total`, naming the bill and the sequence number; nothing is returned and the
/// cursor stays.
#[tokio::test]
async fn a_page_repeating_a_line_of_an_earlier_page_is_refused_even_with_the_same_total() {
    let server = paging_server(|from| match from {
        0 => detail_page(5, 0, &[1, 2]),
        _ => detail_page(5, from, &[2, 3, 4]),
    })
    .await;
    for use_csv in [true, false] {
        let p = wiremock_provider(&server, use_csv);
        let mut cursors = Cursors::new();
        let msg = refused_final_june(&p, &mut cursors, use_csv).await;
        assert!(
            msg.contains(&JUNE_BILL.to_string()) && msg.contains("sequence number 2"),
            "use_csv {use_csv}: names the bill and the repeated line: {msg}"
        );
        assert!(cursors.is_empty(), "use_csv {use_csv}: cursor unchanged");
    }
}

/// Distinct lines that share contract, service class and amount (different sequence numbers),
/// on both sides of a page boundary, are still one record each, keyed as before the paging
/// checks: the first plainly, the others `occurrence=2`, `occurrence=3` in provider order.
#[tokio::test]
async fn distinct_lines_with_the_same_content_across_pages_stay_separate_records() {
    let row = |i: u64| {
        format!(
            "\"{i}\",\"000000000\",\"2016/06\",\"未入金\",\"xxx000001\",\"billTest\",\"112700000001\",\"50118\",\"ISOイメージアップロード/5GB\",\"is1b\",\"石狩第2ゾーン\",\"30\",\"0\",\"100\",\"8\",\"r\"\r\n"
        )
    };
    let line = |i: u64| {
        serde_json::json!({"Usage": 2592000, "ServiceClassID": 50118, "Index": i,
                           "ContractID": "112700000001", "Amount": 108})
    };
    let server = paging_server(move |from| {
        let lines: Vec<u64> = if from == 0 { vec![1, 2] } else { vec![3] };
        serde_json::json!({"is_ok": true, "Total": 3, "From": from, "Count": lines.len(),
            "BillDetails": lines.iter().map(|i| line(*i)).collect::<Vec<_>>(),
            "Body": lines.iter().map(|i| row(*i)).collect::<String>()})
    })
    .await;
    for use_csv in [true, false] {
        let records = fetch_june(&wiremock_provider(&server, use_csv))
            .await
            .unwrap();
        let keys: Vec<String> = records.iter().map(|r| r.natural_key_string()).collect();
        let base = format!(
            "{SOURCE}|account_id={}|bill_id={JUNE_BILL}|contract_id=112700000001|service_class_id=50118",
            account().account_id
        );
        assert_eq!(
            keys,
            [
                base.clone(),
                format!("{base}|occurrence=2"),
                format!("{base}|occurrence=3")
            ],
            "use_csv {use_csv}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and retries
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_sakura_error_body_names_provider_call_and_message() {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-05", true);
    let now = t("2016-06-15T00:00:00Z");
    let chunks = p.plan(&Cursors::new(), now).await.unwrap();
    sim.fail_next_on(
        "billdetail",
        1,
        Fault::Api {
            status: 400,
            code: "bad_request".into(),
            message: "不正な請求書番号です".into(),
        },
    );
    let err = p.fetch(&chunks[0], now).await.expect_err("error body");
    match &err {
        ProviderError::Api {
            provider,
            call,
            code,
            message,
        } => {
            assert_eq!(provider, SOURCE);
            assert_eq!(call, "billdetail/csv");
            assert_eq!(code, "bad_request");
            assert!(message.contains("不正な請求書番号です"), "{message}");
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(SOURCE)
            && msg.contains("billdetail/csv")
            && msg.contains("不正な請求書番号です"),
        "{msg}"
    );
}

#[tokio::test]
async fn an_error_on_a_bills_details_names_the_bill() {
    let sim = fixture_sim().await;
    let now = t("2016-06-15T00:00:00Z");
    for use_csv in [true, false] {
        let p = provider(&sim, "2016-05", use_csv);
        let chunks = p.plan(&Cursors::new(), now).await.unwrap();
        for fault in [
            Fault::Http(404),
            Fault::Api {
                status: 404,
                code: "not_found".into(),
                message: "リソースが見つかりません".into(),
            },
        ] {
            sim.fail_next_on("billdetail", 1, fault.clone());
            let err = p.fetch(&chunks[0], now).await.expect_err("404");
            let msg = err.to_string();
            assert!(
                msg.contains("billdetail") && msg.contains(&MAY_BILL.to_string()),
                "use_csv {use_csv}, {fault:?}: the operator can tell which bill failed: {msg}"
            );
        }
    }
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-05", true);
    sim.fail_next(2, Fault::Http(500));
    sim.fail_next(
        1,
        Fault::RateLimited {
            retry_after_secs: 0,
        },
    );
    let (records, _) = run(&p, &mut Cursors::new(), t("2016-06-15T00:00:00Z"))
        .await
        .unwrap();
    assert_eq!(records.len(), 6);
    let auth_calls = sim.count("auth-status");
    assert_eq!(auth_calls, 4, "three failures, then success");
}

#[tokio::test]
async fn persistent_server_errors_give_up_naming_the_call() {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-05", true);
    sim.fail_next(10, Fault::Http(503));
    let err = p
        .plan(&Cursors::new(), t("2016-06-15T00:00:00Z"))
        .await
        .expect_err("gives up");
    let msg = err.to_string();
    assert!(
        msg.contains(SOURCE) && msg.contains("auth-status") && msg.contains("503"),
        "{msg}"
    );
    assert_eq!(sim.count("auth-status"), 4, "1 attempt + 3 retries");
}

#[tokio::test]
async fn a_wrong_secret_is_a_clear_authentication_error_without_retries() {
    let sim = fixture_sim().await;
    let mut config = SakuraConfig::new(
        sim.endpoint.clone(),
        Secret::new(TOKEN),
        Secret::new("wrong"),
        month("2016-05"),
    );
    config.retry = fast_retry();
    let p = SakuraProvider::new(SOURCE.into(), config).unwrap();
    let err = p
        .plan(&Cursors::new(), t("2016-06-15T00:00:00Z"))
        .await
        .expect_err("401");
    let msg = err.to_string();
    assert!(
        msg.contains("401") && msg.contains("authentication failed"),
        "{msg}"
    );
    assert!(!msg.contains("wrong"), "the secret never appears: {msg}");
    assert_eq!(sim.count("auth-status"), 1);
}

#[tokio::test]
async fn a_key_without_billing_permission_is_refused_clearly() {
    let sim = fixture_sim().await;
    sim.set_external_permission("eventlog");
    let p = provider(&sim, "2016-05", true);
    let err = p
        .plan(&Cursors::new(), t("2016-06-15T00:00:00Z"))
        .await
        .expect_err("no bill");
    assert!(err.to_string().contains("Billing Information"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn configuration_reads_with_defaults_and_refuses_unknown_keys() {
    std::env::set_var("BILLSYNC_TEST_SAKURA_TOKEN", "tok");
    std::env::set_var("BILLSYNC_TEST_SAKURA_SECRET", "sec");
    let c = SakuraConfig::from_str(
        "token: env:BILLSYNC_TEST_SAKURA_TOKEN\nsecret: env:BILLSYNC_TEST_SAKURA_SECRET\nstart_month: 2024-04\n",
    )
    .expect("config");
    assert_eq!(
        c.endpoint,
        "https://secure.sakura.ad.jp/cloud/zone/is1a/api/system/1.0"
    );
    assert_eq!(c.start_month, month("2024-04"));
    assert_eq!(c.final_lag, chrono::Duration::days(1));
    assert!(c.use_csv);
    assert!(!c.push_provisional);
    assert_eq!(format!("{:?}", c.secret), "Secret(***)");
    assert!(SakuraProvider::new("s".into(), c.clone()).is_ok());

    let err = SakuraConfig::from_str(
        "token: env:BILLSYNC_TEST_SAKURA_TOKEN\nsecret: env:BILLSYNC_TEST_SAKURA_SECRET\nstart_month: 2024-04\nzone: is1a\n",
    )
    .expect_err("unknown key");
    assert!(err.contains("zone"), "{err}");
    assert!(SakuraConfig::from_str(
        "token: env:BILLSYNC_TEST_SAKURA_TOKEN\nsecret: plain-text\nstart_month: 2024-04\n"
    )
    .is_err());

    let settings: billsync::config::ProviderSettings = serde_yaml_ng::from_str(
        "kind: sakura\ntoken: env:BILLSYNC_TEST_SAKURA_TOKEN\nsecret: env:BILLSYNC_TEST_SAKURA_SECRET\nstart_month: 2024-04\nfinal_lag: 2d\nuse_csv: false\n",
    )
    .expect("provider settings");
    assert!(
        matches!(settings, billsync::config::ProviderSettings::Sakura(ref c) if c.final_lag == chrono::Duration::days(2) && !c.use_csv)
    );
}

#[test]
fn an_endpoint_that_is_not_the_billing_base_needs_a_cloud_endpoint() {
    let mut c = SakuraConfig::new(
        "https://example.test/billing",
        Secret::new("a"),
        Secret::new("b"),
        month("2024-01"),
    );
    let err = SakuraProvider::new("s".into(), c.clone()).expect_err("no cloud base");
    assert!(err.to_string().contains("cloud_endpoint"), "{err}");
    c.cloud_endpoint = Some("https://example.test/cloud".into());
    assert!(SakuraProvider::new("s".into(), c).is_ok());
}

#[tokio::test]
async fn a_chunk_fetched_by_a_fresh_provider_gives_the_same_records() {
    let sim = fixture_sim().await;
    let now = t("2016-06-15T00:00:00Z");
    let planner = provider(&sim, "2016-05", true);
    let chunks = planner.plan(&Cursors::new(), now).await.unwrap();
    let planned = planner.fetch(&chunks[0], now).await.unwrap().records;
    let fresh = provider(&sim, "2016-05", true);
    let unplanned = fresh.fetch(&chunks[0], now).await.unwrap().records;
    assert_eq!(planned, unplanned);
}

// ---------------------------------------------------------------------------------------------
// Final months: the cursor passes a month only once its lines add up to its bills, and the
// months just before the cursor are read again for bills SAKURA lists late
// ---------------------------------------------------------------------------------------------

const STREAM: &str = "account:000000526782";

fn of_month<'a>(records: &'a [UsageRecord], m: &str) -> Vec<&'a UsageRecord> {
    records
        .iter()
        .filter(|r| r.attributes.get("month").map(|v| v.as_str()) == Some(m))
        .collect()
}

fn of_bill(records: &[UsageRecord], bill: u64) -> Vec<&UsageRecord> {
    let id = bill.to_string();
    records
        .iter()
        .filter(|r| r.attributes.get("bill_id").map(|v| v.as_str()) == Some(id.as_str()))
        .collect()
}

/// A copy of the simulator's bill of `like` (its three lines, 648 JPY), listed for `m` as
/// bill `id`: a bill SAKURA lists after the cursor passed its month.
fn late_bill(sim: &SakuraSimHandle, like: u64, id: u64, m: &str) -> SimBill {
    let mut bill = sim
        .dataset()
        .bills
        .into_iter()
        .find(|b| b.bill_id == like)
        .expect("bill to copy");
    bill.bill_id = id;
    bill.month = month(m);
    bill.date = billing_date(month(m));
    bill.finalized = true;
    bill
}

#[tokio::test]
async fn a_final_month_whose_lines_miss_the_bill_amount_is_read_again_and_the_cursor_waits() {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-05", true);
    let mut cursors = Cursors::new();
    // May's bill says 648 JPY, but its details list only 0 + 108 so far (540 not generated yet).
    sim.withhold_details(MAY_BILL, 1);
    let now = t("2016-06-15T00:00:00Z"); // May final, June running
    let (records, months) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(months, vec![month("2016-05"), month("2016-06")]);
    let may = of_month(&records, "2016-05");
    assert_eq!(may.len(), 2, "the lines SAKURA lists are staged");
    assert!(may.iter().all(|r| r.is_final));
    assert_eq!(
        cursors.get(STREAM),
        None,
        "May's lines add up to 108 of its bill's 648 JPY: the cursor must not pass May"
    );

    // The next run reads May again; once the last line is listed, it comes and May is done.
    sim.withhold_details(MAY_BILL, 0);
    let (records, months) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(months, vec![month("2016-05"), month("2016-06")]);
    let may = of_month(&records, "2016-05");
    assert_eq!(may.len(), 3);
    assert_eq!(
        may.iter().map(|r| r.billed_cost).sum::<Decimal>(),
        dec("648")
    );
    assert_eq!(cursors.get(STREAM).map(String::as_str), Some("2016-05"));
}

#[tokio::test]
async fn a_month_held_for_missing_lines_keeps_later_final_months_from_moving_the_cursor() {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-04", true);
    let mut cursors = Cursors::new();
    sim.withhold_details(MAY_BILL, 1);
    let now = t("2016-07-05T00:00:00Z"); // April, May and June final; July running
    let (records, _) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(of_month(&records, "2016-06").len(), 3, "June is complete");
    assert_eq!(
        cursors.get(STREAM).map(String::as_str),
        Some("2016-04"),
        "April (no bill) is done, May is not: June's page must not carry the cursor past May"
    );
    // May is read again (April too: the look-back reads the months up to the cursor again).
    let (_, months) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(
        months,
        vec![
            month("2016-04"),
            month("2016-05"),
            month("2016-06"),
            month("2016-07")
        ]
    );

    sim.withhold_details(MAY_BILL, 0);
    let (records, _) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(of_month(&records, "2016-05").len(), 3);
    assert_eq!(cursors.get(STREAM).map(String::as_str), Some("2016-06"));
}

#[tokio::test]
async fn a_bill_listed_late_for_a_final_month_that_had_none_is_found_by_the_look_back() {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-04", true);
    let mut cursors = Cursors::new();
    let now = t("2016-06-15T00:00:00Z");
    // April has no bill (yet), May has one: both are final and the cursor passes them.
    let (records, _) = run(&p, &mut cursors, now).await.unwrap();
    assert!(of_month(&records, "2016-04").is_empty());
    assert_eq!(cursors.get(STREAM).map(String::as_str), Some("2016-05"));

    // SAKURA lists a bill for April afterwards.
    sim.add_bill(late_bill(&sim, MAY_BILL, 13200001, "2016-04"));
    let (records, months) = run(&p, &mut cursors, now).await.unwrap();
    assert!(
        months.contains(&month("2016-04")),
        "April is within the look-back and must be read again: {months:?}"
    );
    let april = of_bill(&records, 13200001);
    assert_eq!(april.len(), 3);
    assert_eq!(
        april.iter().map(|r| r.billed_cost).sum::<Decimal>(),
        dec("648")
    );
    assert!(april.iter().all(|r| r.is_final));
    assert_eq!(cursors.get(STREAM).map(String::as_str), Some("2016-05"));
}

#[tokio::test]
async fn a_second_bill_listed_late_for_a_month_the_cursor_passed_is_found_and_the_first_is_unchanged(
) {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-05", true);
    let mut cursors = Cursors::new();
    let now = t("2016-07-05T00:00:00Z");
    let (first, _) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(cursors.get(STREAM).map(String::as_str), Some("2016-06"));

    sim.add_bill(late_bill(&sim, MAY_BILL, 13500001, "2016-05"));
    let (second, _) = run(&p, &mut cursors, now).await.unwrap();
    let late = of_bill(&second, 13500001);
    assert_eq!(late.len(), 3, "the late May bill's lines are pulled");
    // What was read before is read again with the same keys and content: no-ops in the ledger.
    let before = by_key(&first);
    for r in of_bill(&second, MAY_BILL)
        .into_iter()
        .chain(of_bill(&second, JUNE_BILL))
    {
        let old = before[&r.natural_key_string()];
        assert_eq!(old.idempotency_key(), r.idempotency_key());
        assert_eq!(old.content_hash(), r.content_hash());
    }
    assert_eq!(cursors.get(STREAM).map(String::as_str), Some("2016-06"));
}

#[tokio::test]
async fn a_late_bill_whose_lines_are_incomplete_is_read_again_while_in_the_look_back_and_the_cursor_stays(
) {
    let sim = fixture_sim().await;
    let p = provider(&sim, "2016-05", true);
    let mut cursors = Cursors::new();
    let now = t("2016-07-05T00:00:00Z");
    run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(cursors.get(STREAM).map(String::as_str), Some("2016-06"));

    // A late May bill whose details are still being generated: what it lists is staged, and
    // May is read again by the next runs (it is within the look-back); the cursor neither
    // moves back (a person may have accepted May with `ledger set-cursor`) nor forward.
    sim.add_bill(late_bill(&sim, MAY_BILL, 13500001, "2016-05"));
    sim.withhold_details(13500001, 2);
    let (records, _) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(of_bill(&records, 13500001).len(), 1);
    assert_eq!(cursors.get(STREAM).map(String::as_str), Some("2016-06"));

    sim.withhold_details(13500001, 0);
    let (records, months) = run(&p, &mut cursors, now).await.unwrap();
    assert_eq!(months.first(), Some(&month("2016-05")));
    assert_eq!(of_bill(&records, 13500001).len(), 3);
    assert_eq!(cursors.get(STREAM).map(String::as_str), Some("2016-06"));
}

/// A provider on the simulator configured from YAML (the settings a user writes).
fn provider_from_yaml(sim: &SakuraSimHandle, yaml: &str) -> SakuraProvider {
    std::env::set_var("BILLSYNC_TEST_SAKURA_TOKEN", TOKEN);
    std::env::set_var("BILLSYNC_TEST_SAKURA_SECRET", SECRET);
    let mut c = SakuraConfig::from_str(&format!(
        "endpoint: {}\ntoken: env:BILLSYNC_TEST_SAKURA_TOKEN\nsecret: env:BILLSYNC_TEST_SAKURA_SECRET\n{yaml}",
        sim.endpoint
    ))
    .expect("config");
    c.retry = fast_retry();
    SakuraProvider::new(SOURCE.into(), c).expect("valid config")
}

async fn planned(p: &SakuraProvider, cursor: Option<&str>, now: DateTime<Utc>) -> Vec<Month> {
    let mut cursors = Cursors::new();
    if let Some(c) = cursor {
        cursors.insert(STREAM.into(), c.into());
    }
    p.plan(&cursors, now)
        .await
        .unwrap()
        .iter()
        .map(|c| Month::of(c.window_start))
        .collect()
}

#[tokio::test]
async fn the_look_back_reads_the_last_look_back_months_up_to_the_cursor_again_never_before_start() {
    let sim = fixture_sim().await;
    let now = t("2016-07-05T00:00:00Z");
    let months = |m: &[&str]| m.iter().map(|m| month(m)).collect::<Vec<_>>();
    assert_eq!(month("2016-02").back(3), month("2015-11"));
    assert_eq!(month("2016-02").back(0), month("2016-02"));
    assert_eq!(month("2016-02").back(26), month("2013-12"));

    // Default: the three months up to the cursor, then what follows it.
    let p = provider_from_yaml(&sim, "start_month: 2016-01\n");
    assert_eq!(p.config().look_back_months, 3);
    assert_eq!(
        planned(&p, Some("2016-06"), now).await,
        months(&["2016-04", "2016-05", "2016-06", "2016-07"])
    );
    // Never before `start_month`, and a ledger without a cursor starts there.
    let p = provider_from_yaml(&sim, "start_month: 2016-05\n");
    assert_eq!(
        planned(&p, Some("2016-06"), now).await,
        months(&["2016-05", "2016-06", "2016-07"])
    );
    assert_eq!(
        planned(&p, None, now).await,
        months(&["2016-05", "2016-06", "2016-07"])
    );
    // Configurable; 0 reads nothing the cursor passed.
    let p = provider_from_yaml(&sim, "start_month: 2016-01\nlook_back_months: 1\n");
    assert_eq!(
        planned(&p, Some("2016-06"), now).await,
        months(&["2016-06", "2016-07"])
    );
    let p = provider_from_yaml(&sim, "start_month: 2016-01\nlook_back_months: 0\n");
    assert_eq!(
        planned(&p, Some("2016-06"), now).await,
        months(&["2016-07"])
    );
}
