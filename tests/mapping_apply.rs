//! Applying mappings to records: which rule and customer a record gets, and the exact value.

use std::collections::BTreeMap;

use billsync::mapping::{MapOutcome, MappedEvent, MappingSet};
use billsync::record::UsageRecord;
use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;

fn dec(s: &str) -> Decimal {
    s.parse().expect("test decimal")
}

/// A MetalSoft instance record of user 1, as the provider would normalize it.
fn record() -> UsageRecord {
    UsageRecord {
        provider: "metalsoft".into(),
        source: "metalsoft-prod".into(),
        billing_account_id: "ms".into(),
        sub_account_id: "1".into(),
        resource_id: "2416".into(),
        resource_name: Some("instance-2416".into()),
        resource_type: "instance".into(),
        service_name: "metalsoft".into(),
        sku_id: None,
        charge_description: Some("instance-2416".into()),
        charge_period_start: Utc.with_ymd_and_hms(2016, 2, 1, 12, 58, 0).unwrap(),
        charge_period_end: Utc.with_ymd_and_hms(2016, 2, 2, 12, 23, 0).unwrap(),
        consumed_quantity: dec("84301"),
        consumed_unit: "seconds".into(),
        billed_cost: dec("7.25925278"),
        billing_currency: "GBP".into(),
        scope: "1".into(),
        natural_key: vec![("product_id".into(), "2416".into())],
        is_final: true,
        attributes: BTreeMap::from([
            ("infrastructure_id".into(), "3668".into()),
            ("is_reservation".into(), "0".into()),
        ]),
        raw: Default::default(),
    }
}

const CUSTOMERS: &str = "version: 1
customers:
  - match: { provider: metalsoft, sub_account_id: \"1\" }
    external_subscription_id: sub_acme_main
    external_customer_id: acme
  - match: { provider: metalsoft, sub_account_id: \"2\" }
    external_subscription_id: sub_globex_main
";

fn set(rules: &str) -> MappingSet {
    let sources = vec![
        ("customers.yaml".to_string(), CUSTOMERS.to_string()),
        (
            "rules.yaml".to_string(),
            format!("version: 1\nrules:\n{rules}"),
        ),
    ];
    match MappingSet::from_sources(&sources) {
        Ok(s) => s,
        Err(e) => panic!("mapping did not load:\n{e}"),
    }
}

fn mapped(outcome: MapOutcome) -> MappedEvent {
    match outcome {
        MapOutcome::Mapped(e) => e,
        other => panic!("expected Mapped, got {other:?}"),
    }
}

fn unmapped(outcome: MapOutcome) -> String {
    match outcome {
        MapOutcome::Unmapped { reason } => reason,
        other => panic!("expected Unmapped, got {other:?}"),
    }
}

/// A quantity rule that reports the matched rule's name via the metric code.
fn rule(name: &str, conditions: &str) -> String {
    format!(
        "  - name: {name}\n    match: {conditions}\n    metric: {name}\n    value: {{ quantity: {{}} }}\n"
    )
}

#[test]
fn exact_match_maps_with_customer_table() {
    let s = set(&rule("instances", "{ resource_type: instance }"));
    let e = mapped(s.apply(&record()));
    assert_eq!(e.rule, "rules.yaml#instances");
    assert_eq!(e.external_subscription_id, "sub_acme_main");
    assert_eq!(e.external_customer_id.as_deref(), Some("acme"));
    assert_eq!(e.metric_code, "instances");
    assert_eq!(e.value_property, "value");
    assert_eq!(e.value, dec("84301"));
    assert_eq!(e.timestamp, record().charge_period_start);
    assert_eq!(e.sink, None);
}

#[test]
fn glob_one_of_and_attribute_conditions() {
    let s = set(&[
        rule(
            "by-glob",
            "{ charge_description: { glob: \"instance-*\" }, sub_account_id: \"2\" }",
        ),
        rule(
            "by-one-of",
            "{ resource_type: { one_of: [drive, instance] }, sub_account_id: \"2\" }",
        ),
        rule("by-attribute", "{ attributes.infrastructure_id: \"3668\" }"),
    ]
    .concat());
    let mut r = record();
    r.sub_account_id = "2".into();
    assert_eq!(mapped(s.apply(&r)).metric_code, "by-glob");
    r.charge_description = Some("other".into());
    assert_eq!(mapped(s.apply(&r)).metric_code, "by-one-of");
    r.resource_type = "subnet".into();
    let e = mapped(s.apply(&r));
    assert_eq!(e.metric_code, "by-attribute");
    assert_eq!(e.external_subscription_id, "sub_globex_main");
    assert_eq!(e.external_customer_id, None);
}

#[test]
fn absent_field_matches_no_condition() {
    let s = set(&rule("by-sku", "{ sku_id: { glob: \"*\" } }"));
    assert!(matches!(s.apply(&record()), MapOutcome::Unmapped { .. }));
}

#[test]
fn first_match_wins() {
    let s = set(&[
        rule(
            "reserved",
            "{ resource_type: instance, attributes.is_reservation: \"1\" }",
        ),
        rule("first", "{ resource_type: instance }"),
        rule("second", "{ provider: metalsoft }"),
    ]
    .concat());
    assert_eq!(mapped(s.apply(&record())).rule, "rules.yaml#first");
    let mut r = record();
    r.attributes.insert("is_reservation".into(), "1".into());
    assert_eq!(mapped(s.apply(&r)).rule, "rules.yaml#reserved");
}

#[test]
fn ignore_rule() {
    let s = set("  - name: free\n    match: { resource_type: instance }\n    ignore: true\n");
    assert_eq!(
        s.apply(&record()),
        MapOutcome::Ignored {
            rule: "rules.yaml#free".into()
        }
    );
}

#[test]
fn target_overrides_customer_table_and_sink_property_are_passed() {
    let s = set("  - name: internal
    match: { resource_type: instance }
    metric: instance_hours
    property: hours
    sink: lago-internal
    target: { external_subscription_id: sub_internal, external_customer_id: ops }
    value: { quantity: { unit: hours } }
");
    let mut r = record();
    r.sub_account_id = "99".into(); // no customer entry needed
    let e = mapped(s.apply(&r));
    assert_eq!(e.external_subscription_id, "sub_internal");
    assert_eq!(e.external_customer_id.as_deref(), Some("ops"));
    assert_eq!(e.sink.as_deref(), Some("lago-internal"));
    assert_eq!(e.value_property, "hours");
}

#[test]
fn seconds_to_hours_scale_6_half_up() {
    let s = set("  - name: hours
    match: { resource_type: instance }
    metric: instance_hours
    value: { quantity: { unit: hours } }
    round: { scale: 6, mode: half_up }
");
    // 84301 / 3600 = 23.41694444…
    assert_eq!(mapped(s.apply(&record())).value, dec("23.416944"));
}

#[test]
fn default_rounding_is_scale_6_for_quantities_and_2_for_cost() {
    let s = set("  - name: minutes
    match: { resource_type: instance }
    metric: m
    value: { quantity: { unit: days } }
  - name: cost
    match: { resource_type: drive }
    metric: c
    value: { cost: {} }
");
    // 84301 / 86400 = 0.975706018…
    assert_eq!(mapped(s.apply(&record())).value, dec("0.975706"));
    let mut r = record();
    r.resource_type = "drive".into();
    assert_eq!(mapped(s.apply(&r)).value, dec("7.26"));
    let summary = s.summary().to_string();
    assert!(summary.contains("rules.yaml#minutes: m.value = consumed_quantity converted to days, rounded to 6 places half_up"), "{summary}");
    assert!(
        summary.contains("rules.yaml#cost: c.value = billed_cost, rounded to 2 places half_up"),
        "{summary}"
    );
}

#[test]
fn rounding_modes() {
    // Each mode on a midpoint, off a midpoint and below zero (credits and corrections are
    // negative): `down` and `floor`, `up` and `ceiling` only part there.
    let cases = [
        ("half_up", ["0.3", "0.2", "-0.3", "-0.2", "-0.4"]),
        ("half_even", ["0.2", "0.2", "-0.2", "-0.2", "-0.4"]),
        ("down", ["0.2", "0.2", "-0.2", "-0.2", "-0.3"]),
        ("up", ["0.3", "0.3", "-0.3", "-0.3", "-0.4"]),
        ("floor", ["0.2", "0.2", "-0.3", "-0.3", "-0.4"]),
        ("ceiling", ["0.3", "0.3", "-0.2", "-0.2", "-0.3"]),
    ];
    let quantities = ["0.25", "0.21", "-0.25", "-0.21", "-0.35"];
    for (mode, expected) in cases {
        let s = set(&format!(
            "  - name: r\n    match: {{}}\n    metric: m\n    value: {{ quantity: {{}} }}\n    round: {{ scale: 1, mode: {mode} }}\n"
        ));
        for (quantity, expected) in quantities.iter().zip(expected) {
            let mut r = record();
            r.consumed_quantity = dec(quantity);
            assert_eq!(
                mapped(s.apply(&r)).value,
                dec(expected),
                "mode {mode}, {quantity}"
            );
        }
    }
}

#[test]
fn data_units_are_decimal_and_binary_units_are_explicit() {
    let s = set("  - name: mb
    match: { resource_type: a }
    metric: m
    value: { quantity: { unit: mb } }
  - name: gib
    match: { resource_type: b }
    metric: m
    value: { quantity: { unit: gib } }
    round: { scale: 12 }
");
    let mut r = record();
    r.consumed_unit = "gbytes".into();
    r.consumed_quantity = dec("1.5");
    r.resource_type = "a".into();
    assert_eq!(mapped(s.apply(&r)).value, dec("1500"));
    r.resource_type = "b".into();
    r.consumed_unit = "mib".into();
    r.consumed_quantity = dec("512");
    assert_eq!(mapped(s.apply(&r)).value, dec("0.5"));
}

#[test]
fn custom_factor() {
    let s = set("  - name: f
    match: {}
    metric: m
    value: { quantity: { factor: 0.5 } }
");
    assert_eq!(mapped(s.apply(&record())).value, dec("42150.5"));
}

#[test]
fn cost_with_20_percent_markup_scale_2_half_up() {
    let s = set("  - name: cost
    match: { resource_type: instance }
    metric: compute_cost
    value: { cost: { markup_percent: 20 } }
    round: { scale: 2, mode: half_up }
");
    // 7.25925278 × 1.20 = 8.711103336
    assert_eq!(mapped(s.apply(&record())).value, dec("8.71"));
}

#[test]
fn cross_dimension_conversion_of_an_unpinned_unit_is_unmapped_with_reason() {
    let s = set("  - name: hours
    match: { resource_type: instance }
    metric: instance_hours
    value: { quantity: { unit: hours } }
");
    let mut r = record();
    r.consumed_unit = "gbytes".into();
    assert_eq!(
        unmapped(s.apply(&r)),
        "rule rules.yaml#hours matched, but cannot convert gbytes (data) to hours (time)"
    );
    r.consumed_unit = "widgets".into();
    assert!(unmapped(s.apply(&r)).contains("consumed_unit `widgets` is not a known unit"));
}

#[test]
fn properties_copy_record_fields() {
    let s = set("  - name: p
    match: {}
    metric: m
    value: { quantity: {} }
    properties:
      instance: \"{resource_id}\"
      where: \"infra-{attributes.infrastructure_id} {{literal}}\"
");
    let e = mapped(s.apply(&record()));
    assert_eq!(e.properties["instance"], "2416");
    assert_eq!(e.properties["where"], "infra-3668 {literal}");
    // A placeholder whose field is absent holds the record instead of sending an empty value.
    let mut r = record();
    r.attributes.clear();
    assert_eq!(
        unmapped(s.apply(&r)),
        "rule rules.yaml#p matched, but property `where` needs `attributes.infrastructure_id`, which this record does not have"
    );
}

#[test]
fn unmapped_reason_names_the_fields() {
    let s = set(&rule("instances", "{ resource_type: instance }"));
    let mut r = record();
    r.resource_type = "gpu".into();
    r.charge_description = Some("gpu 12".into());
    assert_eq!(
        unmapped(s.apply(&r)),
        "no rule matches provider=metalsoft sub_account_id=1 resource_type=gpu \
         charge_description=\"gpu 12\" consumed_unit=seconds"
    );
}

#[test]
fn no_customer_is_unmapped() {
    let s = set(&rule("instances", "{ resource_type: instance }"));
    let mut r = record();
    r.sub_account_id = "7".into();
    assert_eq!(
        unmapped(s.apply(&r)),
        "rule rules.yaml#instances matched, but no customer matches provider=metalsoft sub_account_id=7"
    );
}

#[test]
fn numbers_and_booleans_in_conditions_match_their_text() {
    let s = set(&rule("n", "{ resource_id: 2416 }"));
    assert_eq!(mapped(s.apply(&record())).rule, "rules.yaml#n");
}

/// A per-record minimum raises a small charge, never a credit: a fixed markup may take a small
/// credit above zero (−0.90 + 1.00 = 0.10), and raised to the minimum that refund line would bill
/// the customer 5.00. It keeps its 0.10; a charge of the same size is raised; a larger credit
/// stays negative.
#[test]
fn a_per_record_minimum_never_raises_a_credit_that_a_fixed_markup_took_above_zero() {
    let s = set("  - name: fee
    match: { provider: metalsoft }
    metric: resale_cost
    value: { cost: { markup_fixed: \"1\", minimum: \"5\", period: record } }
");
    let value = |cost: &str| {
        let mut r = record();
        r.billed_cost = dec(cost);
        mapped(s.apply(&r)).value
    };
    assert_eq!(value("-0.90"), dec("0.10"), "a credit is not raised");
    assert_eq!(value("0.90"), dec("5.00"), "a charge is");
    assert_eq!(value("-10"), dec("-9.00"));
}
