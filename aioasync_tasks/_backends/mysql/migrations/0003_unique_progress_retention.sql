-- aioasync_tasks schema version 3 (mysql): unique tasks, progress, retention, task types.
-- unique_key: at most one live task (INIT, PENDING, RUNNING, CANCELING or PAUSED) per
--   (type, unique_key) (docs/design.md §4.4). MySQL has no partial indexes: live_key, a
--   generated column, is unique_key while the task is live and NULL otherwise, and the unique
--   index is on (type, live_key); NULLs never collide, so finished, failed and deleting tasks
--   hold no key (§16.1).
-- progress, message: what a task last reported, stored with its checkpoints (§2.6).
-- aioasync_tasks_done_idx: retention finds old FINISHED and FAILED tasks (§4.5).
-- aioasync_task_types: the options of each task type, stored by the workers that run it, for
--   nodes that create tasks of types they have not imported (§4.6).
-- A group row exists only for settings: rows with the default settings are dropped (§4.5).
-- The columns and indexes of the tasks are one ALTER TABLE: one rebuild of the table, and
-- nothing half-done if it fails (MySQL commits at every DDL statement).

ALTER TABLE aioasync_tasks
	ADD COLUMN unique_key VARCHAR(200),
	ADD COLUMN progress DOUBLE,
	ADD COLUMN message TEXT,
	ADD COLUMN live_key VARCHAR(200) GENERATED ALWAYS AS (CASE WHEN state IN ('init', 'pending', 'running', 'canceling', 'paused') THEN unique_key END) STORED,
	ADD UNIQUE INDEX aioasync_tasks_unique_idx (type, live_key),
	ADD INDEX aioasync_tasks_done_idx (state, done_at);

CREATE TABLE aioasync_task_types (
	name VARCHAR(200) NOT NULL,
	max_attempts INTEGER NOT NULL,
	has_cleanup BOOL NOT NULL,
	updated_at DATETIME(6) NOT NULL,
	PRIMARY KEY (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

DELETE FROM aioasync_groups
WHERE NOT paused AND max_running IS NULL AND max_running_per_user IS NULL;
