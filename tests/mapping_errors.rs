//! Load errors: every mistake in a mapping file is reported as `file:line:column: message`,
//! across all files at once, and loading never panics.

use billsync::mapping::{MappingErrors, MappingSet};

fn load(files: &[(&str, &str)]) -> Result<MappingSet, MappingErrors> {
    let sources: Vec<(String, String)> = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    MappingSet::from_sources(&sources)
}

/// Loads one file that must fail, returning the error lines.
fn errors(text: &str) -> Vec<String> {
    match load(&[("m.yaml", text)]) {
        Ok(_) => panic!("expected a load error for:\n{text}"),
        Err(e) => e.to_string().lines().map(str::to_string).collect(),
    }
}

/// Asserts exactly one error, at `line:column`, containing `fragment`.
fn assert_one(text: &str, line: usize, column: usize, fragment: &str) {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    let prefix = format!("m.yaml:{line}:{column}: ");
    assert!(
        errs[0].starts_with(&prefix),
        "expected position {prefix:?}, got {:?}",
        errs[0]
    );
    assert!(
        errs[0].contains(fragment),
        "expected {fragment:?} in {:?}",
        errs[0]
    );
}

const GOOD_RULE: &str = "version: 1
rules:
  - name: instances
    match:
      resource_type: instance
    metric: instance_hours
    value:
      quantity: { unit: hours }
";

#[test]
fn a_valid_file_loads() {
    assert!(load(&[("m.yaml", GOOD_RULE)]).is_ok());
}

#[test]
fn yaml_syntax_error() {
    let text = "version: 1\nrules:\n  - name: a\n    match: {resource_type: instance\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("m.yaml:5:1: "), "{errs:#?}");
}

#[test]
fn unknown_key_typo() {
    let text = "version: 1
rules:
  - name: instances
    match:
      resource_type: instance
    metirc: instance_hours
";
    assert_one(text, 6, 5, "unknown field `metirc`, expected one of");
}

#[test]
fn wrong_type_markup_percent() {
    let text = "version: 1
rules:
  - name: drives
    match: { resource_type: drive }
    metric: storage_cost
    value:
      cost: { markup_percent: abc }
";
    assert_one(text, 7, 31, "invalid markup_percent `abc`");
}

/// A digit separator is not part of a number: rust_decimal skips `_`, so `0_50` loaded as a
/// fixed markup of 50 (a hundred times what the typo meant) and `1_000` as 1000 %.
#[test]
fn a_digit_separator_in_an_amount_is_refused() {
    let text = "version: 1
rules:
  - name: drives
    match: { resource_type: drive }
    metric: storage_cost
    value:
      cost: { markup_fixed: \"0_50\" }
";
    assert_one(text, 7, 29, "invalid amount `0_50`");
    let text = "version: 1
rules:
  - name: drives
    match: { resource_type: drive }
    metric: storage_cost
    value:
      cost: { markup_percent: 1_000 }
";
    assert_one(text, 7, 31, "invalid markup_percent `1_000`");
}

#[test]
fn unknown_record_field_in_match_with_hint() {
    let text = "version: 1
rules:
  - name: instances
    match:
      resource_typ: instance
    metric: instance_hours
    value: { quantity: {} }
";
    assert_one(
        text,
        5,
        7,
        "unknown record field `resource_typ`; did you mean `resource_type`?",
    );
}

#[test]
fn unknown_field_that_looks_like_an_attribute() {
    let text = "version: 1
customers:
  - match: { infrastructure_id: \"3668\" }
    external_subscription_id: sub_x
";
    assert_one(text, 3, 14, "write `attributes.infrastructure_id`");
}

#[test]
fn bad_glob() {
    let text = "version: 1
rules:
  - name: instances
    match:
      charge_description: { glob: \"instance-[\" }
    ignore: true
";
    assert_one(text, 5, 35, "invalid glob `instance-[`");
}

#[test]
fn unknown_unit() {
    let text = "version: 1
rules:
  - name: instances
    match: { resource_type: instance }
    metric: instance_hours
    value:
      quantity: { unit: fortnights }
";
    assert_one(text, 7, 25, "unknown unit `fortnights`, expected one of");
}

#[test]
fn negative_markup() {
    let text = "version: 1
rules:
  - name: drives
    match: { resource_type: drive }
    metric: storage_cost
    value:
      cost:
        markup_percent: -5
";
    assert_one(text, 8, 25, "markup_percent must not be negative");
}

#[test]
fn duplicate_rule_name_reports_the_second() {
    let text = "version: 1
rules:
  - name: instances
    match: { resource_type: instance }
    ignore: true
  - name: instances
    match: { resource_type: drive }
    ignore: true
";
    assert_one(
        text,
        6,
        5,
        "duplicate rule name `instances` (first defined at m.yaml:3:5)",
    );
}

#[test]
fn duplicate_rule_name_across_files() {
    let a = "version: 1\nrules:\n  - name: x\n    match: { resource_type: a }\n    ignore: true\n";
    let b =
        "version: 1\nrules:\n\n  - name: x\n    match: { resource_type: b }\n    ignore: true\n";
    let e = load(&[("a.yaml", a), ("b.yaml", b)])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "b.yaml:4:5: duplicate rule name `x` (first defined at a.yaml:3:5)"
    );
}

#[test]
fn rule_with_neither_metric_nor_ignore() {
    let text = "version: 1
rules:
  - name: forgotten
    match: { resource_type: gpu }
";
    assert_one(
        text,
        3,
        5,
        "rule `forgotten`: has neither `metric` nor `ignore: true`",
    );
}

#[test]
fn ignore_rule_with_a_metric_is_contradictory() {
    let text = "version: 1
rules:
  - name: both
    match: { resource_type: gpu }
    ignore: true
    metric: gpu_hours
";
    assert_one(text, 3, 5, "`ignore: true` sends nothing, so `metric`");
}

#[test]
fn metric_without_value() {
    let text = "version: 1
rules:
  - name: novalue
    match: { resource_type: gpu }
    metric: gpu_hours
";
    assert_one(text, 3, 5, "has `metric` but no `value`");
}

#[test]
fn bad_round_mode() {
    let text = "version: 1
rules:
  - name: instances
    match: { resource_type: instance }
    metric: instance_hours
    value: { quantity: { unit: hours } }
    round: { scale: 6, mode: half_upp }
";
    assert_one(text, 7, 30, "unknown variant `half_upp`, expected one of");
}

#[test]
fn round_scale_out_of_range() {
    let text = "version: 1
rules:
  - name: instances
    match: { resource_type: instance }
    metric: instance_hours
    value: { quantity: { unit: hours } }
    round: { scale: 13 }
";
    assert_one(text, 7, 21, "invalid rounding scale `13`");
}

#[test]
fn conversion_across_dimensions_is_rejected_when_the_unit_is_pinned() {
    let text = "version: 1
rules:
  - name: traffic
    match: { consumed_unit: gbytes }
    metric: network_hours
    value: { quantity: { unit: hours } }
";
    assert_one(
        text,
        3,
        5,
        "matches consumed_unit `gbytes` (data) but converts to `hours` (time)",
    );
}

#[test]
fn bad_placeholder_in_properties() {
    let text = "version: 1
rules:
  - name: instances
    match: { resource_type: instance }
    metric: instance_hours
    value: { quantity: { unit: hours } }
    properties:
      instance: \"{resource_idd}\"
";
    assert_one(
        text,
        8,
        17,
        "in placeholder `{resource_idd}`: unknown record field `resource_idd`; did you mean `resource_id`?",
    );
}

#[test]
fn unsupported_version() {
    assert_one(
        "version: 2\n",
        1,
        10,
        "unsupported mapping format version `2`",
    );
}

#[test]
fn missing_version() {
    assert_one("rules: []\n", 1, 1, "missing field `version`");
}

#[test]
fn unreachable_rule_after_a_catch_all() {
    let text = "version: 1
rules:
  - name: everything-else
    match: {}
    ignore: true
  - name: instances
    match: { resource_type: instance }
    ignore: true
";
    assert_one(
        text,
        6,
        5,
        "rule `instances` can never match: rule `everything-else` at m.yaml:3",
    );
}

/// `{glob: "*"}` on a field every record has matches every record: written on an `ignore` rule,
/// it hid every billing rule after it without a word (everything `ignored`, nothing billed).
#[test]
fn unreachable_rule_after_a_catch_all_written_as_a_glob() {
    let text = "version: 1
rules:
  - name: everything-else
    match: { resource_type: { glob: \"*\" } }
    ignore: true
  - name: instances
    match: { provider: metalsoft }
    ignore: true
";
    assert_one(
        text,
        6,
        5,
        "rule `instances` can never match: rule `everything-else` at m.yaml:3",
    );
}

#[test]
fn errors_from_two_files_are_both_reported() {
    let a = "version: 1\nrules:\n  - name: a\n    match: {}\n    metirc: x\n";
    let b = "version: 1\ncustomers:\n  - match: { sub_acount_id: \"1\" }\n    external_subscription_id: s\n";
    let e = load(&[("a.yaml", a), ("b.yaml", b)]).unwrap_err();
    let lines: Vec<String> = e.to_string().lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[0].starts_with("a.yaml:5:5: "), "{lines:#?}");
    assert!(lines[0].contains("unknown field `metirc`"), "{lines:#?}");
    assert!(lines[1].starts_with("b.yaml:3:14: "), "{lines:#?}");
    assert!(
        lines[1].contains("did you mean `sub_account_id`?"),
        "{lines:#?}"
    );
}

#[test]
fn garbage_never_panics() {
    for text in [
        "",
        "---",
        "[]",
        "version: 1\nrules: 5\n",
        "version: 1\nrules:\n  - 5\n",
        "version: 1\nrules:\n  - name: a\n    match: 7\n    ignore: true\n",
        "version: 1\nrules:\n  - name: a\n    match: { resource_type: { glob: 1, one_of: [] } }\n",
        "version: 1\nrules:\n  - name: a\n    match: { resource_type: ~ }\n    ignore: true\n",
        "version: 1\nrules:\n  - name: \"bad name\"\n    match: {}\n    ignore: true\n",
        "version: 1\nrules:\n  - name: a\n    match: {}\n    metric: m\n    value: { quantity: { unit: hours, factor: 2 } }\n",
        "version: 1\nrules:\n  - name: a\n    match: {}\n    metric: m\n    value: { cost: {}, quantity: {} }\n",
        "\u{0}\u{1}{{{",
    ] {
        let result = load(&[("m.yaml", text)]);
        assert!(result.is_err(), "expected an error for {text:?}");
    }
}

/// Two customer entries that can match one record at the same priority bill by file order.
/// Billing the same subscription does not make the tie harmless when they price differently
/// (or name another customer): a 10 % and a 50 % markup for the same record is a wrong
/// invoice decided by which entry happens to come first. It must be a load error, as for two
/// subscriptions.
#[test]
fn tied_customer_entries_with_different_pricing_are_ambiguous() {
    let text = "version: 1
customers:
  - match: { sub_account_id: \"1\" }
    external_subscription_id: sub_a
    pricing: { markup_percent: 10 }
  - match: { provider: metalsoft }
    external_subscription_id: sub_a
    pricing: { markup_percent: 50 }
";
    assert_one(
        text,
        6,
        3,
        "can match the same records as the entry at m.yaml:3:3",
    );
    // Another customer id on the same subscription is just as ambiguous.
    let text = "version: 1
customers:
  - match: { sub_account_id: \"1\" }
    external_subscription_id: sub_a
    external_customer_id: acme
  - match: { provider: metalsoft }
    external_subscription_id: sub_a
    external_customer_id: globex
";
    assert_one(
        text,
        6,
        3,
        "can match the same records as the entry at m.yaml:3:3",
    );
    // Entries that bill alike (same subscription, customer and pricing; `10` = `10.0`) may tie.
    let text = "version: 1
customers:
  - match: { sub_account_id: \"1\" }
    external_subscription_id: sub_a
    pricing: { markup_percent: 10 }
  - match: { provider: metalsoft }
    external_subscription_id: sub_a
    pricing: { markup_percent: \"10.0\" }
";
    assert!(load(&[("m.yaml", text)]).is_ok());
}

/// A byte that is not UTF-8 in an account directory or a mapping file is reported at its line
/// and column in that file, not as "stream did not contain valid UTF-8" without a place.
#[test]
fn a_byte_that_is_not_utf8_is_reported_at_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        "version: 1\ncustomers_csv: accounts.csv\nrules: []\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("accounts.csv"),
        b"provider,sub_account_id,external_subscription_id\nmetalsoft,1,sub_a\nmetalsoft,2\xff,sub_b\n",
    )
    .unwrap();
    let err = MappingSet::load(&[dir.path().to_path_buf()])
        .map(|_| ())
        .expect_err("a load error")
        .to_string();
    assert!(err.contains("accounts.csv:3:12: "), "{err}");
    assert!(err.contains("UTF-8"), "{err}");

    std::fs::write(
        dir.path().join("m.yaml"),
        b"version: 1\n# caf\xe9\nrules: []\n",
    )
    .unwrap();
    let err = MappingSet::load(&[dir.path().to_path_buf()])
        .map(|_| ())
        .expect_err("a load error")
        .to_string();
    assert!(err.contains("m.yaml:2:6: "), "{err}");
}

/// Months are cut at a fixed UTC offset only: a time zone name (whose offset changes with
/// daylight saving time) is a load error at its line, never read as some fixed offset.
#[test]
fn a_time_zone_name_as_period_offset_is_refused_at_its_line() {
    for zone in ["Europe/Berlin", "CET", "UTC+1", "+0900", "9"] {
        let text = format!(
            "version: 1
rules:
  - name: paas
    match: {{ provider: jelastic }}
    metric: paas_cost
    value:
      cost:
        minimum: \"50\"
        period: month
        period_utc_offset: \"{zone}\"
"
        );
        assert_one(&text, 10, 28, "invalid UTC offset");
    }
}

// --- one month, one price: what else shapes a month's price -----------------------------

/// Loads `text`, which must fail; returns the errors joined (for `contains` checks).
fn error_text(text: &str) -> String {
    errors(text).join("\n")
}

/// Two rules feed `resale_cost` of one subscription with the same monthly tiers, but `cloud`
/// takes a 20 % commission after them. The month's tiers add `(tiered(S) − lowest% × S) ×
/// factor`, and the factor is that of the month's latest record: with a month base of 20,000
/// and tiers 20 % up to 10,000 then 10 %, the month settles at a different total depending on
/// which rule priced the last record (the tiers add 1,000 or 1,250). A load error naming both.
#[test]
fn rules_whose_commission_after_the_monthly_tiers_differs_are_refused() {
    let text = "version: 1
customers:
  - match: {}
    external_subscription_id: sub_a
rules:
  - name: dedicated
    match: { resource_type: server }
    metric: resale_cost
    value:
      cost:
        tiers: [{ up_to: \"10000\", markup_percent: 20 }, { markup_percent: 10 }]
        period: month
  - name: cloud
    match: { resource_type: instance }
    metric: resale_cost
    value:
      cost:
        tiers: [{ up_to: \"10000\", markup_percent: 20 }, { markup_percent: 10 }]
        commission_percent: 20
        period: month
";
    let err = error_text(text);
    assert!(
        err.contains("m.yaml:13:5: rule `cloud` (through the customer entry at m.yaml:3:3) feeds metric `resale_cost` of subscription sub_a")
            && err.contains("× 1.25 after the tiers")
            && err.contains("but rule `dedicated` (through the customer entry at m.yaml:3:3) feeds it with"),
        "{err}"
    );
    // The same commission on both loads.
    let same = text.replace(
        "        period: month\n  - name: cloud",
        "        commission_percent: 20\n        period: month\n  - name: cloud",
    );
    assert!(load(&[("m.yaml", &same)]).is_ok());
}

/// The month's total is rounded once with the rounding of the rule of the month's latest
/// record: a rule rounding to whole units beside one rounding to cents makes the month's
/// minimum adjustment depend on which record came last (records carrying 60.55 settle at 61
/// or at 60.55). A load error naming both rules.
#[test]
fn rules_whose_rounding_of_the_month_differs_are_refused() {
    let err = error_text(
        "version: 1
customers:
  - match: {}
    external_subscription_id: sub_a
rules:
  - name: servers
    match: { resource_type: server }
    metric: resale_cost
    value: { cost: { minimum: \"50\", period: month } }
  - name: instances
    match: { resource_type: instance }
    metric: resale_cost
    value: { cost: { minimum: \"50\", period: month } }
    round: { scale: 0 }
",
    );
    assert!(
        err.contains("m.yaml:10:5: rule `instances` (through the customer entry at m.yaml:3:3) feeds metric `resale_cost`")
            && err.contains("rounded half_up to 0 places")
            && err.contains("rule `servers`"),
        "{err}"
    );
}

/// Two customer entries bill `sub_a` with the same monthly tiers, one taking a commission after
/// them: the month's tiers are scaled by the commission of whichever entry priced the month's
/// latest record. A load error naming both entries.
#[test]
fn customer_entries_whose_commission_after_the_monthly_tiers_differs_are_refused() {
    let err = error_text(
        "version: 1
customers:
  - match: { sub_account_id: \"1\" }
    external_subscription_id: sub_a
    pricing:
      tiers: [{ up_to: \"1000\", markup_percent: 20 }, { markup_percent: 10 }]
      period: month
  - match: { sub_account_id: \"2\" }
    external_subscription_id: sub_a
    pricing:
      tiers: [{ up_to: \"1000\", markup_percent: 20 }, { markup_percent: 10 }]
      commission_percent: 15
      period: month
rules:
  - name: cost
    match: {}
    metric: resale_cost
    value: { cost: {} }
",
    );
    assert!(
        err.contains("m.yaml:8:3: customer entry bills sub_a with monthly pricing")
            && err.contains("but the entry at m.yaml:3:3"),
        "{err}"
    );
}

/// The rule tiers the month; two entries bill `sub_a` without monthly pricing of their own but
/// with different markups, which follow the rule's tiers and so scale what they add to the
/// month. Which markup scales the month would depend on the latest record: a load error naming
/// the rule and both entries. Without monthly tiers the same entries load (each record keeps
/// its own markup and the month has nothing to scale).
#[test]
fn customer_markups_after_a_rules_monthly_tiers_must_agree() {
    let text = "version: 1
customers:
  - match: { sub_account_id: \"1\" }
    external_subscription_id: sub_a
    pricing: { markup_percent: 10 }
  - match: { sub_account_id: \"2\" }
    external_subscription_id: sub_a
    pricing: { markup_percent: 20 }
rules:
  - name: cost
    match: {}
    metric: resale_cost
    value:
      cost:
        tiers: [{ up_to: \"1000\", markup_percent: 20 }, { markup_percent: 10 }]
        period: month
";
    let err = error_text(text);
    assert!(
        err.contains("rule `cost`")
            && err.contains("sub_a")
            && err.contains("m.yaml:3:3")
            && err.contains("m.yaml:6:3"),
        "{err}"
    );
    let flat = text.replace(
        "        tiers: [{ up_to: \"1000\", markup_percent: 20 }, { markup_percent: 10 }]\n        period: month\n",
        "        markup_percent: 5\n",
    );
    assert!(load(&[("m.yaml", &flat)]).is_ok(), "{flat}");
}

/// The sync groups a month by the resolved sink: a rule without `sink:` goes to the default
/// sink, which may be `lago`. Since the default is not known when the mapping loads, a rule
/// without `sink:` and one with `sink: lago` that price the month differently are refused;
/// two rules naming different sinks are two months and load.
#[test]
fn a_rule_without_sink_may_meet_any_sink() {
    let text = "version: 1
rules:
  - name: drives
    match: { resource_type: drive }
    metric: storage_cost
    value: { cost: { minimum: \"50\", period: month } }
    target: { external_subscription_id: sub_a }
  - name: buckets
    match: { resource_type: bucket }
    metric: storage_cost
    sink: lago
    value: { cost: { markup_percent: 10 } }
    target: { external_subscription_id: sub_a }
";
    let err = error_text(text);
    assert!(
        err.contains("m.yaml:8:5: rule `buckets` (billed by its `target`) feeds metric `storage_cost` of subscription sub_a")
            && err.contains("rule `drives`"),
        "{err}"
    );
    let two_sinks = text.replace(
        "    value: { cost: { minimum",
        "    sink: files\n    value: { cost: { minimum",
    );
    assert!(load(&[("m.yaml", &two_sinks)]).is_ok(), "{two_sinks}");
}

/// `direct` bills `sub_a` by `target`, so its records get no monthly share; `cost` reaches
/// `sub_a` through the customer entry, whose pricing is `minimum: 50` a month. A month with 40
/// through `direct` and 10 through `cost` would be raised to 50 on the 10 alone (+40, 90
/// billed). A load error naming both rules and the subscription.
#[test]
fn a_target_rule_beside_a_customers_monthly_pricing_is_refused() {
    let text = "version: 1
customers:
  - match: { provider: metalsoft }
    external_subscription_id: sub_a
    pricing: { minimum: \"50\", period: month }
rules:
  - name: direct
    match: { resource_type: gpu }
    metric: resale_cost
    target: { external_subscription_id: sub_a }
    value: { cost: {} }
  - name: cost
    match: {}
    metric: resale_cost
    value: { cost: {} }
";
    let err = error_text(text);
    assert!(
        err.contains("rule `direct`") && err.contains("rule `cost`") && err.contains("sub_a"),
        "{err}"
    );
    // Both rules pricing the month as the entry does loads: both parts settle as one month.
    let same = text.replace(
        "    value: { cost: {} }",
        "    value: { cost: { minimum: \"50\", period: month } }",
    );
    assert!(load(&[("m.yaml", &same)]).is_ok(), "{same}");
    // Another metric, or another subscription, is another month.
    let other = text.replace(
        "target: { external_subscription_id: sub_a }",
        "target: { external_subscription_id: sub_b }",
    );
    assert!(load(&[("m.yaml", &other)]).is_ok(), "{other}");
}

/// The account directory bills account 101 to `sub_a` without pricing; the customer entry bills
/// account 1 to `sub_a` with a 10 % markup, which follows the rule's monthly tiers and scales
/// what they add. The month of `sub_a` would be tiered with or without that markup depending
/// on whose record came last: a load error naming the rule, the entry and the directory row.
#[test]
fn a_directory_row_beside_an_entry_scaling_a_rules_monthly_tiers_is_refused() {
    let yaml = "version: 1
customers_csv: accounts.csv
customers:
  - match: { provider: metalsoft, sub_account_id: \"1\" }
    external_subscription_id: sub_a
    pricing: { markup_percent: 10 }
rules:
  - name: cost
    match: { provider: metalsoft }
    metric: resale_cost
    value:
      cost:
        tiers: [{ up_to: \"1000\", markup_percent: 20 }, { markup_percent: 10 }]
        period: month
";
    let csv = "provider,sub_account_id,external_subscription_id,external_customer_id
metalsoft,101,sub_a,acme
";
    let err = match load(&[("m.yaml", yaml), ("accounts.csv", csv)]) {
        Ok(_) => panic!("expected a load error"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("rule `cost`")
            && err.contains("sub_a")
            && err.contains("m.yaml:4:3")
            && err.contains("directory row accounts.csv:2"),
        "{err}"
    );
    // Another subscription for the directory's account is another month.
    let apart = csv.replace("sub_a,", "sub_b,");
    assert!(load(&[("m.yaml", yaml), ("accounts.csv", &apart)]).is_ok());
}

/// What the month checks must not refuse (each loaded before them, and prices one month one
/// way): rules feeding one metric of *different* subscriptions with different steps after the
/// tiers, rounding or sinks (two months, each settled on its own); and a rule converting to USD
/// beside one taking the record's currency on one subscription, both rounded to the currency's
/// minor unit (a month's records share one currency, so both round to cents in a USD month).
#[test]
fn rules_that_never_share_a_month_or_round_it_alike_load() {
    let apart = "version: 1
customers:
  - match: { provider: softlayer }
    external_subscription_id: sub_us
  - match: { provider: sakura }
    external_subscription_id: sub_jp
rules:
  - name: softlayer-cost
    match: { provider: softlayer }
    metric: resale_cost
    value:
      cost:
        tiers: [{ up_to: \"1000\", markup_percent: 20 }, { markup_percent: 10 }]
        commission_percent: 20
        period: month
    round: { scale: 2 }
  - name: sakura-cost
    match: { provider: sakura }
    metric: resale_cost
    sink: stripe
    value:
      cost:
        tiers: [{ up_to: \"1000\", markup_percent: 20 }, { markup_percent: 10 }]
        period: month
    round: { scale: 0 }
";
    if let Err(e) = load(&[("m.yaml", apart)]) {
        panic!("two subscriptions, two months: {e}");
    }
    let converted = "version: 1
rates_csv: rates.csv
customers:
  - match: {}
    external_subscription_id: sub_a
rules:
  - name: sakura-cost
    match: { provider: sakura }
    metric: resale_cost
    value: { cost: { currency: USD, minimum: \"50\", period: month } }
  - name: softlayer-cost
    match: { provider: softlayer }
    metric: resale_cost
    value: { cost: { minimum: \"50\", period: month } }
";
    let rates = "from,to,rate,effective_from\nJPY,USD,0.0067,2026-01-01\n";
    if let Err(e) = load(&[("m.yaml", converted), ("rates.csv", rates)]) {
        panic!("both round to the month's currency's minor unit: {e}");
    }
}
