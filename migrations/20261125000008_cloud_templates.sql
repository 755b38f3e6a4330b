-- A campaign may send an approved Cloud API message template (name, language, body parameters
-- rendered per recipient) to Cloud API devices instead of free text.
ALTER TABLE campaigns
    ADD COLUMN wa_template jsonb CHECK (
        wa_template IS NULL OR (jsonb_typeof(wa_template -> 'name') = 'string'
                                AND jsonb_typeof(wa_template -> 'language') = 'string'));
