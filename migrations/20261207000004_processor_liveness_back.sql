-- When the processors came back after any gap long enough to be an outage (two thirds of the
-- hosts' device lease, and three ticks), however short against the offline grace. `resumed_at`
-- marks only gaps longer than the grace, the only ones that can make a live host's device look
-- offline past it; but a failover of a minute or two under the default grace of five minutes
-- still leaves every lease run out when the database is back, and for the seconds until the
-- hosts renew, the rescuer took a `sending` row whose host was still on it for one whose host was
-- lost. It waits for the settling time after `back_at` instead (see
-- `repo::messages::note_processor_tick`).
--
-- `settle_s`: how long after a return a lease that ran out meanwhile still says nothing (the
-- hosts' device lease, `DEVICE_LEASE_S`, as the processors were configured at their latest
-- tick): every live host renews within a third of it, and a host back from an outage takes no
-- other host's device for a whole lease. It was a constant of 30 s, the default lease.
ALTER TABLE processor_liveness
    ADD COLUMN back_at timestamptz NOT NULL DEFAULT '-infinity',
    ADD COLUMN settle_s float8 NOT NULL DEFAULT 30 CHECK (settle_s >= 0);
