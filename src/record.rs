//! The canonical usage record every provider normalizes into.
//!
//! Field names follow FOCUS (FinOps Open Cost and Usage Specification) where a FOCUS column
//! exists, so the same record can feed an invoicing system and a FOCUS export. Money and
//! quantities are [`Decimal`] from the wire onwards: never a float.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One line of provider usage or cost, normalized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Provider kind, e.g. `metalsoft` (FOCUS `ProviderName`, lower-case).
    pub provider: String,
    /// The configured source this record came from (one provider kind may be configured twice).
    pub source: String,
    /// FOCUS `BillingAccountId`: the account the provider invoices.
    pub billing_account_id: String,
    /// FOCUS `SubAccountId`: the provider's user, owner or project inside the account.
    pub sub_account_id: String,
    /// FOCUS `ResourceId`.
    pub resource_id: String,
    /// FOCUS `ResourceName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<String>,
    /// FOCUS `ResourceType` (e.g. `instance`, `drive`).
    pub resource_type: String,
    /// FOCUS `ServiceName`: the provider's service or product family.
    pub service_name: String,
    /// FOCUS `SkuId`: the provider's product/SKU identifier, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku_id: Option<String>,
    /// FOCUS `ChargeDescription`: the provider's product label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge_description: Option<String>,
    /// FOCUS `ChargePeriodStart`, inclusive, UTC.
    pub charge_period_start: DateTime<Utc>,
    /// FOCUS `ChargePeriodEnd`, exclusive, UTC.
    pub charge_period_end: DateTime<Utc>,
    /// FOCUS `ConsumedQuantity`.
    pub consumed_quantity: Decimal,
    /// FOCUS `ConsumedUnit` as the provider names it (`seconds`, `gbytes`, ...).
    pub consumed_unit: String,
    /// FOCUS `BilledCost`, in `billing_currency`, exactly as the provider stated it.
    pub billed_cost: Decimal,
    /// FOCUS `BillingCurrency`, ISO 4217.
    pub billing_currency: String,
    /// Scope of the natural key (e.g. the MetalSoft user id): groups records in the ledger index.
    pub scope: String,
    /// The provider's natural key, as ordered `name=value` parts. Together with the provider and
    /// source it identifies the record across runs; the idempotency key is derived from it.
    pub natural_key: Vec<(String, String)>,
    /// Whether the provider will not change this record any more. Non-final records are held
    /// as `provisional` and re-read until they are final.
    pub is_final: bool,
    /// Provider-specific fields that mapping rules may match on (`attributes.<name>`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// The raw provider fields, kept for audit.
    #[serde(default)]
    pub raw: serde_json::Value,
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

impl UsageRecord {
    /// The value of a matchable field by name (`attributes.x` reads an attribute).
    /// `None` when the field is absent on this record; unknown names are rejected by the
    /// mapping loader before any record is seen.
    pub fn field(&self, name: &str) -> Option<&str> {
        if let Some(attr) = name.strip_prefix("attributes.") {
            return self.attributes.get(attr).map(String::as_str);
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
        let digest = Sha256::digest(self.natural_key_string().as_bytes());
        let hex = hex_prefix(&digest, 12);
        let scope: String = self
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
        format!(
            "{}.{}.{}.{}",
            self.provider,
            scope,
            self.charge_period_start.format("%Y%m%dT%H%M%S"),
            hex
        )
    }

    /// A hash of everything billable in the record: two reads of the same natural key with the
    /// same content hash are the same record; a different hash is a change to resolve.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.charge_period_start.to_rfc3339().as_str(),
            self.charge_period_end.to_rfc3339().as_str(),
            &self.consumed_quantity.normalize().to_string(),
            &self.consumed_unit,
            &self.billed_cost.normalize().to_string(),
            &self.billing_currency,
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
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        for (k, v) in &self.attributes {
            h.update(k.as_bytes());
            h.update([1u8]);
            h.update(v.as_bytes());
            h.update([0u8]);
        }
        hex_prefix(&h.finalize(), 16)
    }
}

fn hex_prefix(bytes: &[u8], n: usize) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(n * 2);
    for b in bytes.iter().take(n) {
        let _ = write!(s, "{b:02x}");
    }
    s
}
