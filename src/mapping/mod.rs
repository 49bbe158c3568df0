//! Mapping files: which provider record becomes which customer, metric and value.
//!
//! Loading, validating and applying are pure: the only I/O is reading the files.
//!
//! A wrong rule is a wrong invoice, so the format is small, strict and explicit: unknown keys,
//! unknown record fields, bad globs, unknown units and negative markups are load errors that
//! name `file:line:column`; rounding is always stated or has a documented default; a record no
//! rule covers is held as *unmapped* with a reason, never dropped and never guessed.
//!
//! # Format reference (version 1)
//!
//! ```yaml
//! version: 1                       # required
//!
//! customers:                       # who pays; first matching entry wins
//!   - match: { provider: metalsoft, sub_account_id: "1" }
//!     external_subscription_id: sub_acme_main     # required
//!     external_customer_id: acme                   # optional, for reports
//!
//! rules:                           # what is billed; first matching rule wins
//!   - name: instance-hours         # unique across all files; [A-Za-z0-9_.-]+
//!     match:                       # all conditions must hold; `{}` matches everything
//!       provider: metalsoft                        # exact (scalar)
//!       resource_type: { one_of: [instance] }      # one of several values
//!       charge_description: { glob: "instance-*" } # glob: * ? [abc]
//!       attributes.is_reservation: "0"             # provider extras
//!       consumed_unit: seconds
//!     metric: instance_hours       # Lago billable metric code
//!     property: hours              # the metric's field_name; default `value`
//!     value:
//!       quantity: { unit: hours }  # or { factor: 0.5 }, or {} for "as reported"
//!     round: { scale: 6, mode: half_up }
//!     properties:                  # extra event properties (strings)
//!       instance: "{resource_id}"  # {field} copies a record field; {{ }} are literal braces
//!       infrastructure: "{attributes.infrastructure_id}"
//!     target:                      # optional: bypass the customer table
//!       external_subscription_id: sub_internal
//!     sink: lago                   # optional: default sink otherwise
//!
//!   - name: drive-cost
//!     match: { resource_type: drive, billing_currency: GBP }
//!     metric: storage_cost
//!     value:
//!       cost: { markup_percent: 20 }   # billed_cost × 1.20; markup ≥ 0; `cost: {}` = no markup
//!
//!   - name: subnets-free
//!     match: { resource_type: subnet }
//!     ignore: true                 # deliberately not billed → outcome `ignored`
//! ```
//!
//! **Conditions.** Keys are record fields ([`crate::record::MATCHABLE_FIELDS`]) or
//! `attributes.<name>`; an unknown key is a load error with a "did you mean" hint. A plain
//! scalar matches the field's text exactly (quote values that are not plain words or integers:
//! `"1.50"`, `"007"`); an absent field matches no condition. A rule that can never match because
//! an earlier rule matches everything it does (e.g. after a `match: {}` catch-all) is a load
//! error.
//!
//! **Customer.** A rule's `target` wins; otherwise, among the customer entries whose `match`
//! holds and the account-directory row of the record's (`provider`, `sub_account_id`), the one
//! with the highest `priority` (default 0); ties go to the first in file order (files in load
//! order), inline entries before directory rows. Entries that can match one record, bill
//! differently (subscription, customer id or pricing) and share a priority are a load error,
//! so the tie-break only ever decides between entries that bill alike. No customer → unmapped (`no customer
//! matches sub_account_id=7`).
//!
//! **Account directory.** `customers_csv: accounts.csv` (relative to the YAML file), header
//! `provider,sub_account_id,external_subscription_id,external_customer_id[,priority]`; blank
//! lines and `#` lines are skipped. Each row is an exact-match entry, looked up through a hash
//! map. Duplicate accounts, empty ids, unknown columns: load errors with `file:line:column`.
//!
//! **Pricing** (cost values only). `cost:` takes `currency` (convert with the
//! `rates_csv` table: `from,to,rate,effective_from`, the latest rate effective at
//! `charge_period_start`), then `tiers` (each tier's `markup_percent` applies to the part of the
//! value inside the tier; credits are marked up by the same amount with their sign) or
//! `markup_percent`, then `commission_percent` (a share of the selling price: value ÷ (1 − p/100),
//! p < 100), then `markup_fixed` (added per record). A customer entry's `pricing:` applies the
//! same steps after the rule's. `minimum` (rule or customer; the larger wins) raises a
//! non-negative value to the minimum charge, never a credit (a negative `billed_cost`). Amounts are in the invoice currency. `tiers` and
//! `minimum` need an explicit `period:`: `record` (each record on its own) or `month` (the
//! calendar month of the event timestamp, UTC or at `period_utc_offset`: the month's total of
//! one subscription's metric is tiered and raised to the minimum by one adjustment event when
//! the month closes; records carry monthly tiers at their lowest rate and no monthly minimum —
//! see [`period`]).
//!
//! **Values.** `quantity` takes the record's `consumed_quantity`; `unit:` converts from the
//! record's `consumed_unit` (time: seconds, minutes, hours, days; data: bytes, kbytes/kb,
//! mbytes/mb, gbytes/gb, tbytes/tb — **decimal, 1 kb = 1000 bytes** — and binary kib, mib, gib,
//! tib). A conversion across dimensions is a load error when the rule's `match` pins
//! `consumed_unit` (exact or `one_of`), otherwise the record becomes unmapped with the reason.
//! `factor:` multiplies by a decimal > 0. `cost` takes `billed_cost` in the record's currency
//! (pin `billing_currency` in `match` so a currency change cannot slip through) times
//! `1 + markup_percent/100`. Arithmetic is exact `Decimal`; conversion multiplies before it
//! divides.
//!
//! **Rounding.** Applied once, to the final value. Default when `round` (or its `scale`) is
//! omitted: scale **6** for `quantity`; for `cost` the minor unit of the invoice currency (`cost.
//! currency`, else the record's `billing_currency`: JPY 0, GBP/EUR/USD 2, KWD 3; 2 when unknown);
//! mode **half_up** (midpoint away from zero). `round.mode` may
//! be `half_up`, `half_even`, `down` (toward zero), `up` (away from zero), `floor`, `ceiling`;
//! `scale` is 0 to 12. `billsync mappings validate` prints each rule's effective rounding
//! ([`MappingSet::summary`]).
//!
//! **Outcome.** [`MapOutcome::Mapped`] with `rule = "<file name>#<rule name>"` (the file name
//! without directories, so ids survive moving the mapping directory) and the timestamp =
//! `charge_period_start`; [`MapOutcome::Ignored`]; or [`MapOutcome::Unmapped`] with a reason
//! listing the record's key fields and those the rules look at. A `{field}` placeholder whose
//! field is absent on a record also makes it unmapped (an empty property could mis-group usage).
//!
//! **Checks.** Errors vs warnings are explained in `check.rs`: unreachable rules (an earlier
//! rule's conditions each contain this rule's: exact ⊂ one_of, exact/one_of ⊂ glob, `x*` ⊃
//! `xy*`) and ambiguous customers are errors; partly overlapping billing rules are warnings.
//! [`MappingSet::explain`] shows the same evaluation step by step; `cases` runs the test cases
//! next to the mappings; `remote` compares with the invoicing system's catalogue.

mod apply;
pub mod cases;
mod check;
mod csv;
mod examples;
mod load;
pub mod period;
pub mod remote;
pub mod schema;
pub mod units;

pub use apply::{ConditionFailure, CustomerCheck, Explanation, PricingStep, RuleCheck};
pub use examples::EXAMPLE_MAPPINGS;
pub use load::{MappingError, MappingErrors, MappingSummary};
pub use period::{PeriodPrice, PeriodShare, PeriodSpec};
pub use schema::json_schema_text;

use crate::record::Text;
use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A record after mapping: everything a sink needs to build its payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MappedEvent {
    /// The rule that matched, as `file#name`.
    pub rule: Text,
    /// The sink this event is for (`None`: the default sink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<Text>,
    /// Lago `external_subscription_id` (or the sink's equivalent target).
    pub external_subscription_id: Text,
    /// The customer, for reports (Lago routes by subscription only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_customer_id: Option<Text>,
    /// The billable metric code.
    pub metric_code: Text,
    /// The property carrying the value (the metric's `field_name`).
    pub value_property: Text,
    /// The value sent, after unit conversion or markup and rounding.
    pub value: Decimal,
    /// Extra event properties (strings).
    pub properties: BTreeMap<Text, Text>,
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

/// A validated set of mapping files, ready to [`apply`](MappingSet::apply).
#[derive(Debug, Clone, Default)]
pub struct MappingSet {
    files: Vec<String>,
    customers: Vec<LoadedCustomer>,
    directory: Directory,
    rates: Rates,
    rules: Vec<LoadedRule>,
    warnings: Vec<MappingError>,
}

/// A customer-table entry with the file and position it came from.
#[derive(Debug, Clone)]
struct LoadedCustomer {
    file: String,
    line: usize,
    column: usize,
    entry: schema::CustomerEntry,
}

impl LoadedCustomer {
    fn priority(&self) -> i64 {
        self.entry.priority.map_or(0, |p| p.0)
    }
}

/// One row of an account directory (`customers_csv`), as lookups and messages see it.
#[derive(Debug, Clone, Copy)]
struct DirectoryRow<'a> {
    file: &'a str,
    line: usize,
    provider: &'a str,
    sub_account_id: &'a str,
    subscription: &'a str,
    customer: Option<&'a str>,
    priority: i64,
}

/// Where one row's text lies in [`Directory::text`] (account, subscription, customer, one
/// after another), with its position and priority: 40 bytes, no allocation of its own.
#[derive(Debug, Clone)]
struct PackedRow {
    start: u32,
    account_len: u32,
    subscription_len: u32,
    /// 0: no customer (an empty cell is none).
    customer_len: u32,
    line: u32,
    file: u32,
    provider: u32,
    priority: i64,
}

/// The account directories of all files, packed: a reseller's directory has a row per end
/// user, and it stays in memory for the whole run. Rows keep their text in one string and the
/// hash index keeps row numbers only (a key is read back from its row): 18,210 accounts of
/// `billsync bench` take 1.5 MB instead of 3.8 MB with a `String` per field and keys copied
/// into maps (83 bytes per account, text included, instead of 210). A lookup hashes once,
/// allocates nothing and costs the same for 10 rows or 100,000.
#[derive(Debug, Clone, Default)]
struct Directory {
    text: String,
    rows: Vec<PackedRow>,
    files: Vec<String>,
    providers: Vec<String>,
    index: hashbrown::HashTable<u32>,
    hasher: std::hash::RandomState,
}

impl Directory {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn hash(&self, provider: &str, sub_account_id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one((provider, sub_account_id))
    }

    fn row(&self, i: usize) -> DirectoryRow<'_> {
        let r = &self.rows[i];
        let at = |from: u32, len: u32| &self.text[from as usize..(from + len) as usize];
        let account_end = r.start + r.account_len;
        let subscription_end = account_end + r.subscription_len;
        DirectoryRow {
            file: &self.files[r.file as usize],
            line: r.line as usize,
            provider: &self.providers[r.provider as usize],
            sub_account_id: at(r.start, r.account_len),
            subscription: at(account_end, r.subscription_len),
            customer: (r.customer_len > 0).then(|| at(subscription_end, r.customer_len)),
            priority: r.priority,
        }
    }

    fn iter(&self) -> impl Iterator<Item = DirectoryRow<'_>> {
        (0..self.rows.len()).map(|i| self.row(i))
    }

    /// The row of (`provider`, `sub_account_id`), if any.
    fn get(&self, provider: &str, sub_account_id: &str) -> Option<DirectoryRow<'_>> {
        let i = self.find(
            self.hash(provider, sub_account_id),
            provider,
            sub_account_id,
        )?;
        Some(self.row(i))
    }

    fn find(&self, hash: u64, provider: &str, sub_account_id: &str) -> Option<usize> {
        let &i = self.index.find(hash, |&i| {
            let row = self.row(i as usize);
            row.provider == provider && row.sub_account_id == sub_account_id
        })?;
        Some(i as usize)
    }

    /// The hash of row `i`'s key, for the index when it grows: the index keeps no keys.
    fn rehasher(&self) -> impl Fn(&u32) -> u64 + '_ {
        |&i| {
            let row = self.row(i as usize);
            self.hash(row.provider, row.sub_account_id)
        }
    }

    /// The number of the directory file `file`, added if new.
    fn file_number(&mut self, file: &str) -> u32 {
        number_of(&mut self.files, file)
    }

    /// Adds a row, or gives back the row that already has (`provider`, `sub_account_id`).
    /// Fails only when the directory outgrows its 32-bit offsets (4 GB of text).
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        file: u32,
        line: usize,
        provider: &str,
        sub_account_id: &str,
        subscription: &str,
        customer: Option<&str>,
        priority: i64,
    ) -> Result<Result<(), DirectoryRow<'_>>, DirectoryFull> {
        let hash = self.hash(provider, sub_account_id);
        if let Some(i) = self.find(hash, provider, sub_account_id) {
            return Ok(Err(self.row(i)));
        }
        let customer = customer.unwrap_or("");
        let len = |s: &str| u32::try_from(s.len()).map_err(|_| DirectoryFull);
        let packed = PackedRow {
            start: u32::try_from(self.text.len()).map_err(|_| DirectoryFull)?,
            account_len: len(sub_account_id)?,
            subscription_len: len(subscription)?,
            customer_len: len(customer)?,
            line: u32::try_from(line).map_err(|_| DirectoryFull)?,
            file,
            provider: number_of(&mut self.providers, provider),
            priority,
        };
        let number = u32::try_from(self.rows.len()).map_err(|_| DirectoryFull)?;
        let end = self.text.len() + sub_account_id.len() + subscription.len() + customer.len();
        if u32::try_from(end).is_err() {
            return Err(DirectoryFull);
        }
        self.text.push_str(sub_account_id);
        self.text.push_str(subscription);
        self.text.push_str(customer);
        self.rows.push(packed);
        // The index is taken out while it grows: growing rehashes rows through `self`.
        let mut index = std::mem::take(&mut self.index);
        index.insert_unique(hash, number, self.rehasher());
        self.index = index;
        Ok(Ok(()))
    }

    /// Gives back the room reserved while loading.
    fn shrink_to_fit(&mut self) {
        self.text.shrink_to_fit();
        self.rows.shrink_to_fit();
        let mut index = std::mem::take(&mut self.index);
        index.shrink_to_fit(self.rehasher());
        self.index = index;
    }
}

/// The directory's text passed 4 GB (its offsets are 32-bit).
#[derive(Debug)]
struct DirectoryFull;

/// The position of `name` in `names`, added at the end if absent (a handful of names).
fn number_of(names: &mut Vec<String>, name: &str) -> u32 {
    let i = match names.iter().position(|n| n == name) {
        Some(i) => i,
        None => {
            names.push(name.to_string());
            names.len() - 1
        }
    };
    i as u32
}

/// Rates of one currency pair: (effective_from, rate), sorted by date.
type DatedRates = Vec<(DateTime<Utc>, Decimal)>;

/// Effective-dated exchange rates: (from, to) → rates sorted by date.
#[derive(Debug, Clone, Default)]
struct Rates {
    by_pair: HashMap<(String, String), DatedRates>,
}

impl Rates {
    /// The rate in effect at `at`: the latest row with `effective_from <= at`.
    fn lookup(&self, from: &str, to: &str, at: DateTime<Utc>) -> Option<(DateTime<Utc>, Decimal)> {
        self.by_pair
            .get(&(from.to_string(), to.to_string()))?
            .iter()
            .rev()
            .find(|(d, _)| *d <= at)
            .copied()
    }
}

/// A rule with its id (`file#name`) and position, for messages.
#[derive(Debug, Clone)]
struct LoadedRule {
    id: String,
    file: String,
    line: usize,
    column: usize,
    rule: schema::Rule,
}

impl MappingSet {
    /// The loaded file names, in load order.
    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// Problems that do not stop loading (e.g. partially overlapping rules with different
    /// outcomes), as `file:line:column: message`.
    pub fn warnings(&self) -> &[MappingError] {
        &self.warnings
    }

    /// Rules that send to a sink not among `sinks` (the configured ones), as errors at the
    /// rule: a sync holds every record such a rule maps (status `unmapped`, with the reason).
    pub fn rules_naming_unknown_sinks(&self, sinks: &[String]) -> Vec<MappingError> {
        self.rules
            .iter()
            .filter_map(|r| {
                let sink = &r.rule.sink.as_ref()?.0;
                (!sinks.contains(sink)).then(|| MappingError {
                    file: r.file.clone(),
                    line: r.line,
                    column: r.column,
                    message: format!(
                        "rule {} sends to sink {sink:?}, which the settings do not configure (configured: {})",
                        r.id,
                        if sinks.is_empty() { "none".to_string() } else { sinks.join(", ") }
                    ),
                })
            })
            .collect()
    }

    /// Number of account-directory rows (`customers_csv`) loaded.
    pub fn directory_len(&self) -> usize {
        self.directory.len()
    }

    /// The rule ids (`file#name`), in evaluation order.
    pub fn rule_ids(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.id.as_str()).collect()
    }

    /// The embedded example mappings ([`EXAMPLE_MAPPINGS`]), validated.
    pub fn examples() -> Result<MappingSet, MappingErrors> {
        let sources: Vec<(String, String)> = EXAMPLE_MAPPINGS
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        MappingSet::from_sources(&sources)
    }
}

/// The rounding a rule uses: its `round`, completed by the documented defaults: scale 6 for
/// `quantity`, the minor unit of `currency` for `cost` (2 when the currency is unknown), mode
/// half_up. Returns (scale, mode).
fn effective_round(rule: &schema::Rule, currency: Option<&str>) -> (u32, schema::RoundMode) {
    let default_scale = match rule.value {
        Some(schema::ValueSpec::Cost(_)) => currency
            .and_then(schema::Currency::minor_units)
            .unwrap_or(2),
        _ => 6,
    };
    match rule.round {
        Some(r) => (r.scale.map_or(default_scale, |s| s.0), r.mode),
        None => (default_scale, schema::RoundMode::HalfUp),
    }
}

#[cfg(test)]
mod directory_tests {
    use super::*;

    /// A directory row stays small: it is held for every account of every run.
    #[test]
    fn a_packed_row_is_40_bytes() {
        assert!(std::mem::size_of::<PackedRow>() <= 40);
    }
}
