-- aioasync_tasks schema version 1 (postgresql): tasks, nodes, groups, schema version.

CREATE TABLE aioasync_groups (
	name TEXT NOT NULL, 
	paused BOOLEAN NOT NULL, 
	max_running INTEGER, 
	max_running_per_user INTEGER, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (name)
);

CREATE TABLE aioasync_nodes (
	id BIGSERIAL NOT NULL, 
	name TEXT NOT NULL, 
	concurrency INTEGER NOT NULL, 
	types TEXT NOT NULL, 
	started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	heartbeat_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id)
);

CREATE TABLE aioasync_schema_version (
	version INTEGER NOT NULL, 
	applied_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (version)
);

CREATE TABLE aioasync_tasks (
	id BIGSERIAL NOT NULL, 
	type VARCHAR(200) NOT NULL, 
	user_name TEXT NOT NULL, 
	group_name TEXT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	requested VARCHAR(16), 
	context TEXT NOT NULL, 
	priority INTEGER NOT NULL, 
	attempts INTEGER NOT NULL, 
	max_attempts INTEGER NOT NULL, 
	has_cleanup BOOLEAN NOT NULL, 
	handoff BOOLEAN NOT NULL, 
	error TEXT, 
	node_id BIGINT, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	started_at TIMESTAMP WITH TIME ZONE, 
	done_at TIMESTAMP WITH TIME ZONE, 
	run_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT aioasync_tasks_state_check CHECK (state IN ('init', 'pending', 'running', 'canceling', 'paused', 'finished', 'failed', 'deleting')), 
	CONSTRAINT aioasync_tasks_requested_check CHECK ((state = 'canceling') = (requested IS NOT NULL))
);

CREATE INDEX aioasync_tasks_active_idx ON aioasync_tasks (group_name, user_name) WHERE state IN ('running', 'canceling');

CREATE INDEX aioasync_tasks_deleting_idx ON aioasync_tasks (run_at) WHERE state = 'deleting' AND node_id IS NULL;

CREATE INDEX aioasync_tasks_group_idx ON aioasync_tasks (group_name, id);

CREATE INDEX aioasync_tasks_owner_idx ON aioasync_tasks (node_id) WHERE node_id IS NOT NULL;

CREATE INDEX aioasync_tasks_queue_idx ON aioasync_tasks (group_name, user_name, handoff DESC, priority DESC, id) WHERE state = 'pending';

CREATE INDEX aioasync_tasks_ready_at_idx ON aioasync_tasks (run_at) WHERE state = 'pending';

CREATE INDEX aioasync_tasks_state_idx ON aioasync_tasks (state, id);

CREATE INDEX aioasync_tasks_user_idx ON aioasync_tasks (user_name, id);
