-- Activity state in rows of their own (issue: long-running processes). A transition reads and
-- writes the instance's small document (status, inputs, counters, joins in progress) and only
-- the activities it touches, so its cost does not grow with the steps the instance has run.
-- Existing instances are carried over: their activities become rows, their document loses
-- `activities` and `outputs` (read from the rows now) and gains `counts`; parallel steps in
-- progress have no `joins` entry, and the engine counts their branches from the rows once.

CREATE TABLE activities (
    instance_id  uuid        NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    step         text        NOT NULL,
    status       text        NOT NULL,   -- state->>'status', for the indexes below
    position     integer,                -- depth-first place in the definition (NULL: carried
                                         -- over from a document, until the scheduler writes it)
    state        jsonb       NOT NULL,   -- the engine's ActivityState
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, step)
);
CREATE INDEX activities_in_order ON activities (instance_id, position, step);
-- What a cancel or an ending reads, and what the flags list reads: never every activity.
CREATE INDEX activities_open ON activities (instance_id)
    WHERE status NOT IN ('COMPLETED', 'FAILED', 'TIMED_OUT', 'CANCELLED', 'SKIPPED');
CREATE INDEX activities_flagged ON activities (instance_id) WHERE status = 'INTERRUPTED';

INSERT INTO activities (instance_id, step, status, state)
SELECT i.id, a.key, a.value->>'status', a.value
FROM instances i CROSS JOIN LATERAL jsonb_each(COALESCE(i.state->'activities', '{}')) AS a;

UPDATE instances i
SET state = (i.state - 'activities' - 'outputs') || jsonb_build_object(
    'counts',
    COALESCE(
        (SELECT jsonb_object_agg(c.status, c.n)
         FROM (SELECT status, count(*) AS n FROM activities
               WHERE instance_id = i.id GROUP BY status) AS c),
        '{}'::jsonb));
