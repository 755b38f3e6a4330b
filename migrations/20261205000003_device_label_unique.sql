-- A device's label is how people name it, and a lead CSV names a lead's device by it: two live
-- devices of one tenant with one label made an import give the label's leads to whichever of
-- the two came last. Labels of a tenant's live devices are now unique (a deleted device's label
-- may be used again). Existing duplicates: the oldest keeps the label, each later one gets the
-- first 8 characters of its id appended (commands that take a device take its id).
UPDATE devices d SET label = d.label || '-' || left(d.id::text, 8)
WHERE d.deleted_at IS NULL
  AND EXISTS (SELECT 1 FROM devices o
              WHERE o.tenant_id = d.tenant_id AND o.label = d.label AND o.deleted_at IS NULL
                AND (o.created_at, o.id) < (d.created_at, d.id));

CREATE UNIQUE INDEX devices_tenant_label ON devices (tenant_id, label) WHERE deleted_at IS NULL;
