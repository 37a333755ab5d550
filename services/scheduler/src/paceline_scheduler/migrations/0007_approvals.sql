-- Approvals (`approval` activities). The scheduler inserts one per (instance, step, attempt)
-- in the transaction that moves the step to WAITING (the checkpoint: a failover can never
-- create a second); the admin API records each decider's choice and, when it decides, the
-- decision, locking the approval row; the scheduler's timeout takes the same lock, so a
-- decision and a timeout never both win.

CREATE TABLE approvals (
    id                uuid        PRIMARY KEY,   -- derived from (instance, step, attempt)
    instance_id       uuid        NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    step              text        NOT NULL,
    attempt           integer     NOT NULL,
    definition        text        NOT NULL,
    title             text        NOT NULL,
    details           jsonb,
    approvers         text[]      NOT NULL,      -- principals and group:<name>, escalations included
    required          integer     NOT NULL,
    forbid_requester  boolean     NOT NULL,
    requester         text        NOT NULL,      -- who started the instance
    choices           text[]      NOT NULL,
    status            text        NOT NULL CHECK (status IN ('PENDING', 'DECIDED', 'EXPIRED', 'CANCELLED')),
    decision          text,
    decided_by        text[]      NOT NULL DEFAULT '{}',
    escalation_level  integer     NOT NULL DEFAULT 0,
    due_at            timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    decided_at        timestamptz,
    UNIQUE (instance_id, step, attempt)
);
CREATE INDEX approvals_by_status ON approvals (status, created_at, id);
CREATE INDEX approvals_by_approver ON approvals USING gin (approvers);

CREATE TABLE approval_decisions (
    approval_id      uuid        NOT NULL REFERENCES approvals (id) ON DELETE CASCADE,
    by               text        NOT NULL,
    decision         text        NOT NULL,
    comment          text,
    idempotency_key  text,                   -- the decider's own: one choice per decider
    decided_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (approval_id, by)
);
