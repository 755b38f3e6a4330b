-- Web multi-device provider: the number check before the first send to a lead, cached on the
-- lead (NULL = not checked yet).
ALTER TABLE leads
    ADD COLUMN on_whatsapp     boolean,
    ADD COLUMN wa_checked_at   timestamptz;
