-- Every change of a tenant's opt-out list, kept: who put a number on it (the person, by an
-- inbound keyword, or an operator) and when, and an operator's taking it off again (a number
-- opted out by mistake). `opt_outs` holds the list as it is now; this is how it got there.
CREATE TABLE opt_out_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id),
    phone      text NOT NULL,
    action     text NOT NULL CHECK (action IN ('opt_out', 'opt_in')),
    source     text NOT NULL CHECK (source IN ('inbound_message', 'operator', 'before_log')),
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX opt_out_log_number ON opt_out_log (tenant_id, phone, at);

INSERT INTO opt_out_log (tenant_id, phone, action, source, at)
SELECT tenant_id, phone, 'opt_out', 'before_log', opted_out_at FROM opt_outs;
