-- Record bodies move out of `records`. A body (the normalized record with its raw fields, and
-- the frozen payload) is written once and read rarely; `records` is updated on every
-- acknowledgement. Kept apart, a `records` row is ~300 bytes (a dozen per page) instead of
-- ~2 KB, so acknowledging a batch rewrites a few pages instead of one page per record.
-- `record` is a BLOB: plain JSON for bodies migrated from 0001, LZ4 with a tag byte for new
-- ones (see src/ledger/body.rs). `natural_key` was a copy of what the body holds.
CREATE TABLE record_bodies (
    id      INTEGER PRIMARY KEY,    -- = records.id (written in the same transaction)
    payload TEXT,                   -- the frozen bytes the sink sends
    record  BLOB NOT NULL           -- the normalized record; empty once pruned by vacuum
);

INSERT INTO record_bodies (id, payload, record)
    SELECT id, payload, CAST(record_json AS BLOB) FROM records;

ALTER TABLE records DROP COLUMN payload;
ALTER TABLE records DROP COLUMN record_json;
ALTER TABLE records DROP COLUMN natural_key;
