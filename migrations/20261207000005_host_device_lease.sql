-- Each host records the device lease it holds its devices by (its `DEVICE_LEASE_S`). The
-- processors judge an outage of the database by it: a gap in their ticks of two thirds of the
-- shortest lease a host holds devices by is long enough for that host's leases to run out, and
-- the longest is how long the hosts need to renew after one (`repo::messages::TickGaps`).
-- Before, the processors had to be configured with the hosts' value; a deployment that set it
-- on the hosts alone left the processors at the default 30 s, and with shorter host leases an
-- outage under 20 s went unmarked (an extra attempt for a send under way, never a second send).
-- NULL for a host of an earlier version: the processor's own `DEVICE_LEASE_S` stands for it.
ALTER TABLE hosts
    ADD COLUMN device_lease_s float8 CHECK (device_lease_s > 0);
