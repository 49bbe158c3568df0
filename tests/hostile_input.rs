//! Hostile input: every provider parser and the mapping engine get arbitrary JSON, mutated
//! fixtures, truncated text and arbitrary strings. None may panic; each answers a value or a
//! typed error.
//!
//! Cases per property: 256 in the default suite; 10,000 in the `#[ignore]`d `soak_*` variants,
//! run by hand (`cargo test --release --test hostile_input -- --ignored`: minutes per parser in
//! a debug build); `BILLSYNC_PROPTEST_CASES` overrides both.

#[path = "common/metalsoft.rs"]
mod metalsoft_fixtures;

use std::collections::BTreeMap;
use std::str::FromStr;

use billsync::mapping::MappingSet;
use billsync::providers::jelastic::{parse_response, HistoryContext, Period};
use billsync::providers::metalsoft::{parse_report, parse_report_str, ReportContext};
use billsync::providers::sakura::{
    parse_auth_status, parse_bill_csv, parse_bill_details, parse_bills, parse_price_list,
    AccountInfo, LineContext, PriceList,
};
use billsync::providers::softlayer::{
    parse_invoice_items, parse_invoice_items_str, parse_next_items_str, InvoiceContext,
    InvoiceHeader, NextContext,
};
use billsync::providers::ProviderError;
use billsync::record::UsageRecord;
use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rust_decimal::Decimal;
use serde_json::{Map, Number, Value};

/// Cases per property in the default suite (`BILLSYNC_PROPTEST_CASES` overrides).
const QUICK: u32 = 256;
/// Cases per property in the `#[ignore]`d soak variants (`-- --ignored`).
const SOAK: u32 = 10_000;

thread_local! {
    static CASES: std::cell::Cell<u32> = const { std::cell::Cell::new(QUICK) };
}

fn runner() -> TestRunner {
    let cases = std::env::var("BILLSYNC_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| CASES.with(|c| c.get()));
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn t(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

// ----- strategies -----------------------------------------------------------------------

/// Number texts that stress exact-decimal parsing: huge, tiny, exponents, negative zero.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (any::<i64>(), 0u32..30).prop_map(|(n, s)| {
            Number::from_str(&Decimal::new(n, s.min(28)).to_string())
                .map(Value::Number)
                .unwrap_or(Value::Null)
        }),
        prop::sample::select(vec![
            "1e400",
            "-1e400",
            "1e-400",
            "-0",
            "0.0000000000000000000000000000001",
            "79228162514264337593543950336",
            "-79228162514264337593543950336",
            "123456789012345678901234567890.123456789",
            "3.4028236692093846346e38",
            "1E+28",
        ])
        .prop_map(|s| Number::from_str(s)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
    ]
}

/// Strings that look like the fields the parsers read (times, decimals, units, ids) and
/// arbitrary text.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".*",
        prop::sample::select(vec![
            "",
            " ",
            "0",
            "-1",
            "1.5",
            "NaN",
            "Infinity",
            "1e309",
            "99999999999999999999999999999999",
            "2016-10-31T09:00:00Z",
            "2016-10-31 09:00:00",
            "9999-12-31T23:59:59Z",
            "0000-00-00T00:00:00Z",
            "2016-13-45T99:99:99Z",
            "-262144-01-01T00:00:00Z",
            "seconds",
            "gbytes",
            "hours",
            "GBP",
            "JPY",
            "instance",
            "1",
            "2024-04-01T00:00:00+09:00",
            "2024/04/01 00:00:00",
            "1700000000",
            "\u{0}",
            "é\u{301}",
        ])
        .prop_map(str::to_string),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ]
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Every path (object keys and array indexes) of a value.
fn paths(v: &Value, here: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                here.push(PathStep::Key(k.clone()));
                paths(child, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                here.push(PathStep::Index(i));
                paths(child, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn at_mut<'a>(v: &'a mut Value, path: &[PathStep]) -> Option<&'a mut Value> {
    let mut cur = v;
    for step in path {
        cur = match (step, cur) {
            (PathStep::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (PathStep::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(Value),
    Remove,
    Duplicate,
}

/// A fixture with up to four subtrees replaced by arbitrary JSON, removed or duplicated:
/// close enough to the real shape to get deep into the parser.
fn mutated(fixture: Value) -> impl Strategy<Value = Value> {
    let mut all = Vec::new();
    paths(&fixture, &mut Vec::new(), &mut all);
    let n = all.len();
    let mutation = prop_oneof![
        6 => arbitrary_json().prop_map(Mutation::Replace),
        2 => leaf().prop_map(Mutation::Replace),
        1 => Just(Mutation::Remove),
        1 => Just(Mutation::Duplicate),
    ];
    prop::collection::vec((0..n, mutation), 1..5).prop_map(move |muts| {
        let mut v = fixture.clone();
        for (i, m) in muts {
            let path = &all[i];
            match m {
                Mutation::Replace(new) => {
                    if let Some(slot) = at_mut(&mut v, path) {
                        *slot = new;
                    }
                }
                Mutation::Remove | Mutation::Duplicate => {
                    let Some((last, parent)) = path.split_last() else {
                        continue;
                    };
                    let Some(parent) = at_mut(&mut v, parent) else {
                        continue;
                    };
                    match (last, parent, &m) {
                        (PathStep::Key(k), Value::Object(map), Mutation::Remove) => {
                            map.remove(k);
                        }
                        (PathStep::Index(i), Value::Array(a), Mutation::Remove) if *i < a.len() => {
                            a.remove(*i);
                        }
                        (PathStep::Index(i), Value::Array(a), Mutation::Duplicate)
                            if *i < a.len() =>
                        {
                            let copy = a[*i].clone();
                            a.push(copy);
                        }
                        _ => {}
                    }
                }
            }
        }
        v
    })
}

/// JSON for a parser: a mutated fixture most of the time, arbitrary JSON otherwise.
fn json_input(fixture: &str) -> impl Strategy<Value = Value> {
    let fixture: Value = serde_json::from_str(fixture).expect("fixture JSON");
    prop_oneof![
        4 => mutated(fixture),
        1 => arbitrary_json(),
    ]
}

/// Text for a `_str` parser: the fixture cut anywhere, with a byte flipped, a mutated
/// fixture's text, or arbitrary text.
fn text_input(fixture: &'static str) -> impl Strategy<Value = String> {
    let len = fixture.len();
    prop_oneof![
        2 => (0..=len).prop_map(move |cut| {
            let cut = (0..=cut).rev().find(|&i| fixture.is_char_boundary(i)).unwrap_or(0);
            fixture[..cut].to_string()
        }),
        2 => (0..len.max(1), any::<u8>()).prop_map(move |(at, b)| {
            let mut bytes = fixture.as_bytes().to_vec();
            if !bytes.is_empty() {
                bytes[at] = b;
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }),
        3 => json_input(fixture).prop_map(|v| v.to_string()),
        1 => ".*",
    ]
}

/// Text for a non-JSON parser (CSV): the fixture cut anywhere, a byte flipped, or arbitrary.
fn raw_text_input(fixture: &'static str) -> impl Strategy<Value = String> {
    let len = fixture.len();
    prop_oneof![
        2 => (0..=len).prop_map(move |cut| {
            let cut = (0..=cut).rev().find(|&i| fixture.is_char_boundary(i)).unwrap_or(0);
            fixture[..cut].to_string()
        }),
        2 => (0..len.max(1), any::<u8>()).prop_map(move |(at, b)| {
            let mut bytes = fixture.as_bytes().to_vec();
            if !bytes.is_empty() {
                bytes[at] = b;
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }),
        1 => ".*",
    ]
}

/// An error is typed and says something.
fn check_err<T>(r: Result<T, ProviderError>) {
    let _ = check_ok_or_err(r);
}

/// [`check_err`], handing the result on.
fn check_ok_or_err<T>(r: Result<T, ProviderError>) -> Result<T, ProviderError> {
    if let Err(e) = &r {
        assert!(!e.to_string().is_empty());
    }
    r
}

// ----- contexts -------------------------------------------------------------------------

fn ms_ctx() -> ReportContext {
    ReportContext {
        source: "ms-test".into(),
        billing_account_id: "us01.metalsoft.io".into(),
        user_id: 1,
        window_start: t("2015-01-01T00:00:00Z"),
        window_end: t("2016-11-01T00:00:00Z"),
        settled: true,
    }
}

fn sl_ctx() -> InvoiceContext {
    InvoiceContext {
        source: "sl-test".into(),
        account_id: "123".into(),
        currency: "USD".into(),
        invoice: InvoiceHeader {
            id: 1001,
            account_id: Some(123),
            create_date: t("2024-07-04T06:17:42Z"),
            create_date_text: "2024-07-04T00:17:42-06:00".into(),
            status_code: "CLOSED".into(),
            type_code: "RECURRING".into(),
            total: None,
        },
    }
}

fn sl_next_ctx() -> NextContext {
    NextContext {
        source: "sl-test".into(),
        account_id: "123".into(),
        currency: "USD".into(),
    }
}

fn sakura_account() -> AccountInfo {
    parse_auth_status(
        &serde_json::from_str(billsync::simulators::sakura::FIXTURE_AUTH_STATUS).unwrap(),
        "sakura-test",
    )
    .unwrap()
}

fn sakura_ctx() -> LineContext {
    LineContext {
        source: "sakura-test".into(),
        account: sakura_account(),
        bill_id: "13327977".into(),
        month: "2016-05".parse().unwrap(),
        is_final: true,
    }
}

fn sakura_prices() -> PriceList {
    parse_price_list(
        &serde_json::from_str(billsync::simulators::sakura::FIXTURE_PRICE_SYNTHETIC).unwrap(),
        "sakura-test",
    )
    .unwrap()
    .list
}

fn jelastic_ctx(period: Period) -> HistoryContext {
    HistoryContext {
        source: "jel-test".into(),
        billing_account_id: "acct-42".into(),
        currency: "EUR".into(),
        period,
        time_offset: "+09:00".parse().unwrap(),
        window_start: t("2024-04-01T00:00:00Z"),
        window_end: t("2024-04-02T00:00:00Z"),
        settled_before: t("2030-01-01T00:00:00Z"),
        final_requires_charge: false,
    }
}

// ----- provider parsers -----------------------------------------------------------------

fn metalsoft_parse_report_never_panics() {
    use billsync::simulators::metalsoft::{FIXTURE_BIGSTEP_2020, FIXTURE_CURRENT};
    let ctx = ms_ctx();
    for fixture in [FIXTURE_CURRENT, FIXTURE_BIGSTEP_2020] {
        runner()
            .run(&json_input(fixture), |v| {
                // Read or refused; read, the records are exactly the report's lines, in order.
                if let Ok(records) = check_ok_or_err(parse_report(&v, &ctx)) {
                    let lines = metalsoft_fixtures::lines_of(&v);
                    assert_eq!(records.len(), lines.len());
                    for (record, line) in records.iter().zip(&lines) {
                        assert_eq!(&record.raw.to_value(), line);
                    }
                }
                Ok(())
            })
            .unwrap();
    }
    runner()
        .run(&text_input(FIXTURE_CURRENT), |s| {
            check_err(parse_report_str(&s, &ctx));
            Ok(())
        })
        .unwrap();
}

fn softlayer_invoice_and_next_items_never_panic() {
    use billsync::simulators::softlayer::{
        FIXTURE_ALL_ITEMS, FIXTURE_NEXT_ITEMS, FIXTURE_TOP_LEVEL_ITEMS,
    };
    let ctx = sl_ctx();
    let next = sl_next_ctx();
    runner()
        .run(&text_input(FIXTURE_TOP_LEVEL_ITEMS), |s| {
            check_err(parse_invoice_items_str(&s, &ctx));
            Ok(())
        })
        .unwrap();
    runner()
        .run(&json_input(FIXTURE_ALL_ITEMS), |v| {
            check_err(parse_invoice_items(&v, &ctx));
            Ok(())
        })
        .unwrap();
    for fixture in [FIXTURE_NEXT_ITEMS, FIXTURE_ALL_ITEMS] {
        runner()
            .run(&text_input(fixture), |s| {
                check_err(parse_next_items_str(&s, &next));
                Ok(())
            })
            .unwrap();
    }
}

fn sakura_parsers_never_panic() {
    use billsync::simulators::sakura::{
        FIXTURE_AUTH_STATUS, FIXTURE_BILLS, FIXTURE_CSV_BODY, FIXTURE_DETAILS,
        FIXTURE_PRICE_SYNTHETIC,
    };
    let ctx = sakura_ctx();
    let prices = sakura_prices();
    runner()
        .run(&json_input(FIXTURE_AUTH_STATUS), |v| {
            check_err(parse_auth_status(&v, "sakura-test"));
            Ok(())
        })
        .unwrap();
    runner()
        .run(&json_input(FIXTURE_BILLS), |v| {
            check_err(parse_bills(&v, "sakura-test"));
            Ok(())
        })
        .unwrap();
    runner()
        .run(&json_input(FIXTURE_PRICE_SYNTHETIC), |v| {
            check_err(parse_price_list(&v, "sakura-test"));
            Ok(())
        })
        .unwrap();
    runner()
        .run(&json_input(FIXTURE_DETAILS), |v| {
            check_err(parse_bill_details(&v, &ctx, &prices));
            Ok(())
        })
        .unwrap();
    // CSV: the fixture cut or flipped, lines shuffled with arbitrary cells, arbitrary text.
    let csv = prop_oneof![
        3 => raw_text_input(FIXTURE_CSV_BODY),
        2 => prop::collection::vec(prop::collection::vec(text(), 0..12), 0..6).prop_map(|rows| {
            let mut out = FIXTURE_CSV_BODY.lines().next().unwrap_or_default().to_string();
            for row in rows {
                out.push('\n');
                out.push_str(&row.join(","));
            }
            out
        }),
    ];
    runner()
        .run(&csv, |s| {
            check_err(parse_bill_csv(&s, &ctx));
            Ok(())
        })
        .unwrap();
}

fn jelastic_parse_response_never_panics() {
    use billsync::simulators::jelastic::FIXTURE;
    for period in [Period::Day, Period::Hour] {
        let ctx = jelastic_ctx(period);
        runner()
            .run(&text_input(FIXTURE), |s| {
                check_err(parse_response(&s, &ctx));
                Ok(())
            })
            .unwrap();
    }
}

// ----- mapping engine -------------------------------------------------------------------

/// Example mapping files with lines replaced, cut or duplicated, or arbitrary YAML-ish text.
fn yaml_input() -> impl Strategy<Value = Vec<(String, String)>> {
    let examples: Vec<(String, String)> = billsync::mapping::EXAMPLE_MAPPINGS
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    let n = examples.len();
    let mutated = (
        0..n,
        prop::collection::vec((any::<prop::sample::Index>(), text(), 0u8..4), 1..4),
    )
        .prop_map(move |(which, edits)| {
            let mut files = examples.clone();
            let mut lines: Vec<String> = files[which].1.lines().map(str::to_string).collect();
            for (at, new, kind) in edits {
                if lines.is_empty() {
                    break;
                }
                let i = at.index(lines.len());
                match kind {
                    0 => lines[i] = new,
                    1 => {
                        // Keep the indentation and key, replace the value.
                        let key = lines[i].split(':').next().unwrap_or_default().to_string();
                        lines[i] = format!("{key}: {new}");
                    }
                    2 => lines.truncate(i),
                    _ => {
                        let copy = lines[i].clone();
                        lines.insert(i, copy);
                    }
                }
            }
            files[which].1 = lines.join("\n");
            files
        });
    prop_oneof![
        3 => mutated,
        1 => ".*".prop_map(|t| vec![("fuzz.yaml".to_string(), t)]),
        1 => arbitrary_json().prop_map(|v| vec![("fuzz.yaml".to_string(), v.to_string())]),
    ]
}

fn mapping_sets_from_arbitrary_yaml_never_panic() {
    runner()
        .run(&yaml_input(), |files| {
            match MappingSet::from_sources(&files) {
                Ok(_) => {}
                Err(e) => assert!(!e.to_string().is_empty()),
            }
            Ok(())
        })
        .unwrap();
}

fn decimal() -> impl Strategy<Value = Decimal> {
    prop_oneof![
        (any::<i64>(), 0u32..=28).prop_map(|(n, s)| Decimal::new(n, s)),
        prop::sample::select(vec![
            Decimal::MAX,
            Decimal::MIN,
            Decimal::ZERO,
            Decimal::new(1, 28),
            Decimal::new(-1, 28),
        ]),
    ]
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // Year 1 to 9999.
    (-62_135_596_800i64..253_402_300_799i64).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap())
}

fn record() -> impl Strategy<Value = UsageRecord> {
    let provider = prop_oneof![
        prop::sample::select(vec!["metalsoft", "softlayer", "sakura", "jelastic"])
            .prop_map(str::to_string),
        text(),
    ];
    let attrs = prop::collection::btree_map(
        prop_oneof![
            prop::sample::select(vec!["is_reservation", "infrastructure_id", "window_start"])
                .prop_map(str::to_string),
            text()
        ],
        text(),
        0..4,
    );
    (
        (provider, text(), text(), text(), text()),
        (text(), text(), prop::option::of(text()), time(), time()),
        (decimal(), text(), decimal(), text()),
        (attrs, any::<bool>()),
    )
        .prop_map(
            |(
                (provider, source, account, sub, resource),
                (rtype, service, sku, start, end),
                (qty, unit, cost, currency),
                (attributes, is_final),
            )| {
                UsageRecord {
                    provider: provider.into(),
                    source: source.into(),
                    billing_account_id: account.into(),
                    sub_account_id: sub.into(),
                    resource_id: resource.into(),
                    resource_name: None,
                    resource_type: rtype.into(),
                    service_name: service.into(),
                    sku_id: sku.map(Into::into),
                    charge_description: None,
                    charge_period_start: start,
                    charge_period_end: end,
                    consumed_quantity: qty,
                    consumed_unit: unit.into(),
                    billed_cost: cost,
                    billing_currency: currency.into(),
                    scope: "1".into(),
                    natural_key: vec![],
                    is_final,
                    attributes: attributes
                        .into_iter()
                        .map(|(k, v)| (k.into(), v.into()))
                        .collect(),
                    raw: Default::default(),
                }
            },
        )
}

/// Rules that make arithmetic happen on the value: conversions between units, markups,
/// tiers, commission, fixed fees, minimums, rounding modes.
fn arithmetic_set() -> MappingSet {
    let text = r#"version: 1
customers:
  - match: {}
    external_subscription_id: sub_all
    external_customer_id: cust_all
rules:
  - name: bytes-to-gib
    match: { consumed_unit: bytes }
    metric: gib
    value: { quantity: { unit: gib } }
  - name: tb-to-kb
    match: { consumed_unit: tb }
    metric: kb
    value: { quantity: { unit: kb } }
  - name: days-to-seconds
    match: { consumed_unit: days }
    metric: secs
    value: { quantity: { unit: seconds } }
    round: { scale: 0, mode: ceiling }
  - name: seconds-to-hours
    match: { consumed_unit: seconds }
    metric: hours
    value: { quantity: { unit: hours } }
    round: { scale: 6, mode: half_even }
  - name: factor
    match: { consumed_unit: gbytes }
    metric: scaled
    value: { quantity: { factor: "12345.678" } }
  - name: priced
    match: { billing_currency: GBP }
    metric: cost
    value: { cost: { tiers: [{ up_to: 100, markup_percent: 20 }, { markup_percent: 10 }], commission_percent: 15, markup_fixed: "0.50", minimum: "1.00", period: record } }
  - name: plain-cost
    match: {}
    metric: cost_plain
    value: { cost: { markup_percent: 250 } }
    round: { scale: 2, mode: floor }
"#;
    MappingSet::from_sources(&[("arith.yaml".to_string(), text.to_string())]).expect("loads")
}

fn mapping_apply_with_arbitrary_records_never_panics() {
    let examples = MappingSet::examples().unwrap();
    let arith = arithmetic_set();
    let units = prop::sample::select(vec![
        "bytes", "tb", "days", "seconds", "gbytes", "hours", "kib", "GB",
    ]);
    let currencies = prop::sample::select(vec!["GBP", "JPY", "EUR", "USD", "XXX", ""]);
    let strategy = (record(), units, currencies, any::<bool>()).prop_map(|(mut r, u, c, keep)| {
        if !keep {
            r.consumed_unit = u.to_string().into();
            r.billing_currency = c.to_string().into();
        }
        r
    });
    runner()
        .run(&strategy, |r| {
            let _ = examples.apply(&r);
            let _ = arith.apply(&r);
            Ok(())
        })
        .unwrap();
}

/// Keep the helper types used (BTreeMap appears in records' attributes).
#[allow(dead_code)]
fn _types(_: BTreeMap<String, String>) {}

macro_rules! suites {
    ($($name:ident),* $(,)?) => {
        mod quick {
            $(#[test] fn $name() { super::$name() })*
        }
        mod soak {
            $(
                #[test]
                #[ignore = "10,000 cases: run by hand (see the module doc)"]
                fn $name() {
                    super::CASES.with(|c| c.set(super::SOAK));
                    super::$name()
                }
            )*
        }
    };
}

suites!(
    metalsoft_parse_report_never_panics,
    softlayer_invoice_and_next_items_never_panic,
    sakura_parsers_never_panic,
    jelastic_parse_response_never_panics,
    mapping_sets_from_arbitrary_yaml_never_panic,
    mapping_apply_with_arbitrary_records_never_panics
);

// ----- amounts beyond a decimal's range ---------------------------------------------------

/// `Decimal::MAX` as a provider could send it: each amount alone is read exactly, but two of
/// them add up beyond a decimal's range.
const HUGE: &str = "79228162514264337593543950335";

fn huge_number() -> Value {
    Value::Number(Number::from_str(HUGE).unwrap())
}

/// A SoftLayer line whose fees, or whose children, add up beyond a decimal's range is refused
/// with a typed error naming it, never a panic (`Decimal`'s `+` panics on overflow): a panic
/// would end every run at the same invoice, so no source would pull again.
#[test]
fn softlayer_amounts_adding_up_beyond_a_decimal_are_refused_not_a_panic() {
    let ctx = sl_ctx();
    // Two fees of one line.
    let fees = serde_json::json!([{
        "id": 1, "recurringAfterTaxAmount": HUGE, "oneTimeAfterTaxAmount": "1"
    }]);
    let err = parse_invoice_items(&fees, &ctx).unwrap_err().to_string();
    assert!(err.contains("beyond"), "{err}");
    // The line and its children.
    let children = serde_json::json!([{
        "id": 1, "recurringAfterTaxAmount": "1",
        "children": [{ "id": 2, "recurringAfterTaxAmount": HUGE }]
    }]);
    let err = parse_invoice_items(&children, &ctx)
        .unwrap_err()
        .to_string();
    assert!(err.contains("beyond"), "{err}");
    // Two children.
    let siblings = serde_json::json!([{
        "id": 1, "recurringAfterTaxAmount": "0",
        "children": [
            { "id": 2, "recurringAfterTaxAmount": HUGE },
            { "id": 3, "recurringAfterTaxAmount": HUGE }
        ]
    }]);
    let err = parse_invoice_items(&siblings, &ctx)
        .unwrap_err()
        .to_string();
    assert!(err.contains("beyond"), "{err}");
    // The next invoice's estimate: its amounts add up too.
    let next = serde_json::json!([{
        "id": 9, "nextInvoiceTotalRecurringAmount": HUGE, "nextInvoiceTotalOneTimeAmount": "1"
    }]);
    let err = parse_next_items_str(&next.to_string(), &sl_next_ctx())
        .unwrap_err()
        .to_string();
    assert!(err.contains("beyond"), "{err}");
}

/// A SAKURA CSV line is its price plus its tax, and its hours days × 24 plus hours: both sums
/// beyond a decimal's range are refused with a typed error, never a panic.
#[test]
fn sakura_csv_sums_beyond_a_decimal_are_refused_not_a_panic() {
    let ctx = sakura_ctx();
    let row = |days: &str, price: &str, tax: &str| {
        format!(
            "\"2\",\"000000000\",\"2016/05\",\"paid\",\"xxx000001\",\"payTest\",\"112700654736\",\
             \"50118\",\"ISO\",\"is1b\",\"zone\",\"{days}\",\"0\",\"{price}\",\"{tax}\",\"name\""
        )
    };
    for csv in [row("30", HUGE, "8"), row(HUGE, "100", "8")] {
        let err = parse_bill_csv(&csv, &ctx).unwrap_err().to_string();
        assert!(err.contains("beyond"), "{err}");
    }
    // Within range, the same row reads.
    let records = parse_bill_csv(&row("30", "100", "8"), &ctx).unwrap();
    assert_eq!(records[0].billed_cost, Decimal::from(108));
    assert_eq!(records[0].consumed_quantity, Decimal::from(720));
}

/// Two Jelastic rows with one natural key are added up into one record; when that sum is
/// beyond a decimal's range the answer is refused with a typed error, never a panic.
#[test]
fn jelastic_rows_adding_up_beyond_a_decimal_are_refused_not_a_panic() {
    use billsync::simulators::jelastic::FIXTURE;
    let mut ctx = jelastic_ctx(Period::Day);
    ctx.time_offset = "+00:00".parse().unwrap();
    let mut v: Value = serde_json::from_str(FIXTURE).unwrap();
    let mut row = v["array"][0].clone();
    row["cost"] = huge_number();
    v["array"] = Value::Array(vec![row.clone(), row]);
    let err = parse_response(&v.to_string(), &ctx)
        .unwrap_err()
        .to_string();
    assert!(err.contains("beyond"), "{err}");
}

/// MetalSoft's network aggregates are compared with the sum of their waypoints (a warning when
/// they differ); waypoints adding up beyond a decimal's range must not panic while comparing.
#[test]
fn metalsoft_waypoints_adding_up_beyond_a_decimal_do_not_panic() {
    use billsync::simulators::metalsoft::FIXTURE_CURRENT;
    let mut v: Value = serde_json::from_str(FIXTURE_CURRENT).unwrap();
    let list = &mut v["network_report"]["3688"]["data_lake"]["download"]["metered_waypoints"];
    let mut first = list[0].clone();
    first["cost"] = Value::String(HUGE.into());
    let mut second = first.clone();
    second["start_timestamp"] = Value::String("2016-02-01T13:10:07Z".into());
    *list = Value::Array(vec![first, second]);
    let records = parse_report(&v, &ms_ctx()).unwrap();
    let huge = Decimal::from_str(HUGE).unwrap();
    assert_eq!(
        records.iter().filter(|r| r.billed_cost == huge).count(),
        2,
        "each waypoint is its own record, read exactly"
    );
}
