-- no-transaction
-- A lead's open enrollments, for a reply that ends them (`sequences::end_replied_enrollments`):
-- without it every inbound message would read the whole enrollments table. Partial: ended
-- enrollments, most of the table in time, are not in it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS enrollments_open_lead ON enrollments (lead_id)
    WHERE status IN ('active', 'finishing');
