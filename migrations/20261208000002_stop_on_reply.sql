-- A sequence may stop for a lead who replies (`stop_on_reply`): a person writing back is a
-- conversation for a person to carry on, not the next automated step. The enrollment then
-- ends `cancelled` with `end_reason = 'lead_replied'` (NULL: ended otherwise, or not ended).
-- Both columns are added without a rewrite: a constant default, and a NULL column.
ALTER TABLE sequences ADD COLUMN stop_on_reply boolean NOT NULL DEFAULT false;
ALTER TABLE enrollments ADD COLUMN end_reason text;
-- A reply looks up the tenant's sequences that stop on one (`sequences::end_replied_enrollments`)
-- for every inbound message that is not an opt-out; the table is small, its rows per tenant few.
CREATE INDEX sequences_stop_on_reply ON sequences (tenant_id) WHERE stop_on_reply;
