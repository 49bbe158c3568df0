//! The one place that wires providers, mappings, the ledger and sinks together.
//!
//! Data flows one way: provider → normalize → map → ledger (outbox) → sink → ledger (ack).
//! Each provider page is mapped and staged with its cursor in one transaction, so a crash
//! loses at most a page that is then pulled again; records leave only from the ledger, with
//! the payload frozen at staging, so a crash between a sink accepting and the ledger recording
//! it ends in a resend of identical bytes that the sink recognises as a duplicate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use tracing::{debug, error, info, warn, Instrument};

use crate::ledger::{
    Correction, Ledger, LedgerError, MappedColumns, RecordFilter, SentState, StageCounts, StageRow,
    Status, StoredRecord,
};
use crate::mapping::{MapOutcome, MappingSet};
use crate::providers::Provider;
use crate::record::UsageRecord;
use crate::shutdown::Shutdown;
use crate::sinks::{Outcome, Sink};

/// How often a long run extends its lock.
const LOCK_REFRESH: Duration = Duration::from_secs(30);
/// Records read per page when replaying.
const REPLAY_PAGE: i64 = 500;
/// Records a dry-run replay lists one by one (the counts cover all of them).
const PREVIEW_LINES: usize = 200;

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
}

/// Progress of a run, for a person watching (the logs carry the same facts for machines).
pub trait Progress: Send + Sync {
    /// A source starts pulling `chunks` windows or pages.
    fn source_started(&self, _source: &str, _chunks: u64) {}
    /// One chunk of the current source was staged.
    fn chunk_done(&self, _records: u64) {}
    /// A sink starts pushing `pending` records.
    fn push_started(&self, _sink: &str, _pending: u64) {}
    /// One batch was acknowledged.
    fn batch_done(&self, _records: u64) {}
    /// The run is over: clear the bars.
    fn finish(&self) {}
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

/// Per-source figures of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceSummary {
    pub provider: String,
    pub chunks: u64,
    pub pulled: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One line of the totals table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Total {
    /// The source (configured provider) the records came from.
    pub source: String,
    pub subscription: String,
    pub metric: String,
    pub value: Decimal,
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
    /// New or restaged records per status (pending = mapped, unmapped = held, ...).
    pub staged_by_status: BTreeMap<String, u64>,
    pub sent: u64,
    pub already_delivered: u64,
    pub rejected: u64,
    /// Left pending after retries; sent again by the next run.
    pub failed: u64,
    pub sink_errors: Vec<String>,
    /// Stopped early on a signal.
    pub interrupted: bool,
    /// What this run sent, per subscription and metric.
    pub totals: Vec<Total>,
    /// Undelivered records in the whole ledger at the end of the run.
    pub undelivered: i64,
    pub duration_ms: u128,
    /// A dry-run replay's record-by-record plan (at most 200 lines).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub preview: Vec<String>,
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
            staged_by_status: BTreeMap::new(),
            sent: 0,
            already_delivered: 0,
            rejected: 0,
            failed: 0,
            sink_errors: Vec::new(),
            interrupted: false,
            totals: Vec::new(),
            undelivered: 0,
            duration_ms: 0,
            preview: Vec::new(),
        }
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
        }
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
        self.stage_row_as(record.idempotency_key(), record, push_provisional)
    }

    /// [`Self::stage_row`] under a given key: replay keeps the key the ledger stored, whatever
    /// today's key derivation says.
    fn stage_row_as(&self, key: String, record: UsageRecord, push_provisional: bool) -> StageRow {
        let content_hash = record.content_hash();
        let mut mapped = MappedColumns::default();
        let mut mapped_event = None;
        let (status, note) = match self.mappings.apply(&record) {
            MapOutcome::Unmapped { reason } => (Status::Unmapped, Some(reason)),
            MapOutcome::Ignored { rule } => {
                mapped.rule = Some(rule);
                (Status::Ignored, None)
            }
            MapOutcome::Mapped(event) => {
                mapped.rule = Some(event.rule.clone());
                mapped.subscription = Some(event.external_subscription_id.clone());
                mapped.customer = event.external_customer_id.clone();
                mapped.metric = Some(event.metric_code.clone());
                mapped.value = Some(event.value);
                mapped.value_property = Some(event.value_property.clone());
                match self.sink(event.sink.as_deref()) {
                    None => (
                        Status::Unmapped,
                        Some(format!(
                            "rule {} targets sink {:?}, which is not configured",
                            event.rule,
                            event.sink.as_deref().unwrap_or("(default)")
                        )),
                    ),
                    Some(sink) => {
                        mapped.sink = Some(sink.name().to_string());
                        match sink.encode_record(&key, &event, &record) {
                            Err(e) => (Status::Unmapped, Some(e.to_string())),
                            Ok(payload) => {
                                mapped.payload = Some(payload);
                                mapped_event = Some(event);
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
                }
            }
        };
        StageRow {
            key,
            content_hash,
            record,
            status,
            mapped,
            note,
            event: mapped_event,
            correction_of: None,
            revision: 0,
        }
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
        let (Some(event), Some(new_value)) = (&row.event, row.mapped.value) else {
            return Correction::Unresolved(format!(
                "{} changed after it was sent but no longer maps ({}): resolve by hand",
                sent.key,
                row.note.as_deref().unwrap_or(row.status.as_str())
            ));
        };
        if row.mapped.subscription != sent.subscription
            || row.mapped.metric != sent.metric
            || row.mapped.sink != sent.sink
        {
            return Correction::Unresolved(format!(
                "{} changed after it was sent and now maps to {:?}/{:?} instead of {:?}/{:?}: resolve by hand",
                sent.key, row.mapped.subscription, row.mapped.metric, sent.subscription, sent.metric
            ));
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
        let difference = new_value - sent.sent_total;
        let mut delta = row.record.clone();
        delta.billed_cost = row.record.billed_cost - sent_cost;
        delta.consumed_quantity = row.record.consumed_quantity - sent_quantity;
        // Lago, Stripe, webhook and JSON Lines carry only the mapped value; the FOCUS export
        // carries cost and quantity as well.
        let carries_record = sink.kind() == "focus";
        if difference.is_zero()
            && (!carries_record
                || (delta.billed_cost.is_zero() && delta.consumed_quantity.is_zero()))
        {
            return Correction::NoDifference;
        }
        let mut event = event.clone();
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
                        record: delta,
                        status: Status::Pending,
                        mapped,
                        note: Some(format!("correction of {}", sent.key)),
                        event: Some(event),
                        correction_of: None,
                        revision: sent.next_revision,
                    }),
                    difference,
                }
            }
        }
    }

    fn lock_holder() -> String {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        format!(
            "{host}:{}:{:08x}",
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

        let holder = Self::lock_holder();
        if !opts.dry_run {
            self.ledger
                .acquire_lock(&holder, now, self.lock_ttl)
                .await?;
        }
        let result = self
            .sync_locked(opts, now, &selected, &holder, &mut summary)
            .await;
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
        holder: &str,
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
        self.sync_run(opts, now, selected, holder, run_id, summary)
            .instrument(span)
            .await
    }

    async fn sync_run(
        &self,
        opts: &SyncOptions,
        now: DateTime<Utc>,
        selected: &[&dyn Provider],
        holder: &str,
        run_id: Option<i64>,
        summary: &mut RunSummary,
    ) -> Result<(), SyncError> {
        let mut last_refresh = Instant::now();
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
                    holder,
                    &mut last_refresh,
                    &mut src,
                    summary,
                )
                .await
            {
                match e {
                    PullError::Ledger(e) => return Err(e.into()),
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

        if let Some(run_id) = run_id {
            if !opts.skip_push {
                self.push_all(run_id, holder, &mut last_refresh, summary)
                    .await?;
            }
            self.finish(run_id, summary).await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pull_source(
        &self,
        provider: &dyn Provider,
        run_id: Option<i64>,
        now: DateTime<Utc>,
        holder: &str,
        last_refresh: &mut Instant,
        src: &mut SourceSummary,
        summary: &mut RunSummary,
    ) -> Result<(), PullError> {
        let cursors = self.ledger.cursors(provider.name()).await?;
        let chunks = provider
            .plan(&cursors, now)
            .await
            .map_err(|e| PullError::Provider(e.to_string()))?;
        info!(source = provider.name(), chunks = chunks.len(), "pulling");
        self.progress
            .source_started(provider.name(), chunks.len() as u64);
        // A page with no records moves its cursor without a transaction of its own: the move is
        // kept in memory and written with the next staged page or at the end. A crash only
        // means those empty windows are asked again.
        let mut deferred: Option<(String, String)> = None;
        let total = chunks.len();
        let mut outcome = Ok(());
        for (i, chunk) in chunks.iter().enumerate() {
            if self.shutdown.is_requested() {
                summary.interrupted = true;
                break;
            }
            // An in-flight provider request is simply dropped on shutdown: nothing of it was
            // staged, and the cursor has not moved past it.
            let fetched = tokio::select! {
                r = provider.fetch(chunk, now) => r,
                _ = self.shutdown.requested() => {
                    summary.interrupted = true;
                    break;
                }
            };
            let page = match fetched {
                Ok(p) => p,
                Err(e) => {
                    outcome = Err(PullError::Provider(e.to_string()));
                    break;
                }
            };
            src.chunks += 1;
            src.pulled += page.records.len() as u64;
            summary.pulled += page.records.len() as u64;
            debug!(source = provider.name(), stream = %chunk.stream, window_start = %chunk.window_start,
                records = page.records.len(), "chunk {}/{}", i + 1, total);

            if let Some((stream, _)) = &deferred {
                if *stream != chunk.stream || !page.records.is_empty() {
                    if let (Some(run_id), Some((stream, value))) = (run_id, deferred.take()) {
                        self.ledger
                            .set_cursor(run_id, provider.name(), &stream, &value, Utc::now())
                            .await?;
                    }
                }
            }
            if page.records.is_empty() {
                if let Some(value) = page.cursor {
                    deferred = Some((chunk.stream.clone(), value));
                }
                continue;
            }
            let push_provisional = provider.push_provisional();
            let rows: Vec<StageRow> = page
                .records
                .into_iter()
                .map(|r| self.stage_row(r, push_provisional))
                .collect();
            let counts = match run_id {
                Some(run_id) => {
                    let cursor = page
                        .cursor
                        .as_deref()
                        .map(|v| (provider.name(), chunk.stream.as_str(), v));
                    let correct = |row: &StageRow, sent: &SentState| self.correction(row, sent);
                    self.ledger
                        .stage(run_id, &rows, cursor, Utc::now(), &correct)
                        .await?
                }
                None => self.dry_run_counts(&rows).await?,
            };
            summary.add_counts(&counts);
            self.progress.chunk_done(rows.len() as u64);
            if run_id.is_some() && last_refresh.elapsed() > LOCK_REFRESH {
                self.ledger
                    .refresh_lock(holder, Utc::now(), self.lock_ttl)
                    .await?;
                *last_refresh = Instant::now();
            }
        }
        if let (Some(run_id), Some((stream, value))) = (run_id, deferred) {
            self.ledger
                .set_cursor(run_id, provider.name(), &stream, &value, Utc::now())
                .await?;
        }
        outcome
    }

    async fn dry_run_counts(&self, rows: &[StageRow]) -> Result<StageCounts, LedgerError> {
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        let known = self.ledger.existing(&keys).await?;
        let mut c = StageCounts::default();
        for r in rows {
            match known.get(&r.key) {
                None => {
                    c.new += 1;
                    *c.by_status.entry(r.status.as_str()).or_default() += 1;
                }
                Some((_, hash, _)) if *hash == r.content_hash => c.unchanged += 1,
                Some((_, _, Status::Sent)) => c.changed_after_send += 1,
                Some(_) => {
                    c.restaged += 1;
                    *c.by_status.entry(r.status.as_str()).or_default() += 1;
                }
            }
        }
        Ok(c)
    }

    /// Send every pending record of every sink, batch by batch. Each record is tried at most
    /// once per run (the walk is by id), so a sink that keeps failing cannot hold a run forever.
    async fn push_all(
        &self,
        run_id: i64,
        holder: &str,
        last_refresh: &mut Instant,
        summary: &mut RunSummary,
    ) -> Result<(), LedgerError> {
        for sink in &self.sinks {
            if self.shutdown.is_requested() {
                summary.interrupted = true;
                break;
            }
            let mut after_id = 0;
            let mut batches = 0u64;
            self.progress
                .push_started(sink.name(), self.ledger.pending_count(sink.name()).await?);
            loop {
                if self.shutdown.is_requested() {
                    summary.interrupted = true;
                    break;
                }
                let batch = self
                    .ledger
                    .pending_batch(sink.name(), after_id, sink.max_batch())
                    .await?;
                let Some(last) = batch.last() else { break };
                after_id = last.id;
                let deliver = sink.deliver(&batch);
                tokio::pin!(deliver);
                let delivered = tokio::select! {
                    r = &mut deliver => r,
                    _ = self.shutdown.requested() => {
                        // Let the request in flight finish, within the deadline: its answer
                        // is worth recording. Past the deadline the batch stays pending and
                        // is resent, byte for byte, by the next run.
                        match tokio::time::timeout(self.shutdown_deadline, &mut deliver).await {
                            Ok(r) => r,
                            Err(_) => {
                                warn!(sink = sink.name(), records = batch.len(),
                                    "shutdown deadline passed with a request in flight; its records stay pending");
                                summary.interrupted = true;
                                break;
                            }
                        }
                    }
                };
                let outcomes = match delivered {
                    Ok(o) => o,
                    Err(stopped) => {
                        error!(sink = sink.name(), error = %stopped, "sink stopped; its records stay pending");
                        summary.sink_errors.push(stopped.to_string());
                        summary.outcome = RunOutcome::SinkStopped;
                        break;
                    }
                };
                let mut acks = Vec::with_capacity(batch.len());
                for (out, outcome) in batch.iter().zip(outcomes) {
                    match &outcome {
                        Outcome::Delivered => summary.sent += 1,
                        Outcome::AlreadyDelivered => summary.already_delivered += 1,
                        Outcome::Rejected(reason) => {
                            summary.rejected += 1;
                            warn!(sink = sink.name(), key = %out.key, %reason, "record rejected; held in the ledger");
                        }
                        Outcome::Failed(_) => summary.failed += 1,
                    }
                    acks.push((out.id, outcome));
                }
                self.ledger.ack(run_id, &acks, Utc::now()).await?;
                self.progress.batch_done(acks.len() as u64);
                batches += 1;
                if batches % 100 == 0 {
                    info!(sink = sink.name(), batches, sent = summary.sent, "pushing");
                }
                if last_refresh.elapsed() > LOCK_REFRESH {
                    self.ledger
                        .refresh_lock(holder, Utc::now(), self.lock_ttl)
                        .await?;
                    *last_refresh = Instant::now();
                }
            }
            info!(sink = sink.name(), batches, "sink done");
        }
        Ok(())
    }

    async fn finish(&self, run_id: i64, summary: &mut RunSummary) -> Result<(), LedgerError> {
        summary.totals = self
            .ledger
            .sent_totals(run_id)
            .await?
            .into_iter()
            .map(|((source, subscription, metric), value)| Total {
                source,
                subscription,
                metric,
                value,
            })
            .collect();
        summary.undelivered = self.ledger.undelivered().await?;
        if summary.interrupted {
            summary.outcome = RunOutcome::Interrupted;
        } else if summary.outcome == RunOutcome::Ok && summary.undelivered > 0 {
            summary.outcome = RunOutcome::Undelivered;
        }
        self.progress.finish();
        let outcome = serde_json::to_value(summary.outcome)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let json = serde_json::to_string(&*summary).unwrap_or_default();
        self.ledger
            .finish_run(run_id, &outcome, &json, Utc::now())
            .await
    }

    /// Re-map held records with today's mapping files and push what now maps.
    pub async fn replay(&self, opts: &ReplayOptions) -> Result<RunSummary, SyncError> {
        let started = Instant::now();
        let now = opts.now.unwrap_or_else(Utc::now);
        let mut summary = RunSummary::new("replay", opts.dry_run);
        let holder = Self::lock_holder();
        if !opts.dry_run {
            self.ledger
                .acquire_lock(&holder, now, self.lock_ttl)
                .await?;
        }
        let result = self.replay_locked(opts, now, &holder, &mut summary).await;
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
        holder: &str,
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
        self.replay_run(opts, holder, run_id, summary)
            .instrument(span)
            .await
    }

    async fn replay_run(
        &self,
        opts: &ReplayOptions,
        holder: &str,
        run_id: Option<i64>,
        summary: &mut RunSummary,
    ) -> Result<(), SyncError> {
        let mut after_id = 0;
        loop {
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
                summary.pulled += 1;
                let push_provisional = self
                    .providers
                    .iter()
                    .find(|p| p.name() == stored.record.source)
                    .is_some_and(|p| p.push_provisional());
                // A correction is re-derived (its stored difference may be stale); any other
                // record is re-mapped under its stored key.
                let (row, rederived) = if stored.correction_of.is_some() {
                    self.replay_correction(&stored, push_provisional).await?
                } else {
                    let key = stored.key.clone();
                    (
                        self.stage_row_as(key, stored.record, push_provisional),
                        false,
                    )
                };
                *summary
                    .staged_by_status
                    .entry(row.status.as_str().to_string())
                    .or_default() += 1;
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
        if let Some(run_id) = run_id {
            let mut last_refresh = Instant::now();
            self.push_all(run_id, holder, &mut last_refresh, summary)
                .await?;
            self.finish(run_id, summary).await?;
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
            record: stored.record.clone(),
            status,
            mapped: MappedColumns::default(),
            note: Some(note),
            event: None,
            correction_of: stored.correction_of,
            revision: 0,
        };
        let basis = self.ledger.correction_basis(stored.id).await?;
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
        let row = self.stage_row_as(sent.key.clone(), latest, push_provisional);
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
