-- Settling a month looks for other months of the same sink, subscription and metric whose time
-- overlaps it (a `period_utc_offset` changed while records came in would otherwise bring both
-- up to the minimum). One lookup per month settled, by this index rather than a scan of every
-- month of every subscription.
CREATE INDEX period_groups_by_subscription
    ON period_groups (sink, subscription, metric, period_start);
