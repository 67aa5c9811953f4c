-- 003: the same rules for less of Postgres's CPU per group commit (issue #13).
--
-- A table CHECK constraint is stored as node text and parsed (stringToNode, then planned) again
-- at every statement that writes the table: the three of `tasks` were a tenth of a small group
-- commit's CPU in Postgres. A domain's constraint is parsed and planned once per connection (the
-- type cache keeps it), so the same rules move to domains: same values allowed, same error
-- (SQLSTATE 23514, check_violation), now naming the domain's constraint. Readers see the base
-- types (Postgres describes a domain column by its base type).
--
-- Done without rewriting the table: the columns first change to domains without constraints
-- (binary-compatible, so no rewrite and the indexes are kept), then each domain's constraint is
-- added, which checks the rows already there, then the table's constraints go.
CREATE DOMAIN casper_task_status AS text;
CREATE DOMAIN casper_priority AS smallint;
CREATE DOMAIN casper_attempt_count AS integer;
CREATE DOMAIN casper_max_attempts AS integer;

ALTER TABLE tasks
    ALTER COLUMN status TYPE casper_task_status,
    ALTER COLUMN priority TYPE casper_priority,
    ALTER COLUMN attempts TYPE casper_attempt_count,
    ALTER COLUMN max_attempts TYPE casper_max_attempts;

-- Every status of the lifecycle (casperd/lifecycle.py; tests/unit/test_lifecycle.py compares them).
ALTER DOMAIN casper_task_status ADD CONSTRAINT casper_task_status_check CHECK (VALUE IN
    ('pending', 'assigned', 'processing', 'validating', 'complete',
     'error', 'retry', 'dead', 'cancelled'));
ALTER DOMAIN casper_priority ADD CONSTRAINT casper_priority_check CHECK (VALUE BETWEEN 0 AND 9);
ALTER DOMAIN casper_attempt_count ADD CONSTRAINT casper_attempt_count_check CHECK (VALUE >= 0);
ALTER DOMAIN casper_max_attempts ADD CONSTRAINT casper_max_attempts_check CHECK (VALUE >= 1);

ALTER TABLE tasks
    DROP CONSTRAINT tasks_status_check,
    DROP CONSTRAINT tasks_priority_check,
    DROP CONSTRAINT tasks_attempts_check;

-- task_events' primary key (id, at) served no query (readers go by task_events_task_idx, or read
-- the whole table) and cost a b-tree insert per event; id stays unique, as an identity column
-- always generated (and the table is append-only).
ALTER TABLE task_events DROP CONSTRAINT task_events_pkey;
