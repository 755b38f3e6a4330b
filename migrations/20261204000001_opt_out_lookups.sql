-- What an opt-out (a lead's "STOP", by tenant and phone number) reads, so that it costs the same
-- for a tenant of ten leads as for one of millions with a big backlog (scale-bench).
--
-- The tenant's leads with the number: unique is (device, phone), and by phone alone the planner
-- read that whole index (1,107 pages, 14 ms, for 100,000 leads). Also `find_leads_by_phone`.
CREATE INDEX leads_tenant_phone ON leads (tenant_id, phone);

-- Their unsent rows are found by (campaign, lead), one probe of the unique index per running
-- or paused campaign of the tenant: only those can hold unsent rows (a scheduled campaign has
-- none yet, a cancel cancels them in its own transaction, a campaign completes only once none
-- is left). This lists those campaigns without reading the tenant's history.
--
-- Plain builds: each blocks writes to its table while it runs (a row per lead, a row per
-- campaign or sequence step; seconds for a million leads), which a deploy's migration step can
-- afford. `broadcast_messages` is not touched.
CREATE INDEX campaigns_tenant_active ON campaigns (tenant_id) WHERE status IN ('running', 'paused');
