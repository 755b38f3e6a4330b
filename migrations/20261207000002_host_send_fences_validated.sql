-- The previous migration's constraints, validated in a transaction of their own: a validation
-- reads every row under a lock that lets the hosts keep writing.
ALTER TABLE host_sends VALIDATE CONSTRAINT host_sends_provider_id_unless_withdrawn;
ALTER TABLE host_sends VALIDATE CONSTRAINT host_sends_state_check;
