//! The canonical usage record every provider normalizes into.
//!
//! Field names follow FOCUS (FinOps Open Cost and Usage Specification) where a FOCUS column
//! exists, so the same record can feed an invoicing system and a FOCUS export. Money and
//! quantities are [`Decimal`] from the wire onwards: never a float.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Timelike, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A name the code itself gives: a provider, a service, a natural-key part, an attribute.
/// Static text in the common case, owned only when it comes from the provider's data (an
/// unknown field kept as an attribute). Records are made by the million, and as owned strings
/// these names were about fifteen allocations per record.
pub type Name = std::borrow::Cow<'static, str>;

/// A value of a record: an id, a unit, a currency, a natural-key part, an attribute. Held
/// inline up to 24 bytes (almost all of them are shorter), on the heap beyond: as `String`s
/// they were some twenty allocations and frees per record, the largest share of the puller's
/// time in the allocator.
pub type Text = compact_str::CompactString;

/// One line of provider usage or cost, normalized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Provider kind, e.g. `metalsoft` (FOCUS `ProviderName`, lower-case).
    pub provider: Name,
    /// The configured source this record came from (one provider kind may be configured twice).
    pub source: Text,
    /// FOCUS `BillingAccountId`: the account the provider invoices.
    pub billing_account_id: Text,
    /// FOCUS `SubAccountId`: the provider's user, owner or project inside the account.
    pub sub_account_id: Text,
    /// FOCUS `ResourceId`.
    pub resource_id: Text,
    /// FOCUS `ResourceName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<Text>,
    /// FOCUS `ResourceType` (e.g. `instance`, `drive`).
    pub resource_type: Text,
    /// FOCUS `ServiceName`: the provider's service or product family.
    pub service_name: Name,
    /// FOCUS `SkuId`: the provider's product/SKU identifier, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku_id: Option<Text>,
    /// FOCUS `ChargeDescription`: the provider's product label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge_description: Option<Text>,
    /// FOCUS `ChargePeriodStart`, inclusive, UTC.
    #[serde(serialize_with = "serialize_utc")]
    pub charge_period_start: DateTime<Utc>,
    /// FOCUS `ChargePeriodEnd`, exclusive, UTC.
    #[serde(serialize_with = "serialize_utc")]
    pub charge_period_end: DateTime<Utc>,
    /// FOCUS `ConsumedQuantity`.
    pub consumed_quantity: Decimal,
    /// FOCUS `ConsumedUnit` as the provider names it (`seconds`, `gbytes`, ...).
    pub consumed_unit: Text,
    /// FOCUS `BilledCost`, in `billing_currency`, exactly as the provider stated it.
    pub billed_cost: Decimal,
    /// FOCUS `BillingCurrency`, ISO 4217.
    pub billing_currency: Text,
    /// Scope of the natural key (e.g. the MetalSoft user id): groups records in the ledger index.
    pub scope: Text,
    /// The provider's natural key, as ordered `name=value` parts. Together with the provider and
    /// source it identifies the record across runs; the idempotency key is derived from it.
    pub natural_key: Vec<(Name, Text)>,
    /// Whether the provider will not change this record any more. Non-final records are held
    /// as `provisional` and re-read until they are final.
    pub is_final: bool,
    /// Provider-specific fields that mapping rules may match on (`attributes.<name>`).
    #[serde(default)]
    pub attributes: BTreeMap<Name, Text>,
    /// The raw provider fields, kept for audit.
    #[serde(default)]
    pub raw: RawJson,
}

/// A provider's raw fields as their JSON text, kept for audit.
///
/// Text rather than a parsed [`serde_json::Value`]: a parsed line is a tree of some forty small
/// allocations that staging only ever writes back out as JSON (into the record's body). A
/// provider that reads its answer as text keeps each line's own bytes ([`RawJson::from_raw`]),
/// one allocation, written into the body verbatim.
///
/// `null` is kept without an allocation: every record is made with it and the puller sets it
/// back once the record's body is encoded.
#[derive(Clone)]
pub struct RawJson(Option<Box<serde_json::value::RawValue>>);

/// The JSON text of [`RawJson::null`].
const NULL: &str = "null";

impl RawJson {
    /// JSON `null`: no raw fields.
    pub const fn null() -> Self {
        Self(None)
    }

    /// The text of a parsed value.
    pub fn from_value(value: &serde_json::Value) -> Self {
        if value.is_null() {
            return Self::null();
        }
        // Serialising a `Value` cannot fail: its keys are strings and its numbers valid.
        Self(Some(
            serde_json::value::to_raw_value(value).expect("a JSON value serialises"),
        ))
    }

    /// A provider's own JSON text of one value, kept as it came, unless it spans lines (a
    /// pretty-printed answer): then its compact form, so indentation does not fill the ledger.
    pub fn from_raw(raw: &serde_json::value::RawValue) -> Self {
        if raw.get().contains('\n') || raw.get() == NULL {
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(raw.get()) {
                return Self::from_value(&value);
            }
        }
        Self(Some(raw.to_owned()))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0
            .as_deref()
            .map_or(NULL, serde_json::value::RawValue::get)
    }

    /// The fields parsed (for audit output and tests; staging never needs it).
    pub fn to_value(&self) -> serde_json::Value {
        // The text was valid JSON when this was made.
        serde_json::from_str(self.get()).unwrap_or(serde_json::Value::Null)
    }

    pub fn is_null(&self) -> bool {
        self.0.is_none()
    }
}

impl Default for RawJson {
    fn default() -> Self {
        Self::null()
    }
}

impl From<serde_json::Value> for RawJson {
    fn from(value: serde_json::Value) -> Self {
        Self::from_value(&value)
    }
}

impl std::fmt::Debug for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

/// Equal when they are the same JSON, whatever the spacing.
impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get() || self.to_value() == other.to_value()
    }
}

/// Written as the JSON it is (verbatim into a JSON serialiser, the body's only format).
impl Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(raw) => raw.serialize(serializer),
            None => serializer.serialize_unit(),
        }
    }
}

/// Read through a `Value`, so that any self-describing format works (bodies are decoded only
/// on the rare paths that need a whole record).
impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(deserializer).map(|v| Self::from_value(&v))
    }
}

/// The fields of [`UsageRecord`] a mapping rule may refer to, besides `attributes.<name>`.
pub const MATCHABLE_FIELDS: &[&str] = &[
    "provider",
    "source",
    "billing_account_id",
    "sub_account_id",
    "resource_id",
    "resource_name",
    "resource_type",
    "service_name",
    "sku_id",
    "charge_description",
    "consumed_unit",
    "billing_currency",
];

/// The text fields every record has: [`UsageRecord::field`] never answers `None` for them.
pub const REQUIRED_TEXT_FIELDS: &[&str] = &[
    "provider",
    "source",
    "billing_account_id",
    "sub_account_id",
    "resource_id",
    "resource_type",
    "service_name",
    "consumed_unit",
    "billing_currency",
];

impl UsageRecord {
    /// The value of a matchable field by name (`attributes.x` reads an attribute).
    /// `None` when the field is absent on this record; unknown names are rejected by the
    /// mapping loader before any record is seen.
    pub fn field(&self, name: &str) -> Option<&str> {
        if let Some(attr) = name.strip_prefix("attributes.") {
            return self.attributes.get(attr).map(Text::as_str);
        }
        match name {
            "provider" => Some(&self.provider),
            "source" => Some(&self.source),
            "billing_account_id" => Some(&self.billing_account_id),
            "sub_account_id" => Some(&self.sub_account_id),
            "resource_id" => Some(&self.resource_id),
            "resource_name" => self.resource_name.as_deref(),
            "resource_type" => Some(&self.resource_type),
            "service_name" => Some(&self.service_name),
            "sku_id" => self.sku_id.as_deref(),
            "charge_description" => self.charge_description.as_deref(),
            "consumed_unit" => Some(&self.consumed_unit),
            "billing_currency" => Some(&self.billing_currency),
            _ => None,
        }
    }

    /// The natural key as one canonical string: `source|name=value|...`.
    pub fn natural_key_string(&self) -> String {
        let mut s = String::with_capacity(128);
        s.push_str(&self.source);
        for (k, v) in &self.natural_key {
            s.push('|');
            s.push_str(k);
            s.push('=');
            s.push_str(v);
        }
        s
    }

    /// The idempotency key: deterministic, derived from provider, source and natural key only
    /// (never from a run or a clock), so a re-read or a replay yields the same key.
    ///
    /// Shape: `<provider>.<scope>.<period start yyyymmddThhmmss>.<24 hex of sha256>`. The readable
    /// prefix sorts by provider, scope and period, which keeps SQLite's unique index local
    /// (random hashes as the leading part cut insert speed about five-fold). The hash covers the
    /// whole natural key, so the prefix only orders and never decides uniqueness on its own.
    /// At most 100 characters, which every sink accepts (Stripe's `identifier` limit).
    pub fn idempotency_key(&self) -> String {
        use std::fmt::Write;
        // The digest of `natural_key_string()`, fed part by part; the key written into one
        // buffer (this runs once per record on the puller's thread: no allocation but the key).
        let mut h = Sha256::new();
        h.update(self.source.as_bytes());
        for (k, v) in &self.natural_key {
            h.update(b"|");
            h.update(k.as_bytes());
            h.update(b"=");
            h.update(v.as_bytes());
        }
        let digest = h.finalize();
        let mut key = String::with_capacity(self.provider.len() + 24 + 15 + 24 + 3);
        key.push_str(&self.provider);
        key.push('.');
        key.extend(
            self.scope
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(24),
        );
        key.push('.');
        let t = self.charge_period_start;
        if !write_utc_fields(&mut key, t, "", "", "") {
            let _ = write!(key, "{}", t.format("%Y%m%dT%H%M%S"));
        }
        key.push('.');
        hex_into(&mut key, &digest[..12]);
        key
    }

    /// A hash of everything billable in the record: two reads of the same natural key with the
    /// same content hash are the same record; a different hash is a change to resolve.
    pub fn content_hash(&self) -> String {
        use std::fmt::Write;
        let mut h = Sha256::new();
        let part = |h: &mut Sha256, text: &str| {
            h.update(text.as_bytes());
            h.update([0u8]);
        };
        // Numbers and times are written into one reused buffer.
        let mut buf = String::with_capacity(40);
        rfc3339_into(&mut buf, self.charge_period_start);
        part(&mut h, &buf);
        rfc3339_into(&mut buf, self.charge_period_end);
        part(&mut h, &buf);
        buf.clear();
        let _ = write!(buf, "{}", self.consumed_quantity.normalize());
        part(&mut h, &buf);
        part(&mut h, &self.consumed_unit);
        buf.clear();
        let _ = write!(buf, "{}", self.billed_cost.normalize());
        part(&mut h, &buf);
        for text in [
            self.billing_currency.as_str(),
            &self.billing_account_id,
            &self.sub_account_id,
            &self.resource_id,
            &self.service_name,
            self.sku_id.as_deref().unwrap_or(""),
            if self.is_final {
                "final"
            } else {
                "provisional"
            },
        ] {
            part(&mut h, text);
        }
        for (k, v) in &self.attributes {
            h.update(k.as_bytes());
            h.update([1u8]);
            h.update(v.as_bytes());
            h.update([0u8]);
        }
        let mut hash = String::with_capacity(32);
        hex_into(&mut hash, &h.finalize()[..16]);
        hash
    }

    /// A hash of what a mapping rule or a sink reads from the record and
    /// [`content_hash`](Self::content_hash) leaves out: `resource_name`, `resource_type`,
    /// `charge_description` (rules match on them, `{field}` properties copy them, the FOCUS
    /// export writes them) and whether `sku_id` is present at all (the content hash takes an
    /// absent SKU for an empty one; a condition does not). Every other field a rule can read is
    /// in the content hash or, like `provider` and `source`, fixed by the idempotency key.
    ///
    /// Kept beside the content hash rather than in it: ledgers hold content hashes of records
    /// already sent, and a new content hash for the same content would make every re-read
    /// record look changed. Two reads of a key are the same record only when both hashes
    /// agree. Each field is written with its presence and length, so no two sets of values
    /// hash alike by shifting text from one field to the next.
    pub fn match_hash(&self) -> MatchHash {
        let mut h = Sha256::new();
        for field in [
            self.resource_name.as_deref(),
            Some(self.resource_type.as_str()),
            self.charge_description.as_deref(),
            self.sku_id.as_deref(),
        ] {
            match field {
                None => h.update([0u8]),
                Some(text) => {
                    h.update([1u8]);
                    h.update((text.len() as u64).to_le_bytes());
                    h.update(text.as_bytes());
                }
            }
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in h.finalize()[..16].iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
        }
        MatchHash(out)
    }
}

/// The hash of what mapping rules and sinks read from a record besides what
/// [`UsageRecord::content_hash`] covers (see [`UsageRecord::match_hash`]): 16 bytes of SHA-256 as
/// 32 lower-case hex digits, held inline (one per staged record, without an allocation).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatchHash([u8; 32]);

impl MatchHash {
    /// The hex text, as the ledger stores it.
    pub fn as_str(&self) -> &str {
        // Only ever made of ASCII hex digits.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// A stored hash read back; `None` unless it is 32 lower-case hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes: [u8; 32] = text.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            .then_some(MatchHash(bytes))
    }
}

impl std::fmt::Debug for MatchHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for MatchHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `t.to_rfc3339()` into `buf` (cleared first), without allocating for whole seconds.
fn rfc3339_into(buf: &mut String, t: DateTime<Utc>) {
    buf.clear();
    if t.nanosecond() != 0 || !write_utc_fields(buf, t, "-", ":", "+00:00") {
        buf.clear();
        buf.push_str(&t.to_rfc3339());
    }
}

/// The digits `YYYYMMDDHHMMSS` of `t`'s whole seconds, written by hand (`write!` with six
/// integers went through `core::fmt` several times for every staged record, a measurable share
/// of the puller's time); `None` when chrono would not write them so: a year without four
/// digits, or a leap second.
fn utc_digits(t: DateTime<Utc>) -> Option<[u8; 14]> {
    if !(0..=9999).contains(&t.year()) || t.nanosecond() >= 1_000_000_000 {
        return None;
    }
    let year = t.year() as u32; // 0..=9999, checked above
    let mut out = [b'0'; 14];
    for (at, n) in [
        (0, year / 100),
        (2, year % 100),
        (4, t.month()),
        (6, t.day()),
        (8, t.hour()),
        (10, t.minute()),
        (12, t.second()),
    ] {
        out[at] = b'0' + (n / 10) as u8;
        out[at + 1] = b'0' + (n % 10) as u8;
    }
    Some(out)
}

/// Where the parts of [`utc_digits`] go in `YYYY-MM-DDTHH:MM:SS`: (digits, offset).
const UTC_PARTS: [(std::ops::Range<usize>, usize); 6] = [
    (0..4, 0),
    (4..6, 5),
    (6..8, 8),
    (8..10, 11),
    (10..12, 14),
    (12..14, 17),
];

/// `YYYY{date}MM{date}DDTHH{time}MM{time}SS{end}` of `t`'s whole seconds, appended; `false` (and
/// nothing written) when that is not how chrono would write it (see [`utc_digits`]).
pub(crate) fn write_utc_fields(
    buf: &mut String,
    t: DateTime<Utc>,
    date: &str,
    time: &str,
    end: &str,
) -> bool {
    let Some(digits) = utc_digits(t) else {
        return false;
    };
    buf.reserve(15 + 2 * date.len() + 2 * time.len() + end.len());
    // The separator before each part of `UTC_PARTS`.
    let before = ["", date, date, "T", time, time];
    for (sep, (part, _)) in before.into_iter().zip(UTC_PARTS) {
        buf.push_str(sep);
        // ASCII digits.
        buf.push_str(std::str::from_utf8(&digits[part]).unwrap_or_default());
    }
    buf.push_str(end);
    true
}

/// `t` as chrono's `Serialize` writes a whole-second UTC time (`2026-10-01T00:00:00Z`), in a
/// fixed array; `None` when chrono would write something else (fractional seconds, a leap
/// second, a year without four digits).
fn utc_z(t: DateTime<Utc>) -> Option<[u8; 20]> {
    if t.nanosecond() != 0 {
        return None;
    }
    utc_digits(t).map(z_of_digits)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of [`utc_digits`].
fn z_of_digits(digits: [u8; 14]) -> [u8; 20] {
    let mut out = *b"0000-00-00T00:00:00Z";
    for (part, at) in UTC_PARTS {
        out[at..at + part.len()].copy_from_slice(&digits[part]);
    }
    out
}

/// `t` as `to_rfc3339_opts(SecondsFormat::Secs, true)` writes it (a fraction of a second
/// dropped), without an allocation: a natural key carries one per record.
pub fn utc_secs_text(t: DateTime<Utc>) -> Text {
    match utc_digits(t) {
        // ASCII digits and separators.
        Some(digits) => Text::from_utf8(z_of_digits(digits)).unwrap_or_default(),
        None => Text::from(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
    }
}

/// Serializes a UTC time exactly as chrono's `Serialize` does, without going through
/// `core::fmt` for the common whole-second case: the record body is written for every staged
/// record, and chrono's formatting was a visible share of it.
fn serialize_utc<S: serde::Serializer>(
    t: &DateTime<Utc>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match utc_z(*t) {
        // The array is ASCII digits and separators.
        Some(text) => serializer.serialize_str(std::str::from_utf8(&text).unwrap_or_default()),
        None => t.serialize(serializer),
    }
}

/// Lower-case hex of `bytes`, appended.
fn hex_into(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
}

#[cfg(test)]
mod tests {
    use super::RawJson;
    use serde_json::json;
    use serde_json::value::RawValue;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn raw_json_keeps_the_text_and_null_without_text() {
        let null = RawJson::null();
        assert!(null.is_null());
        assert_eq!(null.get(), "null");
        assert_eq!(serde_json::to_string(&null).unwrap(), "null");
        assert!(RawJson::from_raw(&raw("null")).is_null());
        assert!(RawJson::from_value(&json!(null)).is_null());
        assert!(serde_json::from_str::<RawJson>("null").unwrap().is_null());

        // The provider's own text, written verbatim.
        let line = RawJson::from_raw(&raw(r#"{"b":"x","a":0.10}"#));
        assert_eq!(line.get(), r#"{"b":"x","a":0.10}"#);
        assert_eq!(
            serde_json::to_string(&json!({"raw": serde_json::to_value(&line).unwrap()})).unwrap(),
            r#"{"raw":{"b":"x","a":0.10}}"#
        );
        // Equal as JSON whatever the spacing; numbers as written.
        assert_eq!(line, RawJson::from_raw(&raw(r#"{ "b": "x", "a": 0.10 }"#)));
        assert_ne!(line, RawJson::from_raw(&raw(r#"{"b":"x","a":0.1}"#)));
        // Pretty-printed text is kept compact.
        assert_eq!(
            RawJson::from_raw(&raw("{\n  \"a\": 1\n}")).get(),
            r#"{"a":1}"#
        );
        // Read back through a `Value`.
        let back: RawJson = serde_json::from_str(line.get()).unwrap();
        assert_eq!(back, line);
        let exact: serde_json::Value = serde_json::from_str("0.10").unwrap();
        assert_eq!(back.to_value()["a"], exact);
    }

    /// The hand-written time formats must be chrono's to the byte: the body keeps the
    /// serialized form, the ledger compares times as text, the idempotency key is sent.
    #[test]
    fn hand_written_times_are_chronos_to_the_byte() {
        use super::{rfc3339_into, serialize_utc, utc_secs_text, utc_z, write_utc_fields};
        use chrono::{DateTime, Duration, TimeZone, Timelike, Utc};

        let mut times = vec![
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9, 2, 28, 9, 9, 9).unwrap(),
            Utc.with_ymd_and_hms(99, 3, 1, 10, 10, 10).unwrap(),
            Utc.with_ymd_and_hms(999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(2024, 2, 29, 12, 0, 1).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2026, 6, 30, 23, 59, 59).unwrap() + Duration::milliseconds(5),
            Utc.with_ymd_and_hms(2016, 12, 31, 23, 59, 59)
                .unwrap()
                .with_nanosecond(1_500_000_000)
                .unwrap(),
        ];
        // Every hour of a leap year and some odd seconds of the years around it.
        let start = Utc.with_ymd_and_hms(2023, 12, 31, 0, 0, 0).unwrap();
        times.extend((0..24 * 368).map(|h| start + Duration::hours(h) + Duration::seconds(h % 61)));

        #[derive(serde::Serialize)]
        struct Fast(#[serde(serialize_with = "serialize_utc")] DateTime<Utc>);

        for t in times {
            let chrono_json = serde_json::to_string(&t).unwrap();
            assert_eq!(
                serde_json::to_string(&Fast(t)).unwrap(),
                chrono_json,
                "{t:?}"
            );
            if let Some(text) = utc_z(t) {
                assert_eq!(
                    format!("\"{}\"", std::str::from_utf8(&text).unwrap()),
                    chrono_json
                );
            }
            let mut buf = String::new();
            rfc3339_into(&mut buf, t);
            assert_eq!(buf, t.to_rfc3339(), "{t:?}");
            assert_eq!(
                utc_secs_text(t),
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "{t:?}"
            );
            let mut buf = String::from("k.");
            if write_utc_fields(&mut buf, t, "", "", "") {
                assert_eq!(buf, format!("k.{}", t.format("%Y%m%dT%H%M%S")), "{t:?}");
            } else {
                assert_eq!(
                    buf, "k.",
                    "nothing written when the fast form does not apply"
                );
                assert!(
                    !(0..=9999).contains(&chrono::Datelike::year(&t))
                        || t.nanosecond() >= 1_000_000_000
                );
            }
        }
    }
}

/// A decimal from its text, plain (`0.012846`) or with an exponent (`1.5e-5`, `7.2E+2`),
/// exactly or not at all: `Decimal::from_scientific` reads the digits before the exponent
/// with rounding, so `1.00000000000000000000000000001e0` became `1`. A value needing more than
/// 28 digits after the decimal point, or beyond `Decimal`'s range, is refused.
pub fn exact_decimal(text: &str) -> Option<rust_decimal::Decimal> {
    use rust_decimal::Decimal;
    // rust_decimal's parser skips `_` between digits (`0_50` is 50): not a number any provider
    // or sink writes, and read so it would be a hundred times the amount.
    if text.contains('_') {
        return None;
    }
    if let Ok(d) = Decimal::from_str_exact(text) {
        return Some(d);
    }
    let (digits, exponent) = text.split_once(['e', 'E'])?;
    let mut d = Decimal::from_str_exact(digits).ok()?;
    let exponent: i64 = exponent
        .strip_prefix('+')
        .unwrap_or(exponent)
        .parse()
        .ok()?;
    if d.is_zero() {
        return Some(Decimal::ZERO);
    }
    if exponent < 0 {
        // Trailing zeros of the digits may make room for the extra places.
        d = d.normalize();
        let scale = i64::from(d.scale()).checked_sub(exponent)?;
        d.set_scale(u32::try_from(scale).ok()?).ok()?;
    } else {
        if exponent > 28 {
            return None;
        }
        for _ in 0..exponent {
            d = d.checked_mul(Decimal::TEN)?;
        }
    }
    Some(d)
}

#[cfg(test)]
mod exact_decimal_tests {
    use super::exact_decimal;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn plain_and_exponent_forms_are_exact() {
        assert_eq!(exact_decimal("0.012846"), Some(d("0.012846")));
        assert_eq!(exact_decimal("-7.25925278"), Some(d("-7.25925278")));
        assert_eq!(exact_decimal("1e-5"), Some(d("0.00001")));
        assert_eq!(exact_decimal("1.5E-5"), Some(d("0.000015")));
        assert_eq!(exact_decimal("7.25925278e+2"), Some(d("725.925278")));
        assert_eq!(
            exact_decimal("1E+28"),
            Some(d("10000000000000000000000000000"))
        );
        // Trailing zeros of the digits make room: 28 places in the end.
        assert_eq!(
            exact_decimal("1.000e-28"),
            Some(d("0.0000000000000000000000000001"))
        );
        assert_eq!(exact_decimal("0e999"), Some(Decimal::ZERO));
    }

    /// `Decimal::from_scientific` rounded these (the first became exactly 1): refused now, as
    /// a value needing more digits than `Decimal` has always was without an exponent.
    #[test]
    fn what_needs_more_digits_is_refused_not_rounded() {
        assert_eq!(exact_decimal("1.00000000000000000000000000001e0"), None);
        assert_eq!(exact_decimal("1e-29"), None);
        assert_eq!(exact_decimal("1e-400"), None);
        assert_eq!(exact_decimal("1e29"), None);
        assert_eq!(exact_decimal("1e99999999999999999999"), None);
        assert_eq!(exact_decimal("e5"), None);
        assert_eq!(exact_decimal("1e"), None);
        assert_eq!(exact_decimal("NaN"), None);
    }

    /// rust_decimal reads `0_50` as 50 and `1_000` as 1000 (it skips `_`): refused, as any other
    /// text that is not a number.
    #[test]
    fn digit_separators_are_not_numbers() {
        for text in [
            "0_50",
            "1_000",
            "7.25_925278",
            "1_0e-5",
            "1e1_0",
            "_5",
            "5_",
        ] {
            assert_eq!(exact_decimal(text), None, "{text}");
        }
    }
}
