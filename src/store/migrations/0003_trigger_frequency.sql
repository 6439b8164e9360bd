-- Workflows with triggerFrequency oncePerRecipient(PerTenant): the recipient
-- run that ran first, per workflow, recipient and tenant ('' for any tenant).
-- Kept as long as the workflow may be triggered: never purged by retention.
CREATE TABLE IF NOT EXISTS herald_trigger_once (
    namespace text NOT NULL,
    workflow text NOT NULL,
    recipient text NOT NULL,
    tenant text NOT NULL,
    recipient_run_id uuid NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (namespace, workflow, recipient, tenant)
);
