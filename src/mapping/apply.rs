//! Applying a [`MappingSet`] to one record.
//!
//! Never panics and never drops: every record ends as `Mapped`, `Ignored` or `Unmapped` with a
//! reason a billing engineer can act on (which fields the record had, which rule matched).

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::schema::{Conversion, Rule, TemplatePart, ValueSpec};
use super::units::Unit;
use super::{effective_round, LoadedRule, MapOutcome, MappedEvent, MappingSet};
use crate::record::{UsageRecord, MATCHABLE_FIELDS};

/// Fields always named in an "unmapped" reason, besides those the rules refer to.
const KEY_FIELDS: &[&str] = &[
    "provider",
    "sub_account_id",
    "resource_type",
    "charge_description",
    "consumed_unit",
];

impl MappingSet {
    /// Maps one record: the first rule whose conditions all hold decides; the customer comes
    /// from the rule's `target` or else the first matching customer-table entry.
    pub fn apply(&self, record: &UsageRecord) -> MapOutcome {
        let Some(rule) = self
            .rules
            .iter()
            .find(|r| matches(&r.rule.conditions.0, record))
        else {
            let fields =
                self.referenced_fields(KEY_FIELDS, self.rules.iter().map(|r| &r.rule.conditions.0));
            return MapOutcome::Unmapped {
                reason: format!("no rule matches {}", describe_record(record, &fields)),
            };
        };
        match self.map_with(rule, record) {
            Ok(outcome) => outcome,
            Err(reason) => MapOutcome::Unmapped {
                reason: format!("rule {} matched, but {reason}", rule.id),
            },
        }
    }

    fn map_with(&self, loaded: &LoadedRule, record: &UsageRecord) -> Result<MapOutcome, String> {
        let rule = &loaded.rule;
        if rule.ignore {
            return Ok(MapOutcome::Ignored {
                rule: loaded.id.clone(),
            });
        }
        let (subscription, customer) = match &rule.target {
            Some(t) => (
                t.external_subscription_id.0.clone(),
                t.external_customer_id.as_ref().map(|c| c.0.clone()),
            ),
            None => {
                let entry = self
                    .customers
                    .iter()
                    .find(|c| matches(&c.entry.conditions.0, record))
                    .ok_or_else(|| {
                        let fields = self.referenced_fields(
                            &[],
                            self.customers.iter().map(|c| &c.entry.conditions.0),
                        );
                        let fields = if fields.is_empty() {
                            vec!["sub_account_id".to_string()]
                        } else {
                            fields
                        };
                        format!("no customer matches {}", describe_record(record, &fields))
                    })?;
                (
                    entry.entry.external_subscription_id.0.clone(),
                    entry
                        .entry
                        .external_customer_id
                        .as_ref()
                        .map(|c| c.0.clone()),
                )
            }
        };
        let metric = rule
            .metric
            .as_ref()
            .map(|m| m.0.clone())
            .ok_or_else(|| "the rule has no metric".to_string())?;
        let value = compute_value(rule, record)?;
        let properties = render_properties(rule, record)?;
        Ok(MapOutcome::Mapped(MappedEvent {
            rule: loaded.id.clone(),
            sink: rule.sink.as_ref().map(|s| s.0.clone()),
            external_subscription_id: subscription,
            external_customer_id: customer,
            metric_code: metric,
            value_property: rule
                .property
                .as_ref()
                .map_or_else(|| "value".to_string(), |p| p.0.clone()),
            value,
            properties,
            timestamp: record.charge_period_start,
        }))
    }

    /// `always` plus every field the given condition lists refer to, in record order.
    fn referenced_fields<'a>(
        &self,
        always: &[&str],
        lists: impl Iterator<Item = &'a Vec<(super::schema::FieldName, super::schema::Condition)>>,
    ) -> Vec<String> {
        let mut used: Vec<String> = always.iter().map(|s| s.to_string()).collect();
        for list in lists {
            for (f, _) in list {
                if !used.iter().any(|u| u == f.as_str()) {
                    used.push(f.as_str().to_string());
                }
            }
        }
        let order = |f: &String| {
            MATCHABLE_FIELDS
                .iter()
                .position(|m| m == f)
                .unwrap_or(MATCHABLE_FIELDS.len())
        };
        used.sort_by(|a, b| order(a).cmp(&order(b)).then_with(|| a.cmp(b)));
        used
    }
}

fn matches(
    conditions: &[(super::schema::FieldName, super::schema::Condition)],
    record: &UsageRecord,
) -> bool {
    conditions
        .iter()
        .all(|(f, c)| c.matches(record.field(f.as_str())))
}

/// `provider=metalsoft resource_type=gpu sku_id=<absent> …`; values with spaces are quoted.
fn describe_record(record: &UsageRecord, fields: &[String]) -> String {
    fields
        .iter()
        .map(|f| match record.field(f) {
            Some(v) if v.is_empty() || v.contains(char::is_whitespace) => format!("{f}={v:?}"),
            Some(v) => format!("{f}={v}"),
            None => format!("{f}=<absent>"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The value before rounding, then rounded as the rule says.
fn compute_value(rule: &Rule, record: &UsageRecord) -> Result<Decimal, String> {
    let raw = match &rule.value {
        Some(ValueSpec::Quantity(q)) => match &q.conversion {
            Conversion::AsReported => record.consumed_quantity,
            Conversion::Factor(f) => record
                .consumed_quantity
                .checked_mul(*f)
                .ok_or_else(|| format!("{} × {f} overflows", record.consumed_quantity))?,
            Conversion::Unit(to) => {
                let from = Unit::parse(&record.consumed_unit).ok_or_else(|| {
                    format!(
                        "consumed_unit `{}` is not a known unit, so it cannot be converted to `{to}`",
                        record.consumed_unit
                    )
                })?;
                from.convert(record.consumed_quantity, *to)?
            }
        },
        Some(ValueSpec::Cost(c)) => {
            let markup = c.markup_percent.map_or(Decimal::ZERO, |p| p.0);
            let factor = Decimal::ONE + markup / Decimal::ONE_HUNDRED;
            record
                .billed_cost
                .checked_mul(factor)
                .ok_or_else(|| format!("{} × {factor} overflows", record.billed_cost))?
        }
        None => return Err("the rule has no value".into()),
    };
    let round = effective_round(rule);
    Ok(raw.round_dp_with_strategy(round.scale.0, round.mode.strategy()))
}

/// Fills `{field}` placeholders. A placeholder whose field is absent on the record makes the
/// record unmapped rather than sending an empty property (Lago may group or filter on it).
fn render_properties(
    rule: &Rule,
    record: &UsageRecord,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (key, template) in &rule.properties {
        let mut s = String::new();
        for part in &template.0 {
            match part {
                TemplatePart::Literal(l) => s.push_str(l),
                TemplatePart::Field(f) => match record.field(f.as_str()) {
                    Some(v) => s.push_str(v),
                    None => {
                        return Err(format!(
                            "property `{key}` needs `{}`, which this record does not have",
                            f.as_str()
                        ))
                    }
                },
            }
        }
        out.insert(key.clone(), s);
    }
    Ok(out)
}
