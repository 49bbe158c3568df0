-- `match_hash`: a hash of what mapping rules and sinks read from a record that `content_hash`
-- leaves out (`resource_name`, `resource_type`, `charge_description`, whether `sku_id` is
-- present; see `UsageRecord::match_hash`). Without it, a re-read whose name or description
-- changed, so that it maps to another rule, customer or none, was taken for unchanged: no
-- restage, no correction, the invoice kept the old mapping. A re-read is the same record only
-- when both hashes agree.
--
-- `content_hash` keeps its meaning and its values: a new formula for it would make every record
-- already in the ledger look changed on its next re-read (a correction for each, or a change to
-- resolve). Rows staged before this migration have no `match_hash` (NULL; adding a column with
-- no default rewrites nothing). Staging fills it the first time such a row is read again, from
-- the content the ledger holds for it (the latest change kept, else the body), so a changed
-- name is still seen on that first re-read.
ALTER TABLE records ADD COLUMN match_hash TEXT;

-- That content is a record's latest change, looked up by record: once per row staged before
-- this migration, and by replay.
CREATE INDEX record_changes_by_record ON record_changes (record_id, id);
