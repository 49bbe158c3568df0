//! The mapping-file format as Rust types.
//!
//! Every semantic check that concerns a single value (a field name, a glob, a unit, a percentage,
//! a placeholder) happens inside that value's `Deserialize` impl and fails with
//! [`serde::de::Error::custom`]. That is deliberate: `serde_yaml_ng` attaches the line and column
//! of the value being deserialized to such errors, so a billing engineer gets
//! `file:line:column: problem` for free instead of a bare message. Checks that need several values
//! (a rule with neither `ignore` nor `metric`, duplicate names) live in the loader.
//!
//! All structs reject unknown keys: a typo (`metirc:`) must never turn into a silently
//! ignored setting, since a wrong rule is a wrong invoice.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use std::borrow::Cow;

use rust_decimal::{Decimal, RoundingStrategy};
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::units::Unit;
use crate::record::MATCHABLE_FIELDS;

/// Deserializes a scalar and validates it *inside* the visitor. The error must be raised while
/// `serde_yaml_ng` is still deserializing the scalar: only then does it carry the scalar's own
/// line and column (raised afterwards, it would point at the enclosing map).
fn scalar<'de, D, T>(
    d: D,
    expecting: &'static str,
    check: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<F> {
        expecting: &'static str,
        check: F,
    }
    impl<'de, T, F: FnOnce(&str) -> Result<T, String>> Visitor<'de> for V<F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.check)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(V { expecting, check })
}

/// One mapping file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MappingFile {
    /// Format version; must be `1`.
    pub version: Version,
    /// Account directory: a CSV file (path relative to this file) with the header
    /// `provider,sub_account_id,external_subscription_id,external_customer_id[,priority]`; each
    /// row is a customer entry matching `provider` and `sub_account_id` exactly.
    #[serde(default)]
    pub customers_csv: Option<CsvPath>,
    /// Exchange rates: a CSV file (path relative to this file) with the header
    /// `from,to,rate,effective_from`; used by `cost: { currency: ... }`.
    #[serde(default)]
    pub rates_csv: Option<CsvPath>,
    /// Who pays: the customer table. The matching entry with the highest `priority` wins;
    /// ties go to the first in file order.
    #[serde(default)]
    pub customers: Vec<CustomerEntry>,
    /// What is billed: product rules, first match wins.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// The format version. Only `1` exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version(pub u32);

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "the format version 1", |text| match text.trim() {
            "1" => Ok(Version(1)),
            other => Err(format!(
                "unsupported mapping format version `{other}`, expected 1"
            )),
        })
    }
}

/// An entry of the customer table: records matching `match` belong to this subscription.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerEntry {
    /// Conditions on the record, all of which must hold (`{}` matches every record).
    #[serde(rename = "match")]
    pub conditions: Conditions,
    /// Lago `external_subscription_id` the usage is billed to.
    pub external_subscription_id: NonEmpty,
    /// Lago `external_customer_id`, for reports.
    #[serde(default)]
    pub external_customer_id: Option<NonEmpty>,
    /// Tie-break between overlapping entries: the highest priority wins (default 0). Entries
    /// that can match the same record and bill different subscriptions must differ in priority.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// Customer pricing, applied to `cost` values after the rule's own pricing.
    #[serde(default)]
    pub pricing: Option<Pricing>,
}

/// A product rule: which records it covers and what they become.
///
/// Either `ignore: true` (the record is deliberately not billed) or `metric` + `value`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name across all loaded files (`[A-Za-z0-9_.-]+`); events record it as `file#name`.
    pub name: RuleName,
    /// Conditions on the record, all of which must hold (`{}` matches every record).
    #[serde(rename = "match")]
    pub conditions: Conditions,
    /// `true`: matching records are deliberately not billed (outcome `ignored`).
    #[serde(default)]
    pub ignore: bool,
    /// The Lago billable metric `code`.
    #[serde(default)]
    pub metric: Option<NonEmpty>,
    /// The event property carrying the value (the metric's `field_name`); default `value`.
    #[serde(default)]
    pub property: Option<NonEmpty>,
    /// Bill this subscription instead of looking the record up in the customer table.
    #[serde(default)]
    pub target: Option<Target>,
    /// The sink the event goes to; default: the default sink.
    #[serde(default)]
    pub sink: Option<NonEmpty>,
    /// How the value is computed from the record.
    #[serde(default)]
    pub value: Option<ValueSpec>,
    /// Rounding of the final value (applied once, last); default: scale 6 for `quantity`, the
    /// currency's minor unit for `cost` (JPY 0, GBP/EUR/USD 2, ...), mode `half_up`.
    #[serde(default)]
    pub round: Option<Round>,
    /// Extra event properties; `{field}` copies a record field (`{resource_id}`,
    /// `{attributes.infrastructure_id}`), `{{` and `}}` are literal braces.
    #[serde(default)]
    pub properties: BTreeMap<String, Template>,
}

/// An explicit billing target that overrides the customer table.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Lago `external_subscription_id`.
    pub external_subscription_id: NonEmpty,
    /// Lago `external_customer_id`, for reports.
    #[serde(default)]
    pub external_customer_id: Option<NonEmpty>,
}

/// What number the event carries: exactly one of `quantity` or `cost`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawValueSpec")]
pub enum ValueSpec {
    /// `quantity:` the record's `consumed_quantity`, converted.
    Quantity(QuantitySpec),
    /// `cost:` the record's `billed_cost`, in the record's currency, with an optional markup.
    Cost(CostSpec),
}

/// The written form of [`ValueSpec`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValueSpec {
    /// The record's `consumed_quantity`, converted.
    #[serde(default)]
    quantity: Option<QuantitySpec>,
    /// The record's `billed_cost`, converted and priced.
    #[serde(default)]
    cost: Option<CostSpec>,
}

impl TryFrom<RawValueSpec> for ValueSpec {
    type Error = String;
    fn try_from(raw: RawValueSpec) -> Result<Self, String> {
        match (raw.quantity, raw.cost) {
            (Some(q), None) => Ok(ValueSpec::Quantity(q)),
            (None, Some(c)) => Ok(ValueSpec::Cost(c)),
            (Some(_), Some(_)) => Err("`value` takes either `quantity` or `cost`, not both".into()),
            (None, None) => Err("`value` needs `quantity: {...}` or `cost: {...}`".into()),
        }
    }
}

/// How a quantity is converted: to a `unit`, by a `factor`, or (`{}`) sent as reported.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawQuantitySpec")]
pub struct QuantitySpec {
    /// The conversion.
    pub conversion: Conversion,
}

/// A quantity conversion.
#[derive(Debug, Clone, PartialEq)]
pub enum Conversion {
    /// No conversion: the provider's quantity as is.
    AsReported,
    /// From the record's `consumed_unit` to this unit.
    Unit(Unit),
    /// Multiply by this factor (> 0).
    Factor(Decimal),
}

/// The written form of [`QuantitySpec`].
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawQuantitySpec {
    /// Convert from the record's `consumed_unit` to this unit.
    #[serde(default)]
    unit: Option<UnitName>,
    /// Multiply by this decimal (> 0).
    #[serde(default)]
    factor: Option<Factor>,
}

impl TryFrom<RawQuantitySpec> for QuantitySpec {
    type Error = String;
    fn try_from(raw: RawQuantitySpec) -> Result<Self, String> {
        let conversion = match (raw.unit, raw.factor) {
            (Some(_), Some(_)) => {
                return Err("`quantity` takes either `unit` or `factor`, not both".into())
            }
            (Some(u), None) => Conversion::Unit(u.0),
            (None, Some(f)) => Conversion::Factor(f.0),
            (None, None) => Conversion::AsReported,
        };
        Ok(QuantitySpec { conversion })
    }
}

/// A cost value: the record's `billed_cost`, optionally converted to another currency, then
/// priced (markups, commission, tiers, minimum), then rounded.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CostSpec {
    /// Invoice currency (ISO 4217). When it differs from the record's `billing_currency`, the
    /// cost is converted with the rate in effect at `charge_period_start` (`rates_csv`).
    #[serde(default)]
    pub currency: Option<Currency>,
    /// Markup in percent, ≥ 0 (`20` = +20 %). Default 0.
    #[serde(default)]
    pub markup_percent: Option<Percent>,
    /// Commission in percent of the selling price, 0 ≤ p < 100: value ÷ (1 − p/100).
    #[serde(default)]
    pub commission_percent: Option<CommissionPercent>,
    /// Fixed amount added per record, in the invoice currency, ≥ 0.
    #[serde(default)]
    pub markup_fixed: Option<Amount>,
    /// Tiered markup: each tier's `markup_percent` applies to the part of the value up to its
    /// `up_to`; the last tier has no `up_to`. Per record or per month: see `period`.
    #[serde(default)]
    pub tiers: Option<Tiers>,
    /// Minimum charge, in the invoice currency, ≥ 0. Per record or per month: see `period`.
    #[serde(default)]
    pub minimum: Option<Amount>,
    /// What `minimum` and `tiers` apply to; required when either is set. `record`: each
    /// record on its own. `month`: the total of a subscription's metric over a calendar
    /// month, settled by one adjustment event when the month closes.
    #[serde(default)]
    pub period: Option<PeriodKind>,
    /// With `period: month`: months start at local midnight of this fixed UTC offset
    /// (`"+09:00"` for SAKURA's JST months); default `"+00:00"` (UTC).
    #[serde(default)]
    pub period_utc_offset: Option<UtcOffset>,
}

impl CostSpec {
    /// The pricing part (everything but the currency).
    pub fn pricing(&self) -> Pricing {
        Pricing {
            markup_percent: self.markup_percent,
            commission_percent: self.commission_percent,
            markup_fixed: self.markup_fixed,
            tiers: self.tiers.clone(),
            minimum: self.minimum,
            period: self.period,
            period_utc_offset: self.period_utc_offset,
        }
    }
}

/// Pricing of a money value, applied in this order: `tiers` or `markup_percent`, then
/// `commission_percent`, then `markup_fixed`; `minimum` applies after all pricing. With
/// `period: month`, `tiers` and `minimum` apply to the month's total instead of each record.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    /// Markup in percent, ≥ 0 (`20` = +20 %).
    #[serde(default)]
    pub markup_percent: Option<Percent>,
    /// Commission in percent of the selling price, 0 ≤ p < 100: value ÷ (1 − p/100).
    #[serde(default)]
    pub commission_percent: Option<CommissionPercent>,
    /// Fixed amount added per record, in the invoice currency, ≥ 0.
    #[serde(default)]
    pub markup_fixed: Option<Amount>,
    /// Tiered markup (per record or per month: see `period`).
    #[serde(default)]
    pub tiers: Option<Tiers>,
    /// Minimum charge in the invoice currency, ≥ 0 (per record or per month: see `period`).
    #[serde(default)]
    pub minimum: Option<Amount>,
    /// What `minimum` and `tiers` apply to; required when either is set: `record` (each
    /// record) or `month` (a subscription's metric over a calendar month, settled by one
    /// adjustment event when the month closes).
    #[serde(default)]
    pub period: Option<PeriodKind>,
    /// With `period: month`: months start at local midnight of this fixed UTC offset
    /// (`"+09:00"`); default `"+00:00"` (UTC).
    #[serde(default)]
    pub period_utc_offset: Option<UtcOffset>,
}

impl Pricing {
    /// Whether this pricing changes nothing.
    pub fn is_empty(&self) -> bool {
        self.markup_percent.is_none()
            && self.commission_percent.is_none()
            && self.markup_fixed.is_none()
            && self.tiers.is_none()
            && self.minimum.is_none()
    }

    /// Whether `minimum` and `tiers` of this pricing apply per month (period pricing).
    pub fn is_monthly(&self) -> bool {
        self.period == Some(PeriodKind::Month)
    }

    /// The month boundaries' offset of a monthly pricing (UTC unless `period_utc_offset`).
    pub fn month_offset(&self) -> chrono::FixedOffset {
        self.period_utc_offset.map_or(UtcOffset::UTC.0, |o| o.0)
    }
}

/// What `minimum` and `tiers` apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PeriodKind {
    /// Each record on its own: the record's value is raised to the minimum, its own value is
    /// tiered.
    Record,
    /// The calendar month containing the event timestamp (`charge_period_start`): the total of
    /// one subscription's metric over the month is tiered and raised to the minimum, by one
    /// adjustment event when the month closes. Records carry the per-record price (tiers at
    /// their lowest rate, no minimum).
    Month,
}

impl PeriodKind {
    /// The name as written in mapping files.
    pub fn name(self) -> &'static str {
        match self {
            PeriodKind::Record => "record",
            PeriodKind::Month => "month",
        }
    }
}

/// A fixed offset from UTC, `+HH:MM` or `-HH:MM` (`Z` = `+00:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcOffset(pub chrono::FixedOffset);

impl UtcOffset {
    /// `+00:00`.
    pub const UTC: UtcOffset = UtcOffset(match chrono::FixedOffset::east_opt(0) {
        Some(o) => o,
        None => unreachable!(),
    });

    /// Parses `+09:00`, `-05:30`, `Z`.
    pub fn parse(text: &str) -> Result<UtcOffset, String> {
        let t = text.trim();
        let bad = || {
            format!(
                "invalid UTC offset `{text}`, expected `+HH:MM` or `-HH:MM` such as \"+09:00\" \
                 (quote it: YAML reads 09:00 as a number)"
            )
        };
        if t == "Z" || t == "z" {
            return Ok(UtcOffset::UTC);
        }
        let (sign, rest) = match t.as_bytes().first() {
            Some(b'+') => (1, &t[1..]),
            Some(b'-') => (-1, &t[1..]),
            _ => return Err(bad()),
        };
        let (h, m) = rest.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        chrono::FixedOffset::east_opt(sign * (h * 3600 + m * 60))
            .map(UtcOffset)
            .ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for UtcOffset {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a UTC offset such as \"+09:00\"", UtcOffset::parse)
    }
}

/// One tier of a tiered markup.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Upper bound of the tier (exclusive of the next), in the invoice currency; omit on the
    /// last tier.
    #[serde(default)]
    pub up_to: Option<Amount>,
    /// Markup in percent for the part of the value inside this tier.
    pub markup_percent: Percent,
}

/// Tiers of a tiered markup: bounds strictly increasing, only the last one open-ended.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Vec<Tier>")]
pub struct Tiers(pub Vec<Tier>);

impl TryFrom<Vec<Tier>> for Tiers {
    type Error = String;
    fn try_from(tiers: Vec<Tier>) -> Result<Self, String> {
        if tiers.is_empty() {
            return Err("`tiers` needs at least one tier".into());
        }
        let mut last = None;
        for (i, t) in tiers.iter().enumerate() {
            let is_last = i + 1 == tiers.len();
            match (t.up_to, is_last) {
                (None, false) => {
                    return Err(format!(
                        "tier {} has no `up_to`, but only the last tier may be open-ended",
                        i + 1
                    ))
                }
                (Some(_), true) => {
                    return Err(
                        "the last tier must have no `up_to` (it covers everything above)".into(),
                    )
                }
                (Some(b), false) => {
                    if last.is_some_and(|l: Decimal| b.0 <= l) || b.0 <= Decimal::ZERO {
                        return Err(format!(
                            "tier bounds must be positive and increasing; tier {} has up_to {}",
                            i + 1,
                            b.0
                        ));
                    }
                    last = Some(b.0);
                }
                (None, true) => {}
            }
        }
        Ok(Tiers(tiers))
    }
}

impl JsonSchema for Tiers {
    fn schema_name() -> Cow<'static, str> {
        "Tiers".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Tiers, bounds increasing; only the last tier has no `up_to`.",
            "type": "array",
            "minItems": 1,
            "items": generator.subschema_for::<Tier>(),
        })
    }
}

/// Rounding applied to the final value.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Round {
    /// Decimal places, 0 to 12; default: 6 for `quantity`, the currency's minor unit for `cost`.
    #[serde(default)]
    pub scale: Option<Scale>,
    /// Rounding mode; default `half_up`.
    #[serde(default)]
    pub mode: RoundMode,
}

/// How to round. `half_up` rounds a midpoint away from zero (2.345 → 2.35, −2.345 → −2.35).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoundMode {
    /// Nearest; a midpoint goes away from zero (commercial rounding).
    #[default]
    HalfUp,
    /// Nearest; a midpoint goes to the even digit (banker's rounding).
    HalfEven,
    /// Toward zero (truncate).
    Down,
    /// Away from zero.
    Up,
    /// Toward negative infinity.
    Floor,
    /// Toward positive infinity.
    Ceiling,
}

impl RoundMode {
    /// The `rust_decimal` strategy implementing this mode.
    pub fn strategy(self) -> RoundingStrategy {
        match self {
            RoundMode::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            RoundMode::HalfEven => RoundingStrategy::MidpointNearestEven,
            RoundMode::Down => RoundingStrategy::ToZero,
            RoundMode::Up => RoundingStrategy::AwayFromZero,
            RoundMode::Floor => RoundingStrategy::ToNegativeInfinity,
            RoundMode::Ceiling => RoundingStrategy::ToPositiveInfinity,
        }
    }

    /// The name as written in mapping files.
    pub fn name(self) -> &'static str {
        match self {
            RoundMode::HalfUp => "half_up",
            RoundMode::HalfEven => "half_even",
            RoundMode::Down => "down",
            RoundMode::Up => "up",
            RoundMode::Floor => "floor",
            RoundMode::Ceiling => "ceiling",
        }
    }
}

/// Number of decimal places, 0 to 12.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale(pub u32);

impl<'de> Deserialize<'de> for Scale {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a whole number from 0 to 12", |text| {
            match text.trim().parse::<u32>() {
                Ok(n) if n <= 12 => Ok(Scale(n)),
                _ => Err(format!(
                    "invalid rounding scale `{text}`, expected a whole number from 0 to 12"
                )),
            }
        })
    }
}

/// A non-empty string (ids, metric codes, sink names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonEmpty(pub String);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a non-empty string", |text| {
            if text.trim().is_empty() {
                return Err("must not be empty".to_string());
            }
            Ok(NonEmpty(text.to_string()))
        })
    }
}

/// A rule name: letters, digits, `_`, `-`, `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleName(pub String);

impl<'de> Deserialize<'de> for RuleName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a rule name", |text| {
            let ok = !text.is_empty()
                && text
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !ok {
                return Err(format!(
                    "invalid rule name `{text}`: use letters, digits, `_`, `-` and `.` only"
                ));
            }
            Ok(RuleName(text.to_string()))
        })
    }
}

/// A unit name known to [`Unit::parse`].
#[derive(Debug, Clone, Copy)]
struct UnitName(Unit);

impl<'de> Deserialize<'de> for UnitName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a unit name", |text| {
            Unit::parse(text).map(UnitName).ok_or_else(|| {
                format!(
                    "unknown unit `{text}`, expected one of: {}",
                    Unit::known_names()
                )
            })
        })
    }
}

/// Parses a decimal exactly from the scalar's text (never through a float).
fn parse_decimal(text: &str) -> Option<Decimal> {
    // Rounded at 28 places, as mapping files always were read: a constant written with more
    // (a factor of 1/3600 printed by a tool) must keep loading.
    let t = text.trim();
    // rust_decimal skips `_` between digits: `0_50` was 50, a hundred times a typo's amount.
    if t.contains('_') {
        return None;
    }
    Decimal::from_str(t)
        .ok()
        .or_else(|| Decimal::from_scientific(t).ok())
}

/// A markup percentage, ≥ 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent(pub Decimal);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a percentage ≥ 0", |text| match parse_decimal(text) {
            Some(p) if p >= Decimal::ZERO => Ok(Percent(p)),
            Some(_) => Err(format!(
                "markup_percent must not be negative, got `{text}` (a discount is not a markup)"
            )),
            None => Err(format!(
                "invalid markup_percent `{text}`, expected a decimal number such as 20 or 7.5"
            )),
        })
    }
}

/// A conversion factor, > 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Factor(pub Decimal);

impl<'de> Deserialize<'de> for Factor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a decimal factor > 0", |text| {
            match parse_decimal(text) {
                Some(f) if f > Decimal::ZERO => Ok(Factor(f)),
                Some(_) => Err(format!("factor must be greater than 0, got `{text}`")),
                None => Err(format!(
                    "invalid factor `{text}`, expected a decimal number such as 0.5"
                )),
            }
        })
    }
}

/// A record field a rule may refer to: one of [`MATCHABLE_FIELDS`] or `attributes.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FieldName(pub String);

impl FieldName {
    /// Validates a field name, with a "did you mean" hint on failure.
    pub fn parse(name: &str) -> Result<FieldName, String> {
        if let Some(attr) = name.strip_prefix("attributes.") {
            if attr.is_empty() {
                return Err(
                    "`attributes.` needs an attribute name, e.g. `attributes.infrastructure_id`"
                        .into(),
                );
            }
            return Ok(FieldName(name.to_string()));
        }
        if MATCHABLE_FIELDS.contains(&name) {
            return Ok(FieldName(name.to_string()));
        }
        let nearest = MATCHABLE_FIELDS
            .iter()
            .map(|f| (edit_distance(name, f), *f))
            .min();
        let hint = match nearest {
            Some((d, f)) if d <= 3 || d * 3 <= name.len() => format!("did you mean `{f}`?"),
            _ => format!("if this is a provider attribute, write `attributes.{name}`"),
        };
        Err(format!(
            "unknown record field `{name}`; {hint} (fields: {}, attributes.<name>)",
            MATCHABLE_FIELDS.join(", ")
        ))
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for FieldName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a record field name", FieldName::parse)
    }
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The conditions of a `match:` block, in file order. All must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conditions(pub Vec<(FieldName, Condition)>);

impl<'de> Deserialize<'de> for Conditions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Conditions;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of record field → condition (`{}` matches every record)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Conditions, A::Error> {
                let mut out: Vec<(FieldName, Condition)> = Vec::new();
                while let Some(field) = map.next_key::<FieldName>()? {
                    if out.iter().any(|(f, _)| *f == field) {
                        return Err(de::Error::custom(format!(
                            "field `{}` appears twice in this match",
                            field.0
                        )));
                    }
                    let cond = map.next_value::<Condition>()?;
                    out.push((field, cond));
                }
                Ok(Conditions(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// One condition on a field.
#[derive(Debug, Clone)]
pub enum Condition {
    /// A plain scalar: the field equals this text exactly.
    Exact(String),
    /// `{ glob: "instance-*" }`: the field matches a glob (`*`, `?`, `[abc]`).
    Glob(glob::Pattern),
    /// `{ one_of: [a, b] }`: the field equals one of these.
    OneOf(Vec<String>),
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Condition::Exact(a), Condition::Exact(b)) => a == b,
            (Condition::Glob(a), Condition::Glob(b)) => a.as_str() == b.as_str(),
            (Condition::OneOf(a), Condition::OneOf(b)) => a == b,
            _ => false,
        }
    }
}

impl Condition {
    /// Whether `value` satisfies this condition. An absent field satisfies nothing.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else { return false };
        match self {
            Condition::Exact(x) => x == v,
            Condition::Glob(p) => p.matches(v),
            Condition::OneOf(xs) => xs.iter().any(|x| x == v),
        }
    }

    /// Whether every value this condition accepts is also accepted by `wider`
    /// (used to find rules that can never match). Conservative: `false` when unsure.
    pub fn is_within(&self, wider: &Condition) -> bool {
        let accepted = |v: &str| wider.matches(Some(v));
        match self {
            Condition::Exact(x) => accepted(x),
            Condition::OneOf(xs) => xs.iter().all(|x| accepted(x)),
            Condition::Glob(p) => match wider {
                // `q` = `<literal>*` covers every glob whose literal prefix starts with it.
                Condition::Glob(q) => {
                    let qs = q.as_str();
                    qs == p.as_str()
                        || qs
                            .strip_suffix('*')
                            .filter(|lit| !lit.contains(['*', '?', '[']))
                            .is_some_and(|lit| {
                                super::check::literal_prefix(p.as_str()).starts_with(lit)
                            })
                }
                _ => false,
            },
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Exact(x) => write!(f, "{x}"),
            Condition::Glob(p) => write!(f, "glob {}", p.as_str()),
            Condition::OneOf(xs) => write!(f, "one of [{}]", xs.join(", ")),
        }
    }
}

/// A scalar read as its exact text (`007` stays `007`).
struct ScalarText(String);

impl<'de> Deserialize<'de> for ScalarText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a value", |text| Ok(ScalarText(text.to_string())))
    }
}

/// A glob pattern, compiled at load time.
struct GlobText(glob::Pattern);

impl<'de> Deserialize<'de> for GlobText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a glob pattern", |text| {
            glob::Pattern::new(text)
                .map(GlobText)
                .map_err(|e| format!("invalid glob `{text}`: {e}"))
        })
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Condition;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value, `{ glob: \"pattern\" }` or `{ one_of: [a, b] }`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Condition, E> {
                Ok(Condition::Exact(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Condition, E> {
                Ok(Condition::Exact(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Condition, E> {
                Ok(Condition::Exact(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Condition, E> {
                Ok(Condition::Exact(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Condition, E> {
                Err(E::custom(format!(
                    "write decimal numbers in quotes (`\"{v}\"`) so they match the record's text exactly"
                )))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Condition, E> {
                Err(E::custom(
                    "empty condition; write a value, or remove the field to match any value",
                ))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Condition, A::Error> {
                let Some(kind) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "empty condition map; expected `glob` or `one_of`",
                    ));
                };
                let cond = match kind.as_str() {
                    "glob" => Condition::Glob(map.next_value::<GlobText>()?.0),
                    "one_of" => {
                        let xs = map.next_value::<Vec<ScalarText>>()?;
                        if xs.is_empty() {
                            return Err(de::Error::custom("`one_of` needs at least one value"));
                        }
                        Condition::OneOf(xs.into_iter().map(|s| s.0).collect())
                    }
                    other => {
                        return Err(de::Error::unknown_field(other, &["glob", "one_of"]));
                    }
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "a condition has exactly one of `glob` or `one_of`; unexpected `{extra}`"
                    )));
                }
                Ok(cond)
            }
        }
        d.deserialize_any(V)
    }
}

/// A property template: literal text with `{field}` placeholders.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(pub Vec<TemplatePart>);

/// A piece of a [`Template`].
#[derive(Debug, Clone, PartialEq)]
pub enum TemplatePart {
    /// Copied as is.
    Literal(String),
    /// Replaced by the record field's value.
    Field(FieldName),
}

impl Template {
    /// Parses `text`, validating every placeholder's field name.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(format!(
                            "unclosed `{{` in `{text}` (write `{{{{` for a literal brace)"
                        ));
                    }
                    let field = FieldName::parse(name.trim())
                        .map_err(|e| format!("in placeholder `{{{name}}}`: {e}"))?;
                    if !lit.is_empty() {
                        parts.push(TemplatePart::Literal(std::mem::take(&mut lit)));
                    }
                    parts.push(TemplatePart::Field(field));
                }
                '}' => {
                    return Err(format!(
                        "unmatched `}}` in `{text}` (write `}}}}` for a literal brace)"
                    ))
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(TemplatePart::Literal(lit));
        }
        Ok(Template(parts))
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(
            d,
            "a string with optional {field} placeholders",
            Template::parse,
        )
    }
}

// --- newer scalar types ----------------------------------------------------------------------

/// A path to a CSV file, relative to the mapping file that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvPath(pub String);

impl<'de> Deserialize<'de> for CsvPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a path to a .csv file", |text| {
            let t = text.trim();
            if t.is_empty() || !t.to_ascii_lowercase().ends_with(".csv") {
                return Err(format!(
                    "expected a path to a `.csv` file (relative to this file), got `{text}`"
                ));
            }
            Ok(CsvPath(t.to_string()))
        })
    }
}

/// A customer entry's priority: a whole number, higher wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Priority(pub i64);

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a whole number", |text| {
            text.trim().parse::<i64>().map(Priority).map_err(|_| {
                format!("invalid priority `{text}`, expected a whole number such as 10")
            })
        })
    }
}

/// An ISO 4217 currency code this tool knows the minor unit of.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency(pub String);

/// Known currencies and their minor units (decimal places).
const CURRENCIES: &[(&str, u32)] = &[
    ("AUD", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("MYR", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PHP", 2),
    ("PLN", 2),
    ("RON", 2),
    ("RSD", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TND", 3),
    ("TRY", 2),
    ("TWD", 2),
    ("UAH", 2),
    ("USD", 2),
    ("VND", 0),
    ("ZAR", 2),
];

impl Currency {
    /// Validates a currency code (upper-case ISO 4217, from the known list).
    pub fn parse(text: &str) -> Result<Currency, String> {
        let t = text.trim();
        if CURRENCIES.iter().any(|(c, _)| *c == t) {
            return Ok(Currency(t.to_string()));
        }
        let upper = t.to_ascii_uppercase();
        let hint = if CURRENCIES.iter().any(|(c, _)| *c == upper) {
            format!("write it in upper case: `{upper}`")
        } else {
            format!(
                "expected an ISO 4217 code such as EUR, GBP, USD, JPY (known: {})",
                CURRENCIES
                    .iter()
                    .map(|(c, _)| *c)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        Err(format!("unknown currency `{text}`; {hint}"))
    }

    /// The number of decimal places of the currency's minor unit (JPY 0, GBP 2, KWD 3).
    pub fn minor_units(code: &str) -> Option<u32> {
        CURRENCIES.iter().find(|(c, _)| *c == code).map(|(_, n)| *n)
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "an ISO 4217 currency code", Currency::parse)
    }
}

/// A commission percentage, 0 ≤ p < 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommissionPercent(pub Decimal);

impl<'de> Deserialize<'de> for CommissionPercent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(
            d,
            "a percentage from 0 to below 100",
            |text| match parse_decimal(text) {
                Some(p) if p >= Decimal::ZERO && p < Decimal::ONE_HUNDRED => {
                    Ok(CommissionPercent(p))
                }
                Some(_) => Err(format!(
                    "commission_percent must be at least 0 and below 100, got `{text}`"
                )),
                None => Err(format!(
                    "invalid commission_percent `{text}`, expected a decimal number such as 15"
                )),
            },
        )
    }
}

/// A money amount ≥ 0, in the invoice currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount(pub Decimal);

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "an amount ≥ 0", |text| match parse_decimal(text) {
            Some(a) if a >= Decimal::ZERO => Ok(Amount(a)),
            Some(_) => Err(format!("amount must not be negative, got `{text}`")),
            None => Err(format!(
                "invalid amount `{text}`, expected a decimal number such as 1.50"
            )),
        })
    }
}

// --- JSON Schema of the hand-written types ---------------------------------------------------
//
// These types validate inside their `Deserialize` impls, so `schemars` cannot derive their
// schema; each states the written form here, next to the parser it describes.

/// A schema for a scalar written as text or a number.
macro_rules! scalar_schema {
    ($t:ty, $name:literal, { $($body:tt)* }) => {
        impl JsonSchema for $t {
            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ $($body)* })
            }
        }
    };
}

scalar_schema!(Version, "Version", {
    "description": "Format version; must be 1.",
    "enum": [1, "1"]
});
scalar_schema!(Scale, "Scale", {
    "description": "Decimal places, 0 to 12.",
    "type": "integer", "minimum": 0, "maximum": 12
});
scalar_schema!(NonEmpty, "NonEmpty", {
    "description": "A non-empty string.",
    "type": ["string", "number"], "minLength": 1
});
scalar_schema!(RuleName, "RuleName", {
    "description": "Letters, digits, `_`, `-` and `.`; unique across all loaded files.",
    "type": "string", "pattern": "^[A-Za-z0-9_.-]+$"
});
scalar_schema!(UnitName, "UnitName", {
    "description": "A unit: seconds, minutes, hours, days; bytes, kb/kbytes, mb/mbytes, gb/gbytes, tb/tbytes (decimal); kib, mib, gib, tib (binary).",
    "type": "string",
    "enum": ["seconds", "second", "s", "minutes", "minute", "hours", "hour", "h", "days", "day",
             "bytes", "byte", "kbytes", "kb", "mbytes", "mb", "gbytes", "gb", "tbytes", "tb",
             "kib", "mib", "gib", "tib"]
});
scalar_schema!(Percent, "Percent", {
    "description": "A percentage ≥ 0 (20 = +20 %).",
    "type": ["number", "string"], "minimum": 0
});
scalar_schema!(CommissionPercent, "CommissionPercent", {
    "description": "A commission in percent of the selling price, 0 ≤ p < 100.",
    "type": ["number", "string"], "minimum": 0, "exclusiveMaximum": 100
});
scalar_schema!(Amount, "Amount", {
    "description": "A money amount ≥ 0 in the invoice currency; quote it to keep every digit (\"0.10\").",
    "type": ["number", "string"], "minimum": 0
});
scalar_schema!(Factor, "Factor", {
    "description": "A decimal factor > 0.",
    "type": ["number", "string"], "exclusiveMinimum": 0
});
scalar_schema!(Priority, "Priority", {
    "description": "Whole number; the matching customer entry with the highest priority wins (default 0).",
    "type": "integer"
});
scalar_schema!(CsvPath, "CsvPath", {
    "description": "Path of a CSV file, relative to this mapping file.",
    "type": "string", "pattern": "\\.[cC][sS][vV]$"
});
scalar_schema!(UtcOffset, "UtcOffset", {
    "description": "A fixed offset from UTC: `+HH:MM` or `-HH:MM` (quote it), or `Z`.",
    "type": "string", "pattern": "^([+-]([01][0-9]|2[0-3]):[0-5][0-9]|[Zz])$"
});
scalar_schema!(Template, "Template", {
    "description": "Text with `{field}` placeholders (`{resource_id}`, `{attributes.x}`); `{{` and `}}` are literal braces.",
    "type": ["string", "number", "boolean"]
});

impl JsonSchema for Currency {
    fn schema_name() -> Cow<'static, str> {
        "Currency".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let codes: Vec<&str> = CURRENCIES.iter().map(|(c, _)| *c).collect();
        json_schema!({
            "description": "ISO 4217 currency code (upper case).",
            "type": "string",
            "enum": codes
        })
    }
}

impl JsonSchema for FieldName {
    fn schema_name() -> Cow<'static, str> {
        "FieldName".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A record field or `attributes.<name>`.",
            "type": "string",
            "pattern": field_name_pattern()
        })
    }
}

/// The regular expression every condition key must match.
fn field_name_pattern() -> String {
    format!("^({}|attributes\\..+)$", MATCHABLE_FIELDS.join("|"))
}

impl JsonSchema for Conditions {
    fn schema_name() -> Cow<'static, str> {
        "Conditions".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Conditions on record fields, all of which must hold; `{}` matches every record.",
            "type": "object",
            "propertyNames": { "pattern": field_name_pattern() },
            "additionalProperties": generator.subschema_for::<Condition>()
        })
    }
}

impl JsonSchema for Condition {
    fn schema_name() -> Cow<'static, str> {
        "Condition".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A value (exact text match; quote decimals), `{ glob: \"pattern\" }` or `{ one_of: [a, b] }`.",
            "anyOf": [
                { "type": ["string", "integer", "boolean"] },
                {
                    "type": "object",
                    "properties": { "glob": { "type": "string", "description": "Glob: `*`, `?`, `[abc]`." } },
                    "required": ["glob"],
                    "additionalProperties": false
                },
                {
                    "type": "object",
                    "properties": { "one_of": {
                        "type": "array", "minItems": 1,
                        "items": { "type": ["string", "integer", "boolean"] },
                        "description": "The field equals one of these."
                    } },
                    "required": ["one_of"],
                    "additionalProperties": false
                }
            ]
        })
    }
}

impl JsonSchema for ValueSpec {
    fn schema_name() -> Cow<'static, str> {
        "ValueSpec".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "What number the event carries: exactly one of `quantity` or `cost`.",
            "type": "object",
            "properties": {
                "quantity": generator.subschema_for::<RawQuantitySpec>(),
                "cost": generator.subschema_for::<CostSpec>()
            },
            "additionalProperties": false,
            "minProperties": 1,
            "maxProperties": 1
        })
    }
}

impl JsonSchema for QuantitySpec {
    fn schema_name() -> Cow<'static, str> {
        "QuantitySpec".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        RawQuantitySpec::json_schema(generator)
    }
}

/// The JSON Schema of a mapping file, generated from the types that parse it, as pretty JSON
/// with a trailing newline (what `billsync mappings schema` prints and `mappings/schema.json`
/// holds).
pub fn json_schema_text() -> String {
    let schema = schemars::schema_for!(MappingFile);
    let mut text =
        serde_json::to_string_pretty(&schema).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}
