//! The SQLite ledger: runs, cursors, the outbox of records, the run lock.
//!
//! All SQL of billsync lives in this module; nothing else writes to the database. The ledger is
//! the long-term authority on what was delivered: sinks deduplicate only for a while (Stripe:
//! 24 h) or only per subscription (Lago), so every record carries its idempotency key, its
//! status and the exact bytes it was (or will be) sent with.
//!
//! Durability: WAL with `synchronous=FULL`, so a commit survives a power cut; staging a page
//! of records and advancing its cursor happen in one transaction (outbox), and so does
//! acknowledging a batch.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, QueryBuilder, Row, Sqlite};

mod body;
mod period;
mod raw;

pub use period::{PeriodGroupKey, PeriodGroups, PeriodSnapshot};

use crate::providers::Cursors;
use crate::record::{MatchHash, Text, UsageRecord};
use crate::sinks::{Outcome, Outgoing};

/// Keys per `IN (…)` look-up.
const LOOKUP_KEYS_PER_STATEMENT: usize = 500;

/// What a [`Ledger::vacuum`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vacuumed {
    /// Records pruned by this vacuum.
    pub pruned: u64,
    /// Pages the VACUUM gave back to the file system (0 when none were free: no VACUUM ran).
    pub pages_freed: u64,
}

/// Errors of the ledger. They name the ledger file.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    // `cause` is shown, not chained: as a `source` it was printed again by every layer of an
    // error chain (three times the same SQLite message).
    #[error("ledger {path}: cannot open: {cause}{}", hint.as_deref().unwrap_or(""))]
    Open {
        path: PathBuf,
        cause: sqlx::Error,
        /// What the cause most likely means, when it can be told (a read-only directory).
        hint: Option<String>,
    },
    #[error(
        "ledger {path} does not exist (no sync has created it yet, or `ledger.path` is wrong)"
    )]
    Missing { path: PathBuf },
    #[error("ledger {path} was written by a newer billsync (it has schema migration {version} that this binary does not know); run a billsync at least as new as the one that wrote it")]
    Newer { path: PathBuf, version: i64 },
    #[error("ledger {path} has schema migration {version}, this billsync knows up to {known}: a command that only reads does not upgrade a ledger (the older billsync that runs your syncs would then refuse it); run this version's `billsync sync` to upgrade it, or read it with the version that wrote it")]
    Older {
        path: PathBuf,
        version: i64,
        known: i64,
    },
    #[error("ledger {path}: schema migration failed: {source}")]
    Migrate {
        path: PathBuf,
        source: sqlx::migrate::MigrateError,
    },
    #[error("ledger: {context}: {source}")]
    Sql {
        context: &'static str,
        source: sqlx::Error,
    },
    #[error("ledger: {context}: {source}")]
    Sqlite {
        context: &'static str,
        source: raw::RawError,
    },
    /// Writing one staged record failed: the whole staging transaction is rolled back (its
    /// cursor with it), so the page is pulled again on the next run.
    #[error("ledger: {context}, record {key}: {source}")]
    StageRecord {
        context: &'static str,
        key: String,
        source: raw::RawError,
    },
    #[error("ledger row {id} ({field}) is unreadable: {message}")]
    Corrupt {
        id: i64,
        field: &'static str,
        message: String,
    },
    #[error("another billsync run holds the ledger lock: holder {holder}, since {acquired_at}, expires {expires_at}")]
    Locked {
        holder: String,
        acquired_at: String,
        expires_at: String,
    },
    /// Staging would change pending records whose current payload a sink request of this run
    /// is carrying: nothing was written; stage again once they are acknowledged.
    #[error("ledger: records {ids:?} changed while a sink request carries them; staging waits for their acknowledgement")]
    InFlight { ids: Vec<i64> },
    /// `ledger mark-delivered` named a record it cannot mark so.
    #[error("ledger: record {key} cannot be marked delivered: {why}")]
    NotMarkable { key: String, why: String },
    /// `ledger resolve` named a change that does not wait for a person.
    #[error("ledger: change {id} does not wait for a person: {found} (`billsync ledger changes` lists those that do)")]
    NoOpenChange { id: i64, found: String },
    /// What went out for one record adds up beyond a decimal's range: that record's change
    /// waits for a person (staging) or its correction is held (replay); the others go on.
    #[error(
        "{key}: {what} is beyond the range of a decimal (±{}): resolve by hand",
        Decimal::MAX
    )]
    Overflow { key: String, what: String },
}

/// The records a [`RecordFilter`] selects, after id `?2`: status `?1`, source or provider
/// `?3`, charge period start from `?4` and before `?5`, last run `?6` (NULL: any). A macro so
/// that the statements using it stay literals.
macro_rules! matching {
    () => {
        "(?1 IS NULL OR r.status = ?1) AND r.id > ?2
           AND (?3 IS NULL OR source = ?3 OR provider = ?3)
           AND (?4 IS NULL OR charge_period_start >= ?4)
           AND (?5 IS NULL OR charge_period_start < ?5)
           AND (?6 IS NULL OR last_run = ?6)
           AND (?7 IS NULL OR r.idem_key = ?7)"
    };
}

/// Records `vacuum` prunes for a cutoff (`?1`): sent or ignored, old by charge period and send
/// time, not pruned yet.
const PRUNABLE_COUNT: &str = "SELECT COUNT(*) FROM records WHERE status IN ('sent', 'ignored')
       AND charge_period_start < ?1 AND COALESCE(sent_at, updated_at) < ?1
       AND id IN (SELECT id FROM record_bodies WHERE length(record) > 0)";

/// The lock a run found taken (the row of `locks`, or none when its lock was removed).
fn lock_taken(row: Option<sqlx::sqlite::SqliteRow>) -> LedgerError {
    let (holder, acquired_at, expires_at) = match row {
        Some(row) => (row.get(0), row.get(1), row.get(2)),
        None => (
            "nobody (this run's lock was removed)".into(),
            "-".into(),
            "-".into(),
        ),
    };
    LedgerError::Locked {
        holder,
        acquired_at,
        expires_at,
    }
}

fn sql(context: &'static str) -> impl FnOnce(sqlx::Error) -> LedgerError {
    move |source| LedgerError::Sql { context, source }
}

fn sqlite(context: &'static str) -> impl FnOnce(raw::RawError) -> LedgerError {
    move |source| LedgerError::Sqlite { context, source }
}

/// Format a timestamp the way the ledger stores it.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Status of a record in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Mapped and waiting to be sent (or retried).
    Pending,
    /// Acknowledged by the sink.
    Sent,
    /// No mapping rule matched: held until a mapping fix and `replay`.
    Unmapped,
    /// A rule says the record is not billed.
    Ignored,
    /// The provider may still change it: not sent until final.
    Provisional,
    /// The sink refused it for good: held with the sink's reason until `replay`.
    Rejected,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Pending,
        Status::Sent,
        Status::Unmapped,
        Status::Ignored,
        Status::Provisional,
        Status::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sent => "sent",
            Status::Unmapped => "unmapped",
            Status::Ignored => "ignored",
            Status::Provisional => "provisional",
            Status::Rejected => "rejected",
        }
    }

    /// Statuses that mean "money not yet where it belongs".
    pub fn is_undelivered(self) -> bool {
        matches!(self, Status::Pending | Status::Unmapped | Status::Rejected)
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown status {s:?}"))
    }
}

/// The mapping result stored with a record.
#[derive(Debug, Clone, Default)]
pub struct MappedColumns {
    pub rule: Option<Text>,
    pub sink: Option<Text>,
    pub subscription: Option<Text>,
    pub customer: Option<Text>,
    pub metric: Option<Text>,
    pub value: Option<Decimal>,
    /// The event property carrying the value (for read-back).
    pub value_property: Option<Text>,
    /// The frozen payload (only for records that will be sent).
    pub payload: Option<String>,
}

/// One record ready to be staged.
#[derive(Debug, Clone)]
pub struct StageRow {
    pub key: String,
    pub content_hash: String,
    /// [`UsageRecord::match_hash`] of `record` (computed before the row sheds the fields it
    /// covers): a re-read is the same record only when this agrees too.
    pub match_hash: MatchHash,
    pub record: UsageRecord,
    pub status: Status,
    pub mapped: MappedColumns,
    /// Why the record is held (unmapped reason), if it is.
    pub note: Option<String>,
    /// The mapped event the payload was built from (not stored; corrections re-encode it),
    /// kept only by rows no mapping rule rebuilds: corrections and period adjustments. A
    /// provider record's row goes without it (a dozen strings per record, carried to the
    /// stager); a correction maps its record again. Boxed: a row is moved by value a few
    /// times between the provider's page and the stager, and nearly every row has none.
    pub event: Option<Box<crate::mapping::MappedEvent>>,
    /// For a correction: the original record's id.
    pub correction_of: Option<i64>,
    /// 0 for an original record, n for its n-th correction.
    pub revision: i64,
    /// The stored form of `record` ([`StageRow::encode_body`]), when the mapping step already
    /// encoded it (it runs beside the ledger writes); `None`: the ledger encodes it.
    pub body: Option<Vec<u8>>,
}

impl StageRow {
    /// Encode `record` for storage now, off the ledger's path.
    pub fn encode_body(&mut self) -> Result<(), LedgerError> {
        self.body = Some(record_body(&self.record)?);
        Ok(())
    }

    /// Encode the body and drop from memory what staging does not write as a column: the raw
    /// provider fields and attributes (a parsed JSON object and a map per record, most of a
    /// row's memory), the natural key's parts, scope, names and description. The body keeps
    /// them all, so rows waiting for the stager take a fraction of the room. Staging a new
    /// record needs only the columns; the rare paths that need the whole record (a correction,
    /// a restage, a change of a sent record) call [`StageRow::full_record`], which decodes the
    /// body.
    pub fn encode_body_and_shed(&mut self) -> Result<(), LedgerError> {
        self.encode_body()?;
        let r = &mut self.record;
        r.raw = Default::default();
        r.attributes = Default::default();
        r.natural_key = Vec::new();
        r.scope = Default::default();
        r.resource_name = None;
        r.service_name = Default::default();
        r.sku_id = None;
        r.charge_description = None;
        Ok(())
    }

    /// The whole record, raw fields and attributes included: the row's own when it still has
    /// them, else decoded from the encoded body (see [`StageRow::encode_body_and_shed`]).
    /// (A body is the encoding of the whole record, so decoding it is right even for a record
    /// whose raw fields were null to begin with.)
    pub fn full_record(&self) -> Result<std::borrow::Cow<'_, UsageRecord>, LedgerError> {
        match &self.body {
            Some(body) if self.record.raw.is_null() => body::decode(body)
                .map(std::borrow::Cow::Owned)
                .map_err(|message| LedgerError::Corrupt {
                    id: 0,
                    field: "record",
                    message: format!("the encoded body of {}: {message}", self.key),
                }),
            _ => Ok(std::borrow::Cow::Borrowed(&self.record)),
        }
    }

    /// The stored form of the record: the body encoded beforehand, or encoded now.
    fn stored_body(&self) -> Result<std::borrow::Cow<'_, [u8]>, LedgerError> {
        match &self.body {
            Some(b) => Ok(std::borrow::Cow::Borrowed(b)),
            None => record_body(&self.record).map(std::borrow::Cow::Owned),
        }
    }
}

/// What was sent for a record so far, for deciding its correction.
#[derive(Debug, Clone)]
pub struct SentState {
    pub key: String,
    pub subscription: Option<String>,
    pub metric: Option<String>,
    pub sink: Option<String>,
    /// The event property the original's value went out under (the metric's `field_name`).
    pub value_property: Option<String>,
    /// The original's `billing_currency` as it was sent (the column keeps it: a change of a
    /// sent record updates only the content columns that corrections carry).
    pub billing_currency: Option<String>,
    /// The original value plus every correction that went or goes out (sent or pending, or
    /// held back after an unclear delivery: the sink may have it); a rejected, held or
    /// superseded correction does not count.
    pub sent_total: Decimal,
    /// The same sum of `billed_cost` and of `consumed_quantity`: the original's as sent plus
    /// the differences the corrections carry. `None` when `vacuum` pruned the original's
    /// record, so what was sent is no longer known.
    pub sent_cost: Option<Decimal>,
    pub sent_quantity: Option<Decimal>,
    /// The revision number the next correction gets.
    pub next_revision: i64,
}

/// The decision about a sent record that came back with new content.
#[derive(Debug, Clone)]
pub enum Correction {
    /// Stage this correction row. Its key, value and payload carry the difference, and so
    /// does its normalized record (`billed_cost`, `consumed_quantity`), so a sink that exports
    /// records (FOCUS) stays summable; `record_changes` keeps the full new content.
    Send {
        row: Box<StageRow>,
        difference: Decimal,
    },
    /// The new content bills the same value (e.g. a provisional record became final unchanged).
    NoDifference,
    /// A person must decide (the reason says why: unmapped now, target changed, ...).
    Unresolved(String),
}

/// What staging one page did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageCounts {
    /// Records never seen before.
    pub new: u64,
    /// Seen before with the same content: nothing to do.
    pub unchanged: u64,
    /// Seen before, never offered to a sink (held), with new content: restaged in place; or
    /// held with corrections (refused, or provisional and now final) and queued again as it
    /// was, its change corrected.
    pub restaged: u64,
    /// Ids of the records restaged in place (or queued again) that are now pending (a
    /// provisional record that became final, an unmapped one that maps now): they keep their
    /// old, lower ids, which a pusher walking pending records by id may have gone past. Not summed by [`Self::add`]:
    /// the caller takes them.
    pub restaged_pending: Vec<i64>,
    /// Seen before, pending or sent, with new content that needs a person: kept as unresolved.
    pub changed_after_send: u64,
    /// Correction records staged for pending or sent records whose content changed.
    pub corrections: u64,
    /// New or restaged rows per status.
    pub by_status: BTreeMap<&'static str, u64>,
    /// The key and reason of the first row staged (new or restaged) as unmapped: the run's
    /// one WARN about what it held names it.
    pub first_unmapped: Option<(String, String)>,
    /// Records (new, restaged to pending, or corrections) to be sent for a charge period that
    /// ended before the `late_before` given to staging ([`LateRecords`]).
    pub late: LateRecords,
}

/// Records going out for a charge period that ended before a given time, `late_before`: the
/// run's time minus the source's usual lateness (`Pipeline::late_after`). An invoicing system
/// may have finalized that period's invoice already (Lago then stores such a record without
/// billing it), so they are counted and reported. The one definition of *late*, for every
/// command that sends records (`sync` staging them, `replay` re-mapping them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LateRecords {
    /// How many.
    pub count: u64,
    /// The earliest end of their charge periods.
    pub oldest_end: Option<DateTime<Utc>>,
}

impl LateRecords {
    /// Count a record that now has `status`, for a charge period ending at `end`, if it goes
    /// to a sink (pending) for a period that ended before `late_before` (`None`: no check).
    /// Returns whether it was counted.
    pub fn note(
        &mut self,
        status: Status,
        end: DateTime<Utc>,
        late_before: Option<DateTime<Utc>>,
    ) -> bool {
        let late = status == Status::Pending && late_before.is_some_and(|t| end < t);
        if late {
            self.count += 1;
            self.oldest_end = Some(self.oldest_end.map_or(end, |o| o.min(end)));
        }
        late
    }

    /// Take in the late records counted elsewhere.
    pub fn add(&mut self, other: LateRecords) {
        self.count += other.count;
        self.oldest_end = match (self.oldest_end, other.oldest_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

impl StageCounts {
    pub fn add(&mut self, other: &StageCounts) {
        self.new += other.new;
        self.unchanged += other.unchanged;
        self.restaged += other.restaged;
        self.changed_after_send += other.changed_after_send;
        self.corrections += other.corrections;
        for (k, v) in &other.by_status {
            *self.by_status.entry(k).or_default() += v;
        }
        if self.first_unmapped.is_none() {
            self.first_unmapped.clone_from(&other.first_unmapped);
        }
        self.late.add(other.late);
    }

    /// Count `row`, new or restaged, under its status.
    fn count_status(&mut self, row: &StageRow) {
        *self.by_status.entry(row.status.as_str()).or_default() += 1;
        if row.status == Status::Unmapped && self.first_unmapped.is_none() {
            self.first_unmapped = Some((row.key.clone(), row.note.clone().unwrap_or_default()));
        }
    }

    /// Count `row` as late if it goes to a sink for a period that ended before `late_before`.
    fn count_late(&mut self, row: &StageRow, late_before: Option<DateTime<Utc>>) {
        self.late
            .note(row.status, row.record.charge_period_end, late_before);
    }
}

/// Which records to read back (replay, export).
#[derive(Debug, Clone)]
pub struct RecordFilter {
    /// Any status when `None`.
    pub status: Option<Status>,
    /// Source name or provider kind.
    pub provider: Option<String>,
    /// Charge period starting at or after.
    pub since: Option<DateTime<Utc>>,
    /// Charge period starting before.
    pub until: Option<DateTime<Utc>>,
    /// Last staged, mapped or attempted by this run.
    pub run: Option<i64>,
    /// This record only (its key): one record a person checked, among others of its run.
    pub key: Option<String>,
}

impl RecordFilter {
    /// Every record with `status`.
    pub fn status(status: Status) -> Self {
        RecordFilter {
            status: Some(status),
            provider: None,
            since: None,
            until: None,
            run: None,
            key: None,
        }
    }
}

/// A record read back for replay.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub id: i64,
    pub key: String,
    pub status: Status,
    /// A correction record's normalized record carries differences, not content.
    pub record: UsageRecord,
    /// For a correction: the original record's id.
    pub correction_of: Option<i64>,
}

/// What replay re-derives a correction from (see [`Ledger::correction_basis`]).
#[derive(Debug, Clone)]
pub struct CorrectionBasis {
    /// What went out for the original, without this correction; `next_revision` is this
    /// correction's own revision.
    pub sent: SentState,
    /// The original's latest content (`None`: its change history was pruned).
    pub latest: Option<UsageRecord>,
}

/// A change of a sent or queued record that waits for a person (`billsync ledger changes`):
/// what went out for the record, and what its new content is and why it cannot go out as a
/// correction. Decimals are text, exactly as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpenChange {
    /// The change's id (`billsync ledger resolve --change`).
    pub change: i64,
    pub record: i64,
    pub key: String,
    pub source: String,
    /// The record's status: `sent`, or `pending` (queued; it goes out as it was).
    pub status: String,
    /// Where and how the record was billed (or is queued to be).
    pub sent_sink: Option<String>,
    pub sent_subscription: Option<String>,
    pub sent_metric: Option<String>,
    pub sent_value_property: Option<String>,
    /// The original's value.
    pub sent_value: Option<String>,
    /// The original's value plus its corrections that went or go out.
    pub sent_total: Option<String>,
    /// The new content as the provider reported it.
    pub new_billed_cost: Option<String>,
    pub new_billing_currency: Option<String>,
    pub new_consumed_quantity: Option<String>,
    /// Why it needs a person (what the new content maps to instead).
    pub reason: Option<String>,
    /// When the new content was read, and by which run.
    pub seen_at: String,
    pub run: i64,
}

/// What `billsync ledger resolve` did.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The changes marked resolved.
    pub changes: Vec<i64>,
    pub record: i64,
    pub key: String,
    /// Changes of the record that still wait for a person.
    pub still_open: i64,
    /// Months (period groups) whose share of the record was confirmed and that are now due
    /// for settlement.
    pub months: Vec<String>,
    /// The audit line written.
    pub detail: String,
}

/// Counts and positions for `billsync status`.
#[derive(Debug, Clone, Default)]
pub struct LedgerStatus {
    /// (status, sink) → count, every record counted (through the status index, which holds
    /// both: no pass over the records themselves). The sink is `None` for records without one
    /// (unmapped, ignored). Per source: [`Ledger::counts_by_source`].
    pub by_status: BTreeMap<(String, Option<String>), i64>,
    pub cursors: Vec<CursorRow>,
    /// Changes of already-sent records that wait for a person (`unresolved`).
    pub open_changes: i64,
    /// Correction records staged so far.
    pub corrections: i64,
    /// The last runs, newest first.
    pub runs: Vec<RunRow>,
    /// Oldest undelivered record: (key, status, staged_at, last_error).
    pub oldest_undelivered: Option<(String, String, String, Option<String>)>,
    /// Current lock: (holder, acquired_at, expires_at).
    pub lock: Option<(String, String, String)>,
    /// Why records are held (unmapped, rejected) or failing (pending after a failed attempt):
    /// the largest groups of (status, source, resource type), at most [`HELD_REASONS_SHOWN`].
    pub held_reasons: Vec<HeldReason>,
    /// How many such groups there are in all (more than `held_reasons` lists when large).
    pub held_reason_groups: i64,
}

/// What a run's metrics show of the ledger: unlike [`LedgerStatus`], nothing that takes a
/// pass over every record ([`Ledger::gauges`]).
#[derive(Debug, Clone, Default)]
pub struct LedgerGauges {
    /// (source, status) → count, for the undelivered statuses (pending, unmapped, rejected).
    pub undelivered: BTreeMap<(String, String), i64>,
    pub cursors: Vec<CursorRow>,
    /// Changes of already-sent records that wait for a person (`unresolved`).
    pub open_changes: i64,
}

/// The statement behind [`LedgerGauges::undelivered`], public so that a test can check its
/// plan: it looks the undelivered statuses up in `records_by_status` (and reads only those
/// rows), where a `GROUP BY source, status` over the table reads every record.
pub const UNDELIVERED_BY_SOURCE: &str = "SELECT source, status, COUNT(*) FROM records \
     WHERE status IN ('pending', 'unmapped', 'rejected') GROUP BY source, status";

/// The statement behind [`LedgerStatus::by_status`], public so that a test can check its plan:
/// a scan of the status index alone (`COVERING INDEX`), never of the table.
pub const RECORDS_BY_STATUS_AND_SINK: &str =
    "SELECT status, sink, COUNT(*) FROM records GROUP BY status, sink";

/// How many groups of held records by reason `status` lists.
pub const HELD_REASONS_SHOWN: i64 = 10;

/// Undelivered records of one source and resource type that share a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldReason {
    pub status: String,
    pub source: String,
    pub resource_type: String,
    /// The reason of the oldest of them.
    pub reason: String,
    pub count: i64,
    /// When the oldest of them was staged.
    pub oldest_staged: String,
}

/// One record of a period, as reconciliation reads it.
#[derive(Debug, Clone)]
pub struct PeriodRow {
    pub key: String,
    pub source: String,
    pub billing_account_id: String,
    pub status: Status,
    pub billed_cost: Decimal,
    pub billing_currency: String,
    pub sink: Option<String>,
    pub subscription: Option<String>,
    pub metric: Option<String>,
    pub value: Option<Decimal>,
    pub value_property: Option<String>,
    /// A correction record (its provider cost is already counted on the original).
    pub is_correction: bool,
    /// Rejected by the push loop after an unclear delivery (`unclear_at`): the sink may have
    /// counted it (see [`Sink::dedup_window`](crate::sinks::Sink::dedup_window)).
    pub held_back_unclear: bool,
}

/// One stored cursor.
#[derive(Debug, Clone)]
pub struct CursorRow {
    pub source: String,
    pub stream: String,
    pub value: String,
    pub updated_at: String,
}

/// One run, as `billsync status` lists it.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: i64,
    pub command: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// `None` while running, or when the run crashed.
    pub outcome: Option<String>,
}

/// Totals of what a run sent, per (source, subscription, metric).
pub type SentTotals = BTreeMap<(String, String, String), Decimal>;

/// The ledger database.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: SqlitePool,
    /// The staging transactions' own connection (see [`Ledger::open`]).
    stage_pool: SqlitePool,
    path: PathBuf,
    /// The directory of a throwaway ledger ([`Ledger::open_scratch`]), removed with the last
    /// clone.
    scratch: Option<Arc<tempfile::TempDir>>,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Ledger {
    /// Open (and create or migrate) the ledger at `path`. Its directory must be writable:
    /// SQLite keeps the WAL beside the file.
    pub async fn open(path: &Path) -> Result<Ledger, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| LedgerError::Open {
                path: path.to_path_buf(),
                cause: sqlx::Error::Io(e),
                hint: None,
            })?;
        }
        let ledger = Ledger::connect(path, true).await?;
        ledger.migrate().await?;
        Ok(ledger)
    }

    /// The pools of a ledger file, without touching its schema.
    async fn connect(path: &Path, create: bool) -> Result<Ledger, LedgerError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // 16 KB pages (SQLite's default is 4 KB): a staged record writes a ~450-byte row,
            // a ~460-byte body and three index entries, and each WAL frame is one write of a
            // page, so larger pages mean a quarter of the frames and writes. Staging in
            // `billsync bench` went from 40–51k to 53–59k records/s. Only a new ledger takes
            // it: a database in WAL mode keeps the page size it was created with.
            .page_size(16384);
        // Staging looks every key up and inserts beside it: its connection keeps SQLite's
        // default page cache (2 MB), where the indexes' current pages stay. A 2,000-record
        // transaction writes a little more than that, so some pages spill into the WAL before
        // the commit; a 4 MB cache kept them in memory but moved the same writes into the
        // commit (measured: no less CPU, 2 MB more peak RSS). The others (reads,
        // acknowledgements, operations) do with half: a run pushes while it stages, and each
        // connection's cache fills up to its size (1M records in `billsync bench`: ~4 MB less
        // peak RSS). Connections are opened when first used.
        let stage_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(options.clone());
        // While a run stages, it reads pending records and acknowledges them; the third
        // connection is headroom.
        let pool = SqlitePoolOptions::new()
            .max_connections(3)
            .connect_with(options.pragma("cache_size", "-1024"))
            .await
            .map_err(|cause| LedgerError::Open {
                path: path.to_path_buf(),
                hint: read_only_hint(path),
                cause,
            })?;
        Ok(Ledger {
            pool,
            stage_pool,
            path: path.to_path_buf(),
            scratch: None,
        })
    }

    /// A new, empty ledger in a temporary directory, removed when the last clone is dropped: a
    /// dry run on a ledger that does not exist yet plans as the first sync would, and creates
    /// nothing where the settings point (a mistyped path, an unmounted volume).
    pub async fn open_scratch() -> Result<Ledger, LedgerError> {
        let dir = tempfile::Builder::new()
            .prefix("billsync-dry-run-")
            .tempdir()
            .map_err(|e| LedgerError::Open {
                path: std::env::temp_dir(),
                cause: sqlx::Error::Io(e),
                hint: None,
            })?;
        let mut ledger = Ledger::open(&dir.path().join("ledger.db")).await?;
        ledger.scratch = Some(Arc::new(dir));
        Ok(ledger)
    }

    /// Open a ledger that must exist already, for commands that only read it or move a cursor
    /// (`status`, `reconcile`, `ledger export`, `ledger set-cursor`, `explain --id`): a missing
    /// file is [`LedgerError::Missing`] and nothing is created; a ledger of an older schema is
    /// [`LedgerError::Older`] and is not upgraded (an older billsync, the one that runs the
    /// syncs, would then refuse it).
    pub async fn open_existing(path: &Path) -> Result<Ledger, LedgerError> {
        if !path.is_file() {
            return Err(LedgerError::Missing {
                path: path.to_path_buf(),
            });
        }
        let ledger = Ledger::connect(path, false).await?;
        let (version, known) = ledger.schema_versions().await?;
        if version > known {
            return Err(LedgerError::Newer {
                path: path.to_path_buf(),
                version,
            });
        }
        if version < known {
            return Err(LedgerError::Older {
                path: path.to_path_buf(),
                version,
                known,
            });
        }
        Ok(ledger)
    }

    /// The newest schema migration applied to this ledger (0 for none) and the newest this
    /// binary knows.
    async fn schema_versions(&self) -> Result<(i64, i64), LedgerError> {
        let known: i64 = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let has_table: Option<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(sql("reading the schema version"))?;
        if has_table.is_none() {
            return Ok((0, known));
        }
        let newest: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await
                .map_err(sql("reading the schema version"))?;
        Ok((newest.unwrap_or(0), known))
    }

    /// The file this ledger lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn migrate(&self) -> Result<(), LedgerError> {
        // A ledger from a newer binary has migrations this one does not know: refuse clearly
        // instead of running against a schema it does not understand.
        let (version, known) = self.schema_versions().await?;
        if version > known {
            return Err(LedgerError::Newer {
                path: self.path.clone(),
                version,
            });
        }
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|source| LedgerError::Migrate {
                path: self.path.clone(),
                source,
            })
    }

    /// Copy what the WAL holds into the database file, without waiting for readers or writers
    /// (a PASSIVE checkpoint; a busy one is skipped). A sync runs this beside its work (see
    /// `sync::Checkpoints`): SQLite's own checkpoint runs inside the commit that takes the WAL
    /// past 1,000 pages, so staging and acknowledging paid for it while holding up the run.
    pub async fn checkpoint(&self) -> Result<(), LedgerError> {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&self.pool)
            .await
            .map_err(sql("checkpointing the WAL"))?;
        Ok(())
    }

    /// Close the pool, checkpointing the WAL.
    pub async fn close(&self) {
        self.stage_pool.close().await;
        self.pool.close().await;
    }

    // ----- lock -------------------------------------------------------------------------

    /// Take the run lock, or report who holds it. A lock whose holder crashed expires after
    /// its `ttl`; a live holder refreshes it with [`Ledger::refresh_lock`].
    ///
    /// A holder named after a Kubernetes Job (`job:<name>/…`) also takes over an unexpired lock
    /// of the same Job held from another pod: that is an earlier attempt, which Kubernetes
    /// replaces only once its pod has failed (a Job with a pod failure policy replaces a pod
    /// only when it is fully terminated), always with a new pod (`restartPolicy: Never`), hence
    /// another host name. Without this, the retry of a run killed by the OOM killer found the
    /// dead run's lock for `lock_ttl` and failed the Job with exit 3, and `backoffLimit` never
    /// helped. The same Job in the same pod is a second sync started beside the live one
    /// (`kubectl exec`): it is refused like any other.
    pub async fn acquire_lock(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<(), LedgerError> {
        let expires = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
        // Look before writing: while another run holds SQLite's write lock for long (a `ledger
        // vacuum`'s prune or VACUUM), the write below would wait for the busy timeout and fail
        // ("database is locked": exit 1, retried), although the row already says who holds the
        // run lock (exit 3). Reading needs no write lock (WAL). The write still decides.
        let current =
            sqlx::query("SELECT holder, acquired_at, expires_at FROM locks WHERE name = 'sync'")
                .fetch_optional(&self.pool)
                .await
                .map_err(sql("reading the run lock"))?;
        let job = job_of(holder);
        let pod = pod_of(holder);
        if let Some(row) = current {
            let (other, until): (String, String) = (row.get(0), row.get(2));
            if other != holder && until > ts(now) {
                if job.is_some() && job == job_of(&other) && pod != pod_of(&other) {
                    tracing::warn!(
                        previous = %other,
                        "taking over the run lock of an earlier attempt of this Job (it ended: \
                         Kubernetes retried it)"
                    );
                } else {
                    return Err(lock_taken(Some(row)));
                }
            }
        }
        let done = sqlx::query(
            "INSERT INTO locks (name, holder, acquired_at, expires_at) VALUES ('sync', ?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                 acquired_at = excluded.acquired_at, expires_at = excluded.expires_at
             WHERE locks.expires_at <= excluded.acquired_at OR locks.holder = excluded.holder
                OR (?4 IS NOT NULL AND substr(locks.holder, 1, length(?4)) = ?4
                    AND substr(locks.holder, 1, length(?5)) <> ?5)",
        )
        .bind(holder)
        .bind(ts(now))
        .bind(ts(expires))
        .bind(job)
        .bind(pod)
        .execute(&self.pool)
        .await
        .map_err(sql("taking the run lock"))?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let row =
            sqlx::query("SELECT holder, acquired_at, expires_at FROM locks WHERE name = 'sync'")
                .fetch_one(&self.pool)
                .await
                .map_err(sql("reading the run lock"))?;
        Err(LedgerError::Locked {
            holder: row.get(0),
            acquired_at: row.get(1),
            expires_at: row.get(2),
        })
    }

    /// Extend the lock of a live run. A run whose lock expired and was taken by another run
    /// (or removed) no longer holds it: that is [`LedgerError::Locked`], and the run must stop
    /// writing.
    pub async fn refresh_lock(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<(), LedgerError> {
        let expires = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
        let done =
            sqlx::query("UPDATE locks SET expires_at = ?2 WHERE name = 'sync' AND holder = ?1")
                .bind(holder)
                .bind(ts(expires))
                .execute(&self.pool)
                .await
                .map_err(sql("refreshing the run lock"))?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let row =
            sqlx::query("SELECT holder, acquired_at, expires_at FROM locks WHERE name = 'sync'")
                .fetch_optional(&self.pool)
                .await
                .map_err(sql("reading the run lock"))?;
        Err(lock_taken(row))
    }

    /// Release the lock if this holder has it.
    pub async fn release_lock(&self, holder: &str) -> Result<(), LedgerError> {
        sqlx::query("DELETE FROM locks WHERE name = 'sync' AND holder = ?1")
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(sql("releasing the run lock"))?;
        Ok(())
    }

    // ----- runs and cursors ----------------------------------------------------------------

    /// Record the start of a run.
    pub async fn start_run(&self, command: &str, now: DateTime<Utc>) -> Result<i64, LedgerError> {
        let id = sqlx::query("INSERT INTO runs (command, started_at) VALUES (?1, ?2)")
            .bind(command)
            .bind(ts(now))
            .execute(&self.pool)
            .await
            .map_err(sql("recording the run start"))?
            .last_insert_rowid();
        Ok(id)
    }

    /// Record the end of a run with its outcome and JSON summary.
    pub async fn finish_run(
        &self,
        run_id: i64,
        outcome: &str,
        summary: &str,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        sqlx::query("UPDATE runs SET finished_at = ?2, outcome = ?3, summary = ?4 WHERE id = ?1")
            .bind(run_id)
            .bind(ts(now))
            .bind(outcome)
            .bind(summary)
            .execute(&self.pool)
            .await
            .map_err(sql("recording the run end"))?;
        Ok(())
    }

    /// Move one stored cursor by hand (`billsync ledger set-cursor`), in one transaction with
    /// its audit line. Returns the value it had, or `None` (nothing written) when the source
    /// has no such stream: a cursor is only ever created by a sync, never by a typo.
    pub async fn move_cursor(
        &self,
        run_id: i64,
        (source, stream, value): (&str, &str, &str),
        audit: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<String>, LedgerError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(sql("beginning a transaction"))?;
        let old: Option<String> =
            sqlx::query_scalar("SELECT value FROM cursors WHERE source = ?1 AND stream = ?2")
                .bind(source)
                .bind(stream)
                .fetch_optional(&mut *tx)
                .await
                .map_err(sql("reading a cursor"))?;
        if old.is_none() {
            return Ok(None);
        }
        upsert_cursor(&mut tx, run_id, source, stream, value, now).await?;
        write_audit(&mut tx, run_id, &ts(now), "set-cursor", audit).await?;
        tx.commit().await.map_err(sql("committing a cursor"))?;
        Ok(old)
    }

    /// The sources the ledger holds cursors of, in name order.
    pub async fn cursor_sources(&self) -> Result<Vec<String>, LedgerError> {
        sqlx::query_scalar("SELECT DISTINCT source FROM cursors ORDER BY source")
            .fetch_all(&self.pool)
            .await
            .map_err(sql("reading the sources of the cursors"))
    }

    /// The sources that have cursors in the ledger at `path`, read without opening it as a
    /// ledger (no migration: whatever billsync wrote it, old or new): `demo` checks that a
    /// directory it is pointed at holds its own ledger, not one a CronJob syncs. `None` when
    /// there is no file at `path`.
    pub async fn sources_at(path: &Path) -> Result<Option<Vec<String>>, LedgerError> {
        if !path.is_file() {
            return Ok(None);
        }
        let open = |cause| LedgerError::Open {
            path: path.to_path_buf(),
            hint: read_only_hint(path),
            cause,
        };
        let mut conn = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(open)?;
        let sources = sqlx::query_scalar("SELECT DISTINCT source FROM cursors ORDER BY source")
            .fetch_all(&mut conn)
            .await
            .map_err(open)?;
        let _ = conn.close().await;
        Ok(Some(sources))
    }

    /// The stored cursors of one source.
    ///
    /// Read on the raw handle: a source has a cursor per stream (a MetalSoft user), and for
    /// 18,000 streams decoding rows through sqlx took ~28 ms, most of a run with nothing new.
    pub async fn cursors(&self, source: &str) -> Result<Cursors, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(sql("connecting"))?;
        let mut handle = conn
            .lock_handle()
            .await
            .map_err(sql("locking the connection"))?;
        let raw = raw::Raw::new(&mut handle);
        let mut query = raw
            .prepare("SELECT stream, value FROM cursors WHERE source = ?1")
            .map_err(sqlite("reading cursors"))?;
        query.text(1, source).map_err(sqlite("reading cursors"))?;
        let mut cursors = Cursors::new();
        while let Some(row) = query.next_row().map_err(sqlite("reading cursors"))? {
            let (Some(stream), Some(value)) = (row.text(0), row.text(1)) else {
                return Err(LedgerError::Corrupt {
                    id: 0,
                    field: "cursors",
                    message: format!("a cursor of {source} is NULL or not UTF-8"),
                });
            };
            cursors.insert(stream.to_owned(), value.to_owned());
        }
        Ok(cursors)
    }

    /// Store a cursor on its own (a page with nothing to stage still moves the cursor).
    pub async fn set_cursor(
        &self,
        run_id: i64,
        source: &str,
        stream: &str,
        value: &str,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(sql("beginning a transaction"))?;
        upsert_cursor(&mut tx, run_id, source, stream, value, now).await?;
        tx.commit().await.map_err(sql("committing a cursor"))?;
        Ok(())
    }

    // ----- staging (outbox) ----------------------------------------------------------------

    /// Look up which keys exist, with their status and hashes as stored.
    pub async fn existing(
        &self,
        keys: &[&str],
    ) -> Result<HashMap<String, KnownRecord>, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(sql("connecting"))?;
        let mut handle = conn
            .lock_handle()
            .await
            .map_err(sql("locking the connection"))?;
        lookup(&mut handle, keys.iter().copied())
    }

    /// What the ledger holds for the keys of `rows`, as staging compares them (for dry runs):
    /// [`KnownRecord::holds`] says whether a row is the content already held. Writes nothing.
    pub async fn known(
        &self,
        rows: &[StageRow],
    ) -> Result<HashMap<String, KnownRecord>, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(sql("connecting"))?;
        let mut handle = conn
            .lock_handle()
            .await
            .map_err(sql("locking the connection"))?;
        let mut known = lookup(&mut handle, rows.iter().map(|r| r.key.as_str()))?;
        resolve_unhashed(&mut handle, &mut known, rows.iter())?;
        Ok(known)
    }

    /// Whether a held record (not pending, not sent) whose content changed is staged as a
    /// correction and left as it is, as [`Ledger::stage`] does: it has corrections, or the push
    /// loop held it back after an unclear delivery. Read only: a dry run's preview.
    pub async fn changes_go_out_as_corrections(&self, id: i64) -> Result<bool, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(sql("connecting"))?;
        Ok(held_back(&mut conn, id).await? || has_corrections(&mut conn, id).await?)
    }

    /// Stage a page of records and advance its cursor, in one transaction.
    ///
    /// A key seen before with the same content (content hash and match hash: see
    /// [`KnownRecord::holds`]) is a no-op; with different content it is
    /// restaged in place while held (unmapped, ignored, provisional, rejected: never offered to
    /// a sink, or refused by it) and without corrections. Once pending or sent, its frozen
    /// payload is never overwritten (a pending one may be at the sink already): `correct`
    /// decides, from what was sent or goes out so far, whether a correction record carrying the
    /// difference is staged beside it (same transaction), or there is nothing to send, or a
    /// person must resolve the change. So does a held record with corrections (queued when it
    /// changed, refused or re-mapped since), whose value its corrections were measured
    /// against; a refused one is queued again as it was.
    pub async fn stage(
        &self,
        run_id: i64,
        rows: &[StageRow],
        cursor: Option<(&str, &str, &str)>,
        now: DateTime<Utc>,
        correct: &(dyn Fn(&StageRow, &SentState) -> Correction + Sync),
    ) -> Result<StageCounts, LedgerError> {
        let cursors: Vec<(&str, &str, &str)> = cursor.into_iter().collect();
        let rows: Vec<&StageRow> = rows.iter().collect();
        self.stage_pages(run_id, &rows, &[], &cursors, now, correct, &|_| false, None)
            .await
    }

    /// [`Ledger::stage`] for several pages at once: their records and every page's cursor
    /// (`(source, stream, value)`, in page order) in one transaction.
    ///
    /// `in_flight(id)` says whether a sink request of this run carries record `id`'s current
    /// payload (records are pushed while later pages are still staged). Such a record must not
    /// be restaged: its acknowledgement would then mark the new content as sent although the
    /// sink received the old one under the same key. If a page would restage one, nothing is
    /// written and [`LedgerError::InFlight`] names them; the caller stages the same rows again
    /// once they are acknowledged (and, sent by then, their change becomes a correction). The
    /// caller keeps the set from changing while this runs.
    ///
    /// `shares` are the month shares [`Ledger::register_period_shares`] left to staging (new
    /// content of sent or pending records). A row's share is kept here, in this transaction,
    /// when its new content goes out: corrected, nothing to correct, or restaged (a pending
    /// record refused meanwhile); a change left to a person keeps the share of what was sent.
    #[allow(clippy::too_many_arguments)]
    pub async fn stage_pages(
        &self,
        run_id: i64,
        rows: &[&StageRow],
        shares: &[PeriodShareRow],
        cursors: &[(&str, &str, &str)],
        now: DateTime<Utc>,
        correct: &(dyn Fn(&StageRow, &SentState) -> Correction + Sync),
        in_flight: &(dyn Fn(i64) -> bool + Sync),
        late_before: Option<DateTime<Utc>>,
    ) -> Result<StageCounts, LedgerError> {
        let now_s = ts(now);
        let mut counts = StageCounts::default();
        // IMMEDIATE: the write lock is held from the start, so the ids handed out below from
        // MAX(id) cannot be taken by another writer meanwhile.
        let mut tx = self
            .stage_pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(sql("beginning a transaction"))?;

        let mut known = {
            let mut handle = tx
                .lock_handle()
                .await
                .map_err(sql("locking the connection for staging"))?;
            let mut known = lookup(&mut handle, rows.iter().map(|r| r.key.as_str()))?;
            resolve_unhashed(&mut handle, &mut known, rows.iter().copied())?;
            known
        };
        // Before anything is written: a restage of a record a sink request carries waits.
        let mut carried: Vec<i64> = rows
            .iter()
            .filter_map(|row| match known.get(&row.key) {
                Some(k) if k.status != Status::Sent && !k.holds(row) && in_flight(k.id) => {
                    Some(k.id)
                }
                _ => None,
            })
            .collect();
        if !carried.is_empty() {
            carried.sort_unstable();
            carried.dedup();
            return Err(LedgerError::InFlight { ids: carried });
        }
        // Rows to insert, by key: a key repeated inside one page keeps its last content.
        let mut inserts: Vec<&StageRow> = Vec::new();
        let mut corrections: Vec<StageRow> = Vec::new();
        let mut changes: Vec<ChangeSeen> = Vec::new();
        let mut insert_at: hashbrown::HashMap<&str, usize> =
            hashbrown::HashMap::with_capacity(rows.len());
        // Rows staged before `match_hash` existed, read again unchanged: their hash is stored.
        let mut hash_now: Vec<(i64, MatchHash)> = Vec::new();
        // Month shares of the content staged (of the rows `shares` has one for), and whether
        // the record is frozen (see `follow_share`).
        let mut follow: Vec<(&PeriodShareRow, bool)> = Vec::new();
        let mut shares_by_key: hashbrown::HashMap<&str, Vec<&PeriodShareRow>> =
            hashbrown::HashMap::with_capacity(shares.len());
        for s in shares {
            shares_by_key.entry(s.key.as_str()).or_default().push(s);
        }
        let share_of =
            |row: &StageRow| {
                shares_by_key.get(row.key.as_str()).and_then(|of_key| {
                    of_key.iter().rev().copied().find(|s| {
                        s.content_hash == row.content_hash && s.match_hash == row.match_hash
                    })
                })
            };

        // A known key that these rows repeat (a provider repeating a record in one answer) is
        // staged once, with its last content: its changes compared one by one against the
        // ledger would each become a correction of the same original (under the same next
        // revision, which the unique key refuses, failing the whole page on every run).
        // Only known keys are indexed: a page of new records (the common case) adds nothing.
        let mut last_of: hashbrown::HashMap<&str, usize> = hashbrown::HashMap::new();
        for (i, row) in rows.iter().enumerate() {
            if known.contains_key(&row.key) {
                last_of.insert(row.key.as_str(), i);
            }
        }
        for (at, &row) in rows.iter().enumerate() {
            if last_of
                .get(row.key.as_str())
                .is_some_and(|&last| last != at)
            {
                continue;
            }
            if let Some(&i) = insert_at.get(row.key.as_str()) {
                if inserts[i].content_hash == row.content_hash
                    && inserts[i].match_hash == row.match_hash
                {
                    counts.unchanged += 1;
                } else {
                    inserts[i] = row;
                }
                continue;
            }
            // A held record with corrections (it was queued when it changed, and refused or
            // re-mapped since): they carry differences measured against its value, and `replay`
            // counts on that value (it sends a refused original again from its frozen body,
            // and re-derives a refused correction as the latest content minus the original and
            // the corrections that went out). Rewritten in place with its whole new content,
            // the line would be billed that plus the corrections that went out, and a refused
            // one replayed would be measured against content it was not derived from. So it is
            // treated as a queued record: the change goes out as a further correction (or
            // waits for a person), and a refused original is queued again as it was (below).
            // So is one the push loop held back after an unclear delivery (`held`): the sink
            // may have counted what it sent, so its new content goes out as a correction of
            // that, and the record itself stays held back for a person (who marks it delivered
            // or replays it: either way the total comes right).
            let (chained, held) = match known.get(&row.key) {
                Some(k) if !k.holds(row) && !matches!(k.status, Status::Sent | Status::Pending) => {
                    let held = held_back(&mut tx, k.id).await?;
                    (held || has_corrections(&mut tx, k.id).await?, held)
                }
                _ => (false, false),
            };
            match known.get(&row.key) {
                None => {
                    insert_at.insert(&row.key, inserts.len());
                    inserts.push(row);
                }
                Some(k) if k.holds(row) => {
                    counts.unchanged += 1;
                    if k.unhashed {
                        hash_now.push((k.id, row.match_hash));
                    }
                }
                // Sent, or pending: a pending record's payload may be at a sink already (a
                // delivery whose answer was lost, or a crash before its acknowledgement) under
                // the record's key, which the sink would refuse to take again with new content.
                // So its payload is frozen as a sent one is, and a change goes out as a
                // correction; only what no sink was ever offered (or what it refused) is
                // restaged in place, unless it has corrections (`chained`).
                Some(k) if matches!(k.status, Status::Sent | Status::Pending) || chained => {
                    let (id, original) = (k.id, k.status);
                    let (decision, next_revision) = match sent_state(&mut tx, id, None).await {
                        Ok(sent) => (correct(row, &sent), sent.next_revision),
                        // This record's sums leave a decimal's range: a person decides, the
                        // page goes on.
                        Err(e @ LedgerError::Overflow { .. }) => {
                            (Correction::Unresolved(e.to_string()), 0)
                        }
                        Err(e) => return Err(e),
                    };
                    if !matches!(decision, Correction::Unresolved(_)) {
                        // What goes out now bills this content: the share follows it.
                        follow.extend(share_of(row).map(|s| (s, true)));
                    }
                    let (state, difference, note) = match &decision {
                        Correction::Send { row: c, difference } => {
                            corrections.push(StageRow {
                                correction_of: Some(id),
                                revision: next_revision,
                                ..(**c).clone()
                            });
                            counts.corrections += 1;
                            counts.count_late(c, late_before);
                            ("corrected", Some(difference.to_string()), None)
                        }
                        Correction::NoDifference => ("no_difference", None, None),
                        Correction::Unresolved(reason) => {
                            counts.changed_after_send += 1;
                            ("unresolved", None, Some(reason.clone()))
                        }
                    };
                    // The original keeps its frozen payload, value and record_json (what was
                    // sent); the content columns follow the latest content seen, so the same new
                    // content read again is a no-op and reports show the provider's latest cost.
                    sqlx::query(
                        "UPDATE records SET content_hash = ?2, last_run = ?3, updated_at = ?4,
                             billed_cost = ?5, consumed_quantity = ?6, is_final = ?7,
                             match_hash = ?8
                         WHERE id = ?1",
                    )
                    .bind(id)
                    .bind(&row.content_hash)
                    .bind(run_id)
                    .bind(&now_s)
                    .bind(row.record.billed_cost.to_string())
                    .bind(row.record.consumed_quantity.to_string())
                    .bind(row.record.is_final)
                    .bind(row.match_hash.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(sql("recording the latest content of a sent record"))?;
                    changes.push(ChangeSeen {
                        record_id: id,
                        row,
                        state,
                        difference,
                        note,
                    });
                    // A refused original with corrections goes out again as it was (a refused
                    // record with new content is tried again), and so does a provisional one
                    // once its content is final: with its corrections, what goes out adds up to
                    // the latest content (or to what was sent, for a change left to a person).
                    // An unmapped or ignored one has no payload: `replay` sends it from its
                    // frozen body (and its change waits for a person: it maps to nothing sent).
                    let requeue = (original == Status::Rejected && !held)
                        || (original == Status::Provisional && row.status == Status::Pending);
                    let status =
                        if requeue && requeue_as_it_was(&mut tx, id, run_id, &now_s).await? {
                            counts.restaged += 1;
                            counts.restaged_pending.push(id);
                            counts.count_late(row, late_before);
                            *counts
                                .by_status
                                .entry(Status::Pending.as_str())
                                .or_default() += 1;
                            Status::Pending
                        } else {
                            original
                        };
                    known.insert(row.key.clone(), KnownRecord::of(id, status, row));
                }
                Some(k) => {
                    let id = k.id;
                    // Held (the look-up above is in this transaction), so it is restaged.
                    restage(&mut tx, id, row, run_id, &now_s).await?;
                    // Frozen when its share was registered, refused by its sink since.
                    follow.extend(share_of(row).map(|s| (s, false)));
                    counts.restaged += 1;
                    if row.status == Status::Pending {
                        counts.restaged_pending.push(id);
                        counts.count_late(row, late_before);
                    }
                    counts.count_status(row);
                    known.insert(row.key.clone(), KnownRecord::of(id, row.status, row));
                }
            }
        }

        counts.new += inserts.len() as u64;
        for r in &inserts {
            counts.count_status(r);
            counts.count_late(r, late_before);
        }
        inserts.extend(corrections.iter());
        // Ids are given here, in order, so that the bodies can be written beside their rows
        // without reading ids back.
        let next_id: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) + 1 FROM records")
            .fetch_one(&mut *tx)
            .await
            .map_err(sql("reading the next record id"))?;
        if !inserts.is_empty() || !hash_now.is_empty() {
            let mut handle = tx
                .lock_handle()
                .await
                .map_err(sql("locking the connection for staging"))?;
            insert_staged(&mut handle, &inserts, next_id, run_id, &now_s)?;
            store_match_hashes(&mut handle, &hash_now)?;
        }
        for ChangeSeen {
            record_id: id,
            row,
            state,
            difference,
            note,
        } in changes
        {
            let correction_id: Option<i64> = if state == "corrected" {
                sqlx::query_scalar("SELECT MAX(id) FROM records WHERE correction_of = ?1")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(sql("linking a correction"))?
            } else {
                None
            };
            sqlx::query(
                "INSERT INTO record_changes (record_id, content_hash, record_json, run_id, seen_at,
                     state, difference, correction_id, note)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .bind(id)
            .bind(&row.content_hash)
            .bind(record_json(&*row.full_record()?)?)
            .bind(run_id)
            .bind(&now_s)
            .bind(state)
            .bind(difference)
            .bind(correction_id)
            .bind(note)
            .execute(&mut *tx)
            .await
            .map_err(sql("keeping a change of a sent record"))?;
        }

        for (share, frozen) in follow {
            follow_share(&mut tx, share, frozen).await?;
        }

        for (source, stream, value) in cursors {
            upsert_cursor(&mut tx, run_id, source, stream, value, now).await?;
        }
        tx.commit()
            .await
            .map_err(sql("committing staged records"))?;
        Ok(counts)
    }

    /// Change the mapping of one stored record (replay), keeping its key and content. Only a
    /// held record (never offered to a sink) changes; a pending or sent one keeps its frozen
    /// payload. A person asked for it: an earlier unclear delivery no longer holds it back
    /// (`unclear_at` cleared, see [`Sink::dedup_window`](crate::sinks::Sink::dedup_window)).
    pub async fn remap(
        &self,
        run_id: i64,
        id: i64,
        status: Status,
        mapped: &MappedColumns,
        note: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(sql("beginning a transaction"))?;
        let changed = sqlx::query(
            "UPDATE records SET status = ?2, rule = ?3, sink = ?4, subscription = ?5, customer = ?6,
                 metric = ?7, value = ?8, last_error = ?9, attempts = 0,
                 last_run = ?10, updated_at = ?11, value_property = ?12, unclear_at = NULL
             WHERE id = ?1 AND status NOT IN ('sent', 'pending')",
        )
        .bind(id)
        .bind(status.as_str())
        .bind(mapped.rule.as_deref())
        .bind(mapped.sink.as_deref())
        .bind(mapped.subscription.as_deref())
        .bind(mapped.customer.as_deref())
        .bind(mapped.metric.as_deref())
        .bind(mapped.value.map(|v| v.to_string()))
        .bind(note)
        .bind(run_id)
        .bind(ts(now))
        .bind(mapped.value_property.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(sql("re-mapping a record"))?
        .rows_affected();
        if changed > 0 {
            sqlx::query("UPDATE record_bodies SET payload = ?2 WHERE id = ?1")
                .bind(id)
                .bind(&mapped.payload)
                .execute(&mut *tx)
                .await
                .map_err(sql("re-mapping a record"))?;
        }
        tx.commit().await.map_err(sql("committing a re-mapping"))?;
        Ok(())
    }

    /// Records with a status, in id order after `after_id` (paged, for replay).
    pub async fn records_matching(
        &self,
        filter: &RecordFilter,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<StoredRecord>, LedgerError> {
        let rows = sqlx::query(concat!(
            "SELECT r.id, r.idem_key, r.status, b.record, r.correction_of
             FROM records r LEFT JOIN record_bodies b ON b.id = r.id WHERE ",
            matching!(),
            " AND (b.record IS NULL OR length(b.record) > 0) ORDER BY r.id LIMIT ?8"
        ))
        .bind(filter.status.map(Status::as_str))
        .bind(after_id)
        .bind(filter.provider.as_deref())
        .bind(filter.since.map(ts))
        .bind(filter.until.map(ts))
        .bind(filter.run)
        .bind(filter.key.as_deref())
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(sql("reading records to replay"))?;
        rows.into_iter()
            .map(|r| {
                let id: i64 = r.get(0);
                let body: Option<Vec<u8>> = r.get(3);
                let record = decode_body(id, body.as_deref())?;
                let status: String = r.get(2);
                Ok(StoredRecord {
                    id,
                    key: r.get(1),
                    status: status.parse().map_err(|message| LedgerError::Corrupt {
                        id,
                        field: "status",
                        message,
                    })?,
                    record,
                    correction_of: r.get(4),
                })
            })
            .collect()
    }

    /// How many records `filter` selects whose content `vacuum` pruned ([`Ledger::records_matching`]
    /// leaves them out: there is nothing to re-map).
    pub async fn pruned_matching(&self, filter: &RecordFilter) -> Result<u64, LedgerError> {
        let n: i64 = sqlx::query_scalar(concat!(
            "SELECT COUNT(*) FROM records r JOIN record_bodies b ON b.id = r.id WHERE ",
            matching!(),
            " AND length(b.record) = 0"
        ))
        .bind(filter.status.map(Status::as_str))
        .bind(0_i64) // after id 0: every record
        .bind(filter.provider.as_deref())
        .bind(filter.since.map(ts))
        .bind(filter.until.map(ts))
        .bind(filter.run)
        .bind(filter.key.as_deref())
        .fetch_one(&self.pool)
        .await
        .map_err(sql("counting pruned records"))?;
        Ok(n as u64)
    }

    /// How many changes of sent records wait for a person (`unresolved`; a partial index).
    pub async fn unresolved_change_count(&self) -> Result<i64, LedgerError> {
        sqlx::query_scalar("SELECT COUNT(*) FROM record_changes WHERE state = 'unresolved'")
            .fetch_one(&self.pool)
            .await
            .map_err(sql("counting changes to resolve"))
    }

    /// For replaying correction `id`: what went out for its original without it, and the
    /// original's latest content. `None` when `id` is not a correction.
    pub async fn correction_basis(&self, id: i64) -> Result<Option<CorrectionBasis>, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(sql("connecting"))?;
        let row = sqlx::query("SELECT correction_of, revision FROM records WHERE id = ?1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(sql("reading a correction"))?;
        let Some((Some(original), revision)) = row.map(|r| (r.get(0), r.get(1))) else {
            return Ok(None);
        };
        let mut sent = sent_state(&mut conn, original, Some(id)).await?;
        sent.next_revision = revision;
        let latest: Option<String> = sqlx::query_scalar(
            "SELECT record_json FROM record_changes WHERE record_id = ?1 ORDER BY id DESC LIMIT 1",
        )
        .bind(original)
        .fetch_optional(&mut *conn)
        .await
        .map_err(sql("reading the latest content of a sent record"))?;
        let latest = latest
            .map(|json| serde_json::from_str(&json))
            .transpose()
            .map_err(|e| LedgerError::Corrupt {
                id: original,
                field: "record_changes.record_json",
                message: e.to_string(),
            })?;
        Ok(Some(CorrectionBasis { sent, latest }))
    }

    /// Replace a correction that did not go out by its re-derived row (replay): difference,
    /// normalized record, mapping and payload, keeping its key. A pending or sent row is never
    /// touched.
    pub async fn restage_correction(
        &self,
        run_id: i64,
        id: i64,
        row: &StageRow,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        // Row and body change together.
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(sql("beginning a transaction"))?;
        if !restage(&mut tx, id, row, run_id, &ts(now)).await? {
            tracing::warn!(
                id,
                "replay: a correction that is pending or sent is left as it is"
            );
        } else {
            // A person asked for it: an earlier unclear delivery no longer holds it back.
            sqlx::query("UPDATE records SET unclear_at = NULL WHERE id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(sql("re-deriving a correction"))?;
        }
        tx.commit()
            .await
            .map_err(sql("committing a re-derived correction"))
    }

    /// The record stored under ledger id `id` (`None`: no such row), for
    /// `billsync mappings explain --id`.
    pub async fn record_by_id(&self, id: i64) -> Result<Option<UsageRecord>, LedgerError> {
        let row = sqlx::query(
            "SELECT b.record FROM records r LEFT JOIN record_bodies b ON b.id = r.id WHERE r.id = ?1",
        )
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql("reading a record"))?;
        row.map(|r| {
            let body: Option<Vec<u8>> = r.get(0);
            decode_body(id, body.as_deref())
        })
        .transpose()
    }

    /// Add an operator action to the audit trail.
    pub async fn audit(
        &self,
        run_id: i64,
        action: &str,
        detail: &str,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(sql("connecting"))?;
        write_audit(&mut conn, run_id, &ts(now), action, detail).await
    }

    /// Record a rejected record as delivered, by a person who found it in the sink (Stripe
    /// counted an event whose answer was unclear, which billsync then held back; a refusal
    /// that the sink's own operator took in by hand): `sent` in this run, nothing sent, an
    /// audit line with the reason and the refusal it replaces. Without this the record stays
    /// `rejected`, every sync exits 4 for it, and `reconcile` reports the sink's total above
    /// what was sent by its value.
    ///
    /// Only a rejected record, and not one of a month with period pricing (nor a month's
    /// adjustment): a month's adjustment is computed from what its members sent, and is
    /// settled by replaying them instead.
    pub async fn mark_delivered(
        &self,
        run_id: i64,
        key: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<MarkedDelivered, LedgerError> {
        let refuse = |why: String| LedgerError::NotMarkable {
            key: key.to_string(),
            why,
        };
        let now_s = ts(now);
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(sql("beginning a transaction"))?;
        let found = sqlx::query(
            "SELECT id, status, last_error, sink, correction_of, revision,
                 unclear_at IS NOT NULL
             FROM records WHERE idem_key = ?1",
        )
        .bind(key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(sql("reading a record"))?;
        let Some(found) = found else {
            return Err(refuse(
                "no record has this key (`billsync ledger export --status rejected` lists them)"
                    .into(),
            ));
        };
        let (id, status, last_error, sink): (i64, String, Option<String>, Option<String>) =
            (found.get(0), found.get(1), found.get(2), found.get(3));
        let (correction_of, revision, held): (Option<i64>, i64, bool) =
            (found.get(4), found.get(5), found.get(6));
        if status != Status::Rejected.as_str() {
            return Err(refuse(format!(
                "its status is `{status}`; only a rejected record is marked delivered by hand"
            )));
        }
        let in_a_month: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM period_members WHERE idem_key = ?1)
                 OR EXISTS (SELECT 1 FROM period_groups WHERE adjustment_key = ?1)",
        )
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .map_err(sql("reading period groups"))?;
        if in_a_month {
            return Err(refuse(if held {
                "it belongs to a month with period pricing, whose adjustment is computed from \
                 what its records sent, and it was held back after an unclear delivery, so a \
                 replay would send it again: settle it and its month in the invoicing system by \
                 hand"
                    .into()
            } else {
                "it belongs to a month with period pricing, whose adjustment is computed from \
                 what its records sent: replay it (`billsync replay --status rejected --key K`) \
                 instead"
                    .into()
            }));
        }
        // A refused correction does not count in what later corrections of its record were
        // measured against (one held back after an unclear delivery does): if one went out
        // since, it carried this difference already.
        if let (Some(original), false) = (correction_of, held) {
            let later: Option<String> = sqlx::query_scalar(
                "SELECT idem_key FROM records WHERE correction_of = ?1 AND revision > ?2
                     AND (status IN ('pending', 'sent')
                          OR (status = 'rejected' AND unclear_at IS NOT NULL))
                 ORDER BY revision LIMIT 1",
            )
            .bind(original)
            .bind(revision)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql("reading later corrections"))?;
            if let Some(later) = later {
                return Err(refuse(format!(
                    "the later correction {later} of the same record already carries its \
                     difference: recorded as delivered it would count twice (if the sink holds \
                     it too, the sink holds too much: take it back there)"
                )));
            }
        }
        sqlx::query(
            "UPDATE records SET status = 'sent', last_error = NULL, sent_run = ?2, last_run = ?2,
                 sent_at = ?3, updated_at = ?3
             WHERE id = ?1 AND status = 'rejected'",
        )
        .bind(id)
        .bind(run_id)
        .bind(&now_s)
        .execute(&mut *tx)
        .await
        .map_err(sql("marking a record delivered"))?;
        let detail = serde_json::json!({
            "record": id,
            "key": key,
            "sink": sink,
            "reason": reason,
            "refusal": last_error,
        })
        .to_string();
        write_audit(&mut tx, run_id, &now_s, "mark-delivered", &detail).await?;
        tx.commit()
            .await
            .map_err(sql("committing a record marked delivered"))?;
        Ok(MarkedDelivered {
            id,
            sink,
            refusal: last_error,
            detail,
        })
    }

    // ----- changes of sent records that wait for a person ----------------------------------

    /// Changes of sent or queued records that wait for a person (`unresolved`), oldest first;
    /// at most `limit` (all when `None`).
    pub async fn open_changes(&self, limit: Option<i64>) -> Result<Vec<OpenChange>, LedgerError> {
        let rows = sqlx::query(
            "SELECT c.id, c.record_id, r.idem_key, r.source, r.status, r.sink, r.subscription,
                 r.metric, r.value_property, r.value,
                 (SELECT group_concat(k.value, ' ') FROM records k
                    WHERE k.correction_of = r.id AND (k.status = 'sent' OR k.status = 'pending')),
                 c.record_json, c.note, c.seen_at, c.run_id
             FROM record_changes c JOIN records r ON r.id = c.record_id
             WHERE c.state = 'unresolved' ORDER BY c.id LIMIT ?1",
        )
        .bind(limit.unwrap_or(-1))
        .fetch_all(&self.pool)
        .await
        .map_err(sql("reading changes of sent records"))?;
        rows.into_iter()
            .map(|r| {
                let record: i64 = r.get(1);
                let value: Option<String> = r.get(9);
                let corrections: Option<String> = r.get(10);
                let sent_total = match &value {
                    None => None,
                    Some(v) => {
                        let mut total = Some(parse_dec(record, "value", v)?);
                        for c in corrections.as_deref().unwrap_or("").split_whitespace() {
                            let c = parse_dec(record, "value", c)?;
                            total = total.and_then(|t| t.checked_add(c));
                        }
                        Some(total.map_or_else(
                            || "beyond the range of a decimal".to_string(),
                            |t| t.to_string(),
                        ))
                    }
                };
                let json: String = r.get(11);
                let new: serde_json::Value =
                    serde_json::from_str(&json).map_err(|e| LedgerError::Corrupt {
                        id: r.get(0),
                        field: "record_changes.record_json",
                        message: e.to_string(),
                    })?;
                let text = |field: &str| match new.get(field) {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                };
                Ok(OpenChange {
                    change: r.get(0),
                    record,
                    key: r.get(2),
                    source: r.get(3),
                    status: r.get(4),
                    sent_sink: r.get(5),
                    sent_subscription: r.get(6),
                    sent_metric: r.get(7),
                    sent_value_property: r.get(8),
                    sent_value: value,
                    sent_total,
                    new_billed_cost: text("billed_cost"),
                    new_billing_currency: text("billing_currency"),
                    new_consumed_quantity: text("consumed_quantity"),
                    reason: r.get(12),
                    seen_at: r.get(13),
                    run: r.get(14),
                })
            })
            .collect()
    }

    /// Resolve a change that waits for a person by keeping what was sent (`billsync ledger
    /// resolve --keep-sent`): the change (with `all_of_record`, every open change of its
    /// record) becomes `kept`, with `reason`, in one transaction with its audit line. Nothing
    /// is staged or sent: what was billed stays billed, and the record's latest content stays
    /// recorded (a re-read of it is a no-op).
    ///
    /// Once no change of the record waits any more and its latest change is kept, its share of
    /// a month with period pricing is confirmed for that content: the share (computed from the
    /// content that was sent, in the month it was billed in) is what the month settles on, and
    /// the month is marked for settlement. Until then the month waits, as before.
    pub async fn keep_sent(
        &self,
        run_id: i64,
        change: i64,
        all_of_record: bool,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Resolved, LedgerError> {
        let now_s = ts(now);
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(sql("beginning a transaction"))?;
        let found = sqlx::query(
            "SELECT c.state, c.record_id, r.idem_key, r.content_hash, r.match_hash
             FROM record_changes c JOIN records r ON r.id = c.record_id WHERE c.id = ?1",
        )
        .bind(change)
        .fetch_optional(&mut *tx)
        .await
        .map_err(sql("reading a change of a sent record"))?;
        let Some(found) = found else {
            return Err(LedgerError::NoOpenChange {
                id: change,
                found: "there is no change with this id".into(),
            });
        };
        let state: String = found.get(0);
        if state != "unresolved" {
            return Err(LedgerError::NoOpenChange {
                id: change,
                found: format!("its state is `{state}`: nothing to resolve"),
            });
        }
        let record: i64 = found.get(1);
        let key: String = found.get(2);
        let content_hash: String = found.get(3);
        let match_hash: Option<String> = found.get(4);
        let changes: Vec<i64> = sqlx::query_scalar(
            "UPDATE record_changes SET state = 'kept', resolved_at = ?4, resolved_run = ?5,
                 resolution = ?6
             WHERE state = 'unresolved' AND (id = ?1 OR (?2 AND record_id = ?3))
             RETURNING id",
        )
        .bind(change)
        .bind(all_of_record)
        .bind(record)
        .bind(&now_s)
        .bind(run_id)
        .bind(reason)
        .fetch_all(&mut *tx)
        .await
        .map_err(sql("resolving a change of a sent record"))?;
        let still_open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM record_changes WHERE record_id = ?1 AND state = 'unresolved'",
        )
        .bind(record)
        .fetch_one(&mut *tx)
        .await
        .map_err(sql("reading changes of a sent record"))?;
        let latest: Option<String> = sqlx::query_scalar(
            "SELECT state FROM record_changes WHERE record_id = ?1 ORDER BY id DESC LIMIT 1",
        )
        .bind(record)
        .fetch_optional(&mut *tx)
        .await
        .map_err(sql("reading changes of a sent record"))?;
        let mut months: Vec<String> = Vec::new();
        if still_open == 0 && latest.as_deref() == Some("kept") {
            // The share stays the one of the content that was sent (staging moves a sent
            // record's share only with content that goes out, see `register_period_shares`);
            // it now stands for the record's latest content too.
            months = sqlx::query_scalar(
                "UPDATE period_members SET content_hash = ?2, match_hash = ?3
                 WHERE idem_key = ?1 AND (content_hash <> ?2 OR match_hash IS NOT ?3)
                 RETURNING group_key",
            )
            .bind(&key)
            .bind(&content_hash)
            .bind(match_hash.as_deref())
            .fetch_all(&mut *tx)
            .await
            .map_err(sql("confirming the period share of a sent record"))?;
            for g in &months {
                mark_dirty(&mut tx, g).await?;
            }
        }
        let detail = serde_json::json!({
            "changes": changes,
            "record": record,
            "key": key,
            "resolution": "keep-sent",
            "reason": reason,
            "months": months,
        })
        .to_string();
        write_audit(&mut tx, run_id, &now_s, "resolve", &detail).await?;
        tx.commit().await.map_err(sql("committing a resolution"))?;
        Ok(Resolved {
            changes,
            record,
            key,
            still_open,
            months,
            detail,
        })
    }

    // ----- pushing ------------------------------------------------------------------------

    /// The next pending records of a sink, after `after_id`, in id order.
    ///
    /// Read on the raw handle, on the caller's thread: through sqlx each row crossed a channel
    /// from the connection's thread to the pusher's, and the two woke each other a few times
    /// per row (about 30 context switches per 100-event batch in `billsync bench`).
    pub async fn pending_batch(
        &self,
        sink: &str,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<Outgoing>, LedgerError> {
        const CONTEXT: &str = "reading pending records";
        let mut conn = self.pool.acquire().await.map_err(sql(CONTEXT))?;
        let mut handle = conn.lock_handle().await.map_err(sql(CONTEXT))?;
        let raw = raw::Raw::new(&mut handle);
        let mut query = raw
            .prepare(
                "SELECT r.id, r.idem_key, b.payload, r.unclear_at
                 FROM records r LEFT JOIN record_bodies b ON b.id = r.id
                 WHERE r.status = 'pending' AND r.sink = ?1 AND r.id > ?2 ORDER BY r.id LIMIT ?3",
            )
            .map_err(sqlite(CONTEXT))?;
        query.text(1, sink).map_err(sqlite(CONTEXT))?;
        query.int(2, after_id).map_err(sqlite(CONTEXT))?;
        query
            .int(3, i64::try_from(limit).unwrap_or(i64::MAX))
            .map_err(sqlite(CONTEXT))?;
        let mut out = Vec::with_capacity(limit.min(4096));
        read_outgoing(&mut query, &mut out)?;
        Ok(out)
    }

    /// Those of `ids` that are pending for `sink`, in id order, for delivery: records that
    /// became pending behind a pusher's walk (see [`StageCounts::restaged_pending`]).
    pub async fn pending_by_ids(
        &self,
        sink: &str,
        ids: &[i64],
    ) -> Result<Vec<Outgoing>, LedgerError> {
        const CONTEXT: &str = "reading pending records by id";
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut conn = self.pool.acquire().await.map_err(sql(CONTEXT))?;
        let mut handle = conn.lock_handle().await.map_err(sql(CONTEXT))?;
        let raw = raw::Raw::new(&mut handle);
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(LOOKUP_KEYS_PER_STATEMENT) {
            // Integers written into the text: nothing to escape.
            let list = chunk
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let mut query = raw
                .prepare(&format!(
                    "SELECT r.id, r.idem_key, b.payload, r.unclear_at
                     FROM records r LEFT JOIN record_bodies b ON b.id = r.id
                     WHERE r.status = 'pending' AND r.sink = ?1 AND r.id IN ({list}) ORDER BY r.id"
                ))
                .map_err(sqlite(CONTEXT))?;
            query.text(1, sink).map_err(sqlite(CONTEXT))?;
            read_outgoing(&mut query, &mut out)?;
        }
        Ok(out)
    }

    /// Mark `ids` (pending records read for a sink whose deduplication is time-limited) as
    /// being handed to it now, in one committed transaction, before any request: a crash
    /// before their acknowledgement leaves the mark, which the next run that pushes to the
    /// sink turns into an unclear delivery ([`Ledger::claim_interrupted_sends`]). One commit
    /// for a whole read-ahead, not one per request.
    pub async fn mark_sending(&self, ids: &[i64], now: DateTime<Utc>) -> Result<(), LedgerError> {
        self.set_sending(ids, Some(ts(now))).await
    }

    /// Clear the mark of [`Ledger::mark_sending`] from records read ahead that this run did
    /// not hand to the sink after all (a stop, the sink stopped): nothing of them went out.
    pub async fn clear_sending(&self, ids: &[i64]) -> Result<(), LedgerError> {
        self.set_sending(ids, None).await
    }

    /// Set (a pending record only) or clear the mark of records `ids`, in one transaction.
    async fn set_sending(&self, ids: &[i64], mark: Option<String>) -> Result<(), LedgerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (only, what) = match mark {
            // `+status`: by id (see `ack`).
            Some(_) => (
                " WHERE +status = 'pending'",
                "marking records as being sent",
            ),
            None => (
                " WHERE sending_at IS NOT NULL",
                "clearing records being sent",
            ),
        };
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(sql("beginning a transaction"))?;
        for chunk in ids.chunks(LOOKUP_KEYS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("UPDATE records SET sending_at = ");
            qb.push_bind(mark.clone()).push(only).push(" AND id IN (");
            push_list(&mut qb, chunk.iter().copied());
            qb.push(")");
            qb.build().execute(&mut *tx).await.map_err(sql(what))?;
        }
        tx.commit().await.map_err(sql(what))
    }

    /// Marks of [`Ledger::mark_sending`] left on records of `sink` (by a crash between a
    /// request and its acknowledgement: the caller holds the run lock, so no run is sending
    /// them now) become unclear deliveries, at the time of the mark unless one was known
    /// before: the sink may hold the record. Returns how many. Reads only the partial index of
    /// marked records, so a ledger's size costs nothing here.
    pub async fn claim_interrupted_sends(&self, sink: &str) -> Result<u64, LedgerError> {
        let done = sqlx::query(
            "UPDATE records SET unclear_at = coalesce(unclear_at, sending_at), sending_at = NULL
             WHERE sink = ?1 AND sending_at IS NOT NULL",
        )
        .bind(sink)
        .execute(&self.pool)
        .await
        .map_err(sql("recording interrupted deliveries"))?;
        Ok(done.rows_affected())
    }

    /// Record the outcome of one delivered batch, in one transaction. Each statement that
    /// records an outcome also clears the record's mark of a delivery under way
    /// ([`Ledger::mark_sending`]): its answer is known now.
    pub async fn ack(
        &self,
        run_id: i64,
        outcomes: &[(i64, Outcome)],
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        let now_s = ts(now);
        // IMMEDIATE: staging may commit meanwhile (pushes run alongside the pull); a deferred
        // transaction that read first could not then write (SQLITE_BUSY_SNAPSHOT).
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(sql("beginning a transaction"))?;
        let sent: Vec<i64> = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Delivered | Outcome::AlreadyDelivered))
            .map(|(id, _)| *id)
            .collect();
        for chunk in sent.chunks(LOOKUP_KEYS_PER_STATEMENT) {
            // `+status`: look the rows up by id. Without it SQLite walks the status index
            // through every pending record for each statement (quadratic over a backlog).
            // `OR FAIL`: a statement that changes many rows and may abort on a constraint
            // makes SQLite copy every page it touches into a statement journal first (spilled
            // to a temporary file past 64 KB: one per acknowledgement here). A failure rolls
            // the whole transaction back anyway, so the statement's own undo is not needed.
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "UPDATE OR FAIL records SET status = 'sent', attempts = attempts + 1, last_error = NULL, sent_run = ",
            );
            qb.push_bind(run_id)
                .push(", last_run = ")
                .push_bind(run_id)
                .push(", sent_at = ")
                .push_bind(now_s.clone())
                .push(", updated_at = ")
                .push_bind(now_s.clone())
                .push(", sending_at = NULL WHERE +status = 'pending' AND id IN (");
            push_list(&mut qb, chunk.iter().copied());
            qb.push(")");
            qb.build()
                .persistent(chunk.len() == LOOKUP_KEYS_PER_STATEMENT)
                .execute(&mut *tx)
                .await
                .map_err(sql("acknowledging sent records"))?;
        }
        for (id, outcome) in outcomes {
            // What becomes of `unclear_at`: 1 set (kept if set), 2 cleared, else kept.
            let (status, error, unclear) = match outcome {
                Outcome::Delivered | Outcome::AlreadyDelivered => continue,
                Outcome::Rejected(reason) => (Status::Rejected, reason, 0),
                Outcome::RejectedNotStored(reason) => (Status::Rejected, reason, 2),
                Outcome::Failed(reason) => (Status::Pending, reason, 0),
                Outcome::Unclear(reason) => (Status::Pending, reason, 1),
                Outcome::HeldBack(reason) => (Status::Rejected, reason, 0),
            };
            // An unclear delivery keeps the time of the first one: a sink that deduplicates a
            // key for a limited time counts a resend once only within that time of it. A
            // refusal that shows the sink does not hold the record clears it.
            sqlx::query(
                "UPDATE records SET status = ?2, attempts = attempts + 1, last_error = ?3,
                     last_run = ?4, updated_at = ?5, sending_at = NULL,
                     unclear_at = CASE ?6 WHEN 1 THEN coalesce(unclear_at, ?5)
                         WHEN 2 THEN NULL ELSE unclear_at END
                 WHERE id = ?1 AND status = 'pending'",
            )
            .bind(id)
            .bind(status.as_str())
            .bind(error)
            .bind(run_id)
            .bind(&now_s)
            .bind(unclear)
            .execute(&mut *tx)
            .await
            .map_err(sql("recording a failed delivery"))?;
        }
        tx.commit()
            .await
            .map_err(sql("committing acknowledgements"))?;
        Ok(())
    }

    /// Totals of what a run sent, per (source, subscription, metric), summed exactly.
    pub async fn sent_totals(&self, run_id: i64) -> Result<SentTotals, LedgerError> {
        Ok(self
            .sent_total_list(run_id)
            .await?
            .into_iter()
            .map(|(source, subscription, metric, value)| {
                (
                    (
                        source.to_string(),
                        subscription.to_string(),
                        metric.to_string(),
                    ),
                    value,
                )
            })
            .collect())
    }

    /// [`Ledger::sent_totals`] as a list sorted by source, subscription and metric, the names
    /// shared: what a run's summary holds.
    ///
    /// A backfill sends millions of records to tens of thousands of (source, subscription,
    /// metric) groups: read on the raw handle (through sqlx each row cost an owned row and three
    /// owned strings: 25.4 s instead of 4.4 s for the 8.9M sent rows of a 10M run) and summed
    /// by name numbers, each name copied once. Nested maps by name, then a sorted map, then a
    /// list of owned strings peaked at 14.8 MB of live heap for 54,630 totals.
    pub async fn sent_total_list(
        &self,
        run_id: i64,
    ) -> Result<Vec<(Arc<str>, Arc<str>, Arc<str>, Decimal)>, LedgerError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(sql("summing sent records"))?;
        let mut handle = conn
            .lock_handle()
            .await
            .map_err(sql("summing sent records"))?;
        let raw = raw::Raw::new(&mut handle);
        let mut query = raw
            .prepare(
                "SELECT id, source, subscription, metric, value FROM records WHERE sent_run = ?1",
            )
            .map_err(sqlite("summing sent records"))?;
        query
            .int(1, run_id)
            .map_err(sqlite("summing sent records"))?;
        // hashbrown's default hasher (foldhash): a run of 1M records looks its names up 3M
        // times here, after the run's work, and SipHash made that a fifth of this step.
        let mut names: hashbrown::HashMap<Arc<str>, u32> = hashbrown::HashMap::new();
        let mut sums: hashbrown::HashMap<[u32; 3], Decimal> = hashbrown::HashMap::new();
        let mut overflowed: std::collections::HashSet<[u32; 3]> = Default::default();
        while let Some(row) = query.next_row().map_err(sqlite("summing sent records"))? {
            let id = row.int(0);
            let value = Decimal::from_str(row.text(4).unwrap_or("0")).map_err(|e| {
                LedgerError::Corrupt {
                    id,
                    field: "value",
                    message: e.to_string(),
                }
            })?;
            let group = [1, 2, 3].map(|i| name_number(&mut names, row.text(i).unwrap_or_default()));
            let sum = sums.entry(group).or_default();
            // Past a decimal's range (values near ±7.9e28, which providers may send) the group
            // has no total to print: it is left out with a warning below, never a panic after
            // the run's records were acknowledged.
            *sum = sum.checked_add(value).unwrap_or_else(|| {
                overflowed.insert(group);
                Decimal::ZERO
            });
        }
        if !overflowed.is_empty() {
            let shown = |g: &[u32; 3]| {
                g.map(|n| {
                    names
                        .iter()
                        .find(|(_, &v)| v == n)
                        .map_or_else(String::new, |(k, _)| k.to_string())
                })
                .join(" ")
            };
            for g in &overflowed {
                tracing::warn!(
                    group = %shown(g),
                    "what this run sent to this source, subscription and metric adds up beyond \
                     the range of a decimal: its total is left out of the summary"
                );
                sums.remove(g);
            }
        }
        let mut by_number: Vec<Arc<str>> = vec![Arc::from(""); names.len()];
        for (name, n) in names {
            by_number[n as usize] = name;
        }
        let mut totals: Vec<([u32; 3], Decimal)> = sums.into_iter().collect();
        let name = |n: u32| &*by_number[n as usize];
        totals.sort_unstable_by(|(a, _), (b, _)| a.map(name).cmp(&b.map(name)));
        let shared = |n: u32| Arc::clone(&by_number[n as usize]);
        Ok(totals
            .into_iter()
            .map(|([source, subscription, metric], value)| {
                (shared(source), shared(subscription), shared(metric), value)
            })
            .collect())
    }

    /// Write the records matching `filter` as CSV (header first), streaming.
    pub async fn export_csv(
        &self,
        filter: &RecordFilter,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<u64, LedgerError> {
        use futures_util::TryStreamExt;
        const COLUMNS: &str = "id, idem_key, source, provider, status, charge_period_start, charge_period_end,
            billing_account_id, sub_account_id, resource_type, resource_id, consumed_quantity,
            consumed_unit, billed_cost, billing_currency, rule, sink, subscription, customer, metric,
            value, attempts, last_error, first_run, last_run, sent_run, staged_at, sent_at,
            correction_of, revision";
        let header: Vec<&str> = COLUMNS.split(',').map(str::trim).collect();
        let io = |e: std::io::Error| LedgerError::Sql {
            context: "writing the export",
            source: sqlx::Error::Io(e),
        };
        writeln!(out, "{}", header.join(",")).map_err(io)?;
        let mut rows = sqlx::query(
            "SELECT id, idem_key, source, provider, status, charge_period_start, charge_period_end,
                billing_account_id, sub_account_id, resource_type, resource_id, consumed_quantity,
                consumed_unit, billed_cost, billing_currency, rule, sink, subscription, customer, metric,
                value, attempts, last_error, first_run, last_run, sent_run, staged_at, sent_at,
                correction_of, revision
             FROM records
             WHERE (?1 IS NULL OR status = ?1)
               AND (?2 IS NULL OR source = ?2 OR provider = ?2)
               AND (?3 IS NULL OR charge_period_start >= ?3)
               AND (?4 IS NULL OR charge_period_start < ?4)
               AND (?5 IS NULL OR last_run = ?5)
               AND (?6 IS NULL OR idem_key = ?6)
             ORDER BY id",
        )
        .bind(filter.status.map(Status::as_str))
        .bind(filter.provider.as_deref())
        .bind(filter.since.map(ts))
        .bind(filter.until.map(ts))
        .bind(filter.run)
        .bind(filter.key.as_deref())
        .fetch(&self.pool);
        let mut n = 0u64;
        while let Some(r) = rows.try_next().await.map_err(sql("exporting records"))? {
            let mut fields = Vec::with_capacity(header.len());
            for i in 0..header.len() {
                let text: Option<String> = match r.try_get::<Option<String>, _>(i) {
                    Ok(v) => v,
                    Err(_) => r
                        .try_get::<Option<i64>, _>(i)
                        .ok()
                        .flatten()
                        .map(|v| v.to_string()),
                };
                fields.push(csv_field(text.as_deref().unwrap_or("")));
            }
            writeln!(out, "{}", fields.join(",")).map_err(io)?;
            n += 1;
        }
        Ok(n)
    }

    /// How many sent (or ignored) records [`Ledger::vacuum`] would prune for `cutoff` (a dry
    /// run: no lock, nothing written).
    pub async fn prunable(&self, cutoff: DateTime<Utc>) -> Result<u64, LedgerError> {
        let n: i64 = sqlx::query_scalar(PRUNABLE_COUNT)
            .bind(ts(cutoff))
            .fetch_one(&self.pool)
            .await
            .map_err(sql("counting prunable records"))?;
        Ok(n as u64)
    }

    /// Prune sent records whose charge period started before `cutoff` and that were sent before
    /// it: their payload, raw fields and change history go, a tombstone stays (key, content
    /// hash, status, amounts), so a late re-read of the same source record is still a no-op and
    /// can never bill it again. Unsent records are never touched. Then, whenever the file has
    /// free pages (this prune's, or those of an earlier vacuum that lost its lock between its
    /// prune and its VACUUM), a VACUUM gives them back to the file system. Returns the records
    /// pruned and the pages given back.
    ///
    /// Only under the run lock of `holder` (taken with [`Ledger::acquire_lock`]), which is
    /// checked and extended by `ttl` as the prune's first write, in its transaction, and again
    /// right before the VACUUM: a prune that waited for SQLite's write lock, or lasted, longer
    /// than `ttl` may find its lock taken by a sync, and then changes nothing
    /// ([`LedgerError::Locked`]). No timer can extend the lock while the prune or the VACUUM
    /// runs: both hold SQLite's write lock, so the lock row cannot be written by anyone, this
    /// run or another, until they end.
    pub async fn vacuum(
        &self,
        cutoff: DateTime<Utc>,
        holder: &str,
        ttl: Duration,
    ) -> Result<Vacuumed, LedgerError> {
        let cutoff = ts(cutoff);
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(sql("beginning a transaction"))?;
        let expires = |now: DateTime<Utc>| {
            ts(now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1)))
        };
        let held =
            sqlx::query("UPDATE locks SET expires_at = ?2 WHERE name = 'sync' AND holder = ?1")
                .bind(holder)
                .bind(expires(Utc::now()))
                .execute(&mut *tx)
                .await
                .map_err(sql("refreshing the run lock"))?;
        if held.rows_affected() != 1 {
            let row = sqlx::query(
                "SELECT holder, acquired_at, expires_at FROM locks WHERE name = 'sync'",
            )
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql("reading the run lock"))?;
            return Err(lock_taken(row));
        }
        let n: i64 = sqlx::query_scalar(PRUNABLE_COUNT)
            .bind(&cutoff)
            .fetch_one(&mut *tx)
            .await
            .map_err(sql("counting prunable records"))?;
        if n > 0 {
            // A change that waits for a person is not history: it stays (listed and counted)
            // until it is resolved, however old its record.
            sqlx::query(
                "DELETE FROM record_changes WHERE state <> 'unresolved' AND record_id IN (
                 SELECT id FROM records WHERE status IN ('sent', 'ignored')
                   AND charge_period_start < ?1 AND COALESCE(sent_at, updated_at) < ?1)",
            )
            .bind(&cutoff)
            .execute(&mut *tx)
            .await
            .map_err(sql("pruning change history"))?;
            sqlx::query(
                "UPDATE record_bodies SET payload = NULL, record = X''
                 WHERE id IN (SELECT id FROM records WHERE status IN ('sent', 'ignored')
                   AND charge_period_start < ?1 AND COALESCE(sent_at, updated_at) < ?1)",
            )
            .bind(&cutoff)
            .execute(&mut *tx)
            .await
            .map_err(sql("pruning sent records"))?;
        }
        tx.commit().await.map_err(sql("committing the prune"))?;
        // Free pages are this prune's, or those of an earlier one that lost its lock before
        // its VACUUM (exit 3): without them there is nothing to give back.
        let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(&self.pool)
            .await
            .map_err(sql("counting free pages"))?;
        if free == 0 {
            return Ok(Vacuumed {
                pruned: n as u64,
                pages_freed: 0,
            });
        }
        let pages = || async {
            sqlx::query_scalar::<_, i64>("PRAGMA page_count")
                .fetch_one(&self.pool)
                .await
                .map_err(sql("counting pages"))
        };
        let before = pages().await?;
        // The prune may have outlasted the lock: the VACUUM (a write of the whole file) only
        // while it is still this run's, with a full `ttl` ahead.
        self.refresh_lock(holder, Utc::now(), ttl).await?;
        // Give the space back to the file system.
        sqlx::query("VACUUM")
            .execute(&self.pool)
            .await
            .map_err(sql("vacuuming"))?;
        let after = pages().await?;
        Ok(Vacuumed {
            pruned: n as u64,
            pages_freed: before.saturating_sub(after) as u64,
        })
    }

    /// How many records the ledger holds (benchmarks).
    pub async fn record_count(&self) -> Result<i64, LedgerError> {
        sqlx::query_scalar("SELECT COUNT(*) FROM records")
            .fetch_one(&self.pool)
            .await
            .map_err(sql("counting records"))
    }

    /// How many records wait to be sent to a sink.
    pub async fn pending_count(&self, sink: &str) -> Result<u64, LedgerError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM records WHERE status = 'pending' AND sink = ?1",
        )
        .bind(sink)
        .fetch_one(&self.pool)
        .await
        .map_err(sql("counting pending records"))?;
        Ok(n as u64)
    }

    /// The pending records of `sink` above id `after_id`: what a push that has read up to
    /// `after_id` has still to read (its progress total).
    pub async fn pending_count_after(&self, sink: &str, after_id: i64) -> Result<u64, LedgerError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM records WHERE status = 'pending' AND sink = ?1 AND id > ?2",
        )
        .bind(sink)
        .bind(after_id)
        .fetch_one(&self.pool)
        .await
        .map_err(sql("counting pending records"))?;
        Ok(n as u64)
    }

    /// The records of a sink that wait to be sent (pending or provisional) with a charge period
    /// starting before `cutoff` (for sinks with a backdating limit, such as Stripe's 35 days):
    /// how many, and the oldest one's key and charge period start.
    pub async fn waiting_older_than(
        &self,
        sink: &str,
        cutoff: DateTime<Utc>,
    ) -> Result<(u64, Option<(String, String)>), LedgerError> {
        let cutoff = ts(cutoff);
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM records
             WHERE status IN ('pending', 'provisional') AND sink = ?1 AND charge_period_start < ?2",
        )
        .bind(sink)
        .bind(&cutoff)
        .fetch_one(&self.pool)
        .await
        .map_err(sql("counting old waiting records"))?;
        let oldest = sqlx::query(
            "SELECT idem_key, charge_period_start FROM records
             WHERE status IN ('pending', 'provisional') AND sink = ?1 AND charge_period_start < ?2
             ORDER BY charge_period_start, id LIMIT 1",
        )
        .bind(sink)
        .bind(&cutoff)
        .fetch_optional(&self.pool)
        .await
        .map_err(sql("finding the oldest waiting record"))?
        .map(|r| (r.get(0), r.get(1)));
        Ok((n as u64, oldest))
    }

    /// How many records are undelivered (pending, unmapped, rejected), ledger-wide.
    pub async fn undelivered(&self) -> Result<i64, LedgerError> {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM records WHERE status IN ('pending', 'unmapped', 'rejected')",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(sql("counting undelivered records"))
    }

    /// What a run's metrics show of the ledger ([`LedgerGauges`]). Read after every sync when
    /// metrics are pushed, so it reads only what waits (through the status index) and never
    /// counts the whole table as `status` does: on a ledger of 10M records that count took
    /// 9 s with its pages cached and a minute without, in every hourly run.
    pub async fn gauges(&self) -> Result<LedgerGauges, LedgerError> {
        let mut undelivered = BTreeMap::new();
        for r in sqlx::query(UNDELIVERED_BY_SOURCE)
            .fetch_all(&self.pool)
            .await
            .map_err(sql("counting undelivered records"))?
        {
            undelivered.insert((r.get(0), r.get(1)), r.get(2));
        }
        Ok(LedgerGauges {
            undelivered,
            cursors: self.cursor_rows().await?,
            open_changes: self.unresolved_change_count().await?,
        })
    }

    async fn cursor_rows(&self) -> Result<Vec<CursorRow>, LedgerError> {
        Ok(sqlx::query(
            "SELECT source, stream, value, updated_at FROM cursors ORDER BY source, stream",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(sql("reading cursors"))?
        .into_iter()
        .map(|r| CursorRow {
            source: r.get(0),
            stream: r.get(1),
            value: r.get(2),
            updated_at: r.get(3),
        })
        .collect())
    }

    /// Records per (source, status). A pass over every record (the status index does not
    /// hold the source): on a 10M-record ledger ~9 s with its pages cached, a minute cold.
    pub async fn counts_by_source(&self) -> Result<BTreeMap<(String, String), i64>, LedgerError> {
        let mut counts = BTreeMap::new();
        for r in sqlx::query("SELECT source, status, COUNT(*) FROM records GROUP BY source, status")
            .fetch_all(&self.pool)
            .await
            .map_err(sql("counting records per source"))?
        {
            counts.insert((r.get(0), r.get(1)), r.get(2));
        }
        Ok(counts)
    }

    /// Everything `billsync status` shows. Its counts are read from the status index
    /// ([`LedgerStatus::by_status`]): on the 9.9M-record bench ledger 0.8 s with the pages
    /// cached and 2.8 s cold, where counting per source reads the whole table (9 s and 65 s).
    pub async fn status(&self) -> Result<LedgerStatus, LedgerError> {
        let mut st = LedgerStatus::default();
        for r in sqlx::query(RECORDS_BY_STATUS_AND_SINK)
            .fetch_all(&self.pool)
            .await
            .map_err(sql("counting records"))?
        {
            st.by_status.insert((r.get(0), r.get(1)), r.get(2));
        }
        st.cursors = self.cursor_rows().await?;
        st.open_changes = self.unresolved_change_count().await?;
        st.corrections =
            sqlx::query_scalar("SELECT COUNT(*) FROM records WHERE correction_of IS NOT NULL")
                .fetch_one(&self.pool)
                .await
                .map_err(sql("counting corrections"))?;
        st.runs = sqlx::query(
            "SELECT id, command, started_at, finished_at, outcome FROM runs ORDER BY id DESC LIMIT 5",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(sql("reading runs"))?
        .into_iter()
        .map(|r| RunRow {
            id: r.get(0),
            command: r.get(1),
            started_at: r.get(2),
            finished_at: r.get(3),
            outcome: r.get(4),
        })
        .collect();
        st.oldest_undelivered = sqlx::query(
            "SELECT idem_key, status, staged_at, last_error FROM records
             WHERE status IN ('pending', 'unmapped', 'rejected') ORDER BY staged_at, id LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(sql("finding the oldest undelivered record"))?
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)));
        // Undelivered records that carry a reason: held ones always, pending ones after a
        // failed attempt (a correction's note, "correction of …", is not a failure until its
        // own first attempt fails). Grouped by resource type, not by the exact reason: "no rule matches"
        // names fields of the record (its description, its account), so one gap in the
        // mappings would be one group per record. Each group shows its oldest record's reason
        // (SQLite takes the bare column from the row of the MIN).
        macro_rules! held {
            ($select:literal) => {
                concat!(
                    $select,
                    " FROM records WHERE status IN ('unmapped', 'rejected', 'pending')
                      AND last_error IS NOT NULL AND (status <> 'pending' OR attempts > 0)
                      GROUP BY status, source, resource_type"
                )
            };
        }
        st.held_reason_groups =
            sqlx::query_scalar(concat!("SELECT COUNT(*) FROM (", held!("SELECT 1"), ")"))
                .fetch_one(&self.pool)
                .await
                .map_err(sql("counting groups of held records"))?;
        st.held_reasons = sqlx::query(concat!(
            held!("SELECT status, source, resource_type, COUNT(*), MIN(staged_at), last_error"),
            " ORDER BY COUNT(*) DESC, MIN(staged_at), status, source, resource_type LIMIT ?1"
        ))
        .bind(HELD_REASONS_SHOWN)
        .fetch_all(&self.pool)
        .await
        .map_err(sql("reading groups of held records"))?
        .into_iter()
        .map(|r| HeldReason {
            status: r.get(0),
            source: r.get(1),
            resource_type: r.get(2),
            count: r.get(3),
            oldest_staged: r.get(4),
            reason: r.get(5),
        })
        .collect();
        st.lock =
            sqlx::query("SELECT holder, acquired_at, expires_at FROM locks WHERE name = 'sync'")
                .fetch_optional(&self.pool)
                .await
                .map_err(sql("reading the lock"))?
                .map(|r| (r.get(0), r.get(1), r.get(2)));
        Ok(st)
    }
}

/// Why a ledger that exists cannot be opened, when its directory is not writable (a volume
/// mounted read-only, a `readOnlyRootFilesystem` without the ledger's volume): SQLite in WAL
/// mode creates `-wal` and `-shm` files beside the ledger, even to read it, and says only
/// "unable to open database file".
fn read_only_hint(path: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    if !path.is_file() {
        return None;
    }
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // access(2) answers for this process's user and for a read-only mount alike.
    // SAFETY: `c_dir` is a valid NUL-terminated path for the duration of the call.
    let writable = unsafe { libc::access(c_dir.as_ptr(), libc::W_OK) } == 0;
    (!writable).then(|| {
        format!(
            " (its directory {} is not writable: SQLite keeps the ledger's write-ahead log, \
             `-wal` and `-shm` files, beside it and must create them even to read; mount the \
             ledger's volume read-write)",
            dir.display()
        )
    })
}

/// How a run lock holder named after a Kubernetes Job begins: `job:<name>/`.
pub const JOB_HOLDER_PREFIX: &str = "job:";

/// The `job:<name>/` part of a lock holder, if it has one.
fn job_of(holder: &str) -> Option<&str> {
    let rest = holder.strip_prefix(JOB_HOLDER_PREFIX)?;
    let end = rest.find('/')?;
    Some(&holder[..JOB_HOLDER_PREFIX.len() + end + 1])
}

/// The `job:<name>/<host>:` part of a lock holder named after a Job: its pod. A holder is
/// `…<host>:<pid>:<random>`, and a pod's host name has no colon.
fn pod_of(holder: &str) -> Option<&str> {
    job_of(holder)?;
    let mut colons = holder.rmatch_indices(':').map(|(i, _)| i);
    let (_, host_end) = (colons.next()?, colons.next()?);
    Some(&holder[..=host_end])
}

/// The number of `name` among `names`, added the first time it is seen (the only time the
/// name is copied).
fn name_number(names: &mut hashbrown::HashMap<Arc<str>, u32>, name: &str) -> u32 {
    if let Some(&n) = names.get(name) {
        return n;
    }
    let n = names.len() as u32;
    names.insert(Arc::from(name), n);
    n
}

/// Bind `items` as a comma-separated list (the inside of an `IN (…)`).
/// The rows of `select` (a statement ending in `… IN (`) for `keys`, a statement per
/// [`LOOKUP_KEYS_PER_STATEMENT`] keys (full ones prepared once and cached).
async fn rows_with_keys(
    conn: &mut sqlx::SqliteConnection,
    select: &str,
    keys: &[&str],
    what: &'static str,
) -> Result<Vec<sqlx::sqlite::SqliteRow>, LedgerError> {
    let mut rows = Vec::new();
    for chunk in keys.chunks(LOOKUP_KEYS_PER_STATEMENT) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(select);
        push_list(&mut qb, chunk.iter().copied());
        qb.push(")");
        rows.extend(
            qb.build()
                .persistent(chunk.len() == LOOKUP_KEYS_PER_STATEMENT)
                .fetch_all(&mut *conn)
                .await
                .map_err(sql(what))?,
        );
    }
    Ok(rows)
}

fn push_list<'t, T>(qb: &mut QueryBuilder<Sqlite>, items: impl IntoIterator<Item = T>)
where
    T: sqlx::Encode<'t, Sqlite> + sqlx::Type<Sqlite>,
{
    let mut sep = qb.separated(", ");
    for item in items {
        sep.push_bind(item);
    }
}

fn record_body(record: &UsageRecord) -> Result<Vec<u8>, LedgerError> {
    body::encode(record).map_err(|message| LedgerError::Corrupt {
        id: 0,
        field: "record",
        message,
    })
}

fn decode_body(id: i64, body: Option<&[u8]>) -> Result<UsageRecord, LedgerError> {
    body::decode(body.unwrap_or_default()).map_err(|message| LedgerError::Corrupt {
        id,
        field: "record",
        message,
    })
}

fn record_json(record: &UsageRecord) -> Result<String, LedgerError> {
    serde_json::to_string(record).map_err(|e| LedgerError::Corrupt {
        id: 0,
        field: "record_json",
        message: e.to_string(),
    })
}

const INSERT_RECORD: &str = "INSERT INTO records (id, idem_key, source, provider, content_hash,
     status, is_final, charge_period_start, charge_period_end, billing_account_id, sub_account_id,
     resource_type, resource_id, consumed_quantity, consumed_unit, billed_cost, billing_currency,
     rule, sink, subscription, customer, metric, value, value_property, last_error, first_run,
     last_run, staged_at, updated_at, correction_of, revision, match_hash)
 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
     ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?26, ?27, ?27, ?28, ?29, ?30)";

const INSERT_BODY: &str = "INSERT INTO record_bodies (id, payload, record) VALUES (?1, ?2, ?3)";

/// Insert new records and their bodies with ids `first_id..`, in the open transaction.
///
/// Values are bound straight from the rows, without a copy; numbers and timestamps are
/// formatted into reused buffers, so a record costs no allocation here.
fn insert_staged(
    handle: &mut sqlx::sqlite::LockedSqliteHandle<'_>,
    rows: &[&StageRow],
    first_id: i64,
    run_id: i64,
    now: &str,
) -> Result<(), LedgerError> {
    use std::fmt::Write;
    let raw = raw::Raw::new(handle);
    let mut record = raw
        .prepare(INSERT_RECORD)
        .map_err(sqlite("preparing the staging statement"))?;
    let mut body = raw
        .prepare(INSERT_BODY)
        .map_err(sqlite("preparing the staging statement"))?;
    // Numbers are written into reused buffers, bound in place (no copy: see `run_with`).
    let mut quantity = String::with_capacity(32);
    let mut cost = String::with_capacity(32);
    let mut value = String::with_capacity(32);
    // Rows come window by window, so their periods repeat: each is written out once.
    let mut start = TsText::default();
    let mut end = TsText::default();
    for (i, r) in rows.iter().enumerate() {
        let id = first_id + i as i64;
        let rec = &r.record;
        let m = &r.mapped;
        quantity.clear();
        let _ = write!(quantity, "{}", rec.consumed_quantity);
        cost.clear();
        let _ = write!(cost, "{}", rec.billed_cost);
        value.clear();
        if let Some(v) = m.value {
            let _ = write!(value, "{v}");
        }
        let value_text = m.value.map(|_| value.as_str());
        let (start_text, end_text) = (
            start.of(rec.charge_period_start),
            end.of(rec.charge_period_end),
        );
        record
            .run_with(|s| {
                s.int(1, id)?;
                s.text(2, &r.key)?;
                s.text(3, &rec.source)?;
                s.text(4, &rec.provider)?;
                s.text(5, &r.content_hash)?;
                s.text(6, r.status.as_str())?;
                s.int(7, i64::from(rec.is_final))?;
                s.text(8, start_text)?;
                s.text(9, end_text)?;
                s.text(10, &rec.billing_account_id)?;
                s.text(11, &rec.sub_account_id)?;
                s.text(12, &rec.resource_type)?;
                s.text(13, &rec.resource_id)?;
                s.text(14, &quantity)?;
                s.text(15, &rec.consumed_unit)?;
                s.text(16, &cost)?;
                s.text(17, &rec.billing_currency)?;
                s.opt_text(18, m.rule.as_deref())?;
                s.opt_text(19, m.sink.as_deref())?;
                s.opt_text(20, m.subscription.as_deref())?;
                s.opt_text(21, m.customer.as_deref())?;
                s.opt_text(22, m.metric.as_deref())?;
                s.opt_text(23, value_text)?;
                s.opt_text(24, m.value_property.as_deref())?;
                s.opt_text(25, r.note.as_deref())?;
                s.int(26, run_id)?;
                s.text(27, now)?;
                s.opt_int(28, r.correction_of)?;
                s.int(29, r.revision)?;
                s.text(30, r.match_hash.as_str())
            })
            .map_err(|source| LedgerError::StageRecord {
                context: "staging records",
                key: r.key.clone(),
                source,
            })?;
        let stored = r.stored_body()?;
        body.run_with(|b| {
            b.int(1, id)?;
            b.opt_text(2, m.payload.as_deref())?;
            b.blob(3, &stored)
        })
        .map_err(|source| LedgerError::StageRecord {
            context: "staging record bodies",
            key: r.key.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The last timestamp written out by [`write_ts`], kept with its text.
#[derive(Default)]
struct TsText {
    last: Option<DateTime<Utc>>,
    text: String,
}

impl TsText {
    fn of(&mut self, t: DateTime<Utc>) -> &str {
        if self.last != Some(t) {
            self.text.clear();
            write_ts(&mut self.text, t);
            self.last = Some(t);
        }
        &self.text
    }
}

/// [`ts`] into a buffer, without allocating.
fn write_ts(buf: &mut String, t: DateTime<Utc>) {
    if !crate::record::write_utc_fields(buf, t, "-", ":", "Z") {
        buf.push_str(&ts(t));
    }
}

/// What the ledger holds for a key that staging meets again.
#[derive(Debug, Clone)]
pub struct KnownRecord {
    pub id: i64,
    pub status: Status,
    pub content_hash: String,
    /// The stored `match_hash`; `None` for a record staged before the column existed.
    /// [`Ledger::known`] and staging give such a record read again with the same content hash
    /// the match hash of the content the ledger holds for it, so `None` is left only where the
    /// content hash differs anyway.
    pub match_hash: Option<MatchHash>,
    /// Staged before `match_hash` existed: the hash above was derived from the stored content,
    /// and staging stores it when the row read again is unchanged.
    pub unhashed: bool,
}

impl KnownRecord {
    fn of(id: i64, status: Status, row: &StageRow) -> Self {
        KnownRecord {
            id,
            status,
            content_hash: row.content_hash.clone(),
            match_hash: Some(row.match_hash),
            unhashed: false,
        }
    }

    /// Whether `row` is the content the ledger holds: the same content hash and match hash.
    /// Anything else is a change (restaged, corrected or left to a person).
    pub fn holds(&self, row: &StageRow) -> bool {
        self.content_hash == row.content_hash && self.match_hash == Some(row.match_hash)
    }
}

/// Which keys exist, with their id, status and hashes: one prepared point query per key on the
/// unique index (the raw handle: staging looks up every record it stages).
fn lookup<'k>(
    handle: &mut sqlx::sqlite::LockedSqliteHandle<'_>,
    keys: impl Iterator<Item = &'k str>,
) -> Result<HashMap<String, KnownRecord>, LedgerError> {
    let raw = raw::Raw::new(handle);
    let mut query = raw
        .prepare("SELECT id, content_hash, status, match_hash FROM records WHERE idem_key = ?1")
        .map_err(sqlite("preparing the staging look-up"))?;
    let mut found = HashMap::new();
    for key in keys {
        query
            .text(1, key)
            .map_err(sqlite("looking up staged records"))?;
        let Some(row) = query
            .next_row()
            .map_err(sqlite("looking up staged records"))?
        else {
            continue;
        };
        let id = row.int(0);
        let content_hash = row.text(1).unwrap_or_default().to_owned();
        let status =
            row.text(2)
                .unwrap_or_default()
                .parse()
                .map_err(|message| LedgerError::Corrupt {
                    id,
                    field: "status",
                    message,
                })?;
        // Parsed in place: no allocation per key.
        let match_hash = row.text(3).and_then(MatchHash::parse);
        found.insert(
            key.to_owned(),
            KnownRecord {
                id,
                status,
                content_hash,
                match_hash,
                unhashed: false,
            },
        );
        // `idem_key` is unique: drain the query so it is reset for the next key.
        while query
            .next_row()
            .map_err(sqlite("looking up staged records"))?
            .is_some()
        {}
    }
    Ok(found)
}

/// For each record staged before `match_hash` existed (NULL) that `rows` read again with the
/// same content hash: the match hash of the content the ledger holds for it, taken from its
/// latest change kept in `record_changes` (a pending or sent record's columns follow it), else
/// from its body, whichever has the stored content hash. So a name or description that changed
/// across the upgrade is a change on the first re-read, and an unchanged re-read stays a no-op.
/// With neither (`vacuum` pruned both) the held content is unknown: the row read again is taken
/// as held, as before the match hash existed.
///
/// Reads only for such records, each once: staging then stores the hash
/// ([`store_match_hashes`]). Pages with none (every page once the look-back has been read
/// again) cost a pass over the keys found.
fn resolve_unhashed<'r>(
    handle: &mut sqlx::sqlite::LockedSqliteHandle<'_>,
    known: &mut HashMap<String, KnownRecord>,
    rows: impl DoubleEndedIterator<Item = &'r StageRow>,
) -> Result<(), LedgerError> {
    if known.values().all(|k| k.match_hash.is_some()) {
        return Ok(());
    }
    let raw = raw::Raw::new(handle);
    let mut statements = None;
    // Last rows first: a key a page repeats is staged with its last content.
    for row in rows.rev() {
        let Some(k) = known.get_mut(&row.key) else {
            continue;
        };
        if k.match_hash.is_some() || k.content_hash != row.content_hash {
            continue;
        }
        if statements.is_none() {
            statements = Some(HeldContent::prepare(&raw)?);
        }
        let Some(held) = statements.as_mut() else {
            continue;
        };
        k.match_hash = Some(
            held.match_hash(k.id, &k.content_hash)?
                .unwrap_or(row.match_hash),
        );
        k.unhashed = true;
    }
    Ok(())
}

const HELD_CONTEXT: &str = "reading the content held for a record staged before match hashes";

/// The content the ledger holds for a record staged before match hashes, read for its match
/// hash: the record's latest change kept in `record_changes` (a pending or sent record's
/// columns follow it), else its body, whichever has the content hash asked for.
struct HeldContent<'r, 'h> {
    change: raw::Statement<'r, 'h>,
    body: raw::Statement<'r, 'h>,
}

impl<'r, 'h> HeldContent<'r, 'h> {
    fn prepare(raw: &'r raw::Raw<'h>) -> Result<Self, LedgerError> {
        Ok(HeldContent {
            change: raw
                .prepare(
                    "SELECT content_hash, record_json FROM record_changes
                     WHERE record_id = ?1 ORDER BY id DESC LIMIT 1",
                )
                .map_err(sqlite(HELD_CONTEXT))?,
            body: raw
                .prepare("SELECT record FROM record_bodies WHERE id = ?1")
                .map_err(sqlite(HELD_CONTEXT))?,
        })
    }

    /// The match hash of the content held for record `id` under `content_hash`; `None` when
    /// neither its latest change nor its body has that content (`vacuum` pruned the body) or
    /// it cannot be read.
    fn match_hash(
        &mut self,
        id: i64,
        content_hash: &str,
    ) -> Result<Option<MatchHash>, LedgerError> {
        let (change, body) = (&mut self.change, &mut self.body);
        let mut held: Option<UsageRecord> = None;
        change.int(1, id).map_err(sqlite(HELD_CONTEXT))?;
        if let Some(r) = change.next_row().map_err(sqlite(HELD_CONTEXT))? {
            if r.text(0) == Some(content_hash) {
                match serde_json::from_str(r.text(1).unwrap_or_default()) {
                    Ok(record) => held = Some(record),
                    Err(e) => {
                        tracing::warn!(id, error = %e, "an unreadable change of a record: its re-read is compared by content hash only")
                    }
                }
            }
        }
        while change.next_row().map_err(sqlite(HELD_CONTEXT))?.is_some() {}
        if held.is_none() {
            body.int(1, id).map_err(sqlite(HELD_CONTEXT))?;
            if let Some(r) = body.next_row().map_err(sqlite(HELD_CONTEXT))? {
                let bytes = r.blob(0);
                if !bytes.is_empty() {
                    match body::decode(bytes) {
                        Ok(record) if record.content_hash() == content_hash => held = Some(record),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(id, error = %e, "an unreadable record body: its re-read is compared by content hash only")
                        }
                    }
                }
            }
            while body.next_row().map_err(sqlite(HELD_CONTEXT))?.is_some() {}
        }
        Ok(held.map(|r| r.match_hash()))
    }
}

/// Store the match hash of rows staged before it existed (see [`resolve_unhashed`]).
fn store_match_hashes(
    handle: &mut sqlx::sqlite::LockedSqliteHandle<'_>,
    hashes: &[(i64, MatchHash)],
) -> Result<(), LedgerError> {
    if hashes.is_empty() {
        return Ok(());
    }
    let raw = raw::Raw::new(handle);
    let mut update = raw
        .prepare("UPDATE records SET match_hash = ?2 WHERE id = ?1")
        .map_err(sqlite("preparing to store match hashes"))?;
    for (id, hash) in hashes {
        update
            .run_with(|v| {
                v.int(1, *id)?;
                v.text(2, hash.as_str())
            })
            .map_err(sqlite("storing the match hash of a record"))?;
    }
    Ok(())
}

/// A change of a sent record, written to `record_changes` once the correction rows exist.
struct ChangeSeen<'a> {
    record_id: i64,
    row: &'a StageRow,
    state: &'static str,
    difference: Option<String>,
    note: Option<String>,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// What went out for record `id`: the original and its sent or pending corrections, except
/// `exclude` (the correction being replayed).
async fn sent_state(
    conn: &mut sqlx::SqliteConnection,
    id: i64,
    exclude: Option<i64>,
) -> Result<SentState, LedgerError> {
    // Decimals are summed here, exactly, from their text: SQLite's SUM would round them.
    // A correction held back after an unclear delivery (`rejected` with `unclear_at`: the
    // sink may have counted it, see `Sink::dedup_window`) counts as gone out: a person settles
    // it (`ledger mark-delivered` if the sink counted it, else a replay, which re-derives it
    // against the others), and measured without it the next correction would bill it twice.
    let r = sqlx::query(
        "SELECT o.idem_key, o.subscription, o.metric, o.sink, o.value,
             (SELECT group_concat(c.value, ' ') FROM records c
                WHERE c.correction_of = o.id AND (c.status IN ('pending', 'sent') OR (c.status = 'rejected' AND c.unclear_at IS NOT NULL)) AND c.id IS NOT ?2),
             (SELECT COALESCE(MAX(c.revision), 0) FROM records c WHERE c.correction_of = o.id),
             (SELECT b.record FROM record_bodies b WHERE b.id = o.id),
             (SELECT group_concat(c.billed_cost, ' ') FROM records c
                WHERE c.correction_of = o.id AND (c.status IN ('pending', 'sent') OR (c.status = 'rejected' AND c.unclear_at IS NOT NULL)) AND c.id IS NOT ?2),
             (SELECT group_concat(c.consumed_quantity, ' ') FROM records c
                WHERE c.correction_of = o.id AND (c.status IN ('pending', 'sent') OR (c.status = 'rejected' AND c.unclear_at IS NOT NULL)) AND c.id IS NOT ?2),
             o.value_property, o.billing_currency
         FROM records o WHERE o.id = ?1",
    )
    .bind(id)
    .bind(exclude)
    .fetch_one(&mut *conn)
    .await
    .map_err(sql("reading what was sent for a record"))?;
    let key: String = r.get(0);
    let sum = |field: &'static str, first: Decimal, rest: Option<String>| {
        let mut total = first;
        for v in rest.as_deref().unwrap_or("").split_whitespace() {
            let v = Decimal::from_str(v).map_err(|e| LedgerError::Corrupt {
                id,
                field,
                message: format!("a correction's {field} {v:?}: {e}"),
            })?;
            total = total.checked_add(v).ok_or_else(|| LedgerError::Overflow {
                key: key.clone(),
                what: format!("the {field} sent so far (the original plus its corrections)"),
            })?;
        }
        Ok::<_, LedgerError>(total)
    };
    let original: Option<String> = r.get(4);
    let original = Decimal::from_str(original.as_deref().unwrap_or("0")).map_err(|e| {
        LedgerError::Corrupt {
            id,
            field: "value",
            message: e.to_string(),
        }
    })?;
    let sent_total = sum("value", original, r.get(5))?;
    let last_revision: i64 = r.get(6);
    // The original's body is what was sent (its content columns follow the latest content
    // instead); `vacuum` empties it.
    let body: Option<Vec<u8>> = r.get(7);
    let (sent_cost, sent_quantity) = if body.as_deref().unwrap_or_default().is_empty() {
        (None, None)
    } else {
        let sent = decode_body(id, body.as_deref())?;
        (
            Some(sum("billed_cost", sent.billed_cost, r.get(8))?),
            Some(sum("consumed_quantity", sent.consumed_quantity, r.get(9))?),
        )
    };
    Ok(SentState {
        key,
        subscription: r.get(1),
        metric: r.get(2),
        sink: r.get(3),
        value_property: r.get(10),
        billing_currency: r.get(11),
        sent_total,
        sent_cost,
        sent_quantity,
        next_revision: last_revision + 1,
    })
}

/// The rows of a query selecting `id, idem_key, payload, unclear_at` of pending records, as
/// deliveries.
fn read_outgoing(
    query: &mut raw::Statement<'_, '_>,
    out: &mut Vec<Outgoing>,
) -> Result<(), LedgerError> {
    const CONTEXT: &str = "reading pending records";
    while let Some(row) = query.next_row().map_err(sqlite(CONTEXT))? {
        let id = row.int(0);
        let text = |column, field, what| {
            row.text(column)
                .map(str::to_owned)
                .ok_or_else(|| LedgerError::Corrupt {
                    id,
                    field,
                    message: format!("a pending record has no {what} (or it is not UTF-8)"),
                })
        };
        let unclear_since = match row.text(3) {
            None => None,
            Some(t) => Some(parse_ts(id, "unclear_at", t)?),
        };
        out.push(Outgoing {
            id,
            key: text(1, "idem_key", "key")?,
            payload: text(2, "payload", "frozen payload")?,
            unclear_since,
        });
    }
    Ok(())
}

/// Rewrite a held record (never offered to a sink) with new content, mapping and payload,
/// keeping its id and key. A pending or sent record is left as it is (its payload may be at a
/// sink): `false`.
async fn restage(
    tx: &mut sqlx::SqliteConnection,
    id: i64,
    row: &StageRow,
    run_id: i64,
    now_s: &str,
) -> Result<bool, LedgerError> {
    let rec = &row.record;
    let changed = sqlx::query(
        "UPDATE records SET content_hash = ?2, status = ?3, is_final = ?4, charge_period_start = ?5,
             charge_period_end = ?6, billing_account_id = ?7, sub_account_id = ?8, resource_type = ?9,
             resource_id = ?10, consumed_quantity = ?11, consumed_unit = ?12, billed_cost = ?13,
             billing_currency = ?14, rule = ?15, sink = ?16, subscription = ?17, customer = ?18,
             metric = ?19, value = ?20, last_error = ?21,
             attempts = 0, last_run = ?22, updated_at = ?23, value_property = ?24,
             match_hash = ?25
         WHERE id = ?1 AND status NOT IN ('sent', 'pending')",
    )
    .bind(id)
    .bind(&row.content_hash)
    .bind(row.status.as_str())
    .bind(rec.is_final)
    .bind(ts(rec.charge_period_start))
    .bind(ts(rec.charge_period_end))
    .bind(rec.billing_account_id.as_str())
    .bind(rec.sub_account_id.as_str())
    .bind(rec.resource_type.as_str())
    .bind(rec.resource_id.as_str())
    .bind(rec.consumed_quantity.to_string())
    .bind(rec.consumed_unit.as_str())
    .bind(rec.billed_cost.to_string())
    .bind(rec.billing_currency.as_str())
    .bind(row.mapped.rule.as_deref())
    .bind(row.mapped.sink.as_deref())
    .bind(row.mapped.subscription.as_deref())
    .bind(row.mapped.customer.as_deref())
    .bind(row.mapped.metric.as_deref())
    .bind(row.mapped.value.map(|v| v.to_string()))
    .bind(&row.note)
    .bind(run_id)
    .bind(now_s)
    .bind(row.mapped.value_property.as_deref())
    .bind(row.match_hash.as_str())
    .execute(&mut *tx)
    .await
    .map_err(sql("restaging a changed record"))?
    .rows_affected();
    if changed == 0 {
        return Ok(false);
    }
    sqlx::query("UPDATE record_bodies SET payload = ?2, record = ?3 WHERE id = ?1")
        .bind(id)
        .bind(&row.mapped.payload)
        .bind(row.stored_body()?.as_ref())
        .execute(&mut *tx)
        .await
        .map_err(sql("restaging a changed record"))?;
    Ok(true)
}

async fn upsert_cursor(
    tx: &mut sqlx::SqliteConnection,
    run_id: i64,
    source: &str,
    stream: &str,
    value: &str,
    now: DateTime<Utc>,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO cursors (source, stream, value, run_id, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (source, stream) DO UPDATE SET value = excluded.value,
             run_id = excluded.run_id, updated_at = excluded.updated_at",
    )
    .bind(source)
    .bind(stream)
    .bind(value)
    .bind(run_id)
    .bind(ts(now))
    .execute(&mut *tx)
    .await
    .map_err(sql("advancing a cursor"))?;
    Ok(())
}

// ----- period pricing ---------------------------------------------------------------------
//
// `period: month` pricing settles a (sink, subscription, metric, month) group with one
// adjustment record (see `mapping/period.rs`). The ledger keeps each record's share of its
// month and which groups changed since they were last settled; the adjustment itself is staged
// through [`Ledger::stage`] like any record, so its key, its frozen payload and its corrections
// (`<key>.r<n>`) follow the same rules.

/// Identity of a period group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodGroupRow {
    pub group_key: String,
    pub sink: String,
    pub subscription: String,
    pub metric: String,
    pub label: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// The key of the group's adjustment record.
    pub adjustment_key: String,
}

/// A record's share of its month, as the mapping computed it for the content being staged.
#[derive(Debug, Clone)]
pub struct PeriodShareRow {
    pub key: String,
    pub content_hash: String,
    /// The record's match hash: with `content_hash`, the content the share was computed for.
    pub match_hash: MatchHash,
    pub group: PeriodGroupRow,
    /// The value at the input of the monthly tiers.
    pub base: Decimal,
    /// The period rule, JSON.
    pub spec: String,
    pub is_final: bool,
    pub charge_period_start: DateTime<Utc>,
    pub charge_period_end: DateTime<Utc>,
}

/// A group due for settlement, with its last settlement.
#[derive(Debug, Clone)]
pub struct PeriodGroupState {
    pub group: PeriodGroupRow,
    pub settled_at: Option<String>,
}

/// What the ledger holds for a member record.
#[derive(Debug, Clone)]
pub struct PeriodMemberRecord {
    pub id: i64,
    /// The configured source the record came from.
    pub source: String,
    pub status: Status,
    pub content_hash: String,
    /// `None` for a record staged before match hashes, not read again since.
    pub match_hash: Option<MatchHash>,
    /// The record's value (what it carries to the sink).
    pub value: Decimal,
    /// The sum of its corrections (rejected ones excluded); `None` when it is beyond the range
    /// of a decimal.
    pub corrections: Option<Decimal>,
    pub customer: Option<String>,
    pub value_property: Option<String>,
    pub rule: Option<String>,
    /// Where the record goes: for a sent or pending record, where it was billed (or is queued
    /// to be), which a later content cannot move.
    pub sink: Option<String>,
    pub subscription: Option<String>,
    pub metric: Option<String>,
    /// A change of the record waits for a person (`unresolved`): its share may already follow
    /// content nobody approved, so its month waits too.
    pub open_change: bool,
    /// A correction of the record is held (refused by the sink, or unmapped by a replay): its
    /// share follows the corrected content while the sink does not hold the difference.
    pub held_correction: bool,
}

/// A month's adjustment as the ledger holds it ([`Ledger::adjustment_as_sent`]).
#[derive(Debug, Clone)]
pub struct AsSent {
    pub status: Status,
    /// The rule, customer, event property and currency it went out (or is queued to go out)
    /// with: a correction of it must go out with the same, or the sink would not add it up.
    pub rule: Option<String>,
    pub customer: Option<String>,
    pub value_property: Option<String>,
    pub billing_currency: Option<String>,
    /// A change of it waits for a person (`unresolved`): the sink does not hold the month's
    /// settlement.
    pub open_change: bool,
}

/// One member of a group: its share and the ledger's record (`None`: not staged yet).
#[derive(Debug, Clone)]
pub struct PeriodMemberRow {
    pub key: String,
    pub base: Decimal,
    pub spec: String,
    pub share_hash: String,
    /// The match hash the share was computed for (`None`: kept before match hashes).
    pub share_match_hash: Option<MatchHash>,
    pub is_final: bool,
    pub charge_period_start: DateTime<Utc>,
    pub charge_period_end: DateTime<Utc>,
    pub record: Option<PeriodMemberRecord>,
}

/// A record [`Ledger::mark_delivered`] marked delivered by hand.
#[derive(Debug, Clone)]
pub struct MarkedDelivered {
    pub id: i64,
    pub sink: Option<String>,
    /// The refusal it replaces.
    pub refusal: Option<String>,
    /// The audit line's detail (JSON), also the run's summary.
    pub detail: String,
}

/// Period groups for `billsync status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeriodStatus {
    /// Groups never settled (their month has not closed yet, or waits for its close delay).
    pub open: i64,
    /// Settled groups with no change since.
    pub settled: i64,
    /// Settled groups changed since (settled again by the next run).
    pub changed: i64,
    /// Groups that cannot be settled, with the reason: (group label, note).
    pub problems: Vec<(String, String)>,
    /// How many groups cannot be settled (`problems` shows the first 20).
    pub unsettleable: i64,
    /// The end of the oldest month waiting to be settled, or settled again after a change
    /// (`dirty`): a month that stays there well past `period_close_delay` is stuck (a change
    /// waiting for a person, a source that keeps failing, a problem).
    pub oldest_due_end: Option<DateTime<Utc>>,
}

fn parse_ts(id: i64, field: &'static str, text: &str) -> Result<DateTime<Utc>, LedgerError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| LedgerError::Corrupt {
            id,
            field,
            message: e.to_string(),
        })
}

fn parse_dec(id: i64, field: &'static str, text: &str) -> Result<Decimal, LedgerError> {
    Decimal::from_str(text).map_err(|e| LedgerError::Corrupt {
        id,
        field,
        message: e.to_string(),
    })
}

/// What `period_members` keeps for a key that a page's shares meet again.
/// What the ledger holds of a sent or pending record that has no period share.
struct FrozenContent {
    content_hash: String,
    /// `None`: staged before match hashes.
    match_hash: Option<MatchHash>,
    /// The state of its latest change (`None`: never changed since it was staged).
    latest_change: Option<String>,
}

struct KnownShare {
    group: String,
    content_hash: String,
    /// `None`: kept before match hashes (see [`resolve_unhashed_shares`]).
    match_hash: Option<MatchHash>,
    /// The record is sent or pending: its payload is frozen.
    frozen: bool,
    /// Kept before match hashes: `match_hash` was derived from the content the ledger holds,
    /// and is stored when the share kept again is the same.
    unhashed: bool,
}

/// For each share kept before match hashes (NULL) that `shares` keep again in the same group
/// with the same content hash: the match hash of the content it was computed for. A share is
/// kept just before its record is staged, with the same content, so that is the content the
/// ledger holds for the record under that content hash: the record's stored match hash, else
/// its latest change or its body ([`HeldContent`]). So a record renamed or re-described across
/// the upgrade (another rule, another value at the input of the month's tiers) gets its share
/// computed again on its first re-read, as its record is corrected or restaged; an unchanged
/// one keeps its share (a mapping changed since does not reprice it, as before). With no record
/// (its staging never committed) or no content left (`vacuum`), the share is taken as computed
/// for the content read now, as before match hashes.
///
/// Reads only for such shares, each once (the hash is stored then); the caller skips it when
/// every share found has a match hash.
fn resolve_unhashed_shares(
    handle: &mut sqlx::sqlite::LockedSqliteHandle<'_>,
    known: &mut HashMap<String, KnownShare>,
    shares: &[PeriodShareRow],
) -> Result<(), LedgerError> {
    const CONTEXT: &str = "reading the record of a period share kept before match hashes";
    let raw = raw::Raw::new(handle);
    let mut statements = None;
    // Last shares first: a key a page repeats is staged with its last content.
    for s in shares.iter().rev() {
        let Some(k) = known.get_mut(&s.key) else {
            continue;
        };
        if k.match_hash.is_some()
            || k.group != s.group.group_key
            || k.content_hash != s.content_hash
        {
            continue;
        }
        if statements.is_none() {
            statements = Some((
                raw.prepare("SELECT id, content_hash, match_hash FROM records WHERE idem_key = ?1")
                    .map_err(sqlite(CONTEXT))?,
                HeldContent::prepare(&raw)?,
            ));
        }
        let Some((record, held)) = statements.as_mut() else {
            continue;
        };
        record.text(1, &s.key).map_err(sqlite(CONTEXT))?;
        let found = record.next_row().map_err(sqlite(CONTEXT))?.map(|r| {
            let stored = if r.text(1) == Some(k.content_hash.as_str()) {
                r.text(2).and_then(MatchHash::parse)
            } else {
                None
            };
            (r.int(0), stored)
        });
        while record.next_row().map_err(sqlite(CONTEXT))?.is_some() {}
        let computed_for = match found {
            Some((_, Some(stored))) => Some(stored),
            Some((id, None)) => held.match_hash(id, &k.content_hash)?,
            None => None,
        };
        k.match_hash = Some(computed_for.unwrap_or(s.match_hash));
        k.unhashed = true;
    }
    Ok(())
}

impl Ledger {
    /// Keep the period shares of a page, just before it is staged. A share that changed marks
    /// its group (and the group it left) for settlement. `others` are the page's keys that have
    /// no monthly share now: an unsent one leaves its group; a sent one stays in the group it
    /// was billed in (its value is in the sink under that subscription and metric).
    /// A pending record counts as sent here: neither staging nor replay changes its payload
    /// (it may be at the sink already), so it goes out as it was and stays in its group.
    ///
    /// The share of a sent or pending record is what was billed: new content of it is not
    /// kept here but returned, for [`Ledger::stage_pages`] to keep in the staging transaction
    /// only if the new content goes out there (a correction, or no difference to send); a
    /// change left to a person leaves the share as it was. Nothing is written for those before
    /// staging, so a crash in between leaves the share and the record as they were, and the
    /// re-read decides again. A sent or pending record without a share (billed before its rule
    /// was priced by the month) gets one now only for content that went out (unchanged since
    /// it was sent, or last changed by a correction); new content is left to staging like the
    /// others, and content left to a person or kept as sent keeps it out of the month.
    pub async fn register_period_shares(
        &self,
        shares: &[PeriodShareRow],
        others: &[&str],
    ) -> Result<Vec<PeriodShareRow>, LedgerError> {
        let mut deferred = Vec::new();
        if shares.is_empty() && others.is_empty() {
            return Ok(deferred);
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(sql("beginning a transaction"))?;
        for chunk in others.chunks(LOOKUP_KEYS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "DELETE FROM period_members WHERE NOT EXISTS (SELECT 1 FROM records r
                     WHERE r.idem_key = period_members.idem_key
                       AND (r.status = 'sent' OR r.status = 'pending'))
                   AND idem_key IN (",
            );
            push_list(&mut qb, chunk.iter().copied());
            qb.push(") RETURNING group_key");
            let left: Vec<String> = qb
                .build_query_scalar()
                .persistent(chunk.len() == LOOKUP_KEYS_PER_STATEMENT)
                .fetch_all(&mut *tx)
                .await
                .map_err(sql("removing period shares"))?;
            for g in left {
                mark_dirty(&mut tx, &g).await?;
            }
        }
        // What each key has kept, if anything.
        let mut known: HashMap<String, KnownShare> = HashMap::new();
        let keys: Vec<&str> = shares.iter().map(|s| s.key.as_str()).collect();
        for r in rows_with_keys(
            &mut tx,
            "SELECT m.idem_key, m.group_key, m.content_hash, m.match_hash,
                 EXISTS (SELECT 1 FROM records r WHERE r.idem_key = m.idem_key
                     AND (r.status = 'sent' OR r.status = 'pending'))
             FROM period_members m WHERE m.idem_key IN (",
            &keys,
            "reading period shares",
        )
        .await?
        {
            known.insert(
                r.get(0),
                KnownShare {
                    group: r.get(1),
                    content_hash: r.get(2),
                    // Parsed in place: no allocation per share.
                    match_hash: r.get::<Option<&str>, _>(3).and_then(MatchHash::parse),
                    frozen: r.get(4),
                    unhashed: false,
                },
            );
        }
        if known.values().any(|k| k.match_hash.is_none()) {
            let mut handle = tx
                .lock_handle()
                .await
                .map_err(sql("locking the connection for period shares"))?;
            resolve_unhashed_shares(&mut handle, &mut known, shares)?;
        }
        // Sent or pending records without a share (billed before their rule priced by the
        // month): what the ledger holds of each, and the state of its latest change.
        let mut unshared: HashMap<String, FrozenContent> = HashMap::new();
        let without: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| !known.contains_key(*k))
            .collect();
        for r in rows_with_keys(
            &mut tx,
            "SELECT r.idem_key, r.content_hash, r.match_hash,
                 (SELECT x.state FROM record_changes x WHERE x.record_id = r.id
                    ORDER BY x.id DESC LIMIT 1)
             FROM records r WHERE (r.status = 'sent' OR r.status = 'pending')
               AND r.idem_key IN (",
            &without,
            "reading records without a period share",
        )
        .await?
        {
            unshared.insert(
                r.get(0),
                FrozenContent {
                    content_hash: r.get(1),
                    match_hash: r.get::<Option<&str>, _>(2).and_then(MatchHash::parse),
                    latest_change: r.get(3),
                },
            );
        }
        for s in shares {
            let g = &s.group;
            if let Some(f) = unshared.remove(&s.key) {
                let same = f.content_hash == s.content_hash
                    && f.match_hash.is_none_or(|m| m == s.match_hash);
                match (same, f.latest_change.as_deref()) {
                    // What the ledger holds is what went out (as sent, or through its last
                    // correction): the month counts it from now on.
                    (true, None | Some("corrected") | Some("no_difference")) => {}
                    // The content the ledger holds was never billed (a change left to a
                    // person, or kept as sent): its share would price the month on it. The
                    // record stays out of the month, billed as it was sent.
                    (true, Some(_)) => continue,
                    // New content: it counts only if it goes out, which staging decides.
                    (false, _) => {
                        deferred.push(s.clone());
                        continue;
                    }
                }
            }
            if let Some(k) = known.get_mut(&s.key) {
                if k.group == g.group_key
                    && k.content_hash == s.content_hash
                    && k.match_hash == Some(s.match_hash)
                {
                    if k.unhashed {
                        // Kept before match hashes, for the content read now: its hash is kept.
                        sqlx::query(
                            "UPDATE period_members SET match_hash = ?2 WHERE idem_key = ?1",
                        )
                        .bind(&s.key)
                        .bind(s.match_hash.as_str())
                        .execute(&mut *tx)
                        .await
                        .map_err(sql("keeping the match hash of a period share"))?;
                        k.unhashed = false;
                    }
                    continue;
                }
                if k.frozen {
                    // Billed: its share changes only with what goes out, which staging decides
                    // (a move to another subscription or metric is a change for a person, and
                    // it stays in the group it was billed in).
                    deferred.push(s.clone());
                    continue;
                }
                if k.group != g.group_key {
                    mark_dirty(&mut tx, &k.group).await?;
                }
            }
            put_share(&mut tx, s).await?;
            known.insert(
                s.key.clone(),
                KnownShare {
                    group: g.group_key.clone(),
                    content_hash: s.content_hash.clone(),
                    match_hash: Some(s.match_hash),
                    frozen: false,
                    unhashed: false,
                },
            );
        }
        tx.commit().await.map_err(sql("committing period shares"))?;
        Ok(deferred)
    }

    /// Groups changed since their last settlement (or never settled) whose month ended by `now`.
    pub async fn period_groups_due(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<PeriodGroupState>, LedgerError> {
        let rows = sqlx::query(
            "SELECT group_key, sink, subscription, metric, period_label, period_start, period_end,
                 adjustment_key, settled_at
             FROM period_groups WHERE dirty = 1 AND period_end <= ?1 ORDER BY period_end, group_key",
        )
        .bind(ts(now))
        .fetch_all(&self.pool)
        .await
        .map_err(sql("reading period groups"))?;
        rows.into_iter()
            .map(|r| {
                let start: String = r.get(5);
                let end: String = r.get(6);
                Ok(PeriodGroupState {
                    group: PeriodGroupRow {
                        group_key: r.get(0),
                        sink: r.get(1),
                        subscription: r.get(2),
                        metric: r.get(3),
                        label: r.get(4),
                        start: parse_ts(0, "period_start", &start)?,
                        end: parse_ts(0, "period_end", &end)?,
                        adjustment_key: r.get(7),
                    },
                    settled_at: r.get(8),
                })
            })
            .collect()
    }

    /// Other months of `group`'s sink, subscription and metric, with records, whose time range
    /// overlaps its own (`period_utc_offset` changed while records were staged): `(label,
    /// start)` each.
    pub async fn overlapping_period_groups(
        &self,
        group: &PeriodGroupRow,
    ) -> Result<Vec<(String, String)>, LedgerError> {
        let rows = sqlx::query(
            "SELECT period_label, period_start FROM period_groups
             WHERE sink = ?1 AND subscription = ?2 AND metric = ?3 AND group_key <> ?4
               AND period_start < ?6 AND period_end > ?5
               AND EXISTS (SELECT 1 FROM period_members m WHERE m.group_key = period_groups.group_key)
             ORDER BY period_start",
        )
        .bind(&group.sink)
        .bind(&group.subscription)
        .bind(&group.metric)
        .bind(&group.group_key)
        .bind(ts(group.start))
        .bind(ts(group.end))
        .fetch_all(&self.pool)
        .await
        .map_err(sql("reading overlapping period groups"))?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The members of a group with what the ledger holds for each.
    pub async fn period_group_members(
        &self,
        group_key: &str,
    ) -> Result<Vec<PeriodMemberRow>, LedgerError> {
        let rows = sqlx::query(
            "SELECT m.idem_key, m.base, m.spec, m.content_hash, m.is_final, m.charge_period_start,
                 m.charge_period_end, r.id, r.status, r.content_hash, r.value, r.customer,
                 r.value_property, r.rule,
                 (SELECT group_concat(c.value, ' ') FROM records c
                    WHERE c.correction_of = r.id AND c.status <> 'rejected'),
                 r.source, m.match_hash, r.match_hash, r.sink, r.subscription, r.metric,
                 EXISTS (SELECT 1 FROM record_changes x
                    WHERE x.record_id = r.id AND x.state = 'unresolved'),
                 EXISTS (SELECT 1 FROM records h WHERE h.correction_of = r.id
                    AND (h.status = 'rejected' OR h.status = 'unmapped'))
             FROM period_members m LEFT JOIN records r ON r.idem_key = m.idem_key
             WHERE m.group_key = ?1 ORDER BY m.idem_key",
        )
        .bind(group_key)
        .fetch_all(&self.pool)
        .await
        .map_err(sql("reading a period group"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: Option<i64> = r.get(7);
            let rid = id.unwrap_or(0);
            let base: String = r.get(1);
            let start: String = r.get(5);
            let end: String = r.get(6);
            let record = match id {
                None => None,
                Some(id) => {
                    let status: String = r.get(8);
                    let value: Option<String> = r.get(10);
                    let corrections: Option<String> = r.get(14);
                    let mut sum = Some(Decimal::ZERO);
                    for v in corrections.as_deref().unwrap_or("").split_whitespace() {
                        let v = parse_dec(id, "value", v)?;
                        sum = sum.and_then(|s| s.checked_add(v));
                    }
                    Some(PeriodMemberRecord {
                        id,
                        source: r.get(15),
                        status: status.parse().map_err(|message| LedgerError::Corrupt {
                            id,
                            field: "status",
                            message,
                        })?,
                        content_hash: r.get(9),
                        match_hash: r.get::<Option<&str>, _>(17).and_then(MatchHash::parse),
                        value: parse_dec(id, "value", value.as_deref().unwrap_or("0"))?,
                        corrections: sum,
                        customer: r.get(11),
                        value_property: r.get(12),
                        rule: r.get(13),
                        sink: r.get(18),
                        subscription: r.get(19),
                        metric: r.get(20),
                        open_change: r.get(21),
                        held_correction: r.get(22),
                    })
                }
            };
            out.push(PeriodMemberRow {
                key: r.get(0),
                base: parse_dec(rid, "period base", &base)?,
                spec: r.get(2),
                share_hash: r.get(3),
                share_match_hash: r.get::<Option<&str>, _>(16).and_then(MatchHash::parse),
                is_final: r.get(4),
                charge_period_start: parse_ts(rid, "charge_period_start", &start)?,
                charge_period_end: parse_ts(rid, "charge_period_end", &end)?,
                record,
            });
        }
        Ok(out)
    }

    /// What the ledger holds of a month's adjustment `key` (`None`: never staged): how it went
    /// out, from the columns a change of a sent or queued record leaves as they were, and
    /// whether a change of it waits for a person.
    pub async fn adjustment_as_sent(&self, key: &str) -> Result<Option<AsSent>, LedgerError> {
        let row = sqlx::query(
            "SELECT r.id, r.status, r.rule, r.customer, r.value_property, r.billing_currency,
                 EXISTS (SELECT 1 FROM record_changes x
                    WHERE x.record_id = r.id AND x.state = 'unresolved')
             FROM records r WHERE r.idem_key = ?1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(sql("reading a period adjustment"))?;
        row.map(|r| {
            let id: i64 = r.get(0);
            let status: String = r.get(1);
            Ok(AsSent {
                status: status.parse().map_err(|message| LedgerError::Corrupt {
                    id,
                    field: "status",
                    message,
                })?,
                rule: r.get(2),
                customer: r.get(3),
                value_property: r.get(4),
                billing_currency: r.get(5),
                open_change: r.get(6),
            })
        })
        .transpose()
    }

    /// Record a group's settlement (`total`: the month's total; clears `dirty`), or why it
    /// cannot be settled (`note`; the group stays due).
    pub async fn finish_period_group(
        &self,
        group_key: &str,
        run_id: i64,
        now: DateTime<Utc>,
        total: Option<Decimal>,
        note: Option<&str>,
    ) -> Result<(), LedgerError> {
        match total {
            Some(total) => sqlx::query(
                "UPDATE period_groups SET dirty = 0, settled_at = ?2, settled_run = ?3, total = ?4,
                     note = NULL
                 WHERE group_key = ?1",
            )
            .bind(group_key)
            .bind(ts(now))
            .bind(run_id)
            .bind(total.to_string()),
            None => sqlx::query("UPDATE period_groups SET note = ?2 WHERE group_key = ?1")
                .bind(group_key)
                .bind(note),
        }
        .execute(&self.pool)
        .await
        .map_err(sql("recording a period settlement"))?;
        Ok(())
    }

    /// Counts of period groups and their problems, for `billsync status`.
    pub async fn period_status(&self) -> Result<PeriodStatus, LedgerError> {
        let r = sqlx::query(
            "SELECT COALESCE(SUM(settled_at IS NULL), 0),
                    COALESCE(SUM(settled_at IS NOT NULL AND dirty = 0), 0),
                    COALESCE(SUM(settled_at IS NOT NULL AND dirty = 1), 0),
                    COALESCE(SUM(note IS NOT NULL), 0),
                    (SELECT MIN(period_end) FROM period_groups WHERE dirty = 1)
             FROM period_groups",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(sql("counting period groups"))?;
        let problems = sqlx::query(
            "SELECT subscription || ' ' || metric || ' ' || period_label, note FROM period_groups
             WHERE note IS NOT NULL ORDER BY period_end, group_key LIMIT 20",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(sql("reading period problems"))?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        let oldest: Option<String> = r.get(4);
        Ok(PeriodStatus {
            open: r.get(0),
            settled: r.get(1),
            changed: r.get(2),
            problems,
            unsettleable: r.get(3),
            oldest_due_end: oldest
                .map(|t| parse_ts(0, "period_groups.period_end", &t))
                .transpose()?,
        })
    }

    /// Put a rejected record back in the queue with its frozen payload (replay of a period
    /// adjustment, whose payload does not depend on the mapping files; not of a correction of
    /// one, see [`Ledger::supersede_adjustment_correction`]). Returns whether it was rejected.
    /// A person asked for it, so an earlier unclear delivery no longer holds it back.
    pub async fn requeue_rejected(
        &self,
        run_id: i64,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<bool, LedgerError> {
        let done = sqlx::query(
            "UPDATE records SET status = 'pending', attempts = 0, last_error = NULL, last_run = ?2,
                 updated_at = ?3, unclear_at = NULL
             WHERE id = ?1 AND status = 'rejected'
               AND id IN (SELECT id FROM record_bodies WHERE payload IS NOT NULL)",
        )
        .bind(id)
        .bind(run_id)
        .bind(ts(now))
        .execute(&self.pool)
        .await
        .map_err(sql("re-queueing a rejected record"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Replay of a refused correction of a period adjustment (`<key>.r<n>`, `rejected`): its
    /// frozen difference may be stale, since a later settlement measures against what went out,
    /// which the refused correction is not, so a later correction may carry it already. It is
    /// not sent again: it becomes `ignored` with `note`, and its month is marked for settlement
    /// with the adjustment's content hash cleared, so that the settlement compares the month's
    /// figures with what went out even when they did not change (content that the ledger holds
    /// already would otherwise be a no-op), and sends what is still missing as the next
    /// correction, or nothing. One transaction. Returns whether it was such a correction (a
    /// rejected correction whose adjustment has a month in the ledger); otherwise nothing
    /// changes.
    pub async fn supersede_adjustment_correction(
        &self,
        run_id: i64,
        id: i64,
        note: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, LedgerError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(sql("beginning a transaction"))?;
        let original: Option<i64> = sqlx::query_scalar(
            "UPDATE records SET status = 'ignored', last_error = ?2, attempts = 0, last_run = ?3,
                 updated_at = ?4
             WHERE id = ?1 AND status = 'rejected' AND correction_of IS NOT NULL
             RETURNING correction_of",
        )
        .bind(id)
        .bind(note)
        .bind(run_id)
        .bind(ts(now))
        .fetch_optional(&mut *tx)
        .await
        .map_err(sql("superseding a refused adjustment correction"))?;
        let Some(original) = original else {
            return Ok(false);
        };
        // `period_members` never holds an adjustment: its month is the one it adjusts.
        let months = sqlx::query(
            "UPDATE period_groups SET dirty = 1
             WHERE adjustment_key = (SELECT idem_key FROM records WHERE id = ?1)",
        )
        .bind(original)
        .execute(&mut *tx)
        .await
        .map_err(sql("marking the month of an adjustment"))?
        .rows_affected();
        if months == 0 {
            // Not an adjustment (or its month is gone): left as it was, for a person.
            return Ok(false);
        }
        sqlx::query("UPDATE records SET content_hash = '' WHERE id = ?1")
            .bind(original)
            .execute(&mut *tx)
            .await
            .map_err(sql("marking an adjustment to compare again"))?;
        tx.commit()
            .await
            .map_err(sql("committing a superseded adjustment correction"))?;
        Ok(true)
    }
}

/// Add an operator action to the audit trail, in the caller's transaction when it has one.
async fn write_audit(
    conn: &mut sqlx::SqliteConnection,
    run_id: i64,
    at: &str,
    action: &str,
    detail: &str,
) -> Result<(), LedgerError> {
    sqlx::query("INSERT INTO audit (run_id, at, action, detail) VALUES (?1, ?2, ?3, ?4)")
        .bind(run_id)
        .bind(at)
        .bind(action)
        .bind(detail)
        .execute(&mut *conn)
        .await
        .map_err(sql("writing the audit trail"))?;
    Ok(())
}

/// Queue held record `id` (rejected or provisional) again with its frozen payload, in
/// staging's transaction; `false` if it is not held so or has no payload.
async fn requeue_as_it_was(
    conn: &mut sqlx::SqliteConnection,
    id: i64,
    run_id: i64,
    now_s: &str,
) -> Result<bool, LedgerError> {
    let done = sqlx::query(
        "UPDATE records SET status = 'pending', attempts = 0, last_error = NULL, last_run = ?2,
             updated_at = ?3
         WHERE id = ?1 AND status IN ('rejected', 'provisional')
           AND id IN (SELECT id FROM record_bodies WHERE payload IS NOT NULL)",
    )
    .bind(id)
    .bind(run_id)
    .bind(now_s)
    .execute(&mut *conn)
    .await
    .map_err(sql("re-queueing a held record"))?;
    Ok(done.rows_affected() == 1)
}

/// Whether record `id` was held back by the push loop after an unclear delivery (rejected with
/// `unclear_at`): the sink may hold what it sent.
async fn held_back(conn: &mut sqlx::SqliteConnection, id: i64) -> Result<bool, LedgerError> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM records
             WHERE id = ?1 AND status = 'rejected' AND unclear_at IS NOT NULL)",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await
    .map_err(sql("reading whether a record was held back"))
}

/// Whether record `id` has corrections (of any status).
async fn has_corrections(conn: &mut sqlx::SqliteConnection, id: i64) -> Result<bool, LedgerError> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM records WHERE correction_of = ?1)")
        .bind(id)
        .fetch_one(&mut *conn)
        .await
        .map_err(sql("reading the corrections of a record"))
}

/// Keep share `s` of its group: the group is registered (marked for settlement) and the
/// record's share is set to `s`, in whichever group it was.
async fn put_share(tx: &mut sqlx::SqliteConnection, s: &PeriodShareRow) -> Result<(), LedgerError> {
    let g = &s.group;
    sqlx::query(
        "INSERT INTO period_groups (group_key, sink, subscription, metric, period_label,
             period_start, period_end, adjustment_key, dirty)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1)
         ON CONFLICT (group_key) DO UPDATE SET dirty = 1",
    )
    .bind(&g.group_key)
    .bind(&g.sink)
    .bind(&g.subscription)
    .bind(&g.metric)
    .bind(&g.label)
    .bind(ts(g.start))
    .bind(ts(g.end))
    .bind(&g.adjustment_key)
    .execute(&mut *tx)
    .await
    .map_err(sql("registering a period group"))?;
    sqlx::query(
        "INSERT INTO period_members (idem_key, group_key, content_hash, base, spec, is_final,
             charge_period_start, charge_period_end, match_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (idem_key) DO UPDATE SET group_key = excluded.group_key,
             content_hash = excluded.content_hash, base = excluded.base, spec = excluded.spec,
             is_final = excluded.is_final, charge_period_start = excluded.charge_period_start,
             charge_period_end = excluded.charge_period_end, match_hash = excluded.match_hash",
    )
    .bind(&s.key)
    .bind(&g.group_key)
    .bind(&s.content_hash)
    .bind(s.base.to_string())
    .bind(&s.spec)
    .bind(s.is_final)
    .bind(ts(s.charge_period_start))
    .bind(ts(s.charge_period_end))
    .bind(s.match_hash.as_str())
    .execute(&mut *tx)
    .await
    .map_err(sql("keeping a period share"))?;
    Ok(())
}

/// Keep, in the staging transaction, the share of a record whose new content staging sent on
/// its way (restaged, corrected, or nothing to correct). A sent or pending record (`frozen`)
/// whose share is in another month of the same sink, subscription and metric stays there, with
/// the new content's base: a frozen record is not moved between months by staging (see
/// `register_period_shares`), only its value changes. Otherwise the record takes the share as
/// it is, leaving its old group (a frozen record's new content went out under the sink,
/// subscription and metric it was billed in, so a share elsewhere was never billed there).
/// Each group touched is marked for settlement.
async fn follow_share(
    tx: &mut sqlx::SqliteConnection,
    s: &PeriodShareRow,
    frozen: bool,
) -> Result<(), LedgerError> {
    let held = sqlx::query(
        "SELECT m.group_key, g.sink, g.subscription, g.metric
         FROM period_members m LEFT JOIN period_groups g ON g.group_key = m.group_key
         WHERE m.idem_key = ?1",
    )
    .bind(&s.key)
    .fetch_optional(&mut *tx)
    .await
    .map_err(sql("reading a period share"))?;
    let Some(held) = held else {
        return put_share(tx, s).await;
    };
    let group: String = held.get(0);
    if group == s.group.group_key {
        return put_share(tx, s).await;
    }
    let same_place = held.get::<Option<&str>, _>(1) == Some(s.group.sink.as_str())
        && held.get::<Option<&str>, _>(2) == Some(s.group.subscription.as_str())
        && held.get::<Option<&str>, _>(3) == Some(s.group.metric.as_str());
    if frozen && same_place {
        sqlx::query(
            "UPDATE period_members SET content_hash = ?2, match_hash = ?3, base = ?4, spec = ?5,
                 is_final = ?6
             WHERE idem_key = ?1",
        )
        .bind(&s.key)
        .bind(&s.content_hash)
        .bind(s.match_hash.as_str())
        .bind(s.base.to_string())
        .bind(&s.spec)
        .bind(s.is_final)
        .execute(&mut *tx)
        .await
        .map_err(sql("keeping the period share of a corrected record"))?;
        return mark_dirty(tx, &group).await;
    }
    mark_dirty(tx, &group).await?;
    put_share(tx, s).await
}

async fn mark_dirty(tx: &mut sqlx::SqliteConnection, group_key: &str) -> Result<(), LedgerError> {
    sqlx::query("UPDATE period_groups SET dirty = 1 WHERE group_key = ?1")
        .bind(group_key)
        .execute(&mut *tx)
        .await
        .map_err(sql("marking a period group"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Timelike};

    /// Staging formats timestamps with `write_ts` (no allocation); every query compares them
    /// as text with `ts`, so the two must agree to the byte.
    #[test]
    fn staged_timestamps_are_written_exactly_as_ts_writes_them() {
        let times = [
            Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2026, 6, 30, 23, 59, 59).unwrap()
                + chrono::Duration::milliseconds(123),
            // A leap second (chrono keeps it in the nanoseconds).
            Utc.with_ymd_and_hms(2016, 12, 31, 23, 59, 59)
                .unwrap()
                .with_nanosecond(1_500_000_000)
                .unwrap(),
        ];
        for t in times {
            let mut buf = String::new();
            write_ts(&mut buf, t);
            assert_eq!(buf, ts(t), "{t:?}");
        }
    }
}
