-- A change of a sent (or queued) record that waited for a person (`unresolved`) can be
-- resolved by hand: `billsync ledger resolve --keep-sent` marks it `kept` (what was billed
-- stays billed; nothing is sent). The resolution is kept beside the change (`resolved_at`,
-- `resolved_run`, `resolution`: the reason given) and in the audit trail.
--
-- `state` gets the new value `kept`. As in 0004, only the CHECK constraint changes, which does
-- not change how rows are stored: the table's text is edited in place, and every stored row
-- (corrected, no_difference, unresolved) satisfies the new constraint. Comparisons, not an
-- `IN` list (see 0004).
PRAGMA writable_schema = ON;

UPDATE sqlite_schema
   SET sql = replace(sql,
       'CHECK (state IN (''corrected'', ''no_difference'', ''unresolved''))',
       'CHECK (state = ''corrected'' OR state = ''no_difference'' OR state = ''unresolved'' OR state = ''kept'')')
 WHERE type = 'table' AND name = 'record_changes';

PRAGMA writable_schema = RESET;

CREATE TABLE schema_cookie_bump (x);
DROP TABLE schema_cookie_bump;

-- Adding columns with no default rewrites nothing: rows written before have NULL.
ALTER TABLE record_changes ADD COLUMN resolved_at TEXT;
ALTER TABLE record_changes ADD COLUMN resolved_run INTEGER;
ALTER TABLE record_changes ADD COLUMN resolution TEXT;

-- `ledger changes` and `status` list the open changes, oldest first.
CREATE INDEX record_changes_unresolved ON record_changes (id) WHERE state = 'unresolved';
