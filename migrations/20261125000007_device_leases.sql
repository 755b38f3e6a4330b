-- Several device hosts: each device is owned by exactly one host at a time through a lease; the
-- worker sends to the owner's URL. A host that stops renewing loses its devices after the lease.
CREATE TABLE hosts (
    id        text PRIMARY KEY,
    url       text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE devices
    ADD COLUMN host_id          text,
    ADD COLUMN host_lease_until timestamptz;

-- Renewal and release by owner; acquisition scans the expired or unowned ones.
CREATE INDEX devices_host ON devices (host_id) WHERE deleted_at IS NULL;
