//! Reading one period of the ledger for `billsync reconcile`, in a snapshot and in bounded
//! memory: every record once in id order (the report's sums), then the valued records of the
//! (sink, subscription, metric) groups one group at a time (matching each group's read-back
//! event by event), then single records by key.

use chrono::{DateTime, Utc};
use futures_util::stream::BoxStream;
use futures_util::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite};
use std::str::FromStr;

use super::{sql, ts, Ledger, LedgerError, PeriodRow};

/// The columns [`period_row`] decodes, in its order.
macro_rules! period_columns {
    () => {
        "SELECT id, idem_key, source, billing_account_id, status, billed_cost, billing_currency,
            sink, subscription, metric, value, value_property, correction_of,
            status = 'rejected' AND unclear_at IS NOT NULL
         FROM records"
    };
}

/// A (sink, subscription, metric) as a sink is read back: the sink's name (empty when the
/// record has none), the subscription, the metric.
pub type PeriodGroupKey = (String, String, String);

/// One read transaction over the ledger for reconciling `[from, to)`: what the report sums up
/// and what it matches event by event come from the same state of the ledger, whatever a
/// concurrent run commits meanwhile (a WAL reader does not block its writes; the WAL cannot be
/// checkpointed past the snapshot until it ends, so it grows by what that run writes).
pub struct PeriodSnapshot {
    tx: sqlx::Transaction<'static, Sqlite>,
    from: String,
    to: String,
}

impl Ledger {
    /// A snapshot of the records whose charge period starts in `[from, to)`.
    pub async fn period_snapshot(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<PeriodSnapshot, LedgerError> {
        let tx = self
            .pool
            .begin()
            .await
            .map_err(sql("starting to read a period"))?;
        Ok(PeriodSnapshot {
            tx,
            from: ts(from),
            to: ts(to),
        })
    }
}

impl PeriodSnapshot {
    /// Every record (and correction) of the period, streamed to `each` in id order.
    pub async fn for_each(&mut self, mut each: impl FnMut(PeriodRow)) -> Result<(), LedgerError> {
        let mut rows = sqlx::query(concat!(
            period_columns!(),
            " WHERE charge_period_start >= ?1 AND charge_period_start < ?2 ORDER BY id"
        ))
        .bind(self.from.clone())
        .bind(self.to.clone())
        .fetch(&mut *self.tx);
        while let Some(r) = rows.try_next().await.map_err(sql("reading a period"))? {
            each(period_row(&r)?);
        }
        Ok(())
    }

    /// The period's records that a sink may hold as events: with a value, mapped to a
    /// subscription and a metric, neither unmapped nor ignored. Ordered by (sink,
    /// subscription, metric, id), so that [`PeriodGroups::next_group`] hands them over one
    /// group at a time: memory holds one group, not the month. SQLite sorts them in its
    /// temporary files (`SQLITE_TMPDIR`), a few MB of them in memory.
    pub fn groups(&mut self) -> PeriodGroups<'_> {
        // `+status`: a full scan of the period, never a walk of the status index over
        // (nearly) every row of the ledger.
        let rows = sqlx::query(concat!(
            period_columns!(),
            " WHERE charge_period_start >= ?1 AND charge_period_start < ?2
               AND value IS NOT NULL AND +status NOT IN ('unmapped', 'ignored')
               AND subscription IS NOT NULL AND metric IS NOT NULL AND metric <> ''
             ORDER BY COALESCE(sink, ''), subscription, metric, id"
        ))
        .bind(self.from.clone())
        .bind(self.to.clone())
        .fetch(&mut *self.tx);
        PeriodGroups { rows, ahead: None }
    }

    /// The period's record with this key if it has a value (whatever its status and group).
    pub async fn valued_record(&mut self, key: &str) -> Result<Option<PeriodRow>, LedgerError> {
        let row = sqlx::query(concat!(
            period_columns!(),
            " WHERE idem_key = ?1 AND charge_period_start >= ?2 AND charge_period_start < ?3
               AND value IS NOT NULL"
        ))
        .bind(key.to_string())
        .bind(self.from.clone())
        .bind(self.to.clone())
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(sql("looking a record of a period up"))?;
        row.as_ref().map(period_row).transpose()
    }

    /// End the snapshot (nothing was written).
    pub async fn close(self) -> Result<(), LedgerError> {
        self.tx
            .rollback()
            .await
            .map_err(sql("ending the read of a period"))
    }
}

/// The valued records of a period, one (sink, subscription, metric) group at a time.
pub struct PeriodGroups<'a> {
    rows: BoxStream<'a, Result<SqliteRow, sqlx::Error>>,
    /// The first record of the next group, read while looking for the end of this one.
    ahead: Option<PeriodRow>,
}

impl PeriodGroups<'_> {
    /// The next group and its records in id order; `None` after the last.
    pub async fn next_group(
        &mut self,
    ) -> Result<Option<(PeriodGroupKey, Vec<PeriodRow>)>, LedgerError> {
        let first = match self.ahead.take() {
            Some(row) => row,
            None => match self.next_row().await? {
                Some(row) => row,
                None => return Ok(None),
            },
        };
        let key = group_of(&first);
        let mut records = vec![first];
        while let Some(row) = self.next_row().await? {
            if group_of(&row) != key {
                self.ahead = Some(row);
                break;
            }
            records.push(row);
        }
        Ok(Some((key, records)))
    }

    async fn next_row(&mut self) -> Result<Option<PeriodRow>, LedgerError> {
        match self
            .rows
            .try_next()
            .await
            .map_err(sql("reading a period by group"))?
        {
            Some(r) => period_row(&r).map(Some),
            None => Ok(None),
        }
    }
}

/// The group of a record [`PeriodSnapshot::groups`] returns (it has a subscription and a
/// metric).
fn group_of(row: &PeriodRow) -> PeriodGroupKey {
    (
        row.sink.clone().unwrap_or_default(),
        row.subscription.clone().unwrap_or_default(),
        row.metric.clone().unwrap_or_default(),
    )
}

/// A row of `period_columns!()`.
fn period_row(r: &SqliteRow) -> Result<PeriodRow, LedgerError> {
    let id: i64 = r.get(0);
    let dec = |field: &'static str, text: Option<String>| -> Result<Option<Decimal>, LedgerError> {
        text.map(|t| {
            Decimal::from_str(&t).map_err(|e| LedgerError::Corrupt {
                id,
                field,
                message: e.to_string(),
            })
        })
        .transpose()
    };
    let status: String = r.get(4);
    let correction_of: Option<i64> = r.get(12);
    Ok(PeriodRow {
        key: r.get(1),
        source: r.get(2),
        billing_account_id: r.get(3),
        status: status.parse().map_err(|message| LedgerError::Corrupt {
            id,
            field: "status",
            message,
        })?,
        billed_cost: dec("billed_cost", r.get(5))?.unwrap_or_default(),
        billing_currency: r.get(6),
        sink: r.get(7),
        subscription: r.get(8),
        metric: r.get(9),
        value: dec("value", r.get(10))?,
        value_property: r.get(11),
        is_correction: correction_of.is_some(),
        held_back_unclear: r.get(13),
    })
}
