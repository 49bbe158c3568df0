//! A record's idempotency key, content hash and match hash are fixed formulas of its fields: a
//! key that changed between releases would send every record again under a new
//! `transaction_id`, a hash that changed would see every record as changed. The ledger's keys
//! are pinned on real data in `provider_metalsoft`; here the formulas are written out plainly
//! and compared on arbitrary records (odd scopes, sub-second, leap-second and far-off times, long
//! decimals, any attributes). And every field a mapping rule can read is in one of the three: a
//! re-read that changes only such a field must be a change, never a no-op.

use std::collections::BTreeMap;
use std::fmt::Write;

use billsync::record::{UsageRecord, MATCHABLE_FIELDS};
use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `<provider>.<scope: 24 chars, [A-Za-z0-9-] else _>.<start %Y%m%dT%H%M%S>.<24 hex of sha256
/// of source|name=value|...>`.
fn key_formula(r: &UsageRecord) -> String {
    let scope: String = r
        .scope
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    // Written out here, not taken from `natural_key_string()`: the key must not follow a
    // change to that function either.
    let mut natural = r.source.to_string();
    for (name, value) in &r.natural_key {
        write!(natural, "|{name}={value}").unwrap();
    }
    let digest = Sha256::digest(natural.as_bytes());
    format!(
        "{}.{}.{}.{}",
        r.provider,
        scope,
        r.charge_period_start.format("%Y%m%dT%H%M%S"),
        &hex(&digest)[..24]
    )
}

/// SHA-256 of the billable fields, each followed by a 0 byte (times in RFC 3339, decimals
/// normalized), then every attribute as `name 1 value 0`; 32 hex.
fn hash_formula(r: &UsageRecord) -> String {
    let mut h = Sha256::new();
    for part in [
        r.charge_period_start.to_rfc3339().as_str(),
        r.charge_period_end.to_rfc3339().as_str(),
        &r.consumed_quantity.normalize().to_string(),
        &r.consumed_unit,
        &r.billed_cost.normalize().to_string(),
        &r.billing_currency,
        &r.billing_account_id,
        &r.sub_account_id,
        &r.resource_id,
        &r.service_name,
        r.sku_id.as_deref().unwrap_or(""),
        if r.is_final { "final" } else { "provisional" },
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    for (k, v) in &r.attributes {
        h.update(k.as_bytes());
        h.update([1u8]);
        h.update(v.as_bytes());
        h.update([0u8]);
    }
    hex(&h.finalize())[..32].to_string()
}

/// SHA-256 of `resource_name`, `resource_type`, `charge_description`, `sku_id`, each as a 0
/// byte when absent, else a 1 byte, its length (u64, little-endian) and its text; 32 hex.
fn match_formula(r: &UsageRecord) -> String {
    let mut h = Sha256::new();
    for field in [
        r.resource_name.as_deref(),
        Some(r.resource_type.as_str()),
        r.charge_description.as_deref(),
        r.sku_id.as_deref(),
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
    hex(&h.finalize())[..32].to_string()
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![
        // Whole seconds around now, the usual case.
        (1_500_000_000i64..2_000_000_000).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap()),
        // Sub-second.
        (1_500_000_000i64..2_000_000_000, 1u32..1_000_000_000)
            .prop_map(|(s, n)| Utc.timestamp_opt(s, n).unwrap()),
        // Leap seconds (chrono keeps them in the nanoseconds of a :59 second), their very
        // first nanosecond included.
        (
            25_000_000i64..33_333_333,
            prop_oneof![Just(1_000_000_000u32), 1_000_000_000u32..2_000_000_000]
        )
            .prop_map(|(m, n)| Utc.timestamp_opt(m * 60 + 59, n).unwrap()),
        // Years before 1000 and after 9999.
        (-62_000_000_000i64..-30_000_000_000).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap()),
        (253_402_300_800i64..300_000_000_000).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap()),
    ]
}

fn decimal() -> impl Strategy<Value = Decimal> {
    (any::<i64>(), 0u32..20).prop_map(|(m, scale)| Decimal::new(m, scale))
}

prop_compose! {
    fn record()(
        scope in ".{0,40}",
        source in "[a-z_]{1,12}",
        parts in proptest::collection::vec(("[a-z_]{1,10}", ".{0,20}"), 0..8),
        start in time(),
        end in time(),
        quantity in decimal(),
        cost in decimal(),
        sku in proptest::option::of(".{0,10}"),
        is_final in any::<bool>(),
        attributes in proptest::collection::btree_map(".{0,8}", ".{0,12}", 0..6),
    ) -> UsageRecord {
        UsageRecord {
            provider: "metalsoft".into(),
            source: source.into(),
            billing_account_id: "acct".into(),
            sub_account_id: scope.as_str().into(),
            resource_id: "instance:1".into(),
            resource_name: None,
            resource_type: "instance".into(),
            service_name: "compute".into(),
            sku_id: sku.map(Into::into),
            charge_description: None,
            charge_period_start: start,
            charge_period_end: end,
            consumed_quantity: quantity,
            consumed_unit: "seconds".into(),
            billed_cost: cost,
            billing_currency: "EUR".into(),
            scope: scope.into(),
            natural_key: parts.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            is_final,
            attributes: attributes
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect::<BTreeMap<_, _>>(),
            raw: Default::default(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn keys_and_hashes_are_the_documented_formulas(r in record()) {
        prop_assert_eq!(r.idempotency_key(), key_formula(&r));
        prop_assert_eq!(r.content_hash(), hash_formula(&r));
    }

    #[test]
    fn match_hashes_are_the_documented_formula(
        r in record(),
        name in proptest::option::of(".{0,30}"),
        kind in ".{0,12}",
        description in proptest::option::of(".{0,30}"),
    ) {
        let mut r = r;
        r.resource_name = name.map(Into::into);
        r.resource_type = kind.into();
        r.charge_description = description.map(Into::into);
        prop_assert_eq!(r.match_hash().to_string(), match_formula(&r));
    }
}

/// The key and both hashes of a record: two reads with the same three are the same record.
fn identity(r: &UsageRecord) -> (String, String, String) {
    (
        r.idempotency_key(),
        r.content_hash(),
        r.match_hash().to_string(),
    )
}

/// A mapping rule can match on every field of `MATCHABLE_FIELDS` and on attributes, copy them
/// into event properties, and the FOCUS export writes them: a re-read that changes only one of
/// them may map to another rule, customer or none. So each must change the key, the content
/// hash or the match hash, or the ledger takes the re-read for the record it already holds.
#[test]
fn every_field_a_rule_can_read_is_in_the_key_or_a_hash() {
    let base = UsageRecord {
        provider: "metalsoft".into(),
        source: "ms".into(),
        billing_account_id: "acct".into(),
        sub_account_id: "1".into(),
        resource_id: "instance:1".into(),
        resource_name: Some("acme-web".into()),
        resource_type: "instance".into(),
        service_name: "compute".into(),
        sku_id: Some("M.8.8".into()),
        charge_description: Some("instance-1".into()),
        charge_period_start: Utc.with_ymd_and_hms(2026, 10, 5, 0, 0, 0).unwrap(),
        charge_period_end: Utc.with_ymd_and_hms(2026, 10, 5, 1, 0, 0).unwrap(),
        consumed_quantity: Decimal::from(3600),
        consumed_unit: "seconds".into(),
        billed_cost: Decimal::new(50, 2),
        billing_currency: "EUR".into(),
        scope: "1".into(),
        natural_key: vec![("instance".into(), "1".into())],
        is_final: true,
        attributes: [("is_reservation".into(), "0".into())].into(),
        raw: Default::default(),
    };
    // Each field changed to another value, and each optional one to empty and to absent (a
    // condition tells them apart: an absent field matches nothing).
    let mut variants: Vec<(String, UsageRecord)> = Vec::new();
    for field in MATCHABLE_FIELDS
        .iter()
        .copied()
        .chain(["attributes.is_reservation"])
    {
        let texts: &[Option<&str>] = &[Some("other"), Some(""), None];
        for &text in texts {
            let mut r = base.clone();
            let required = text.unwrap_or("");
            match field {
                "provider" => r.provider = required.to_string().into(),
                "source" => r.source = required.into(),
                "billing_account_id" => r.billing_account_id = required.into(),
                "sub_account_id" => r.sub_account_id = required.into(),
                "resource_id" => r.resource_id = required.into(),
                "resource_name" => r.resource_name = text.map(Into::into),
                "resource_type" => r.resource_type = required.into(),
                "service_name" => r.service_name = required.to_string().into(),
                "sku_id" => r.sku_id = text.map(Into::into),
                "charge_description" => r.charge_description = text.map(Into::into),
                "consumed_unit" => r.consumed_unit = required.into(),
                "billing_currency" => r.billing_currency = required.into(),
                "attributes.is_reservation" => match text {
                    Some(t) => {
                        r.attributes.insert("is_reservation".into(), t.into());
                    }
                    None => {
                        r.attributes.remove("is_reservation");
                    }
                },
                other => panic!("a field rules can read that this test does not change: {other}"),
            }
            if r.field(field) != base.field(field) {
                variants.push((format!("{field} = {text:?}"), r));
            }
        }
    }
    for (what, r) in &variants {
        assert_ne!(
            identity(r),
            identity(&base),
            "{what}: taken for the same record"
        );
    }
    // Absent and empty are told apart for every optional field, the SKU included.
    let mut empty_sku = base.clone();
    empty_sku.sku_id = Some("".into());
    let mut no_sku = base.clone();
    no_sku.sku_id = None;
    assert_ne!(
        identity(&empty_sku),
        identity(&no_sku),
        "sku_id absent or empty"
    );
    assert!(
        variants.len() > 2 * MATCHABLE_FIELDS.len(),
        "{}",
        variants.len()
    );
}
