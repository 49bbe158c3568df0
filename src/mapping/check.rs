//! Checks across entries: ambiguous customers, overlapping rules, pricing combinations.
//!
//! Why errors vs warnings (a wrong rule is a wrong invoice, but a validator that cries wolf
//! gets ignored):
//!
//! - **Error** (period pricing, see `period.rs`): pricing that makes one month's total
//!   ambiguous — monthly `tiers` followed by other `tiers` or by a per-record `minimum` for the
//!   same records; rule and customer months that start at different offsets; rules feeding one
//!   metric, or customer entries billing one subscription, that disagree on their monthly
//!   pricing (a month's records would be priced by two rules at once), and any two ways to one
//!   subscription's metric (a `target`, a customer entry, a directory row) that give its records
//!   different period rules (`check_months`). A month is settled under the period rule of its
//!   latest record, so everything of that rule `period::settle` uses counts: tiers, the steps
//!   after them, minimum, offset and the rule's rounding.
//! - **Error**: a rule no record can reach (an earlier rule matches all it does); two customer
//!   entries (or an entry and a directory row) that can match the same record, bill differently
//!   (another subscription, customer id or pricing) and have the same priority: who pays and
//!   how much would depend on file order, an accident nobody reviews; pricing that cannot be computed (`markup_percent` with
//!   `tiers`; a currency conversion without a rates table).
//! - **Warning**: two billing rules (not `ignore`) that overlap partly (neither contains the
//!   other) with different metrics or targets. First-match-wins makes them deterministic and such layering is common
//!   (traffic before storage), but the reader should see which one wins. A narrow rule above a
//!   broad one (an exception) is the intended pattern and is not reported.
//!
//! Overlap is decided per field: two condition lists can match the same record unless some
//! field both constrain has no common value. Globs are compared by their literal prefix, so
//! the check never claims an overlap that is impossible for certain and may miss none that is.

use std::collections::{HashMap, HashSet};

use rust_decimal::Decimal;

use super::period::PeriodSpec;
use super::schema::{Condition, FieldName, Pricing, RoundMode, Rule, ValueSpec};
use super::{LoadedCustomer, LoadedRule, MappingError, MappingSet};

type Conds = [(FieldName, Condition)];

/// Runs every cross-entry check, adding errors and the set's warnings.
pub(super) fn check_set(set: &mut MappingSet, errors: &mut Vec<MappingError>) {
    check_pricing(set, errors);
    check_periods(set, errors);
    check_months(set, errors);
    check_customers(set, errors);
    set.warnings = rule_overlaps(set);
    set.warnings.extend(pricing_on_quantities(set));
}

/// A customer entry's `pricing` applies to money only: records of a rule whose value is a
/// quantity are billed without it. Said at load, or a minimum a customer agreed to is never
/// charged and nothing shows it but `explain`.
fn pricing_on_quantities(set: &MappingSet) -> Vec<MappingError> {
    let mut out = Vec::new();
    for c in &set.customers {
        if c.entry.pricing.as_ref().is_none_or(|p| p.is_empty()) {
            continue;
        }
        for r in &set.rules {
            if r.rule.ignore
                || r.rule.target.is_some()
                || !matches!(r.rule.value, Some(ValueSpec::Quantity(_)))
                || !may_overlap(&r.rule.conditions.0, &c.entry.conditions.0)
            {
                continue;
            }
            out.push(at(
                &c.file,
                c.line,
                c.column,
                format!(
                    "warning: this customer entry's `pricing` does not apply to the records of \
                     rule `{}` ({}:{}), whose value is a quantity, not money: they are billed \
                     without it (price them with a `cost` rule, or in the invoicing system)",
                    r.rule.name.0, r.file, r.line
                ),
            ));
        }
    }
    out
}

fn at(file: &str, line: usize, column: usize, message: String) -> MappingError {
    MappingError {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

/// Whether two condition lists can both hold for one record.
pub(crate) fn may_overlap(a: &Conds, b: &Conds) -> bool {
    a.iter().all(|(f, ca)| {
        b.iter()
            .filter(|(g, _)| g == f)
            .all(|(_, cb)| intersects(ca, cb))
    })
}

/// Whether some value satisfies both conditions (globs: by literal prefix, erring towards yes).
fn intersects(x: &Condition, y: &Condition) -> bool {
    match (x, y) {
        (Condition::Exact(v), c) | (c, Condition::Exact(v)) => c.matches(Some(v)),
        (Condition::OneOf(vs), c) | (c, Condition::OneOf(vs)) => {
            vs.iter().any(|v| c.matches(Some(v)))
        }
        (Condition::Glob(p), Condition::Glob(q)) => {
            let (a, b) = (literal_prefix(p.as_str()), literal_prefix(q.as_str()));
            a.starts_with(b) || b.starts_with(a)
        }
    }
}

/// The text of a glob before its first wildcard.
pub(crate) fn literal_prefix(glob: &str) -> &str {
    let end = glob.find(['*', '?', '[']).unwrap_or(glob.len());
    &glob[..end]
}

/// Whether `wider` matches every record `narrow` matches. `{glob: "*"}` on a field every
/// record has matches every record, as no condition does (an `ignore` rule written so would
/// otherwise hide the rules after it without a word: lost revenue).
pub(crate) fn shadows(wider: &Conds, narrow: &Conds) -> bool {
    wider.iter().all(|(f, cw)| {
        narrow.iter().any(|(g, cn)| f == g && cn.is_within(cw))
            || (crate::record::REQUIRED_TEXT_FIELDS.contains(&f.0.as_str())
                && matches!(cw, Condition::Glob(p) if p.as_str() == "*"))
    })
}

fn pricing_problems(p: &Pricing) -> Vec<String> {
    let mut out = Vec::new();
    if p.tiers.is_some() && p.markup_percent.is_some() {
        out.push(
            "`markup_percent` and `tiers` both set a percentage markup; keep one \
             (a single-tier `tiers` list is a flat markup)"
                .to_string(),
        );
    }
    out
}

fn check_pricing(set: &MappingSet, errors: &mut Vec<MappingError>) {
    for r in &set.rules {
        let Some(ValueSpec::Cost(c)) = &r.rule.value else {
            continue;
        };
        for msg in pricing_problems(&c.pricing()) {
            errors.push(at(
                &r.file,
                r.line,
                r.column,
                format!("rule `{}`: {msg}", r.rule.name.0),
            ));
        }
        if let Some(cur) = &c.currency {
            let pinned_same = pinned(&r.rule, "billing_currency")
                .is_some_and(|vs| vs.iter().all(|v| **v == cur.0));
            let has_rates = set.rates.by_pair.keys().any(|(_, to)| *to == cur.0);
            if !pinned_same && !has_rates {
                errors.push(at(
                    &r.file,
                    r.line,
                    r.column,
                    format!(
                        "rule `{}` converts cost to {} but no `rates_csv` has rates to {}; \
                         add a rates table (from,to,rate,effective_from) or pin \
                         `billing_currency: {}` in `match`",
                        r.rule.name.0, cur.0, cur.0, cur.0
                    ),
                ));
            }
        }
    }
    for c in &set.customers {
        if let Some(p) = &c.entry.pricing {
            for msg in pricing_problems(p) {
                errors.push(at(
                    &c.file,
                    c.line,
                    c.column,
                    format!("customer entry: {msg}"),
                ));
            }
        }
    }
}

/// The exact values a rule's match pins for `field` (`None`: not pinned exactly).
fn pinned<'a>(rule: &'a Rule, field: &str) -> Option<Vec<&'a String>> {
    rule.conditions
        .0
        .iter()
        .find(|(f, _)| f.as_str() == field)
        .and_then(|(_, c)| match c {
            Condition::Exact(x) => Some(vec![x]),
            Condition::OneOf(xs) => Some(xs.iter().collect()),
            Condition::Glob(_) => None,
        })
}

fn describe_customer(c: &LoadedCustomer) -> String {
    format!(
        "{}:{}:{} (bills {}, priority {})",
        c.file,
        c.line,
        c.column,
        c.entry.external_subscription_id.0,
        c.priority()
    )
}

/// What a customer entry decides for a record: subscription, customer id and pricing (its
/// amounts normalized, so `10` and `10.0` are the same pricing). Entries that tie must agree
/// on all of it, or file order would decide the invoice.
fn bills(c: &LoadedCustomer) -> (String, Option<String>, String) {
    let pricing = c
        .entry
        .pricing
        .as_ref()
        .filter(|p| !p.is_empty())
        .map(|p| {
            let n = |d: rust_decimal::Decimal| d.normalize().to_string();
            format!(
                "{:?} {:?} {:?} {:?} {:?} {}",
                p.markup_percent.map(|m| n(m.0)),
                p.commission_percent.map(|c| n(c.0)),
                p.markup_fixed.map(|f| n(f.0)),
                p.tiers.as_ref().map(|t| t
                    .0
                    .iter()
                    .map(|t| (t.up_to.map(|u| n(u.0)), n(t.markup_percent.0)))
                    .collect::<Vec<_>>()),
                p.minimum.map(|m| n(m.0)),
                monthly_signature(p).unwrap_or_else(|| format!("{:?}", p.period)),
            )
        })
        .unwrap_or_default();
    (
        c.entry.external_subscription_id.0.clone(),
        c.entry.external_customer_id.as_ref().map(|x| x.0.clone()),
        pricing,
    )
}

fn check_customers(set: &MappingSet, errors: &mut Vec<MappingError>) {
    let hint = "which subscription pays, as which customer and at which price, would depend \
                on file order; give the entry that must win a higher `priority:`, or make the \
                matches disjoint";
    // Computed once per entry: the directory below may have tens of thousands of rows.
    let billing: Vec<_> = set.customers.iter().map(bills).collect();
    for (j, b) in set.customers.iter().enumerate() {
        for (i, a) in set.customers[..j].iter().enumerate() {
            if a.priority() == b.priority()
                && billing[i] != billing[j]
                && may_overlap(&a.entry.conditions.0, &b.entry.conditions.0)
            {
                errors.push(at(
                    &b.file,
                    b.line,
                    b.column,
                    format!(
                        "customer entry (bills {}, priority {}) can match the same records as \
                         the entry at {}; {hint}",
                        b.entry.external_subscription_id.0,
                        b.priority(),
                        describe_customer(a)
                    ),
                ));
                break;
            }
        }
        // Against the account directory: one error per entry, naming the first row.
        // A directory row bills its subscription and customer id, without pricing of its own.
        let (subscription, customer, pricing) = &billing[j];
        let mut clashes = set.directory.iter().filter(|row| {
            row.priority == b.priority()
                && (row.subscription != subscription.as_str()
                    || row.customer != customer.as_deref()
                    || !pricing.is_empty())
                && may_overlap(
                    &b.entry.conditions.0,
                    &[
                        (
                            FieldName("provider".into()),
                            Condition::Exact(row.provider.to_string()),
                        ),
                        (
                            FieldName("sub_account_id".into()),
                            Condition::Exact(row.sub_account_id.to_string()),
                        ),
                    ],
                )
        });
        if let Some(first) = clashes.next() {
            let more = clashes.count();
            errors.push(at(
                &b.file,
                b.line,
                b.column,
                format!(
                    "customer entry (bills {}, priority {}) can match the same records as the \
                     directory row {}:{} (provider={} sub_account_id={}, bills {}){}; {hint}",
                    b.entry.external_subscription_id.0,
                    b.priority(),
                    first.file,
                    first.line,
                    first.provider,
                    first.sub_account_id,
                    first.subscription,
                    if more > 0 {
                        format!(" and {more} more rows")
                    } else {
                        String::new()
                    }
                ),
            ));
        }
    }
}

/// What a rule does, for "same outcome?" comparisons.
fn outcome_key(rule: &Rule) -> (bool, Option<&str>, Option<&str>, Option<&str>) {
    (
        rule.ignore,
        rule.metric.as_ref().map(|m| m.0.as_str()),
        rule.property.as_ref().map(|p| p.0.as_str()),
        rule.target
            .as_ref()
            .map(|t| t.external_subscription_id.0.as_str()),
    )
}

fn rule_overlaps(set: &MappingSet) -> Vec<MappingError> {
    let mut out = Vec::new();
    for (j, b) in set.rules.iter().enumerate() {
        for a in &set.rules[..j] {
            let (ca, cb) = (&a.rule.conditions.0, &b.rule.conditions.0);
            if !a.rule.ignore
                && !b.rule.ignore
                && outcome_key(&a.rule) != outcome_key(&b.rule)
                && may_overlap(ca, cb)
                && !shadows(cb, ca)
                && !shadows(ca, cb)
            {
                out.push(at(
                    &b.file,
                    b.line,
                    b.column,
                    format!(
                        "warning: rule `{}` overlaps rule `{}` ({}:{}) without either containing \
                         the other; records matching both go to `{}` (first match wins). If that \
                         is intended, add a `mappings/tests` case for such a record",
                        b.rule.name.0, a.rule.name.0, a.file, a.line, a.rule.name.0
                    ),
                ));
            }
        }
    }
    out
}

/// A period rule as text, to compare and to show: everything of it [`super::period::settle`]
/// uses but the currency (the record's; records in two currencies are refused when the month
/// is settled) and the rounding (see [`PathSig`]).
fn describe_spec(spec: &PeriodSpec) -> String {
    let tiers = if spec.tiers.is_empty() {
        String::new()
    } else {
        let tiers: Vec<String> = spec
            .tiers
            .iter()
            .map(|t| {
                format!(
                    "{}%{}",
                    t.markup_percent.normalize(),
                    t.up_to
                        .map(|u| format!(" up to {}", u.normalize()))
                        .unwrap_or_default()
                )
            })
            .collect();
        format!(" tiers [{}]", tiers.join(", "))
    };
    // The steps after the tiers scale only what the tiers add (`PeriodCtx::scale`).
    let factor = if spec.tiers.is_empty() || spec.factor == Decimal::ONE {
        String::new()
    } else {
        format!(" × {} after the tiers", spec.factor.normalize())
    };
    format!(
        "month at {} with{tiers}{factor}{}",
        spec.utc_offset,
        spec.minimum
            .map(|m| format!(" minimum {}", m.normalize()))
            .unwrap_or_default()
    )
}

/// The monthly part of a customer entry's pricing on its own, comparable: `None` when it has
/// none. The rounding is the rule's, so not part of it.
fn monthly_signature(p: &Pricing) -> Option<String> {
    if !p.is_monthly() {
        return None;
    }
    let spec = super::apply::blocks_period_spec(&[Some(p)], 0, RoundMode::default())?;
    Some(describe_spec(&spec))
}

/// How a rule rounds, which is also how a month it prices is rounded: the scale is `None` when
/// it is the minor unit of a currency not known before the record (no `round.scale`, no
/// conversion to one currency, no single `billing_currency` in `match`).
fn rounding(rule: &Rule) -> (Option<u32>, RoundMode, bool) {
    let currency = match &rule.value {
        Some(ValueSpec::Cost(c)) => c.currency.as_ref().map(|c| c.0.as_str()).or_else(|| {
            pinned(rule, "billing_currency")
                .filter(|vs| vs.len() == 1)
                .map(|vs| vs[0].as_str())
        }),
        _ => None,
    };
    let explicit = rule.round.and_then(|r| r.scale).is_some();
    let (scale, mode) = super::effective_round(rule, currency);
    (
        (explicit || currency.is_some()).then_some(scale),
        mode,
        explicit,
    )
}

/// The period rule of the records of one way into a month, comparable with [`PathSig::same`].
#[derive(Debug, Clone, PartialEq)]
struct PathSig {
    /// The period rule but its rounding (see [`describe_spec`]).
    spec: String,
    /// `None`: the minor unit of a currency not known before the record.
    scale: Option<u32>,
    /// The scale is the rule's `round.scale`, not its currency's minor unit.
    explicit: bool,
    mode: RoundMode,
}

impl PathSig {
    /// Whether two ways give their records one period rule. The records of one month share
    /// one currency (the settlement refuses two), so a scale left to the minor unit of a
    /// currency not known at load meets one that is a known currency's minor unit (a rule
    /// converting to USD beside one taking the record's currency: both round to cents in a USD
    /// month); beside an explicit `round.scale` it may differ, and is refused.
    fn same(a: &Option<PathSig>, b: &Option<PathSig>) -> bool {
        let scales_meet = |x: &PathSig, y: &PathSig| match (x.scale, y.scale) {
            (Some(p), Some(q)) => p == q,
            (None, None) => true,
            (None, Some(_)) => !y.explicit,
            (Some(_), None) => !x.explicit,
        };
        match (a, b) {
            (None, None) => true,
            (Some(x), Some(y)) => x.spec == y.spec && x.mode == y.mode && scales_meet(x, y),
            _ => false,
        }
    }
}

impl std::fmt::Display for PathSig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.scale {
            Some(s) => write!(
                f,
                "{}, rounded {} to {s} places",
                self.spec,
                self.mode.name()
            ),
            None => write!(
                f,
                "{}, rounded {} to the currency's minor unit",
                self.spec,
                self.mode.name()
            ),
        }
    }
}

/// The period rule of the records `rule` prices, followed by a customer entry's `customer`
/// pricing, comparable: `None` when they get no monthly share.
fn path_signature(rule: &Rule, customer: Option<&Pricing>) -> Option<PathSig> {
    let (scale, mode, explicit) = rounding(rule);
    let spec = super::apply::period_spec(rule, customer, scale.unwrap_or(0), mode)?;
    Some(PathSig {
        spec: describe_spec(&spec),
        scale,
        explicit,
        mode,
    })
}

/// A rule's own monthly pricing as rules feeding one metric must share it whatever
/// subscription they bill: its month, tiers and minimum. (What else shapes a month, the steps
/// after the tiers and the rounding, matters only where two ways meet one subscription:
/// `check_months`.)
fn own_monthly(rule: &Rule) -> Option<String> {
    let mut spec = super::apply::period_spec(rule, None, 0, RoundMode::default())?;
    spec.factor = Decimal::ONE;
    Some(describe_spec(&spec))
}

/// Whether the events of two rules can go to one sink: a rule without `sink:` goes to the
/// default sink, which is not known when the mapping loads, so it may meet any.
fn sinks_may_meet(a: &Rule, b: &Rule) -> bool {
    match (&a.sink, &b.sink) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

/// Why a rule's pricing followed by a customer's cannot be settled per month.
fn combination_problem(rule: &Pricing, customer: &Pricing) -> Option<String> {
    let rule_monthly_tiers = rule.is_monthly() && rule.tiers.is_some();
    let customer_monthly_tiers = customer.is_monthly() && customer.tiers.is_some();
    if rule_monthly_tiers && customer.tiers.is_some() {
        return Some(
            "its `tiers` would follow the rule's monthly `tiers`; only one tiered markup can \
             apply to a month's total"
                .into(),
        );
    }
    let per_record_minimum = |p: &Pricing| p.minimum.is_some() && !p.is_monthly();
    if (rule_monthly_tiers && per_record_minimum(customer))
        || (customer_monthly_tiers && per_record_minimum(rule))
    {
        return Some(
            "a per-record `minimum` would apply after monthly `tiers` (the minimum applies last), \
             so the month could not be tiered on what the records carry; make the minimum \
             `period: month` too"
                .into(),
        );
    }
    if rule.is_monthly() && customer.is_monthly() && rule.month_offset() != customer.month_offset()
    {
        return Some(format!(
            "its months start at UTC offset {} but the rule's at {}; one month needs one \
             definition",
            customer.month_offset(),
            rule.month_offset()
        ));
    }
    None
}

fn check_periods(set: &MappingSet, errors: &mut Vec<MappingError>) {
    let say = |s: &Option<String>| {
        s.as_ref().map_or_else(
            || "no monthly pricing".to_string(),
            |s| format!("monthly pricing ({s})"),
        )
    };
    let cost = |r: &super::LoadedRule| match &r.rule.value {
        Some(ValueSpec::Cost(c)) => Some(c.pricing()),
        _ => None,
    };
    // A rule's pricing followed by a customer entry's, for records both can match.
    for c in &set.customers {
        let Some(cp) = &c.entry.pricing else { continue };
        for r in set.rules.iter().filter(|r| r.rule.target.is_none()) {
            let Some(rp) = cost(r) else { continue };
            if !may_overlap(&r.rule.conditions.0, &c.entry.conditions.0) {
                continue;
            }
            if let Some(problem) = combination_problem(&rp, cp) {
                errors.push(at(
                    &c.file,
                    c.line,
                    c.column,
                    format!(
                        "customer entry (bills {}): {problem} (for records of rule `{}` at {}:{})",
                        c.entry.external_subscription_id.0, r.rule.name.0, r.file, r.line
                    ),
                ));
                break;
            }
        }
    }
    // Rules feeding one metric of one sink price its month the same way (their own monthly
    // pricing, the steps after its tiers and the rounding).
    let rule_sig = |r: &LoadedRule| own_monthly(&r.rule);
    for (j, b) in set.rules.iter().enumerate() {
        if b.rule.ignore {
            continue;
        }
        let sig_b = rule_sig(b);
        let clash = set.rules[..j].iter().find(|a| {
            !a.rule.ignore
                && a.rule.metric == b.rule.metric
                && a.rule.sink == b.rule.sink
                && rule_sig(a) != sig_b
                && match (&a.rule.target, &b.rule.target) {
                    (Some(x), Some(y)) => x.external_subscription_id == y.external_subscription_id,
                    _ => true,
                }
        });
        if let Some(a) = clash {
            let sig_a = rule_sig(a);
            errors.push(at(
                &b.file,
                b.line,
                b.column,
                format!(
                    "rule `{}` feeds metric `{}` with {}, but rule `{}` feeds it with {} ({}:{}); \
                     a subscription's month of one metric is settled once, so give both rules \
                     the same monthly pricing or put it on the customer entry",
                    b.rule.name.0,
                    b.rule.metric.as_ref().map_or("?", |m| m.0.as_str()),
                    say(&sig_b),
                    a.rule.name.0,
                    say(&sig_a),
                    a.file,
                    a.line,
                ),
            ));
        }
    }
    // Customer entries (and directory rows) billing one subscription price its month alike.
    let sig = |c: &LoadedCustomer| c.entry.pricing.as_ref().and_then(monthly_signature);
    for (j, b) in set.customers.iter().enumerate() {
        let sub = &b.entry.external_subscription_id;
        if let Some(a) = set.customers[..j]
            .iter()
            .find(|a| a.entry.external_subscription_id == *sub && sig(a) != sig(b))
        {
            errors.push(at(
                &b.file,
                b.line,
                b.column,
                format!(
                    "customer entry bills {} with {}, but the entry at {} bills it with {}; \
                     the month of a subscription's metric is settled once, so give both \
                     entries the same monthly pricing",
                    sub.0,
                    say(&sig(b)),
                    describe_customer(a),
                    say(&sig(a))
                ),
            ));
            continue;
        }
        if sig(b).is_some() {
            if let Some(row) = set.directory.iter().find(|r| r.subscription == sub.0) {
                errors.push(at(
                    &b.file,
                    b.line,
                    b.column,
                    format!(
                        "customer entry has monthly pricing for {} but the directory row {}:{} \
                         bills the same subscription without it (directory rows carry no \
                         pricing); bill the directory's accounts to another subscription or \
                         move the monthly pricing to the rule",
                        sub.0, row.file, row.line
                    ),
                ));
            }
        }
    }
}

/// How records of a rule reach their subscription.
enum Via<'a> {
    Target,
    Entry(&'a LoadedCustomer),
    Directory { file: &'a str, line: usize },
}

/// One way records reach a month: a rule and what chooses the subscription, with the period
/// rule they carry.
struct Path<'a> {
    rule: &'a LoadedRule,
    via: Via<'a>,
    sig: Option<PathSig>,
}

impl Path<'_> {
    fn describe(&self) -> String {
        let via = match &self.via {
            Via::Target => "billed by its `target`".to_string(),
            Via::Entry(c) => format!(
                "through the customer entry at {}:{}:{}",
                c.file, c.line, c.column
            ),
            Via::Directory { file, line } => format!("through the directory row {file}:{line}"),
        };
        format!("rule `{}` ({via})", self.rule.rule.name.0)
    }
}

/// The records of one month of a subscription's metric are settled once, under the period
/// rule of the month's latest record; records without a share are not part of it. So every
/// way records reach one (sink, subscription, metric) — a rule with its `target`, or a rule
/// and the customer entry or directory row that can match its records — must give them the
/// same period rule: the rule's and the entry's monthly pricing, the percentage steps after
/// monthly tiers (the entry's markup after the rule's tiers), the rule's rounding. Pairs that
/// `check_periods` already reports (two rules, or two entries, that differ on their own) are
/// not reported again.
fn check_months(set: &MappingSet, errors: &mut Vec<MappingError>) {
    let entry_sig: Vec<Option<String>> = set
        .customers
        .iter()
        .map(|c| c.entry.pricing.as_ref().and_then(monthly_signature))
        .collect();
    let entry_index = |c: &LoadedCustomer| {
        set.customers
            .iter()
            .position(|x| std::ptr::eq(x, c))
            .unwrap_or(usize::MAX)
    };
    // Directory rows carry no pricing; they matter beside an entry billing their subscription.
    let entry_subs: HashSet<&str> = set
        .customers
        .iter()
        .map(|c| c.entry.external_subscription_id.0.as_str())
        .collect();
    let mut paths: Vec<Path> = Vec::new();
    let mut groups: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    let mut order: Vec<(&str, &str)> = Vec::new();
    for r in set.rules.iter().filter(|r| !r.rule.ignore) {
        let Some(metric) = r.rule.metric.as_ref().map(|m| m.0.as_str()) else {
            continue;
        };
        let mut reach: Vec<(&str, Via, Option<PathSig>)> = Vec::new();
        match &r.rule.target {
            Some(t) => reach.push((
                t.external_subscription_id.0.as_str(),
                Via::Target,
                path_signature(&r.rule, None),
            )),
            None => {
                for c in &set.customers {
                    if may_overlap(&r.rule.conditions.0, &c.entry.conditions.0) {
                        reach.push((
                            c.entry.external_subscription_id.0.as_str(),
                            Via::Entry(c),
                            path_signature(&r.rule, c.entry.pricing.as_ref()),
                        ));
                    }
                }
                // Only a rule's own monthly pricing can differ from an entry's path here; a rule
                // without differs from another rule or an entry that `check_periods` reports.
                let own = path_signature(&r.rule, None);
                if own.is_some() {
                    for row in set.directory.iter() {
                        if entry_subs.contains(row.subscription)
                            && may_overlap(
                                &r.rule.conditions.0,
                                &[
                                    (
                                        FieldName("provider".into()),
                                        Condition::Exact(row.provider.to_string()),
                                    ),
                                    (
                                        FieldName("sub_account_id".into()),
                                        Condition::Exact(row.sub_account_id.to_string()),
                                    ),
                                ],
                            )
                        {
                            reach.push((
                                row.subscription,
                                Via::Directory {
                                    file: row.file,
                                    line: row.line,
                                },
                                own.clone(),
                            ));
                        }
                    }
                }
            }
        }
        for (sub, via, sig) in reach {
            let key = (sub, metric);
            let group = groups.entry(key).or_insert_with(|| {
                order.push(key);
                Vec::new()
            });
            group.push(paths.len());
            paths.push(Path { rule: r, via, sig });
        }
    }
    // What `check_periods` reports already.
    let reported = |a: &Path, b: &Path| {
        let rules = !std::ptr::eq(a.rule, b.rule)
            && a.rule.rule.sink == b.rule.rule.sink
            && own_monthly(&a.rule.rule) != own_monthly(&b.rule.rule);
        let entries = match (&a.via, &b.via) {
            (Via::Entry(x), Via::Entry(y)) => {
                entry_sig[entry_index(x)] != entry_sig[entry_index(y)]
            }
            (Via::Entry(x), Via::Directory { .. }) | (Via::Directory { .. }, Via::Entry(x)) => {
                entry_sig[entry_index(x)].is_some()
            }
            _ => false,
        };
        rules || entries
    };
    let say = |s: &Option<PathSig>| {
        s.as_ref().map_or_else(
            || "no monthly pricing".to_string(),
            |s| format!("monthly pricing ({s})"),
        )
    };
    for key in order {
        let group = &groups[&key];
        let clash = group.iter().enumerate().find_map(|(n, &j)| {
            let b = &paths[j];
            group[..n]
                .iter()
                .map(|&i| &paths[i])
                .find(|a| {
                    !PathSig::same(&a.sig, &b.sig)
                        && sinks_may_meet(&a.rule.rule, &b.rule.rule)
                        && !reported(a, b)
                })
                .map(|a| (a, b))
        });
        let Some((a, b)) = clash else { continue };
        let (file, line, column) = match (&b.via, std::ptr::eq(a.rule, b.rule)) {
            (Via::Entry(c), true) => (c.file.as_str(), c.line, c.column),
            _ => (b.rule.file.as_str(), b.rule.line, b.rule.column),
        };
        let unshared = if a.sig.is_none() || b.sig.is_none() {
            " (records without monthly pricing are left out of the month, whose minimum and \
             tiers would be settled on the other records alone)"
        } else {
            ""
        };
        errors.push(at(
            file,
            line,
            column,
            format!(
                "{} feeds metric `{}` of subscription {} with {}, but {} feeds it with {}{unshared}; \
                 a subscription's month of one metric is settled once, under the pricing of its \
                 latest record, so give both the same monthly pricing (and rounding), or bill \
                 them to another subscription or metric",
                b.describe(),
                key.1,
                key.0,
                say(&b.sig),
                a.describe(),
                say(&a.sig),
            ),
        ));
    }
}
