-- no-transaction
-- `leads list` pages through a tenant's leads in id order (`--after <lead id>`). By the primary
-- key alone a page of a small tenant read every other tenant's leads above the cursor; this
-- index starts at the tenant. Neither column ever changes, so updates of a lead (an import's
-- new name, an opt-out, `last_contacted_at`) stay HOT. Built concurrently, so writes to
-- `leads` go on while it is built (`wabcast migrate` rebuilds it if a build was interrupted).
CREATE INDEX CONCURRENTLY IF NOT EXISTS leads_tenant_id ON leads (tenant_id, id);
