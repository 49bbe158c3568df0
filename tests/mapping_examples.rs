//! The shipped example mappings (`mappings/`) load and map typical MetalSoft records as their
//! comments say.

use std::collections::BTreeMap;
use std::path::PathBuf;

use billsync::mapping::{MapOutcome, MappingSet, EXAMPLE_MAPPINGS};
use billsync::record::UsageRecord;
use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;

fn dec(s: &str) -> Decimal {
    s.parse().expect("test decimal")
}

fn ms(
    user: &str,
    resource_type: &str,
    label: &str,
    qty: &str,
    unit: &str,
    cost: &str,
) -> UsageRecord {
    UsageRecord {
        provider: "metalsoft".into(),
        source: "metalsoft".into(),
        billing_account_id: "ms".into(),
        sub_account_id: user.into(),
        resource_id: label.rsplit('-').next().unwrap_or(label).into(),
        resource_name: Some(label.into()),
        resource_type: resource_type.into(),
        service_name: "metalsoft".into(),
        sku_id: None,
        charge_description: Some(label.into()),
        charge_period_start: Utc.with_ymd_and_hms(2016, 2, 1, 12, 0, 0).unwrap(),
        charge_period_end: Utc.with_ymd_and_hms(2016, 2, 2, 12, 0, 0).unwrap(),
        consumed_quantity: dec(qty),
        consumed_unit: unit.into(),
        billed_cost: dec(cost),
        billing_currency: "GBP".into(),
        scope: user.into(),
        natural_key: vec![],
        is_final: true,
        attributes: BTreeMap::from([
            ("infrastructure_id".into(), "3668".into()),
            ("is_reservation".into(), "false".into()),
        ]),
        raw: Default::default(),
    }
}

fn examples() -> MappingSet {
    match MappingSet::examples() {
        Ok(s) => s,
        Err(e) => panic!("shipped examples do not load:\n{e}"),
    }
}

#[test]
fn shipped_examples_load_from_disk_and_embedded() {
    let set = examples();
    let summary = set.summary();
    // 10 inline customer entries + 2 rows of the account directory `mappings/accounts.csv`.
    assert_eq!(
        (summary.files, summary.customers, summary.rules),
        (5, 12, 8)
    );
    assert_eq!(set.directory_len(), 2);
    assert_eq!(EXAMPLE_MAPPINGS.len(), 6);
    let from_dir = MappingSet::load(&[PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mappings")]);
    assert!(from_dir.is_ok(), "{:?}", from_dir.err());
}

#[test]
fn instance_hours() {
    let MapOutcome::Mapped(e) = examples().apply(&ms(
        "1",
        "instance",
        "instance-2416",
        "84301",
        "seconds",
        "7.25925278",
    )) else {
        panic!("instance not mapped");
    };
    assert_eq!(e.rule, "metalsoft.yaml#instance-hours");
    assert_eq!(e.external_subscription_id, "sub_acme_main");
    assert_eq!(e.metric_code, "instance_hours");
    assert_eq!(e.value_property, "hours");
    assert_eq!(e.value, dec("23.416944"));
    assert_eq!(e.properties["instance"], "2416");
    assert_eq!(e.properties["infrastructure"], "3668");
}

#[test]
fn reserved_instance_time_is_ignored() {
    let mut r = ms("1", "instance", "instance-2416", "84301", "seconds", "0");
    r.attributes.insert("is_reservation".into(), "true".into());
    assert_eq!(
        examples().apply(&r),
        MapOutcome::Ignored {
            rule: "metalsoft.yaml#instance-hours-reserved".into()
        }
    );
}

#[test]
fn drives_are_billed_at_cost_plus_20_percent() {
    let MapOutcome::Mapped(e) = examples().apply(&ms(
        "2",
        "drive",
        "drive-3727",
        "250369",
        "seconds",
        "1.11383813",
    )) else {
        panic!("drive not mapped");
    };
    assert_eq!(e.rule, "metalsoft.yaml#storage-cost");
    assert_eq!(e.external_subscription_id, "sub_globex_main");
    assert_eq!(e.value_property, "amount");
    // 1.11383813 × 1.2 = 1.336605756
    assert_eq!(e.value, dec("1.34"));
    let MapOutcome::Mapped(e) = examples().apply(&ms(
        "1",
        "shared_drive",
        "new-shared-drive",
        "242136",
        "seconds",
        "0.23354152",
    )) else {
        panic!("shared drive not mapped");
    };
    assert_eq!(e.value, dec("0.28"));
}

#[test]
fn traffic_in_gbytes() {
    let MapOutcome::Mapped(e) = examples().apply(&ms(
        "1",
        "data_lake",
        "data-lake-8",
        "12.3456789",
        "gbytes",
        "0",
    )) else {
        panic!("traffic not mapped");
    };
    assert_eq!(e.rule, "metalsoft.yaml#network-traffic");
    assert_eq!(e.metric_code, "network_gb");
    assert_eq!(e.value, dec("12.345679"));
}

#[test]
fn subnets_are_ignored() {
    assert_eq!(
        examples().apply(&ms("1", "subnet", "subnet-6378", "250376", "seconds", "0")),
        MapOutcome::Ignored {
            rule: "metalsoft.yaml#subnets-free".into()
        }
    );
}

#[test]
fn reservation_installments_are_held_as_unmapped() {
    let r = ms(
        "1",
        "reservation_installment",
        "FMCI 4.8",
        "1",
        "months",
        "119.81",
    );
    let MapOutcome::Unmapped { reason } = examples().apply(&r) else {
        panic!("reservation installment should be unmapped");
    };
    assert!(
        reason.starts_with("no rule matches provider=metalsoft"),
        "{reason}"
    );
    assert!(
        reason.contains("resource_type=reservation_installment"),
        "{reason}"
    );
    assert!(
        reason.contains("charge_description=\"FMCI 4.8\""),
        "{reason}"
    );
}

#[test]
fn unknown_user_is_held_as_unmapped() {
    let r = ms("7", "instance", "instance-1", "3600", "seconds", "0.31");
    assert_eq!(
        examples().apply(&r),
        MapOutcome::Unmapped {
            reason: "rule metalsoft.yaml#instance-hours matched, but no customer matches provider=metalsoft billing_account_id=ms sub_account_id=7".into()
        }
    );
}

/// The shipped rules see records as the MetalSoft provider makes them, not as a test writes
/// them by hand: the documentation's report, with one instance's line marked reserved
/// (`"is_reservation": "1"`, as MetalSoft sends it), parsed by the provider and mapped. The
/// reserved instance time is ignored (the installment pays for it) and the others are billed
/// per hour. The rule once matched `"1"`, the provider's attribute is `"true"`: reserved time
/// was billed per hour, and the hand-written cases above agreed with the rule.
#[test]
fn the_provider_s_reserved_instance_lines_meet_the_reserved_rule() {
    use billsync::providers::metalsoft::{parse_report_str, ReportContext};
    use billsync::simulators::metalsoft::FIXTURE_CURRENT;
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&Utc)
    };
    let ctx = ReportContext {
        source: "metalsoft".into(),
        billing_account_id: "ms".into(),
        user_id: 1,
        window_start: at("2015-01-01T00:00:00Z"),
        window_end: at("2016-11-01T00:00:00Z"),
        settled: true,
    };
    let mut report: serde_json::Value = serde_json::from_str(FIXTURE_CURRENT).unwrap();
    let instances = report["detailed_report"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .find_map(|types| types.get_mut("instance"))
        .and_then(|lines| lines.as_array_mut())
        .expect("the fixture reports instances");
    // A second instance beside the documented one, reserved.
    let mut reserved = instances[0].clone();
    assert_eq!(reserved["is_reservation"], "0");
    reserved["is_reservation"] = "1".into();
    reserved["product_id"] = 9999.into();
    reserved["product_label"] = "instance-9999".into();
    instances.push(reserved);
    let reserved_id = "instance:9999";
    let records = parse_report_str(&report.to_string(), &ctx).expect("parses");
    let set = examples();
    let mut seen = (0, 0);
    for r in records.iter().filter(|r| r.resource_type == "instance") {
        let outcome = set.apply(r);
        if r.resource_id == reserved_id {
            assert_eq!(r.attributes["is_reservation"], "true");
            assert_eq!(
                outcome,
                MapOutcome::Ignored {
                    rule: "metalsoft.yaml#instance-hours-reserved".into()
                },
                "{r:?}"
            );
            seen.0 += 1;
        } else {
            match outcome {
                MapOutcome::Mapped(e) => assert_eq!(e.rule, "metalsoft.yaml#instance-hours"),
                other => panic!("{other:?}: {r:?}"),
            }
            seen.1 += 1;
        }
    }
    assert_eq!(seen, (1, 1));
}
