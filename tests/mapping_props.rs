//! Property tests of money arithmetic: rounding a marked-up cost loses or invents at most half
//! a minor unit per record, and a month's total is exactly the sum of its records.

use std::collections::BTreeMap;

use billsync::mapping::{MapOutcome, MappingSet};
use billsync::record::UsageRecord;
use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;

fn set(markup: &str) -> MappingSet {
    let text = format!(
        "version: 1\nrules:\n  - name: c\n    match: {{}}\n    metric: cost\n    value: {{ cost: {{ markup_percent: \"{markup}\" }} }}\n    target: {{ external_subscription_id: s }}\n"
    );
    MappingSet::from_sources(&[("m.yaml".to_string(), text)]).expect("loads")
}

fn record(cost: Decimal, day: u32) -> UsageRecord {
    UsageRecord {
        provider: "p".into(),
        source: "p".into(),
        billing_account_id: "a".into(),
        sub_account_id: "1".into(),
        resource_id: "r".into(),
        resource_name: None,
        resource_type: "t".into(),
        service_name: "s".into(),
        sku_id: None,
        charge_description: None,
        charge_period_start: Utc.with_ymd_and_hms(2026, 3, day, 0, 0, 0).unwrap(),
        charge_period_end: Utc.with_ymd_and_hms(2026, 3, day, 1, 0, 0).unwrap(),
        consumed_quantity: Decimal::ONE,
        consumed_unit: "hours".into(),
        billed_cost: cost,
        billing_currency: "GBP".into(),
        scope: "1".into(),
        natural_key: vec![],
        is_final: true,
        attributes: BTreeMap::new(),
        raw: Default::default(),
    }
}

fn value(o: MapOutcome) -> Decimal {
    match o {
        MapOutcome::Mapped(e) => e.value,
        other => panic!("{other:?}"),
    }
}

/// Costs with up to 8 decimals, up to 1,000,000, both signs (credits).
fn cost() -> impl Strategy<Value = Decimal> {
    (-100_000_000_000_000i64..100_000_000_000_000i64).prop_map(|n| Decimal::new(n, 8))
}

/// Markups 0 to 100 % with up to 2 decimals.
fn markup() -> impl Strategy<Value = Decimal> {
    (0i64..=10_000).prop_map(|n| Decimal::new(n, 2))
}

proptest! {
    #[test]
    fn markup_then_rounding_is_within_half_a_minor_unit(c in cost(), m in markup()) {
        let set = set(&m.to_string());
        let exact = c * (Decimal::ONE + m / Decimal::ONE_HUNDRED);
        let sent = value(set.apply(&record(c, 1)));
        prop_assert_eq!(sent.scale() <= 2, true);
        prop_assert!((sent - exact).abs() <= Decimal::new(5, 3), "{} vs {}", sent, exact);
    }

    #[test]
    fn a_months_total_is_the_sum_of_its_records(
        costs in proptest::collection::vec(cost(), 1..60),
        m in markup(),
    ) {
        let set = set(&m.to_string());
        let sent: Vec<Decimal> = costs
            .iter()
            .enumerate()
            .map(|(i, c)| value(set.apply(&record(*c, (i % 28) as u32 + 1))))
            .collect();
        // The invoice sums what was sent: exact to the minor unit, no drift from re-rounding.
        let total: Decimal = sent.iter().sum();
        prop_assert_eq!(total, total.round_dp(2));
        let exact: Decimal = costs
            .iter()
            .map(|c| c * (Decimal::ONE + m / Decimal::ONE_HUNDRED))
            .sum();
        // Per-record rounding differs from rounding the exact total by at most n half-units.
        let bound = Decimal::new(5, 3) * Decimal::from(costs.len());
        prop_assert!((total - exact).abs() <= bound);
        // Applying twice gives the same values (deterministic, no hidden state).
        let again: Decimal = costs
            .iter()
            .enumerate()
            .map(|(i, c)| value(set.apply(&record(*c, (i % 28) as u32 + 1))))
            .sum();
        prop_assert_eq!(total, again);
    }
}
