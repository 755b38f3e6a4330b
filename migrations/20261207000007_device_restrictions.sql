-- A restriction outlives the session that learned it. Before, a restriction was only the
-- device's `status`, which the session serving the device rewrites: a host that took the
-- device over (a deploy, a crash, a failover) opened a fresh session, wrote `connecting` and
-- `online`, and the processor sent again to new contacts inside WhatsApp's reach-out
-- restriction (nack 463/475, held `WEB_RESTRICTION_HOLD_H`), or through a Cloud API number
-- Meta had restricted until a person acted. Now the restriction has columns of its own, which
-- only a restriction, its end, or a person (`wabcast device connect`) changes; the processor
-- claims no device whose restriction has not ended, whatever its session says.
--
-- `restriction`: why (the reason the restriction was recorded with); NULL: none.
-- `restricted_until`: when it ends; NULL with a `restriction`: when a person lifts it.
-- In force: `restriction IS NOT NULL AND (restricted_until IS NULL OR restricted_until > now())`.
ALTER TABLE devices
    ADD COLUMN restricted_until timestamptz,
    ADD COLUMN restriction      text;

-- Devices restricted now keep it until a person connects them: when each ends was not kept.
UPDATE devices SET restriction = COALESCE(status_reason, 'restricted')
WHERE status = 'restricted' AND deleted_at IS NULL;
