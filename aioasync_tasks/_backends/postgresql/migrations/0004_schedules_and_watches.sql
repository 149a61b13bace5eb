-- aioasync_tasks schema version 4 (postgresql): periodic tasks, and watched tasks.
-- aioasync_schedules: one row per schedule; its next_tick is advanced by compare-and-set in the
-- transaction that enqueues the tick's task, so each tick is enqueued once (docs/design.md §17).
-- aioasync_tasks.watched_until: while someone waits for or watches a task, its writes notify
-- them (PostgreSQL; docs/design.md §18). Version 3 belongs to another change: versions need
-- not be contiguous.

CREATE TABLE aioasync_schedules (
	name TEXT NOT NULL,
	type VARCHAR(200) NOT NULL,
	cron TEXT,
	every DOUBLE PRECISION,
	timezone TEXT NOT NULL,
	context TEXT NOT NULL,
	user_name TEXT NOT NULL,
	group_name TEXT NOT NULL,
	priority INTEGER NOT NULL,
	max_attempts INTEGER,
	declared BOOLEAN NOT NULL,
	next_tick TIMESTAMP WITH TIME ZONE NOT NULL,
	last_tick TIMESTAMP WITH TIME ZONE,
	last_task_id BIGINT,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (name),
	CONSTRAINT aioasync_schedules_spec_check CHECK ((cron IS NULL) <> (every IS NULL))
);

CREATE INDEX aioasync_schedules_next_tick_idx ON aioasync_schedules (next_tick);

ALTER TABLE aioasync_tasks ADD COLUMN watched_until TIMESTAMP WITH TIME ZONE;
