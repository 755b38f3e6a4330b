-- wabcast schema: tenants, devices, leads, media, campaigns, broadcast_messages, host_sends.
-- All instants are timestamptz (UTC). Composite foreign keys (x_id, tenant_id) make the database
-- itself refuse a lead on another tenant's device.

CREATE TABLE tenants (
    id             uuid PRIMARY KEY,
    email          text NOT NULL UNIQUE CHECK (email ~ '^[^@\s]+@[^@\s]+$'),
    password_hash  text NOT NULL,
    time_zone      text NOT NULL DEFAULT 'Asia/Kuala_Lumpur',
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    id                 uuid PRIMARY KEY,
    tenant_id          uuid NOT NULL REFERENCES tenants (id),
    label              text NOT NULL,
    phone              text CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    provider           text NOT NULL CHECK (provider IN ('simulator', 'web', 'cloud_api')),
    status             text NOT NULL DEFAULT 'offline' CHECK (status IN (
                           'connecting', 'awaiting_pairing', 'online', 'reconnecting', 'offline',
                           'logged_out', 'restricted', 'stopped', 'deleted')),
    status_reason      text,
    status_changed_at  timestamptz NOT NULL DEFAULT now(),
    min_delay_s        double precision NOT NULL DEFAULT 0 CHECK (min_delay_s >= 0),
    max_delay_s        double precision NOT NULL DEFAULT 0 CHECK (max_delay_s >= min_delay_s),
    next_send_at       timestamptz NOT NULL DEFAULT now(),
    daily_cap          integer CHECK (daily_cap > 0),
    deleted_at         timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (id, tenant_id)
);
-- The processor's scan: online, not deleted, cursor passed.
CREATE INDEX devices_ready ON devices (next_send_at) WHERE status = 'online' AND deleted_at IS NULL;
CREATE INDEX devices_tenant ON devices (tenant_id);

CREATE TABLE leads (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      uuid NOT NULL,
    device_id      uuid NOT NULL,
    name           text NOT NULL DEFAULT '',
    phone          text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    niches         text[] NOT NULL DEFAULT '{}',
    target_status  text NOT NULL CHECK (target_status IN ('prospect', 'customer')),
    triggers       text[] NOT NULL DEFAULT '{}',
    opted_out_at   timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (device_id, tenant_id) REFERENCES devices (id, tenant_id),
    UNIQUE (device_id, phone),
    UNIQUE (id, tenant_id)
);
CREATE INDEX leads_niches ON leads USING gin (niches);
CREATE INDEX leads_tenant ON leads (tenant_id, target_status) WHERE opted_out_at IS NULL;

-- Images given as data: URLs are validated once and stored here; messages refer to them as
-- 'media:<id>' so that a 2,000-recipient campaign does not copy a 5 MB image 2,000 times.
CREATE TABLE media (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    sha256      text NOT NULL,
    mime        text NOT NULL CHECK (mime IN ('image/jpeg', 'image/png', 'image/webp')),
    bytes       bytea NOT NULL CHECK (octet_length(bytes) <= 5 * 1024 * 1024),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, sha256)
);

CREATE TABLE campaigns (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id),
    title          text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    template       text NOT NULL CHECK (length(template) BETWEEN 1 AND 4096),
    image          text CHECK (image IS NULL OR image ~ '^(https://|media:)'),
    niche          text NOT NULL,
    target_status  text NOT NULL CHECK (target_status IN ('prospect', 'customer', 'all')),
    scheduled_at   timestamptz NOT NULL,
    min_delay_s    double precision NOT NULL CHECK (min_delay_s >= 0),
    max_delay_s    double precision NOT NULL CHECK (max_delay_s >= min_delay_s),
    status         text NOT NULL DEFAULT 'scheduled' CHECK (status IN (
                       'scheduled', 'running', 'paused', 'completed', 'cancelled')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz,
    UNIQUE (id, tenant_id)
);
CREATE INDEX campaigns_due ON campaigns (scheduled_at) WHERE status = 'scheduled';
CREATE INDEX campaigns_active ON campaigns (status) WHERE status IN ('running', 'paused');
CREATE INDEX campaigns_tenant ON campaigns (tenant_id, created_at);

CREATE TABLE broadcast_messages (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id            uuid NOT NULL,
    device_id            uuid NOT NULL,
    lead_id              bigint NOT NULL,
    campaign_id          uuid NOT NULL,
    recipient            text NOT NULL CHECK (recipient ~ '^\+[1-9][0-9]{6,14}$'),
    body                 text NOT NULL,
    image                text,
    status               text NOT NULL DEFAULT 'pending' CHECK (status IN (
                             'pending', 'queued', 'sending', 'sent', 'failed', 'skipped', 'cancelled')),
    reason               text,
    attempts             integer NOT NULL DEFAULT 0,
    enqueue_count        integer NOT NULL DEFAULT 0,
    due_at               timestamptz NOT NULL DEFAULT now(),
    -- the pacing gap drawn when the row was queued: the device's next send waits this long
    -- after this one is accepted, however late the queue delivers it
    gap_s                double precision,
    lease_until          timestamptz,
    last_error           text,
    provider_message_id  text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    queued_at            timestamptz,
    sending_at           timestamptz,
    sent_at              timestamptz,
    delivered_at         timestamptz,
    read_at              timestamptz,
    finished_at          timestamptz,
    -- No foreign keys on this table: per-row RI checks halved the fan-out rate (measured: 43k vs
    -- 84k rows/s). Rows are written only by the fan-out, which takes lead, device and tenant from
    -- one lead row; leads carry the composite key (device_id, tenant_id) -> devices.
    UNIQUE (campaign_id, lead_id),
    -- every terminal row says why
    CHECK (status IN ('pending', 'queued', 'sending') OR (reason IS NOT NULL AND finished_at IS NOT NULL))
);
-- The processor's claim: a device's next due pending message.
CREATE INDEX bm_claim ON broadcast_messages (device_id, due_at, id) WHERE status = 'pending';
-- Pacing: a device with a paced message in flight is not claimed again.
CREATE INDEX bm_device_in_flight ON broadcast_messages (device_id) WHERE status IN ('queued', 'sending');
-- The rescuer: rows in flight past their lease.
CREATE INDEX bm_in_flight ON broadcast_messages (lease_until) WHERE status IN ('queued', 'sending');
-- Progress counts per campaign, per state and per device: index-only scans.
CREATE INDEX bm_progress ON broadcast_messages (campaign_id, status, device_id);
-- Receipts are correlated by the provider's message id.
CREATE INDEX bm_provider_id ON broadcast_messages (provider_message_id) WHERE provider_message_id IS NOT NULL;

-- The device host's durable record of what it sent, per message id: a repeated send request
-- answers from here instead of sending again, and the rescuer reconciles 'sending' rows with it.
-- 'aborted' means the provider certainly did not send (a transient refusal): it may be attempted again.
CREATE TABLE host_sends (
    message_id           bigint PRIMARY KEY,
    tenant_id            uuid NOT NULL,
    device_id            uuid NOT NULL,
    provider_message_id  text NOT NULL,
    state                text NOT NULL CHECK (state IN ('attempting', 'sent', 'failed', 'aborted')),
    error                text,
    host_id              text NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
