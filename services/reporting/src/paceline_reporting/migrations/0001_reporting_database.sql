-- The reporting database: built from events only; the process database never depends on it.

CREATE TABLE instance_reports (
    instance_id  uuid        PRIMARY KEY,
    definition   text        NOT NULL,
    version      integer     NOT NULL,
    status       text        NOT NULL,
    started_by   text        NOT NULL,
    started_how  text        NOT NULL,
    created_at   timestamptz NOT NULL,
    started_at   timestamptz,
    finished_at  timestamptz,
    duration_ms  bigint,                 -- start to end, once ended
    error_kind   text,
    error        text,
    seq          integer     NOT NULL,   -- the newest event applied; older ones are ignored
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instance_reports_by_created ON instance_reports (created_at);
CREATE INDEX instance_reports_by_definition ON instance_reports (definition, created_at);

CREATE TABLE activity_reports (
    instance_id    uuid        NOT NULL,
    step           text        NOT NULL,
    activity_type  text        NOT NULL,
    status         text        NOT NULL,
    restartable    boolean     NOT NULL,
    attempts       integer     NOT NULL,
    server_id      text,
    started_at     timestamptz,
    finished_at    timestamptz,
    duration_ms    bigint,
    error_kind     text,
    seq            integer     NOT NULL,
    PRIMARY KEY (instance_id, step)
);
