//! Checks across entries: ambiguous customers, overlapping rules, pricing combinations.
//!
//! Why errors vs warnings (a wrong rule is a wrong invoice, but a validator that cries wolf
//! gets ignored):
//!
//! - **Error**: a rule no record can reach (an earlier rule matches all it does); two customer
//!   entries (or an entry and a directory row) that can match the same record, bill different
//!   subscriptions and have the same priority: which subscription pays would depend on file
//!   order, an accident nobody reviews; pricing that cannot be computed (`markup_percent` with
//!   `tiers`; a currency conversion without a rates table).
//! - **Warning**: two billing rules (not `ignore`) that overlap partly (neither contains the
//!   other) with different metrics or targets. First-match-wins makes them deterministic and such layering is common
//!   (traffic before storage), but the reader should see which one wins. A narrow rule above a
//!   broad one (an exception) is the intended pattern and is not reported.
//!
//! Overlap is decided per field: two condition lists can match the same record unless some
//! field both constrain has no common value. Globs are compared by their literal prefix, so
//! the check never claims an overlap that is impossible for certain and may miss none that is.

use super::schema::{Condition, FieldName, Pricing, Rule, ValueSpec};
use super::{LoadedCustomer, MappingError, MappingSet};

type Conds = [(FieldName, Condition)];

/// Runs every cross-entry check, adding errors and the set's warnings.
pub(super) fn check_set(set: &mut MappingSet, errors: &mut Vec<MappingError>) {
    check_pricing(set, errors);
    check_customers(set, errors);
    set.warnings = rule_overlaps(set);
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

/// Whether `wider` matches every record `narrow` matches.
pub(crate) fn shadows(wider: &Conds, narrow: &Conds) -> bool {
    wider
        .iter()
        .all(|(f, cw)| narrow.iter().any(|(g, cn)| f == g && cn.is_within(cw)))
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

fn check_customers(set: &MappingSet, errors: &mut Vec<MappingError>) {
    let hint = "which subscription pays would depend on file order; give the entry that must \
                win a higher `priority:`, or make the matches disjoint";
    for (j, b) in set.customers.iter().enumerate() {
        for a in &set.customers[..j] {
            if a.entry.external_subscription_id != b.entry.external_subscription_id
                && a.priority() == b.priority()
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
        let mut clashes = set.directory.rows.iter().filter(|row| {
            row.subscription != b.entry.external_subscription_id.0
                && row.priority == b.priority()
                && may_overlap(
                    &b.entry.conditions.0,
                    &[
                        (
                            FieldName("provider".into()),
                            Condition::Exact(row.provider.clone()),
                        ),
                        (
                            FieldName("sub_account_id".into()),
                            Condition::Exact(row.sub_account_id.clone()),
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
