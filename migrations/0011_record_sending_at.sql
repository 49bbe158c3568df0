-- `sending_at`: when the push loop handed a pending record to a sink whose deduplication of a
-- key is time-limited (Stripe: see `Sink::dedup_window`), set in a committed transaction before
-- the request and cleared by the statement that records its outcome (or, for a record read
-- ahead but not sent, before the run ends). A mark still set when a run starts pushing is what
-- a crash (SIGKILL, OOM kill, a lost node) left between the request and its acknowledgement:
-- the sink may hold the record, so the run turns it into an unclear delivery (`unclear_at`,
-- migration 0010) and a record resent more than the window later is held back for a person
-- instead of being counted twice.
--
-- NULL on every existing row: a ledger from before this had no way to know.
ALTER TABLE records ADD COLUMN sending_at TEXT;

-- Only a crash leaves marks: looking for them reads this (normally empty) index, not the
-- ledger's history.
CREATE INDEX records_sending ON records (sink, id) WHERE sending_at IS NOT NULL;
