-- 001: durable task state and the audit trail.
--
-- Fixes against the original sketch: the partition key (created_at) is part of the primary key,
-- as Postgres requires of a partitioned table; the status check lists every status of the
-- lifecycle (casperd/lifecycle.py); idempotency keys are unique through their own table, since a
-- unique index on a partitioned table must contain the partition key; parent_id carries no
-- foreign key (it would need the parent's created_at too, and costs a lookup per insert).

CREATE TABLE tasks (
    id              uuid        NOT NULL,
    created_at      timestamptz NOT NULL,
    parent_id       uuid,
    type            text        NOT NULL,
    status          text        NOT NULL DEFAULT 'pending',
    priority        smallint    NOT NULL DEFAULT 5,
    requires        text[]      NOT NULL DEFAULT '{}',
    affinity        text,
    idempotency_key text,
    cache           boolean     NOT NULL DEFAULT false,
    attempts        integer     NOT NULL DEFAULT 0,
    max_attempts    integer     NOT NULL DEFAULT 3,
    timeout_s       double precision,
    assigned_to     text,
    lease_deadline  timestamptz,
    not_before      timestamptz,
    submitted_by    text,
    assigned_at     timestamptz,
    started_at      timestamptz,
    validating_at   timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    input           jsonb       NOT NULL DEFAULT '{}',
    output          jsonb,
    error           jsonb,
    PRIMARY KEY (id, created_at),
    CONSTRAINT tasks_status_check CHECK (status IN
        ('pending', 'assigned', 'processing', 'validating', 'complete',
         'error', 'retry', 'dead', 'cancelled')),
    CONSTRAINT tasks_priority_check CHECK (priority BETWEEN 0 AND 9),
    CONSTRAINT tasks_attempts_check CHECK (attempts >= 0 AND max_attempts >= 1)
) PARTITION BY RANGE (created_at);
-- Ids are UUIDv7: they sort by creation time and carry created_at (the first 48 bits are its Unix
-- milliseconds), so the primary key serves both "newest first" listings and lookups by id with
-- partition pruning. Every index is paid for on each state change: keep them few.

-- Catches rows outside every monthly partition (clock skew, a missed maintenance run);
-- casper_ensure_partitions keeps it empty by creating months ahead.
CREATE TABLE tasks_default PARTITION OF tasks DEFAULT WITH (fillfactor = 70);

-- caspectl tasks --status S, newest first; also the broker's restart query (open statuses).
CREATE INDEX tasks_status_idx ON tasks (status, id DESC);
-- subtasks of a plan
CREATE INDEX tasks_parent_idx ON tasks (parent_id) WHERE parent_id IS NOT NULL;

CREATE TABLE task_idempotency (
    key        text        PRIMARY KEY,
    task_id    uuid        NOT NULL,
    created_at timestamptz NOT NULL
);

-- Append-only audit trail: one row per state change, written in the same transaction.
CREATE TABLE task_events (
    id          bigint      GENERATED ALWAYS AS IDENTITY,
    at          timestamptz NOT NULL DEFAULT now(),
    task_id     uuid        NOT NULL,
    from_status text,
    to_status   text        NOT NULL,
    peer        text,
    attempt     integer     NOT NULL DEFAULT 0,
    detail      jsonb,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
CREATE TABLE task_events_default PARTITION OF task_events DEFAULT;
CREATE INDEX task_events_task_idx ON task_events (task_id, id);

CREATE OR REPLACE FUNCTION casper_forbid_event_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'task_events is append-only';
END $$;
CREATE TRIGGER task_events_append_only BEFORE UPDATE OR DELETE ON task_events
    FOR EACH ROW EXECUTE FUNCTION casper_forbid_event_changes();

-- Monthly partitions from this month to months_ahead months ahead, for both tables.
CREATE OR REPLACE FUNCTION casper_ensure_partitions(months_ahead integer DEFAULT 2) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    m      date := date_trunc('month', now())::date;
    made   integer := 0;
    parent text;
    part   text;
BEGIN
    FOR i IN 0..months_ahead LOOP
        FOREACH parent IN ARRAY ARRAY['tasks', 'task_events'] LOOP
            part := format('%s_%s', parent, to_char(m, 'YYYY_MM'));
            IF to_regclass(part) IS NULL THEN
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L) %s',
                               part, parent, m, (m + interval '1 month')::date,
                               -- room on each page for HOT updates of task rows
                               CASE WHEN parent = 'tasks' THEN 'WITH (fillfactor = 70)' ELSE '' END);
                made := made + 1;
            END IF;
        END LOOP;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN made;
END $$;

SELECT casper_ensure_partitions(2);
