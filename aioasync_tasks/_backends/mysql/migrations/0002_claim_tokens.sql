-- aioasync_tasks schema version 2 (mysql): claim tokens and each node's own liveness settings.
-- token: raised by every claim (run or cleanup); every later write of that execution must match it.
-- heartbeat_interval, node_timeout: a node is judged dead by its own settings, not the rescuer's.

ALTER TABLE aioasync_tasks ADD COLUMN token INTEGER DEFAULT 0 NOT NULL;

ALTER TABLE aioasync_nodes ADD COLUMN heartbeat_interval DOUBLE DEFAULT 5.0 NOT NULL;

ALTER TABLE aioasync_nodes ADD COLUMN node_timeout DOUBLE DEFAULT 30.0 NOT NULL;
