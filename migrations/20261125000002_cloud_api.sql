-- Cloud API devices: Meta's phone-number id (webhooks name the device by it) and the access
-- token, one row per device, in the device's tenant. The token is a secret: the code never logs
-- it; encrypt the database at rest (RDS does by default).
CREATE TABLE device_cloud_credentials (
    device_id        uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL,
    phone_number_id  text NOT NULL UNIQUE CHECK (phone_number_id ~ '^[0-9]{1,32}$'),
    access_token     text NOT NULL CHECK (length(access_token) BETWEEN 16 AND 2048),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (device_id, tenant_id) REFERENCES devices (id, tenant_id)
);

-- Provider statuses (webhooks, acks) find the send record by the id that travelled with the
-- message.
CREATE INDEX host_sends_provider_message_id ON host_sends (provider_message_id);
