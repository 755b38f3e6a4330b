-- A tenant's opt-outs by phone number, apart from its leads. An opt-out used to be only a mark
-- on the leads that had the number at that moment: the same number imported later (on another
-- device, or after a STOP from a number that was not a lead yet) was messaged again. A lead is
-- now inserted opted out when its number is on this list; the fan-out, the sequences and the
-- worker's claim keep reading `leads.opted_out_at` as before.
CREATE TABLE opt_outs (
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    phone         text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    opted_out_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, phone)
);

INSERT INTO opt_outs (tenant_id, phone, opted_out_at)
SELECT tenant_id, phone, min(opted_out_at)
FROM leads
WHERE opted_out_at IS NOT NULL
GROUP BY tenant_id, phone;
