-- Account safety, enforced in the processor's claim, where pacing is: nothing reaches the queue
-- without passing it.
--   daily_cap (existing): messages per tenant-local day; cap_day/cap_used count what was queued.
--   warm-up: from paired_at (first online through a real provider), the day's cap starts at
--            warmup_start and doubles each day for warmup_days days (bounded by daily_cap).
--   quiet hours: quiet_start..quiet_end in the tenant's zone (may wrap past midnight); the
--            processor resolves them with chrono-tz each tick.
-- Held messages stay pending and go out in the next allowed window.
ALTER TABLE devices
    ADD COLUMN cap_day       date,
    ADD COLUMN cap_used      integer NOT NULL DEFAULT 0 CHECK (cap_used >= 0),
    ADD COLUMN paired_at     timestamptz,
    ADD COLUMN warmup_days   integer NOT NULL DEFAULT 14 CHECK (warmup_days BETWEEN 0 AND 365),
    ADD COLUMN warmup_start  integer NOT NULL DEFAULT 20 CHECK (warmup_start BETWEEN 1 AND 100000),
    ADD COLUMN quiet_start   time,
    ADD COLUMN quiet_end     time,
    ADD CONSTRAINT devices_quiet_hours CHECK ((quiet_start IS NULL) = (quiet_end IS NULL)
                                             AND (quiet_start IS NULL OR quiet_start <> quiet_end));
