//! Mapping tooling: broken fixtures, JSON Schema, mapping test cases, explain, pricing,
//! account directory, remote check.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use billsync::mapping::cases::{read_case_files, run_cases};
use billsync::mapping::remote::{RemoteMetric, RemoteSubscription};
use billsync::mapping::{MapOutcome, MappingSet};
use billsync::record::UsageRecord;
use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dec(s: &str) -> Decimal {
    s.parse().expect("test decimal")
}

fn record() -> UsageRecord {
    UsageRecord {
        provider: "metalsoft".into(),
        source: "metalsoft".into(),
        billing_account_id: "ms".into(),
        sub_account_id: "1".into(),
        resource_id: "77".into(),
        resource_name: None,
        resource_type: "drive".into(),
        service_name: "metalsoft".into(),
        sku_id: None,
        charge_description: None,
        charge_period_start: Utc.with_ymd_and_hms(2026, 2, 10, 0, 0, 0).unwrap(),
        charge_period_end: Utc.with_ymd_and_hms(2026, 2, 11, 0, 0, 0).unwrap(),
        consumed_quantity: dec("86400"),
        consumed_unit: "seconds".into(),
        billed_cost: dec("150"),
        billing_currency: "GBP".into(),
        scope: "1".into(),
        natural_key: vec![],
        is_final: true,
        attributes: BTreeMap::new(),
        raw: Default::default(),
    }
}

fn load(files: &[(&str, &str)]) -> MappingSet {
    let sources: Vec<(String, String)> = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    match MappingSet::from_sources(&sources) {
        Ok(s) => s,
        Err(e) => panic!("should load:\n{e}"),
    }
}

fn mapped(o: MapOutcome) -> billsync::mapping::MappedEvent {
    match o {
        MapOutcome::Mapped(e) => e,
        other => panic!("expected mapped, got {other:?}"),
    }
}

/// Every fixture in `tests/fixtures/mappings/broken/*.yaml` names its expected error on its
/// first line: `# expect: FILE:LINE:COLUMN: message fragment`. Loading must fail with exactly
/// that position and fragment (and must not panic).
#[test]
fn broken_fixtures_report_file_line_column() {
    let dir = root().join("tests/fixtures/mappings/broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "only {} fixtures", files.len());
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let first = text.lines().next().unwrap_or_default();
        let expect = first
            .strip_prefix("# expect: ")
            .unwrap_or_else(|| panic!("{} lacks `# expect:`", f.display()));
        let (pos, fragment) = expect.split_at(expect.find(": ").unwrap());
        let fragment = &fragment[2..];
        let mut parts = pos.rsplitn(3, ':');
        let column: usize = parts.next().unwrap().parse().unwrap();
        let line: usize = parts.next().unwrap().parse().unwrap();
        let file = parts.next().unwrap();
        let result = std::panic::catch_unwind(|| MappingSet::load(std::slice::from_ref(f)));
        let errs = match result {
            Err(_) => {
                failures.push(format!("{}: panicked", f.display()));
                continue;
            }
            Ok(Ok(_)) => {
                failures.push(format!("{}: loaded without error", f.display()));
                continue;
            }
            Ok(Err(e)) => e.errors,
        };
        let hit = errs.iter().any(|e| {
            Path::new(&e.file).file_name().is_some_and(|n| n == file)
                && e.line == line
                && e.column == column
                && e.message.contains(fragment)
        });
        if !hit {
            failures.push(format!(
                "{}: expected {file}:{line}:{column}: {fragment}\n   got: {}",
                f.display(),
                errs.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n        ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn shipped_schema_is_the_generated_one() {
    let shipped = std::fs::read_to_string(root().join("mappings/schema.json")).unwrap();
    assert_eq!(
        shipped,
        billsync::mapping::json_schema_text(),
        "mappings/schema.json is stale: run `billsync mappings schema > mappings/schema.json`"
    );
}

#[test]
fn example_files_declare_the_schema_and_satisfy_it() {
    let schema: serde_json::Value =
        serde_json::from_str(&billsync::mapping::json_schema_text()).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    for name in ["customers.yaml", "metalsoft.yaml"] {
        let text = std::fs::read_to_string(root().join("mappings").join(name)).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema=./schema.json\n"),
            "{name} lacks the schema modeline"
        );
        let value: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
    // And the schema rejects what the loader rejects, for an editor's red squiggle.
    let bad: serde_json::Value =
        serde_yaml_ng::from_str("version: 1\nrules:\n  - name: r\n    match: {}\n    metirc: x\n")
            .unwrap();
    assert!(!validator.is_valid(&bad));
}

#[test]
fn shipped_mapping_tests_pass() {
    let set = MappingSet::load(&[root().join("mappings")]).unwrap();
    let (files, errors) = read_case_files(&[root().join("mappings/tests")]);
    assert!(errors.is_empty(), "{errors:?}");
    let report = run_cases(&set, &files);
    assert!(report.passed(), "{report}");
    // Every rule of the examples is exercised by some case, and the held outcome too.
    let text = report.to_string();
    assert!(report.results.len() >= 8, "{text}");
    let cases = files.iter().map(|(_, t)| t.as_str()).collect::<String>();
    for id in set.rule_ids() {
        let id_in_cases =
            cases.contains(id) || report.results.iter().any(|r| r.outcome.contains(id));
        assert!(id_in_cases, "no case covers {id}");
    }
    assert!(cases.contains("held:"));
}

#[test]
fn a_wrong_expectation_fails_with_a_field_by_field_diff() {
    let set = MappingSet::load(&[root().join("mappings")]).unwrap();
    let case = "defaults: { provider: metalsoft, sub_account_id: \"1\", billing_currency: GBP }
cases:
  - name: wrong value
    record: { resource_type: drive, consumed_unit: seconds, billed_cost: \"7.25925278\" }
    expect:
      metric: storage_cost
      value: \"8.70\"
      subscription: sub_globex_main
";
    let report = run_cases(&set, &[("wrong.yaml".into(), case.into())]);
    assert!(!report.passed());
    let text = report.to_string();
    assert!(text.contains("FAIL  wrong.yaml:3:5 wrong value"), "{text}");
    assert!(text.contains("✗ value"), "{text}");
    assert!(text.contains("8.70") && text.contains("8.71"), "{text}");
    assert!(text.contains("✗ subscription"), "{text}");
    assert!(text.contains("sub_acme_main"), "{text}");
    assert!(text.contains("  metric"), "{text}");
    assert!(text.contains("1 case(s): 0 passed, 1 failed"), "{text}");
}

/// A case's amount with a digit separator is not a number (rust_decimal skips `_`: `0_50`
/// was 50, and an expectation `8_70` matched 870): the case fails naming the field.
#[test]
fn a_case_amount_with_a_digit_separator_is_not_a_decimal() {
    let set = MappingSet::load(&[root().join("mappings")]).unwrap();
    let case = "defaults: { provider: metalsoft, sub_account_id: \"1\", billing_currency: GBP }
cases:
  - name: separator
    record: { resource_type: drive, consumed_unit: seconds, billed_cost: \"7_25\" }
    expect: { metric: storage_cost }
";
    let report = run_cases(&set, &[("sep.yaml".into(), case.into())]);
    let text = report.to_string();
    assert!(!report.passed(), "{text}");
    assert!(
        text.contains("`billed_cost` is not a decimal: `7_25`"),
        "{text}"
    );
}

#[test]
fn cli_mappings_test_exits_non_zero_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("bad.yaml");
    std::fs::write(
        &case,
        "cases:\n  - name: x\n    record: { provider: metalsoft, resource_type: subnet }\n    expect: { held: true }\n",
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_billsync");
    let out = std::process::Command::new(bin)
        .args(["mappings", "test", "--mappings"])
        .arg(root().join("mappings"))
        .arg("--")
        .arg(&case)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("✗ outcome"), "{stdout}");
    let ok = std::process::Command::new(bin)
        .args(["mappings", "test", "--mappings"])
        .arg(root().join("mappings"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
}

const PRICED: &str = "version: 1
rates_csv: rates.csv
customers:
  - match: { provider: metalsoft }
    external_subscription_id: sub_default
  - match: { provider: metalsoft, sub_account_id: \"1\" }
    external_subscription_id: sub_vip
    priority: 10
    pricing: { markup_fixed: \"0.50\", minimum: \"5\", period: record }
rules:
  - name: gpu-tiered
    match: { resource_type: gpu }
    metric: gpu_cost
    value:
      cost:
        period: record
        tiers:
          - { up_to: 100, markup_percent: 20 }
          - { markup_percent: 10 }
  - name: drive-eur
    match: { resource_type: drive }
    metric: storage_cost
    value: { cost: { currency: EUR, commission_percent: 20 } }
  - name: jpy
    match: { resource_type: bucket }
    metric: bucket_cost
    value: { cost: { currency: JPY } }
";
const RATES: &str = "from,to,rate,effective_from
GBP,EUR,1.10,2026-01-01
GBP,EUR,1.20,2026-02-01
GBP,JPY,190.123,2026-01-01
";

/// Every file's `rates_csv` makes one table. Two files giving one pair and date different
/// rates would leave every conversion of that period to the order the files load in (80.00 or
/// 90.00 EUR for 100 USD, silently): a load error naming the row. The same rate twice is fine.
#[test]
fn two_rates_files_giving_one_date_different_rates_do_not_load() {
    let file = |csv: &str, rule: &str| {
        format!(
            "version: 1\nrates_csv: {csv}\nrules:\n  - name: {rule}\n    match: {{ resource_type: {rule} }}\n    target: {{ external_subscription_id: sub }}\n    metric: m_{rule}\n    value: {{ cost: {{ currency: EUR }} }}\n"
        )
    };
    let sources = |b_rate: &str| {
        vec![
            ("m/a.yaml".to_string(), file("a.csv", "drive")),
            (
                "m/a.csv".to_string(),
                "from,to,rate,effective_from\nUSD,EUR,0.90,2026-01-01\n".to_string(),
            ),
            ("m/b.yaml".to_string(), file("b.csv", "instance")),
            (
                "m/b.csv".to_string(),
                format!("from,to,rate,effective_from\nUSD,EUR,{b_rate},2026-01-01\n"),
            ),
        ]
    };
    let err = MappingSet::from_sources(&sources("0.80"))
        .expect_err("two rates for one date")
        .to_string();
    assert!(
        err.contains("b.csv") && err.contains("USD→EUR effective 2026-01-01 is 0.80 here but 0.90"),
        "{err}"
    );
    if let Err(e) = MappingSet::from_sources(&sources("0.9")) {
        panic!("the same rate twice loads: {e}");
    }
}

#[test]
fn pricing_steps_apply_in_order_and_show_in_explain() {
    let set = load(&[("m/priced.yaml", PRICED), ("m/rates.csv", RATES)]);
    // Tiers per record: 100 × 1.20 + 50 × 1.10 = 175; customer fixed +0.50 → 175.50.
    let mut r = record();
    r.resource_type = "gpu".into();
    let ev = mapped(set.apply(&r));
    assert_eq!(ev.external_subscription_id, "sub_vip", "priority 10 wins");
    assert_eq!(ev.value, dec("175.50"));
    // Currency: 150 GBP × 1.20 (February rate) = 180 EUR; ÷ 0.8 commission = 225; +0.50.
    r.resource_type = "drive".into();
    assert_eq!(mapped(set.apply(&r)).value, dec("225.50"));
    // January uses the January rate: 150 × 1.10 / 0.8 + 0.5 = 206.75.
    r.charge_period_start = Utc.with_ymd_and_hms(2026, 1, 15, 0, 0, 0).unwrap();
    assert_eq!(mapped(set.apply(&r)).value, dec("206.75"));
    // JPY rounds to 0 places by default; the minimum applies per record.
    r.resource_type = "bucket".into();
    r.billed_cost = dec("0.01");
    let ev = mapped(set.apply(&r));
    assert_eq!(ev.value, dec("5"), "1.90 + 0.50 JPY is below the minimum 5");
    r.billed_cost = dec("1");
    assert_eq!(
        mapped(set.apply(&r)).value,
        dec("191"),
        "190.123 + 0.5 → 191 (scale 0)"
    );
    // Before any rate: held with the reason.
    r.charge_period_start = Utc.with_ymd_and_hms(2025, 12, 31, 0, 0, 0).unwrap();
    match set.apply(&r) {
        MapOutcome::Unmapped { reason } => {
            assert!(reason.contains("no exchange rate GBP→JPY"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Explain: rules tried with the first failing condition, customers, every step.
    let mut r = record();
    r.resource_type = "drive".into();
    r.sub_account_id = "2".into();
    let ex = set.explain(&r);
    let text = ex.to_string();
    assert!(
        text.contains(
            "no       priced.yaml#gpu-tiered  (resource_type: expected gpu, actual drive)"
        ),
        "{text}"
    );
    assert!(text.contains("MATCH    priced.yaml#drive-eur"), "{text}");
    assert!(
        text.contains("sub_account_id: expected 1, actual 2"),
        "{text}"
    );
    for step in ["base", "currency", "commission", "rounding"] {
        assert!(
            ex.steps.iter().any(|s| s.step == step),
            "{step} missing:\n{text}"
        );
    }
    assert!(
        text.contains("GBP → EUR at rate 1.20 (effective 2026-02-01)"),
        "{text}"
    );
    assert!(
        text.contains("outcome: mapped by priced.yaml#drive-eur → subscription sub_default"),
        "{text}"
    );
    assert_eq!(ex.outcome, set.apply(&r));
}

#[test]
fn account_directory_of_50000_rows_loads_fast_and_maps() {
    let mut csv =
        String::from("provider,sub_account_id,external_subscription_id,external_customer_id\n");
    for i in 0..50_000 {
        csv.push_str(&format!("metalsoft,{i},sub_{i},cust_{i}\n"));
    }
    let yaml = "version: 1\ncustomers_csv: accounts.csv\nrules:\n  - name: r\n    match: {}\n    metric: m\n    value: { quantity: {} }\n";
    let sources = vec![
        ("d/map.yaml".to_string(), yaml.to_string()),
        ("d/accounts.csv".to_string(), csv),
    ];
    let started = Instant::now();
    let set = MappingSet::from_sources(&sources).unwrap();
    let took = started.elapsed();
    // About 0.3 s for a debug build on an idle 2-core machine; the bound leaves room for a busy
    // CI machine while still catching anything quadratic (which takes minutes at 50,000 rows).
    eprintln!("loading 50,000 directory rows took {took:?}");
    assert!(took.as_secs() < 5, "loading 50,000 rows took {took:?}");
    assert_eq!(set.directory_len(), 50_000);
    let mut r = record();
    r.sub_account_id = "43210".into();
    let ev = mapped(set.apply(&r));
    assert_eq!(ev.external_subscription_id, "sub_43210");
    assert_eq!(ev.external_customer_id.as_deref(), Some("cust_43210"));
}

/// Directories of several files share one packed table: each row is found by its own
/// (provider, account), the same account id of another provider bills elsewhere, an empty
/// customer cell is no customer, and a duplicate across files names the first file and line.
#[test]
fn account_directories_of_several_files_and_providers() {
    let yaml = |csv: &str| {
        format!("version: 1\ncustomers_csv: {csv}\nrules:\n  - name: r\n    match: {{}}\n    metric: m\n    value: {{ quantity: {{}} }}\n")
    };
    let a = "provider,sub_account_id,external_subscription_id,external_customer_id,priority\n\
             metalsoft,7,sub_ms_7,cust_ms_7,2\n\
             metalsoft,8,sub_ms_8,,\n";
    let b = "provider,sub_account_id,external_subscription_id,external_customer_id\n\
             sakura,7,sub_sk_7,cust_sk_7\n";
    let set = load(&[
        ("d/a.yaml", &yaml("a.csv")),
        ("d/a.csv", a),
        ("e/b.yaml", "version: 1\ncustomers_csv: b.csv\n"),
        ("e/b.csv", b),
    ]);
    assert_eq!(set.directory_len(), 3);
    let mut r = record();
    let bills = |r: &UsageRecord| {
        let ev = mapped(set.apply(r));
        (ev.external_subscription_id, ev.external_customer_id)
    };
    r.sub_account_id = "7".into();
    assert_eq!(bills(&r), ("sub_ms_7".into(), Some("cust_ms_7".into())));
    r.sub_account_id = "8".into();
    assert_eq!(bills(&r), ("sub_ms_8".into(), None));
    r.provider = "sakura".into();
    r.sub_account_id = "7".into();
    assert_eq!(bills(&r), ("sub_sk_7".into(), Some("cust_sk_7".into())));
    r.sub_account_id = "8".into();
    assert!(matches!(set.apply(&r), MapOutcome::Unmapped { .. }));
    // The explanation names the row it used, its file, line and priority.
    r.provider = "metalsoft".into();
    r.sub_account_id = "7".into();
    let text = set.explain(&r).to_string();
    assert!(
        text.contains(
            "a.csv:2 (directory: provider=metalsoft sub_account_id=7, bills sub_ms_7, priority 2)"
        ),
        "{text}"
    );

    let dup = "provider,sub_account_id,external_subscription_id\nmetalsoft,8,sub_other\n";
    let sources: Vec<(String, String)> = [
        ("d/a.yaml", yaml("a.csv")),
        ("d/a.csv", a.to_string()),
        ("e/b.yaml", "version: 1\ncustomers_csv: b.csv\n".to_string()),
        ("e/b.csv", dup.to_string()),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t))
    .collect();
    let err = MappingSet::from_sources(&sources).unwrap_err().to_string();
    assert!(
        err.contains(
            "b.csv:2:1: duplicate account provider=metalsoft sub_account_id=8 (first at d/a.csv:3)"
        ),
        "{err}"
    );
}

#[test]
fn overlapping_customers_with_a_priority_are_fine() {
    let text = "version: 1
customers:
  - match: { provider: metalsoft }
    external_subscription_id: sub_a
  - match: { sub_account_id: \"1\" }
    external_subscription_id: sub_b
    priority: 1
";
    let set = load(&[("c.yaml", text)]);
    assert!(set.warnings().is_empty());
}

#[test]
fn partially_overlapping_rules_warn() {
    let text = "version: 1
rules:
  - name: traffic
    match: { consumed_unit: gbytes }
    metric: net
    value: { quantity: {} }
  - name: lake
    match: { resource_type: data_lake }
    metric: lake
    value: { quantity: {} }
";
    let set = load(&[("r.yaml", text)]);
    let w: Vec<String> = set.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("r.yaml:7:5: warning: rule `lake` overlaps rule `traffic`"),
        "{w:?}"
    );
}

/// A customer entry's `pricing` applies to money only: the records of a quantity rule are
/// billed without it (a minimum agreed with the customer never charged). Loading says so, at
/// the entry, naming the rule; a cost rule or a rule with its own `target` says nothing.
#[test]
fn a_customers_pricing_on_a_quantity_rules_records_warns() {
    let text = "version: 1
customers:
  - match: { provider: metalsoft, sub_account_id: \"1\" }
    external_subscription_id: sub_a
    pricing: { minimum: \"50\", period: month }
rules:
  - name: hours
    match: { resource_type: instance }
    metric: instance_hours
    value: { quantity: { unit: hours } }
  - name: internal
    match: { resource_type: subnet }
    target: { external_subscription_id: sub_ops }
    metric: subnets
    value: { quantity: {} }
  - name: cost
    match: { resource_type: drive }
    metric: storage_cost
    value: { cost: {} }
";
    let set = load(&[("q.yaml", text)]);
    let w: Vec<String> = set.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("q.yaml:3:3: warning: this customer entry's `pricing` does not apply to the records of rule `hours` (q.yaml:7)"),
        "{w:?}"
    );
}

#[tokio::test]
async fn remote_check_against_the_lago_simulator() {
    use billsync::simulators::lago::{LagoSim, LagoSimConfig};
    let sim = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    sim.register_metric("instance_hours", "sum_agg", Some("hours"));
    sim.register_metric("storage_cost", "sum_agg", Some("value"));
    sim.register_metric("network_gb", "count_agg", None);
    for i in 0..150 {
        sim.register_subscription(&format!("sub_filler_{i}"), "x");
    }
    sim.register_subscription("sub_acme_main", "acme");
    let cfg = billsync::sinks::lago::LagoConfig {
        api_url: sim.url.clone(),
        api_key: billsync::config::Secret::new("lago-sim-key"),
        batch_size: 100,
        timeout: std::time::Duration::from_secs(5),
        retry: Default::default(),
    };
    let admin = billsync::sinks::lago_admin::LagoAdmin::new(&cfg).unwrap();
    let metrics: Vec<RemoteMetric> = admin.billable_metrics().await.unwrap();
    let subs: Vec<RemoteSubscription> = admin.subscription_list().await.unwrap();
    assert_eq!(subs.len(), 151, "pagination followed");
    let set = MappingSet::examples().unwrap();
    let findings: Vec<String> = set
        .check_remote("lago", "lago", &metrics, &subs, &BTreeMap::new())
        .iter()
        .map(|f| f.to_string())
        .collect();
    let all = findings.join("\n");
    assert!(all.contains("error: metric `storage_cost` (sum_agg) aggregates the property `value`, but rule metalsoft.yaml#storage-cost sends its value as `amount`"), "{all}");
    assert!(
        all.contains("warning: metric `network_gb` counts events (count_agg)"),
        "{all}"
    );
    assert!(
        all.contains("error: subscription `sub_globex_main`"),
        "{all}"
    );
    assert!(!all.contains("instance_hours"), "{all}");
    assert!(!all.contains("`sub_acme_main`"), "{all}");
    sim.shutdown().await;
}

/// `GET /api/v1/subscriptions` lists only active subscriptions unless asked for others
/// (lago-api `SubscriptionIndex`: `filters[:status] = ["active"] if filters[:status].blank?`).
/// A subscription that starts later (pending) or was terminated this month (its usage up to the
/// termination is still invoiced) exists in Lago: the remote check must not call it missing and
/// fail, or someone "fixes" a mapping away from a subscription that still bills.
#[tokio::test]
async fn remote_check_knows_pending_and_terminated_subscriptions() {
    use billsync::simulators::lago::{LagoSim, LagoSimConfig};
    let sim = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    sim.register_subscription("sub_acme_main", "acme");
    sim.register_subscription_with_status("sub_globex_main", "globex", "terminated");
    sim.register_subscription_with_status("sub_initech_next", "initech", "pending");
    sim.register_subscription_with_status("sub_never", "x", "canceled");
    // As Lago answers without a status filter: the active ones only.
    let plain: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/v1/subscriptions", sim.url))
        .bearer_auth("lago-sim-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(plain["meta"]["total_count"], 1, "{plain}");
    let cfg = billsync::sinks::lago::LagoConfig {
        api_url: sim.url.clone(),
        api_key: billsync::config::Secret::new("lago-sim-key"),
        batch_size: 100,
        timeout: std::time::Duration::from_secs(5),
        retry: Default::default(),
    };
    let admin = billsync::sinks::lago_admin::LagoAdmin::new(&cfg).unwrap();
    let subs: BTreeSet<String> = admin.subscription_ids().await.unwrap();
    assert_eq!(
        subs,
        BTreeSet::from([
            "sub_acme_main".to_string(),
            "sub_globex_main".to_string(),
            "sub_initech_next".to_string()
        ])
    );
    sim.shutdown().await;
}

/// `mappings check --remote` compares the mappings with every subscription and metric Lago
/// lists. A listing that never ends its pagination (a server or proxy answering every page with
/// a next one) was cut at 10,000 pages without a word, and the check then ran on a part of the
/// list: subscriptions beyond it reported missing, and someone "fixes" a mapping away from a
/// subscription that bills. Reaching the stop is an error naming the listing.
#[tokio::test]
async fn a_remote_listing_that_never_ends_is_an_error_naming_it() {
    use axum::extract::RawQuery;
    async fn endless(RawQuery(raw): RawQuery) -> axum::Json<serde_json::Value> {
        let page: u64 = raw
            .unwrap_or_default()
            .split('&')
            .find_map(|p| p.strip_prefix("page="))
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        axum::Json(serde_json::json!({
            "subscriptions": [{"external_id": format!("sub_{page}"), "status": "active"}],
            "meta": {"current_page": page, "next_page": page + 1, "prev_page": null}
        }))
    }
    let app = axum::Router::new().route("/api/v1/subscriptions", axum::routing::get(endless));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let cfg = billsync::sinks::lago::LagoConfig {
        api_url: format!("http://{addr}"),
        api_key: billsync::config::Secret::new("lago-sim-key"),
        batch_size: 100,
        timeout: std::time::Duration::from_secs(5),
        retry: Default::default(),
    };
    let admin = billsync::sinks::lago_admin::LagoAdmin::new(&cfg).unwrap();
    let err = admin
        .subscription_ids()
        .await
        .expect_err("a list that never ends is not checked in part");
    let text = err.to_string();
    assert!(
        text.contains("/api/v1/subscriptions") && text.contains("list of subscriptions"),
        "{text}"
    );
    assert!(text.contains("after 10000 pages"), "{text}");
}

/// `apply` (the sync's path, which writes no reasons) and `explain` reach the same outcome:
/// same rule, customer, value and properties, or the same held reason. Checked over a grid
/// of records against the shipped mappings, which covers every kind of outcome.
#[test]
fn explain_reaches_the_outcome_apply_does() {
    let set = MappingSet::load(&[root().join("mappings")]).unwrap();
    let (mut mapped_n, mut ignored_n, mut held_n) = (0, 0, 0);
    for provider in ["metalsoft", "sakura", "softlayer", "jelastic"] {
        for resource_type in [
            "drive",
            "instance",
            "subnet",
            "reservation_installment",
            "gpu",
        ] {
            for unit in ["seconds", "gbytes", "GB"] {
                for currency in ["GBP", "JPY", "USD"] {
                    for sub in ["1", "2", "unknown-42"] {
                        for reserved in ["0", "1"] {
                            let mut r = record();
                            r.provider = provider.into();
                            r.source = provider.into();
                            r.resource_type = resource_type.into();
                            r.consumed_unit = unit.into();
                            r.billing_currency = currency.into();
                            r.sub_account_id = sub.into();
                            r.attributes
                                .insert("is_reservation".into(), reserved.into());
                            r.attributes.insert("infrastructure_id".into(), "7".into());
                            let applied = set.apply(&r);
                            let explained = set.explain(&r);
                            assert_eq!(applied, explained.outcome, "{r:?}");
                            match applied {
                                MapOutcome::Mapped(_) => mapped_n += 1,
                                MapOutcome::Ignored { .. } => ignored_n += 1,
                                MapOutcome::Unmapped { .. } => held_n += 1,
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(
        mapped_n > 0 && ignored_n > 0 && held_n > 0,
        "{mapped_n} mapped, {ignored_n} ignored, {held_n} held"
    );
}

/// A `LagoAdmin` for a fake Lago at `url`, retrying quickly.
fn quick_admin(url: &str) -> billsync::sinks::lago_admin::LagoAdmin {
    let cfg = billsync::sinks::lago::LagoConfig {
        api_url: url.to_string(),
        api_key: billsync::config::Secret::new("lago-sim-key"),
        batch_size: 100,
        timeout: std::time::Duration::from_secs(1),
        retry: billsync::http::RetryPolicy {
            max_retries: 4,
            min_delay: std::time::Duration::from_millis(10),
            max_delay: std::time::Duration::from_millis(50),
        },
    };
    billsync::sinks::lago_admin::LagoAdmin::new(&cfg).unwrap()
}

/// One page of Lago's `GET /api/v1/subscriptions`, `meta` as Lago documents it
/// (`PaginationMeta`: `current_page`, `total_pages` and `total_count` are required).
fn subscriptions_page(
    ids: &[&str],
    page: u64,
    next: Option<u64>,
    total_pages: u64,
    total: u64,
) -> serde_json::Value {
    serde_json::json!({
        "subscriptions": ids
            .iter()
            .map(|id| serde_json::json!({"external_id": id, "status": "active"}))
            .collect::<Vec<_>>(),
        "meta": {
            "current_page": page,
            "next_page": next,
            "prev_page": if page > 1 { Some(page - 1) } else { None },
            "total_pages": total_pages,
            "total_count": total,
        }
    })
}

/// A listing whose `next_page` does not move forward (a proxy that drops the `page` parameter,
/// a server bug) cannot be followed: ending the list there checked the mappings against its
/// first page only, and every subscription beyond it was reported missing. It is an error
/// naming the listing and the page.
#[tokio::test]
async fn a_remote_listing_whose_next_page_does_not_move_forward_is_an_error_naming_it() {
    use wiremock::matchers::{method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let lago = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/subscriptions"))
        .and(query_param("page", "1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(subscriptions_page(
            &["sub_acme_main"],
            1,
            Some(1),
            2,
            2,
        )))
        .mount(&lago)
        .await;
    let err = quick_admin(&lago.uri())
        .subscription_ids()
        .await
        .expect_err("a list that cannot be followed is not checked in part");
    let text = err.to_string();
    assert!(text.contains("list of subscriptions"), "{text}");
    assert!(text.contains("next_page 1"), "{text}");
}

/// A listing that ends (`next_page` null) with fewer items than its `meta.total_count` is not
/// the whole list: checked as if it were, the subscriptions left out are reported missing.
#[tokio::test]
async fn a_remote_listing_shorter_than_its_total_count_is_an_error_not_missing_subscriptions() {
    use wiremock::matchers::{method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let lago = MockServer::start().await;
    for (page, ids, next) in [
        ("1", &["sub_acme_main", "sub_globex_main"][..], Some(2)),
        ("2", &["sub_initech_main"][..], None),
    ] {
        Mock::given(method("GET"))
            .and(path("/api/v1/subscriptions"))
            .and(query_param("page", page))
            .respond_with(ResponseTemplate::new(200).set_body_json(subscriptions_page(
                ids,
                page.parse().unwrap(),
                next,
                2,
                4,
            )))
            .mount(&lago)
            .await;
    }
    let err = quick_admin(&lago.uri())
        .subscription_ids()
        .await
        .expect_err("a short list is not checked");
    let text = err.to_string();
    assert!(text.contains("list of subscriptions"), "{text}");
    assert!(
        text.contains("total_count 4") && text.contains("3 items read"),
        "{text}"
    );
}

/// Listings are read with the sink's retry policy, as the sink's read-back is: a 503, a 429
/// (with its `Retry-After`) or a timeout on one page must not fail `mappings check --remote`.
#[tokio::test]
async fn remote_listings_retry_5xx_429_and_timeouts_with_the_sinks_retry_policy() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let lago = MockServer::start().await;
    let ok = subscriptions_page(&["sub_acme_main"], 1, None, 1, 1);
    for (priority, answer) in [
        (
            1,
            ResponseTemplate::new(503).set_body_string("upstream down"),
        ),
        (
            2,
            ResponseTemplate::new(429).insert_header("Retry-After", "0"),
        ),
        (
            3,
            ResponseTemplate::new(200)
                .set_body_json(ok.clone())
                .set_delay(std::time::Duration::from_secs(3)),
        ),
    ] {
        Mock::given(method("GET"))
            .and(path("/api/v1/subscriptions"))
            .respond_with(answer)
            .up_to_n_times(1)
            .with_priority(priority)
            .mount(&lago)
            .await;
    }
    Mock::given(method("GET"))
        .and(path("/api/v1/subscriptions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok))
        .with_priority(4)
        .mount(&lago)
        .await;
    let subs = quick_admin(&lago.uri()).subscription_ids().await.unwrap();
    assert_eq!(subs, BTreeSet::from(["sub_acme_main".to_string()]));
    assert_eq!(lago.received_requests().await.unwrap().len(), 4);
}

// --- invoicing periods: Lago's grace period and timezone ------------------------------------

/// Settings with `providers` (YAML, indented two spaces) and a Lago sink at `lago_url`, and one
/// mapping file billing MetalSoft to `sub_ms`, SAKURA to `sub_jp`.
fn period_settings(dir: &Path, lago_url: &str, providers: &str) -> billsync::config::Settings {
    let key = dir.join("lago.key");
    std::fs::write(&key, "lago-sim-key").unwrap();
    for name in ["ms.key", "sakura.token", "sakura.secret"] {
        std::fs::write(dir.join(name), "x").unwrap();
    }
    let maps = dir.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    std::fs::write(
        maps.join("m.yaml"),
        "version: 1\ncustomers:\n  - match: { provider: metalsoft }\n    external_subscription_id: sub_ms\n  - match: { provider: sakura }\n    external_subscription_id: sub_jp\nrules:\n  - name: usage\n    match: {}\n    metric: usage\n    value: { cost: {} }\n",
    )
    .unwrap();
    let providers = providers.replace("DIR", dir.to_str().unwrap());
    let cfg = dir.join("billsync.yaml");
    std::fs::write(
        &cfg,
        format!(
            "ledger:\n  path: {}\nmappings: [{}]\nproviders:\n{providers}sinks:\n  lago:\n    kind: lago\n    api_url: {lago_url}\n    api_key: file:{}\n    retry: {{ max_retries: 0 }}\n",
            dir.join("ledger.db").display(),
            maps.display(),
            key.display()
        ),
    )
    .unwrap();
    billsync::config::Settings::load(&cfg).unwrap()
}

const METALSOFT_AND_SAKURA: &str = "  metalsoft_us01:\n    kind: metalsoft\n    endpoint: http://127.0.0.1:9\n    api_key: file:DIR/ms.key\n    user_ids: [1]\n    window: 1h\n    settle_delay: 2h\n    start: 2026-10-01T00:00:00Z\n  sakura_main:\n    kind: sakura\n    endpoint: http://127.0.0.1:9/cloud/zone/is1a/api/system/1.0\n    token: file:DIR/sakura.token\n    secret: file:DIR/sakura.secret\n    start_month: 2026-09\n    final_lag: 1d\n";

/// What `mappings check --remote` says about invoicing periods for the settings' Lago sink,
/// with an hourly run.
async fn period_check(settings: &billsync::config::Settings) -> Vec<String> {
    let billsync::config::SinkSettings::Lago(cfg) = &settings.sinks["lago"] else {
        panic!("a lago sink")
    };
    let set = MappingSet::load(&settings.mappings).unwrap();
    let admin = billsync::sinks::lago_admin::LagoAdmin::new(cfg).unwrap();
    let subs = admin.subscriptions().await.unwrap();
    billsync::sinks::lago_admin::period_findings(
        &admin,
        settings,
        &set,
        &subs,
        chrono::Duration::hours(1),
    )
    .await
    .unwrap()
    .iter()
    .map(|f| f.to_string())
    .collect()
}

/// Lago bills an event in the period of its timestamp, and not at all once that period's
/// invoice is finalized, which happens when the invoice grace period after the period's end
/// is over. SAKURA records of a month are final, and sent, only on the 1st of the next month
/// 00:00 JST plus `final_lag` (then the next hourly run): with a grace period of one day, the
/// month's records reach Lago after its invoice was finalized and are never billed. The check
/// must say so, naming the billing entity whose grace period applies, the source and both
/// figures; MetalSoft's 1h window + 2h + 1h fit in the day and are not warned about.
#[tokio::test]
async fn a_grace_period_shorter_than_a_sources_lateness_is_a_warning_naming_both_figures() {
    use billsync::simulators::lago::{LagoSim, LagoSimConfig};
    let sim = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    sim.register_billing_entity("acme_jp", 1, "Asia/Tokyo");
    sim.register_subscription("sub_ms", "metal_co");
    sim.register_subscription("sub_jp", "tokyo_co");
    sim.register_customer("tokyo_co", Some("Asia/Tokyo"), None, None);
    let dir = tempfile::tempdir().unwrap();
    let settings = period_settings(dir.path(), &sim.url, METALSOFT_AND_SAKURA);
    let findings = period_check(&settings).await;
    let all = findings.join("\n");
    assert_eq!(findings.len(), 1, "{all}");
    assert!(
        all.starts_with(
            "warning: billing entity `acme_jp` (of customer(s) `tokyo_co` without a grace period \
             of their own): invoice grace period 1 day is shorter than the 1day 1h after a \
             period's end that `sakura_main` needs"
        ),
        "{all}"
    );
    assert!(all.contains("final_lag 1 day + run interval 1h"), "{all}");
    assert!(
        all.contains("set invoice_grace_period to at least 2 days"),
        "{all}"
    );
    assert!(!all.contains("metalsoft_us01"), "{all}");
    sim.shutdown().await;
}

/// The same sources with a customer's own grace period long enough (two days for SAKURA's
/// 1 day + 1h; MetalSoft's customer inherits the entity's day for its 5h): nothing to say.
#[tokio::test]
async fn a_grace_period_covering_every_sources_lateness_gives_no_warning() {
    use billsync::simulators::lago::{LagoSim, LagoSimConfig};
    let sim = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    sim.register_billing_entity("acme_jp", 1, "Asia/Tokyo");
    sim.register_subscription("sub_ms", "metal_co");
    sim.register_subscription("sub_jp", "tokyo_co");
    sim.register_customer("tokyo_co", Some("Asia/Tokyo"), Some(2), None);
    let dir = tempfile::tempdir().unwrap();
    let settings = period_settings(dir.path(), &sim.url, METALSOFT_AND_SAKURA);
    let findings = period_check(&settings).await;
    assert!(findings.is_empty(), "{findings:?}");
    // The customers were read, one by one, and the billing entities.
    let routes: Vec<String> = sim.requests().iter().map(|r| r.route.clone()).collect();
    assert!(
        routes.contains(&"GET /api/v1/billing_entities".to_string()),
        "{routes:?}"
    );
    assert_eq!(
        routes
            .iter()
            .filter(|r| *r == "GET /api/v1/customers/{external_customer_id}")
            .count(),
        2,
        "{routes:?}"
    );
    sim.shutdown().await;
}

/// A SAKURA record is dated at its month's start, the 1st 00:00 JST: 15:00 UTC on the last day
/// of the month before. A Lago customer billed in UTC (Lago's default) gets it in the previous
/// billing period, finalized long before the SAKURA month is final: never billed, whatever the
/// grace period. The check must say so for that customer.
#[tokio::test]
async fn sakura_usage_billed_to_a_customer_in_utc_is_a_warning_about_the_previous_period() {
    use billsync::simulators::lago::{LagoSim, LagoSimConfig};
    let sim = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    sim.register_billing_entity("acme", 3, "UTC");
    sim.register_subscription("sub_ms", "metal_co");
    sim.register_subscription("sub_jp", "tokyo_co");
    let dir = tempfile::tempdir().unwrap();
    let settings = period_settings(dir.path(), &sim.url, METALSOFT_AND_SAKURA);
    let findings = period_check(&settings).await;
    let all = findings.join("\n");
    assert_eq!(findings.len(), 1, "{all}");
    assert!(
        all.starts_with(
            "warning: customer `tokyo_co` is billed in timezone UTC but SAKURA source \
             `sakura_main` feeds it"
        ),
        "{all}"
    );
    assert!(all.contains("previous billing period"), "{all}");
    // In Asia/Tokyo (or east of it) the month starts inside the month: no warning.
    sim.register_customer("tokyo_co", Some("Australia/Sydney"), None, None);
    assert!(period_check(&settings).await.is_empty());
    sim.shutdown().await;
}

/// `period: month` adjustments are settled `period_close_delay` (default 3 days) after the
/// month and dated at its latest record: a grace period shorter than that (plus a run) loses
/// them, even for a source that is itself on time.
#[tokio::test]
async fn month_pricing_needs_a_grace_period_of_its_close_delay() {
    use billsync::simulators::lago::{LagoSim, LagoSimConfig};
    let sim = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    sim.register_billing_entity("acme", 2, "UTC");
    sim.register_subscription("sub_ms", "metal_co");
    let dir = tempfile::tempdir().unwrap();
    let metalsoft = METALSOFT_AND_SAKURA
        .split("  sakura_main:")
        .next()
        .unwrap()
        .to_string();
    let settings = period_settings(dir.path(), &sim.url, &metalsoft);
    assert!(period_check(&settings).await.is_empty());
    std::fs::write(
        dir.path().join("maps/m.yaml"),
        "version: 1\ncustomers:\n  - match: { provider: metalsoft }\n    external_subscription_id: sub_ms\n    pricing: { minimum: \"50\", period: month }\nrules:\n  - name: usage\n    match: {}\n    metric: usage\n    value: { cost: {} }\n",
    )
    .unwrap();
    let all = period_check(&settings).await.join("\n");
    assert!(
        all.contains(
            "invoice grace period 2 days is shorter than the 3days 1h after a period's end that \
             `period pricing` needs (month adjustments settle period_close_delay 3 days after \
             the month + run interval 1h)"
        ),
        "{all}"
    );
    sim.shutdown().await;
}

/// More customers than are worth reading one by one (an account directory of resellers' end
/// users) are read from the paginated customer listing instead, 100 a page; the warning about
/// their billing entity names the first few and counts the rest.
#[tokio::test]
async fn many_customers_are_read_from_the_listing_and_one_warning_counts_them() {
    use billsync::simulators::lago::{LagoSim, LagoSimConfig};
    let sim = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let metalsoft = METALSOFT_AND_SAKURA
        .split("  sakura_main:")
        .next()
        .unwrap()
        .to_string();
    let settings = period_settings(dir.path(), &sim.url, &metalsoft);
    let mut csv =
        String::from("provider,sub_account_id,external_subscription_id,external_customer_id\n");
    for i in 0..150 {
        csv.push_str(&format!("metalsoft,{i},sub_{i:03},c{i:03}\n"));
        sim.register_subscription(&format!("sub_{i:03}"), &format!("c{i:03}"));
    }
    std::fs::write(dir.path().join("maps/accounts.csv"), csv).unwrap();
    std::fs::write(
        dir.path().join("maps/m.yaml"),
        "version: 1\ncustomers_csv: accounts.csv\nrules:\n  - name: usage\n    match: {}\n    metric: usage\n    value: { cost: {} }\n",
    )
    .unwrap();
    let findings = period_check(&settings).await;
    let all = findings.join("\n");
    assert_eq!(findings.len(), 1, "{all}");
    assert!(
        all.contains(
            "billing entity `default` (of customer(s) `c000`, `c001`, `c002`, `c003`, `c004`, \
             and 145 more without a grace period of their own): invoice grace period 0 days is \
             shorter than the 5h after a period's end that `metalsoft_us01` needs (window 1h + \
             look_back 1h + settle_delay 2h + run interval 1h)"
        ),
        "{all}"
    );
    let routes: Vec<String> = sim.requests().iter().map(|r| r.route.clone()).collect();
    assert_eq!(
        routes
            .iter()
            .filter(|r| *r == "GET /api/v1/customers")
            .count(),
        2,
        "two pages of 100: {routes:?}"
    );
    assert!(
        !routes.contains(&"GET /api/v1/customers/{external_customer_id}".to_string()),
        "{routes:?}"
    );
    sim.shutdown().await;
}

/// The lateness `mappings check --remote` compares with Lago's grace period covers the
/// look-back: Jelastic reads a DAY bucket again for `look_back_buckets` more buckets, and a
/// charge the platform added late to a month's last day is sent that much later.
#[tokio::test]
async fn jelastic_lateness_covers_the_buckets_its_look_back_reads_again() {
    use billsync::config::{ProviderSettings, Settings};
    use billsync::providers::jelastic::JelasticProvider;
    use billsync::providers::{Cursors, Provider};
    use chrono::{DateTime, Duration};
    let t = |text: &str| -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "k").unwrap();
    let yaml = format!(
        "ledger: {{ path: {d}/ledger.db }}\nmappings: [{m}]\nproviders:\n  jel:\n    kind: jelastic\n    hoster_url: http://127.0.0.1:9\n    session: file:{k}\n    period: DAY\n    settle_delay: 1h\n    start: 2026-10-01T00:00:00Z\n    time_offset: \"+00:00\"\n    currency: EUR\nsinks:\n  lago:\n    kind: lago\n    api_url: http://127.0.0.1:9\n    api_key: file:{k}\n",
        d = dir.path().display(),
        m = concat!(env!("CARGO_MANIFEST_DIR"), "/mappings"),
        k = key.display(),
    );
    let path = dir.path().join("billsync.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut settings = Settings::load(&path).unwrap();
    let (sources, _) = settings.lateness(Duration::hours(1));
    let lateness = sources[0].after_end;
    let Some(ProviderSettings::Jelastic(cfg)) = settings.providers.remove("jel") else {
        panic!()
    };
    assert_eq!(cfg.look_back_buckets, 2, "the default look-back");
    let p = JelasticProvider::new("jel".into(), cfg).unwrap();

    // October ends at E. Hourly runs at :30. The run at `prev` stored its watermark (its upper).
    let end = t("2026-11-01T00:00:00Z");
    let prev = end + Duration::days(2) + Duration::minutes(30);
    let mut cursors = Cursors::new();
    let first = p.plan(&cursors, prev).await.unwrap();
    let upper = first.iter().map(|c| c.window_end).max().unwrap();
    cursors.insert(first[0].stream.clone(), upper.to_rfc3339());
    // The next run, one hour later: it still asks again for October's last day bucket, so a
    // late charge the platform added to it is pulled and sent now...
    let now = prev + Duration::hours(1);
    let chunks = p.plan(&cursors, now).await.unwrap();
    let rereads_oct_31 = chunks.iter().any(|c| {
        c.window_start <= end - Duration::days(1) && c.window_end > end - Duration::days(1)
    });
    assert!(
        rereads_oct_31,
        "the look-back re-reads 31 October: {chunks:?}"
    );
    // ...which is this long after the period's end, more than the lateness that
    // `mappings check --remote` compares the grace period with.
    let arrives = now - end;
    assert!(
        lateness >= arrives,
        "lateness {}h ({}) but a record of 31 October found by the look-back reaches Lago {}h after the period's end",
        lateness.num_hours(),
        sources[0].why,
        arrives.num_hours()
    );
}

// --- remote check: aggregations and sinks -----------------------------------------------------

/// A cost rule sends one amount per record (a window, a bill line), and the month's charge is
/// their sum: only a `sum_agg` metric adds them up. Into a `max_agg` metric Lago bills the
/// largest window of the month, into `latest_agg` the last one, into `weighted_sum_agg` a
/// time-weighted sum, into `count_agg` the number of events: most of the revenue is lost while
/// every event is stored (so `reconcile` agrees). Each is an error (exit 2), even with the
/// right `field_name`. A quantity rule into `max_agg`/`latest_agg`/`weighted_sum_agg` may be
/// meant (peak or last storage GB): a warning.
#[test]
fn a_cost_rule_into_a_metric_that_does_not_sum_is_an_error() {
    let text = "version: 1
customers:
  - match: { provider: metalsoft, sub_account_id: \"1\" }
    external_subscription_id: sub_a
rules:
  - name: drive
    match: { resource_type: drive }
    metric: storage_cost
    value: { cost: {} }
  - name: subnet
    match: { resource_type: subnet }
    metric: network_cost
    value: { cost: {} }
  - name: gpu
    match: { resource_type: gpu }
    metric: gpu_cost
    value: { cost: {} }
  - name: ip
    match: { resource_type: ip }
    metric: ip_cost
    value: { cost: {} }
  - name: server
    match: { resource_type: server }
    metric: server_cost
    value: { cost: {} }
  - name: peak
    match: { resource_type: bucket }
    metric: bucket_gb
    value: { quantity: {} }
";
    let set = load(&[("q.yaml", text)]);
    let metric = |code: &str, agg: &str, field: Option<&str>| RemoteMetric {
        code: code.into(),
        aggregation_type: agg.into(),
        field_name: field.map(str::to_string),
    };
    let metrics = vec![
        metric("storage_cost", "max_agg", Some("value")),
        metric("network_cost", "latest_agg", Some("value")),
        metric("gpu_cost", "weighted_sum_agg", Some("value")),
        metric("ip_cost", "count_agg", None),
        metric("server_cost", "sum_agg", Some("value")),
        metric("bucket_gb", "max_agg", Some("value")),
    ];
    let subs = [RemoteSubscription::active("sub_a")];
    let findings = set.check_remote("lago", "lago", &metrics, &subs, &BTreeMap::new());
    let shown: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
    let about = |rule: &str| -> Vec<&billsync::mapping::remote::RemoteFinding> {
        findings
            .iter()
            .filter(|f| f.message.contains(&format!("rule q.yaml#{rule} ")))
            .collect()
    };
    for (rule, code, agg, bills) in [
        ("drive", "storage_cost", "max_agg", "the largest value"),
        ("subnet", "network_cost", "latest_agg", "the last value"),
        ("gpu", "gpu_cost", "weighted_sum_agg", "a time-weighted sum"),
        ("ip", "ip_cost", "count_agg", "the number of events"),
    ] {
        let f = about(rule);
        assert!(
            f.iter().any(|f| f.error
                && f.message
                    .starts_with(&format!("metric `{code}` ({agg}) bills {bills}"))
                && f.message.contains("sends costs")),
            "{rule}: {shown:#?}"
        );
    }
    assert!(about("server").is_empty(), "{shown:#?}");
    let peak = about("peak");
    assert_eq!(peak.len(), 1, "{shown:#?}");
    assert!(!peak[0].error, "{shown:#?}");
    assert!(
        peak[0]
            .message
            .contains("right for a level (e.g. the peak or last storage GB)"),
        "{shown:#?}"
    );
    assert_eq!(findings.iter().filter(|f| f.error).count(), 4, "{shown:#?}");
}

/// Each rule's events go to the sink it names, else to `default_sink`; `mappings check
/// --remote` compares each Lago sink with the rules sending to it only. Beside a Stripe sink
/// (whose rules name meters' `event_name`s and `cus_…` customer ids) and a second Lago
/// organisation, checking every rule against every Lago called each Stripe meter a missing
/// billable metric and each `cus_…` a missing subscription, and the other organisation's
/// codes missing too: exit 2 on a correct setup, so the check is ignored, or a metric is
/// "fixed" away from the one that bills. Customer entries name no sink: their subscriptions
/// belong to the sinks of the rules that can meet them.
#[tokio::test(flavor = "multi_thread")]
async fn each_lago_sink_is_checked_against_the_rules_sending_to_it() {
    use billsync::simulators::lago::{LagoSim, LagoSimConfig};
    let lago_a = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    let lago_b = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    lago_a.register_metric("compute_cost", "sum_agg", Some("value"));
    lago_a.register_subscription("sub_ms", "acme");
    lago_b.register_metric("partner_cost", "sum_agg", Some("value"));
    lago_b.register_subscription("sub_partner", "partner");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("lago.key"), "lago-sim-key").unwrap();
    std::fs::write(d.join("stripe.key"), "sk_test_123").unwrap();
    let maps = d.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    std::fs::write(
        maps.join("m.yaml"),
        "version: 1
customers:
  - match: { provider: metalsoft }
    external_subscription_id: sub_ms
  - match: { provider: sakura }
    external_subscription_id: cus_Sakura123
rules:
  - name: compute
    match: { provider: metalsoft }
    metric: compute_cost
    value: { cost: {} }
  - name: partner
    match: { provider: softlayer }
    sink: lago_b
    metric: partner_cost
    target: { external_subscription_id: sub_partner }
    value: { cost: {} }
  - name: meter
    match: { provider: jelastic }
    sink: stripe
    metric: cloud_usage
    target: { external_subscription_id: cus_Jelastic456 }
    value: { quantity: {} }
  - name: sakura-meter
    match: { provider: sakura }
    sink: stripe
    metric: sakura_usage
    value: { quantity: {} }
",
    )
    .unwrap();
    let cfg = d.join("billsync.yaml");
    std::fs::write(
        &cfg,
        format!(
            "ledger:\n  path: {ledger}\nmappings: [{maps}]\nsinks:\n  lago_a:\n    kind: lago\n    api_url: {a}\n    api_key: file:{key}\n    retry: {{ max_retries: 0 }}\n  lago_b:\n    kind: lago\n    api_url: {b}\n    api_key: file:{key}\n    retry: {{ max_retries: 0 }}\n  stripe:\n    kind: stripe\n    api_key: file:{stripe}\ndefault_sink: lago_a\n",
            ledger = d.join("ledger.db").display(),
            maps = maps.display(),
            a = lago_a.url,
            b = lago_b.url,
            key = d.join("lago.key").display(),
            stripe = d.join("stripe.key").display(),
        ),
    )
    .unwrap();
    let check = |cfg: PathBuf| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_billsync"))
                .args(["--config"])
                .arg(cfg)
                .args(["mappings", "check", "--remote"])
                .output()
                .unwrap()
        })
    };
    let out = check(cfg.clone()).await.unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("sink lago_a: 1 metric(s), 1 subscription(s) in Lago; 0 finding(s)"),
        "{text}"
    );
    assert!(
        text.contains("sink lago_b: 1 metric(s), 1 subscription(s) in Lago; 0 finding(s)"),
        "{text}"
    );
    // What is missing from the sink a rule sends to is still an error.
    std::fs::write(
        maps.join("n.yaml"),
        "version: 1\nrules:\n  - name: partner-gpu\n    match: { provider: vps }\n    sink: lago_b\n    metric: partner_gpu\n    target: { external_subscription_id: sub_partner_gpu }\n    value: { cost: {} }\n",
    )
    .unwrap();
    let out = check(cfg).await.unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{text}");
    let b = text.split("sink lago_b:").nth(1).expect("lago_b checked");
    assert!(b.contains("billable metric `partner_gpu`"), "{text}");
    assert!(b.contains("subscription `sub_partner_gpu`"), "{text}");
    assert!(
        text.contains("sink lago_a: 1 metric(s), 1 subscription(s) in Lago; 0 finding(s)"),
        "{text}"
    );
    lago_a.shutdown().await;
    lago_b.shutdown().await;
}

/// Lago stores an event for any subscription and bills it through a charge of the
/// subscription's plan for the event's metric: a plan without that charge bills nothing for
/// it, and a terminated subscription bills no event dated after its termination, while
/// `reconcile` finds every event stored. `mappings check --remote` reads the plans of the
/// subscriptions the rules bill (`GET /api/v1/plans/{code}`) and warns about both (exit 0: a
/// plan may leave a metric out on purpose, a subscription may be ending). A subscription listed
/// terminated on its old plan and active on its new one (a plan change) is not terminated.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_without_the_metrics_charge_and_a_terminated_subscription_are_warnings() {
    use billsync::simulators::lago::{LagoSim, LagoSimConfig, SIM_TERMINATED_AT};
    let lago = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    lago.register_metric("compute_cost", "sum_agg", Some("value"));
    lago.register_metric("storage_cost", "sum_agg", Some("value"));
    lago.register_plan("standard", &["compute_cost", "storage_cost"]);
    lago.register_plan("legacy", &["compute_cost"]);
    lago.register_subscription_on_plan("sub_new", "acme", "active", "standard");
    lago.register_subscription_on_plan("sub_moved", "globex", "terminated", "legacy");
    lago.register_subscription_on_plan("sub_moved", "globex", "active", "standard");
    lago.register_subscription_on_plan("sub_legacy", "initech", "active", "legacy");
    lago.register_subscription_on_plan("sub_gone", "hooli", "terminated", "standard");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("lago.key"), "lago-sim-key").unwrap();
    let maps = d.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let mut text = "version: 1\ncustomers:\n".to_string();
    for (n, sub) in ["sub_new", "sub_moved", "sub_legacy", "sub_gone"]
        .iter()
        .enumerate()
    {
        text.push_str(&format!(
            "  - match: {{ provider: metalsoft, sub_account_id: \"{n}\" }}\n    external_subscription_id: {sub}\n"
        ));
    }
    text.push_str("rules:\n  - name: compute\n    match: { resource_type: server }\n    metric: compute_cost\n    value: { cost: {} }\n  - name: storage\n    match: { resource_type: drive }\n    metric: storage_cost\n    value: { cost: {} }\n");
    std::fs::write(maps.join("m.yaml"), text).unwrap();
    let cfg = d.join("billsync.yaml");
    std::fs::write(
        &cfg,
        format!(
            "ledger:\n  path: {}\nmappings: [{}]\nsinks:\n  lago:\n    kind: lago\n    api_url: {}\n    api_key: file:{}\n    retry: {{ max_retries: 0 }}\n",
            d.join("ledger.db").display(),
            maps.display(),
            lago.url,
            d.join("lago.key").display(),
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_billsync"))
            .arg("--config")
            .arg(cfg)
            .args(["mappings", "check", "--remote"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("2 finding(s)"), "{text}");
    assert!(
        text.contains(
            "warning: plan `legacy` has no charge for billable metric `storage_cost`, which the \
             rules send to its subscription(s) `sub_legacy`: Lago stores those events and bills \
             nothing for them"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "warning: subscription `sub_gone` (named at {}:9 (customer entry)) is terminated in \
             Lago since {SIM_TERMINATED_AT}: Lago bills no event dated after its termination",
            maps.join("m.yaml").display()
        )),
        "{text}"
    );
    assert!(!text.contains("sub_moved"), "{text}");
    // The plans are read one by one, as the spec's `GET /api/v1/plans/{code}`.
    let routes: Vec<String> = lago.requests().iter().map(|r| r.route.clone()).collect();
    assert_eq!(
        routes
            .iter()
            .filter(|r| r.as_str() == "GET /api/v1/plans/{code}")
            .count(),
        2,
        "{routes:?}"
    );
    lago.shutdown().await;
}

/// More plans than are read one by one (100) are read from the `GET /api/v1/plans` listing,
/// 100 a page, every page; plans Lago does not have are left out (not judged).
#[tokio::test]
async fn many_plans_are_read_from_the_listing() {
    use billsync::simulators::lago::{LagoSim, LagoSimConfig};
    let lago = LagoSim::start(LagoSimConfig::default()).await.unwrap();
    let mut codes = BTreeSet::new();
    for i in 0..150 {
        lago.register_plan(&format!("plan_{i:03}"), &["compute_cost"]);
        codes.insert(format!("plan_{i:03}"));
    }
    lago.register_plan("plan_other", &["storage_cost"]);
    codes.insert("plan_missing".to_string());
    let plans = quick_admin(&lago.url).plans(&codes).await.unwrap();
    assert_eq!(plans.len(), 150);
    assert_eq!(
        plans["plan_149"],
        BTreeSet::from(["compute_cost".to_string()])
    );
    let routes: Vec<String> = lago.requests().iter().map(|r| r.route.clone()).collect();
    assert_eq!(routes, vec!["GET /api/v1/plans"; 2], "{routes:?}");
    // A few are read one by one; one Lago does not find is left out.
    let few = BTreeSet::from(["plan_007".to_string(), "plan_missing".to_string()]);
    let plans = quick_admin(&lago.url).plans(&few).await.unwrap();
    assert_eq!(plans.keys().collect::<Vec<_>>(), vec!["plan_007"]);
    lago.shutdown().await;
}

/// A case of several records (a month of one subscription's metric) compares their values'
/// sum with `value`; values adding up beyond a decimal's range fail the case with the reason,
/// never a panic of `billsync mappings test` (`Decimal`'s `sum` panics on overflow).
#[test]
fn a_case_whose_values_add_up_beyond_a_decimal_fails_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        "version: 1
rules:
  - name: cost
    match: { provider: metalsoft }
    target: { external_subscription_id: sub_big }
    metric: cost
    value: { cost: {} }
",
    )
    .unwrap();
    let set = MappingSet::load(&[dir.path().to_path_buf()]).unwrap();
    let case = "defaults: { provider: metalsoft, sub_account_id: \"1\", billing_currency: JPY }
cases:
  - name: two huge lines
    records:
      - { billed_cost: \"79228162514264337593543950335\" }
      - { billed_cost: \"1\" }
    expect:
      value: \"79228162514264337593543950336\"
";
    let report = run_cases(&set, &[("huge.yaml".into(), case.into())]);
    let text = report.to_string();
    assert!(!report.passed(), "{text}");
    assert!(text.contains("✗ value"), "{text}");
    assert!(text.contains("beyond the range of a decimal"), "{text}");
}
