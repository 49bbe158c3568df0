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

use rust_decimal::{Decimal, RoundingStrategy};
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingFile {
    /// Format version; must be `1`.
    pub version: Version,
    /// Who pays: the customer table, first match wins.
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
#[derive(Debug, Clone, Deserialize)]
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
}

/// A product rule: which records it covers and what they become.
///
/// Either `ignore: true` (the record is deliberately not billed) or `metric` + `value`.
#[derive(Debug, Clone, Deserialize)]
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
    /// Rounding of the value; default scale 6 for `quantity`, 2 for `cost`, mode `half_up`.
    #[serde(default)]
    pub round: Option<Round>,
    /// Extra event properties; `{field}` copies a record field (`{resource_id}`,
    /// `{attributes.infrastructure_id}`), `{{` and `}}` are literal braces.
    #[serde(default)]
    pub properties: BTreeMap<String, Template>,
}

/// An explicit billing target that overrides the customer table.
#[derive(Debug, Clone, Deserialize)]
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
    #[serde(default)]
    quantity: Option<QuantitySpec>,
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuantitySpec {
    #[serde(default)]
    unit: Option<UnitName>,
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

/// A cost value: `billed_cost × (1 + markup_percent / 100)`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostSpec {
    /// Markup in percent, ≥ 0 (`20` = +20 %). Default 0.
    #[serde(default)]
    pub markup_percent: Option<Percent>,
}

/// Rounding applied to the final value.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Round {
    /// Decimal places, 0 to 12.
    pub scale: Scale,
    /// Rounding mode; default `half_up`.
    #[serde(default)]
    pub mode: RoundMode,
}

/// How to round. `half_up` rounds a midpoint away from zero (2.345 → 2.35, −2.345 → −2.35).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
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
    let t = text.trim();
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
                Condition::Glob(q) => q.as_str() == p.as_str() || q.as_str() == "*",
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
