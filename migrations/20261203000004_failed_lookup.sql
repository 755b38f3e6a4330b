-- `retry-failed` (a tenant's, a device's or a campaign's failed messages) finds its rows here:
-- by tenant alone, or tenant and device, no index qualified and a retry read the whole table
-- (scale-bench). Failed rows are few, and only a row entering or leaving `failed` writes here.
CREATE INDEX bm_failed ON broadcast_messages (tenant_id, device_id) WHERE status = 'failed';
