-- aioasync_tasks schema version 1 (mysql: MySQL 8 and MariaDB 10.6 or newer): tasks, nodes,
-- groups, schema version.
-- InnoDB tables in utf8mb4 with a binary collation (names compare byte for byte, as on the
-- other databases). Timestamps are DATETIME(6) in UTC (UTC_TIMESTAMP(6), the database clock).
-- Names are VARCHAR(200) (MySQL cannot index TEXT), long texts LONGTEXT.
-- MySQL has no partial indexes: the indexes are those of the other databases, on all rows
-- (docs/design.md §4.2, §16).
-- MySQL commits before and after each DDL statement: a migration is not one transaction here.

CREATE TABLE aioasync_groups (
	name VARCHAR(200) NOT NULL,
	paused BOOL NOT NULL,
	max_running INTEGER,
	max_running_per_user INTEGER,
	updated_at DATETIME(6) NOT NULL,
	PRIMARY KEY (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE aioasync_nodes (
	id BIGINT NOT NULL AUTO_INCREMENT,
	name VARCHAR(200) NOT NULL,
	concurrency INTEGER NOT NULL,
	types LONGTEXT NOT NULL,
	started_at DATETIME(6) NOT NULL,
	heartbeat_at DATETIME(6) NOT NULL,
	PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE aioasync_schema_version (
	version INTEGER NOT NULL,
	applied_at DATETIME(6) NOT NULL,
	PRIMARY KEY (version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE aioasync_tasks (
	id BIGINT NOT NULL AUTO_INCREMENT,
	type VARCHAR(200) NOT NULL,
	user_name VARCHAR(200) NOT NULL,
	group_name VARCHAR(200) NOT NULL,
	state VARCHAR(16) NOT NULL,
	requested VARCHAR(16),
	context LONGTEXT NOT NULL,
	priority INTEGER NOT NULL,
	attempts INTEGER NOT NULL,
	max_attempts INTEGER NOT NULL,
	has_cleanup BOOL NOT NULL,
	handoff BOOL NOT NULL,
	error LONGTEXT,
	node_id BIGINT,
	created_at DATETIME(6) NOT NULL,
	updated_at DATETIME(6) NOT NULL,
	started_at DATETIME(6),
	done_at DATETIME(6),
	run_at DATETIME(6) NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT aioasync_tasks_state_check CHECK (state IN ('init', 'pending', 'running', 'canceling', 'paused', 'finished', 'failed', 'deleting')),
	CONSTRAINT aioasync_tasks_requested_check CHECK ((state = 'canceling') = (requested IS NOT NULL))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE INDEX aioasync_tasks_active_idx ON aioasync_tasks (group_name, user_name);

CREATE INDEX aioasync_tasks_deleting_idx ON aioasync_tasks (run_at);

CREATE INDEX aioasync_tasks_group_idx ON aioasync_tasks (group_name, id);

CREATE INDEX aioasync_tasks_owner_idx ON aioasync_tasks (node_id);

CREATE INDEX aioasync_tasks_queue_idx ON aioasync_tasks (group_name, user_name, handoff DESC, priority DESC, id);

CREATE INDEX aioasync_tasks_ready_at_idx ON aioasync_tasks (run_at);

CREATE INDEX aioasync_tasks_state_idx ON aioasync_tasks (state, id);

CREATE INDEX aioasync_tasks_user_idx ON aioasync_tasks (user_name, id);
