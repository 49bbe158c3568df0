//! Applying a [`MappingSet`] to one record.
//!
//! Never panics and never drops: every record ends as `Mapped`, `Ignored` or `Unmapped` with a
//! reason a billing engineer can act on (which fields the record had, which rule matched).

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::period::{month_of, tiered_markup, PeriodShare, PeriodSpec, TierSpec};
use super::schema::{Conversion, Pricing, Rule, TemplatePart, ValueSpec};
use super::units::Unit;
use super::{effective_round, LoadedRule, MapOutcome, MappedEvent, MappingSet};
use crate::record::{Text, UsageRecord, MATCHABLE_FIELDS};

/// Fields always named in an "unmapped" reason, besides those the rules refer to.
const KEY_FIELDS: &[&str] = &[
    "provider",
    "sub_account_id",
    "resource_type",
    "charge_description",
    "consumed_unit",
];

/// The first condition of a `match` that did not hold for a record.
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionFailure {
    /// The field (`resource_type`, `attributes.x`).
    pub field: String,
    /// The condition, as written (`instance`, `one of [a, b]`, `glob x*`).
    pub expected: String,
    /// The record's value; `None` when the field is absent.
    pub actual: Option<String>,
}

/// How one rule fared against a record.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleCheck {
    /// `file#name`.
    pub rule: String,
    /// `None`: the rule matched; otherwise its first failing condition.
    pub failed: Option<ConditionFailure>,
}

/// How one customer entry or directory lookup fared against a record.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerCheck {
    /// `file:line (bills sub, priority p)`.
    pub entry: String,
    /// `None`: the entry matched.
    pub failed: Option<ConditionFailure>,
}

/// One step of computing the value, with the value after it.
#[derive(Debug, Clone, PartialEq)]
pub struct PricingStep {
    /// `base`, `conversion`, `currency`, `markup`, `tiers`, `commission`, `fixed`, `minimum`,
    /// `rounding`.
    pub step: &'static str,
    /// What the step did, for a person.
    pub detail: String,
    /// The value after the step.
    pub value: Decimal,
}

/// Why a record maps the way it does (`billsync mappings explain`).
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// Every rule tried, in order, up to and including the one that matched.
    pub rules: Vec<RuleCheck>,
    /// Customer entries tried (empty when the rule has a `target` or is `ignore`).
    pub customers: Vec<CustomerCheck>,
    /// A note on how the customer was chosen (target, priority, directory).
    pub customer_note: Option<String>,
    /// The steps computing the value.
    pub steps: Vec<PricingStep>,
    /// With `period: month` pricing: the record's share of its month (the month's `minimum`
    /// and `tiers` are settled by one adjustment per subscription, metric and month).
    pub period: Option<PeriodShare>,
    /// The result, identical to [`MappingSet::apply`].
    pub outcome: MapOutcome,
}

/// The chosen customer: subscription, customer id, pricing, how it was chosen.
struct Chosen<'a> {
    subscription: Text,
    customer: Option<Text>,
    pricing: Option<&'a super::schema::Pricing>,
}

impl MappingSet {
    /// Maps one record: the first rule whose conditions all hold decides; the customer comes
    /// from the rule's `target` or else the matching customer entry or directory row with the
    /// highest priority (ties: file order, inline entries before directory rows).
    pub fn apply(&self, record: &UsageRecord) -> MapOutcome {
        self.evaluate(record, false).outcome
    }

    /// [`apply`](MappingSet::apply), with the reasons: every rule tried, the customer lookup
    /// and each pricing step. Same code path as `apply`, which only skips writing the reasons.
    pub fn explain(&self, record: &UsageRecord) -> Explanation {
        self.evaluate(record, true)
    }

    /// [`apply`](MappingSet::apply) plus the record's share of its month when the value has
    /// `period: month` pricing (what the sync keeps to settle the month).
    pub fn apply_with_period(&self, record: &UsageRecord) -> (MapOutcome, Option<PeriodShare>) {
        let ex = self.evaluate(record, false);
        (ex.outcome, ex.period)
    }

    /// The currency of the value `record` maps to: the invoice currency of a `cost` value (the
    /// rule's `currency`, else the record's own), `None` for a quantity or when no rule
    /// matches. Corrections compare it: a difference is only meaningful in one currency.
    pub fn value_currency(&self, record: &UsageRecord) -> Option<String> {
        let rule = self
            .rules
            .iter()
            .find(|r| all_hold(&r.rule.conditions.0, record))?;
        match &rule.rule.value {
            Some(ValueSpec::Cost(c)) => Some(
                c.currency
                    .as_ref()
                    .map_or_else(|| record.billing_currency.to_string(), |to| to.0.clone()),
            ),
            _ => None,
        }
    }

    /// Whether any rule or customer entry prices per month (the sync then keeps shares).
    pub fn has_period_pricing(&self) -> bool {
        self.rules.iter().any(|r| match &r.rule.value {
            Some(ValueSpec::Cost(c)) => c.pricing().is_monthly(),
            _ => false,
        }) || self
            .customers
            .iter()
            .any(|c| c.entry.pricing.as_ref().is_some_and(Pricing::is_monthly))
    }

    fn evaluate(&self, record: &UsageRecord, trace: bool) -> Explanation {
        let mut ex = Explanation {
            rules: Vec::new(),
            customers: Vec::new(),
            customer_note: None,
            steps: Vec::new(),
            period: None,
            outcome: MapOutcome::Unmapped {
                reason: String::new(),
            },
        };
        let mut found = None;
        for r in &self.rules {
            let matched = if trace {
                let failed = first_failure(&r.rule.conditions.0, record);
                let matched = failed.is_none();
                ex.rules.push(RuleCheck {
                    rule: r.id.clone(),
                    failed,
                });
                matched
            } else {
                all_hold(&r.rule.conditions.0, record)
            };
            if matched {
                found = Some(r);
                break;
            }
        }
        let Some(rule) = found else {
            let fields =
                self.referenced_fields(KEY_FIELDS, self.rules.iter().map(|r| &r.rule.conditions.0));
            ex.outcome = MapOutcome::Unmapped {
                reason: format!("no rule matches {}", describe_record(record, &fields)),
            };
            return ex;
        };
        ex.outcome = match self.map_with(rule, record, trace, &mut ex) {
            Ok(outcome) => outcome,
            Err(reason) => MapOutcome::Unmapped {
                reason: format!("rule {} matched, but {reason}", rule.id),
            },
        };
        ex
    }

    /// The customer for a record: highest priority among matching inline entries and the
    /// directory row; ties go to the earlier (inline before directory).
    fn choose_customer(
        &self,
        record: &UsageRecord,
        trace: bool,
        ex: &mut Explanation,
    ) -> Option<Chosen<'_>> {
        // Labels are only written when tracing (`explain`): the sync maps every record here.
        let mut best: Option<(i64, Chosen<'_>, String)> = None;
        for c in &self.customers {
            let (matched, failed) = if trace {
                let failed = first_failure(&c.entry.conditions.0, record);
                (failed.is_none(), failed)
            } else {
                (all_hold(&c.entry.conditions.0, record), None)
            };
            let label = if trace {
                format!(
                    "{}:{} (bills {}, priority {})",
                    c.file,
                    c.line,
                    c.entry.external_subscription_id.0,
                    c.priority()
                )
            } else {
                String::new()
            };
            if matched && best.as_ref().is_none_or(|(p, _, _)| c.priority() > *p) {
                best = Some((
                    c.priority(),
                    Chosen {
                        subscription: c.entry.external_subscription_id.0.as_str().into(),
                        customer: c
                            .entry
                            .external_customer_id
                            .as_ref()
                            .map(|x| x.0.as_str().into()),
                        pricing: c.entry.pricing.as_ref(),
                    },
                    label.clone(),
                ));
            }
            if trace {
                ex.customers.push(CustomerCheck {
                    entry: label,
                    failed,
                });
            }
        }
        if !self.directory.is_empty() {
            match self.directory.get(&record.provider, &record.sub_account_id) {
                Some(row) => {
                    let label = if trace {
                        format!(
                            "{}:{} (directory: provider={} sub_account_id={}, bills {}, priority {})",
                            row.file,
                            row.line,
                            row.provider,
                            row.sub_account_id,
                            row.subscription,
                            row.priority
                        )
                    } else {
                        String::new()
                    };
                    if best.as_ref().is_none_or(|(p, _, _)| row.priority > *p) {
                        best = Some((
                            row.priority,
                            Chosen {
                                subscription: row.subscription.into(),
                                customer: row.customer.map(Text::from),
                                pricing: None,
                            },
                            label.clone(),
                        ));
                    }
                    if trace {
                        ex.customers.push(CustomerCheck {
                            entry: label,
                            failed: None,
                        });
                    }
                }
                None if trace => ex.customers.push(CustomerCheck {
                    entry: format!("account directory ({} rows)", self.directory.len()),
                    failed: Some(ConditionFailure {
                        field: "provider, sub_account_id".into(),
                        expected: "a row of the directory".into(),
                        actual: Some(format!("{}, {}", record.provider, record.sub_account_id)),
                    }),
                }),
                None => {}
            }
        }
        let (_, chosen, label) = best?;
        if trace {
            ex.customer_note = Some(format!(
                "chosen: {label} (highest priority; ties go to the first)"
            ));
        }
        Some(chosen)
    }

    fn map_with(
        &self,
        loaded: &LoadedRule,
        record: &UsageRecord,
        trace: bool,
        ex: &mut Explanation,
    ) -> Result<MapOutcome, String> {
        let rule = &loaded.rule;
        if rule.ignore {
            return Ok(MapOutcome::Ignored {
                rule: loaded.id.clone(),
            });
        }
        let chosen = match &rule.target {
            Some(t) => {
                if trace {
                    ex.customer_note = Some(format!(
                        "the rule's `target` bills {} (the customer table is not consulted)",
                        t.external_subscription_id.0
                    ));
                }
                Chosen {
                    subscription: t.external_subscription_id.0.as_str().into(),
                    customer: t.external_customer_id.as_ref().map(|c| c.0.as_str().into()),
                    pricing: None,
                }
            }
            None => self.choose_customer(record, trace, ex).ok_or_else(|| {
                let mut fields = self
                    .referenced_fields(&[], self.customers.iter().map(|c| &c.entry.conditions.0));
                if !self.directory.is_empty() {
                    for f in ["provider", "sub_account_id"] {
                        if !fields.iter().any(|x| x == f) {
                            fields.insert(0, f.to_string());
                        }
                    }
                }
                let fields = if fields.is_empty() {
                    vec!["sub_account_id".to_string()]
                } else {
                    fields
                };
                format!("no customer matches {}", describe_record(record, &fields))
            })?,
        };
        let metric = rule
            .metric
            .as_ref()
            .map(|m| Text::from(m.0.as_str()))
            .ok_or_else(|| "the rule has no metric".to_string())?;
        let mut steps = Steps(trace.then_some(&mut ex.steps));
        let (value, period) = self.compute_value(rule, record, chosen.pricing, &mut steps)?;
        ex.period = period;
        let properties = render_properties(rule, record)?;
        Ok(MapOutcome::Mapped(MappedEvent {
            rule: loaded.id.as_str().into(),
            sink: rule.sink.as_ref().map(|s| s.0.as_str().into()),
            external_subscription_id: chosen.subscription,
            external_customer_id: chosen.customer,
            metric_code: metric,
            value_property: rule
                .property
                .as_ref()
                .map_or(Text::const_new("value"), |p| p.0.as_str().into()),
            value,
            properties,
            timestamp: record.charge_period_start,
        }))
    }

    /// The value: conversion or currency and pricing, then rounding once, recording each step.
    fn compute_value(
        &self,
        rule: &Rule,
        record: &UsageRecord,
        customer_pricing: Option<&Pricing>,
        steps: &mut Steps<'_>,
    ) -> Result<(Decimal, Option<PeriodShare>), String> {
        let mut period = PeriodCtx::new();
        let (raw, currency) = match &rule.value {
            Some(ValueSpec::Quantity(q)) => {
                let v = record.consumed_quantity;
                steps.push(
                    "base",
                    || format!("consumed_quantity {v} {}", record.consumed_unit),
                    v,
                );
                let v = match &q.conversion {
                    Conversion::AsReported => v,
                    Conversion::Factor(f) => {
                        let out = v
                            .checked_mul(*f)
                            .ok_or_else(|| format!("{v} × {f} overflows"))?;
                        steps.push("conversion", || format!("× factor {f}"), out);
                        out
                    }
                    Conversion::Unit(to) => {
                        let from = Unit::parse(&record.consumed_unit).ok_or_else(|| {
                            format!(
                                "consumed_unit `{}` is not a known unit, so it cannot be converted to `{to}`",
                                record.consumed_unit
                            )
                        })?;
                        let out = from.convert(v, *to)?;
                        steps.push(
                            "conversion",
                            || format!("{} → {to}", record.consumed_unit),
                            out,
                        );
                        out
                    }
                };
                if let Some(p) = customer_pricing.filter(|p| !p.is_empty()) {
                    steps.push(
                        "customer pricing",
                        || {
                            format!(
                                "not applied: the value is a quantity, not money ({})",
                                super::load::describe_pricing(p).trim_start_matches([' ', '+'])
                            )
                        },
                        v,
                    );
                }
                (v, None)
            }
            Some(ValueSpec::Cost(c)) => {
                let mut v = record.billed_cost;
                let mut currency = record.billing_currency.to_string();
                steps.push("base", || format!("billed_cost {v} {currency}"), v);
                if let Some(to) = c.currency.as_ref().filter(|to| to.0 != currency) {
                    let (since, rate) = self
                        .rates
                        .lookup(&currency, &to.0, record.charge_period_start)
                        .ok_or_else(|| {
                            format!(
                                "no exchange rate {currency}→{} in effect at {} (rates_csv)",
                                to.0, record.charge_period_start
                            )
                        })?;
                    v = v.checked_mul(rate).ok_or("currency conversion overflows")?;
                    steps.push(
                        "currency",
                        || {
                            format!(
                                "{currency} → {} at rate {rate} (effective {})",
                                to.0,
                                since.date_naive()
                            )
                        },
                        v,
                    );
                    currency = to.0.clone();
                }
                let own = c.pricing();
                v = price(v, &own, "rule", steps, &mut period)?;
                if let Some(p) = customer_pricing {
                    v = price(v, p, "customer", steps, &mut period)?;
                }
                let blocks = [Some(&own), customer_pricing];
                let minimum = |monthly: bool| minimum_of(&blocks, monthly);
                if let Some(min) = minimum(false) {
                    if period.tiers.is_some() {
                        return Err(format!(
                            "a per-record `minimum` ({min}) cannot follow monthly `tiers`: the \
                             month's tiers would be settled on values the minimum changed"
                        ));
                    }
                    // A credit stays a credit's price even when a fixed markup took it above
                    // zero: raised to the minimum, a refund line would bill the customer.
                    if record.billed_cost < Decimal::ZERO {
                        steps.push(
                            "minimum",
                            || format!("{min} {currency} per record: not applied to a credit"),
                            v,
                        );
                    } else if v >= Decimal::ZERO && v < min {
                        steps.push(
                            "minimum",
                            || format!("raised to the minimum charge {min} {currency} per record"),
                            min,
                        );
                        v = min;
                    } else {
                        steps.push(
                            "minimum",
                            || format!("{min} {currency} per record: no effect"),
                            v,
                        );
                    }
                }
                if let Some(min) = minimum(true) {
                    steps.push(
                        "minimum",
                        || {
                            format!(
                                "{min} {currency} per month: applies to the month's total, \
                                 settled by one adjustment when the month closes (not to this \
                                 record)"
                            )
                        },
                        v,
                    );
                    period.minimum = Some(min);
                }
                (v, Some(currency))
            }
            None => return Err("the rule has no value".into()),
        };
        let (scale, mode) = effective_round(rule, currency.as_deref());
        let out = raw.round_dp_with_strategy(scale, mode.strategy());
        steps.push(
            "rounding",
            || format!("{} to {scale} places", mode.name()),
            out,
        );
        let share = period.share(record, currency.as_deref().unwrap_or(""), scale, mode);
        Ok((out, share))
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

/// Whether every condition holds: [`first_failure`] is `None`, without describing a failure.
fn all_hold(
    conditions: &[(super::schema::FieldName, super::schema::Condition)],
    record: &UsageRecord,
) -> bool {
    conditions
        .iter()
        .all(|(f, c)| c.matches(record.field(f.as_str())))
}

/// The first condition that does not hold (`None`: all hold).
fn first_failure(
    conditions: &[(super::schema::FieldName, super::schema::Condition)],
    record: &UsageRecord,
) -> Option<ConditionFailure> {
    conditions.iter().find_map(|(f, c)| {
        let actual = record.field(f.as_str());
        (!c.matches(actual)).then(|| ConditionFailure {
            field: f.as_str().to_string(),
            expected: c.to_string(),
            actual: actual.map(str::to_string),
        })
    })
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

/// Where the steps computing a value are written: an explanation keeps them; a sync, which
/// maps millions of records and never shows them, does not write them (each step was a
/// `format!`: some six allocations per record).
struct Steps<'a>(Option<&'a mut Vec<PricingStep>>);

impl Steps<'_> {
    fn push(&mut self, step: &'static str, detail: impl FnOnce() -> String, value: Decimal) {
        if let Some(steps) = self.0.as_deref_mut() {
            steps.push(PricingStep {
                step,
                detail: detail(),
                value,
            });
        }
    }
}

/// What the monthly parts of a record's pricing need: the month's offset, the monthly tiers
/// with the value at their input, the percentage steps after them, the monthly minimum.
struct PeriodCtx {
    /// The offset of the month boundaries, once a block prices per month.
    offset: Option<chrono::FixedOffset>,
    /// Monthly tiers and the value at their input.
    tiers: Option<(Vec<TierSpec>, Decimal)>,
    /// The product of the percentage steps after the monthly tiers.
    factor: Decimal,
    /// The monthly minimum.
    minimum: Option<Decimal>,
}

impl PeriodCtx {
    fn new() -> Self {
        PeriodCtx {
            offset: None,
            tiers: None,
            factor: Decimal::ONE,
            minimum: None,
        }
    }

    /// Notes a block that prices per month; two blocks must agree on the month.
    fn monthly(&mut self, p: &Pricing) -> Result<(), String> {
        let o = p.month_offset();
        match self.offset {
            Some(prev) if prev != o => Err(format!(
                "the rule's and the customer's `period: month` pricing use different month \
                 boundaries (UTC offsets {prev} and {o}); one month needs one definition"
            )),
            _ => {
                self.offset = Some(o);
                Ok(())
            }
        }
    }

    /// A multiplicative step after the monthly tiers scales what they add.
    fn scale(&mut self, by: Decimal) -> Result<(), String> {
        if self.tiers.is_some() {
            self.factor = self
                .factor
                .checked_mul(by)
                .ok_or("period pricing overflows")?;
        }
        Ok(())
    }

    fn share(
        self,
        record: &UsageRecord,
        currency: &str,
        scale: u32,
        mode: super::schema::RoundMode,
    ) -> Option<PeriodShare> {
        let offset = self.offset?;
        let (start, end, label) = month_of(record.charge_period_start, offset);
        let base = self.tiers.as_ref().map_or(Decimal::ZERO, |(_, b)| *b);
        Some(PeriodShare {
            start,
            end,
            label,
            base,
            spec: self.spec(currency, scale, mode)?,
        })
    }

    /// The period rule of the records priced so (`None`: no monthly pricing).
    fn spec(
        self,
        currency: &str,
        scale: u32,
        mode: super::schema::RoundMode,
    ) -> Option<PeriodSpec> {
        let offset = self.offset?;
        let (tiers, _) = self.tiers.unwrap_or_default();
        let lowest = tiers
            .iter()
            .map(|t| t.markup_percent)
            .min()
            .unwrap_or_default();
        Some(PeriodSpec {
            period: "month".into(),
            utc_offset: offset.to_string(),
            currency: currency.to_string(),
            tiers,
            lowest_percent: lowest,
            factor: self.factor.normalize(),
            minimum: self.minimum.map(|m| m.normalize()),
            scale,
            mode,
        })
    }
}

/// The highest `minimum` of the blocks that apply per month (`monthly`) or per record.
fn minimum_of(blocks: &[Option<&Pricing>], monthly: bool) -> Option<Decimal> {
    blocks
        .iter()
        .flatten()
        .filter(|p| p.is_monthly() == monthly)
        .filter_map(|p| p.minimum)
        .map(|a| a.0)
        .max()
}

/// The period rule that records priced by `rule` and then by `customer` pricing carry in their
/// shares, as [`MappingSet::compute_value`] builds it, with the given rounding and an empty
/// currency (both depend on the record). `None`: such records have no monthly share (no
/// monthly pricing, a quantity, or pricing that fails for every record). For the load checks:
/// records of one month must share one rule, or the month's price depends on its latest record.
pub(super) fn period_spec(
    rule: &Rule,
    customer: Option<&Pricing>,
    scale: u32,
    mode: super::schema::RoundMode,
) -> Option<PeriodSpec> {
    let Some(ValueSpec::Cost(c)) = &rule.value else {
        return None;
    };
    blocks_period_spec(&[Some(&c.pricing()), customer], scale, mode)
}

/// The period rule of pricing `blocks` applied in turn (see [`period_spec`]).
pub(super) fn blocks_period_spec(
    blocks: &[Option<&Pricing>],
    scale: u32,
    mode: super::schema::RoundMode,
) -> Option<PeriodSpec> {
    let mut period = PeriodCtx::new();
    let mut steps = Steps(None);
    for p in blocks.iter().flatten() {
        price(Decimal::ONE, p, "", &mut steps, &mut period).ok()?;
    }
    period.minimum = minimum_of(blocks, true);
    period.spec("", scale, mode)
}

/// Applies one pricing block (tiers or markup, commission, fixed); `minimum` is applied by the
/// caller after all blocks. Monthly tiers price the record at their lowest rate and leave the
/// rest to the month's settlement (see `period.rs`).
fn price(
    mut v: Decimal,
    p: &Pricing,
    whose: &str,
    steps: &mut Steps<'_>,
    period: &mut PeriodCtx,
) -> Result<Decimal, String> {
    let overflow = || format!("{whose} pricing overflows");
    if p.is_monthly() {
        period.monthly(p)?;
    }
    if let Some(tiers) = &p.tiers {
        let spec: Vec<TierSpec> = tiers
            .0
            .iter()
            .map(|t| TierSpec {
                up_to: t.up_to.map(|a| a.0.normalize()),
                markup_percent: t.markup_percent.0.normalize(),
            })
            .collect();
        if period.tiers.is_some() {
            return Err(format!(
                "{whose} `tiers` follow monthly `tiers`; only one tiered markup can apply to a \
                 month's total"
            ));
        }
        if p.is_monthly() {
            let lowest = spec
                .iter()
                .map(|t| t.markup_percent)
                .min()
                .unwrap_or_default();
            let base = v;
            v = v
                .checked_mul(Decimal::ONE + lowest / Decimal::ONE_HUNDRED)
                .ok_or_else(overflow)?;
            steps.push(
                "tiers",
                || {
                    format!(
                        "{whose} tiered markup per month ({}): this record at the lowest \
                         rate {lowest}%; the month's total is tiered by one adjustment when it \
                         closes",
                        spec.iter()
                            .map(|t| match t.up_to {
                                Some(u) => format!("{}% up to {u}", t.markup_percent),
                                None => format!("{}% above", t.markup_percent),
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                v,
            );
            period.tiers = Some((spec, base));
        } else {
            // Per record: each tier's percentage applies to the part of |v| inside it; a credit
            // (negative cost) gets the same markup as the equal charge, with its sign.
            let (added, parts) = tiered_markup(v.abs(), &spec).map_err(|_| overflow())?;
            let signed = if v.is_sign_negative() { -added } else { added };
            v = v.checked_add(signed).ok_or_else(overflow)?;
            steps.push(
                "tiers",
                || format!("{whose} tiered markup per record: {}", parts.join(", ")),
                v,
            );
        }
    }
    if let Some(m) = p.markup_percent {
        let by = Decimal::ONE + m.0 / Decimal::ONE_HUNDRED;
        v = v.checked_mul(by).ok_or_else(overflow)?;
        period.scale(by)?;
        steps.push("markup", || format!("{whose} markup +{}%", m.0), v);
    }
    if let Some(c) = p.commission_percent {
        let keep = Decimal::ONE - c.0 / Decimal::ONE_HUNDRED;
        v = v.checked_div(keep).ok_or_else(overflow)?;
        period.scale(Decimal::ONE.checked_div(keep).ok_or_else(overflow)?)?;
        steps.push(
            "commission",
            || format!("{whose} commission {}% of the price: ÷ {keep}", c.0),
            v,
        );
    }
    if let Some(f) = p.markup_fixed {
        v = v.checked_add(f.0).ok_or_else(overflow)?;
        steps.push("fixed", || format!("{whose} fixed markup +{}", f.0), v);
    }
    Ok(v)
}

/// Fills `{field}` placeholders. A placeholder whose field is absent on the record makes the
/// record unmapped rather than sending an empty property (Lago may group or filter on it).
fn render_properties(rule: &Rule, record: &UsageRecord) -> Result<BTreeMap<Text, Text>, String> {
    let mut out = BTreeMap::new();
    for (key, template) in &rule.properties {
        let mut s = Text::default();
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
        out.insert(key.as_str().into(), s);
    }
    Ok(out)
}

impl std::fmt::Display for ConditionFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: expected {}, actual {}",
            self.field,
            self.expected,
            self.actual.as_deref().unwrap_or("<absent>")
        )
    }
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "rules (first match wins):")?;
        if self.rules.is_empty() {
            writeln!(f, "  (no rules)")?;
        }
        for r in &self.rules {
            match &r.failed {
                None => writeln!(f, "  MATCH    {}", r.rule)?,
                Some(c) => writeln!(f, "  no       {}  ({c})", r.rule)?,
            }
        }
        if !self.customers.is_empty() || self.customer_note.is_some() {
            writeln!(f, "customer (highest priority wins, ties in file order):")?;
            for c in &self.customers {
                match &c.failed {
                    None => writeln!(f, "  match    {}", c.entry)?,
                    Some(x) => writeln!(f, "  no       {}  ({x})", c.entry)?,
                }
            }
            if let Some(n) = &self.customer_note {
                writeln!(f, "  {n}")?;
            }
        }
        if !self.steps.is_empty() {
            writeln!(f, "value:")?;
            let w = self.steps.iter().map(|s| s.step.len()).max().unwrap_or(0);
            for s in &self.steps {
                writeln!(f, "  {:<w$}  {:<60}  = {}", s.step, s.detail, s.value)?;
            }
        }
        if let Some(p) = &self.period {
            let spec = &p.spec;
            let mut parts = Vec::new();
            if !spec.tiers.is_empty() {
                parts.push(format!(
                    "tiers on the month's base (this record adds {} {})",
                    p.base, spec.currency
                ));
            }
            if let Some(m) = spec.minimum {
                parts.push(format!("minimum {m} {}", spec.currency));
            }
            writeln!(
                f,
                "period: month {} [{} .. {}): {} apply to the month's total of this \
                 subscription's metric; when the month closes billsync sends one adjustment \
                 event for the difference (the value below is this record's part only)",
                p.label,
                p.start.to_rfc3339(),
                p.end.to_rfc3339(),
                parts.join(" and ")
            )?;
        }
        match &self.outcome {
            MapOutcome::Mapped(ev) => {
                writeln!(
                    f,
                    "outcome: mapped by {} → subscription {}{}, metric {}, {} = {}",
                    ev.rule,
                    ev.external_subscription_id,
                    ev.external_customer_id
                        .as_deref()
                        .map(|c| format!(" (customer {c})"))
                        .unwrap_or_default(),
                    ev.metric_code,
                    ev.value_property,
                    ev.value
                )?;
                for (k, v) in &ev.properties {
                    writeln!(f, "  property {k} = {v}")?;
                }
                Ok(())
            }
            MapOutcome::Ignored { rule } => writeln!(f, "outcome: ignored by {rule}"),
            MapOutcome::Unmapped { reason } => writeln!(f, "outcome: held (unmapped): {reason}"),
        }
    }
}
