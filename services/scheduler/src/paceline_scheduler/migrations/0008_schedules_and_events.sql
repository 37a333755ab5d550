-- Ways to start work besides the API (issue 11): schedules with their fire ledger, and events
-- with the definitions' subscriptions. Everything that fires is a committed row: a fire is its
-- ledger row, the instance it started and the instance's start command (outbox), written in
-- one transaction; an event is its row, its deduplications and its instances, likewise.

-- What the instance's expressions see as `trigger` (null: started through the API).
ALTER TABLE instances ADD COLUMN trigger jsonb;
-- A schedule's running instances (overlap policies), found without a scan.
CREATE INDEX instances_active_by_starter ON instances (started_by)
    WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED');

CREATE TABLE schedules (
    id               text        PRIMARY KEY,
    definition       text        NOT NULL,
    version          integer,               -- null: the latest version at fire time
    inputs           jsonb       NOT NULL DEFAULT '{}',
    spec             jsonb       NOT NULL,  -- ScheduleSpec (cron | interval, timezone, ...)
    policy           jsonb       NOT NULL,  -- SchedulePolicy (catchup, overlap, ...)
    note             text,
    paused           boolean     NOT NULL DEFAULT false,
    paused_at        timestamptz,
    pause_note       text,
    resume_catchup   text,                  -- set by resume: the next plan uses plan_resume
    resumed_at       timestamptz,           -- set by resume: fires due by then are the pause's
    last_nominal_at  timestamptz NOT NULL,  -- the newest nominal time decided (creation time)
    next_due_at      timestamptz,           -- when a scheduler looks next; null: none to come
    buffered         integer     NOT NULL DEFAULT 0,  -- fires held (BUFFERED) not started yet
    created_by       text        NOT NULL,
    idempotency_key  text        UNIQUE,
    request_hash     text,
    revision         integer     NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_due ON schedules (next_due_at) WHERE next_due_at IS NOT NULL;
CREATE INDEX schedules_buffered ON schedules (id) WHERE buffered > 0;

-- The fire ledger: one row per nominal fire time (or per summarised range of missed ones).
CREATE TABLE schedule_fires (
    schedule_id   text        NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    nominal_at    timestamptz NOT NULL,
    last_nominal_at timestamptz,          -- a range row: the newest nominal time it covers
    count         integer,                -- a range row: how many (null: not counted)
    outcome       text        NOT NULL,   -- FireOutcome
    how           text        NOT NULL,   -- schedule | catchup | resume | trigger | backfill
    instance_id   uuid,
    due_at        timestamptz,
    decided_at    timestamptz NOT NULL,   -- the database's clock when decided
    started_at    timestamptz,            -- when its instance was created (BUFFERED: later)
    lateness_ms   bigint,                 -- started_at - due_at
    reason        text        NOT NULL,
    PRIMARY KEY (schedule_id, nominal_at)
);
CREATE INDEX schedule_fires_buffered ON schedule_fires (schedule_id, nominal_at)
    WHERE outcome = 'BUFFERED';

-- Subscriptions: the triggers of the latest version of each definition, by event type.
CREATE TABLE subscriptions (
    event_type  text    NOT NULL,
    definition  text    NOT NULL,
    version     integer NOT NULL,
    trigger_id  text    NOT NULL,
    PRIMARY KEY (event_type, definition, trigger_id)
);
CREATE INDEX subscriptions_by_definition ON subscriptions (definition);
INSERT INTO subscriptions (event_type, definition, version, trigger_id)
SELECT t->>'event', d.name, d.version, t->>'id'
FROM (SELECT DISTINCT ON (name) name, version, body FROM definitions
      ORDER BY name, version DESC) d,
     jsonb_array_elements(COALESCE(d.body->'triggers', '[]'::jsonb)) t
ON CONFLICT DO NOTHING;

CREATE TABLE events (
    id            uuid        PRIMARY KEY,     -- Paceline's event id
    event_key     text        NOT NULL UNIQUE, -- Idempotency-Key, or source + the event's id
    request_hash  text        NOT NULL,
    type          text        NOT NULL,
    source        text,
    event_id      text,                         -- the sender's id of the event
    data          jsonb,
    received_by   text        NOT NULL,         -- the principal, or amqp:<queue>
    received_via  text        NOT NULL,         -- api | amqp
    received_at   timestamptz NOT NULL DEFAULT now(),
    answer        jsonb       NOT NULL          -- what it started, as first answered
);
CREATE INDEX events_by_received ON events (received_at DESC, id);

-- Trigger deduplication: one instance per (definition, trigger, key) inside the window.
CREATE TABLE trigger_dedupe (
    definition   text        NOT NULL,
    trigger_id   text        NOT NULL,
    dedupe_key   text        NOT NULL,
    event        uuid        NOT NULL,
    instance_id  uuid        NOT NULL,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (definition, trigger_id, dedupe_key)
);
CREATE INDEX trigger_dedupe_expiry ON trigger_dedupe (expires_at);
