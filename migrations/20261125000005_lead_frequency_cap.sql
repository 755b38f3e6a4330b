-- Per-lead frequency cap across campaigns and sequences: a lead is sent at most one message per
-- lead_min_gap_s seconds, whatever its source (0 = off, the default: every message was
-- scheduled by a person). Enforced in the processor's claim; held messages stay pending.
ALTER TABLE tenants ADD COLUMN lead_min_gap_s double precision NOT NULL DEFAULT 0
    CHECK (lead_min_gap_s >= 0 AND lead_min_gap_s <= 31 * 86400);
ALTER TABLE leads ADD COLUMN last_contacted_at timestamptz;
