-- aioasync_tasks schema version 4 (mysql): periodic tasks, and watched tasks.
-- aioasync_schedules: one row per schedule; its next_tick is advanced by compare-and-set in the
-- transaction that enqueues the tick's task, so each tick is enqueued once (docs/design.md §17).
-- aioasync_tasks.watched_until: while someone waits for or watches a task, its writes notify
-- them where the database notifies (PostgreSQL; docs/design.md §18). MySQL has no
-- notifications: its waiters poll and mark nothing, and the column stays NULL.
-- Names are VARCHAR(200) (a key, which MySQL's TEXT cannot be), contexts LONGTEXT.

CREATE TABLE aioasync_schedules (
	name VARCHAR(200) NOT NULL,
	type VARCHAR(200) NOT NULL,
	cron TEXT,
	every DOUBLE,
	timezone TEXT NOT NULL,
	context LONGTEXT NOT NULL,
	user_name VARCHAR(200) NOT NULL,
	group_name VARCHAR(200) NOT NULL,
	priority INTEGER NOT NULL,
	max_attempts INTEGER,
	declared BOOL NOT NULL,
	next_tick DATETIME(6) NOT NULL,
	last_tick DATETIME(6),
	last_task_id BIGINT,
	created_at DATETIME(6) NOT NULL,
	updated_at DATETIME(6) NOT NULL,
	PRIMARY KEY (name),
	CONSTRAINT aioasync_schedules_spec_check CHECK ((cron IS NULL) <> (every IS NULL))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE INDEX aioasync_schedules_next_tick_idx ON aioasync_schedules (next_tick);

ALTER TABLE aioasync_tasks ADD COLUMN watched_until DATETIME(6);
