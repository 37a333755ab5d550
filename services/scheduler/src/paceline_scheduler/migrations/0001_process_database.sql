-- The process database. The scheduler alone changes instance state; the admin API adds
-- definitions and PENDING instances (with their start command in the outbox) and reads.

CREATE TABLE definitions (
    name        text        NOT NULL,
    version     integer     NOT NULL,
    body        jsonb       NOT NULL,   -- the definition as the author sent it (validated)
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

CREATE TABLE instances (
    id               uuid        PRIMARY KEY,
    definition       text        NOT NULL,
    version          integer     NOT NULL,
    status           text        NOT NULL,
    state            jsonb       NOT NULL,  -- the engine's InstanceState, one document
    trace_id         text,
    traceparent      text,                  -- parent for every span of the instance
    started_by       text        NOT NULL,
    started_how      text        NOT NULL,
    idempotency_key  text        UNIQUE,
    request_hash     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (definition, version) REFERENCES definitions (name, version)
);
CREATE INDEX instances_by_status ON instances (status, created_at DESC, id);
CREATE INDEX instances_by_definition ON instances (definition, created_at DESC, id);
CREATE INDEX instances_by_created ON instances (created_at DESC, id);

CREATE TABLE history (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  uuid        NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    at           timestamptz NOT NULL DEFAULT now(),
    kind         text        NOT NULL,
    step         text,
    attempt      integer,
    reason       text        NOT NULL,
    data         jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX history_by_instance ON history (instance_id, id);

CREATE TABLE outbox (
    id            uuid        PRIMARY KEY,
    queue         text        NOT NULL,
    message_type  text        NOT NULL,
    body          bytea       NOT NULL,
    headers       jsonb       NOT NULL DEFAULT '{}',
    available_at  timestamptz NOT NULL DEFAULT now(),
    delayed       boolean     NOT NULL DEFAULT false,  -- held back: only the relay sends it
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_due ON outbox (available_at);
