-- A claim's fence at the host's send record.
--
-- A send request can reach the device host late: after the rescuer moved its `sending` row on
-- (back to `pending`, where a cancel may end it, or to `failed`). The host must then start
-- nothing. The rescuer, when it moves on a `sending` row whose claim has no attempt recorded,
-- writes a `withdrawn` record for that claim in the same transaction; the host's insert of an
-- attempt meets it on the primary key (it waits for an uncommitted fence and sees a committed
-- one, whatever its snapshot), so the two are serialised without any lock on the message row.
--
-- `claim` is the message row's `enqueue_count` when the attempt (or fence) was written: it
-- grows with every claim (a row reaches `sending` only from `queued`, and only an enqueue puts it
-- there). The host takes an `aborted`, `retry` or `withdrawn` record over only for a later
-- claim. Records written before this column have claim 0, so any claim takes them over (as
-- before, when the host share-locked the row instead).
ALTER TABLE host_sends ADD COLUMN claim integer NOT NULL DEFAULT 0;

-- A fence that no attempt preceded has no provider message id; the claim that takes it over
-- brings a fresh one.
--
-- The constraints are added NOT VALID (they hold for every write from here on) and validated in
-- the next migration: validated here, every row would be read under this statement's lock,
-- which blocks the hosts' writes to the table meanwhile.
ALTER TABLE host_sends ALTER COLUMN provider_message_id DROP NOT NULL;
ALTER TABLE host_sends ADD CONSTRAINT host_sends_provider_id_unless_withdrawn
    CHECK (provider_message_id IS NOT NULL OR state = 'withdrawn') NOT VALID;

ALTER TABLE host_sends DROP CONSTRAINT host_sends_state_check;
ALTER TABLE host_sends ADD CONSTRAINT host_sends_state_check
    CHECK (state IN ('attempting', 'sent', 'failed', 'aborted', 'retry', 'withdrawn')) NOT VALID;
