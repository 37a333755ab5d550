-- Operators' requests, recorded by the admin API in the same transaction as the command they
-- cause (in the outbox). One per target, under the primary key: of two requests at the same
-- moment the first writer wins, and the other answers as the first did (a cancel) or is refused
-- naming it (a resolve). The scheduler's own record of what it applied is the history.

CREATE TABLE cancel_requests (
    instance_id   uuid        PRIMARY KEY REFERENCES instances (id) ON DELETE CASCADE,
    by            text        NOT NULL,   -- the principal who asked
    reason        text        NOT NULL,
    requested_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE resolve_requests (
    instance_id   uuid        NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    step          text        NOT NULL,
    attempt       integer     NOT NULL,   -- the flagged attempt the decision is about
    action        text        NOT NULL CHECK (action IN ('retry', 'skip', 'fail')),
    by            text        NOT NULL,   -- the principal who decided
    forced        boolean     NOT NULL DEFAULT false,  -- a retry while the holder was alive
    requested_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, step, attempt)
);
