-- aioasync_tasks schema version 6 (mysql only: PostgreSQL and SQLite have no version 6): the
-- claim's indexes lead with the state.
-- MySQL has no partial indexes. The queue index of the other databases holds the PENDING rows
-- only, and the active index the RUNNING and CANCELING ones; here both held every row, so a
-- claim walking a queue read its finished history too, and finding the queues with pending
-- tasks read every pending row. With the state first, each is the range its partial index is
-- elsewhere: the claim finds the queues by a loose scan of (state, group, user), one seek per
-- queue, and reads each queue's first tasks in order from (state, group, user, handoff DESC,
-- priority DESC, id), stopping after as many as it may take (docs/design.md §4.2, §16.1).
-- One ALTER TABLE: one rebuild of the table, and nothing half-done if it fails (MySQL commits
-- at every DDL statement).

ALTER TABLE aioasync_tasks
	DROP INDEX aioasync_tasks_queue_idx,
	ADD INDEX aioasync_tasks_queue_idx (state, group_name, user_name, handoff DESC, priority DESC, id),
	DROP INDEX aioasync_tasks_active_idx,
	ADD INDEX aioasync_tasks_active_idx (state, group_name, user_name);
