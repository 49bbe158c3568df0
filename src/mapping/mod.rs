//! Mapping files: which provider record becomes which customer, metric and value.
//!
//! Loading, validating and applying are pure: the only I/O is reading the files.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A record after mapping: everything a sink needs to build its payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MappedEvent {
    /// The rule that matched, as `file#name`.
    pub rule: String,
    /// The sink this event is for (`None`: the default sink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    /// Lago `external_subscription_id` (or the sink's equivalent target).
    pub external_subscription_id: String,
    /// The customer, for reports (Lago routes by subscription only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_customer_id: Option<String>,
    /// The billable metric code.
    pub metric_code: String,
    /// The property carrying the value (the metric's `field_name`).
    pub value_property: String,
    /// The value sent, after unit conversion or markup and rounding.
    pub value: Decimal,
    /// Extra event properties (strings).
    pub properties: BTreeMap<String, String>,
    /// The event timestamp: the record's charge period start, fixed at staging.
    pub timestamp: DateTime<Utc>,
}

/// The result of mapping one record.
#[derive(Debug, Clone, PartialEq)]
pub enum MapOutcome {
    /// A rule matched.
    Mapped(MappedEvent),
    /// A rule matched that says the record is deliberately not billed.
    Ignored { rule: String },
    /// No rule matched: the record is held in the ledger as `unmapped` with this reason.
    Unmapped { reason: String },
}
