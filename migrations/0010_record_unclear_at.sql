-- `unclear_at`: when a delivery of a still pending record first ended unclear, i.e. when the
-- sink may have taken it without billsync learning so (a timeout, a cut connection, a 5xx:
-- `Outcome::Unclear`). A sink whose deduplication of a key is time-limited (Stripe keeps a
-- meter event's `identifier` unique over a rolling window of at least 24 hours) must not be sent
-- such a record again once that window may have passed: the push loop rejects it for a person
-- instead (see `Sink::dedup_window`). Kept while the record waits, also through a rejection
-- and a restaging by a re-read (the earlier attempt may still have been counted); cleared by a
-- deliberate `replay`, which sends the record whatever happened before.
--
-- Rows written before this migration did not record it. A pending row with attempts and an
-- error had at least one failed delivery, which may have been unclear: its `updated_at` (the
-- time of its last attempt, or later) stands in for the first unclear one. The first was at or
-- before it, so such a record is stopped up to that much later than it should be, but one
-- that waited since before the upgrade for longer than the window is no longer sent blindly;
-- one whose failures were all clear refusals (a 429) may be rejected needlessly, and a person
-- replays it: a rejection costs a look, a second count a wrong invoice.
--
-- Adding a column with no default rewrites nothing: every other row has NULL.
ALTER TABLE records ADD COLUMN unclear_at TEXT;

UPDATE records SET unclear_at = updated_at
 WHERE status = 'pending' AND attempts > 0 AND last_error IS NOT NULL;
