-- herald's history: messages, archived runs and their recipients' records,
-- and idempotency keys. Every list the API serves is newest first on
-- (inserted_at, id), so each filter has an index in that order; retention
-- deletes by time in batches (the *_by_age indexes).

CREATE TABLE herald_messages (
    id                   uuid PRIMARY KEY,
    namespace            text NOT NULL,
    workflow             text NOT NULL,
    workflow_run_id      uuid NOT NULL,
    recipient_run_id     uuid NOT NULL,
    -- A user id, or an object id with its collection.
    recipient_id         text NOT NULL,
    recipient_collection text NOT NULL DEFAULT '',
    tenant               text,
    actor                jsonb,
    step_ref             text NOT NULL,
    channel              text NOT NULL,
    channel_type         text NOT NULL,
    status               text NOT NULL,
    reason               text NOT NULL,
    content              jsonb,
    attempts             jsonb NOT NULL,
    data                 jsonb,
    inserted_at          timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL
);
CREATE INDEX herald_messages_by_time ON herald_messages (namespace, inserted_at DESC, id DESC);
CREATE INDEX herald_messages_by_recipient ON herald_messages (namespace, recipient_collection, recipient_id, inserted_at DESC, id DESC);
CREATE INDEX herald_messages_by_workflow ON herald_messages (namespace, workflow, inserted_at DESC, id DESC);
CREATE INDEX herald_messages_by_channel ON herald_messages (namespace, channel, inserted_at DESC, id DESC);
CREATE INDEX herald_messages_by_tenant ON herald_messages (namespace, tenant, inserted_at DESC, id DESC) WHERE tenant IS NOT NULL;
CREATE INDEX herald_messages_by_run ON herald_messages (workflow_run_id);
CREATE INDEX herald_messages_by_recipient_run ON herald_messages (recipient_run_id);
CREATE INDEX herald_messages_by_age ON herald_messages (inserted_at);

-- A finished TriggerRun, as it was when it left the cluster.
CREATE TABLE herald_workflow_runs (
    id          uuid PRIMARY KEY,
    namespace   text NOT NULL,
    name        text NOT NULL,
    workflow    text NOT NULL,
    state       text NOT NULL,
    -- The TriggerRun object (metadata, spec and status) without its pages.
    run         jsonb NOT NULL,
    inserted_at timestamptz NOT NULL,
    archived_at timestamptz NOT NULL
);
CREATE INDEX herald_workflow_runs_by_name ON herald_workflow_runs (namespace, name);
CREATE INDEX herald_workflow_runs_by_age ON herald_workflow_runs (archived_at);

-- Each recipient's record of an archived run, in the run's order.
CREATE TABLE herald_recipient_runs (
    id              uuid PRIMARY KEY,
    workflow_run_id uuid NOT NULL REFERENCES herald_workflow_runs (id) ON DELETE CASCADE,
    position        integer NOT NULL,
    record          jsonb NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE UNIQUE INDEX herald_recipient_runs_by_run ON herald_recipient_runs (workflow_run_id, position);

-- Idempotency keys, by the name of the TriggerRun a key makes (a hash of
-- its API, namespace and key): claimed before the run is created (a unique
-- key, so the same key through any replica makes one run) and kept for the
-- retention period after the run left the cluster.
CREATE TABLE herald_idempotency_keys (
    namespace   text NOT NULL,
    run_name    text NOT NULL,
    fingerprint text NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (namespace, run_name)
);
CREATE INDEX herald_idempotency_keys_by_age ON herald_idempotency_keys (created_at);
