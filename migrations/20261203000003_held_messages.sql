-- A paused campaign's pending rows leave the processor's claim index. The claim reads each
-- ready device's due rows in `bm_claim` order and passes over those whose campaign is not
-- running; a paused campaign's backlog, due before whatever was scheduled after it, was read
-- again on every claim, and by every idle tick's probe of every ready device (scale-bench,
-- 40,000 paused rows over 20 devices: an idle processor tick 8 ms → 181 ms).
--
-- `held` is set on the pending rows when their campaign (or sequence) is paused and cleared when
-- it resumes, in the same transaction as the campaign's status, under its row lock. It is not a
-- state: a held row is `pending`. The claim still checks each row's campaign, so a row whose
-- flag lags (one that went back to `pending` from a retry while its campaign was paused) is
-- only read, never sent.
ALTER TABLE broadcast_messages ADD COLUMN held boolean NOT NULL DEFAULT false;

UPDATE broadcast_messages bm SET held = true
FROM campaigns c
WHERE c.id = bm.campaign_id AND c.tenant_id = bm.tenant_id AND c.status = 'paused'
  AND bm.status = 'pending';

-- `held` second: the claim reads (device, not held) in due order; what needs every pending row of
-- a device (the sweeps, the status view) still finds them all here.
DROP INDEX bm_claim;
CREATE INDEX bm_claim ON broadcast_messages (device_id, held, due_at, id) WHERE status = 'pending';
