-- `leads list` pages through a tenant's leads in id order (`--after <lead id>`). By the primary
-- key alone a page of a small tenant read every other tenant's leads above the cursor; this
-- index starts at the tenant. Neither column ever changes, so updates of a lead (an import's
-- new name, an opt-out, `last_contacted_at`) stay HOT. A plain build, as
-- 20261204000001_opt_out_lookups.sql explains: it blocks writes to `leads` while it runs
-- (seconds for a million leads); `broadcast_messages` is not touched.
CREATE INDEX leads_tenant_id ON leads (tenant_id, id);
