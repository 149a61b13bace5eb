-- Every statement the SQLite driver runs, by name (read by _backends/_queries.py).
--
-- {tasks}, {nodes}, {groups}, {schedules} and {versions} stand for the tables; {now} for the
-- fragment of that name below; {order_by} is the scheduling policy's ORDER BY (trusted code,
-- docs/design.md §6). Parameters are bound by name (:name); a list, or a batch of rows,
-- is bound as one JSON array and read with json_each, so that a statement's text never
-- depends on how many items it gets.
--
-- Every write transaction holds the database's write lock from its BEGIN IMMEDIATE: no
-- other writer interleaves, so a claim needs no row locks.
--
-- State values that a row moves between are bound parameters taken from the state table
-- (aioasync_tasks/_states.py). The literal 'pending', 'running', 'canceling' and 'deleting'
-- below only select rows, and match the predicates of the partial indexes of the migrations
-- word for word: SQLite, like PostgreSQL, uses a partial index only for a query whose WHERE
-- implies the index's own.

-- name: now
-- The database clock, as seconds since the epoch (timestamps are stored so).
((julianday('now') - 2440587.5) * 86400.0)

-- name: applied_versions
-- Every migration applied (the versions need not be contiguous: docs/design.md §4.3).
SELECT version FROM {versions} ORDER BY version

-- name: record_migration
INSERT INTO {versions} (version, applied_at) VALUES (:version, {now})

-- name: insert_task
INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,
    attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,
    run_at, trace_parent)
VALUES (:type, :user, :group, :state, NULL, :context, :priority, 0, :max_attempts,
    :has_cleanup, false, NULL, NULL, {now}, {now}, COALESCE(:run_at, {now}), :trace_parent)
RETURNING id

-- name: insert_tasks
-- Many tasks in one statement with one parameter, :rows, a JSON array of rows
-- [type, user, group, state, context, priority, max_attempts, has_cleanup, run_at,
-- trace_parent]
-- (SQLite allows 32,766 parameters; a JSON array has no such limit). Autoincrement ids follow
-- the rows' order.
INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,
    attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,
    run_at, trace_parent)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
    json_extract(value, '$[3]'), NULL, json_extract(value, '$[4]'),
    json_extract(value, '$[5]'), 0, json_extract(value, '$[6]'), json_extract(value, '$[7]'),
    false, NULL, NULL, {now}, {now}, COALESCE(json_extract(value, '$[8]'), {now}),
    json_extract(value, '$[9]')
FROM json_each(:rows) ORDER BY key
RETURNING id

-- name: insert_unique_task
-- One task with a unique key, unless a live task of its type holds that key already: then no
-- row is inserted and none returned (docs/design.md §4.4). The conflict target names the
-- partial unique index by its columns and its predicate.
INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,
    attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,
    run_at, unique_key, trace_parent)
VALUES (:type, :user, :group, :state, NULL, :context, :priority, 0, :max_attempts,
    :has_cleanup, false, NULL, NULL, {now}, {now}, COALESCE(:run_at, {now}), :unique_key, :trace_parent)
ON CONFLICT (type, unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('init', 'pending', 'running', 'canceling', 'paused')
    DO NOTHING
RETURNING id

-- name: lock_unique_task
-- The live task of :type that holds :unique_key, locked (at most one: the unique index).
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > {now} AS watched
FROM {tasks}
WHERE type = :type AND unique_key = :unique_key AND unique_key IS NOT NULL
    AND state IN ('init', 'pending', 'running', 'canceling', 'paused')

-- name: replace_task
-- on_conflict="replace": the live task that holds the key takes the new task's context and
-- options, keeps its id and state, and starts afresh (compare-and-set on state and token).
UPDATE {tasks} SET context = :context, user_name = :user, group_name = :group,
    priority = :priority, max_attempts = :max_attempts, attempts = 0, error = NULL,
    handoff = false, progress = NULL, message = NULL, run_at = COALESCE(:run_at, {now}),
    trace_parent = :trace_parent, updated_at = {now}
WHERE id = :id AND token = :token AND state = :expected
RETURNING id

-- name: unique_holder
-- The type and unique key of task :id, and the live task (another one) that holds that key.
SELECT t.type, t.unique_key, h.id AS holder, h.state AS holder_state
FROM {tasks} t
LEFT JOIN {tasks} h ON h.type = t.type AND h.unique_key = t.unique_key AND h.id <> t.id
    AND h.unique_key IS NOT NULL AND h.state IN ('init', 'pending', 'running', 'canceling', 'paused')
WHERE t.id = :id

-- name: get_task
SELECT id, type, user_name, group_name, state, requested, context, priority, attempts,
    max_attempts, error, node_id, created_at, updated_at, started_at, done_at, run_at,
    unique_key, progress, message
FROM {tasks} WHERE id = :id

-- name: lock_tasks
-- Rows about to be changed by the state rules (the write lock is held already).
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > {now} AS watched
FROM {tasks} WHERE id IN (SELECT value FROM json_each(:ids)) ORDER BY id

-- name: lock_owned_tasks
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > {now} AS watched
FROM {tasks} WHERE id IN (SELECT value FROM json_each(:ids)) AND node_id = :owner ORDER BY id

-- name: lock_tasks_of_nodes
-- The tasks of dead or departing nodes, and (:orphans) every owned task whose node row is gone.
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > {now} AS watched
FROM {tasks}
WHERE node_id IN (SELECT value FROM json_each(:nodes))
    OR (:orphans AND node_id IS NOT NULL
        AND NOT EXISTS (SELECT 1 FROM {nodes} n WHERE n.id = {tasks}.node_id))
ORDER BY id

-- name: lock_running_in_group
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > {now} AS watched
FROM {tasks} WHERE group_name = :group AND state = :state ORDER BY id

-- name: update_task
-- The state rules' decision for one row, written only if the row is still as it was read:
-- same state, same claim token (compare-and-set). A negative :delay keeps run_at.
UPDATE {tasks} SET state = :state, requested = :requested, node_id = :node_id,
    attempts = :attempts, handoff = :handoff, group_name = :group,
    context = COALESCE(:context, context), error = COALESCE(:error, error),
    progress = COALESCE(:progress, progress), message = COALESCE(:message, message),
    run_at = CASE WHEN :delay < 0 THEN run_at ELSE {now} + :delay END,
    done_at = CASE WHEN :done THEN {now} ELSE done_at END,
    updated_at = {now}
WHERE id = :id AND token = :token AND state = :expected

-- name: delete_tasks
DELETE FROM {tasks} WHERE id IN (SELECT value FROM json_each(:ids))

-- name: lock_group
-- The write lock already orders this transaction after every other writer.
SELECT name FROM {groups} WHERE name = :name

-- name: claim_prepare
-- One statement before a claim (docs/design.md §6.3, §6.8), under the write lock: whether our
-- node row exists (fencing: a node declared dead claims nothing; the write lock does what
-- PostgreSQL's group row locks do for the limits), the claim's window of queues, and the
-- seconds until the next delayed task of :types is due (NULL: none). One row per queue of the
-- window, in the walk's order (none: one row, no queue).
--
-- The window: up to :window queues with pending tasks. The walk goes through the open groups
-- (not paused, with room under max_running and, unless :all_groups, in :groups) in name
-- order, starting after :after_group, round past the last to the first and no further than
-- :after_group. In each group it walks the users after the group's cursor (:cursor_groups,
-- :cursor_users), then from its first user up to the cursor (`lap`), through no more of them
-- than the group has room for (`quota`: each queue gives a task at least). Each step is one
-- seek of the queue index (SQLite seeks a row-value range on its first column only: hence a
-- group, then a user range): the cost is bounded by :window whatever the number of queues.
WITH RECURSIVE
pending_groups(name) AS (
    SELECT (SELECT group_name FROM {tasks} INDEXED BY aioasync_tasks_queue_idx
        WHERE state = 'pending' ORDER BY group_name LIMIT 1)
    UNION ALL
    SELECT (SELECT group_name FROM {tasks} INDEXED BY aioasync_tasks_queue_idx
        WHERE state = 'pending' AND group_name > g.name ORDER BY group_name LIMIT 1)
    FROM pending_groups g WHERE g.name IS NOT NULL
),
cursors(group_name, user_name) AS (
    SELECT g.value, u.value FROM json_each(:cursor_groups) g
    JOIN json_each(:cursor_users) u ON u.key = g.key
),
-- What runs in a group (n) is counted only for a group with max_running, in the group's
-- entries of the active index: the claim's cost does not grow with what runs elsewhere.
open_groups AS MATERIALIZED (
    SELECT name, after_user, COALESCE(min(max_running - n, :window), :window) AS quota
    FROM (
        SELECT p.name, c.user_name AS after_user, g.max_running,
            CASE WHEN g.max_running IS NULL THEN 0 ELSE (
                SELECT count(*) FROM {tasks} INDEXED BY aioasync_tasks_active_idx
                WHERE state IN ('running', 'canceling') AND group_name = p.name) END AS n
        FROM pending_groups p
        LEFT JOIN {groups} g ON g.name = p.name
        LEFT JOIN cursors c ON c.group_name = p.name
        WHERE p.name IS NOT NULL AND NOT COALESCE(g.paused, false)
            AND (:all_groups OR p.name IN (SELECT value FROM json_each(:groups))))
    WHERE max_running IS NULL OR max_running > n
),
-- A step is the next user of the same group while it has room (a: after the cursor, then
-- from the first user up to it), else the first queue of the next open group, or once of the
-- first open group (b, of the group nx). k: the queues taken from the step's group so far
-- (the first row: none, and no room left); lap: the group's walk is past its last user.
walk(group_name, user_name, n, k, lap, wrapped) AS (
    SELECT :after_group, '', 0, :window, false, false
    UNION ALL
    SELECT COALESCE(a.group_name, b.group_name), COALESCE(a.user_name, b.user_name), w.n + 1,
        CASE WHEN a.id IS NOT NULL THEN w.k + 1 ELSE 1 END,
        CASE WHEN a.id IS NOT NULL THEN w.lap OR a.user_name < w.user_name
            ELSE COALESCE(b.user_name <= nx.after_user, false) END,
        w.wrapped OR (a.id IS NULL AND nx.name <= w.group_name)
    FROM walk w
    LEFT JOIN open_groups cur ON cur.name = w.group_name AND w.k < cur.quota
    LEFT JOIN {tasks} a ON a.id = CASE WHEN NOT w.lap THEN COALESCE(
            (SELECT id FROM {tasks} INDEXED BY aioasync_tasks_queue_idx
             WHERE state = 'pending' AND group_name = cur.name AND user_name > w.user_name
             ORDER BY group_name, user_name LIMIT 1),
            (SELECT id FROM {tasks} INDEXED BY aioasync_tasks_queue_idx
             WHERE state = 'pending' AND group_name = cur.name AND user_name <= cur.after_user
             ORDER BY group_name, user_name LIMIT 1))
        ELSE (SELECT id FROM {tasks} INDEXED BY aioasync_tasks_queue_idx
             WHERE state = 'pending' AND group_name = cur.name AND user_name > w.user_name
                AND user_name <= cur.after_user
             ORDER BY group_name, user_name LIMIT 1) END
    LEFT JOIN open_groups nx ON a.id IS NULL AND nx.name = COALESCE(
        (SELECT min(name) FROM open_groups WHERE name > w.group_name),
        CASE WHEN NOT w.wrapped THEN (SELECT min(name) FROM open_groups) END)
    LEFT JOIN {tasks} b ON b.id = COALESCE(
        (SELECT id FROM {tasks} INDEXED BY aioasync_tasks_queue_idx
         WHERE state = 'pending' AND group_name = nx.name AND user_name > nx.after_user
         ORDER BY group_name, user_name LIMIT 1),
        (SELECT id FROM {tasks} INDEXED BY aioasync_tasks_queue_idx
         WHERE state = 'pending' AND group_name = nx.name
         ORDER BY group_name, user_name LIMIT 1))
    WHERE w.n < :window AND (a.id IS NOT NULL OR b.id IS NOT NULL)
        AND (NOT (w.wrapped OR (a.id IS NULL AND nx.name <= w.group_name))
            OR COALESCE(a.group_name, b.group_name) <= :after_group)
),
due AS (
    SELECT min(run_at) - {now} AS next_due FROM {tasks} INDEXED BY aioasync_tasks_ready_at_idx
    WHERE state = 'pending' AND run_at > {now}
        AND type IN (SELECT value FROM json_each(:types))
)
SELECT (SELECT count(*) FROM {nodes} WHERE id = :node) AS registered, due.next_due,
    w.group_name, w.user_name
FROM due LEFT JOIN walk w ON w.n > 0
ORDER BY w.n

-- name: claim
-- Up to :limit due tasks of :types in the queues of the window (:window_groups,
-- :window_users: claim_window), in the policy's order, skipping paused groups and never
-- exceeding a group's limits (docs/design.md §6).
-- Without statistics SQLite may pick the (state, id) index and sort the whole backlog:
-- the queue index is named where it must be used.
WITH
pairs(group_name, user_name) AS (
    SELECT g.value, u.value FROM json_each(:window_groups) g
    JOIN json_each(:window_users) u ON u.key = g.key
),
-- What runs now (all nodes) in each group of the window that has max_running, and in each
-- queue of the window: counted there alone, once each, in the active index, so that the
-- claim's cost does not grow with what runs in other queues and groups.
group_active AS MATERIALIZED (
    SELECT w.group_name,
        (SELECT count(*) FROM {tasks} INDEXED BY aioasync_tasks_active_idx
         WHERE state IN ('running', 'canceling') AND group_name = w.group_name) AS n
    FROM (SELECT DISTINCT group_name FROM pairs) w
    JOIN {groups} g ON g.name = w.group_name AND g.max_running IS NOT NULL
),
pair_active AS MATERIALIZED (
    SELECT p.group_name, p.user_name,
        (SELECT count(*) FROM {tasks} INDEXED BY aioasync_tasks_active_idx
         WHERE state IN ('running', 'canceling') AND group_name = p.group_name
            AND user_name = p.user_name) AS n
    FROM pairs p
),
-- Queues their group lets run: not paused, below both limits.
open_pairs AS (
    SELECT p.group_name, p.user_name, p.n AS user_running,
        g.max_running - COALESCE(ga.n, 0) AS group_room,
        g.max_running_per_user - p.n AS user_room
    FROM pair_active p
    LEFT JOIN {groups} g ON g.name = p.group_name
    LEFT JOIN group_active ga ON ga.group_name = p.group_name
    WHERE NOT COALESCE(g.paused, false)
        AND (:all_groups OR p.group_name IN (SELECT value FROM json_each(:groups)))
        AND (g.max_running IS NULL OR g.max_running > COALESCE(ga.n, 0))
        AND (g.max_running_per_user IS NULL OR g.max_running_per_user > p.n)
),
-- Each open queue's first due task; the best :pool queues hold the best tasks.
heads AS (
    SELECT h.id, h.handoff, h.priority, h.run_at, h.group_name, h.user_name,
        op.user_running, 1 AS user_rank
    FROM open_pairs op JOIN {tasks} h ON h.id = (
        SELECT id FROM {tasks} INDEXED BY aioasync_tasks_queue_idx
        WHERE state = 'pending' AND run_at <= {now}
            AND type IN (SELECT value FROM json_each(:types))
            AND group_name = op.group_name AND user_name = op.user_name
        ORDER BY handoff DESC, priority DESC, id LIMIT 1)
),
top_pairs AS (SELECT group_name, user_name FROM heads ORDER BY {order_by} LIMIT :pool),
-- Up to :pool due tasks of each of those queues, ranked within their queue. No LATERAL in
-- SQLite: a correlated `id IN (… LIMIT n)` looks the rows up by id.
candidates AS (
    SELECT c.id, c.handoff, c.priority, c.run_at, c.group_name, c.user_name, op.user_running,
        op.group_room, op.user_room,
        row_number() OVER (PARTITION BY c.group_name, c.user_name
            ORDER BY c.handoff DESC, c.priority DESC, c.id) AS user_rank
    FROM top_pairs tp
    JOIN open_pairs op ON op.group_name = tp.group_name AND op.user_name = tp.user_name
    JOIN {tasks} c ON c.id IN (
        SELECT id FROM {tasks} INDEXED BY aioasync_tasks_queue_idx
        WHERE state = 'pending' AND run_at <= {now}
            AND type IN (SELECT value FROM json_each(:types))
            AND group_name = op.group_name AND user_name = op.user_name
        ORDER BY handoff DESC, priority DESC, id LIMIT :pool)
),
-- The limits, applied in policy order.
allowed AS (
    SELECT id, handoff, priority, run_at, group_name, user_name, user_running, user_rank,
        group_room,
        row_number() OVER (PARTITION BY group_name ORDER BY {order_by}) AS group_rank
    FROM candidates WHERE user_room IS NULL OR user_rank <= user_room
),
chosen AS (
    SELECT id, group_name, row_number() OVER (ORDER BY {order_by}) AS pick
    FROM allowed WHERE group_room IS NULL OR group_rank <= group_room
    ORDER BY {order_by} LIMIT :pool
)
UPDATE {tasks} SET state = :to_state, node_id = :node, attempts = attempts + 1,
    token = token + 1, handoff = false, started_at = COALESCE(started_at, {now}),
    updated_at = {now}
WHERE id IN (
    SELECT id FROM chosen WHERE id NOT IN (SELECT value FROM json_each(:busy))
    ORDER BY pick LIMIT :limit)
    AND state = :from_state
RETURNING id, type, user_name, group_name, context, attempts, max_attempts, handoff, priority,
    token, watched_until > {now} AS watched, {now} - run_at AS waited, trace_parent

-- name: claim_cleanups
-- Unowned, due DELETING tasks, to run their cleanup handler, taken only while our node's row
-- exists (fencing: a node declared dead claims nothing more under its old id; the write lock
-- of the transaction keeps the row as it was read).
UPDATE {tasks} SET state = :to_state, node_id = :node, attempts = attempts + 1,
    token = token + 1, updated_at = {now}
WHERE id IN (
    SELECT id FROM {tasks}
    WHERE state = 'deleting' AND node_id IS NULL AND run_at <= {now}
        AND type IN (SELECT value FROM json_each(:types))
        AND id NOT IN (SELECT value FROM json_each(:busy))
        AND EXISTS (SELECT 1 FROM {nodes} WHERE id = :node)
    ORDER BY run_at, id LIMIT :limit)
    AND state = :from_state
RETURNING id, type, user_name, group_name, context, attempts, max_attempts, handoff, priority,
    token, watched_until > {now} AS watched, {now} - run_at AS waited, trace_parent

-- name: checkpoint
-- Many checkpoints in one statement, :rows a JSON array of [id, token, context, progress,
-- message], each written only under its execution's claim token; a null keeps the stored
-- value (docs/design.md §2.6). MATERIALIZED: the batch is read once, and each of its rows
-- finds its task by id; unmaterialized, it was read again for each task the owner index
-- found, n² for a batch of n (docs/design.md §15).
WITH v(id, token, context, progress, message) AS MATERIALIZED (
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),
        json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]')
    FROM json_each(:rows))
UPDATE {tasks} SET context = COALESCE(v.context, {tasks}.context),
    progress = COALESCE(v.progress, {tasks}.progress),
    message = COALESCE(v.message, {tasks}.message), updated_at = {now} FROM v
WHERE {tasks}.id = v.id AND {tasks}.token = v.token AND node_id = :node
    AND state IN (SELECT value FROM json_each(:states))
RETURNING {tasks}.id, {tasks}.watched_until > {now} AS watched

-- name: register_node
INSERT INTO {nodes} (name, concurrency, types, started_at, heartbeat_at, heartbeat_interval,
    node_timeout)
VALUES (:name, :concurrency, :types, {now}, {now}, :heartbeat_interval, :node_timeout)
RETURNING id

-- name: heartbeat
UPDATE {nodes} SET heartbeat_at = {now} WHERE id = :node RETURNING id

-- name: owned_tasks
SELECT id, state, requested, token FROM {tasks} WHERE node_id = :node

-- name: dead_nodes
-- Other nodes whose heartbeat is older than their own node_timeout (the database's clock).
SELECT id FROM {nodes} WHERE id <> :node AND heartbeat_at < {now} - node_timeout ORDER BY id

-- name: delete_nodes
DELETE FROM {nodes} WHERE id IN (SELECT value FROM json_each(:nodes))

-- name: get_nodes
SELECT id, name, concurrency, types, started_at, heartbeat_at, heartbeat_interval,
    node_timeout
FROM {nodes} ORDER BY id

-- name: create_group
-- An upsert: two nodes setting a new group at once both succeed, one after the other.
INSERT INTO {groups} (name, paused, max_running, max_running_per_user, updated_at)
VALUES (:name, false, NULL, NULL, {now})
ON CONFLICT (name) DO NOTHING

-- name: lock_group_settings
SELECT paused, max_running, max_running_per_user FROM {groups} WHERE name = :name

-- name: update_group
UPDATE {groups} SET paused = :paused, max_running = :max_running,
    max_running_per_user = :max_running_per_user, updated_at = {now}
WHERE name = :name

-- name: get_groups
-- Every group that has tasks or settings, with its settings (NULL when unset).
SELECT n.name, g.paused, g.max_running, g.max_running_per_user
FROM (SELECT name FROM {groups} UNION SELECT DISTINCT group_name FROM {tasks}) n
LEFT JOIN {groups} g ON g.name = n.name
ORDER BY n.name

-- name: db_now
-- The database clock (times a bulk delete compares with are taken from it).
SELECT {now}

-- name: stats_by_group_and_state
-- The dashboard's counts: tasks by group and state.
SELECT group_name, state, count(*) AS tasks FROM {tasks} GROUP BY group_name, state

-- name: stats_running
-- The tasks each node runs now (RUNNING or CANCELING), by node.
SELECT node_id, count(*) AS tasks FROM {tasks}
WHERE node_id IS NOT NULL AND state IN ('running', 'canceling')
GROUP BY node_id

-- name: stats_ended
-- The tasks that ended (FINISHED, FAILED) since :since, by state: a range of the done index
-- (its predicate, done_at IS NOT NULL, is implied by done_at >= …).
SELECT state, count(*) AS tasks FROM {tasks}
WHERE state IN ('finished', 'failed') AND done_at >= :since
GROUP BY state

-- name: prune
-- Up to :limit tasks in :state (FINISHED or FAILED) that ended more than :age seconds ago,
-- oldest first, removed (one pruner at a time: the write lock). done_at < … implies the done
-- index's predicate (done_at IS NOT NULL).
DELETE FROM {tasks} WHERE id IN (
    SELECT id FROM {tasks}
    WHERE state = :state AND done_at < {now} - :age
    ORDER BY state, done_at LIMIT :limit)

-- name: delete_group
-- A group back to the default settings has no row (docs/design.md §4.5).
DELETE FROM {groups} WHERE name = :name

-- name: register_task_types
-- The task types a worker runs, :rows a JSON array of [name, max_attempts, has_cleanup],
-- stored or updated (the last worker to start wins). (WHERE true: SQLite's upsert after a
-- SELECT needs one.)
INSERT INTO {task_types} (name, max_attempts, has_cleanup, updated_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
    {now}
FROM json_each(:rows) WHERE true
ON CONFLICT (name) DO UPDATE SET max_attempts = excluded.max_attempts,
    has_cleanup = excluded.has_cleanup, updated_at = excluded.updated_at

-- name: get_task_types
-- The stored task types named in :names (all of them with :all), by name.
SELECT name, max_attempts, has_cleanup, updated_at FROM {task_types}
WHERE :all OR name IN (SELECT value FROM json_each(:names))
ORDER BY name
-- name: schedule_columns
-- The columns of a schedule as _rows.schedule reads them (a fragment).
name, type, cron, every, timezone, context, user_name, group_name, priority, max_attempts,
    declared, next_tick, last_tick, last_task_id, created_at, updated_at

-- name: put_schedule
-- Create or replace a schedule (docs/design.md §17). Its next tick is kept unless its period
-- changed: a node that declares its types' schedules at start moves nothing.
INSERT INTO {schedules} (name, type, cron, every, timezone, context, user_name,
    group_name, priority, max_attempts, declared, next_tick, last_tick, last_task_id,
    created_at, updated_at)
VALUES (:name, :type, :cron, :every, :timezone, :context, :user, :group, :priority,
    :max_attempts, :declared, :next_tick, NULL, NULL, {now}, {now})
ON CONFLICT (name) DO UPDATE SET type = excluded.type, cron = excluded.cron,
    every = excluded.every, timezone = excluded.timezone, context = excluded.context,
    user_name = excluded.user_name, group_name = excluded.group_name,
    priority = excluded.priority, max_attempts = excluded.max_attempts,
    declared = excluded.declared,
    next_tick = CASE WHEN {schedules}.cron IS excluded.cron
            AND {schedules}.every IS excluded.every
            AND {schedules}.timezone = excluded.timezone
        THEN {schedules}.next_tick ELSE excluded.next_tick END,
    updated_at = {now}
RETURNING {schedule_columns}

-- name: delete_schedule
DELETE FROM {schedules} WHERE name = :name RETURNING name

-- name: get_schedules
SELECT {schedule_columns} FROM {schedules} ORDER BY name

-- name: lock_due_schedules
-- The due schedules of :types, with the database's clock (the write lock is held already).
SELECT {schedule_columns}, {now} AS now FROM {schedules}
WHERE next_tick <= {now} AND type IN (SELECT value FROM json_each(:types))
ORDER BY next_tick, name LIMIT :limit

-- name: advance_schedule
-- Compare-and-set: the schedule moves on only from the next tick it was read with, in the
-- transaction that inserts the tick's task (each tick is enqueued once).
UPDATE {schedules} SET next_tick = :next_tick, last_tick = :tick, last_task_id = :task_id,
    updated_at = {now}
WHERE name = :name AND next_tick = :expected
RETURNING name

-- name: next_schedule_due
-- Seconds until the next tick of the schedules of :types (NULL: there are none).
SELECT min(next_tick) - {now} FROM {schedules}
WHERE type IN (SELECT value FROM json_each(:types))
