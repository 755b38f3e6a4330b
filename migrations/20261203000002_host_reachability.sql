-- A host that the workers cannot reach while it still renews its leases (a wrong advertised
-- URL, a partition between the workers and the host but not PostgreSQL) keeps its devices: no
-- other host may take them, and the lease never runs out. Its devices' messages came back at
-- every lease end with their attempt given back, without end. The workers now record it: the
-- first failure of the current outage and the latest one. A device's messages that found its
-- host unreachable are skipped once the outage has lasted the offline grace
-- (`messages::skip_unreachable_host_messages`); any answer from the host clears both.
ALTER TABLE hosts
    ADD COLUMN unreachable_since timestamptz,
    ADD COLUMN unreachable_at    timestamptz;
