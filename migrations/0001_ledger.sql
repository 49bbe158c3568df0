-- The billsync ledger: runs, cursors, one row per source record (the outbox), the run lock.
-- Timestamps are UTC RFC 3339 text (`YYYY-MM-DDTHH:MM:SSZ`), so text order is time order.
-- Decimals are text, exactly as computed: SQLite's numeric types would round them.

CREATE TABLE runs (
    id          INTEGER PRIMARY KEY,
    command     TEXT    NOT NULL,
    started_at  TEXT    NOT NULL,
    finished_at TEXT,
    outcome     TEXT,               -- NULL while running; ok | undelivered | failed | locked ...
    summary     TEXT                -- JSON run summary
);

CREATE TABLE cursors (
    source     TEXT NOT NULL,
    stream     TEXT NOT NULL,
    value      TEXT NOT NULL,
    run_id     INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (source, stream)
) WITHOUT ROWID;

-- One row per source record. `idem_key` begins with provider, scope and period, so inserts of
-- one run touch neighbouring index pages instead of random ones. For a sent record, `payload`,
-- `value` and `record_json` are what was sent and never change; the content columns
-- (`content_hash`, `billed_cost`, `consumed_quantity`, `is_final`) follow the latest content the
-- provider reported, and the differences went out as correction rows (`correction_of`).
CREATE TABLE records (
    id                  INTEGER PRIMARY KEY,
    idem_key            TEXT    NOT NULL UNIQUE,
    source              TEXT    NOT NULL,
    provider            TEXT    NOT NULL,
    natural_key         TEXT    NOT NULL,
    content_hash        TEXT    NOT NULL,
    status              TEXT    NOT NULL
        CHECK (status IN ('pending', 'sent', 'unmapped', 'ignored', 'provisional', 'rejected')),
    is_final            INTEGER NOT NULL,
    charge_period_start TEXT    NOT NULL,
    charge_period_end   TEXT    NOT NULL,
    billing_account_id  TEXT    NOT NULL,
    sub_account_id      TEXT    NOT NULL,
    resource_type       TEXT    NOT NULL,
    resource_id         TEXT    NOT NULL,
    consumed_quantity   TEXT    NOT NULL,
    consumed_unit       TEXT    NOT NULL,
    billed_cost         TEXT    NOT NULL,
    billing_currency    TEXT    NOT NULL,
    rule                TEXT,
    sink                TEXT,
    subscription        TEXT,
    customer            TEXT,
    metric              TEXT,
    value               TEXT,
    value_property      TEXT,               -- the event property that carries `value`
    payload             TEXT,               -- the frozen bytes the sink sends, set at staging
    record_json         TEXT    NOT NULL,   -- the normalized record with its raw fields (audit, replay)
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    first_run           INTEGER NOT NULL,
    last_run            INTEGER NOT NULL,
    sent_run            INTEGER,
    correction_of       INTEGER REFERENCES records (id),  -- a correction's original record
    revision            INTEGER NOT NULL DEFAULT 0,       -- 0 for an original, n for its n-th correction
    staged_at           TEXT    NOT NULL,
    updated_at          TEXT    NOT NULL,
    sent_at             TEXT
);

-- The push loop walks pending rows of a sink in id order; other statuses are looked up by status.
CREATE INDEX records_by_status ON records (status, sink, id);
CREATE INDEX records_by_sent_run ON records (sent_run) WHERE sent_run IS NOT NULL;

CREATE INDEX records_corrections ON records (correction_of) WHERE correction_of IS NOT NULL;

-- Every new content of a record that was already sent. The sent row and its frozen payload are
-- never overwritten: the difference goes out as a correction record (`corrected`), or there is
-- none to send (`no_difference`), or a person must decide (`unresolved`, with the reason).
CREATE TABLE record_changes (
    id            INTEGER PRIMARY KEY,
    record_id     INTEGER NOT NULL REFERENCES records (id),
    content_hash  TEXT    NOT NULL,
    record_json   TEXT    NOT NULL,
    run_id        INTEGER NOT NULL,
    seen_at       TEXT    NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('corrected', 'no_difference', 'unresolved')),
    difference    TEXT,
    correction_id INTEGER REFERENCES records (id),
    note          TEXT
);

-- Operator actions (replay), with the reason given.
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY,
    run_id  INTEGER,
    at      TEXT NOT NULL,
    action  TEXT NOT NULL,
    detail  TEXT NOT NULL
);

-- At most one row per lock name. A holder that crashed leaves a row whose `expires_at` passes.
CREATE TABLE locks (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    run_id      INTEGER,
    acquired_at TEXT NOT NULL,
    expires_at  TEXT NOT NULL
) WITHOUT ROWID;
