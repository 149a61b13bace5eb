-- aioasync_tasks schema version 3 (postgresql): unique tasks, progress, retention, task types.
-- unique_key: at most one live task (INIT, PENDING, RUNNING, CANCELING or PAUSED) per
--   (type, unique_key), enforced by a partial unique index (docs/design.md §4.4).
-- progress, message: what a task last reported, stored with its checkpoints (§2.6).
-- aioasync_tasks_done_idx: retention finds old FINISHED and FAILED tasks (§4.5).
-- aioasync_task_types: the options of each task type, stored by the workers that run it, for
--   nodes that create tasks of types they have not imported (§4.6).
-- A group row exists only for settings: rows with the default settings are dropped (§4.5).

ALTER TABLE aioasync_tasks ADD COLUMN unique_key TEXT;

ALTER TABLE aioasync_tasks ADD COLUMN progress DOUBLE PRECISION;

ALTER TABLE aioasync_tasks ADD COLUMN message TEXT;

CREATE UNIQUE INDEX aioasync_tasks_unique_idx ON aioasync_tasks (type, unique_key) WHERE unique_key IS NOT NULL AND state IN ('init', 'pending', 'running', 'canceling', 'paused');

CREATE INDEX aioasync_tasks_done_idx ON aioasync_tasks (state, done_at) WHERE done_at IS NOT NULL;

CREATE TABLE aioasync_task_types (
	name VARCHAR(200) NOT NULL, 
	max_attempts INTEGER NOT NULL, 
	has_cleanup BOOLEAN NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (name)
);

DELETE FROM aioasync_groups
WHERE NOT paused AND max_running IS NULL AND max_running_per_user IS NULL;
