-- A number put on the opt-out list because the person turned off the business's marketing
-- messages in WhatsApp itself (the Cloud API webhook's `user_preferences`), told apart from a
-- keyword they typed. `opt_out_log` is a small table (one row per change of the list).
ALTER TABLE opt_out_log DROP CONSTRAINT opt_out_log_source_check;
ALTER TABLE opt_out_log ADD CONSTRAINT opt_out_log_source_check
    CHECK (source IN ('inbound_message', 'marketing_preference', 'operator', 'before_log'));
