-- 002: what the Claude agents need beside task state.
--
-- task_attachments: binary data that travels as message attachments (a code task's patch, a test
--   task's input patch), never inside JSON. kind 'input' rides with the task's TASK message;
--   kind 'output' came with its RESULT. Keyed by task (no foreign key into the partitioned tasks).
-- task_turns: a code task's conversation so far, saved after every model turn, with the worktree's
--   changes at that point, so a retried task resumes on another developer instead of starting over.
-- llm_calls: one row per model API call (or cache hit): tokens and cost, per task and per job.
-- jobs: the policeman's durable state of a job (plan, subtask progress, report).

CREATE TABLE task_attachments (
    task_id    uuid        NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('input', 'output')),
    idx        smallint    NOT NULL CHECK (idx >= 0 AND idx < 16),
    data       bytea       NOT NULL,
    sha256     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, kind, idx)
);

CREATE TABLE task_turns (
    task_id    uuid        PRIMARY KEY,
    attempt    integer     NOT NULL,
    node       text,
    messages   jsonb       NOT NULL,
    usage      jsonb       NOT NULL DEFAULT '{}',
    wip        bytea,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE llm_calls (
    id           bigserial   PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    task_id      uuid,
    job_id       uuid,
    node         text,
    role         text,
    model        text        NOT NULL,
    input_tokens       integer NOT NULL DEFAULT 0,
    output_tokens      integer NOT NULL DEFAULT 0,
    cache_read_tokens  integer NOT NULL DEFAULT 0,
    cache_write_tokens integer NOT NULL DEFAULT 0,
    cost_usd     numeric(12, 6) NOT NULL DEFAULT 0,
    cached       boolean     NOT NULL DEFAULT false
);
CREATE INDEX llm_calls_task ON llm_calls (task_id);
CREATE INDEX llm_calls_job ON llm_calls (job_id);

CREATE TABLE jobs (
    id           uuid        PRIMARY KEY,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    state        text        NOT NULL CHECK (state IN ('planning', 'running', 'integrating', 'testing', 'done',
                                                       'failed', 'budget-exhausted', 'cancelled')),
    spec         jsonb       NOT NULL,
    progress     jsonb       NOT NULL DEFAULT '{}'
);
