//! The one place that wires providers, mappings, the ledger and sinks together.
//!
//! Data flows one way: provider → normalize → map → ledger (outbox) → sink → ledger (ack).
//! Each provider page is mapped and staged with its cursor in one transaction, so a crash
//! loses at most a page that is then pulled again; records leave only from the ledger, with
//! the payload frozen at staging, so a crash between a sink accepting and the ledger recording
//! it ends in a resend of identical bytes that the sink recognises as a duplicate.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use tracing::{debug, error, info, warn, Instrument};

use crate::ledger::{
    Correction, LateRecords, Ledger, LedgerError, MappedColumns, PeriodGroupRow, PeriodGroupState,
    PeriodMemberRow, PeriodShareRow, RecordFilter, SentState, StageCounts, StageRow, Status,
    StoredRecord,
};
use crate::mapping::{MapOutcome, MappedEvent, MappingSet, PeriodShare, PeriodSpec};
use crate::providers::Provider;
use crate::record::{Text, UsageRecord};
use crate::shutdown::Shutdown;
use crate::sinks::{Outcome, Sink};
use compact_str::ToCompactString;

/// How often a long run extends its lock (more often when `lock_ttl` is short: see
/// [`Pipeline::lock_refresh_every`]).
const LOCK_REFRESH: Duration = Duration::from_secs(30);
/// Records read per page when replaying.
const REPLAY_PAGE: i64 = 500;
/// Records a dry-run replay lists one by one (the counts cover all of them).
const PREVIEW_LINES: usize = 200;
/// Staging accumulates pages (each with its cursor) up to this many records per transaction:
/// a provider window may hold a handful of records, and a commit costs an fsync. It also sets
/// how many records wait in memory ([`RECORDS_AHEAD`]): 4,000 took a 1M-record `billsync
/// bench` to 52–54 MB peak RSS, 2,000 to 40–41 MB, at the same speed (1,000: 33–36 MB, but
/// twice the commits, which a slow volume pays for in fsyncs).
const STAGE_ROWS_PER_TRANSACTION: usize = 2000;
/// ...or once the oldest buffered page has waited this long: a run stopped early (a crash, an
/// OOM kill) loses at most this much pulling, however small the pages are.
const STAGE_MAX_DELAY: Duration = Duration::from_secs(1);
/// Most sink batches in flight at once; the window grows by one per acknowledged batch and
/// halves when the sink reports a 429 (AIMD), never below one.
const MAX_BATCHES_IN_FLIGHT: usize = 8;
/// Acknowledgements are committed together once this many records are delivered (or when
/// nothing else is in flight): an ack may be delayed, never recorded before its delivery.
/// While a sync pushes alongside the pull, each acknowledgement transaction holds the turn
/// the stager needs. Measured against 2,000 (1M in `billsync bench`): 1,000 made the stager
/// wait less (staging +3–9 %) but took twice the commits (end to end 1–6 % slower); 5,000
/// made staging 13–16 % slower for no gain end to end.
const ACK_RECORDS_PER_COMMIT: usize = 2000;
/// Pending records are read this many sink batches at a time (one query instead of one per
/// batch: at 1M records the per-batch reads were a third of the push phase).
const BATCHES_READ_AHEAD: usize = 10;
/// The `provider` and `source` of period adjustment records (no provider sent them).
pub const PERIOD_PROVIDER: &str = "period";
/// Default of [`Pipeline::period_close_delay`], in days.
pub const DEFAULT_PERIOD_CLOSE_DAYS: i64 = 3;

/// Everything a run needs.
pub struct Pipeline {
    pub ledger: Ledger,
    pub providers: Vec<Box<dyn Provider>>,
    /// Configured sinks; the first is the default for rules that name none.
    pub sinks: Vec<Box<dyn Sink>>,
    pub mappings: MappingSet,
    /// How long the run lock lasts without a refresh (a crashed run's lock expires after it).
    pub lock_ttl: Duration,
    /// Asks the run to stop early (SIGTERM/SIGINT).
    pub shutdown: Shutdown,
    /// After a stop is asked for, how long an in-flight sink request may still take before it
    /// is abandoned (its records stay pending). Keep it below the pod's grace period.
    pub shutdown_deadline: Duration,
    /// Where progress goes (bars on a terminal, nothing otherwise).
    pub progress: Arc<dyn Progress>,
    /// Time spent per stage (the benchmark harness reads it); `None`: not measured.
    pub timings: Option<Arc<Timings>>,
    /// `period: month` pricing: a month is settled this long after it ends at the latest
    /// (earlier once every record of the group is final, the records of every source feeding it
    /// reach the month's end and no source's pull failed in the run).
    pub period_close_delay: chrono::Duration,
    /// Most totals the run summary stored in the ledger carries ([`STORED_TOTALS_MAX`]).
    pub stored_totals_max: usize,
    /// Per source: how long after a charge period's end its records normally reach the sinks
    /// (`Settings::lateness`). A record staged to be sent for a period that ended longer ago
    /// than that is counted and warned about as *late*: an invoicing system may have finalized
    /// that period's invoice already (Lago then stores it without billing it). Empty: no check.
    pub late_after: HashMap<String, chrono::Duration>,
}

/// Busy time per stage of a run, accumulated across runs (nanoseconds).
#[derive(Debug, Default)]
pub struct Timings {
    pull: AtomicU64,
    map: AtomicU64,
    stage: AtomicU64,
    push: AtomicU64,
    ack: AtomicU64,
    push_wall: AtomicU64,
}

/// A copy of [`Timings`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TimingsSnapshot {
    /// Waiting for the provider and parsing its pages.
    pub pull: Duration,
    /// Mapping records and freezing payloads.
    pub map: Duration,
    /// Ledger staging transactions.
    pub stage: Duration,
    /// Waiting for sink deliveries (with several in flight, the time the push loop waited).
    pub push: Duration,
    /// Ledger acknowledgement transactions.
    pub ack: Duration,
    /// The push passes (beside the pull and after it), reads and acks included; not the
    /// waits for the stager between passes.
    pub push_wall: Duration,
}

impl Timings {
    /// The accumulated times.
    pub fn snapshot(&self) -> TimingsSnapshot {
        let d = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        TimingsSnapshot {
            pull: d(&self.pull),
            map: d(&self.map),
            stage: d(&self.stage),
            push: d(&self.push),
            ack: d(&self.ack),
            push_wall: d(&self.push_wall),
        }
    }
}

/// Add the time since `since` to one stage's counter, when measuring.
fn timed(timings: &Option<Arc<Timings>>, stage: fn(&Timings) -> &AtomicU64, since: Instant) {
    if let Some(t) = timings {
        stage(t).fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Totals (one per source, subscription and metric) kept in the run summary stored in the
/// ledger's `runs` table; a run with more stores the count only.
pub const STORED_TOTALS_MAX: usize = 1_000;

/// Records the puller may hold pulled and mapped but not staged yet (those the stager buffers
/// for its open transaction included). Two transactions' worth lets the puller fill the next
/// transaction while the stager writes one, so the two overlap instead of taking turns; rows
/// waiting carry only their columns and encoded body (about a kilobyte each, but made of many
/// small allocations freed on another thread: each record allowed ahead costs ~3 KB of peak
/// RSS in `billsync bench`).
const RECORDS_AHEAD: usize = 2 * STAGE_ROWS_PER_TRANSACTION;
/// Pages that may wait in the channel, whatever their size: small pages (a provider window of
/// a handful of records) must still be able to fill a transaction ahead.
const PAGES_AHEAD: usize = 256;

/// One fetched and mapped chunk on its way to the ledger.
struct PulledPage {
    stream: String,
    cursor: Option<String>,
    /// Other cursors of the source to store with the page ([`crate::providers::Page::also`]).
    also: Vec<(String, String)>,
    rows: Vec<StageRow>,
    shares: Vec<Option<PeriodShare>>,
    /// This page's share of [`RECORDS_AHEAD`], given back once its rows are staged.
    room: tokio::sync::OwnedSemaphorePermit,
}

/// What the puller did for one source.
#[derive(Default)]
struct PullStats {
    chunks: u64,
    pulled: u64,
    interrupted: bool,
    error: Option<String>,
}

#[derive(Default)]
struct StageBuffer {
    /// The buffered pages' rows, page by page as the puller allocated them.
    pages: Vec<Vec<StageRow>>,
    /// How many rows `pages` holds.
    rows: usize,
    /// Hashes of the buffered rows' keys: a page that repeats one is staged after a flush. A
    /// hash is enough: two different keys with the same hash only flush a transaction early.
    keys: hashbrown::HashSet<u64>,
    cursors: Vec<(String, String)>,
    /// Month shares of sent or pending records that staging keeps only if their new content
    /// goes out ([`Ledger::register_period_shares`]).
    shares: Vec<PeriodShareRow>,
    /// The buffered pages' room in [`RECORDS_AHEAD`], released when they are staged.
    room: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// When the oldest buffered page arrived.
    since: Option<Instant>,
    /// Where staged rows go to be freed: back to the puller that allocated them.
    spent: Option<tokio::sync::mpsc::UnboundedSender<SpentRows>>,
    /// Late records staged so far ([`StageCounts::late`]).
    late: LateRecords,
    /// Records staged as unmapped so far, and the first one's key and reason.
    unmapped: HeldRecords,
}

/// Records a source's run staged (new or restaged) as unmapped: held, not billed.
#[derive(Debug, Default)]
struct HeldRecords {
    count: u64,
    /// The first one's key and reason.
    first: Option<(String, String)>,
}

/// Rows staged and done with, with their room in [`RECORDS_AHEAD`], on their way back to the
/// puller thread that allocated them. Freed there, a row's dozens of small allocations go back
/// to that thread's own allocator caches; freed by the stager, every free took the puller's
/// malloc arena lock while the puller was allocating in it (two futex calls per record, a
/// third of the stager's busy time waiting). The room goes with them, so that rows waiting to
/// be freed still count against the bound.
struct SpentRows {
    _pages: Vec<Vec<StageRow>>,
    _room: Vec<tokio::sync::OwnedSemaphorePermit>,
}

/// Where one sink's push stands in a run: the pushes alongside the pull and the final pass
/// continue from it, so a record is tried at most once per run (per content: a record held
/// after its try, rejected, and restaged to pending by a later page of the run goes out again,
/// read by id from `revisit`).
#[derive(Debug, Clone)]
struct SinkProgress {
    /// The last record id read for this sink.
    after_id: i64,
    /// Batches in flight allowed now (AIMD, see [`MAX_BATCHES_IN_FLIGHT`]).
    window: usize,
    /// The sink's 429 count when the window last shrank.
    throttled_seen: u64,
    batches: u64,
    /// The sink stopped (down, refusing credentials): nothing more is sent to it this run.
    stopped: bool,
    /// How many of [`Alongside::restaged`] this sink has looked at.
    restaged_seen: usize,
    /// Records that became pending behind `after_id`: read by id before the walk goes on.
    revisit: Vec<i64>,
    /// The run's clock, for the sink's deduplication window ([`Sink::dedup_window`]).
    clock: RunClock,
    /// Marks of deliveries a crash interrupted have been looked for (once per run, before
    /// this sink is sent anything: [`Ledger::claim_interrupted_sends`]).
    interrupted_claimed: bool,
    /// Records marked as being sent ([`Ledger::mark_sending`]) that a stopped batch left
    /// unsettled: the sink did not take them (one that may have is settled as unclear, see
    /// [`Sink::dedup_window`]), so their marks are cleared when the pass ends.
    unsent: Vec<i64>,
}

/// The run's time (`SyncOptions::now`, `ReplayOptions::now`, else the clock at its start),
/// moving on with the time the run has taken since: a push that lasts hours judges a record
/// against the time it is read, not the time the run began.
#[derive(Debug, Clone, Copy)]
struct RunClock {
    at: DateTime<Utc>,
    started: Instant,
}

impl RunClock {
    fn starting(at: DateTime<Utc>) -> RunClock {
        RunClock {
            at,
            started: Instant::now(),
        }
    }

    fn now(&self) -> DateTime<Utc> {
        self.at + chrono::Duration::from_std(self.started.elapsed()).unwrap_or_default()
    }
}

/// Of the pending records just read for `sink`, those it must not be sent again: a delivery
/// ended unclear (the sink may hold the record) longer ago than the sink deduplicates keys
/// ([`Sink::dedup_window`]), so a resend may be counted a second time. Each is rejected with
/// what to do, without a request; the others are returned to be sent. A person who checked
/// what the sink counted sends it with `replay`, which forgets the unclear delivery.
fn hold_back_unclear(
    sink: &dyn Sink,
    read: Vec<crate::sinks::Outgoing>,
    now: DateTime<Utc>,
) -> (
    Vec<crate::sinks::Outgoing>,
    Vec<(crate::sinks::Outgoing, Outcome)>,
) {
    let Some(dedup) = sink.dedup_window() else {
        return (read, Vec::new());
    };
    let cutoff = dedup.resend_cutoff(now);
    let (stale, send): (Vec<_>, Vec<_>) = read
        .into_iter()
        .partition(|o| o.unclear_since.is_some_and(|t| t < cutoff));
    let stale = stale
        .into_iter()
        .map(|o| {
            let at = o
                .unclear_since
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default();
            let hours = dedup.window.num_hours();
            let reason = format!(
                "not sent again: an earlier attempt at {at} ended unclear (timeout, network error \
                 or 5xx), so {system} may have counted it, and it deduplicates the record's key \
                 only for {hours} hours: a resend now could bill it twice. Check with `billsync \
                 reconcile` whether {system} counted it (a surplus of this record's value for its \
                 customer, metric and month beside what was sent); if not, send it with \
                 `billsync replay --status rejected --key {key} --reason \"…\"`, else record \
                 it as delivered with `billsync ledger mark-delivered --key {key} --reason \"…\"`",
                system = dedup.system,
                key = o.key,
            );
            (o, Outcome::HeldBack(reason))
        })
        .collect();
    (send, stale)
}

impl SinkProgress {
    /// Take the records restaged to pending since this sink last read. `after_id` has not
    /// moved since then (it moves only when the sink reads, under the turn, as restaging
    /// happens), so those at or below it were restaged after the walk went past them, and the
    /// walk will never see them; those above it it will.
    fn take_restaged(&mut self, together: &Alongside) {
        let restaged = together.restaged();
        let new = restaged.get(self.restaged_seen..).unwrap_or_default();
        self.revisit
            .extend(new.iter().copied().filter(|&id| id <= self.after_id));
        self.restaged_seen = restaged.len();
    }
}

/// What the stager and the pusher share while records are pushed during the pull.
///
/// The danger is a record the pusher has read (payload P1 under key K) and the stager then
/// changes (P2, same K) while the request is out. Staging no longer overwrites a pending
/// payload (a change becomes a correction, see `Ledger::stage`), and besides, a pending
/// record read for delivery is *carried* until its acknowledgement commits: a staging
/// transaction that would change a carried record writes nothing and waits, then stages the
/// change as a correction of what the sink answered for. The turn makes "read and carry" and
/// "look up and write" exclusive, so the stager cannot slip a change in between.
#[derive(Default)]
struct Alongside {
    /// Held by the stager for a whole staging transaction, and by the pusher while it reads
    /// pending records and marks them carried, and while it commits acknowledgements (the
    /// ledger's two writers take turns here rather than in SQLite's busy handler).
    turn: tokio::sync::Mutex<()>,
    /// Ids read for delivery and not acknowledged yet.
    carried: std::sync::Mutex<HashSet<i64>>,
    /// Carried records were released.
    released: tokio::sync::Notify,
    /// The stager committed a transaction: there may be more to push.
    staged: tokio::sync::Notify,
    /// Every source is pulled, or the pull stopped.
    pulling_done: std::sync::atomic::AtomicBool,
    /// Ids of held records the stager restaged to pending, in staging order (appended under
    /// the turn). They keep their ids, which the pusher's walk may have passed already.
    restaged: std::sync::Mutex<Vec<i64>>,
}

impl Alongside {
    fn restaged(&self) -> std::sync::MutexGuard<'_, Vec<i64>> {
        self.restaged.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn carried(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        // The set stays consistent whatever panicked while holding it (plain inserts/removes).
        self.carried.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn carries(&self, id: i64) -> bool {
        self.carried().contains(&id)
    }

    fn carry(&self, ids: impl Iterator<Item = i64>) {
        self.carried().extend(ids);
    }

    fn release(&self, ids: impl Iterator<Item = i64>) {
        {
            let mut carried = self.carried();
            for id in ids {
                carried.remove(&id);
            }
        }
        self.released.notify_one();
    }

    fn release_all(&self) {
        self.carried().clear();
        self.released.notify_one();
    }

    /// Wait until none of `ids` is carried.
    async fn wait_released(&self, ids: &[i64]) {
        loop {
            let notified = self.released.notified();
            if !ids.iter().any(|id| self.carries(*id)) {
                return;
            }
            notified.await;
        }
    }
}

/// Tells the pusher alongside that the pull is over, however it ends.
struct PullingDone<'a>(Option<&'a Alongside>);

impl Drop for PullingDone<'_> {
    fn drop(&mut self) {
        if let Some(a) = self.0 {
            a.pulling_done.store(true, Ordering::Release);
            a.staged.notify_one();
        }
    }
}

/// Releases every carried record when a push ends, however it ends (an error, a stop, a
/// stopped sink): the stager must never wait for a pusher that is gone.
struct ReleaseOnDrop<'a>(Option<&'a Alongside>);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(a) = self.0 {
            a.release_all();
        }
    }
}

/// Progress of a run, for a person watching (the logs carry the same facts for machines).
///
/// A sync pushes while it pulls: the pull's calls (`source_started`, `chunk_done`) and the
/// push's (`push_started`, `batch_done`) come interleaved, from two tasks, and each side's
/// progress is its own.
pub trait Progress: Send + Sync {
    /// A source starts pulling `chunks` windows or pages.
    fn source_started(&self, _source: &str, _chunks: u64) {}
    /// One chunk of the current source was staged.
    fn chunk_done(&self, _records: u64) {}
    /// A sink starts pushing, or goes on (a run pushes one sink several times: alongside the
    /// pull after each commit, then once more at its end), with `pending` records left to read.
    /// A sink that goes on keeps what it has done; its total becomes that plus `pending`.
    fn push_started(&self, _sink: &str, _pending: u64) {}
    /// One batch of the sink last started was acknowledged.
    fn batch_done(&self, _records: u64) {}
    /// The run is over: clear the bars.
    fn finish(&self) {}
}

/// What a renamed source looks like from the ledger: configured sources without cursors
/// (`known` are the sources the ledger holds cursors of) beside cursors of sources no longer
/// configured. `None` on a fresh ledger, and where a source was only retired or replaced
/// (every configured source has its cursors).
fn maybe_renamed<'a>(
    known: &'a [String],
    configured: &[&'a str],
) -> Option<(Vec<&'a str>, Vec<&'a str>)> {
    let gone: Vec<&str> = known
        .iter()
        .map(String::as_str)
        .filter(|k| !configured.contains(k))
        .collect();
    let new: Vec<&str> = configured
        .iter()
        .copied()
        .filter(|c| !known.iter().any(|k| k == c))
        .collect();
    (!gone.is_empty() && !new.is_empty()).then_some((new, gone))
}

/// How a sink's push loop ends, given what stopped it early (`cause`: its lock was taken over,
/// or the next pending records could not be read) and whether recording the last answers
/// worked. The cause comes first: it says why the run stopped (a lost lock exits 3, not 1),
/// and a failure to record answers after it is logged; those records stay pending and go out
/// again, with the same keys, in the next run.
fn ended_by(
    sink: &str,
    cause: Option<LedgerError>,
    acked: Result<(), LedgerError>,
) -> Result<(), LedgerError> {
    match (cause, acked) {
        (Some(cause), Err(e)) => {
            error!(sink, error = %e, stopped_by = %cause,
                "cannot record the answers of the batches still out; their records stay pending and go out again (same keys) in the next run");
            Err(cause)
        }
        (Some(cause), Ok(())) => Err(cause),
        (None, acked) => acked,
    }
}

/// Count each outcome of a batch into the run's summary (and its sink's) and queue it for
/// acknowledgement, in batch order. Returns how many records it took.
fn record_outcomes<'b>(
    sink: &str,
    outcomes: impl Iterator<Item = (&'b crate::sinks::Outgoing, Outcome)>,
    summary: &mut RunSummary,
    acks: &mut Vec<(i64, Outcome)>,
) -> u64 {
    let mut counts = SinkCounts::default();
    for (out, outcome) in outcomes {
        match &outcome {
            Outcome::Delivered => counts.sent += 1,
            Outcome::AlreadyDelivered => counts.already_delivered += 1,
            Outcome::Rejected(reason)
            | Outcome::HeldBack(reason)
            | Outcome::RejectedNotStored(reason) => {
                counts.rejected += 1;
                warn!(sink, key = %out.key, %reason, "record rejected; held in the ledger");
            }
            Outcome::Failed(_) | Outcome::Unclear(_) => counts.failed += 1,
        }
        acks.push((out.id, outcome));
    }
    summary.sent += counts.sent;
    summary.already_delivered += counts.already_delivered;
    summary.rejected += counts.rejected;
    summary.failed += counts.failed;
    let mine = summary.by_sink.entry(sink.to_string()).or_default();
    mine.sent += counts.sent;
    mine.already_delivered += counts.already_delivered;
    mine.rejected += counts.rejected;
    mine.failed += counts.failed;
    counts.sent + counts.already_delivered + counts.rejected + counts.failed
}

/// A sink's answer to one batch, with the batch.
type Answer = (
    Vec<crate::sinks::Outgoing>,
    Result<Vec<Outcome>, crate::sinks::SinkStopped>,
);

/// A batch on its way to the sink.
type Delivery<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send + 'a>>;

/// A delivery with its place in the order the batches were sent (no allocation of its own).
struct Numbered<'a> {
    seq: u64,
    delivery: Delivery<'a>,
}

impl std::future::Future for Numbered<'_> {
    type Output = (u64, Answer);

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let seq = self.seq;
        self.delivery.as_mut().poll(cx).map(|answer| (seq, answer))
    }
}

/// The batches in flight to one sink. Answers are taken in the order the batches were sent
/// (outcomes are acknowledged in batch order); one that arrives before its turn waits here,
/// so that when the wait is cut short (the shutdown deadline) the answers already received
/// are still recorded instead of being dropped with the batch still out before them.
///
/// Per batch: a sequence number; an answer that arrives in its turn (the usual case) is
/// handed over at once, only one that arrives early goes through `arrived`.
struct InFlight<'a> {
    running: futures_util::stream::FuturesUnordered<Numbered<'a>>,
    /// Answers received before their turn, by sequence number.
    arrived: BTreeMap<u64, Answer>,
    /// The sequence number of the next batch sent, and of the next answer to take.
    sent: u64,
    taken: u64,
    /// Per batch not answered yet: the (id, key) of its records, when they are to be recorded
    /// as unclear if the wait for it is abandoned (see [`InFlight::push`]).
    out: BTreeMap<u64, Vec<(i64, String)>>,
}

impl<'a> InFlight<'a> {
    fn new() -> Self {
        InFlight {
            running: futures_util::stream::FuturesUnordered::new(),
            arrived: BTreeMap::new(),
            sent: 0,
            taken: 0,
            out: BTreeMap::new(),
        }
    }

    /// Send a batch; `records`: its records' (id, key), given for a sink that deduplicates
    /// for a limited time only ([`Sink::dedup_window`]), whose records must be recorded as
    /// unclear when the wait for their answer is abandoned ([`InFlight::abandoned`]).
    fn push_with(&mut self, records: Vec<(i64, String)>, delivery: Delivery<'a>) {
        if !records.is_empty() {
            self.out.insert(self.sent, records);
        }
        self.push(delivery);
    }

    /// The records of the batches still out, when the wait for them is abandoned (after
    /// [`InFlight::take_received`]): their requests may have reached the sink.
    fn abandoned(&mut self) -> Vec<(i64, String)> {
        std::mem::take(&mut self.out)
            .into_values()
            .flatten()
            .collect()
    }

    /// Batches sent and not taken yet (answered or not).
    fn len(&self) -> usize {
        self.running.len() + self.arrived.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, delivery: Delivery<'a>) {
        let seq = self.sent;
        self.sent += 1;
        self.running.push(Numbered { seq, delivery });
    }

    /// The next answer in batch order; `None` when nothing is in flight. Cancel-safe: an
    /// answer received while this waits is kept for its turn.
    async fn next(&mut self) -> Option<Answer> {
        use futures_util::stream::StreamExt;
        loop {
            if let Some(answer) = self.arrived.remove(&self.taken) {
                self.taken += 1;
                return Some(answer);
            }
            let (seq, answer) = self.running.next().await?;
            self.out.remove(&seq);
            if seq == self.taken {
                self.taken += 1;
                return Some(answer);
            }
            self.arrived.insert(seq, answer);
        }
    }

    /// When the wait is abandoned: every answer already received, whatever its turn, in
    /// batch order. The batches still out stay here, to be dropped (their records stay
    /// pending); nothing is taken from this afterwards.
    fn take_received(&mut self) -> Vec<Answer> {
        use futures_util::future::FutureExt;
        use futures_util::stream::StreamExt;
        while let Some(Some((seq, answer))) = self.running.next().now_or_never() {
            self.out.remove(&seq);
            self.arrived.insert(seq, answer);
        }
        std::mem::take(&mut self.arrived).into_values().collect()
    }
}

/// No progress display.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Options of `billsync sync`.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Only this source (configured name) or provider kind.
    pub provider: Option<String>,
    /// Pull and map, report what would be staged, write nothing and send nothing.
    pub dry_run: bool,
    /// Stage only, do not push (used by tests that simulate a crash after staging).
    pub skip_push: bool,
    /// The current time (tests pin it).
    pub now: Option<DateTime<Utc>>,
}

/// Options of `billsync replay`.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Which held records: status (`unmapped` or `rejected`), source, period, run.
    pub filter: RecordFilter,
    /// Say what would happen, change nothing.
    pub dry_run: bool,
    /// Why (stored in the ledger's audit trail).
    pub reason: String,
    pub now: Option<DateTime<Utc>>,
}

/// How a run ended, from the operator's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// Everything pulled is delivered (or deliberately ignored or waiting to be final).
    Ok,
    /// The run completed but records are left undelivered (pending, unmapped or rejected).
    Undelivered,
    /// A provider failed; what was staged before the failure is kept and was pushed.
    ProviderFailed,
    /// A sink refused the credentials; its records stay pending.
    SinkStopped,
    /// Stopped early on a signal; everything done is recorded, the next run resumes.
    Interrupted,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One WARN per source and run for the records it held as unmapped (not one per record: a
/// new resource type held by the thousand would drown the log), with the first one's reason.
fn report_held(source: &str, held: HeldRecords) {
    if held.count == 0 {
        return;
    }
    let (key, reason) = held.first.unwrap_or_default();
    warn!(source, records = held.count, first_key = %key, first_reason = %reason,
        "records held as unmapped: not billed until a mapping rule maps them (`billsync status` lists them by reason; fix the mappings, then `billsync replay --status unmapped`)");
}

/// Report a source's late records of a run (sync or replay): counted in its summary (`N LATE`,
/// `billsync_records_late`) and one warning naming the oldest period end.
fn report_late(source: &str, late: LateRecords, src: &mut SourceSummary) {
    if late.count == 0 {
        return;
    }
    warn!(source, records = late.count,
        oldest_period_end = %late.oldest_end.map(|t| t.to_rfc3339()).unwrap_or_default(),
        "records staged to be sent for periods that ended longer ago than this source's usual lateness: an invoicing system that has finalized those periods' invoices (Lago past its invoice grace period) stores them without billing them; check them and bill by hand if so (`billsync ledger export --run N` lists this run's records)");
    src.late += late.count;
}

/// Per-source figures of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceSummary {
    pub provider: String,
    pub chunks: u64,
    pub pulled: u64,
    /// Records staged to be sent for periods that ended longer ago than the source's usual
    /// lateness ([`Pipeline::late_after`]).
    #[serde(skip_serializing_if = "is_zero")]
    pub late: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One line of the totals table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Total {
    /// The source (configured provider) the records came from. Names are shared between the
    /// totals of one run (a backfill has tens of thousands).
    pub source: Arc<str>,
    pub subscription: Arc<str>,
    pub metric: Arc<str>,
    pub value: Decimal,
}

/// What one sink did in a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SinkCounts {
    pub sent: u64,
    pub already_delivered: u64,
    pub rejected: u64,
    pub failed: u64,
}

/// What a run did. Printed at the end and stored as JSON in the ledger's `runs` table.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_id: Option<i64>,
    pub command: String,
    pub dry_run: bool,
    pub outcome: RunOutcome,
    pub sources: BTreeMap<String, SourceSummary>,
    pub pulled: u64,
    /// New records staged.
    pub new: u64,
    pub unchanged: u64,
    pub restaged: u64,
    /// Sent records that came back with other content that needs a person (unresolved).
    pub changed_after_send: u64,
    /// Correction records staged (the difference of a sent record that changed).
    pub corrections: u64,
    /// Period adjustment records staged (`period: month` pricing), further ones included.
    pub period_adjustments: u64,
    /// Months that could not be settled (see `billsync status`).
    pub period_problems: u64,
    /// New or restaged records per status (pending = mapped, unmapped = held, ...).
    pub staged_by_status: BTreeMap<String, u64>,
    pub sent: u64,
    pub already_delivered: u64,
    pub rejected: u64,
    /// Left pending after retries; sent again by the next run.
    pub failed: u64,
    /// `sent`, `already_delivered`, `rejected` and `failed` of each sink that was pushed to
    /// (the pushed metrics are per sink).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_sink: BTreeMap<String, SinkCounts>,
    pub sink_errors: Vec<String>,
    /// Stopped early on a signal.
    pub interrupted: bool,
    /// What this run sent, per subscription and metric.
    pub totals: Vec<Total>,
    /// Only in the copy stored in the ledger's `runs` table, when the run had more totals than
    /// it keeps ([`STORED_TOTALS_MAX`]): how many were left out (the run's sent records hold
    /// them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub totals_left_out: Option<usize>,
    /// Undelivered records in the whole ledger at the end of the run (a dry run, which writes
    /// nothing: in the ledger as it is).
    pub undelivered: i64,
    /// Changes of sent records in the whole ledger that wait for a person at the end of the
    /// run (`billsync ledger changes`): money the invoice does not reflect yet, like a held
    /// record.
    pub changes_to_resolve: i64,
    pub duration_ms: u128,
    /// A dry-run replay's record-by-record plan (at most 200 lines).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub preview: Vec<String>,
    /// Records a replay selected whose content `ledger vacuum` pruned (old ignored ones): they
    /// cannot be re-mapped, and stay as they are.
    #[serde(skip_serializing_if = "is_zero")]
    pub pruned: u64,
}

impl RunSummary {
    fn new(command: &str, dry_run: bool) -> Self {
        RunSummary {
            run_id: None,
            command: command.into(),
            dry_run,
            outcome: RunOutcome::Ok,
            sources: BTreeMap::new(),
            pulled: 0,
            new: 0,
            unchanged: 0,
            restaged: 0,
            changed_after_send: 0,
            corrections: 0,
            period_adjustments: 0,
            period_problems: 0,
            staged_by_status: BTreeMap::new(),
            sent: 0,
            already_delivered: 0,
            rejected: 0,
            failed: 0,
            by_sink: BTreeMap::new(),
            sink_errors: Vec::new(),
            interrupted: false,
            totals: Vec::new(),
            totals_left_out: None,
            undelivered: 0,
            changes_to_resolve: 0,
            duration_ms: 0,
            preview: Vec::new(),
            pruned: 0,
        }
    }

    /// Take in what a push alongside the pull delivered.
    fn merge_push(&mut self, pushed: RunSummary) {
        self.sent += pushed.sent;
        self.already_delivered += pushed.already_delivered;
        self.rejected += pushed.rejected;
        self.failed += pushed.failed;
        for (sink, c) in pushed.by_sink {
            let mine = self.by_sink.entry(sink).or_default();
            mine.sent += c.sent;
            mine.already_delivered += c.already_delivered;
            mine.rejected += c.rejected;
            mine.failed += c.failed;
        }
        self.sink_errors.extend(pushed.sink_errors);
        if pushed.outcome != RunOutcome::Ok {
            self.outcome = pushed.outcome;
        }
        self.interrupted |= pushed.interrupted;
    }

    fn add_counts(&mut self, c: &StageCounts) {
        self.new += c.new;
        self.unchanged += c.unchanged;
        self.restaged += c.restaged;
        self.changed_after_send += c.changed_after_send;
        self.corrections += c.corrections;
        for (k, v) in &c.by_status {
            *self.staged_by_status.entry((*k).to_string()).or_default() += v;
        }
    }

    /// Records held as unmapped by this run.
    pub fn held(&self) -> u64 {
        self.staged_by_status.get("unmapped").copied().unwrap_or(0)
    }

    /// Records mapped (to be sent) by this run.
    pub fn mapped(&self) -> u64 {
        self.staged_by_status.get("pending").copied().unwrap_or(0)
    }
}

/// Errors that end a run early. Provider and sink failures do not: they are reported in the
/// summary and the run goes on with what it can do.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("no configured source is named or of kind {0:?}")]
    UnknownProvider(String),
    /// A replay's `--provider` that no configured source has as name or kind and no source the
    /// ledger holds cursors of (one no longer configured) has as name: a typo, which would
    /// replay nothing and report success.
    #[error(
        "no configured source is named or of kind {0:?}, and the ledger has no source so named"
    )]
    UnknownReplaySource(String),
}

impl Pipeline {
    /// A pipeline with the default lock lifetime (15 minutes), no shutdown signal, a 20-second
    /// shutdown deadline and no progress display.
    pub fn new(
        ledger: Ledger,
        providers: Vec<Box<dyn Provider>>,
        sinks: Vec<Box<dyn Sink>>,
        mappings: MappingSet,
    ) -> Pipeline {
        Pipeline {
            ledger,
            providers,
            sinks,
            mappings,
            lock_ttl: Duration::from_secs(15 * 60),
            shutdown: Shutdown::never(),
            shutdown_deadline: Duration::from_secs(20),
            progress: Arc::new(NoProgress),
            timings: None,
            period_close_delay: chrono::Duration::days(DEFAULT_PERIOD_CLOSE_DAYS),
            stored_totals_max: STORED_TOTALS_MAX,
            late_after: HashMap::new(),
        }
    }

    /// For a record of `source` sent by a run at `now`: the time before which its charge
    /// period's end makes it late ([`LateRecords`]), `now` minus the source's usual lateness
    /// ([`Self::late_after`]); `None` (no check) for a source without one. Every command that
    /// sends records judges lateness with this.
    fn late_before(&self, source: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.late_after.get(source).map(|d| now - *d)
    }

    fn sink(&self, name: Option<&str>) -> Option<&dyn Sink> {
        match name {
            None => self.sinks.first().map(|s| s.as_ref()),
            Some(n) => self
                .sinks
                .iter()
                .find(|s| s.name() == n)
                .map(|s| s.as_ref()),
        }
    }

    /// Map one record and freeze its payload: the row the ledger stages. A record that is not
    /// final waits as `provisional` unless its provider opted into pushing provisional data.
    pub fn stage_row(&self, record: UsageRecord, push_provisional: bool) -> StageRow {
        self.stage_row_with_period(record, push_provisional).0
    }

    /// [`stage_row`](Pipeline::stage_row) plus the record's share of its month when its value
    /// has `period: month` pricing (kept by the ledger to settle the month).
    pub fn stage_row_with_period(
        &self,
        record: UsageRecord,
        push_provisional: bool,
    ) -> (StageRow, Option<PeriodShare>) {
        self.stage_row_as(record.idempotency_key(), record, push_provisional)
    }

    /// [`Self::stage_row_with_period`] under a given key: replay keeps the key the ledger
    /// stored, whatever today's key derivation says.
    fn stage_row_as(
        &self,
        key: String,
        record: UsageRecord,
        push_provisional: bool,
    ) -> (StageRow, Option<PeriodShare>) {
        let content_hash = record.content_hash();
        let match_hash = record.match_hash();
        let mut mapped = MappedColumns::default();
        let (outcome, share) = self.mappings.apply_with_period(&record);
        let (status, note) = match outcome {
            MapOutcome::Unmapped { reason } => (Status::Unmapped, Some(reason)),
            MapOutcome::Ignored { rule } => {
                mapped.rule = Some(rule.into());
                (Status::Ignored, None)
            }
            MapOutcome::Mapped(event) => {
                let decided = match self.sink(event.sink.as_deref()) {
                    None => (
                        Status::Unmapped,
                        Some(format!(
                            "rule {} targets sink {:?}, which is not configured",
                            event.rule,
                            event.sink.as_deref().unwrap_or("(default)")
                        )),
                    ),
                    Some(sink) => {
                        mapped.sink = Some(sink.name().into());
                        match sink.encode_record(&key, &event, &record) {
                            Err(e) => (Status::Unmapped, Some(e.to_string())),
                            Ok(payload) => {
                                mapped.payload = Some(payload);
                                if record.is_final || push_provisional {
                                    (Status::Pending, None)
                                } else {
                                    (
                                        Status::Provisional,
                                        Some(
                                            "not final yet: sent once the provider closes it"
                                                .into(),
                                        ),
                                    )
                                }
                            }
                        }
                    }
                };
                // Moved, not cloned, and the event is not kept: a correction (rare) maps the
                // record again (`Pipeline::event_of`). Records are staged by the million.
                mapped.rule = Some(event.rule);
                mapped.subscription = Some(event.external_subscription_id);
                mapped.customer = event.external_customer_id;
                mapped.metric = Some(event.metric_code);
                mapped.value = Some(event.value);
                mapped.value_property = Some(event.value_property);
                decided
            }
        };
        let row = StageRow {
            key,
            content_hash,
            match_hash,
            record,
            status,
            mapped,
            note,
            event: None,
            correction_of: None,
            revision: 0,
            body: None,
        };
        let share = share.filter(|_| matches!(row.status, Status::Pending | Status::Provisional));
        (row, share)
    }

    /// Decide what to do with a sent record that came back with new content: send the
    /// difference as a correction record (key = original key + `.r<revision>`, same timestamp,
    /// so it lands in the same billing period) when it still maps to the same subscription and
    /// metric; otherwise leave it to a person. Corrections assume sum-type metrics.
    ///
    /// The correction's normalized record carries differences too: its `billed_cost` and
    /// `consumed_quantity` are the new content minus what was sent so far (original plus
    /// earlier corrections), so a sink that exports records (FOCUS) can be summed. A sink
    /// that exports records also gets a correction when only the cost or quantity changed.
    pub fn correction(&self, row: &StageRow, sent: &SentState) -> Correction {
        self.correction_as(row, sent, format!("{}.r{}", sent.key, sent.next_revision))
    }

    /// [`Self::correction`] under a given key (replay keeps the stored one).
    fn correction_as(&self, row: &StageRow, sent: &SentState, key: String) -> Correction {
        let event = match self.event_of(row) {
            Ok(event) => event,
            Err(e) => return Correction::Unresolved(format!("{}: {e}", sent.key)),
        };
        let (Some(mut event), Some(new_value)) = (event, row.mapped.value) else {
            return Correction::Unresolved(format!(
                "{} changed after it was sent or queued for sending, but no longer maps ({}): resolve by hand",
                sent.key,
                row.note.as_deref().unwrap_or(row.status.as_str())
            ));
        };
        if row.mapped.subscription.as_deref() != sent.subscription.as_deref()
            || row.mapped.metric.as_deref() != sent.metric.as_deref()
            || row.mapped.sink.as_deref() != sent.sink.as_deref()
        {
            // sink:subscription/metric, `-` for what is not there.
            let place = |sink: Option<&str>, sub: Option<&str>, metric: Option<&str>| {
                format!(
                    "{}:{}/{}",
                    sink.unwrap_or("-"),
                    sub.unwrap_or("-"),
                    metric.unwrap_or("-")
                )
            };
            return Correction::Unresolved(format!(
                "{} changed after it was sent or queued for sending, and now maps to {} instead of {}: resolve by hand",
                sent.key,
                place(
                    row.mapped.sink.as_deref(),
                    row.mapped.subscription.as_deref(),
                    row.mapped.metric.as_deref()
                ),
                place(
                    sent.sink.as_deref(),
                    sent.subscription.as_deref(),
                    sent.metric.as_deref()
                )
            ));
        }
        // The difference goes out under the event's property: one the metric that summed the
        // original does not read would never be billed.
        if let Some(then) = sent.value_property.as_deref() {
            if then != event.value_property.as_str() {
                return Correction::Unresolved(format!(
                    "{} changed after it was sent or queued for sending, and its value now goes \
                     out as `{}` instead of `{then}`: resolve by hand",
                    sent.key, event.value_property
                ));
            }
        }
        // Full record: a row waiting for the stager has shed its attributes.
        let full = match row.full_record() {
            Ok(record) => record,
            Err(e) => return Correction::Unresolved(format!("{}: {e}", sent.key)),
        };
        // A difference is only meaningful in the currency the original went out in: the
        // provider restating a line in another currency (or a rule now converting to another)
        // would add amounts of two currencies up. Period adjustments carry their own event
        // (their month's currency is checked when the month is settled).
        if let Some(then) = sent.billing_currency.as_deref() {
            if row.event.is_none() && then != full.billing_currency.as_str() {
                let mut as_sent = full.clone().into_owned();
                as_sent.billing_currency = then.into();
                let (was, now) = (
                    self.mappings.value_currency(&as_sent),
                    self.mappings.value_currency(&full),
                );
                if was != now {
                    return Correction::Unresolved(format!(
                        "{} changed after it was sent or queued for sending, and its value is now \
                         in {} instead of {} (billing_currency {then} → {}): resolve by hand",
                        sent.key,
                        now.as_deref().unwrap_or("no currency"),
                        was.as_deref().unwrap_or("no currency"),
                        full.billing_currency
                    ));
                }
            }
        }
        let (Some(sent_cost), Some(sent_quantity)) = (sent.sent_cost, sent.sent_quantity) else {
            return Correction::Unresolved(format!(
                "{} changed after it was sent, but `vacuum` pruned what was sent: resolve by hand",
                sent.key
            ));
        };
        let Some(sink) = self.sink(row.mapped.sink.as_deref()) else {
            return Correction::Unresolved(format!("sink {:?} is not configured", row.mapped.sink));
        };
        // A difference beyond a decimal's range (a huge charge restated as the equal credit)
        // cannot go out: this record waits for a person, the others go on.
        let beyond = |what: &str, now: Decimal, then: Decimal| {
            Correction::Unresolved(format!(
                "{} changed after it was sent or queued for sending, and the difference of its \
                 {what} ({now} − {then}) is beyond the range of a decimal: resolve by hand",
                sent.key
            ))
        };
        let Some(difference) = new_value.checked_sub(sent.sent_total) else {
            return beyond("value", new_value, sent.sent_total);
        };
        let Some(cost) = row.record.billed_cost.checked_sub(sent_cost) else {
            return beyond("billed_cost", row.record.billed_cost, sent_cost);
        };
        let Some(quantity) = row.record.consumed_quantity.checked_sub(sent_quantity) else {
            return beyond(
                "consumed_quantity",
                row.record.consumed_quantity,
                sent_quantity,
            );
        };
        // The whole record (raw fields too): the correction's body is kept for audit.
        let mut delta = full.into_owned();
        delta.billed_cost = cost;
        delta.consumed_quantity = quantity;
        // Lago, Stripe, webhook and JSON Lines carry only the mapped value; the FOCUS export
        // carries cost and quantity as well.
        let carries_record = sink.kind() == "focus";
        if difference.is_zero()
            && (!carries_record
                || (delta.billed_cost.is_zero() && delta.consumed_quantity.is_zero()))
        {
            return Correction::NoDifference;
        }
        event.value = difference;
        match sink.encode_record(&key, &event, &delta) {
            Err(e) => Correction::Unresolved(e.to_string()),
            Ok(payload) => {
                let mut mapped = row.mapped.clone();
                mapped.value = Some(difference);
                mapped.payload = Some(payload);
                Correction::Send {
                    row: Box::new(StageRow {
                        key,
                        content_hash: row.content_hash.clone(),
                        match_hash: row.match_hash,
                        record: delta,
                        status: Status::Pending,
                        mapped,
                        note: Some(format!("correction of {}", sent.key)),
                        event: Some(Box::new(event)),
                        correction_of: None,
                        revision: sent.next_revision,
                        body: None,
                    }),
                    difference,
                }
            }
        }
    }

    /// The event a row's payload was encoded from: kept by the rows made here (corrections,
    /// period adjustments), else the record mapped again. Mapping is a pure function of the
    /// record and the mapping set, so this is the event staging encoded, rebuilt only on the
    /// rare path that needs it. `None` for a row that has no payload (held, ignored, or its
    /// sink refused to encode it).
    fn event_of(&self, row: &StageRow) -> Result<Option<MappedEvent>, LedgerError> {
        if let Some(event) = &row.event {
            return Ok(Some((**event).clone()));
        }
        if row.mapped.payload.is_none() {
            return Ok(None);
        }
        // The whole record: a row waiting for the stager has shed its attributes.
        Ok(match self.mappings.apply(&*row.full_record()?) {
            MapOutcome::Mapped(event) => Some(event),
            _ => None,
        })
    }

    /// How often the run lock is extended: every [`LOCK_REFRESH`], or a third of `lock_ttl`
    /// when that is shorter, so that the lock never expires between two refreshes.
    fn lock_refresh_every(&self) -> Duration {
        LOCK_REFRESH.min(self.lock_ttl / 3)
    }

    /// Who holds the run lock: host, process and a random part; for a sync, after `job:<name>/`
    /// when the Kubernetes Job's name is given (`BILLSYNC_JOB_NAME`, from the pod's
    /// `batch.kubernetes.io/job-name` label), so that a retry of the CronJob's Job may take over
    /// the lock its crashed attempt left ([`Ledger::acquire_lock`]). Not for a replay: one
    /// started by hand inside a live sync's pod (`kubectl exec`) inherits the variable, and must
    /// not take the sync's lock.
    fn lock_holder(of_a_sync: bool) -> String {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let job = std::env::var("BILLSYNC_JOB_NAME")
            .ok()
            .filter(|_| of_a_sync)
            .map(|j| j.trim().to_string())
            .filter(|j| !j.is_empty())
            .map(|j| format!("{}{j}/", crate::ledger::JOB_HOLDER_PREFIX))
            .unwrap_or_default();
        format!(
            "{job}{host}:{}:{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    }

    /// Pull every (selected) source, stage, push, and report.
    pub async fn sync(&self, opts: &SyncOptions) -> Result<RunSummary, SyncError> {
        let started = Instant::now();
        let now = opts.now.unwrap_or_else(Utc::now);
        let mut summary = RunSummary::new("sync", opts.dry_run);
        let selected: Vec<&dyn Provider> = self
            .providers
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| match &opts.provider {
                None => true,
                Some(n) => p.name() == n || p.kind() == n,
            })
            .collect();
        if let Some(n) = &opts.provider {
            if selected.is_empty() {
                return Err(SyncError::UnknownProvider(n.clone()));
            }
        }
        // A source's name is in its records' keys and its cursors: renamed, it reads its whole
        // history again under new keys, which the sinks take as new usage. What a rename looks
        // like: a configured source without cursors beside cursors of a source no longer
        // configured (a retired or replaced source alone leaves cursors and is no rename).
        let known = self.ledger.cursor_sources().await?;
        let configured: Vec<&str> = self.providers.iter().map(|p| p.name()).collect();
        if let Some((new, gone)) = maybe_renamed(&known, &configured) {
            warn!(sources = ?new, without_cursors_beside = ?gone,
                "sources without cursors beside cursors of sources the settings no longer name: if one is renamed, it reads its history again under new keys and bills it twice (stop, and see the README, Providers)");
        }

        let holder = Self::lock_holder(true);
        let lock = if opts.dry_run {
            RunLock::none()
        } else {
            self.ledger
                .acquire_lock(&holder, now, self.lock_ttl)
                .await?;
            RunLock::keep(
                &self.ledger,
                &holder,
                self.lock_ttl,
                self.lock_refresh_every(),
            )
        };
        let result = self
            .sync_locked(opts, now, &selected, &lock, &mut summary)
            .await;
        // Stop extending the lock before releasing it.
        drop(lock);
        if !opts.dry_run {
            if let Err(e) = self.ledger.release_lock(&holder).await {
                warn!(error = %e, "could not release the run lock; it expires by itself");
            }
        }
        result?;
        summary.duration_ms = started.elapsed().as_millis();
        Ok(summary)
    }

    async fn sync_locked(
        &self,
        opts: &SyncOptions,
        now: DateTime<Utc>,
        selected: &[&dyn Provider],
        lock: &RunLock,
        summary: &mut RunSummary,
    ) -> Result<(), SyncError> {
        let run_id = if opts.dry_run {
            None
        } else {
            Some(self.ledger.start_run("sync", now).await?)
        };
        summary.run_id = run_id;
        // Every log line of the run carries its id (JSON logs show the span's fields).
        let span = tracing::info_span!("run", run_id = run_id.unwrap_or(0), command = "sync");
        self.sync_run(opts, now, selected, lock, run_id, summary)
            .instrument(span)
            .await
    }

    async fn sync_run(
        &self,
        opts: &SyncOptions,
        now: DateTime<Utc>,
        selected: &[&dyn Provider],
        lock: &RunLock,
        run_id: Option<i64>,
        summary: &mut RunSummary,
    ) -> Result<(), SyncError> {
        let mut sinks = self.sink_progress(now);
        // Records are pushed while later pages are still pulled and staged: waiting for the
        // whole pull left the sink idle for most of a run, and the pull's cores half idle
        // while pushing. The final pass below (after month settlement) goes on from where this
        // one stopped, so each record is still tried at most once per run.
        // Not with monthly pricing: a page's month shares are kept before its records are
        // staged, on the premise that no record's status changes in between.
        let alongside = match run_id {
            Some(_)
                if !opts.skip_push
                    && !self.sinks.is_empty()
                    && !self.mappings.has_period_pricing() =>
            {
                Some(Alongside::default())
            }
            _ => None,
        };
        let _checkpoints = run_id.map(|_| Checkpoints::start(self.ledger.clone()));
        let pull_all = async {
            // However the pull ends, the pusher alongside learns it and stops.
            let _done = PullingDone(alongside.as_ref());
            for provider in selected {
                let mut src = SourceSummary {
                    provider: provider.kind().to_string(),
                    ..Default::default()
                };
                if let Err(e) = self
                    .pull_source(
                        *provider,
                        run_id,
                        now,
                        lock,
                        &mut src,
                        summary,
                        alongside.as_ref(),
                    )
                    .await
                {
                    match e {
                        PullError::Ledger(e) => return Err(SyncError::from(e)),
                        PullError::Provider(message) => {
                            error!(source = provider.name(), error = %message, "pull failed; what was staged before is kept");
                            src.error = Some(message);
                            summary.outcome = RunOutcome::ProviderFailed;
                        }
                    }
                }
                info!(
                    source = provider.name(),
                    chunks = src.chunks,
                    pulled = src.pulled,
                    "source pulled"
                );
                summary.sources.insert(provider.name().to_string(), src);
            }
            Ok(())
        };
        match (&alongside, run_id) {
            (Some(together), Some(run_id)) => {
                let mut pushed = RunSummary::new("sync", false);
                let push = self.push_alongside(run_id, lock, together, &mut sinks, &mut pushed);
                let (pulled, push_result) =
                    run_side_by_side(pull_all, push, "billsync-pusher").await;
                summary.merge_push(pushed);
                pulled?;
                push_result?;
            }
            _ => pull_all.await?,
        }

        if let Some(run_id) = run_id {
            if !summary.interrupted {
                lock.held()?;
                self.settle_periods(run_id, now, summary).await?;
            }
            if !opts.skip_push {
                if let Some(together) = &alongside {
                    // Restaged after the pusher alongside last read: what it had gone past.
                    for state in &mut sinks {
                        state.take_restaged(together);
                    }
                }
                self.push_pending(run_id, lock, summary, &mut sinks, None)
                    .await?;
            }
            self.finish(run_id, summary).await?;
        } else {
            self.ledger_figures(summary).await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pull_source(
        &self,
        provider: &dyn Provider,
        run_id: Option<i64>,
        now: DateTime<Utc>,
        lock: &RunLock,
        src: &mut SourceSummary,
        summary: &mut RunSummary,
        alongside: Option<&Alongside>,
    ) -> Result<(), PullError> {
        // Chunks are made as the puller takes them, never all held at once; the stored
        // cursors are only needed to plan.
        let plan = {
            let cursors = self.ledger.cursors(provider.name()).await?;
            provider
                .plan_lazily(&cursors, now)
                .await
                .map_err(|e| PullError::Provider(e.to_string()))?
        };
        info!(source = provider.name(), chunks = plan.len, "pulling");
        self.progress
            .source_started(provider.name(), plan.len as u64);
        // Two halves run side by side: the puller fetches chunks (several at once when the
        // provider allows, answers taken in plan order), maps them and encodes their bodies;
        // the stager writes pages to the ledger, several per transaction, each with its cursor.
        // A crash loses at most the pages of the open buffer, which are then pulled again (same
        // keys: no-op). The puller runs at most RECORDS_AHEAD records ahead.
        let push_provisional = provider.push_provisional();
        let total = plan.len;
        let (pages_tx, pages_rx) = tokio::sync::mpsc::channel::<PulledPage>(PAGES_AHEAD);
        let records_ahead = Arc::new(tokio::sync::Semaphore::new(RECORDS_AHEAD));
        let (spent_tx, mut spent_rx) = tokio::sync::mpsc::unbounded_channel::<SpentRows>();
        let pull = async move {
            use futures_util::stream::{self, StreamExt};
            let mut stats = PullStats::default();
            let mut fetches = stream::iter(plan.chunks.enumerate())
                .map(|(i, chunk)| async move {
                    let fetched = provider.fetch(&chunk, now).await;
                    (i, chunk, fetched)
                })
                .buffered(provider.concurrent_fetches().max(1));
            loop {
                while let Ok(spent) = spent_rx.try_recv() {
                    drop(spent);
                }
                if self.shutdown.is_requested() {
                    stats.interrupted = true;
                    break;
                }
                // Requests in flight are simply dropped on shutdown: nothing of them was
                // staged, and the cursor has not moved past them.
                let started = Instant::now();
                let next = tokio::select! {
                    next = fetches.next() => next,
                    _ = self.shutdown.requested() => {
                        stats.interrupted = true;
                        break;
                    }
                };
                timed(&self.timings, |t| &t.pull, started);
                let Some((i, chunk, fetched)) = next else {
                    break;
                };
                let page = match fetched {
                    Ok(p) => p,
                    Err(e) => {
                        stats.error = Some(e.to_string());
                        break;
                    }
                };
                stats.chunks += 1;
                stats.pulled += page.records.len() as u64;
                debug!(source = provider.name(), stream = %chunk.stream, window_start = %chunk.window_start,
                    records = page.records.len(), "chunk {}/{}", i + 1, total);
                let started = Instant::now();
                let (rows, shares): (Vec<StageRow>, Vec<Option<PeriodShare>>) = page
                    .records
                    .into_iter()
                    .map(|r| {
                        let (mut row, share) = self.stage_row_with_period(r, push_provisional);
                        if run_id.is_some() {
                            // On failure the ledger encodes it again and reports the error.
                            let _ = row.encode_body_and_shed();
                        }
                        (row, share)
                    })
                    .unzip();
                timed(&self.timings, |t| &t.map, started);
                // A page takes room for its rows, at most a transaction's worth: a larger page
                // is flushed as soon as it arrives. A buffer that is not flushed therefore
                // holds less than a transaction's worth of room, and the wait always ends.
                let need = rows.len().min(STAGE_ROWS_PER_TRANSACTION) as u32;
                // The room comes back with spent rows, which are freed here while waiting.
                let room = loop {
                    tokio::select! {
                        biased;
                        Some(spent) = spent_rx.recv() => drop(spent),
                        room = records_ahead.clone().acquire_many_owned(need) => break room,
                    }
                };
                let Ok(room) = room else {
                    break; // never closed
                };
                let page = PulledPage {
                    stream: chunk.stream,
                    cursor: page.cursor,
                    also: page.also,
                    rows,
                    shares,
                    room,
                };
                if pages_tx.send(page).await.is_err() {
                    break; // the stager stopped (a ledger error it reports)
                }
            }
            stats
        };
        let stage = async {
            // Owned here, so that a stager that stops on a ledger error drops the receiver
            // and the puller's next send fails instead of waiting on a full channel.
            let mut pages_rx = pages_rx;
            let mut buffer = StageBuffer {
                spent: Some(spent_tx),
                ..StageBuffer::default()
            };
            while let Some(page) = pages_rx.recv().await {
                let Some(run_id) = run_id else {
                    if !page.rows.is_empty() {
                        let counts = self.dry_run_counts(&page.rows).await?;
                        summary.add_counts(&counts);
                    }
                    self.progress.chunk_done(page.rows.len() as u64);
                    continue;
                };
                // Month shares are kept before their records are staged: a crash in between
                // leaves the month waiting for the re-read, never miscounted. Those of sent or
                // pending records are kept by the staging, if their new content goes out.
                let deferred = self.register_shares(&page.rows, &page.shares).await?;
                // A key already waiting in the buffer (a record repeated by the next window):
                // stage what is buffered first, so the repeat meets it in the ledger exactly as
                // it would page by page.
                let hasher = buffer.keys.hasher().clone();
                if page
                    .rows
                    .iter()
                    .any(|r| buffer.keys.contains(&hasher.hash_one(&r.key)))
                {
                    self.flush_stage(provider, run_id, now, &mut buffer, summary, alongside)
                        .await?;
                }
                self.progress.chunk_done(page.rows.len() as u64);
                buffer
                    .keys
                    .extend(page.rows.iter().map(|r| hasher.hash_one(&r.key)));
                buffer.rows += page.rows.len();
                buffer.pages.push(page.rows);
                buffer.shares.extend(deferred);
                buffer.room.push(page.room);
                if let Some(value) = page.cursor {
                    buffer.cursors.push((page.stream, value));
                }
                for cursor in page.also {
                    if !buffer.cursors.contains(&cursor) {
                        buffer.cursors.push(cursor);
                    }
                }
                // Nothing more is written once another run holds the ledger (what is buffered
                // is pulled again by the next run: its cursors did not move).
                lock.held()?;
                let since = *buffer.since.get_or_insert_with(Instant::now);
                if buffer.rows >= STAGE_ROWS_PER_TRANSACTION || since.elapsed() >= STAGE_MAX_DELAY {
                    self.flush_stage(provider, run_id, now, &mut buffer, summary, alongside)
                        .await?;
                }
            }
            // Whatever ended the pull (the last page, a provider failure, a stop), what was
            // pulled before is kept.
            if let Some(run_id) = run_id {
                self.flush_stage(provider, run_id, now, &mut buffer, summary, alongside)
                    .await?;
            }
            Ok::<_, LedgerError>((buffer.late, buffer.unmapped))
        };
        let (stats, staged) = run_side_by_side(pull, stage, "billsync-stager").await;
        src.chunks += stats.chunks;
        src.pulled += stats.pulled;
        summary.pulled += stats.pulled;
        if stats.interrupted {
            summary.interrupted = true;
        }
        let (late, held) = staged?;
        report_late(provider.name(), late, src);
        report_held(provider.name(), held);
        match stats.error {
            Some(message) => Err(PullError::Provider(message)),
            None => Ok(()),
        }
    }

    /// Stage the buffered pages and their cursors in one transaction.
    async fn flush_stage(
        &self,
        provider: &dyn Provider,
        run_id: i64,
        // The run's clock (`SyncOptions::now`): what is late is judged against it.
        run_now: DateTime<Utc>,
        buffer: &mut StageBuffer,
        summary: &mut RunSummary,
        alongside: Option<&Alongside>,
    ) -> Result<(), LedgerError> {
        if buffer.rows == 0 && buffer.cursors.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let cursors: Vec<(&str, &str, &str)> = buffer
            .cursors
            .iter()
            .map(|(stream, value)| (provider.name(), stream.as_str(), value.as_str()))
            .collect();
        let rows: Vec<&StageRow> = buffer.pages.iter().flatten().collect();
        let correct = |row: &StageRow, sent: &SentState| self.correction(row, sent);
        let counts = loop {
            // The turn: no pending record is read for delivery while this transaction looks
            // records up and writes them.
            let turn = match alongside {
                Some(a) => Some(a.turn.lock().await),
                None => None,
            };
            let in_flight = |id: i64| alongside.is_some_and(|a| a.carries(id));
            let now = Utc::now();
            let late_before = self.late_before(provider.name(), run_now);
            match self
                .ledger
                .stage_pages(
                    run_id,
                    &rows,
                    &buffer.shares,
                    &cursors,
                    now,
                    &correct,
                    &in_flight,
                    late_before,
                )
                .await
            {
                Err(LedgerError::InFlight { ids }) => {
                    drop(turn);
                    let Some(a) = alongside else {
                        return Err(LedgerError::InFlight { ids });
                    };
                    info!(
                        source = provider.name(),
                        records = ids.len(),
                        "records changed while a sink request carries them; staging waits for the acknowledgement"
                    );
                    a.wait_released(&ids).await;
                }
                Ok(counts) => break (counts, turn),
                Err(e) => return Err(e),
            }
        };
        let (mut counts, turn) = counts;
        if let Some(a) = alongside {
            // Under the turn still: the pusher compares them with where its walk stood.
            a.restaged().append(&mut counts.restaged_pending);
            drop(turn);
            a.staged.notify_one();
        }
        summary.add_counts(&counts);
        buffer.late.add(counts.late);
        let unmapped = counts.by_status.get(Status::Unmapped.as_str());
        buffer.unmapped.count += unmapped.copied().unwrap_or(0);
        if buffer.unmapped.first.is_none() {
            buffer.unmapped.first = counts.first_unmapped.take();
        }
        let spent = SpentRows {
            _pages: std::mem::take(&mut buffer.pages),
            _room: std::mem::take(&mut buffer.room),
        };
        if let Some(back) = &buffer.spent {
            // A puller that has stopped takes nothing back: the rows are freed here.
            let _ = back.send(spent);
        }
        buffer.rows = 0;
        buffer.keys.clear();
        buffer.cursors.clear();
        buffer.shares.clear();
        buffer.since = None;
        timed(&self.timings, |t| &t.stage, started);
        Ok(())
    }

    async fn dry_run_counts(&self, rows: &[StageRow]) -> Result<StageCounts, LedgerError> {
        let known = self.ledger.known(rows).await?;
        let mut c = StageCounts::default();
        for r in rows {
            match known.get(&r.key) {
                None => {
                    c.new += 1;
                    *c.by_status.entry(r.status.as_str()).or_default() += 1;
                }
                Some(k) if k.holds(r) => c.unchanged += 1,
                // Pending or sent: a correction (see `Ledger::stage`), which a dry run cannot
                // decide; counted as a change to look at.
                Some(k) if matches!(k.status, Status::Sent | Status::Pending) => {
                    c.changed_after_send += 1
                }
                // Held, but with corrections or held back after an unclear delivery: staging
                // leaves it as it is and stages a correction, as for a sent one.
                Some(k) if self.ledger.changes_go_out_as_corrections(k.id).await? => {
                    c.changed_after_send += 1
                }
                Some(_) => {
                    c.restaged += 1;
                    *c.by_status.entry(r.status.as_str()).or_default() += 1;
                }
            }
        }
        Ok(c)
    }

    /// Where each configured sink's push stands at the start of a run at `now`.
    fn sink_progress(&self, now: DateTime<Utc>) -> Vec<SinkProgress> {
        self.sinks
            .iter()
            .map(|sink| SinkProgress {
                after_id: 0,
                window: 1,
                throttled_seen: sink.throttled(),
                batches: 0,
                stopped: false,
                restaged_seen: 0,
                revisit: Vec::new(),
                clock: RunClock::starting(now),
                interrupted_claimed: false,
                unsent: Vec::new(),
            })
            .collect()
    }

    /// Send every pending record of every sink, batch by batch. Each record is tried at most
    /// once per run (the walk is by id), so a sink that keeps failing cannot hold a run forever.
    async fn push_all(
        &self,
        run_id: i64,
        now: DateTime<Utc>,
        lock: &RunLock,
        summary: &mut RunSummary,
    ) -> Result<(), LedgerError> {
        let mut sinks = self.sink_progress(now);
        self.push_pending(run_id, lock, summary, &mut sinks, None)
            .await
    }

    /// While the sources are pulled: push what the stager has committed, then wait for its
    /// next commit, until the pull is over (or a stop is asked for). What is left is pushed
    /// by the run's final pass, which goes on from `sinks`.
    async fn push_alongside(
        &self,
        run_id: i64,
        lock: &RunLock,
        together: &Alongside,
        sinks: &mut [SinkProgress],
        summary: &mut RunSummary,
    ) -> Result<(), LedgerError> {
        loop {
            if together.pulling_done.load(Ordering::Acquire) || self.shutdown.is_requested() {
                return Ok(());
            }
            self.push_pending(run_id, lock, summary, sinks, Some(together))
                .await?;
            if sinks.iter().all(|s| s.stopped) {
                return Ok(());
            }
            tokio::select! {
                _ = together.staged.notified() => {}
                _ = self.shutdown.requested() => return Ok(()),
            }
        }
    }

    /// Push what is pending now for every sink that has not stopped, going on from where
    /// each stands (`sinks`).
    ///
    /// Up to [`MAX_BATCHES_IN_FLIGHT`] batches are delivered at once (the window grows by one
    /// per delivered batch and halves when the sink reports a 429); outcomes are taken in
    /// batch order and acknowledged in order, several batches per commit.
    async fn push_pending(
        &self,
        run_id: i64,
        lock: &RunLock,
        summary: &mut RunSummary,
        sinks: &mut [SinkProgress],
        alongside: Option<&Alongside>,
    ) -> Result<(), LedgerError> {
        let push_started = Instant::now();
        for (sink, state) in self.sinks.iter().zip(sinks.iter_mut()) {
            if self.shutdown.is_requested() {
                summary.interrupted = true;
                break;
            }
            if state.stopped {
                continue;
            }
            let sink: &dyn Sink = sink.as_ref();
            // Also alongside the pull: that push may well deliver the whole backlog (it goes
            // on until nothing is pending, after the pull has ended too), and a push that
            // says nothing cannot be told from a stalled one. Each call (one per stager
            // commit while pulling, then the final pass) resumes the sink's progress: what it
            // has done stays counted, and the total is that plus what its walk has still to
            // read (not the failed records it went past, which are pending too).
            let left = self
                .ledger
                .pending_count_after(sink.name(), state.after_id)
                .await?;
            self.progress
                .push_started(sink.name(), left + state.revisit.len() as u64);
            self.push_sink(run_id, sink, state, alongside, lock, summary)
                .await?;
            if alongside.is_none() {
                info!(sink = sink.name(), batches = state.batches, "sink done");
            }
        }
        timed(&self.timings, |t| &t.push_wall, push_started);
        Ok(())
    }

    /// [`Self::push_pending`] for one sink: returns once nothing it read is in flight.
    #[allow(clippy::too_many_arguments)]
    async fn push_sink(
        &self,
        run_id: i64,
        sink: &dyn Sink,
        state: &mut SinkProgress,
        alongside: Option<&Alongside>,
        lock: &RunLock,
        summary: &mut RunSummary,
    ) -> Result<(), LedgerError> {
        // Whatever way this returns, the stager is no longer kept from the records it read.
        let _release = ReleaseOnDrop(alongside);
        // Marks (see below) that a run left are what a crash left between a request and its
        // acknowledgement: the sink may hold those records. Under the run lock no other run is
        // sending them, so they become unclear deliveries, held back past the sink's window.
        let marks = sink.dedup_window().is_some();
        if marks && !state.interrupted_claimed {
            let found = self.ledger.claim_interrupted_sends(sink.name()).await?;
            state.interrupted_claimed = true;
            if found > 0 {
                warn!(sink = sink.name(), records = found,
                    "records were being sent when an earlier run ended without recording the answer (a crash or a kill): the sink may have taken them, so they count as unclear deliveries (resent within its deduplication window, held back for a person after it)");
            }
        }
        let mut in_flight = InFlight::new();
        let mut exhausted = false;
        let mut stopping = false;
        // Once stopping: when the requests still in flight are abandoned (one deadline for all
        // of them, not one each).
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        let mut acks: Vec<(i64, Outcome)> = Vec::new();
        // Pending records read ahead, in id order, several batches per query.
        let mut ahead: std::collections::VecDeque<crate::sinks::Outgoing> =
            std::collections::VecDeque::new();
        let mut read_all = false;
        // Reading the next pending records failed: nothing more is sent, what is in flight is
        // awaited and recorded, then the run ends with this error.
        let mut read_failed: Option<LedgerError> = None;
        // The run's lock was taken over: nothing more is sent, what is in flight is awaited
        // (within the shutdown deadline) and recorded, then the run ends with this error.
        let mut lock_lost: Option<LedgerError> = None;
        loop {
            // Before sending anything more, and after each answer.
            if lock_lost.is_none() {
                if let Err(e) = lock.held() {
                    // The sink may hold the batches still out: left pending with no answer
                    // recorded, they would be sent again by whichever run pushes next (a
                    // receiver that does not deduplicate bills them twice). Acknowledging
                    // after the lock is gone is safe: an acknowledgement only moves a record
                    // that is still pending.
                    warn!(sink = sink.name(), error = %e, in_flight = in_flight.len(),
                        "the run's lock was taken over; nothing more is sent, the batches in flight are awaited and recorded");
                    lock_lost = Some(e);
                    stopping = true;
                }
            }
            // Nothing more goes out once a stop is asked for, the sink stopped or the ledger
            // could not be read; what is in flight is still awaited below.
            while !exhausted
                && !stopping
                && !state.stopped
                && read_failed.is_none()
                && in_flight.len() < state.window
            {
                if self.shutdown.is_requested() {
                    summary.interrupted = true;
                    stopping = true;
                    break;
                }
                let max_batch = sink.max_batch().max(1);
                if ahead.len() < max_batch && !read_all {
                    let want = max_batch * BATCHES_READ_AHEAD;
                    // Read and registered in one turn: a staging transaction either ran
                    // before (the rows read are its content) or sees them carried.
                    let turn = match alongside {
                        Some(a) => {
                            let turn = a.turn.lock().await;
                            state.take_restaged(a);
                            Some(turn)
                        }
                        None => None,
                    };
                    let read = async {
                        let mut more = if state.revisit.is_empty() {
                            Vec::new()
                        } else {
                            let ids = std::mem::take(&mut state.revisit);
                            self.ledger.pending_by_ids(sink.name(), &ids).await?
                        };
                        let walked = self
                            .ledger
                            .pending_batch(sink.name(), state.after_id, want)
                            .await?;
                        read_all = walked.len() < want;
                        if let Some(last) = walked.last() {
                            state.after_id = last.id;
                        }
                        more.extend(walked);
                        Ok::<_, LedgerError>(more)
                    }
                    .await;
                    let more = match read {
                        Ok(more) => more,
                        Err(e) => {
                            // The answers of the batches in flight, and those received but
                            // not committed yet, are still recorded: dropped, the records the
                            // sink took would stay pending and be sent again by the next run
                            // (which may meet the same unreadable record at the same place).
                            error!(sink = sink.name(), error = %e, in_flight = in_flight.len(),
                                "cannot read the next pending records; nothing more is sent, the batches in flight are awaited and recorded");
                            read_failed = Some(e);
                            break;
                        }
                    };
                    if let Some(a) = alongside {
                        a.carry(more.iter().map(|o| o.id));
                    }
                    drop(turn);
                    let (more, held_back) = hold_back_unclear(sink, more, state.clock.now());
                    if !held_back.is_empty() {
                        let done = record_outcomes(
                            sink.name(),
                            held_back.iter().map(|(o, outcome)| (o, outcome.clone())),
                            summary,
                            &mut acks,
                        );
                        self.progress.batch_done(done);
                    }
                    if marks && !more.is_empty() {
                        // Before any of them goes out, committed: a crash before their
                        // acknowledgement leaves the mark (claimed as unclear by the next run),
                        // where it left no trace and a resend after the sink's window was
                        // counted twice. One commit per read-ahead, not per request; the time
                        // is the acknowledgement's clock, and the turn is taken as there
                        // (`ack_now`: one writer at a time).
                        let ids: Vec<i64> = more.iter().map(|o| o.id).collect();
                        let turn = match alongside {
                            Some(a) => Some(a.turn.lock().await),
                            None => None,
                        };
                        let marked = self.ledger.mark_sending(&ids, Utc::now()).await;
                        drop(turn);
                        if let Err(e) = marked {
                            error!(sink = sink.name(), error = %e, in_flight = in_flight.len(),
                                "cannot mark the records read as being sent; nothing more is sent, the batches in flight are awaited and recorded");
                            read_failed = Some(e);
                            break;
                        }
                    }
                    ahead.extend(more);
                }
                if ahead.is_empty() {
                    if !read_all {
                        // Everything read was held back (see `hold_back_unclear`): read on.
                        continue;
                    }
                    exhausted = true;
                    break;
                }
                let batch: Vec<_> = ahead.drain(..max_batch.min(ahead.len())).collect();
                let records = if sink.dedup_window().is_some() {
                    batch.iter().map(|o| (o.id, o.key.clone())).collect()
                } else {
                    Vec::new()
                };
                in_flight.push_with(
                    records,
                    Box::pin(async move {
                        let result = sink.deliver(&batch).await;
                        (batch, result)
                    }),
                );
            }
            if in_flight.is_empty() {
                break;
            }
            let waited = Instant::now();
            let next = if stopping {
                // Let the requests in flight finish, within the deadline: their answers
                // are worth recording. Past the deadline their batches stay pending and
                // are resent, byte for byte, by the next run.
                let deadline = *stop_deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + self.shutdown_deadline);
                match tokio::time::timeout_at(deadline, in_flight.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        // Answers already received behind the batch still out are recorded;
                        // only the batches still out are abandoned.
                        let received =
                            self.take_received(&mut in_flight, sink, state, summary, &mut acks);
                        warn!(sink = sink.name(), batches = in_flight.len(), received,
                            "the deadline for the requests in flight passed; their records stay pending");
                        summary.interrupted = true;
                        break;
                    }
                }
            } else {
                tokio::select! {
                    next = in_flight.next() => next,
                    _ = self.shutdown.requested() => {
                        summary.interrupted = true;
                        stopping = true;
                        continue;
                    }
                }
            };
            timed(&self.timings, |t| &t.push, waited);
            let Some((batch, delivered)) = next else {
                break;
            };
            self.take_answer(
                sink,
                state,
                summary,
                &mut acks,
                batch,
                delivered,
                in_flight.len(),
            );
            if acks.len() >= ACK_RECORDS_PER_COMMIT || in_flight.is_empty() {
                let acked = self.ack_now(run_id, &mut acks, alongside).await;
                if acked.is_err() {
                    // What was read ahead never went out; the marks of what did stay (its
                    // answers are not recorded: the next run claims them as unclear).
                    let ours = lock_lost.is_none() && lock.held().is_ok();
                    let _ = self.clear_unsent(sink, state, ahead, ours).await;
                    return ended_by(sink.name(), lock_lost.or(read_failed), acked);
                }
            }
        }
        // Batches still in flight here were abandoned at the deadline: their records stay
        // pending, resent (same key, same bytes) by the next run. The sink may have taken
        // them: for one that deduplicates for a limited time only, that is recorded as an
        // unclear delivery, so a next run after its window holds them back for a person.
        let abandoned = in_flight.abandoned();
        drop(in_flight);
        if !abandoned.is_empty() {
            let reason = "the run stopped before the sink answered (shutdown deadline); it may \
                          have taken the record";
            let outgoing: Vec<_> = abandoned
                .into_iter()
                .map(|(id, key)| crate::sinks::Outgoing {
                    id,
                    key,
                    payload: String::new(),
                    unclear_since: None,
                })
                .collect();
            record_outcomes(
                sink.name(),
                outgoing
                    .iter()
                    .map(|o| (o, Outcome::Unclear(reason.to_string()))),
                summary,
                &mut acks,
            );
        }
        let acked = self.ack_now(run_id, &mut acks, alongside).await;
        let ours = lock_lost.is_none() && lock.held().is_ok();
        let cleared = self.clear_unsent(sink, state, ahead, ours).await;
        ended_by(sink.name(), lock_lost.or(read_failed), acked.and(cleared))
    }

    /// Clear the marks of the records read ahead but not handed to the sink in this pass (a
    /// stop, the sink stopped, the lock lost) and of those a stopped batch left unsettled:
    /// nothing of them went out, so only a crash leaves a mark. Not once the run's lock is
    /// lost (`lock_held` false): the run that took it over may have marked the same records
    /// before sending them itself, and a mark cleared under it would leave no trace if it then
    /// crashed; left, the marks are claimed as unclear deliveries by the next run, which costs
    /// at most a look at records resent after the sink's window.
    async fn clear_unsent(
        &self,
        sink: &dyn Sink,
        state: &mut SinkProgress,
        ahead: std::collections::VecDeque<crate::sinks::Outgoing>,
        lock_held: bool,
    ) -> Result<(), LedgerError> {
        let mut ids = std::mem::take(&mut state.unsent);
        if sink.dedup_window().is_some() {
            ids.extend(ahead.iter().map(|o| o.id));
        }
        if !lock_held {
            if !ids.is_empty() {
                warn!(sink = sink.name(), records = ids.len(),
                    "the run's lock was lost: the marks of records read but not sent are left, and the next run counts them as unclear deliveries");
            }
            return Ok(());
        }
        let cleared = self.ledger.clear_sending(&ids).await;
        if let Err(e) = &cleared {
            warn!(sink = sink.name(), error = %e, records = ids.len(),
                "cannot clear the marks of records read but not sent; the next run counts them as unclear deliveries");
        }
        cleared
    }

    /// The wait for the batches in flight is abandoned (a stop's deadline passed): every
    /// answer already received, also behind a batch still out, is recorded in batch order.
    /// Left pending, those records would be sent again by whichever run pushes next. Returns
    /// how many answers were recorded.
    fn take_received(
        &self,
        in_flight: &mut InFlight<'_>,
        sink: &dyn Sink,
        state: &mut SinkProgress,
        summary: &mut RunSummary,
        acks: &mut Vec<(i64, Outcome)>,
    ) -> usize {
        let received = in_flight.take_received();
        let count = received.len();
        for (batch, delivered) in received {
            self.take_answer(
                sink,
                state,
                summary,
                acks,
                batch,
                delivered,
                in_flight.len(),
            );
        }
        count
    }

    /// Record one batch's answer: its outcomes (or, when it stopped the sink, what it settled
    /// before the stop) are counted and queued for acknowledgement. `in_flight`: how many
    /// other batches are still out.
    #[allow(clippy::too_many_arguments)]
    fn take_answer(
        &self,
        sink: &dyn Sink,
        state: &mut SinkProgress,
        summary: &mut RunSummary,
        acks: &mut Vec<(i64, Outcome)>,
        batch: Vec<crate::sinks::Outgoing>,
        delivered: Result<Vec<Outcome>, crate::sinks::SinkStopped>,
        in_flight: usize,
    ) {
        match delivered {
            Ok(outcomes) => {
                let throttled = sink.throttled();
                if throttled > state.throttled_seen {
                    state.window = (state.window / 2).max(1);
                    state.throttled_seen = throttled;
                } else {
                    state.window = (state.window + 1).min(MAX_BATCHES_IN_FLIGHT);
                }
                record_outcomes(sink.name(), batch.iter().zip(outcomes), summary, acks);
                state.batches += 1;
                self.progress.batch_done(batch.len() as u64);
                if state.batches.is_multiple_of(100) {
                    info!(
                        sink = sink.name(),
                        batches = state.batches,
                        sent = summary.sent,
                        "pushing"
                    );
                }
            }
            Err(stopped) => {
                // The sink stopped: nothing more is sent to it this run, but the batches
                // already in flight are awaited (each within the sink's own timeouts and
                // retries) and their answers recorded like any other. The sink may have
                // stored them: left pending with no attempt, they would be sent again by
                // the next run (a receiver that does not deduplicate bills them twice).
                // What the sink settled in this batch before it stopped (half of a
                // refused batch stored, a 422 by index) is recorded too; the rest of the
                // batch stays pending.
                let settled = stopped.settled.len();
                if state.stopped {
                    // Another batch in flight met the stop as well.
                    warn!(sink = sink.name(), error = %stopped, settled,
                        "a batch in flight when the sink stopped was stopped too; the records it had not settled stay pending");
                } else {
                    error!(sink = sink.name(), error = %stopped, settled,
                        in_flight,
                        "sink stopped; the batches in flight are awaited and recorded, the records not settled stay pending");
                }
                let message = stopped.to_string();
                if !summary.sink_errors.contains(&message) {
                    summary.sink_errors.push(message);
                }
                summary.outcome = RunOutcome::SinkStopped;
                state.stopped = true;
                if sink.dedup_window().is_some() {
                    let settled: HashSet<usize> = stopped.settled.iter().map(|(i, _)| *i).collect();
                    state.unsent.extend(
                        batch
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| !settled.contains(i))
                            .map(|(_, o)| o.id),
                    );
                }
                if settled > 0 {
                    let done = record_outcomes(
                        sink.name(),
                        stopped
                            .settled
                            .into_iter()
                            .filter_map(|(i, o)| batch.get(i).map(|out| (out, o))),
                        summary,
                        acks,
                    );
                    self.progress.batch_done(done);
                }
            }
        }
    }

    /// Commit the outcomes gathered so far (in delivery order), in one transaction; then the
    /// stager may change those records again.
    async fn ack_now(
        &self,
        run_id: i64,
        acks: &mut Vec<(i64, Outcome)>,
        alongside: Option<&Alongside>,
    ) -> Result<(), LedgerError> {
        if acks.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        {
            // The turn here too: staging and acknowledging both write, and SQLite lets one
            // writer in at a time. The other, refused, would poll through the busy handler's
            // sleeps (1, 2, 5, 10 ms…, each slept in full); waiting for the turn, it starts as
            // soon as the writer before it has committed.
            let _turn = match alongside {
                Some(a) => Some(a.turn.lock().await),
                None => None,
            };
            self.ledger.ack(run_id, acks, Utc::now()).await?;
        }
        if let Some(a) = alongside {
            a.release(acks.iter().map(|(id, _)| *id));
        }
        acks.clear();
        timed(&self.timings, |t| &t.ack, started);
        Ok(())
    }

    /// What waits in the whole ledger, for the summary: at the end of a run, or for a dry run
    /// (read only: it changed nothing) what the ledger holds as it is.
    async fn ledger_figures(&self, summary: &mut RunSummary) -> Result<(), LedgerError> {
        summary.undelivered = self.ledger.undelivered().await?;
        summary.changes_to_resolve = self.ledger.unresolved_change_count().await?;
        Ok(())
    }

    async fn finish(&self, run_id: i64, summary: &mut RunSummary) -> Result<(), LedgerError> {
        summary.totals = self
            .ledger
            .sent_total_list(run_id)
            .await?
            .into_iter()
            .map(|(source, subscription, metric, value)| Total {
                source,
                subscription,
                metric,
                value,
            })
            .collect();
        self.ledger_figures(summary).await?;
        if summary.interrupted {
            summary.outcome = RunOutcome::Interrupted;
        } else if summary.outcome == RunOutcome::Ok
            && (summary.undelivered > 0 || summary.changes_to_resolve > 0)
        {
            // Money that waits for a person (a held record, a change of a sent record) is not a
            // successful run: the CronJob's Job says so until it is replayed or resolved. A
            // month that cannot be settled is not counted: some problems never clear in
            // billsync (months settled by hand in the invoicing system), and every hourly Job
            // would fail for good; `status` and `billsync_period_months` show them.
            summary.outcome = RunOutcome::Undelivered;
        }
        self.progress.finish();
        let outcome = serde_json::to_value(summary.outcome)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        // A backfill sends to every subscription: 54,630 totals in a 10M-record run made a
        // 10 MB JSON, and storing it (SQLite copies what is bound and builds the row) took
        // peak RSS from 63 to 84 MB. The stored copy of such a run leaves them out; they stay
        // in the printed summary, and the run's sent records (`sent_run`) hold them.
        let json = if summary.totals.len() > self.stored_totals_max {
            let totals = std::mem::take(&mut summary.totals);
            summary.totals_left_out = Some(totals.len());
            let json = serde_json::to_string(&*summary);
            summary.totals = totals;
            summary.totals_left_out = None;
            json
        } else {
            serde_json::to_string(&*summary)
        }
        .unwrap_or_default();
        self.ledger
            .finish_run(run_id, &outcome, &json, Utc::now())
            .await
    }

    /// Re-map held records with today's mapping files and push what now maps.
    pub async fn replay(&self, opts: &ReplayOptions) -> Result<RunSummary, SyncError> {
        let started = Instant::now();
        let now = opts.now.unwrap_or_else(Utc::now);
        let mut summary = RunSummary::new("replay", opts.dry_run);
        if let Some(n) = &opts.filter.provider {
            // The month adjustments of period pricing are records of their own provider.
            let configured = n == PERIOD_PROVIDER
                || self
                    .providers
                    .iter()
                    .any(|p| p.name() == n || p.kind() == n);
            if !configured && !self.ledger.cursor_sources().await?.contains(n) {
                return Err(SyncError::UnknownReplaySource(n.clone()));
            }
        }
        let holder = Self::lock_holder(false);
        let lock = if opts.dry_run {
            RunLock::none()
        } else {
            self.ledger
                .acquire_lock(&holder, now, self.lock_ttl)
                .await?;
            RunLock::keep(
                &self.ledger,
                &holder,
                self.lock_ttl,
                self.lock_refresh_every(),
            )
        };
        let result = self.replay_locked(opts, now, &lock, &mut summary).await;
        drop(lock);
        if !opts.dry_run {
            if let Err(e) = self.ledger.release_lock(&holder).await {
                warn!(error = %e, "could not release the run lock; it expires by itself");
            }
        }
        result?;
        summary.duration_ms = started.elapsed().as_millis();
        Ok(summary)
    }

    async fn replay_locked(
        &self,
        opts: &ReplayOptions,
        now: DateTime<Utc>,
        lock: &RunLock,
        summary: &mut RunSummary,
    ) -> Result<(), SyncError> {
        let run_id = if opts.dry_run {
            None
        } else {
            let id = self.ledger.start_run("replay", now).await?;
            let f = &opts.filter;
            let detail = serde_json::json!({
                "status": f.status.map(Status::as_str),
                "provider": f.provider,
                "since": f.since,
                "until": f.until,
                "run": f.run,
                "reason": opts.reason,
            });
            self.ledger
                .audit(id, "replay", &detail.to_string(), now)
                .await?;
            Some(id)
        };
        summary.run_id = run_id;
        let span = tracing::info_span!("run", run_id = run_id.unwrap_or(0), command = "replay");
        self.replay_run(opts, now, lock, run_id, summary)
            .instrument(span)
            .await
    }

    async fn replay_run(
        &self,
        opts: &ReplayOptions,
        // The run's clock (`ReplayOptions::now`): what is late is judged against it.
        now: DateTime<Utc>,
        lock: &RunLock,
        run_id: Option<i64>,
        summary: &mut RunSummary,
    ) -> Result<(), SyncError> {
        // Every configured source has its line (its late records' gauge is this replay's,
        // 0 for a source it sent nothing late of).
        for p in &self.providers {
            summary.sources.insert(
                p.name().to_string(),
                SourceSummary {
                    provider: p.kind().to_string(),
                    ..Default::default()
                },
            );
        }
        // Per source: the records re-mapped to be sent for periods that ended longer ago than
        // its usual lateness (as `sync` counts those it stages).
        let mut late: BTreeMap<String, LateRecords> = BTreeMap::new();
        // `vacuum` prunes old sent and ignored records to a tombstone: nothing to re-map.
        summary.pruned = self.ledger.pruned_matching(&opts.filter).await?;
        if summary.pruned > 0 {
            warn!(
                records = summary.pruned,
                "records pruned by `ledger vacuum` cannot be replayed: they stay as they are"
            );
        }
        let mut after_id = 0;
        loop {
            // Page by page (each record is its own transaction, so any page boundary is a
            // clean stop): a stop asked for ends the re-mapping, and a long replay keeps its
            // lock (or learns it lost it, and stops writing).
            if self.shutdown.is_requested() {
                summary.interrupted = true;
                break;
            }
            lock.held()?;
            let page = self
                .ledger
                .records_matching(&opts.filter, after_id, REPLAY_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after_id = last.id;
            for stored in page {
                if stored.correction_of.is_some() && stored.status == Status::Sent {
                    continue;
                }
                if stored.record.provider == PERIOD_PROVIDER && stored.status != Status::Rejected {
                    // Settlement alone decides whether a held adjustment goes out.
                    continue;
                }
                summary.pulled += 1;
                if stored.record.provider == PERIOD_PROVIDER && stored.correction_of.is_some() {
                    // A refused correction of an adjustment: a later settlement may carry its
                    // difference already (it measures against what went out), so it is not sent
                    // as it was frozen. Superseded, its month is settled again below against what
                    // went out, and sends what is still missing.
                    const WHY: &str = "superseded by a replay: a refused correction of a period \
                        adjustment is not sent as it was; its month is settled again and sends \
                        what it still lacks as a further correction";
                    match run_id {
                        Some(run_id) => {
                            if self
                                .ledger
                                .supersede_adjustment_correction(run_id, stored.id, WHY, Utc::now())
                                .await?
                            {
                                *summary
                                    .staged_by_status
                                    .entry(Status::Ignored.as_str().to_string())
                                    .or_default() += 1;
                            } else {
                                warn!(key = %stored.key, "replay: a refused period correction whose month is not in the ledger is left as it is");
                            }
                        }
                        None if summary.preview.len() < PREVIEW_LINES => {
                            summary.preview.push(format!(
                                "{} rejected → ignored (correction of a period adjustment, \
                                 superseded: its month is settled again and sends what it still \
                                 lacks)",
                                stored.key
                            ))
                        }
                        None => {}
                    }
                    continue;
                }
                if stored.record.provider == PERIOD_PROVIDER {
                    // An adjustment's payload comes from its month, not from the mapping files:
                    // a rejected one goes out again as it was (the month is re-settled on change).
                    let requeued = match run_id {
                        Some(run_id) => {
                            self.ledger
                                .requeue_rejected(run_id, stored.id, Utc::now())
                                .await?
                        }
                        None => false,
                    };
                    match run_id {
                        Some(_) if requeued => {
                            *summary
                                .staged_by_status
                                .entry(Status::Pending.as_str().to_string())
                                .or_default() += 1;
                        }
                        Some(_) => {}
                        None if summary.preview.len() < PREVIEW_LINES => {
                            summary.preview.push(format!(
                                "{} rejected → pending (period adjustment, sent again as it was)",
                                stored.key
                            ))
                        }
                        None => {}
                    }
                    continue;
                }
                let source = stored.record.source.to_string();
                summary
                    .sources
                    .entry(source.clone())
                    .or_insert_with(|| SourceSummary {
                        provider: stored.record.provider.to_string(),
                        ..Default::default()
                    })
                    .pulled += 1;
                let push_provisional = self
                    .providers
                    .iter()
                    .find(|p| p.name() == source)
                    .is_some_and(|p| p.push_provisional());
                // A correction is re-derived (its stored difference may be stale); any other
                // record is re-mapped under its stored key.
                let (row, rederived) = if stored.correction_of.is_some() {
                    self.replay_correction(&stored, push_provisional).await?
                } else {
                    let key = stored.key.clone();
                    let (row, share) = self.stage_row_as(key, stored.record, push_provisional);
                    if run_id.is_some() {
                        // A sent or pending record keeps its payload (`remap` leaves it), and
                        // so its share: what `register_shares` leaves to staging is dropped.
                        self.register_shares(std::slice::from_ref(&row), &[share])
                            .await?;
                    }
                    (row, false)
                };
                *summary
                    .staged_by_status
                    .entry(row.status.as_str().to_string())
                    .or_default() += 1;
                let late_before = self.late_before(&source, now);
                late.entry(source).or_default().note(
                    row.status,
                    row.record.charge_period_end,
                    late_before,
                );
                if let Some(run_id) = run_id {
                    if rederived {
                        self.ledger
                            .restage_correction(run_id, stored.id, &row, Utc::now())
                            .await?;
                    } else {
                        self.ledger
                            .remap(
                                run_id,
                                stored.id,
                                row.status,
                                &row.mapped,
                                row.note.as_deref(),
                                Utc::now(),
                            )
                            .await?;
                    }
                } else if summary.preview.len() < PREVIEW_LINES {
                    summary.preview.push(format!(
                        "{} {} → {}{}",
                        stored.key,
                        stored.status.as_str(),
                        row.status.as_str(),
                        match (
                            &row.mapped.subscription,
                            &row.mapped.metric,
                            row.mapped.value
                        ) {
                            (Some(s), Some(m), Some(v)) if row.status == Status::Pending =>
                                format!(" ({s} {m} {v})"),
                            _ => row
                                .note
                                .as_deref()
                                .map(|n| format!(": {n}"))
                                .unwrap_or_default(),
                        }
                    ));
                }
            }
        }
        for (source, late) in late {
            if let Some(src) = summary.sources.get_mut(&source) {
                report_late(&source, late, src);
            }
        }
        if let Some(run_id) = run_id {
            if !summary.interrupted {
                lock.held()?;
                self.settle_periods(run_id, opts.now.unwrap_or_else(Utc::now), summary)
                    .await?;
            }
            self.push_all(run_id, now, lock, summary).await?;
            self.finish(run_id, summary).await?;
        } else {
            self.ledger_figures(summary).await?;
        }
        Ok(())
    }
}

impl Pipeline {
    /// Replay a correction that did not go out (rejected, held). Its stored difference may be
    /// stale: a later correction may carry it already (staging measures against what went out,
    /// which a refused correction is not), or the content changed again. So it is re-derived,
    /// under its own key, as staging would now: the original's latest content minus the
    /// original and every other sent or pending correction. With nothing left to send it
    /// becomes `ignored`; if the content no longer maps to what was sent, it is held as
    /// `unmapped` with the reason. Returns the row and whether it is a re-derived difference
    /// (to restage) rather than a status to record.
    async fn replay_correction(
        &self,
        stored: &StoredRecord,
        push_provisional: bool,
    ) -> Result<(StageRow, bool), LedgerError> {
        // Only the status, (empty) mapping and note of a held row are recorded (`remap`).
        let held = |status: Status, note: String| StageRow {
            key: stored.key.clone(),
            content_hash: String::new(),
            match_hash: stored.record.match_hash(),
            record: stored.record.clone(),
            status,
            mapped: MappedColumns::default(),
            note: Some(note),
            event: None,
            correction_of: stored.correction_of,
            revision: 0,
            body: None,
        };
        let basis = match self.ledger.correction_basis(stored.id).await {
            // What went out for its original adds up beyond a decimal's range.
            Err(e @ LedgerError::Overflow { .. }) => {
                return Ok((held(Status::Unmapped, e.to_string()), false))
            }
            other => other?,
        };
        let Some((sent, Some(latest))) = basis.map(|b| (b.sent, b.latest)) else {
            return Ok((
                held(
                    Status::Unmapped,
                    format!(
                        "correction {}: its original's latest content is no longer in the \
                         ledger (pruned by `vacuum`): resolve by hand",
                        stored.key
                    ),
                ),
                false,
            ));
        };
        let (row, _) = self.stage_row_as(sent.key.clone(), latest, push_provisional);
        Ok(match self.correction_as(&row, &sent, stored.key.clone()) {
            Correction::Send { row, .. } => (*row, true),
            Correction::NoDifference => (
                held(
                    Status::Ignored,
                    format!(
                        "superseded: what went out for {} already bills its latest content",
                        sent.key
                    ),
                ),
                false,
            ),
            Correction::Unresolved(reason) => (held(Status::Unmapped, reason), false),
        })
    }
}

enum PullError {
    Ledger(LedgerError),
    Provider(String),
}

impl From<LedgerError> for PullError {
    fn from(e: LedgerError) -> Self {
        PullError::Ledger(e)
    }
}

// ----- period pricing ---------------------------------------------------------------------
//
// `period: month` pricing (see `mapping/period.rs`): records are sent with their per-record
// price as they arrive; each record's share of its month is kept beside it, and when the month
// closes one adjustment record per (sink, subscription, metric, month) brings the sink's month
// total to the month's price. The adjustment's key is derived from the group alone, and it is
// staged through `Ledger::stage` with `Pipeline::correction` as for provider records: a later
// change re-settles the month and sends the exact remaining difference as `<key>.r<n>`.

/// What to do with a due group.
enum Settlement {
    /// Not closed yet (or its shares are ahead of the ledger): look again next run.
    Wait(String),
    /// A source feeding the month has not pulled past its end (its pull failed in this run,
    /// or its records stop before the month's end): look again next run.
    WaitForSource(String),
    /// Cannot be settled without a person (the note says why); looked at again every run.
    Problem(String),
    /// Settled at `total`; stage `row` when there is an adjustment to send or to change.
    Settle {
        total: rust_decimal::Decimal,
        row: Option<Box<StageRow>>,
    },
}

/// How a month's adjustment goes out: as the month's records went (rule, customer and event
/// property of one of them, the month's currency), or, to take it back, as it went itself.
struct GoesOut<'a> {
    rule: Option<&'a str>,
    customer: Option<&'a str>,
    value_property: Option<&'a str>,
    currency: &'a str,
    timestamp: DateTime<Utc>,
}

/// Why a month whose adjustment has a change waiting for a person is not settled.
fn adjustment_waits(key: &str) -> String {
    format!(
        "its adjustment {key} changed after it was sent and the change cannot go out: it waits \
         for a person (`billsync ledger changes`, then `billsync ledger resolve`); the month is \
         not settled until then (looked at again every run)"
    )
}

/// The group of a share: (sink, subscription, metric, month) and its adjustment's key.
pub fn period_group(
    sink: &str,
    subscription: &str,
    metric: &str,
    share: &PeriodShare,
) -> PeriodGroupRow {
    let group_key = format!(
        "{sink}\u{1f}{subscription}\u{1f}{metric}\u{1f}{}",
        crate::ledger::ts(share.start)
    );
    let record = adjustment_record(
        sink,
        subscription,
        metric,
        share.start,
        share.end,
        &share.label,
        &share.spec.currency,
    );
    PeriodGroupRow {
        group_key,
        sink: sink.to_string(),
        subscription: subscription.to_string(),
        metric: metric.to_string(),
        label: share.label.clone(),
        start: share.start,
        end: share.end,
        adjustment_key: record.idempotency_key(),
    }
}

/// The adjustment record of a group, before its figures: provider and source `period`, the
/// natural key (sink, subscription, metric, month start), so its idempotency key depends on the
/// group alone and never on a run. It carries no provider cost.
fn adjustment_record(
    sink: &str,
    subscription: &str,
    metric: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    label: &str,
    currency: &str,
) -> UsageRecord {
    UsageRecord {
        provider: PERIOD_PROVIDER.into(),
        source: PERIOD_PROVIDER.into(),
        billing_account_id: Text::default(),
        sub_account_id: subscription.into(),
        resource_id: metric.into(),
        resource_name: Some(label.into()),
        resource_type: "period_adjustment".into(),
        service_name: "billsync period pricing".into(),
        sku_id: None,
        charge_description: None,
        charge_period_start: start,
        charge_period_end: end,
        consumed_quantity: Decimal::ZERO,
        consumed_unit: Text::default(),
        billed_cost: Decimal::ZERO,
        billing_currency: currency.into(),
        scope: subscription.into(),
        natural_key: vec![
            ("sink".into(), sink.into()),
            ("subscription".into(), subscription.into()),
            ("metric".into(), metric.into()),
            ("period".into(), crate::ledger::ts(start).into()),
        ],
        is_final: true,
        attributes: BTreeMap::new(),
        raw: Default::default(),
    }
}

impl Pipeline {
    /// Keep the period shares of a page (before it is staged, so a crash leaves a share the
    /// re-read confirms, never a staged record without its share). Returns the shares of sent
    /// or pending records with new content, which the staging keeps in its own transaction
    /// only if that content goes out (see [`Ledger::register_period_shares`]).
    async fn register_shares(
        &self,
        rows: &[StageRow],
        shares: &[Option<PeriodShare>],
    ) -> Result<Vec<PeriodShareRow>, LedgerError> {
        if !self.mappings.has_period_pricing() {
            return Ok(Vec::new());
        }
        let mut keep = Vec::new();
        let mut others = Vec::new();
        for (row, share) in rows.iter().zip(shares) {
            let target = (
                row.mapped.sink.as_deref(),
                row.mapped.subscription.as_deref(),
                row.mapped.metric.as_deref(),
            );
            match (share, target) {
                (Some(share), (Some(sink), Some(sub), Some(metric))) => {
                    let spec =
                        serde_json::to_string(&share.spec).map_err(|e| LedgerError::Corrupt {
                            id: 0,
                            field: "period spec",
                            message: e.to_string(),
                        })?;
                    keep.push(PeriodShareRow {
                        key: row.key.clone(),
                        content_hash: row.content_hash.clone(),
                        match_hash: row.match_hash,
                        group: period_group(sink, sub, metric, share),
                        base: share.base,
                        spec,
                        is_final: row.record.is_final,
                        charge_period_start: row.record.charge_period_start,
                        charge_period_end: row.record.charge_period_end,
                    })
                }
                _ => others.push(row.key.as_str()),
            }
        }
        self.ledger.register_period_shares(&keep, &others).await
    }

    /// Settle every month that closed and changed since it was last settled.
    async fn settle_periods(
        &self,
        run_id: i64,
        now: DateTime<Utc>,
        summary: &mut RunSummary,
    ) -> Result<(), LedgerError> {
        // Sources whose pull failed in this run: what they have not staged yet may belong to
        // any month, so no month is settled early, and a month they feed waits for them.
        let failed: BTreeSet<String> = summary
            .sources
            .iter()
            .filter(|(_, s)| s.error.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        for due in self.ledger.period_groups_due(now).await? {
            let g = &due.group;
            let members = self.ledger.period_group_members(&g.group_key).await?;
            let label = format!("{} {} {}", g.subscription, g.metric, g.label);
            match self.settlement(&due, &members, now, &failed).await? {
                Settlement::WaitForSource(why) => {
                    // Said at info level at least: the month's invoice waits for a source.
                    if now >= g.end + self.period_close_delay {
                        warn!(group = %label, %why, "month closed but waits for a source");
                    } else {
                        info!(group = %label, %why, "month waits for a source");
                    }
                }
                Settlement::Wait(why) if now >= g.end + self.period_close_delay => {
                    // Closed, and still waiting: a member that is not staged (or not re-read)
                    // yet, or a change of a sent record left to a person. Say it where an
                    // operator looks; it settles on the run that resolves it.
                    warn!(group = %label, %why, "month closed but not settled yet");
                }
                Settlement::Wait(why) => {
                    debug!(group = %label, %why, "period not settled yet");
                }
                Settlement::Problem(note) => {
                    warn!(group = %label, %note, "period cannot be settled");
                    summary.period_problems += 1;
                    self.ledger
                        .finish_period_group(&g.group_key, run_id, now, None, Some(&note))
                        .await?;
                }
                Settlement::Settle { total, row } => {
                    if let Some(row) = row {
                        let correct = |row: &StageRow, sent: &SentState| self.correction(row, sent);
                        let c = self
                            .ledger
                            .stage(run_id, &[*row], None, Utc::now(), &correct)
                            .await?;
                        let staged = c.new + c.restaged + c.corrections;
                        summary.period_adjustments += staged;
                        if c.changed_after_send > 0 {
                            // The settlement did not go out: the month is not settled.
                            let note = adjustment_waits(&g.adjustment_key);
                            warn!(group = %label, %note, "period cannot be settled");
                            summary.period_problems += 1;
                            self.ledger
                                .finish_period_group(&g.group_key, run_id, now, None, Some(&note))
                                .await?;
                            continue;
                        }
                        info!(group = %label, %total, staged, "period settled");
                    }
                    self.ledger
                        .finish_period_group(&g.group_key, run_id, now, Some(total), None)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Decide a due group: wait, report a problem, or settle with the adjustment to stage.
    async fn settlement(
        &self,
        due: &PeriodGroupState,
        members: &[PeriodMemberRow],
        now: DateTime<Utc>,
        failed: &BTreeSet<String>,
    ) -> Result<Settlement, LedgerError> {
        let g = &due.group;
        // A source that feeds this month and failed to pull in this run may hold back records
        // of it (or changes of them): settling now would price the month on part of its data.
        let failed_here: BTreeSet<&str> = members
            .iter()
            .filter_map(|m| m.record.as_ref())
            .map(|r| r.source.as_str())
            .filter(|s| failed.contains(*s))
            .collect();
        if !failed_here.is_empty() {
            return Ok(Settlement::WaitForSource(format!(
                "the pull of {} failed in this run: the month is settled on a run in which every \
                 source feeding it pulls",
                failed_here.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        let mut counted = Vec::new();
        for m in members {
            let Some(r) = &m.record else {
                // Registered, then the staging did not commit: the re-read stages it.
                return Ok(Settlement::Wait(format!("{} is not staged yet", m.key)));
            };
            // A sent or queued record stays where it was billed. A share of it in another
            // subscription's or metric's month (it was billed without monthly pricing, then
            // read again with content that maps here: a change for a person, never sent here)
            // is not part of this month at the sink: counting its value would bill this month
            // an adjustment for what another subscription holds.
            if matches!(r.status, Status::Sent | Status::Pending)
                && (r.sink.as_deref() != Some(g.sink.as_str())
                    || r.subscription.as_deref() != Some(g.subscription.as_str())
                    || r.metric.as_deref() != Some(g.metric.as_str()))
            {
                continue;
            }
            // A change of it waits for a person, who may yet bill it by hand: the month waits
            // too. (Its share stays what was sent: staging moves a sent record's share only
            // with content that goes out.)
            if r.open_change {
                return Ok(Settlement::Wait(format!(
                    "{}: a change of it waits for a person (`billsync ledger changes`, then \
                     `billsync ledger resolve`)",
                    m.key
                )));
            }
            // A correction of it is held: the share follows the corrected content, the sink
            // does not hold the difference. Settled now, the month would be tiered on content
            // the sink was not billed; once a replay sends the correction, the month settles
            // (a replay settles the months of what it sends).
            if r.held_correction {
                return Ok(Settlement::Wait(format!(
                    "{}: a correction of it is held (refused by the sink, or unmapped): see `billsync status`, fix it, then `billsync replay`",
                    m.key
                )));
            }
            // Both hashes, where both sides have the match hash (a share or record kept before
            // match hashes has none).
            let matches_apart = matches!(
                (&r.match_hash, &m.share_match_hash),
                (Some(record), Some(share)) if record != share
            );
            if r.content_hash != m.share_hash || matches_apart {
                // A staging that registered the share and did not commit (the re-read
                // stages it), or a change of a sent record left to a person.
                return Ok(Settlement::Wait(format!(
                    "{}: its share of the month and its ledger row hold different contents \
                     (a staging that did not commit, or a change waiting for a person: \
                     `billsync ledger changes`, then `billsync ledger resolve`)",
                    m.key
                )));
            }
            // What the sink holds or will hold; a rejected record is not there.
            if matches!(
                r.status,
                Status::Sent | Status::Pending | Status::Provisional
            ) {
                counted.push((m, r));
            }
        }
        // Months of one subscription and metric that overlap (a changed `period_utc_offset`):
        // each would be brought up to its own minimum, charging the time they share twice.
        let overlapping = if counted.is_empty() {
            Vec::new()
        } else {
            self.ledger.overlapping_period_groups(g).await?
        };
        if !overlapping.is_empty() {
            return Ok(Settlement::Problem(format!(
                "this month ({} from {}) overlaps {} of the same subscription and metric \
                 (`period_utc_offset` changed while its records came in): settling both would \
                 charge their common time twice. Not settled (looked at again every run): \
                 settle the month in the invoicing system by hand",
                g.label,
                crate::ledger::ts(g.start),
                overlapping
                    .iter()
                    .map(|(label, start)| format!("{label} from {start}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let closed_by_delay = now >= g.end + self.period_close_delay;
        if due.settled_at.is_none() && !closed_by_delay {
            let at_the_latest = g.end + self.period_close_delay;
            if counted.is_empty() {
                return Ok(Settlement::Wait(format!(
                    "no record of the month is at the sink or on its way; the month closes at \
                     {at_the_latest} at the latest"
                )));
            }
            if !counted.iter().all(|(m, _)| m.is_final) {
                return Ok(Settlement::Wait(format!(
                    "not every record is final; the month closes at {at_the_latest} at the latest"
                )));
            }
            if !failed.is_empty() {
                // A failed source may feed this month with records not staged yet.
                return Ok(Settlement::WaitForSource(format!(
                    "the pull of {} failed in this run, and it may feed this month: the month \
                     closes early only on a run in which every source pulls, at \
                     {at_the_latest} at the latest",
                    failed
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            // Every source feeding the month must have reached its end, not just one of them.
            let mut reached: BTreeMap<&str, DateTime<Utc>> = BTreeMap::new();
            for (m, r) in &counted {
                let end = reached
                    .entry(r.source.as_str())
                    .or_insert(m.charge_period_end);
                *end = (*end).max(m.charge_period_end);
            }
            let behind: Vec<String> = reached
                .iter()
                .filter(|(_, end)| **end < g.end)
                .map(|(source, end)| format!("{source} (up to {end})"))
                .collect();
            if !behind.is_empty() {
                return Ok(Settlement::WaitForSource(format!(
                    "the records of {} do not reach the month's end yet; the month closes at \
                     {at_the_latest} at the latest",
                    behind.join(", ")
                )));
            }
        }
        let known = self.ledger.adjustment_as_sent(&g.adjustment_key).await?;
        // A change of the adjustment waits for a person: the sink does not hold what the month
        // was last settled at, so it is not settled until the change is resolved.
        if known.as_ref().is_some_and(|a| a.open_change) {
            return Ok(Settlement::Problem(adjustment_waits(&g.adjustment_key)));
        }
        if counted.is_empty() {
            let Some(sent) = known else {
                return Ok(Settlement::Settle {
                    total: Decimal::ZERO,
                    row: None,
                });
            };
            // Every record left the month after an adjustment was staged: take it back, as it
            // went out (its property, customer, rule and currency: a correction under another
            // property would not be added to it), at the month's latest record.
            let latest = members
                .iter()
                .map(|m| m.charge_period_start)
                .max()
                .unwrap_or(g.start);
            let mut attributes = BTreeMap::new();
            for name in ["period_total", "records_total", "tier_base", "adjustment"] {
                attributes.insert(name.into(), "0".into());
            }
            let steps = vec![
                format!("period {} of {} {}", g.label, g.subscription, g.metric),
                "no record of the month is at the sink or on its way any more (refused by the \
                 sink, or no longer billed here): the month totals 0 and its adjustment is \
                 taken back"
                    .to_string(),
            ];
            return Ok(self.adjustment(
                g,
                GoesOut {
                    rule: sent.rule.as_deref(),
                    customer: sent.customer.as_deref(),
                    value_property: sent.value_property.as_deref(),
                    currency: sent.billing_currency.as_deref().unwrap_or_default(),
                    timestamp: latest,
                },
                attributes,
                Decimal::ZERO,
                steps,
            ));
        }
        // The monthly parts are those of the rule of the month's latest record: a mapping change
        // during the month (a new minimum, new tiers) applies to the whole month's total, while
        // every record keeps the per-record price it was sent with. Records in another currency
        // cannot be added up at all.
        let mut specs = Vec::with_capacity(counted.len());
        for (m, _) in &counted {
            match serde_json::from_str::<PeriodSpec>(&m.spec) {
                Ok(s) => specs.push(s),
                Err(e) => {
                    return Ok(Settlement::Problem(format!(
                        "{}: unreadable period rule: {e}",
                        m.key
                    )))
                }
            }
        }
        let latest_at = (0..counted.len())
            .max_by_key(|&i| (counted[i].0.charge_period_start, &counted[i].0.key))
            .unwrap_or(0);
        let spec = specs[latest_at].clone();
        if let Some(i) = specs.iter().position(|s| s.currency != spec.currency) {
            return Ok(Settlement::Problem(format!(
                "records {} ({}) and {} ({}) of this month are in different invoice currencies; \
                 one month of a metric needs one currency (fix the mapping, then replay)",
                counted[i].0.key, specs[i].currency, counted[latest_at].0.key, spec.currency
            )));
        }
        let older_rules = specs.iter().filter(|s| **s != spec).count();
        let mut shares: Vec<(Decimal, Decimal)> = Vec::with_capacity(counted.len());
        for (m, r) in &counted {
            // What the sink holds of it, beyond a decimal's range: the month cannot be priced.
            let Some(value) = r.corrections.and_then(|c| r.value.checked_add(c)) else {
                return Ok(Settlement::Problem(format!(
                    "{}: its value plus its corrections is beyond the range of a decimal; \
                     settle the month in the invoicing system by hand",
                    m.key
                )));
            };
            shares.push((m.base, value));
        }
        let price = match crate::mapping::period::settle(&spec, &shares) {
            Ok(p) => p,
            Err(e) => return Ok(Settlement::Problem(e)),
        };
        if price.adjustment.is_zero() && known.is_none() {
            return Ok(Settlement::Settle {
                total: price.total,
                row: None,
            });
        }
        let latest = counted
            .iter()
            .map(|(m, _)| m.charge_period_start)
            .max()
            .unwrap_or(g.start);
        let records: Vec<&crate::ledger::PeriodMemberRecord> =
            counted.iter().map(|(_, r)| *r).collect();
        let mut steps = price.steps.clone();
        if older_rules > 0 {
            warn!(group = %g.group_key, older_rules, "a month's records were priced by different period rules; the latest record's rule gives the monthly parts, the records keep their prices");
            steps.insert(
                0,
                format!(
                    "{older_rules} record(s) were staged under another period rule; the monthly \
                     parts (tiers beyond their lowest rate, minimum) are those of the rule of \
                     its latest record {}; every record keeps the price it was sent with",
                    counted[latest_at].0.key
                ),
            );
        }
        steps.insert(
            0,
            format!("period {} of {} {}", g.label, g.subscription, g.metric),
        );
        let mut attributes = BTreeMap::new();
        attributes.insert("period_total".into(), price.total.to_compact_string());
        attributes.insert(
            "records_total".into(),
            price.records_total.to_compact_string(),
        );
        attributes.insert("tier_base".into(), price.tier_base.to_compact_string());
        attributes.insert("adjustment".into(), price.adjustment.to_compact_string());
        let first = records.first();
        Ok(
            match self.adjustment(
                g,
                GoesOut {
                    rule: first.and_then(|r| r.rule.as_deref()),
                    customer: first.and_then(|r| r.customer.as_deref()),
                    value_property: first.and_then(|r| r.value_property.as_deref()),
                    currency: &spec.currency,
                    // In the month, at its latest record, so it lands in the same billing
                    // period and stays within a sink's backdating window as long as possible.
                    timestamp: latest,
                },
                attributes,
                price.adjustment,
                steps,
            ) {
                Settlement::Settle { row, .. } => Settlement::Settle {
                    total: price.total,
                    row,
                },
                other => other,
            },
        )
    }

    /// The adjustment row of a group carrying `value` (the month's total adjustment; the ledger
    /// turns a change of a sent one into a correction with the difference).
    fn adjustment(
        &self,
        g: &PeriodGroupRow,
        goes_out: GoesOut<'_>,
        attributes: BTreeMap<crate::record::Name, Text>,
        value: Decimal,
        steps: Vec<String>,
    ) -> Settlement {
        let mut record = adjustment_record(
            &g.sink,
            &g.subscription,
            &g.metric,
            g.start,
            g.end,
            &g.label,
            goes_out.currency,
        );
        record.charge_description = Some(compact_str::format_compact!(
            "period adjustment of {} {} {}",
            g.subscription,
            g.metric,
            g.label
        ));
        record.raw = serde_json::json!({ "steps": steps }).into();
        record.attributes = attributes;
        let key = record.idempotency_key();
        debug_assert_eq!(key, g.adjustment_key);
        let Some(sink) = self.sink(Some(&g.sink)) else {
            return Settlement::Problem(format!("sink {:?} is not configured", g.sink));
        };
        let event = crate::mapping::MappedEvent {
            rule: goes_out.rule.unwrap_or(PERIOD_PROVIDER).into(),
            sink: Some(g.sink.as_str().into()),
            external_subscription_id: g.subscription.as_str().into(),
            external_customer_id: goes_out.customer.map(Text::from),
            metric_code: g.metric.as_str().into(),
            value_property: goes_out.value_property.unwrap_or("value").into(),
            value,
            properties: BTreeMap::new(),
            timestamp: goes_out.timestamp,
        };
        let payload = match sink.encode_record(&key, &event, &record) {
            Ok(p) => p,
            Err(e) => return Settlement::Problem(e.to_string()),
        };
        let mapped = MappedColumns {
            rule: Some(event.rule.clone()),
            sink: Some(g.sink.as_str().into()),
            subscription: Some(g.subscription.as_str().into()),
            customer: event.external_customer_id.clone(),
            metric: Some(g.metric.as_str().into()),
            value: Some(value),
            value_property: Some(event.value_property.clone()),
            payload: Some(payload),
        };
        // Nothing to add while unsent: withdraw it instead of sending a zero.
        let (status, note) = if value.is_zero() {
            (
                Status::Ignored,
                Some(format!("period {}: nothing to adjust", g.label)),
            )
        } else {
            (Status::Pending, None)
        };
        let content_hash = record.content_hash();
        let match_hash = record.match_hash();
        Settlement::Settle {
            total: Decimal::ZERO,
            row: Some(Box::new(StageRow {
                key,
                content_hash,
                match_hash,
                record,
                status,
                mapped,
                note,
                event: Some(Box::new(event)),
                correction_of: None,
                revision: 0,
                body: None,
            })),
        }
    }
}

/// The run lock of a sync or replay, extended on a timer by a task of its own for as long as
/// the run lives (until dropped), not on the run's progress: a provider answer or a retry
/// slower than `lock_ttl` must not let another run take the ledger and push the same records
/// beside this one. A stuck process keeps its lock; the CronJob's `activeDeadlineSeconds`
/// ends it, and a killed run's lock expires after `lock_ttl`.
///
/// The run asks [`RunLock::held`] wherever it may write or send (per page pulled, per batch):
/// once a refresh finds the lock taken by another run, the answer is
/// [`LedgerError::Locked`] and the run stops.
struct RunLock {
    /// The new holder, since when and until when, once this run's lock was found taken.
    lost: Arc<std::sync::Mutex<Option<(String, String, String)>>>,
    keeper: Option<tokio::task::JoinHandle<()>>,
}

impl RunLock {
    /// No lock to keep (a dry run takes none).
    fn none() -> RunLock {
        RunLock {
            lost: Arc::default(),
            keeper: None,
        }
    }

    /// Keep `holder`'s lock (just acquired) alive: extended to `ttl` from now every `every`.
    fn keep(ledger: &Ledger, holder: &str, ttl: Duration, every: Duration) -> RunLock {
        let lost: Arc<std::sync::Mutex<Option<(String, String, String)>>> = Arc::default();
        let (ledger, holder, found) = (ledger.clone(), holder.to_string(), lost.clone());
        // A zero `lock_ttl` (the demo's: its lock must never outlive it) still notices a takeover.
        let every = every.max(Duration::from_millis(100));
        let keeper = tokio::spawn(
            async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match ledger.refresh_lock(&holder, Utc::now(), ttl).await {
                        Ok(()) => {}
                        Err(LedgerError::Locked {
                            holder,
                            acquired_at,
                            expires_at,
                        }) => {
                            error!(%holder, %acquired_at, %expires_at,
                                "this run's lock expired and was taken by another run; stopping");
                            if let Ok(mut lost) = found.lock() {
                                *lost = Some((holder, acquired_at, expires_at));
                            }
                            return;
                        }
                        // A busy or failing ledger: the lock stays valid until it expires, and
                        // the run itself will meet the same trouble; try again at the next tick.
                        Err(e) => warn!(error = %e, "could not extend the run lock; trying again"),
                    }
                }
            }
            .in_current_span(),
        );
        RunLock {
            lost,
            keeper: Some(keeper),
        }
    }

    /// Whether the run still holds its lock (as of the last refresh).
    fn held(&self) -> Result<(), LedgerError> {
        match self.lost.lock().ok().and_then(|lost| lost.clone()) {
            None => Ok(()),
            Some((holder, acquired_at, expires_at)) => Err(LedgerError::Locked {
                holder,
                acquired_at,
                expires_at,
            }),
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
    }
}

/// WAL checkpoints every [`Checkpoints::EVERY`] while a sync runs, on a task of their own,
/// until dropped. SQLite checkpoints in the commit that takes the WAL past 1,000 pages (16 MB),
/// so one staging or acknowledgement commit in a few paid for copying everything before it
/// into the database file: measured, a ninth of the stager's time in a 1M run. Kept
/// checkpointed from the side, those commits find the checkpoint done or busy and skip it.
struct Checkpoints {
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Checkpoints {
    const EVERY: Duration = Duration::from_millis(200);

    fn start(ledger: Ledger) -> Checkpoints {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            // Not at once: a run with nothing to do is over before the first.
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + Self::EVERY, Self::EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {
                        if let Err(e) = ledger.checkpoint().await {
                            debug!(error = %e, "WAL checkpoint skipped");
                        }
                    }
                }
            }
        });
        Checkpoints { _stop: stop }
    }
}

/// Run two halves side by side: the puller and the stager of a source, or the whole pull and
/// the pusher. `name` names the second half's thread (seen in `top -H` and profiles).
///
/// On the multi-threaded runtime (the binary) the stager gets a thread of its own: the puller's
/// parsing, mapping and encoding and the stager's ledger writes are both CPU work, and awaited
/// in one task they would take turns on one core. On a current-thread runtime (most tests) the
/// two halves are awaited together in this task, as they must be: there the runtime's only
/// thread is the one driving its I/O.
async fn run_side_by_side<P, S>(pull: P, stage: S, name: &str) -> (P::Output, S::Output)
where
    P: std::future::Future,
    S: std::future::Future + Send,
    S::Output: Send,
{
    let handle = tokio::runtime::Handle::current();
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return tokio::join!(pull, stage);
    }
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let stager = std::thread::Builder::new()
                .name(name.into())
                .spawn_scoped(scope, || handle.block_on(stage))
                .unwrap_or_else(|e| panic!("spawning the {name} thread: {e}"));
            let pulled = handle.block_on(pull);
            let staged = match stager.join() {
                Ok(staged) => staged,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            (pulled, staged)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::maybe_renamed;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A source's name is in its records' keys: a new name without cursors beside a gone name
    /// with cursors is what a rename looks like (its history would be billed twice).
    #[test]
    fn a_rename_is_a_new_source_beside_a_gone_one() {
        let known = names(&["metalsoft_us01", "sakura"]);
        assert_eq!(
            maybe_renamed(&known, &["metalsoft_main", "sakura"]),
            Some((vec!["metalsoft_main"], vec!["metalsoft_us01"]))
        );
        // A retired (or replaced, once the new one has run) source, a fresh ledger, no change.
        assert_eq!(maybe_renamed(&known, &["sakura"]), None);
        assert_eq!(maybe_renamed(&names(&[]), &["sakura"]), None);
        assert_eq!(maybe_renamed(&known, &["metalsoft_us01", "sakura"]), None);
        // A source added beside unchanged ones is no rename either.
        assert_eq!(
            maybe_renamed(&known, &["metalsoft_us01", "sakura", "jelastic"]),
            None
        );
    }
}
