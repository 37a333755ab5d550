-- Signals sent to instances (`POST /v1/instances/{id}/signals/{name}`). The admin API inserts
-- one (status BUFFERED) with its deliver command in the outbox, in one transaction; the
-- scheduler records what became of it (DELIVERED to a wait, still BUFFERED, or LATE) in the
-- transaction that applies it.

CREATE TABLE signals (
    id               uuid        PRIMARY KEY,
    instance_id      uuid        NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    name             text        NOT NULL,
    payload          jsonb       NOT NULL DEFAULT '{}',
    by               text        NOT NULL,   -- the principal who sent it
    idempotency_key  text,
    request_hash     text,
    status           text        NOT NULL CHECK (status IN ('BUFFERED', 'DELIVERED', 'LATE')),
    step             text,                   -- the wait it ended (DELIVERED)
    reason           text,
    received_at      timestamptz NOT NULL DEFAULT now(),
    decided_at       timestamptz,            -- when the scheduler applied it
    UNIQUE (instance_id, idempotency_key)
);
CREATE INDEX signals_by_instance ON signals (instance_id, received_at, id);
