-- Period pricing (`period: month`): a subscription's metric over a month is tiered and raised to
-- its minimum by one adjustment record per (sink, subscription, metric, month), staged in
-- `records` like any other record once the month closes.

-- The share of each record in its month, as the mapping computed it for the record's latest
-- content (`content_hash`): written just before the record is staged, so a crash in between
-- leaves a share whose hash does not match the ledger yet, and the month waits for the re-read.
CREATE TABLE period_members (
    idem_key            TEXT    PRIMARY KEY,   -- the record's key (never an adjustment's)
    group_key           TEXT    NOT NULL REFERENCES period_groups (group_key),
    content_hash        TEXT    NOT NULL,
    base                TEXT    NOT NULL,      -- the value at the input of monthly tiers (decimal text)
    spec                TEXT    NOT NULL,      -- the period rule, JSON (PeriodSpec)
    is_final            INTEGER NOT NULL,
    charge_period_start TEXT    NOT NULL,
    charge_period_end   TEXT    NOT NULL
) WITHOUT ROWID;

CREATE INDEX period_members_by_group ON period_members (group_key);

-- One row per (sink, subscription, metric, month). `dirty`: a share changed since the month
-- was last settled (or it never was); settled groups are looked at again only when dirty.
CREATE TABLE period_groups (
    group_key      TEXT    PRIMARY KEY,
    sink           TEXT    NOT NULL,
    subscription   TEXT    NOT NULL,
    metric         TEXT    NOT NULL,
    period_label   TEXT    NOT NULL,
    period_start   TEXT    NOT NULL,
    period_end     TEXT    NOT NULL,
    adjustment_key TEXT    NOT NULL UNIQUE,
    dirty          INTEGER NOT NULL DEFAULT 1,
    settled_at     TEXT,                 -- last settlement
    settled_run    INTEGER,
    total          TEXT,                 -- the month's total at the last settlement
    note           TEXT                  -- why the month could not be settled, if so
) WITHOUT ROWID;

CREATE INDEX period_groups_due ON period_groups (period_end) WHERE dirty = 1;
