-- Device leases move out of `devices` into a table of their own. A host renews the leases of
-- all its devices every third of the lease: in `devices` that was one UPDATE of up to thousands
-- of rows, the very rows the processor's claim locks and the worker's outcome update moves (the
-- pacing cursor), taken in another order. With 3,000 devices on one host the renewal and the
-- worker's outcome update deadlocked (the paced benchmark, 2026-12-03: the outcome's rows were
-- left to the rescuer, two minutes late), and a renewal waiting for a claim held every device
-- row it had already renewed, which the next claims then skipped. Nothing that paces or sends
-- touches this table but to read it.
CREATE TABLE device_leases (
    device_id   uuid PRIMARY KEY REFERENCES devices (id),
    host_id     text NOT NULL,
    lease_until timestamptz NOT NULL
);

-- Renewal and release by owner.
CREATE INDEX device_leases_host ON device_leases (host_id);

INSERT INTO device_leases (device_id, host_id, lease_until)
SELECT id, host_id, host_lease_until FROM devices
WHERE host_id IS NOT NULL AND host_lease_until IS NOT NULL;

DROP INDEX devices_host;
ALTER TABLE devices DROP COLUMN host_id, DROP COLUMN host_lease_until;
