//! Mapping tests that live next to the mappings (`mappings/tests/*.yaml`).
//!
//! Why: a mapping file is code that decides invoices, and the cheapest review of a rule is an
//! example record and the event it must become. `billsync mappings test` runs these cases
//! through [`MappingSet::apply`] (the code path the sync uses) and prints, for a failing case,
//! every expected field next to the actual one.
//!
//! ```yaml
//! defaults:                        # optional: fields every record of this file starts with
//!   provider: metalsoft
//!   sub_account_id: "1"
//! cases:
//!   - name: on-demand instance hours        # unique in the file
//!     record:                               # UsageRecord fields; attributes as a map
//!       resource_type: instance
//!       consumed_quantity: "84301"          # quote decimals to keep every digit
//!       consumed_unit: seconds
//!       attributes: { is_reservation: "0" }
//!     expect:                               # only the fields given are compared
//!       rule: metalsoft.yaml#instance-hours
//!       subscription: sub_acme_main
//!       customer: acme
//!       metric: instance_hours
//!       property: hours
//!       value: "23.416944"                  # compared as a decimal: 23.41 == 23.410
//!       properties: { instance: "2416" }    # compared as a whole map
//!   - name: installments are held
//!     record: { resource_type: reservation_installment }
//!     expect: { held: "no rule matches" }   # `held: true`, or a fragment of the reason
//!   - name: subnets are free
//!     record: { resource_type: subnet }
//!     expect: { ignored: metalsoft.yaml#subnets-free }   # or `ignored: true`
//! ```
//!
//! For `period: month` pricing a case may give `records:` (a month of one subscription's metric,
//! each on top of `record:`) and expect `records_total` (what the records carry), `period_total`
//! (the month's price) and `adjustment` (the event sent when the month closes), settled exactly
//! as the sync settles a month; `value` is then the records' sum.
//!
//! Record defaults for fields a case leaves out: empty text for required text fields,
//! `source` = `provider`, `scope` = `sub_account_id`, quantities and cost 0,
//! `charge_period_start` 2026-01-01T00:00:00Z and `charge_period_end` one hour later.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_yaml_ng::Value;

use super::{MapOutcome, MappingError, MappingSet};
use crate::record::{Text, UsageRecord};

/// One case file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    defaults: BTreeMap<String, Value>,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    record: BTreeMap<String, Value>,
    /// Several records (each on top of `record`): one month of a subscription's metric, for
    /// `period: month` pricing; `value` is then their sum.
    #[serde(default)]
    records: Vec<BTreeMap<String, Value>>,
    expect: Expect,
}

/// What a case expects; only the fields given are compared.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    subscription: Option<String>,
    #[serde(default)]
    customer: Option<String>,
    #[serde(default)]
    metric: Option<String>,
    #[serde(default)]
    property: Option<String>,
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    properties: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    held: Option<Value>,
    #[serde(default)]
    ignored: Option<Value>,
    /// `period: month`: what the records carry in all.
    #[serde(default)]
    records_total: Option<Value>,
    /// `period: month`: the month's total once settled.
    #[serde(default)]
    period_total: Option<Value>,
    /// `period: month`: the adjustment sent when the month closes.
    #[serde(default)]
    adjustment: Option<Value>,
}

/// One compared field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDiff {
    /// `value`, `metric`, `outcome`, …
    pub field: String,
    /// As written in the case.
    pub expected: String,
    /// What the mapping produced.
    pub actual: String,
    /// Whether they agree.
    pub ok: bool,
}

/// The result of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    /// `file:line:column`.
    pub at: String,
    /// The case's name.
    pub name: String,
    /// Every expected field with the actual value.
    pub fields: Vec<FieldDiff>,
    /// A problem with the case itself (bad record field), or `None`.
    pub error: Option<String>,
    /// The outcome in one line (`mapped by …`, `held: …`, `ignored by …`).
    pub outcome: String,
    /// With `period: month` pricing: how the month settles (shown for passing cases too, since
    /// the value of a record is then only its part of the month).
    pub period: Option<String>,
}

impl CaseResult {
    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.fields.iter().all(|f| f.ok)
    }
}

/// The results of all cases, plus problems loading case files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaseReport {
    /// Per case, in file order.
    pub results: Vec<CaseResult>,
    /// Case files that could not be read or parsed.
    pub errors: Vec<MappingError>,
}

impl CaseReport {
    /// True when every case passed and every file loaded (and there was at least one case).
    pub fn passed(&self) -> bool {
        self.errors.is_empty()
            && !self.results.is_empty()
            && self.results.iter().all(|r| r.passed())
    }

    /// Number of failed cases.
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| !r.passed()).count()
    }
}

impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.errors {
            writeln!(f, "ERROR {e}")?;
        }
        for r in &self.results {
            if r.passed() {
                writeln!(f, "ok    {} {}", r.at, r.name)?;
                if let Some(p) = &r.period {
                    writeln!(f, "      {p}")?;
                }
                continue;
            }
            writeln!(f, "FAIL  {} {}", r.at, r.name)?;
            if let Some(e) = &r.error {
                writeln!(f, "      {e}")?;
                continue;
            }
            let w = r
                .fields
                .iter()
                .map(|d| d.field.len())
                .max()
                .unwrap_or(5)
                .max(5);
            let we = r
                .fields
                .iter()
                .map(|d| d.expected.chars().count())
                .max()
                .unwrap_or(8)
                .max(8);
            writeln!(f, "        {:<w$}  {:<we$}  actual", "field", "expected")?;
            for d in &r.fields {
                let mark = if d.ok { ' ' } else { '✗' };
                writeln!(
                    f,
                    "      {mark} {:<w$}  {:<we$}  {}",
                    d.field, d.expected, d.actual
                )?;
            }
            writeln!(f, "      outcome: {}", r.outcome)?;
            if let Some(p) = &r.period {
                writeln!(f, "      {p}")?;
            }
        }
        writeln!(
            f,
            "{} case(s): {} passed, {} failed{}",
            self.results.len(),
            self.results.len() - self.failed(),
            self.failed(),
            if self.errors.is_empty() {
                String::new()
            } else {
                format!(", {} case file(s) with errors", self.errors.len())
            }
        )
    }
}

/// Reads case files; a directory stands for its `*.yaml` / `*.yml` files, sorted.
pub fn read_case_files(paths: &[PathBuf]) -> (Vec<(String, String)>, Vec<MappingError>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let push = |p: &Path, files: &mut Vec<(String, String)>, errors: &mut Vec<MappingError>| {
        match std::fs::read_to_string(p) {
            Ok(t) => files.push((p.display().to_string(), t)),
            Err(e) => errors.push(MappingError {
                file: p.display().to_string(),
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    };
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map(|rd| {
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| {
                            p.is_file()
                                && p.extension()
                                    .and_then(|e| e.to_str())
                                    .is_some_and(|e| e == "yaml" || e == "yml")
                        })
                        .collect()
                })
                .unwrap_or_default();
            found.sort();
            if found.is_empty() {
                errors.push(MappingError {
                    file: path.display().to_string(),
                    line: 0,
                    column: 0,
                    message: "no *.yaml case files here".into(),
                });
            }
            for f in found {
                push(&f, &mut files, &mut errors);
            }
        } else {
            push(path, &mut files, &mut errors);
        }
    }
    (files, errors)
}

/// Runs every case of the given `(name, YAML text)` case files against `set`.
pub fn run_cases(set: &MappingSet, files: &[(String, String)]) -> CaseReport {
    let mut report = CaseReport::default();
    for (name, text) in files {
        let file: CaseFile = match serde_yaml_ng::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
                report.errors.push(MappingError {
                    file: name.clone(),
                    line,
                    column,
                    message: e.to_string(),
                });
                continue;
            }
        };
        let mut seen: Vec<&str> = Vec::new();
        for case in &file.cases {
            let nth = seen.iter().filter(|n| **n == case.name).count();
            seen.push(&case.name);
            let (line, column) = super::load::locate_rule(text, &case.name, nth);
            report.results.push(run_one(
                set,
                &file.defaults,
                case,
                format!("{name}:{line}:{column}"),
            ));
        }
    }
    report
}

fn run_one(
    set: &MappingSet,
    defaults: &BTreeMap<String, Value>,
    case: &Case,
    at: String,
) -> CaseResult {
    let mut result = CaseResult {
        at,
        name: case.name.clone(),
        fields: Vec::new(),
        error: None,
        outcome: String::new(),
        period: None,
    };
    let mut base = defaults.clone();
    base.extend(case.record.iter().map(|(k, v)| (k.clone(), v.clone())));
    let field_sets: Vec<BTreeMap<String, Value>> = if case.records.is_empty() {
        vec![base]
    } else {
        case.records
            .iter()
            .map(|r| {
                let mut f = base.clone();
                f.extend(r.iter().map(|(k, v)| (k.clone(), v.clone())));
                f
            })
            .collect()
    };
    let mut outcomes = Vec::new();
    for (i, fields) in field_sets.iter().enumerate() {
        match build_record(fields) {
            Ok(r) => outcomes.push(set.apply_with_period(&r)),
            Err(e) => {
                result.error = Some(if field_sets.len() > 1 {
                    format!("bad record {}: {e}", i + 1)
                } else {
                    format!("bad record: {e}")
                });
                return result;
            }
        }
    }
    // The first record whose outcome differs in kind from the first one decides the report.
    let kind_of = |o: &MapOutcome| match o {
        MapOutcome::Mapped(_) => "mapped",
        MapOutcome::Ignored { .. } => "ignored",
        MapOutcome::Unmapped { .. } => "held",
    };
    let shown = outcomes
        .iter()
        .position(|(o, _)| kind_of(o) != kind_of(&outcomes[0].0))
        .unwrap_or(0);
    let outcome = &outcomes[shown].0;
    let x = &case.expect;
    let mut cmp = |field: &str, expected: String, actual: String, ok: bool| {
        result.fields.push(FieldDiff {
            field: field.into(),
            expected,
            actual,
            ok,
        })
    };
    let kind = if shown == 0 {
        kind_of(outcome).to_string()
    } else {
        format!("{} (record {})", kind_of(outcome), shown + 1)
    };
    let expected_kind = if x.held.is_some() {
        "held"
    } else if x.ignored.is_some() {
        "ignored"
    } else {
        "mapped"
    };
    cmp(
        "outcome",
        expected_kind.into(),
        kind.clone(),
        expected_kind == kind,
    );
    match outcome {
        MapOutcome::Mapped(ev) => {
            result.outcome = format!("mapped by {}", ev.rule);
            let events: Vec<&super::MappedEvent> = outcomes
                .iter()
                .filter_map(|(o, _)| match o {
                    MapOutcome::Mapped(e) => Some(e),
                    _ => None,
                })
                .collect();
            // A field compares every record's event; the first that differs is shown.
            let mut s = |field: &str,
                         want: &Option<String>,
                         get: &dyn Fn(&super::MappedEvent) -> String| {
                if let Some(w) = want {
                    let got = events
                        .iter()
                        .map(|e| get(e))
                        .find(|g| g != w)
                        .unwrap_or_else(|| w.clone());
                    cmp(field, w.clone(), got.clone(), *w == got);
                }
            };
            s("rule", &x.rule, &|e| e.rule.to_string());
            s("subscription", &x.subscription, &|e| {
                e.external_subscription_id.to_string()
            });
            s("customer", &x.customer, &|e| {
                e.external_customer_id
                    .as_deref()
                    .unwrap_or("<none>")
                    .to_string()
            });
            s("metric", &x.metric, &|e| e.metric_code.to_string());
            s("property", &x.property, &|e| e.value_property.to_string());
            if let Some(v) = &x.value {
                // `sum` would panic beyond a decimal's range: such a case fails, with the reason.
                let value = events
                    .iter()
                    .try_fold(Decimal::ZERO, |sum, e| sum.checked_add(e.value));
                let text = scalar_text(v).unwrap_or_default();
                let ok = value.is_some_and(|value| parse_dec(&text).is_some_and(|d| d == value));
                let got = value.map_or_else(
                    || "the values add up beyond the range of a decimal".to_string(),
                    |value| value.to_string(),
                );
                cmp("value", text, got, ok);
            }
            if let Some(props) = &x.properties {
                let want: BTreeMap<String, String> = props
                    .iter()
                    .map(|(k, v)| (k.clone(), scalar_text(v).unwrap_or_default()))
                    .collect();
                let keys: std::collections::BTreeSet<&str> = want
                    .keys()
                    .map(String::as_str)
                    .chain(ev.properties.keys().map(Text::as_str))
                    .collect();
                for k in keys {
                    let (w, g) = (
                        want.get(k).map(String::as_str),
                        ev.properties.get(k).map(Text::as_str),
                    );
                    cmp(
                        &format!("properties.{k}"),
                        w.unwrap_or("<absent>").to_string(),
                        g.unwrap_or("<absent>").to_string(),
                        w == g,
                    );
                }
            }
            let settled = settle_case(&outcomes);
            if let Ok(Some((label, price))) = &settled {
                result.period = Some(format!(
                    "period {label}: records carry {} + adjustment {} = month total {} (the \
                     adjustment is sent once when the month closes)",
                    price.records_total, price.adjustment, price.total
                ));
            }
            for (field, want, pick) in [
                ("records_total", &x.records_total, 0),
                ("period_total", &x.period_total, 1),
                ("adjustment", &x.adjustment, 2),
            ] {
                let Some(want) = want else { continue };
                let text = scalar_text(want).unwrap_or_default();
                let (actual, ok) = match &settled {
                    Ok(Some((_, p))) => {
                        let got = [p.records_total, p.total, p.adjustment][pick];
                        (got.to_string(), parse_dec(&text) == Some(got))
                    }
                    Ok(None) => ("<no period pricing>".to_string(), false),
                    Err(e) => (e.clone(), false),
                };
                cmp(field, text, actual, ok);
            }
        }
        MapOutcome::Ignored { rule } => {
            result.outcome = format!("ignored by {rule}");
            if let Some(Value::String(want)) = &x.ignored {
                cmp("ignored", want.clone(), rule.clone(), want == rule);
            }
            if let Some(want) = &x.rule {
                cmp("rule", want.clone(), rule.clone(), want == rule);
            }
        }
        MapOutcome::Unmapped { reason } => {
            result.outcome = format!("held: {reason}");
            if let Some(Value::String(want)) = &x.held {
                cmp(
                    "held",
                    format!("…{want}…"),
                    reason.clone(),
                    reason.contains(want.as_str()),
                );
            }
        }
    }
    result
}

/// The month of a case's records, settled as the sync settles it: `None` when the records
/// have no monthly pricing; an error when they are not one month of one subscription's metric.
fn settle_case(
    outcomes: &[(MapOutcome, Option<super::PeriodShare>)],
) -> Result<Option<(String, super::PeriodPrice)>, String> {
    let mut first: Option<(&super::MappedEvent, &super::PeriodShare)> = None;
    let mut members = Vec::new();
    for (i, (o, share)) in outcomes.iter().enumerate() {
        let (MapOutcome::Mapped(ev), Some(share)) = (o, share) else {
            if first.is_some() || share.is_some() {
                return Err(format!("record {} has no monthly pricing", i + 1));
            }
            continue;
        };
        match first {
            None => first = Some((ev, share)),
            Some((e0, s0)) => {
                if (&e0.external_subscription_id, &e0.metric_code, s0.start)
                    != (&ev.external_subscription_id, &ev.metric_code, share.start)
                    || s0.spec != share.spec
                {
                    return Err(format!(
                        "record {} is not in the month, subscription and metric of record 1, \
                         or is priced by another period rule",
                        i + 1
                    ));
                }
            }
        }
        members.push((share.base, ev.value));
    }
    let Some((_, share)) = first else {
        return Ok(None);
    };
    super::period::settle(&share.spec, &members).map(|p| Some((share.label.clone(), p)))
}

fn parse_dec(text: &str) -> Option<Decimal> {
    let t = text.trim();
    // rust_decimal skips `_` between digits (`0_50` would be 50).
    if t.contains('_') {
        return None;
    }
    Decimal::from_str_exact(t)
        .ok()
        .or_else(|| Decimal::from_scientific(t).ok())
}

/// A YAML scalar as text (`007` stays `007` only when quoted).
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

const OPTIONAL_FIELDS: &[&str] = &["resource_name", "sku_id", "charge_description"];

/// Builds a [`UsageRecord`] from case fields, with the documented defaults.
fn build_record(fields: &BTreeMap<String, Value>) -> Result<UsageRecord, String> {
    let text = |name: &str| -> Result<Option<String>, String> {
        match fields.get(name) {
            None => Ok(None),
            Some(v) => scalar_text(v)
                .map(Some)
                .ok_or_else(|| format!("`{name}` must be a single value")),
        }
    };
    for k in fields.keys() {
        let known = crate::record::REQUIRED_TEXT_FIELDS.contains(&k.as_str())
            || k == "scope"
            || OPTIONAL_FIELDS.contains(&k.as_str())
            || matches!(
                k.as_str(),
                "consumed_quantity"
                    | "billed_cost"
                    | "charge_period_start"
                    | "charge_period_end"
                    | "attributes"
                    | "is_final"
            );
        if !known {
            return Err(format!("unknown record field `{k}`"));
        }
    }
    let dec = |name: &str| -> Result<Decimal, String> {
        match text(name)? {
            None => Ok(Decimal::ZERO),
            Some(t) => parse_dec(&t).ok_or_else(|| format!("`{name}` is not a decimal: `{t}`")),
        }
    };
    let time = |name: &str| -> Result<Option<DateTime<Utc>>, String> {
        match text(name)? {
            None => Ok(None),
            Some(t) => DateTime::parse_from_rfc3339(&t)
                .map(|d| Some(d.with_timezone(&Utc)))
                .map_err(|e| format!("`{name}`: {e} (expected e.g. 2026-01-01T00:00:00Z)")),
        }
    };
    let req = |name: &str| -> Result<Text, String> { Ok(text(name)?.unwrap_or_default().into()) };
    let opt_text = |name: &str| -> Result<Option<Text>, String> { Ok(text(name)?.map(Text::from)) };
    let provider = req("provider")?;
    let sub_account_id = req("sub_account_id")?;
    let start = time("charge_period_start")?
        .or_else(|| Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single())
        .ok_or("bad default start")?;
    let end = time("charge_period_end")?.unwrap_or(start + chrono::Duration::hours(1));
    let mut attributes = BTreeMap::new();
    if let Some(a) = fields.get("attributes") {
        let Value::Mapping(m) = a else {
            return Err("`attributes` must be a map of name: value".into());
        };
        for (k, v) in m {
            let (Some(k), Some(v)) = (scalar_text(k), scalar_text(v)) else {
                return Err("`attributes` values must be single values".into());
            };
            attributes.insert(k.into(), v.into());
        }
    }
    Ok(UsageRecord {
        source: opt_text("source")?.unwrap_or_else(|| provider.clone()),
        scope: opt_text("scope")?.unwrap_or_else(|| sub_account_id.clone()),
        provider: provider.to_string().into(),
        billing_account_id: req("billing_account_id")?,
        sub_account_id,
        resource_id: req("resource_id")?,
        resource_name: opt_text("resource_name")?,
        resource_type: req("resource_type")?,
        service_name: req("service_name")?.to_string().into(),
        sku_id: opt_text("sku_id")?,
        charge_description: opt_text("charge_description")?,
        charge_period_start: start,
        charge_period_end: end,
        consumed_quantity: dec("consumed_quantity")?,
        consumed_unit: req("consumed_unit")?,
        billed_cost: dec("billed_cost")?,
        billing_currency: req("billing_currency")?,
        natural_key: Vec::new(),
        is_final: !matches!(fields.get("is_final"), Some(Value::Bool(false))),
        attributes,
        raw: Default::default(),
    })
}
