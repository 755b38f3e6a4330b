-- When the processors last reached the database, and when they came back after being away
-- (a database outage, a failover, a stopped schedule). One row, written once per processor
-- tick in a statement of its own.
--
-- A device lease that ran out while the database was away says nothing about the device: no
-- host could renew it. Without this, the first tick after an outage longer than the offline
-- grace skipped every due message of every device as `device_offline` before any host had had
-- the chance to renew its leases. A lease's end now counts only from `resumed_at` plus a settling
-- time (see `repo::messages::OFFLINE_PAST_GRACE`).
CREATE TABLE processor_liveness (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_tick_at timestamptz NOT NULL,
    resumed_at timestamptz NOT NULL
);
