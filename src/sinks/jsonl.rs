//! The JSON Lines file sink: one `.jsonl` file per delivered batch, one mapped record a line.
//!
//! A file is not an API: it cannot answer "I already have this record". So the ledger alone
//! decides what was written, and the file layout is chosen so that a resend *replaces* the
//! earlier attempt instead of adding to it:
//!
//! - **A batch file is named after the ledger id of its first record**
//!   (`<prefix>-<id, 20 digits>.jsonl`). The pipeline walks the pending records of a sink in
//!   ledger id order and acknowledges each batch in one transaction (`sync.rs`,
//!   `Ledger::pending_batch`). A file whose records were acknowledged never has a pending first
//!   record again; a file written by an attempt whose acknowledgement was lost (crash between
//!   the rename and the ack, or a run stopped past its shutdown deadline) still has all its
//!   records pending, so the next run's batch starts with the same first id and overwrites it.
//! - **Superseded files are removed.** If the next batch starts elsewhere (a lower id became
//!   pending in between, or `batch_size` changed), every other file of this sink whose first
//!   id is one of the new batch's ids was never acknowledged, and its records are all still
//!   pending (acks are all-or-nothing per batch): the new file holds them, or a later batch
//!   will. It is deleted after the new file is in place, so a record is on disk at least once
//!   at every moment and exactly once when the run is over.
//! - **Writes are atomic and durable**: a temporary file in the same directory, `fsync`,
//!   rename over the final name, `fsync` of the directory; a directory the sink creates (and
//!   every missing parent) is `fsync`ed into its parent first, and the first write of a process
//!   syncs the parent of an existing one too (an earlier process may have created it and died
//!   before the kernel wrote it out), so an acknowledged file cannot vanish with its directory's
//!   entry after a power loss. A reader never sees half a file; a crash leaves at most a `.tmp`
//!   file, which no reader should pick up (the final names never end in `.tmp`).
//! - **Crash leftovers are removed.** A `.tmp` file of this writer's prefix that exists before
//!   the writer's first write in a process was left by a crash before its rename: its records
//!   were never acknowledged (the ack follows the rename), so they are still pending and the
//!   new files hold them. The first write removes such files (and only those of its own
//!   prefix); later writes of the same process, whose temporary files are in flight, never do.
//!
//! Readers should collect files after a run has finished: during a run a superseded file can
//! exist next to its replacement for a moment. Give every file sink its own `prefix` (default:
//! the sink name) or directory.
//!
//! The [`BatchFiles`] writer is shared with the FOCUS export.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::mapping::MappedEvent;
use crate::sinks::{EncodeError, Outcome, Outgoing, Sink, SinkStopped};

/// Default records per file.
pub const DEFAULT_BATCH_SIZE: usize = 1000;
/// The largest batch (records per file) a file sink accepts.
pub const MAX_BATCH: usize = 100_000;

fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}

/// Settings of one JSON Lines sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// The directory the files are written to (created when missing).
    pub directory: PathBuf,
    /// File name prefix, `[A-Za-z0-9_.-]+`. Default: the sink name.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Records per file, 1 to 100,000. Default 1000.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

/// A file sink configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum FileSinkConfigError {
    /// `batch_size` outside 1..=100,000.
    #[error("sink {sink}: batch_size must be between 1 and {MAX_BATCH}, got {got}")]
    BatchSize { sink: String, got: usize },
    /// The prefix would not make a plain file name.
    #[error("sink {sink}: prefix {prefix:?} must be non-empty and only contain A-Z a-z 0-9 _ . -")]
    Prefix { sink: String, prefix: String },
    /// An unknown FOCUS version.
    #[error("sink {sink}: FOCUS version {got:?} is not supported (use \"1.0\" or \"1.2\")")]
    Version { sink: String, got: String },
    /// A `service_categories` value FOCUS does not allow.
    #[error(
        "sink {sink}: service category {got:?} is not a FOCUS ServiceCategory (allowed: {allowed})"
    )]
    ServiceCategory {
        sink: String,
        got: String,
        allowed: String,
    },
}

/// Writes one file per batch, atomically, named after the batch's first ledger id, and removes
/// files the batch supersedes (see the module documentation).
#[derive(Debug, Clone)]
pub struct BatchFiles {
    sink: String,
    directory: PathBuf,
    prefix: String,
    extension: &'static str,
    /// Whether this process already removed the crash leftovers (see the module
    /// documentation); held while doing it, so no write of ours has a temporary file yet.
    swept: std::sync::Arc<std::sync::Mutex<bool>>,
}

impl BatchFiles {
    /// A writer for `<directory>/<prefix>-<first id>.<extension>`.
    pub fn new(
        sink: &str,
        directory: PathBuf,
        prefix: Option<String>,
        extension: &'static str,
    ) -> Result<Self, FileSinkConfigError> {
        let prefix = prefix.unwrap_or_else(|| sink.to_string());
        let valid = !prefix.is_empty()
            && !prefix.starts_with('.')
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            return Err(FileSinkConfigError::Prefix {
                sink: sink.to_string(),
                prefix,
            });
        }
        Ok(BatchFiles {
            sink: sink.to_string(),
            directory,
            prefix,
            extension,
            swept: Default::default(),
        })
    }

    /// The directory files go to.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The final file name of a batch whose first ledger id is `first_id`.
    pub fn file_name(&self, first_id: i64) -> String {
        format!("{}-{first_id:020}.{}", self.prefix, self.extension)
    }

    /// The first ledger id encoded in a file name of this writer, if it is one.
    fn first_id_of(&self, name: &str) -> Option<i64> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix('-')?;
        let digits = rest.strip_suffix(self.extension)?.strip_suffix('.')?;
        if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }

    /// Whether `name` is a temporary file of this writer: `.<final name>.<random>.tmp`.
    fn is_own_temporary(&self, name: &str) -> bool {
        let Some(rest) = name.strip_prefix('.').and_then(|r| r.strip_suffix(".tmp")) else {
            return false;
        };
        let marker = format!(".{}.", self.extension);
        let Some(at) = rest.rfind(&marker) else {
            return false;
        };
        self.first_id_of(&rest[..at + marker.len() - 1]).is_some()
    }

    /// Before the first write of this process: remove the temporary files a crash left
    /// behind. Writes wait here until it is done, so none of their own files is touched.
    fn sweep_once(&self, dir: &Path) -> Result<(), String> {
        let mut swept = self.swept.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock: a write never goes on while another one's new directory is not yet
        // durable.
        let created = create_dir_durably(dir)?;
        if *swept {
            return Ok(());
        }
        if created.is_empty() {
            // Best effort: the directory is there; a parent we may not read (a mount point
            // owned by someone else) must not stop the export.
            if let Err(e) = sync_dir(parent_of(dir)) {
                tracing::warn!(sink = %self.sink, error = %e, "cannot fsync the export directory's parent");
            }
        }
        let mut removed = 0usize;
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot list directory {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let name = entry.file_name();
            if !name.to_str().is_some_and(|n| self.is_own_temporary(n)) {
                continue;
            }
            std::fs::remove_file(entry.path()).map_err(|e| {
                format!(
                    "cannot remove the temporary file {} left by an interrupted run: {e}",
                    entry.path().display()
                )
            })?;
            tracing::info!(sink = %self.sink, file = %entry.path().display(),
                "removed a temporary file left by an interrupted run (its records are still pending)");
            removed += 1;
        }
        if removed > 0 {
            sync_dir(dir)?;
        }
        *swept = true;
        Ok(())
    }

    fn stopped(&self, message: String) -> SinkStopped {
        SinkStopped::new(self.sink.clone(), message)
    }

    /// Write `header` (if any) and the payloads of `batch` in ledger id order, one a line, to
    /// the batch's file, then remove the files it supersedes. Any I/O failure stops the sink
    /// (the next batches would meet the same directory); the records stay pending.
    pub async fn write(
        &self,
        header: Option<&str>,
        batch: &[Outgoing],
    ) -> Result<Vec<Outcome>, SinkStopped> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut ordered: Vec<&Outgoing> = batch.iter().collect();
        ordered.sort_by_key(|o| o.id);
        let first_id = ordered[0].id;
        let mut content = String::with_capacity(
            header.map_or(0, |h| h.len() + 1)
                + ordered.iter().map(|o| o.payload.len() + 1).sum::<usize>(),
        );
        if let Some(h) = header {
            content.push_str(h);
            content.push('\n');
        }
        for o in &ordered {
            content.push_str(o.payload.trim_end_matches(['\r', '\n']));
            content.push('\n');
        }
        let ids: HashSet<i64> = ordered.iter().map(|o| o.id).collect();
        let writer = self.clone();
        let name = self.file_name(first_id);
        let count = batch.len();
        let result =
            tokio::task::spawn_blocking(move || writer.write_blocking(&name, &content, &ids))
                .await
                .map_err(|e| self.stopped(format!("the file writer task failed: {e}")))?;
        match result {
            Ok((path, removed)) => {
                tracing::debug!(
                    sink = %self.sink,
                    file = %path.display(),
                    records = count,
                    superseded = removed,
                    "batch file written"
                );
                Ok(vec![Outcome::Delivered; count])
            }
            Err(message) => Err(self.stopped(format!("{message}; records stay pending"))),
        }
    }

    fn write_blocking(
        &self,
        name: &str,
        content: &str,
        ids: &HashSet<i64>,
    ) -> Result<(PathBuf, usize), String> {
        let dir = &self.directory;
        self.sweep_once(dir)?;
        let final_path = dir.join(name);
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| format!("cannot create a temporary file in {}: {e}", dir.display()))?;
        tmp.write_all(content.as_bytes())
            .and_then(|()| tmp.flush())
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| format!("cannot write {}: {e}", tmp.path().display()))?;
        tmp.persist(&final_path)
            .map_err(|e| format!("cannot rename into {}: {}", final_path.display(), e.error))?;
        sync_dir(dir)?;

        // Files of earlier, unacknowledged attempts whose first record is in this batch.
        let mut removed = 0usize;
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot list directory {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_name == name {
                continue;
            }
            match self.first_id_of(file_name) {
                Some(id) if ids.contains(&id) => {
                    std::fs::remove_file(entry.path()).map_err(|e| {
                        format!(
                            "cannot remove the superseded file {}: {e}",
                            entry.path().display()
                        )
                    })?;
                    tracing::info!(sink = %self.sink, file = %entry.path().display(), "removed a batch file of an unacknowledged earlier attempt");
                    removed += 1;
                }
                _ => {}
            }
        }
        if removed > 0 {
            sync_dir(dir)?;
        }
        Ok((final_path, removed))
    }
}

/// Create `dir` and its missing parents, each `fsync`ed into its parent (a new directory's
/// entry is only durable once its parent is synced). Returns the directories created.
pub(crate) fn create_dir_durably(dir: &Path) -> Result<Vec<PathBuf>, String> {
    if dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        at = d.parent();
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    // Deepest first: each new directory's entry, then its parent's, up to the one that existed.
    for d in &missing {
        sync_dir(parent_of(d))?;
    }
    Ok(missing)
}

/// The directory holding `path`'s entry (`.` for a bare relative name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `fsync` a directory, so a rename or removal in it survives a power loss.
fn sync_dir(dir: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot fsync directory {}: {e}", dir.display()))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Check a file sink's batch size.
pub(crate) fn check_batch_size(sink: &str, batch_size: usize) -> Result<(), FileSinkConfigError> {
    if batch_size == 0 || batch_size > MAX_BATCH {
        return Err(FileSinkConfigError::BatchSize {
            sink: sink.to_string(),
            got: batch_size,
        });
    }
    Ok(())
}

/// A decimal as plain digits: no exponent, no trailing zeros.
pub(crate) fn decimal_text(value: rust_decimal::Decimal) -> String {
    if value.is_zero() {
        return "0".into();
    }
    value.normalize().to_string()
}

/// An RFC 3339 UTC timestamp ending in `Z`, with sub-seconds only when there are some.
pub(crate) fn utc_text(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Writes mapped records as JSON Lines files.
#[derive(Debug)]
pub struct JsonlSink {
    name: String,
    files: BatchFiles,
    batch_size: usize,
}

impl JsonlSink {
    /// Check the configuration and build the sink (the directory is created on first write).
    pub fn new(name: String, config: JsonlConfig) -> Result<Self, FileSinkConfigError> {
        check_batch_size(&name, config.batch_size)?;
        let files = BatchFiles::new(&name, config.directory, config.prefix, "jsonl")?;
        Ok(JsonlSink {
            name,
            files,
            batch_size: config.batch_size,
        })
    }

    /// The file writer (directory and names).
    pub fn files(&self) -> &BatchFiles {
        &self.files
    }
}

#[async_trait]
impl Sink for JsonlSink {
    fn kind(&self) -> &'static str {
        "jsonl"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        self.batch_size
    }

    /// One compact JSON object: `key`, `subscription`, `customer` (or null), `metric`,
    /// `property`, `value` (a decimal string, never a float), `timestamp` (RFC 3339 UTC),
    /// `properties` (sorted), `rule`, in this order.
    fn encode(&self, key: &str, event: &MappedEvent) -> Result<String, EncodeError> {
        if key.trim().is_empty() {
            return Err(EncodeError {
                sink: self.name.clone(),
                key: key.to_string(),
                message: "the ledger key is empty".into(),
            });
        }
        let mut o = Map::new();
        o.insert("key".into(), Value::from(key));
        o.insert(
            "subscription".into(),
            Value::from(event.external_subscription_id.as_str()),
        );
        o.insert(
            "customer".into(),
            event
                .external_customer_id
                .as_deref()
                .map_or(Value::Null, Value::from),
        );
        o.insert("metric".into(), Value::from(event.metric_code.as_str()));
        o.insert(
            "property".into(),
            Value::from(event.value_property.as_str()),
        );
        o.insert("value".into(), Value::from(decimal_text(event.value)));
        o.insert("timestamp".into(), Value::from(utc_text(event.timestamp)));
        o.insert(
            "properties".into(),
            Value::Object(
                event
                    .properties
                    .iter()
                    .map(|(k, v)| (k.to_string(), Value::from(v.as_str())))
                    .collect(),
            ),
        );
        o.insert("rule".into(), Value::from(event.rule.as_str()));
        serde_json::to_string(&Value::Object(o)).map_err(|e| EncodeError {
            sink: self.name.clone(),
            key: key.to_string(),
            message: e.to_string(),
        })
    }

    async fn deliver(&self, batch: &[Outgoing]) -> Result<Vec<Outcome>, SinkStopped> {
        self.files.write(None, batch).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every directory created is reported (deepest first), so each one's entry is synced
    /// into its parent; an existing directory needs nothing.
    #[test]
    fn creating_an_export_directory_syncs_each_new_level() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a").join("b");
        let created = create_dir_durably(&deep).unwrap();
        assert_eq!(created, vec![deep.clone(), root.path().join("a")]);
        assert!(deep.is_dir());
        assert!(create_dir_durably(&deep).unwrap().is_empty());
    }
}
