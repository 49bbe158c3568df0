//! The FOCUS export: the normalized records as a FinOps FOCUS cost-and-usage CSV, one file
//! per batch, written like the JSON Lines sink ([`crate::sinks::jsonl`]: named after the
//! batch's first ledger id, atomic, superseded attempts removed, so a re-run never duplicates a
//! row; the ledger decides what was written).
//!
//! Why it looks the way it does:
//!
//! - **The row is frozen at staging.** [`FocusSink::encode_record`] builds the CSV row (quoted
//!   by the `csv` crate) from the normalized [`UsageRecord`] and the mapped event; the ledger
//!   stores it, and every file that ever holds the record holds these bytes. The header is not
//!   part of the payload: each file starts with the same header.
//! - **FOCUS 1.0 column IDs.** Every column is named as in the FOCUS 1.0 specification
//!   (`ProviderName`, `PublisherName`, `InvoiceIssuerName`, `ResourceId`, …); 1.1 and 1.2
//!   kept these names and added no mandatory column, so `version: "1.2"` writes the same file.
//!   Besides the mandatory columns the file has every conditional column that
//!   `focus-validator` 1.0.0 requires, null where billsync has no data (commitment discounts,
//!   regions, unit prices, `SkuPriceId`). CI runs that validator on the demo export
//!   (`scripts/focus-validate.sh`; the README says which rule it skips and why).
//! - **Time.** `ChargePeriodStart` is inclusive and `ChargePeriodEnd` exclusive, both UTC,
//!   ISO 8601 with `Z` (`2026-10-05T00:00:00Z`). The billing period is the calendar month (UTC)
//!   of `ChargePeriodStart`: the providers' own invoices are monthly.
//! - **Money.** Decimals are written as exact text. `BilledCost` is the provider's cost as
//!   stated; with no list price or commitment known, `EffectiveCost`, `ListCost` and
//!   `ContractedCost` equal it and the unit prices are empty (null). `ChargeCategory` is
//!   `Usage`, or `Credit` for a negative cost (SoftLayer credit and refund invoices), whose
//!   `ConsumedQuantity`/`ConsumedUnit` are null as FOCUS requires for non-usage rows.
//! - **Corrections are differences, so the file sums.** A correction record (ledger key
//!   `<key>.r<n>`) has `ChargeClass` `Correction`, `ChargeCategory` `Usage` and
//!   `x_CorrectionOf` = the corrected key. Its cost and quantity columns (and `x_BilledValue`)
//!   hold the difference to what was exported before for that key (the original plus earlier
//!   corrections): the pipeline computes it at staging from the ledger
//!   ([`crate::sync::Pipeline::correction`]). Summing `BilledCost` over an export gives the
//!   provider's latest total, as FOCUS asks ("the sum of the BilledCost … MUST match the sum
//!   of the invoices"), except for changes left to a person (`changes to resolve` in
//!   `billsync status`).
//! - **Extras.** Provider and billing columns that FOCUS lacks are `x_`-prefixed and come after
//!   every FOCUS column: `x_IdempotencyKey`, `x_CorrectionOf`, `x_Source`, `x_Subscription`,
//!   `x_Customer`, `x_Metric`, `x_ValueProperty`, `x_BilledValue`, `x_Rule`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;

use crate::mapping::MappedEvent;
use crate::record::UsageRecord;
use crate::sinks::jsonl::{
    check_batch_size, decimal_text, BatchFiles, FileSinkConfigError, DEFAULT_BATCH_SIZE,
};
use crate::sinks::{EncodeError, Outcome, Outgoing, Sink, SinkStopped};

/// The FOCUS version a sink declares. FOCUS 1.1 and 1.2 renamed none of the 1.0 columns billsync
/// writes and made none of their new columns mandatory, so both write the same columns; the
/// setting documents what a consumer expects and refuses versions billsync has not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FocusVersion {
    /// FOCUS 1.0 (the validated format).
    V1_0,
    /// FOCUS 1.2.
    V1_2,
}

impl FocusVersion {
    fn parse(sink: &str, text: &str) -> Result<Self, FileSinkConfigError> {
        match text.trim() {
            "1.0" => Ok(FocusVersion::V1_0),
            "1.2" => Ok(FocusVersion::V1_2),
            other => Err(FileSinkConfigError::Version {
                sink: sink.to_string(),
                got: other.to_string(),
            }),
        }
    }
}

/// The FOCUS columns, in file order, under their column IDs in FOCUS 1.0 (unchanged in 1.1 and
/// 1.2): every Mandatory column, every Conditional one `focus-validator` 1.0.0 requires, and
/// the Recommended `ChargeFrequency`.
pub const FOCUS_COLUMNS: &[&str] = &[
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
];

/// Provider and billing columns FOCUS has no name for, after the FOCUS columns.
pub const EXTRA_COLUMNS: &[&str] = &[
    "x_IdempotencyKey",
    "x_CorrectionOf",
    "x_Source",
    "x_Subscription",
    "x_Customer",
    "x_Metric",
    "x_ValueProperty",
    "x_BilledValue",
    "x_Rule",
];

/// The values FOCUS allows in `ServiceCategory`.
pub const SERVICE_CATEGORIES: &[&str] = &[
    "AI and Machine Learning",
    "Analytics",
    "Business Applications",
    "Compute",
    "Databases",
    "Developer Tools",
    "Multicloud",
    "Identity",
    "Integration",
    "Internet of Things",
    "Management and Governance",
    "Media",
    "Migration",
    "Mobile",
    "Networking",
    "Security",
    "Storage",
    "Web",
    "Other",
];

fn default_version() -> String {
    "1.0".into()
}

fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}

/// Settings of one FOCUS export sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FocusConfig {
    /// The directory the CSV files are written to (created when missing).
    pub directory: std::path::PathBuf,
    /// File name prefix, `[A-Za-z0-9_.-]+`. Default: the sink name.
    #[serde(default)]
    pub prefix: Option<String>,
    /// `"1.0"` (default, validated in CI) or `"1.2"`: the same columns (see [`FocusVersion`]).
    #[serde(default = "default_version")]
    pub version: String,
    /// Records per file, 1 to 100,000. Default 1000.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// `ProviderName`/`PublisherName`/`InvoiceIssuerName` per provider kind, e.g.
    /// `{metalsoft: "Bigstep"}`. Defaults: MetalSoft, IBM Cloud (SoftLayer), SAKURA Cloud,
    /// Jelastic; any other kind as written.
    #[serde(default)]
    pub provider_names: BTreeMap<String, String>,
    /// `ServiceCategory` per `ServiceName` (a FOCUS category such as `Compute`). Services not
    /// listed get a category guessed from the resource type and service name, else `Other`.
    #[serde(default)]
    pub service_categories: BTreeMap<String, String>,
}

/// Writes normalized records as FOCUS cost-and-usage CSV files.
#[derive(Debug)]
pub struct FocusSink {
    name: String,
    files: BatchFiles,
    version: FocusVersion,
    batch_size: usize,
    provider_names: BTreeMap<String, String>,
    service_categories: BTreeMap<String, String>,
    header: String,
}

impl FocusSink {
    /// Check the configuration and build the sink (the directory is created on first write).
    pub fn new(name: String, config: FocusConfig) -> Result<Self, FileSinkConfigError> {
        check_batch_size(&name, config.batch_size)?;
        let version = FocusVersion::parse(&name, &config.version)?;
        for category in config.service_categories.values() {
            if !SERVICE_CATEGORIES.contains(&category.as_str()) {
                return Err(FileSinkConfigError::ServiceCategory {
                    sink: name.clone(),
                    got: category.clone(),
                    allowed: SERVICE_CATEGORIES.join(", "),
                });
            }
        }
        let files = BatchFiles::new(&name, config.directory, config.prefix, "csv")?;
        let header = Self::header_line();
        Ok(FocusSink {
            name,
            files,
            version,
            batch_size: config.batch_size,
            provider_names: config.provider_names,
            service_categories: config.service_categories,
            header,
        })
    }

    /// The header line: FOCUS columns, then the `x_` extras.
    pub fn header_line() -> String {
        let mut columns = FOCUS_COLUMNS.to_vec();
        columns.extend_from_slice(EXTRA_COLUMNS);
        csv_line(columns.iter().copied()).unwrap_or_default()
    }

    /// The configured FOCUS version.
    pub fn version(&self) -> FocusVersion {
        self.version
    }

    /// The file writer (directory and names).
    pub fn files(&self) -> &BatchFiles {
        &self.files
    }

    fn provider_name(&self, kind: &str) -> String {
        if let Some(name) = self.provider_names.get(kind) {
            return name.clone();
        }
        match kind {
            "metalsoft" => "MetalSoft".into(),
            "softlayer" => "IBM Cloud (SoftLayer)".into(),
            "sakura" => "SAKURA Cloud".into(),
            "jelastic" => "Jelastic".into(),
            other => other.to_string(),
        }
    }

    fn service_category(&self, record: &UsageRecord) -> String {
        if let Some(c) = self.service_categories.get(&*record.service_name) {
            return c.clone();
        }
        guess_service_category(&record.resource_type, &record.service_name).to_string()
    }

    fn encode_error(&self, key: &str, message: impl Into<String>) -> EncodeError {
        EncodeError {
            sink: self.name.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// A `ServiceCategory` from words in the resource type and service name.
fn guess_service_category(resource_type: &str, service_name: &str) -> &'static str {
    let text = format!("{resource_type} {service_name}").to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    if has(&["database", "mysql", "postgres", "redis", "mongo"]) {
        "Databases"
    } else if has(&[
        "drive", "disk", "storage", "volume", "bucket", "backup", "archive", "object",
    ]) {
        "Storage"
    } else if has(&[
        "subnet",
        "network",
        "bandwidth",
        "traffic",
        "ip_",
        "ipv",
        "lan",
        "wan",
        "dns",
        "load balancer",
        "loadbalancer",
    ]) {
        "Networking"
    } else if has(&[
        "instance", "server", "compute", "cloudlet", "vm", "node", "cpu", "ram", "memory",
        "hardware",
    ]) {
        "Compute"
    } else {
        "Other"
    }
}

/// One CSV record without the line end.
fn csv_line<'a>(fields: impl IntoIterator<Item = &'a str>) -> Result<String, String> {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    w.write_record(fields).map_err(|e| e.to_string())?;
    let bytes = w.into_inner().map_err(|e| e.to_string())?;
    let mut line = String::from_utf8(bytes).map_err(|e| e.to_string())?;
    if line.ends_with('\n') {
        line.pop();
    }
    Ok(line)
}

/// ISO 8601 UTC with `Z`, whole seconds unless there is a sub-second part.
fn focus_time(t: DateTime<Utc>) -> String {
    crate::sinks::jsonl::utc_text(t)
}

/// The calendar month containing `t` at `offset` (the provider's invoice months, see
/// [`crate::providers::invoice_month_offset`]): `[first day 00:00, first day of next month)`
/// there, in UTC. A SAKURA month starts at 15:00 UTC the day before: taken in UTC, every
/// SAKURA bill would land in the previous billing period.
pub fn billing_period(
    t: DateTime<Utc>,
    offset: chrono::FixedOffset,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let local = t.with_timezone(&offset);
    let start = offset
        .with_ymd_and_hms(local.year(), local.month(), 1, 0, 0, 0)
        .single()?;
    let (y, m) = if local.month() == 12 {
        (local.year() + 1, 1)
    } else {
        (local.year(), local.month() + 1)
    };
    let end = offset.with_ymd_and_hms(y, m, 1, 0, 0, 0).single()?;
    Some((start.with_timezone(&Utc), end.with_timezone(&Utc)))
}

/// The corrected key of a correction key (`<key>.r<n>`).
pub fn corrected_key(key: &str) -> Option<&str> {
    let (base, revision) = key.rsplit_once(".r")?;
    (!base.is_empty() && !revision.is_empty() && revision.bytes().all(|b| b.is_ascii_digit()))
        .then_some(base)
}

fn money(d: Decimal) -> String {
    decimal_text(d)
}

#[async_trait]
impl Sink for FocusSink {
    fn kind(&self) -> &'static str {
        "focus"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        self.batch_size
    }

    /// FOCUS needs the normalized record: use [`Sink::encode_record`].
    fn encode(&self, key: &str, _event: &MappedEvent) -> Result<String, EncodeError> {
        Err(self.encode_error(
            key,
            "the FOCUS export needs the normalized record (encode_record)",
        ))
    }

    /// One CSV row in the column order of [`FocusSink::header_line`].
    fn encode_record(
        &self,
        key: &str,
        event: &MappedEvent,
        record: &UsageRecord,
    ) -> Result<String, EncodeError> {
        if key.trim().is_empty() {
            return Err(self.encode_error(key, "the ledger key is empty"));
        }
        if record.charge_period_end <= record.charge_period_start {
            return Err(self.encode_error(
                key,
                "ChargePeriodEnd must be after ChargePeriodStart (end exclusive)",
            ));
        }
        if record.billing_currency.trim().is_empty() {
            return Err(self.encode_error(key, "BillingCurrency is empty"));
        }
        if record.billing_account_id.trim().is_empty() {
            return Err(self.encode_error(key, "BillingAccountId is empty"));
        }
        let offset = crate::providers::invoice_month_offset(&record.provider);
        let (period_start, period_end) = billing_period(record.charge_period_start, offset)
            .ok_or_else(|| self.encode_error(key, "the billing period is out of range"))?;
        let correction_of = corrected_key(key);
        let provider = self.provider_name(&record.provider);
        let cost = money(record.billed_cost);
        let service_name = if record.service_name.trim().is_empty() {
            record.provider.to_string()
        } else {
            record.service_name.to_string()
        };
        let opt = |o: &Option<crate::record::Text>| o.as_deref().unwrap_or_default().to_string();
        // A correction restates usage whatever its sign (FOCUS: Usage is "positive or negative
        // charges … including refunds"); it sees only the difference, not the corrected cost.
        let credit = correction_of.is_none()
            && record.billed_cost.is_sign_negative()
            && !record.billed_cost.is_zero();
        // FOCUS 1.0: the consumed columns must be null for any ChargeCategory but Usage.
        let (consumed_quantity, consumed_unit) = if credit {
            (String::new(), String::new())
        } else {
            (
                decimal_text(record.consumed_quantity),
                record.consumed_unit.to_string(),
            )
        };

        // In the order of FOCUS_COLUMNS.
        let mut fields: Vec<String> = vec![
            cost.clone(),                                        // BilledCost
            record.billing_account_id.to_string(),               // BillingAccountId
            String::new(),                                       // BillingAccountName
            record.billing_currency.trim().to_ascii_uppercase(), // BillingCurrency
            focus_time(period_end),                              // BillingPeriodEnd
            focus_time(period_start),                            // BillingPeriodStart
            if credit {
                "Credit".into()
            } else {
                "Usage".into()
            }, // ChargeCategory
            if correction_of.is_some() {
                "Correction".into()
            } else {
                String::new()
            }, // ChargeClass
            opt(&record.charge_description),                     // ChargeDescription
            "Usage-Based".into(),                                // ChargeFrequency
            focus_time(record.charge_period_end),                // ChargePeriodEnd
            focus_time(record.charge_period_start),              // ChargePeriodStart
            String::new(),                                       // CommitmentDiscountCategory
            String::new(),                                       // CommitmentDiscountId
            String::new(),                                       // CommitmentDiscountName
            String::new(),                                       // CommitmentDiscountStatus
            String::new(),                                       // CommitmentDiscountType
            consumed_quantity,                                   // ConsumedQuantity
            consumed_unit,                                       // ConsumedUnit
            cost.clone(),                                        // ContractedCost
            String::new(),                                       // ContractedUnitPrice
            cost.clone(),                                        // EffectiveCost
            provider.clone(),                                    // InvoiceIssuerName
            cost,                                                // ListCost
            String::new(),                                       // ListUnitPrice
            String::new(),                                       // PricingCategory
            decimal_text(record.consumed_quantity),              // PricingQuantity
            record.consumed_unit.to_string(),                    // PricingUnit
            provider.clone(),                                    // ProviderName
            provider,                                            // PublisherName
            String::new(),                                       // RegionId
            String::new(),                                       // RegionName
            record.resource_id.to_string(),                      // ResourceId
            opt(&record.resource_name),                          // ResourceName
            record.resource_type.to_string(),                    // ResourceType
            self.service_category(record),                       // ServiceCategory
            service_name,                                        // ServiceName
            opt(&record.sku_id),                                 // SkuId
            String::new(),                                       // SkuPriceId
            record.sub_account_id.to_string(),                   // SubAccountId
            String::new(),                                       // SubAccountName
            String::new(),                                       // Tags
        ];
        debug_assert_eq!(fields.len(), FOCUS_COLUMNS.len());
        fields.extend([
            key.to_string(),
            correction_of.unwrap_or_default().to_string(),
            record.source.to_string(),
            event.external_subscription_id.to_string(),
            event
                .external_customer_id
                .as_deref()
                .unwrap_or_default()
                .to_string(),
            event.metric_code.to_string(),
            event.value_property.to_string(),
            decimal_text(event.value),
            event.rule.to_string(),
        ]);
        if fields.iter().any(|f| f.contains(['\n', '\r'])) {
            // A quoted line break is valid CSV, but line-oriented tools split on it; the
            // provider's text is not worth a broken export.
            for f in &mut fields {
                *f = f.replace(['\r', '\n'], " ");
            }
        }
        csv_line(fields.iter().map(String::as_str)).map_err(|e| self.encode_error(key, e))
    }

    async fn deliver(&self, batch: &[Outgoing]) -> Result<Vec<Outcome>, SinkStopped> {
        self.files.write(Some(&self.header), batch).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_period_is_the_month_at_the_providers_offset() {
        let utc = chrono::FixedOffset::east_opt(0).unwrap();
        let t = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        let (s, e) = billing_period(t, utc).unwrap();
        assert_eq!(focus_time(s), "2026-12-01T00:00:00Z");
        assert_eq!(focus_time(e), "2027-01-01T00:00:00Z");
        // SAKURA's September: 1 September 00:00 JST is 31 August 15:00 UTC.
        let jst = crate::providers::invoice_month_offset("sakura");
        let t = Utc.with_ymd_and_hms(2026, 8, 31, 15, 0, 0).unwrap();
        let (s, e) = billing_period(t, jst).unwrap();
        assert_eq!(focus_time(s), "2026-08-31T15:00:00Z");
        assert_eq!(focus_time(e), "2026-09-30T15:00:00Z");
        assert_eq!(crate::providers::invoice_month_offset("metalsoft"), utc);
    }

    #[test]
    fn correction_keys() {
        assert_eq!(
            corrected_key("metalsoft.1.x.abc.r1"),
            Some("metalsoft.1.x.abc")
        );
        assert_eq!(corrected_key("metalsoft.1.x.abc"), None);
        assert_eq!(corrected_key("a.rx"), None);
    }

    #[test]
    fn categories() {
        assert_eq!(guess_service_category("instance", "Instances"), "Compute");
        assert_eq!(guess_service_category("drive", "Drives"), "Storage");
        assert_eq!(guess_service_category("subnet", ""), "Networking");
        assert_eq!(guess_service_category("contract", "misc"), "Other");
    }
}
