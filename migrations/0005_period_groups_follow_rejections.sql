-- A month is settled on what its sink holds or will hold: a member record (or a correction of
-- one) that is `rejected` is left out. A record enters or leaves `rejected` without its share
-- changing (the sink refuses it, `replay` queues it again), so the share alone did not mark the
-- month for settlement: a month settled before such a change kept an adjustment computed on the
-- wrong records (a replayed record billed on top of the minimum, or a refused one missing from
-- it). Any move into or out of `rejected` now marks the month of the record (or of the record a
-- correction corrects) for settlement. Comparisons, not an `IN` list (see 0004).
CREATE TRIGGER period_groups_follow_rejections
AFTER UPDATE OF status ON records
WHEN old.status <> new.status AND (old.status = 'rejected' OR new.status = 'rejected')
BEGIN
    -- A member has one group (`period_members` is keyed by the record's key): scalar lookups,
    -- no temporary table in the trigger's program.
    UPDATE period_groups SET dirty = 1
     WHERE group_key = (SELECT group_key FROM period_members WHERE idem_key = new.idem_key);
    UPDATE period_groups SET dirty = 1
     WHERE group_key = (SELECT m.group_key FROM records o JOIN period_members m ON m.idem_key = o.idem_key
                         WHERE o.id = new.correction_of);
END;
