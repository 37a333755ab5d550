-- The server registry: every service instance, from its heartbeats. LOST is not stored: it is
-- what a reader concludes from a last_heartbeat older than PACELINE_SERVER_LOST_AFTER_S.

CREATE TABLE servers (
    id              text        PRIMARY KEY,
    kind            text        NOT NULL,
    host            text        NOT NULL,
    pid             integer     NOT NULL,
    started_at      timestamptz NOT NULL,
    status          text        NOT NULL,   -- ACTIVE, DRAINING or DRAINED, as last reported
    last_heartbeat  timestamptz NOT NULL,
    in_flight       jsonb       NOT NULL DEFAULT '[]'
);
CREATE INDEX servers_by_kind ON servers (kind, started_at);
