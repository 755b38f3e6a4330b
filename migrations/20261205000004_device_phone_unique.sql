-- A device's phone is the WhatsApp account it sends as. Two live devices of one tenant with one
-- number are one account paced twice: each device keeps its own gaps and daily cap, so the
-- account sends at the sum of both, which is how numbers get banned. A tenant's live devices
-- now have distinct numbers (a deleted device's number may be used again; devices without a
-- number are not constrained). The device host also writes the number a web device was
-- actually paired with, and unlinks a pairing whose account is already another device.
-- Existing duplicates: the oldest device keeps the number; each later one loses it (its
-- `phone` becomes NULL; pairing, or the host's next connection of a web device, sets it again,
-- and a web device whose account is another device's is then unlinked).
UPDATE devices d SET phone = NULL
WHERE d.deleted_at IS NULL AND d.phone IS NOT NULL
  AND EXISTS (SELECT 1 FROM devices o
              WHERE o.tenant_id = d.tenant_id AND o.phone = d.phone AND o.deleted_at IS NULL
                AND (o.created_at, o.id) < (d.created_at, d.id));

CREATE UNIQUE INDEX devices_tenant_phone ON devices (tenant_id, phone)
    WHERE deleted_at IS NULL AND phone IS NOT NULL;
