-- When a device's number was last reported by its own session (web pairing or connection, a
-- Cloud API connect): a number so proven outranks one a person only typed. A session linked
-- to a number another device merely claims takes it (the typed claim was wrong); a session
-- linked to a number another device's session has proven is unlinked.
ALTER TABLE devices ADD COLUMN phone_linked_at timestamptz;
