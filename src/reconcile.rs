//! `billsync reconcile --period YYYY-MM`: does what the provider charged, what the mapping
//! made of it, what billsync sent and what the sink holds agree — and where they do not, why?
//!
//! Every sink can answer "200" for usage it later does not bill, so this is the check a billing
//! engineer runs before invoices close. Per source, billing account, subscription and metric it
//! lines up: the provider's cost, the mapped value (markup included), what was sent, what is
//! still pending, provisional or rejected, and the sink's read-back. Differences between the
//! mapped and the sent value are explained by the ledger's statuses; a difference between what
//! was sent and what the sink holds is explained only when the sink holds, once and with the
//! ledger's value, pending records the ledger has not acknowledged yet (a crash between the sink
//! storing and the ledger recording, repaired by the next run). Anything else (another value, a
//! second copy, a rejected or provisional record in the sink) is *unexplained* and makes the
//! command exit non-zero.
//!
//! A sink that keeps only aggregates (Stripe: what its meter counted per customer and event
//! name) is read back as one total per (sink, subscription, metric) and compared with what was
//! sent for that group ([`SinkTotal`]). A total cannot say which events it holds, so the only
//! explanation is the one the Lago read-back makes event by event, in bulk: pending records of
//! the group the sink may hold already (a run stopped after the sink took them and before the
//! ledger recorded it) explain a surplus they add up to exactly
//! ([`Line::pending_maybe_in_sink`]); anything else is unexplained.
//!
//! Memory follows the report, not the month: one read snapshot of the ledger
//! ([`PeriodSnapshot`]) is read twice, first every record in id order into the lines' sums,
//! then the valued records sorted by (sink, subscription, metric) (SQLite sorts them in a
//! temporary file), so that each group's records are matched against its read-back and dropped
//! before the next group's are read. Held at once: the report's lines (source × billing account
//! × subscription × metric × sink: customers, not records), the largest group's records and
//! read-back, and what the report lists (unknown events, at most 20 notes a line).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::ledger::{Ledger, LedgerError, PeriodGroupKey, PeriodRow, PeriodSnapshot, Status};
use crate::sinks::{ReadBackQuery, Sink};

/// The grouping of a reconciliation line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct LineKey {
    pub source: String,
    pub billing_account_id: String,
    /// `(unmapped)` and `(ignored)` for records without a target.
    pub subscription: String,
    pub metric: String,
    pub sink: String,
}

/// One line of the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Line {
    pub currency: String,
    pub records: u64,
    /// The provider's cost (latest content), in `currency`.
    pub provider_cost: Decimal,
    /// What the mapping made of it (markup, conversion, corrections included).
    pub mapped: Decimal,
    pub sent: Decimal,
    pub pending: Decimal,
    pub provisional: Decimal,
    pub rejected: Decimal,
    /// Corrections included in `mapped` (already-sent records whose content changed).
    pub corrections: Decimal,
    /// What the sink holds for these records (`None`: not read back).
    pub read_back: Option<Decimal>,
    /// Sink events of records the ledger has not acknowledged yet (explained).
    pub in_sink_unacknowledged: Decimal,
    /// For a sink read back only as a total (Stripe): the difference between its total and
    /// what was sent when records still pending here add up to it exactly, as they may be
    /// counted there already (explained: the next run sends them again under the same
    /// identifier, which the sink counts once within its deduplication window); else zero.
    pub pending_maybe_in_sink: Decimal,
    /// `read_back − sent − in_sink_unacknowledged − pending_maybe_in_sink`: zero when
    /// everything is explained.
    pub unexplained: Decimal,
    /// Events that disagree with the ledger one by one (stored twice, another value, missing,
    /// without the value property), whether or not their differences cancel out in the sums.
    pub unexplained_keys: u64,
    /// Events the sink holds under this line's (sink, subscription, metric) whose keys the
    /// ledger does not have there ([`Report::unknown_events`]), and the sum of their readable
    /// values. Shared by every line of the group, and counted in none of its figures: such an
    /// event belongs to no source or billing account, and the report carries its value once,
    /// as its own row. The line says so instead of "agrees".
    pub not_in_ledger_events: u64,
    pub not_in_ledger: Decimal,
    /// Keys behind an unexplained difference (at most 20).
    pub notes: Vec<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub period: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub lines: BTreeMap<String, (LineKey, Line)>,
    /// Sink events whose key the ledger does not know, per (sink, subscription, metric), in
    /// the order of the lines.
    pub unknown_events: Vec<UnknownEvent>,
    /// Sinks that could not be read back (an error, or a sink the settings no longer
    /// configure), once per sink and error.
    pub read_back_errors: Vec<ReadBackError>,
    /// Sinks read back only as a total per (subscription, metric) (Stripe: what its meter
    /// counted for a customer), compared with what was sent for all lines of that group.
    pub sink_totals: Vec<SinkTotal>,
}

/// A sink's counted total for one (sink, subscription, metric) beside what the ledger sent,
/// for sinks that keep no readable events (Stripe meter event summaries). When the group is a
/// single line its `read_back` and `unexplained` carry the same comparison.
#[derive(Debug, Clone, Serialize)]
pub struct SinkTotal {
    pub sink: String,
    /// For Stripe: the customer id.
    pub subscription: String,
    /// For Stripe: the meter's event name.
    pub metric: String,
    /// Report lines (sources, billing accounts) sharing this total.
    pub lines: u64,
    pub sent: Decimal,
    pub pending: Decimal,
    /// What the sink counted.
    pub read_back: Decimal,
    /// `read_back − sent` when the group's pending records add up to it
    /// ([`Line::pending_maybe_in_sink`]): explained.
    pub pending_maybe_in_sink: Decimal,
    /// `read_back − sent − pending_maybe_in_sink`: zero when everything is explained.
    pub unexplained: Decimal,
    /// Where the total comes from (meter, customer, window).
    pub source: String,
}

/// A sink event whose key the ledger does not have under the (sink, subscription, metric) it
/// was read back under: the sink bills it, billsync did not send it there.
#[derive(Debug, Clone, Serialize)]
pub struct UnknownEvent {
    pub sink: String,
    pub subscription: String,
    pub metric: String,
    pub key: String,
    /// Its value (the value property of the ledger's records, read exactly); `None` when the
    /// event lacks it or holds no exact decimal ([`UnknownEvent::held`] says what).
    pub value: Option<Decimal>,
    /// Why there is no `value`.
    pub held: Option<String>,
    /// Where the ledger has this key instead (`subscription metric (sink S)`): the record's own
    /// line misses the event.
    pub in_ledger_for: Option<String>,
}

impl UnknownEvent {
    /// What the event is, after its key: the ledger's side, then the sink's value.
    fn what(&self) -> String {
        let ledger = match &self.in_ledger_for {
            Some(owner) => format!("is in the ledger for {owner}"),
            None => "is not in the ledger".to_string(),
        };
        let held = match (&self.value, &self.held) {
            (Some(v), _) => format!("the sink holds {v} for it"),
            (None, Some(why)) => why.clone(),
            (None, None) => "no value".to_string(),
        };
        format!("{ledger}; {held}")
    }
}

impl std::fmt::Display for UnknownEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} {}: event {} {}",
            self.sink,
            self.subscription,
            self.metric,
            self.key,
            self.what()
        )
    }
}

/// A sink that could not be read back, once per sink and error (a Lago answering an error
/// page fails every (subscription, metric) alike: one entry, not one per line).
#[derive(Debug, Clone, Serialize)]
pub struct ReadBackError {
    pub sink: String,
    /// The error on one line, at most [`READ_BACK_ERROR_MAX`] characters (an HTML error page
    /// is the sink's body, not the reader's business beyond its start).
    pub message: String,
    /// The (subscription, metric) groups it left without read-back, in the order of the lines.
    pub groups: Vec<(String, String)>,
}

/// The longest read-back error reported, in characters.
pub const READ_BACK_ERROR_MAX: usize = 300;

impl std::fmt::Display for ReadBackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        if !self.groups.is_empty() {
            let shown: Vec<String> = self
                .groups
                .iter()
                .take(3)
                .map(|(s, m)| format!("{s} {m}"))
                .collect();
            let more = if self.groups.len() > 3 { ", …" } else { "" };
            write!(
                f,
                " ({} subscription/metric group(s) of sink {} not read back: {}{more})",
                self.groups.len(),
                self.sink,
                shown.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The error text on one line (whitespace runs, newlines of an HTML page included, become one
/// space), cut to [`READ_BACK_ERROR_MAX`] characters.
fn one_line(text: &str) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(READ_BACK_ERROR_MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}

/// What a reconciliation found, for its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every difference is explained, and every sink was read back.
    Reconciled,
    /// A difference the ledger does not explain, among what was read back (whether or not
    /// some sink failed to read back as well: money first).
    Unexplained,
    /// Nothing unexplained in what was read back, but a sink could not be read back: the
    /// check is incomplete, not failed.
    Incomplete,
}

impl Report {
    /// Whether every difference is explained: the sums agree, and so does every event (an
    /// event stored twice and another lost, of the same value, cancel out in the sums), and
    /// every sink was read back.
    pub fn is_reconciled(&self) -> bool {
        self.verdict() == Verdict::Reconciled
    }

    /// Whether what was read back holds a difference the ledger does not explain: a line's
    /// sums or events, a sink's total, or an event the ledger does not have.
    pub fn has_unexplained(&self) -> bool {
        !self.unknown_events.is_empty()
            || self.sink_totals.iter().any(|t| !t.unexplained.is_zero())
            || self
                .lines
                .values()
                .any(|(_, l)| !l.unexplained.is_zero() || l.unexplained_keys > 0)
    }

    pub fn verdict(&self) -> Verdict {
        if self.has_unexplained() {
            Verdict::Unexplained
        } else if !self.read_back_errors.is_empty() {
            Verdict::Incomplete
        } else {
            Verdict::Reconciled
        }
    }
}

/// Errors of a reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("--period {0:?} is not a month (YYYY-MM)")]
    Period(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A sum leaves a decimal's range (about ±7.9e28): an amount no invoice carries, in the
    /// ledger or in a sink. Reported instead of a panic, naming the line.
    #[error("{0}: the sum leaves the range of a decimal (about ±7.9e28): an amount no invoice can carry is in the ledger or the sink; find it with `billsync ledger export`")]
    Overflow(String),
}

/// `acc += v`, or the first line whose sum leaves a decimal's range is kept in `overflow`.
fn add(
    acc: &mut Decimal,
    v: Decimal,
    overflow: &mut Option<String>,
    line: impl FnOnce() -> String,
) {
    match acc.checked_add(v) {
        Some(sum) => *acc = sum,
        None => {
            overflow.get_or_insert_with(line);
        }
    }
}

/// How a report line is named in an error.
fn line_name(key: &LineKey) -> String {
    format!(
        "line {} / {} / {} / {} / {}",
        key.source, key.billing_account_id, key.subscription, key.metric, key.sink
    )
}

/// The UTC bounds of a calendar month in a time zone (`+00:00` for UTC; `+09:00` for SAKURA's
/// JST months).
pub fn month_bounds(
    period: &str,
    offset: FixedOffset,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ReconcileError> {
    let bad = || ReconcileError::Period(period.to_string());
    let first =
        NaiveDate::parse_from_str(&format!("{period}-01"), "%Y-%m-%d").map_err(|_| bad())?;
    let next = if first.month() == 12 {
        NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
    }
    .ok_or_else(bad)?;
    let at = |d: NaiveDate| {
        offset
            .from_local_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight exists"))
            .single()
            .map(|t| t.with_timezone(&Utc))
            .ok_or_else(bad)
    };
    Ok((at(first)?, at(next)?))
}

/// The report line of a record: unmapped and ignored records (and any without a subscription
/// and a metric) have lines of their own, without a metric.
fn line_key(row: &PeriodRow) -> LineKey {
    let (subscription, metric) = match (&row.subscription, &row.metric, row.status) {
        (_, _, Status::Unmapped) => ("(unmapped)".to_string(), String::new()),
        (_, _, Status::Ignored) => ("(ignored)".to_string(), String::new()),
        (Some(s), Some(m), _) => (s.clone(), m.clone()),
        _ => ("(unmapped)".to_string(), String::new()),
    };
    LineKey {
        source: row.source.clone(),
        billing_account_id: row.billing_account_id.clone(),
        subscription,
        metric,
        sink: row.sink.clone().unwrap_or_default(),
    }
}

/// The id of a report line (the key of [`Report::lines`]) of a record of `row`'s line key
/// and billing currency. The currency is part of it so that a line's provider cost is in one
/// currency (a rule may map records billed in GBP and in USD to one metric): added up across
/// currencies it was a meaningless sum labelled with the last record's currency.
fn line_id(row: &PeriodRow) -> (String, LineKey) {
    let key = line_key(row);
    let id = format!(
        "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
        key.source,
        key.billing_account_id,
        key.subscription,
        key.metric,
        key.sink,
        row.billing_currency
    );
    (id, key)
}

/// A (sink, subscription, metric) read back together: its lines, and its place among the
/// groups in the order of the report's lines (the order its findings are reported in).
struct Group {
    rank: usize,
    key: LineKey,
    line_ids: Vec<String>,
}

/// What reading back one group found beyond its lines, kept until every group is done.
#[derive(Default)]
struct GroupOutcome {
    /// Sink events that are not among the group's records (looked up in the ledger
    /// afterwards, to say whether it has them elsewhere), each with its value read by the value
    /// property of the group's records (what the sink bills under this metric), or its
    /// properties when the group has no valued record to tell the property by.
    unknown_events: Vec<(String, Result<Held, Properties>)>,
    read_back_error: Option<String>,
    /// The group's sink, when the settings configure no sink of that name.
    unconfigured: Option<String>,
    /// The first line whose read-back sum leaves a decimal's range.
    overflow: Option<String>,
    /// The comparison of a total read back from an aggregating sink.
    total: Option<Result<SinkTotal, ReconcileError>>,
}

/// Reconcile one period of the ledger against the sinks, in memory that follows the report's
/// lines, not the month's records (see the module's documentation).
pub async fn reconcile(
    ledger: &Ledger,
    sinks: &[Box<dyn Sink>],
    period: &str,
    offset: FixedOffset,
) -> Result<Report, ReconcileError> {
    let (from, to) = month_bounds(period, offset)?;
    let mut snapshot = ledger.period_snapshot(from, to).await?;
    let report = reconcile_snapshot(&mut snapshot, sinks, period, from, to).await;
    let closed = snapshot.close().await;
    let report = report?;
    closed?;
    Ok(report)
}

async fn reconcile_snapshot(
    snapshot: &mut PeriodSnapshot,
    sinks: &[Box<dyn Sink>],
    period: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Report, ReconcileError> {
    let mut lines: BTreeMap<String, (LineKey, Line)> = BTreeMap::new();
    let mut overflow: Option<String> = None;
    // Per sink name, its valued records: (sent, pending or provisional or rejected), for a
    // sink the settings no longer configure.
    let mut by_sink: HashMap<String, (u64, u64)> = HashMap::new();
    snapshot
        .for_each(|row: PeriodRow| {
            let (id, key) = line_id(&row);
            let (key, line) = lines.entry(id).or_insert_with(|| (key, Line::default()));
            let name = || line_name(key);
            if !row.is_correction {
                line.records += 1;
                add(
                    &mut line.provider_cost,
                    row.billed_cost,
                    &mut overflow,
                    name,
                );
                line.currency = row.billing_currency.clone();
            }
            if let Some(v) = row.value {
                let by_status = match row.status {
                    Status::Sent => Some(&mut line.sent),
                    Status::Pending => Some(&mut line.pending),
                    Status::Provisional => Some(&mut line.provisional),
                    Status::Rejected => Some(&mut line.rejected),
                    Status::Unmapped | Status::Ignored => None,
                };
                if let Some(sum) = by_status {
                    add(sum, v, &mut overflow, name);
                    add(&mut line.mapped, v, &mut overflow, name);
                    if row.is_correction {
                        add(&mut line.corrections, v, &mut overflow, name);
                    }
                }
                let counts = match by_sink.get_mut(&key.sink) {
                    Some(counts) => counts,
                    None => by_sink.entry(key.sink.clone()).or_default(),
                };
                match row.status {
                    Status::Sent => counts.0 += 1,
                    Status::Pending | Status::Provisional | Status::Rejected => counts.1 += 1,
                    Status::Unmapped | Status::Ignored => {}
                }
            }
        })
        .await?;
    if let Some(line) = overflow {
        return Err(ReconcileError::Overflow(line));
    }

    // Read back each (sink, subscription, metric) that has anything mapped, in the order of
    // its first line.
    let mut groups: HashMap<PeriodGroupKey, Group> = HashMap::new();
    let mut order: Vec<PeriodGroupKey> = Vec::new();
    for (id, (k, _)) in &lines {
        if k.metric.is_empty() {
            continue;
        }
        let group = (k.sink.clone(), k.subscription.clone(), k.metric.clone());
        groups
            .entry(group)
            .or_insert_with_key(|group| {
                order.push(group.clone());
                Group {
                    rank: order.len() - 1,
                    key: k.clone(),
                    line_ids: Vec::new(),
                }
            })
            .line_ids
            .push(id.clone());
    }
    let mut outcomes: Vec<Option<GroupOutcome>> = order.iter().map(|_| None).collect();
    {
        let mut records_by_group = snapshot.groups();
        while let Some((group, records)) = records_by_group.next_group().await? {
            // Always one of the lines' groups: both come from the same snapshot.
            let Some(group) = groups.get(&group) else {
                continue;
            };
            let outcome = check_group(&mut lines, sinks, group, records, period, from, to).await;
            outcomes[group.rank] = Some(outcome);
            keep_notes(&mut lines, group);
        }
    }
    // Groups without a valued record: whatever the sink holds there is unknown.
    for group in &order {
        let group = &groups[group];
        if outcomes[group.rank].is_none() {
            let outcome = check_group(&mut lines, sinks, group, Vec::new(), period, from, to).await;
            outcomes[group.rank] = Some(outcome);
            keep_notes(&mut lines, group);
        }
    }

    let mut unknown_events = Vec::new();
    let mut read_back_errors = Vec::new();
    let mut totals = Vec::new();
    // Sinks records were sent to that the settings no longer configure (renamed, removed).
    let mut unconfigured: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for ((sink, subscription, metric), outcome) in order.iter().zip(outcomes) {
        let outcome = outcome.unwrap_or_default();
        let group = &groups[&(sink.clone(), subscription.clone(), metric.clone())];
        let (mut count, mut worth, mut unvalued) = (0u64, Decimal::ZERO, 0u64);
        for (key, held) in outcome.unknown_events {
            // The ledger has this key for another sink, subscription or metric: here it is an
            // event the ledger does not have (billed to another subscription), and the
            // record's own line misses it.
            let owner = snapshot.valued_record(&key).await?;
            let (value, held) = match held {
                Ok(held) => held,
                // No valued record of this group: the property of the record the ledger has
                // under this key, if any.
                Err(properties) => held_value(
                    &properties,
                    owner.as_ref().and_then(|row| row.value_property.as_deref()),
                ),
            };
            count += 1;
            match value {
                Some(v) => add(&mut worth, v, &mut overflow, || {
                    format!("events of {sink} {subscription} {metric} not in the ledger")
                }),
                None => unvalued += 1,
            }
            unknown_events.push(UnknownEvent {
                sink: sink.clone(),
                subscription: subscription.clone(),
                metric: metric.clone(),
                key,
                value,
                held,
                in_ledger_for: owner.map(|row| {
                    let owner = line_key(&row);
                    format!(
                        "{} {} (sink {})",
                        owner.subscription, owner.metric, owner.sink
                    )
                }),
            });
        }
        if count > 0 {
            // Every line of the group: none of them may read "agrees" while the sink bills
            // the subscription and metric more than the ledger sent there.
            let unvalued = if unvalued == 0 {
                String::new()
            } else {
                format!(" ({unvalued} without a readable value)")
            };
            let note = format!(
                "{sink} holds {count} event(s) worth {worth}{unvalued} under {subscription} {metric} that the ledger does not have there: unexplained, not counted in this line's figures (each is listed: `UNEXPLAINED:` below the table, a `(not in ledger)` row of the CSV)"
            );
            for id in &group.line_ids {
                if let Some((_, line)) = lines.get_mut(id) {
                    line.not_in_ledger_events += count;
                    line.not_in_ledger += worth;
                    line.notes.insert(0, note.clone());
                }
            }
        }
        if let Some(message) = outcome.read_back_error {
            failed(&mut read_back_errors, sink, &message, subscription, metric);
        }
        if let Some(name) = outcome.unconfigured {
            unconfigured
                .entry(name)
                .or_default()
                .push((subscription.clone(), metric.clone()));
        }
        if overflow.is_none() {
            overflow = outcome.overflow;
        }
        totals.extend(outcome.total);
    }
    // Nothing was read back for them: a difference, not an agreement (a lost event among
    // them would otherwise pass unseen).
    for (name, groups) in unconfigured {
        let (sent, other) = by_sink.get(&name).copied().unwrap_or_default();
        let others = if other == 0 {
            String::new()
        } else {
            format!(" ({other} more pending, provisional or rejected)")
        };
        read_back_errors.push(ReadBackError {
            message: format!(
                "sink {name} of {sent} sent records{others} is not configured: not read back"
            ),
            sink: name,
            groups,
        });
    }
    if let Some(line) = overflow {
        return Err(ReconcileError::Overflow(line));
    }
    let sink_totals = totals.into_iter().collect::<Result<Vec<_>, _>>()?;
    for (key, line) in lines.values_mut() {
        if let Some(rb) = line.read_back {
            line.unexplained = rb
                .checked_sub(line.sent)
                .and_then(|d| d.checked_sub(line.in_sink_unacknowledged))
                .and_then(|d| d.checked_sub(line.pending_maybe_in_sink))
                .ok_or_else(|| ReconcileError::Overflow(line_name(key)))?;
        }
        // The group's note on events not in the ledger first, whatever else is kept.
        let group_note = (line.not_in_ledger_events > 0).then(|| line.notes.remove(0));
        line.notes.sort();
        if let Some(note) = group_note {
            line.notes.insert(0, note);
        }
        line.notes.truncate(20);
    }
    Ok(Report {
        period: period.to_string(),
        from,
        to,
        lines,
        unknown_events,
        read_back_errors,
        sink_totals,
    })
}

/// Add a group's read-back error to `errors`, once per sink and message (a sink down
/// answers every group alike).
fn failed(
    errors: &mut Vec<ReadBackError>,
    sink: &str,
    message: &str,
    subscription: &str,
    metric: &str,
) {
    let message = one_line(message);
    let group = (subscription.to_string(), metric.to_string());
    match errors
        .iter_mut()
        .find(|e| e.sink == sink && e.message == message)
    {
        Some(e) => e.groups.push(group),
        None => errors.push(ReadBackError {
            sink: sink.to_string(),
            message,
            groups: vec![group],
        }),
    }
}

/// An unknown event's value, or why there is none.
type Held = (Option<Decimal>, Option<String>);

/// A sink event's properties.
type Properties = serde_json::Map<String, serde_json::Value>;

/// The value of a sink event's `property`, read exactly, or why there is none.
fn held_value(properties: &Properties, property: Option<&str>) -> Held {
    let Some(p) = property else {
        return (
            None,
            Some("the ledger has no value property for this metric".to_string()),
        );
    };
    match properties.get(p) {
        Some(v) => match exact_value(v) {
            Some(d) => (Some(d), None),
            None => (
                None,
                Some(format!(
                    "the sink holds {v}, not a value a decimal holds exactly"
                )),
            ),
        },
        None => (None, Some(format!("its value property {p} is missing"))),
    }
}

/// A value read back, exactly, as providers' amounts are read: `1e-7` is a value, and more
/// places than a decimal holds are not rounded into a match.
fn exact_value(v: &serde_json::Value) -> Option<Decimal> {
    match v {
        serde_json::Value::String(s) => crate::record::exact_decimal(s.trim()),
        serde_json::Value::Number(n) => crate::record::exact_decimal(&n.to_string()),
        _ => None,
    }
}

/// Only the first 20 notes of a line are reported: once its group is checked, its lines keep
/// only those (a sink that lost a month would otherwise keep a note per record of the month).
fn keep_notes(lines: &mut BTreeMap<String, (LineKey, Line)>, group: &Group) {
    for id in &group.line_ids {
        if let Some((_, line)) = lines.get_mut(id) {
            line.notes.sort();
            line.notes.truncate(20);
            // The room of the notes dropped too (a line of every lost record keeps its size).
            line.notes.shrink_to_fit();
        }
    }
}

/// Read one (sink, subscription, metric) back and line it up with its valued `records` (all
/// of them, in id order), into its `lines`.
async fn check_group(
    lines: &mut BTreeMap<String, (LineKey, Line)>,
    sinks: &[Box<dyn Sink>],
    group: &Group,
    records: Vec<PeriodRow>,
    period: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> GroupOutcome {
    let mut out = GroupOutcome::default();
    let key = &group.key;
    let Some(sink) = sinks.iter().find(|s| s.name() == key.sink) else {
        out.unconfigured = Some(key.sink.clone());
        return out;
    };
    let query = ReadBackQuery {
        subscription: key.subscription.clone(),
        metric: key.metric.clone(),
        from,
        to,
    };
    let events = match sink.read_back(&query).await {
        Ok(Some(events)) => events,
        // A sink that keeps only aggregates (Stripe): its counted total for the group.
        Ok(None) => {
            match sink.read_back_total(&query).await {
                Ok(Some(total)) => {
                    out.total = Some(compare_total(lines, group, total, &records, period));
                }
                Ok(None) => {}
                Err(e) => out.read_back_error = Some(e),
            }
            return out;
        }
        Err(e) => {
            out.read_back_error = Some(e);
            return out;
        }
    };
    // Lines of this (sink, subscription, metric) that were read back: zero unless found.
    for id in &group.line_ids {
        if let Some((_, l)) = lines.get_mut(id) {
            l.read_back.get_or_insert(Decimal::ZERO);
        }
    }
    // key → (line id, status, value property, value) of the group's records.
    let by_key: HashMap<&str, (String, Status, Option<&str>, Decimal)> = records
        .iter()
        .filter_map(|r| {
            let value = r.value?;
            Some((
                r.key.as_str(),
                (line_id(r).0, r.status, r.value_property.as_deref(), value),
            ))
        })
        .collect();
    let group_property = records.iter().find_map(|r| r.value_property.as_deref());
    let mut seen: HashMap<String, u32> = HashMap::new();
    for event in events {
        let Some((line_id, status, property, value)) = by_key.get(event.key.as_str()) else {
            let held = match group_property {
                Some(_) => Ok(held_value(&event.properties, group_property)),
                None => Err(event.properties),
            };
            out.unknown_events.push((event.key, held));
            continue;
        };
        let Some((owner, line)) = lines.get_mut(line_id) else {
            continue;
        };
        let held = property.and_then(|p| event.properties.get(p));
        let stored = held.and_then(exact_value);
        let Some(stored) = stored else {
            line.unexplained_keys += 1;
            line.notes.push(match held {
                None => format!("{}: value property missing in the sink", event.key),
                Some(v) => format!(
                    "{}: the sink holds {v}, not a value a decimal holds exactly",
                    event.key
                ),
            });
            continue;
        };
        let n = seen.entry(event.key.clone()).or_default();
        *n += 1;
        if *n > 1 {
            line.unexplained_keys += 1;
            line.notes
                .push(format!("{}: stored {} times in the sink", event.key, n));
        }
        if let Some(rb) = line.read_back.as_mut() {
            add(rb, stored, &mut out.overflow, || line_name(owner));
        }
        match status {
            Status::Sent => {
                if stored != *value {
                    line.unexplained_keys += 1;
                    line.notes.push(format!(
                        "{}: sink holds {stored}, ledger sent {value}",
                        event.key
                    ));
                }
            }
            // Stored by the sink before the ledger recorded it (a crash, a lost answer):
            // the next run resends the frozen payload and records it as delivered. That
            // explains the ledger's value, once; another value or a second copy is not
            // what the next run confirms.
            Status::Pending => {
                if *n == 1 {
                    add(
                        &mut line.in_sink_unacknowledged,
                        *value,
                        &mut out.overflow,
                        || line_name(owner),
                    );
                }
                if stored != *value {
                    line.unexplained_keys += 1;
                    line.notes.push(format!(
                        "{}: sink holds {stored}, ledger has {value} pending",
                        event.key
                    ));
                }
            }
            // Rejected or not final: no run sends it as it stands, yet the sink bills it.
            other => {
                line.unexplained_keys += 1;
                line.notes.push(format!(
                    "{}: sink holds {stored}, but the ledger has the record {}",
                    event.key,
                    other.as_str()
                ));
            }
        }
    }
    // Sent records the sink does not have.
    for (k, (line_id, status, _, value)) in &by_key {
        if *status != Status::Sent || seen.contains_key(*k) {
            continue;
        }
        if let Some((_, line)) = lines.get_mut(line_id) {
            line.unexplained_keys += 1;
            line.notes
                .push(format!("{k}: sent ({value}) but not in the sink"));
        }
    }
    out
}

/// Sums of subsets of pending values tried before [`explained_by_pending`] gives up.
const PENDING_SUMS_MAX: usize = 1 << 16;

/// Whether records pending here explain `difference` (a sink's total minus what was sent): a
/// run stopped after the sink took a batch and before the ledger recorded the answer. The sink
/// holds whole events, so only a sink that counted *more* than was sent, by exactly what some
/// of the group's pending records (their positive `values`) add up to, is explained. Anything
/// else is unexplained, on purpose: a shortfall offset by a pending negative correction, or a
/// double count that happens to fall below the pending sum, must not read as explained (the
/// next run sends the pending records; reconcile after it tells). `None`: too many pending
/// records to tell (more than [`PENDING_SUMS_MAX`] distinct sums below `difference`, or 64
/// times that many additions).
fn explained_by_pending(difference: Decimal, values: &[Decimal]) -> Option<bool> {
    if difference <= Decimal::ZERO {
        return Some(false);
    }
    // All of them, or not enough: no search (the usual case after a stopped run is all).
    // A sum beyond a decimal's range is beyond `difference` too.
    let all = values
        .iter()
        .try_fold(Decimal::ZERO, |sum, v| sum.checked_add(*v));
    if let Some(all) = all.filter(|all| *all <= difference) {
        return Some(all == difference);
    }
    // Decimal hashes its normalized value: 12 and 12.0 are one sum.
    let mut sums: std::collections::HashSet<Decimal> =
        std::collections::HashSet::from([Decimal::ZERO]);
    // Bounded in work as well as in sums: each value is added to every sum found so far.
    let mut work = 0usize;
    for v in values {
        work += sums.len();
        if sums.len() > PENDING_SUMS_MAX || work > PENDING_SUMS_MAX * 64 {
            return None;
        }
        let next: Vec<Decimal> = sums
            .iter()
            .filter_map(|s| s.checked_add(*v))
            .filter(|s| *s <= difference)
            .collect();
        for s in next {
            if s == difference {
                return Some(true);
            }
            sums.insert(s);
        }
    }
    Some(false)
}

/// Line up a total read back from an aggregating sink with what the ledger sent for its
/// (sink, subscription, metric) `group`. The total cannot be split by key, source or billing
/// account: a group of one line gets it as its `read_back` (its `unexplained` is then the
/// difference, unless its pending records explain it); a group of several lines is compared
/// as a whole in the returned [`SinkTotal`], and each of its lines says so. Only the group's
/// pending records explain a difference ([`explained_by_pending`], from the positive values of
/// its pending `records`, the group's valued records in id order); the total says how much,
/// not which events, so the notes say what may cause the rest.
fn compare_total(
    lines: &mut BTreeMap<String, (LineKey, Line)>,
    group: &Group,
    total: crate::sinks::ReadBackTotal,
    records: &[PeriodRow],
    period: &str,
) -> Result<SinkTotal, ReconcileError> {
    let key = &group.key;
    let ids = group.line_ids.as_slice();
    // Per line: the positive values of its pending records (what the sink's total may hold
    // of them already: every pending one, attempted or not, as a batch out when a run stopped
    // has no attempt recorded), and the records the push loop held back after an unclear
    // delivery, (key, value): the sink may have counted them, which a surplus of exactly
    // their value says.
    type PendingAndUnclear<'a> = (Vec<Decimal>, Vec<(&'a str, Decimal)>);
    let mut by_line: HashMap<String, PendingAndUnclear> = HashMap::new();
    for r in records {
        let Some(v) = r.value else {
            continue;
        };
        let pending = r.status == Status::Pending && v > Decimal::ZERO;
        if pending || r.held_back_unclear {
            let (values, unclear) = by_line.entry(line_id(r).0).or_default();
            if pending {
                values.push(v);
            }
            if r.held_back_unclear {
                unclear.push((r.key.as_str(), v));
            }
        }
    }
    let count = ids.len() as u64;
    let (mut sent, mut pending) = (Decimal::ZERO, Decimal::ZERO);
    let mut values: Vec<Decimal> = Vec::new();
    let mut unclear: Vec<(&str, Decimal)> = Vec::new();
    let group = || format!("{} total of {} {}", key.sink, key.subscription, key.metric);
    let mut overflow = None;
    for id in ids {
        let Some((_, l)) = lines.get(id) else {
            continue;
        };
        add(&mut sent, l.sent, &mut overflow, group);
        add(&mut pending, l.pending, &mut overflow, group);
        if let Some((v, u)) = by_line.get(id.as_str()) {
            values.extend_from_slice(v);
            unclear.extend_from_slice(u);
        }
    }
    if let Some(group) = overflow {
        return Err(ReconcileError::Overflow(group));
    }
    let difference = total
        .total
        .checked_sub(sent)
        .ok_or_else(|| ReconcileError::Overflow(group()))?;
    let explained = explained_by_pending(difference, &values);
    let maybe_pending = if explained == Some(true) {
        difference
    } else {
        Decimal::ZERO
    };
    let unexplained = difference - maybe_pending;
    let mut notes: Vec<String> = total
        .note
        .iter()
        .map(|n| format!("{}: {n}", key.sink))
        .collect();
    if !maybe_pending.is_zero() {
        notes.push(format!(
            "{} counted {} for {} {} in {period}, billsync sent {sent}: the difference \
             {maybe_pending} is exactly what records pending here add up to, which Stripe may \
             have counted already (a run stopped after Stripe took them and before recording \
             it; {pending} is pending): the next run sends them again under the same \
             identifier, which Stripe counts once if it comes within 24 hours of the first; \
             reconcile after it to confirm",
            key.sink, total.total, key.subscription, key.metric
        ));
    }
    if !unexplained.is_zero() {
        let why = if unexplained < Decimal::ZERO {
            "Stripe counted less than was sent: an event it accepted and dropped later (unknown customer, no meter, outside its window, a refused value) shows only in Stripe's meter error reports, not in its HTTP answer; or its summaries lag the last minutes"
        } else if explained.is_none() {
            "Stripe counted more than was sent: too many records are pending here to tell whether some of them, already at Stripe, add up to it; reconcile after the next run"
        } else {
            "Stripe counted more than was sent, and no set of the records pending here adds up to it: events sent by something else, or an event sent twice more than 24 hours apart"
        };
        let pending_hint = if pending.is_zero() {
            String::new()
        } else {
            format!("; {pending} is still pending here (the next run sends or confirms it)")
        };
        notes.push(format!(
            "{} counted {} for {} {} in {period}, billsync sent {sent}: difference {unexplained} ({why}{pending_hint})",
            key.sink, total.total, key.subscription, key.metric
        ));
        // Records held back after an unclear delivery that add up to the surplus: the
        // sink counted them, and the person records that (`ledger mark-delivered`).
        let values: Vec<Decimal> = unclear.iter().map(|(_, v)| *v).collect();
        if unexplained > Decimal::ZERO && explained_by_pending(unexplained, &values) == Some(true) {
            let all = values
                .iter()
                .try_fold(Decimal::ZERO, |sum, v| sum.checked_add(*v));
            let keys = unclear
                .iter()
                .map(|(k, v)| format!("{k} ({v})"))
                .collect::<Vec<_>>()
                .join(", ");
            notes.push(if all == Some(unexplained) {
                format!(
                    "the difference {unexplained} is exactly what the records held back after an unclear delivery add up to: {} counted them; record them as delivered (`billsync ledger mark-delivered --key K --reason \"…\"`): {keys}",
                    key.sink
                )
            } else {
                format!(
                    "some of the records held back after an unclear delivery add up to the difference {unexplained}: {} may have counted those; check them one by one before `billsync ledger mark-delivered --key K` or a replay: {keys}",
                    key.sink
                )
            });
        }
    }
    for id in ids {
        let Some((_, l)) = lines.get_mut(id) else {
            continue;
        };
        if count == 1 {
            l.read_back = Some(total.total);
            l.pending_maybe_in_sink = maybe_pending;
            l.notes.extend(notes.iter().cloned());
        } else {
            l.notes.push(format!(
                "{} counts {} {} only as one total for {count} lines: compared together under sink totals",
                key.sink, key.subscription, key.metric
            ));
        }
    }
    Ok(SinkTotal {
        sink: key.sink.clone(),
        subscription: key.subscription.clone(),
        metric: key.metric.clone(),
        lines: count,
        sent,
        pending,
        read_back: total.total,
        pending_maybe_in_sink: maybe_pending,
        unexplained,
        source: total.source,
    })
}

const CSV_HEADER: &str = "source,billing_account_id,subscription,metric,sink,currency,records,provider_cost,mapped,corrections,sent,pending,provisional,rejected,read_back,in_sink_unacknowledged,pending_maybe_in_sink,unexplained,notes";

/// One CSV line of `fields`, each quoted as needed.
fn push_csv_row(out: &mut String, fields: &[String]) {
    out.push_str(
        &fields
            .iter()
            .map(|f| csv_field(f))
            .collect::<Vec<_>>()
            .join(","),
    );
    out.push('\n');
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The report as CSV (one header line, one line per group).
pub fn to_csv(report: &Report) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for (k, l) in report.lines.values() {
        let fields = [
            k.source.clone(),
            k.billing_account_id.clone(),
            k.subscription.clone(),
            k.metric.clone(),
            k.sink.clone(),
            l.currency.clone(),
            l.records.to_string(),
            l.provider_cost.to_string(),
            l.mapped.to_string(),
            l.corrections.to_string(),
            l.sent.to_string(),
            l.pending.to_string(),
            l.provisional.to_string(),
            l.rejected.to_string(),
            l.read_back.map(|d| d.to_string()).unwrap_or_default(),
            l.in_sink_unacknowledged.to_string(),
            l.pending_maybe_in_sink.to_string(),
            l.unexplained.to_string(),
            l.notes.join("; "),
        ];
        push_csv_row(&mut out, &fields);
    }
    // Totals of aggregating sinks shared by several lines: one row for the group.
    for t in report.sink_totals.iter().filter(|t| t.lines > 1) {
        let fields = [
            "(all)".to_string(),
            "(all)".to_string(),
            t.subscription.clone(),
            t.metric.clone(),
            t.sink.clone(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            t.sent.to_string(),
            t.pending.to_string(),
            String::new(),
            String::new(),
            t.read_back.to_string(),
            "0".to_string(),
            t.pending_maybe_in_sink.to_string(),
            t.unexplained.to_string(),
            t.source.clone(),
        ];
        push_csv_row(&mut out, &fields);
    }
    // Events the ledger does not have: one row each, its value as what the sink holds and as
    // unexplained (in no line's figures, so the column sums count it once); the key first in
    // the notes, as a line's notes name their keys.
    for e in &report.unknown_events {
        let value = e.value.map(|v| v.to_string()).unwrap_or_default();
        let mut fields: [String; 19] = Default::default();
        fields[0] = "(not in ledger)".to_string();
        fields[2] = e.subscription.clone();
        fields[3] = e.metric.clone();
        fields[4] = e.sink.clone();
        fields[14] = value.clone();
        fields[17] = value;
        fields[18] = format!("{}: event {}", e.key, e.what());
        push_csv_row(&mut out, &fields);
    }
    // Sinks not read back: one row per sink and error; their lines have no read_back.
    for e in &report.read_back_errors {
        let mut fields: [String; 19] = Default::default();
        fields[0] = "(read-back failed)".to_string();
        if let [(subscription, metric)] = e.groups.as_slice() {
            fields[2] = subscription.clone();
            fields[3] = metric.clone();
        }
        fields[4] = e.sink.clone();
        fields[18] = e.to_string();
        push_csv_row(&mut out, &fields);
    }
    out
}

/// The table's words for [`Line::pending_maybe_in_sink`] (nothing when zero).
fn pending_maybe_text(amount: Decimal) -> String {
    if amount.is_zero() {
        return String::new();
    }
    format!(
        " ({amount} pending here, may already be at Stripe: the next run sends it again under \
         the same identifier, which Stripe counts once within 24 hours)"
    )
}

/// The report as a table for a person.
pub fn to_table(report: &Report) -> String {
    let mut out = format!(
        "reconcile {} ({} to {})\n",
        report.period,
        report.from.to_rfc3339(),
        report.to.to_rfc3339()
    );
    for (k, l) in report.lines.values() {
        out.push_str(&format!(
            "{} {} → {} {} [{}]: {} records, provider {} {}, mapped {}, sent {}",
            k.source,
            k.billing_account_id,
            k.subscription,
            k.metric,
            if k.sink.is_empty() { "-" } else { &k.sink },
            l.records,
            l.provider_cost,
            l.currency,
            l.mapped,
            l.sent
        ));
        for (label, v) in [
            ("pending", l.pending),
            ("provisional", l.provisional),
            ("rejected", l.rejected),
            ("corrections", l.corrections),
        ] {
            if !v.is_zero() {
                out.push_str(&format!(", {label} {v}"));
            }
        }
        if let Some(rb) = l.read_back {
            out.push_str(&format!(", sink holds {rb}"));
            if !l.in_sink_unacknowledged.is_zero() {
                out.push_str(&format!(
                    " ({} not yet acknowledged: the next run confirms it)",
                    l.in_sink_unacknowledged
                ));
            }
            out.push_str(&pending_maybe_text(l.pending_maybe_in_sink));
            let mut verdicts = Vec::new();
            if !l.unexplained.is_zero() {
                verdicts.push(format!("UNEXPLAINED DIFFERENCE {}", l.unexplained));
            } else if l.unexplained_keys > 0 {
                verdicts.push(format!(
                    "the sums agree, but {} event(s) do not (UNEXPLAINED)",
                    l.unexplained_keys
                ));
            }
            if l.not_in_ledger_events > 0 {
                verdicts.push(format!(
                    "UNEXPLAINED: the sink also holds {} in {} event(s) under {} {} the ledger does not have (listed below)",
                    l.not_in_ledger, l.not_in_ledger_events, k.subscription, k.metric
                ));
            }
            if verdicts.is_empty() {
                out.push_str(" — agrees");
            } else {
                out.push_str(&format!(" — {}", verdicts.join("; ")));
            }
        }
        out.push('\n');
        for n in &l.notes {
            out.push_str(&format!("    {n}\n"));
        }
    }
    for t in report.sink_totals.iter().filter(|t| t.lines > 1) {
        out.push_str(&format!(
            "{} {} {} ({} lines together): sent {}, {} counted {}{} — {}\n",
            t.sink,
            t.subscription,
            t.metric,
            t.lines,
            t.sent,
            t.sink,
            t.read_back,
            pending_maybe_text(t.pending_maybe_in_sink),
            if t.unexplained.is_zero() {
                "agrees".to_string()
            } else {
                format!("UNEXPLAINED DIFFERENCE {}", t.unexplained)
            }
        ));
    }
    for e in &report.unknown_events {
        out.push_str(&format!("UNEXPLAINED: {e}\n"));
    }
    for e in &report.read_back_errors {
        out.push_str(&format!("read-back failed: {e}\n"));
    }
    out.push_str(match report.verdict() {
        Verdict::Reconciled => "every difference is explained\n",
        Verdict::Unexplained if !report.read_back_errors.is_empty() => {
            "unexplained differences: see above (and not every sink was read back)\n"
        }
        Verdict::Unexplained => "unexplained differences: see above\n",
        Verdict::Incomplete => {
            "not every sink was read back: nothing unexplained in what was, but the month is not reconciled\n"
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(v: i64) -> Decimal {
        Decimal::from(v)
    }

    #[test]
    fn only_a_surplus_some_pending_values_add_up_to_is_explained() {
        let pending = [d(5), d(7), d(60)];
        assert_eq!(explained_by_pending(d(12), &pending), Some(true));
        assert_eq!(explained_by_pending(d(72), &pending), Some(true));
        assert_eq!(explained_by_pending(d(67), &pending), Some(true));
        assert_eq!(explained_by_pending(d(11), &pending), Some(false));
        assert_eq!(explained_by_pending(d(73), &pending), Some(false));
        assert_eq!(explained_by_pending(d(-5), &pending), Some(false));
        assert_eq!(explained_by_pending(Decimal::ZERO, &pending), Some(false));
        assert_eq!(explained_by_pending(d(12), &[]), Some(false));
    }

    /// Even values with all their sums distinct, an odd surplus below their total: no subset
    /// reaches it, and past the bound the answer is "cannot tell", not "unexplained".
    #[test]
    fn too_many_pending_values_to_search_cannot_tell() {
        let pending: Vec<Decimal> = (1..=20).map(|k| d(1 << k)).collect();
        assert_eq!(explained_by_pending(d(1_000_001), &pending), None);
        let few: Vec<Decimal> = (1..=10).map(|k| d(1 << k)).collect();
        assert_eq!(explained_by_pending(d(1_001), &few), Some(false));
        assert_eq!(explained_by_pending(d(1_000), &few), Some(true));
    }
}
