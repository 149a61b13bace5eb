-- Every statement the MySQL driver runs, by name (read by _backends/_queries.py). One file for
-- MySQL 8 and MariaDB 10.6 or newer.
--
-- {tasks}, {nodes}, {groups}, {task_types}, {schedules} and {versions} stand for the tables; {now} for the fragment of
-- that name below; {order_by} is the scheduling policy's ORDER BY (trusted code,
-- docs/design.md §6). Parameters are bound by name (:name). A list, or a batch of rows, is
-- bound as one JSON array and read with JSON_TABLE, so that a statement's text never depends
-- on how many items it gets (but for the queues a claim reads: {queues}, in the claim
-- statement); strings read from it are utf8mb4 with the tables' binary collation.
--
-- Neither MySQL nor MariaDB has UPDATE … RETURNING, and MariaDB has no LATERAL: the driver
-- (mysql/__init__.py) runs a claim, a cleanup claim and a checkpoint as a locking SELECT of
-- the rows it will change, the UPDATE, and a SELECT of what it changed, in one transaction
-- (docs/design.md §16). Our write transactions run under READ COMMITTED: each statement reads
-- what committed before it began, and locking reads take no gap locks.
--
-- State values that a row moves between are bound parameters taken from the state table
-- (aioasync_tasks/_states.py); the literal states below only select rows.

-- name: now
-- The database clock, in UTC whatever the session's time zone (timestamps are stored so).
UTC_TIMESTAMP(6)

-- name: applied_versions
-- Every migration applied (the versions need not be contiguous: docs/design.md §4.3).
SELECT version FROM {versions} ORDER BY version

-- name: migration_lock
-- Concurrent migrations of one database run one after the other. A lock of the session, not of
-- the transaction: MySQL commits at every DDL statement. Waits up to :timeout seconds.
SELECT GET_LOCK(:key, :timeout)

-- name: migration_unlock
SELECT RELEASE_LOCK(:key)

-- name: record_migration
INSERT INTO {versions} (version, applied_at) VALUES (:version, {now})

-- name: insert_task
-- The new id is the cursor's last insert id.
INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,
    attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,
    run_at, trace_parent)
VALUES (:type, :user, :group, :state, NULL, :context, :priority, 0, :max_attempts,
    :has_cleanup, false, NULL, NULL, {now}, {now}, COALESCE(:run_at, {now}), :trace_parent)

-- name: insert_tasks
-- MariaDB only (INSERT … RETURNING): many tasks in one statement with one parameter, :rows, a
-- JSON array of rows [type, user, group, state, context, priority, max_attempts, has_cleanup,
-- run_at, trace_parent], inserted in the array's order. MySQL 8 inserts them one by one (insert_task).
INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,
    attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,
    run_at, trace_parent)
SELECT v.type, v.user_name, v.group_name, v.state, NULL, v.context, v.priority, 0,
    v.max_attempts, v.has_cleanup, false, NULL, NULL, {now}, {now},
    COALESCE(v.run_at, {now}), v.trace_parent
FROM JSON_TABLE(:rows, '$[*]' COLUMNS (
    ord FOR ORDINALITY,
    type VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[0]',
    user_name VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]',
    group_name VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[2]',
    state VARCHAR(16) CHARACTER SET utf8mb4 PATH '$[3]',
    context LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[4]',
    priority INTEGER PATH '$[5]',
    max_attempts INTEGER PATH '$[6]',
    has_cleanup BOOL PATH '$[7]',
    run_at DATETIME(6) PATH '$[8]',
    trace_parent VARCHAR(55) CHARACTER SET utf8mb4 PATH '$[9]')) AS v
ORDER BY v.ord
RETURNING id

-- name: insert_unique_task
-- One task with a unique key. MySQL has no partial index to name in a conflict target: when
-- a live task of its type holds the key already, the unique index on (type, live_key) refuses
-- the row (error 1062, which undoes this statement only) and the driver reads the holder
-- (docs/design.md §4.4, §16.1). The new id is the cursor's last insert id.
INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,
    attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,
    run_at, unique_key, trace_parent)
VALUES (:type, :user, :group, :state, NULL, :context, :priority, 0, :max_attempts,
    :has_cleanup, false, NULL, NULL, {now}, {now}, COALESCE(:run_at, {now}), :unique_key, :trace_parent)

-- name: lock_unique_task
-- The live task of :type that holds :unique_key, locked (at most one: the unique index on
-- (type, live_key); live_key is unique_key while the task is INIT, PENDING, RUNNING, CANCELING
-- or PAUSED, NULL otherwise).
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > {now} AS watched
FROM {tasks}
WHERE type = :type AND live_key = :unique_key
FOR UPDATE

-- name: replace_task
-- on_conflict="replace": the live task that holds the key takes the new task's context and
-- options, keeps its id and state, and starts afresh (compare-and-set on state and token;
-- matched rows, as the dialect counts them).
UPDATE {tasks} SET context = :context, user_name = :user, group_name = :group,
    priority = :priority, max_attempts = :max_attempts, attempts = 0, error = NULL,
    handoff = false, progress = NULL, message = NULL, run_at = COALESCE(:run_at, {now}),
    trace_parent = :trace_parent, updated_at = {now}
WHERE id = :id AND token = :token AND state = :expected

-- name: unique_holder
-- The type and unique key of task :id, and the live task (another one) that holds that key.
SELECT t.type, t.unique_key, h.id AS holder, h.state AS holder_state
FROM {tasks} t
LEFT JOIN {tasks} h ON h.type = t.type AND h.live_key = t.unique_key AND h.id <> t.id
WHERE t.id = :id

-- name: unique_key_locks
-- Creators of the same (type, unique key) one after the other (docs/design.md §4.4): a named
-- lock of the session per key (:keys, a JSON array of lock names, sorted), each waited for up
-- to :timeout seconds; 1 per lock taken. The driver releases them once its inserts are done.
SELECT GET_LOCK(l.k, :timeout) AS got
FROM JSON_TABLE(:keys, '$[*]' COLUMNS (ord FOR ORDINALITY,
    k VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS l
ORDER BY l.ord

-- name: unique_key_unlocks
SELECT RELEASE_LOCK(l.k) AS released
FROM JSON_TABLE(:keys, '$[*]' COLUMNS (
    k VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS l

-- name: get_task
SELECT id, type, user_name, group_name, state, requested, context, priority, attempts,
    max_attempts, error, node_id, created_at, updated_at, started_at, done_at, run_at,
    unique_key, progress, message
FROM {tasks} WHERE id = :id

-- name: lock_tasks
-- Rows about to be changed by the state rules, locked in id order (no deadlocks).
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > {now} AS watched
FROM {tasks}
WHERE id IN (SELECT v FROM JSON_TABLE(:ids, '$[*]' COLUMNS (v BIGINT PATH '$')) AS l)
ORDER BY id FOR UPDATE

-- name: lock_owned_tasks
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > {now} AS watched
FROM {tasks}
WHERE id IN (SELECT v FROM JSON_TABLE(:ids, '$[*]' COLUMNS (v BIGINT PATH '$')) AS l)
    AND node_id = :owner
ORDER BY id FOR UPDATE

-- name: lock_tasks_of_nodes
-- The tasks of dead or departing nodes, and (:orphans) every owned task whose node row is gone.
-- `node_id IS NOT NULL` first: the owned rows are one range of the owner index (with the two
-- cases OR-ed at the top, MariaDB read, and locked, every row of the table).
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > {now} AS watched
FROM {tasks} t
WHERE node_id IS NOT NULL
    AND (node_id IN (SELECT v FROM JSON_TABLE(:nodes, '$[*]' COLUMNS (v BIGINT PATH '$')) AS l)
        OR (:orphans AND NOT EXISTS (SELECT 1 FROM {nodes} n WHERE n.id = t.node_id)))
ORDER BY id FOR UPDATE

-- name: lock_running_in_group
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > {now} AS watched
FROM {tasks} WHERE group_name = :group AND state = :state ORDER BY id FOR UPDATE

-- name: update_task
-- The state rules' decision for one locked row, written only if the row is still as it was
-- read: same state, same claim token (compare-and-set). A negative :delay keeps run_at.
-- (MySQL assigns left to right, each assignment seeing the ones before it: no assignment
-- here reads a column assigned before it.)
UPDATE {tasks} SET state = :state, requested = :requested, node_id = :node_id,
    attempts = :attempts, handoff = :handoff, group_name = :group,
    context = COALESCE(:context, context), error = COALESCE(:error, error),
    progress = COALESCE(:progress, progress), message = COALESCE(:message, message),
    run_at = CASE WHEN :delay < 0 THEN run_at
        ELSE {now} + INTERVAL ROUND(:delay * 1000000) MICROSECOND END,
    done_at = CASE WHEN :done THEN {now} ELSE done_at END,
    updated_at = {now}
WHERE id = :id AND token = :token AND state = :expected

-- name: delete_tasks
-- (A join by the primary key, as take_claims.)
DELETE t FROM {tasks} t
JOIN JSON_TABLE(:ids, '$[*]' COLUMNS (v BIGINT PATH '$')) AS l ON t.id = l.v

-- name: lock_group
-- Taken in the order claims take it (group, then task).
SELECT name FROM {groups} WHERE name = :name FOR UPDATE

-- name: claim_prepare
-- Fencing: share-lock our node row until the commit (a node declared dead claims nothing; a
-- rescuer's FOR UPDATE SKIP LOCKED passes it by meanwhile).
SELECT count(*) AS registered FROM {nodes} WHERE id = :node LOCK IN SHARE MODE

-- name: lock_limited_groups
-- Then the rows of the groups with limits among those of the claim's window (:window_groups),
-- in name order, so that claimers that could exceed a limit run one after the other, and the
-- statements that follow (fresh snapshots under READ COMMITTED) count every task the previous
-- one took. The claim takes from the window's queues only: the groups it takes from are
-- locked, and no others. InnoDB locks rows as it reads them, before any ORDER BY: the groups
-- are read in primary-key order, the window a condition on each row (a join with the list
-- would read them in the window's order, and two claimers could lock two groups each in the
-- other's order: a deadlock).
SELECT name FROM {groups} FORCE INDEX (PRIMARY)
WHERE (max_running IS NOT NULL OR max_running_per_user IS NOT NULL)
    AND JSON_CONTAINS(:window_groups, JSON_QUOTE(name))
ORDER BY name FOR UPDATE

-- name: claim_groups
-- The open groups a claim's window walks (docs/design.md §6.3, §16.1): with pending tasks (a
-- loose scan of the active index, one seek per group), not paused, with room under
-- max_running and, unless :all_groups, in :groups; in name order, each with the number of its
-- queues the window may take (`quota`: its room, at most :window: each queue gives a task at
-- least) and whether it comes after :after_group in the walk (`later`).
WITH
pending_groups AS (
    SELECT group_name AS name FROM {tasks} FORCE INDEX (aioasync_tasks_active_idx)
    WHERE state = 'pending' GROUP BY state, group_name
),
group_running AS (
    SELECT group_name, count(*) AS n FROM {tasks}
    WHERE state IN ('running', 'canceling') GROUP BY group_name
)
SELECT p.name, COALESCE(LEAST(g.max_running - COALESCE(r.n, 0), :window), :window) AS quota,
    p.name > :after_group AS later
FROM pending_groups p
LEFT JOIN {groups} g ON g.name = p.name
LEFT JOIN group_running r ON r.group_name = p.name
WHERE NOT COALESCE(g.paused, false)
    AND (:all_groups OR p.name IN (SELECT v FROM JSON_TABLE(:groups, '$[*]'
        COLUMNS (v VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS gl))
    AND (g.max_running IS NULL OR g.max_running > COALESCE(r.n, 0))
ORDER BY p.name

-- name: claim_window
-- The queues of a claim's window (docs/design.md §6.3, §16.1): {queues} is one
-- claim_window_queue per group the walk reaches, numbered in the walk's order; the driver
-- keeps up to the group's quota of each, the users after the group's cursor first, and stops
-- at :window queues in all. (MariaDB plans a correlated subquery once, with the equality
-- prefix of the index and not its range: a recursive walk read a whole group at every step.)
SELECT g, lap, group_name, user_name FROM ({queues}) w ORDER BY g, lap, user_name

-- name: claim_window_queue
-- One group of a claim's window (a fragment: {n} is its place in the walk): up to
-- :quota_{n} of the queues of :group_{n} after its cursor :after_{n} (lap 0), and up to
-- :quota_{n} from its first user up to the cursor (lap 1), each a loose scan of the active
-- index (state, group, user) that stops after as many. A group without a cursor has "": its
-- user "" comes last.
(SELECT {n} AS g, 0 AS lap, group_name, user_name
 FROM {tasks} FORCE INDEX (aioasync_tasks_active_idx)
 WHERE state = 'pending' AND group_name = :group_{n} AND user_name > :after_{n}
 GROUP BY state, group_name, user_name ORDER BY state, group_name, user_name
 LIMIT :quota_{n})
UNION ALL
(SELECT {n}, 1, group_name, user_name
 FROM {tasks} FORCE INDEX (aioasync_tasks_active_idx)
 WHERE state = 'pending' AND group_name = :group_{n} AND user_name <= :after_{n}
 GROUP BY state, group_name, user_name ORDER BY state, group_name, user_name
 LIMIT :quota_{n})

-- name: claim_queues
-- The first step of a claim: the (group, user) queues it reads, at most :pool of them, with
-- what their group lets them take. The queues are those of the claim's window
-- (:window_groups, :window_users: claim_window); the open ones (below both limits) are judged
-- by their first due task of :types, read from the queue index, and the best :pool by the
-- policy's order hold the best tasks (docs/design.md §6.3, §16.1).
WITH
pairs AS (
    SELECT wg.v AS group_name, wu.v AS user_name
    FROM JSON_TABLE(:window_groups, '$[*]' COLUMNS (i FOR ORDINALITY,
        v VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS wg
    JOIN JSON_TABLE(:window_users, '$[*]' COLUMNS (i FOR ORDINALITY,
        v VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS wu ON wu.i = wg.i
),
-- What runs now, per queue and per group (all nodes).
active AS (
    SELECT group_name, user_name, count(*) AS n FROM {tasks}
    WHERE state IN ('running', 'canceling') GROUP BY group_name, user_name
),
group_active AS (SELECT group_name, sum(n) AS n FROM active GROUP BY group_name),
-- Queues their group lets run: not paused, below both limits.
open_pairs AS (
    SELECT p.group_name, p.user_name, COALESCE(a.n, 0) AS user_running,
        g.max_running - COALESCE(ga.n, 0) AS group_room,
        g.max_running_per_user - COALESCE(a.n, 0) AS user_room
    FROM pairs p
    LEFT JOIN {groups} g ON g.name = p.group_name
    LEFT JOIN active a ON a.group_name = p.group_name AND a.user_name = p.user_name
    LEFT JOIN group_active ga ON ga.group_name = p.group_name
    WHERE NOT COALESCE(g.paused, false)
        AND (:all_groups OR p.group_name IN (SELECT v FROM JSON_TABLE(:groups, '$[*]'
            COLUMNS (v VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS gl))
        AND (g.max_running IS NULL OR g.max_running > COALESCE(ga.n, 0))
        AND (g.max_running_per_user IS NULL OR g.max_running_per_user > COALESCE(a.n, 0))
),
-- Each open queue's first due task (none: the queue has nothing to give).
firsts AS (
    SELECT op.*, (
        SELECT id FROM {tasks} FORCE INDEX (aioasync_tasks_queue_idx)
        WHERE state = 'pending' AND group_name = op.group_name AND user_name = op.user_name
            AND run_at <= {now}
            AND type IN (SELECT v FROM JSON_TABLE(:types, '$[*]'
                COLUMNS (v VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS tl)
        ORDER BY handoff DESC, priority DESC, id LIMIT 1) AS head_id
    FROM open_pairs op
),
heads AS (
    SELECT h.id, h.handoff, h.priority, h.run_at, f.group_name, f.user_name, f.user_running,
        1 AS user_rank, f.group_room, f.user_room
    FROM firsts f JOIN {tasks} h ON h.id = f.head_id
)
SELECT group_name, user_name, user_running, group_room, user_room FROM heads
ORDER BY {order_by} LIMIT :pool

-- name: claim
-- The candidates of a claim: up to :pool due tasks of :types from the queues claim_queues
-- chose, in the policy's order (pick), never exceeding a group's limits (docs/design.md §6).
-- The driver then locks them (lock_claims) and takes the first :limit it could lock
-- (take_claims). {queues} is one claim_queue per queue (no LATERAL in MariaDB): each reads at
-- most :pool tasks of its queue, so the ranking below sees at most :pool × :pool rows,
-- whatever the backlog.
WITH
candidates AS (
    SELECT c.id, c.handoff, c.priority, c.run_at, c.group_name, c.user_name, c.user_running,
        c.group_room, c.user_room,
        row_number() OVER (PARTITION BY c.group_name, c.user_name
            ORDER BY c.handoff DESC, c.priority DESC, c.id) AS user_rank
    FROM ({queues}) c
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
)
SELECT id, group_name, pick FROM chosen WHERE pick <= :pool ORDER BY pick

-- name: claim_queue
-- One queue of a claim (a fragment: {n} is its number): its first :pool due tasks of :types,
-- in queue order, read from the queue index (state, group, user, handoff DESC, priority DESC,
-- id), which stops after :pool of them; with the queue's running tasks and its group's and
-- user's room, as claim_queues found them (:group_{n}, :user_{n}, :user_running_{n},
-- :group_room_{n}, :user_room_{n}; NULL: no limit).
(SELECT id, handoff, priority, run_at, group_name, user_name,
    :user_running_{n} AS user_running, :group_room_{n} AS group_room,
    :user_room_{n} AS user_room
FROM {tasks} FORCE INDEX (aioasync_tasks_queue_idx)
WHERE state = 'pending' AND group_name = :group_{n} AND user_name = :user_{n}
    AND run_at <= {now}
    AND type IN (SELECT v FROM JSON_TABLE(:types, '$[*]'
        COLUMNS (v VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS tl)
ORDER BY handoff DESC, priority DESC, id LIMIT :pool)

-- name: lock_claims
-- The candidates still PENDING, locked; rows another claimer holds are skipped, not waited
-- for; so are the tasks the node still runs an execution of (:busy). The driver checks each
-- row's group against the candidate's under the lock.
SELECT id, group_name, handoff FROM {tasks}
WHERE id IN (SELECT v FROM JSON_TABLE(:ids, '$[*]' COLUMNS (v BIGINT PATH '$')) AS l)
    AND state = :from_state
    AND id NOT IN (SELECT v FROM JSON_TABLE(:busy, '$[*]' COLUMNS (v BIGINT PATH '$')) AS b)
FOR UPDATE SKIP LOCKED

-- name: take_claims
-- The claim of locked rows (:ids): RUNNING, owned, an attempt and a new token. A join, not
-- `id IN (subquery)`: MariaDB runs an UPDATE or DELETE of one table with such a subquery once
-- per row of the table (no semi-join), a join by the primary key once per id.
UPDATE {tasks} t JOIN JSON_TABLE(:ids, '$[*]' COLUMNS (v BIGINT PATH '$')) AS l ON t.id = l.v
SET t.state = :to_state, t.node_id = :node, t.attempts = t.attempts + 1,
    t.token = t.token + 1, t.handoff = false, t.started_at = COALESCE(t.started_at, {now}),
    t.updated_at = {now}
WHERE t.state = :from_state

-- name: claimed_rows
-- What a claim took, read back in its transaction.
SELECT id, type, user_name, group_name, context, attempts, max_attempts, handoff, priority,
    token, watched_until > {now} AS watched,
    TIMESTAMPDIFF(MICROSECOND, run_at, {now}) / 1000000 AS waited, trace_parent
FROM {tasks}
WHERE id IN (SELECT v FROM JSON_TABLE(:ids, '$[*]' COLUMNS (v BIGINT PATH '$')) AS l)

-- name: next_due
-- Seconds until the next delayed task of :types is due (NULL: none).
SELECT TIMESTAMPDIFF(MICROSECOND, {now}, min(run_at)) / 1000000 FROM {tasks}
WHERE state = 'pending' AND run_at > {now}
    AND type IN (SELECT v FROM JSON_TABLE(:types, '$[*]'
        COLUMNS (v VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS tl)

-- name: node_registered
-- Whether the node's row still exists, kept (share lock) until the transaction commits.
SELECT id FROM {nodes} WHERE id = :node LOCK IN SHARE MODE

-- name: claim_cleanups
-- Unowned, due DELETING tasks, to run their cleanup handler: locked here, taken by
-- take_cleanups.
SELECT id FROM {tasks}
WHERE state = 'deleting' AND node_id IS NULL AND run_at <= {now}
    AND type IN (SELECT v FROM JSON_TABLE(:types, '$[*]'
        COLUMNS (v VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS tl)
    AND state = :from_state
    AND id NOT IN (SELECT v FROM JSON_TABLE(:busy, '$[*]' COLUMNS (v BIGINT PATH '$')) AS b)
ORDER BY run_at, id LIMIT :limit
FOR UPDATE SKIP LOCKED

-- name: take_cleanups
-- (A join by the primary key, as take_claims.)
UPDATE {tasks} t JOIN JSON_TABLE(:ids, '$[*]' COLUMNS (v BIGINT PATH '$')) AS l ON t.id = l.v
SET t.state = :to_state, t.node_id = :node, t.attempts = t.attempts + 1,
    t.token = t.token + 1, t.updated_at = {now}
WHERE t.state = :from_state

-- name: lock_checkpoints
-- The rows whose checkpoint is accepted (:rows a JSON array of [id, token, context, progress,
-- message]): still
-- owned by :node under the execution's claim token, in one of :states; locked, so that the
-- checkpoint statement that follows writes exactly these.
SELECT t.id, t.watched_until > {now} AS watched FROM {tasks} t
JOIN JSON_TABLE(:rows, '$[*]' COLUMNS (id BIGINT PATH '$[0]', token INTEGER PATH '$[1]'))
    AS v ON t.id = v.id AND t.token = v.token
WHERE t.node_id = :node
    AND t.state IN (SELECT s FROM JSON_TABLE(:states, '$[*]'
        COLUMNS (s VARCHAR(16) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS sl)
ORDER BY t.id FOR UPDATE

-- name: checkpoint
-- Many checkpoints in one statement, :rows a JSON array of [id, token, context, progress,
-- message], each written only under its execution's claim token; a null keeps the stored
-- value (docs/design.md §2.6).
UPDATE {tasks} t
JOIN JSON_TABLE(:rows, '$[*]' COLUMNS (id BIGINT PATH '$[0]', token INTEGER PATH '$[1]',
    context LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[2]',
    progress DOUBLE PATH '$[3]',
    message TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[4]'))
    AS v ON t.id = v.id AND t.token = v.token
SET t.context = COALESCE(v.context, t.context), t.progress = COALESCE(v.progress, t.progress),
    t.message = COALESCE(v.message, t.message), t.updated_at = {now}
WHERE t.node_id = :node
    AND t.state IN (SELECT s FROM JSON_TABLE(:states, '$[*]'
        COLUMNS (s VARCHAR(16) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS sl)

-- name: register_node
-- The new id is the cursor's last insert id.
INSERT INTO {nodes} (name, concurrency, types, started_at, heartbeat_at, heartbeat_interval,
    node_timeout)
VALUES (:name, :concurrency, :types, {now}, {now}, :heartbeat_interval, :node_timeout)

-- name: heartbeat
-- Matched rows (the dialect counts found rows): 0 when the node row is gone.
UPDATE {nodes} SET heartbeat_at = {now} WHERE id = :node

-- name: owned_tasks
SELECT id, state, requested, token FROM {tasks} WHERE node_id = :node

-- name: dead_nodes
-- Other nodes whose heartbeat is older than their own node_timeout (the database's clock).
SELECT id FROM {nodes}
WHERE id <> :node
    AND heartbeat_at < {now} - INTERVAL ROUND(node_timeout * 1000000) MICROSECOND
ORDER BY id FOR UPDATE SKIP LOCKED

-- name: delete_nodes
DELETE FROM {nodes}
WHERE id IN (SELECT v FROM JSON_TABLE(:nodes, '$[*]' COLUMNS (v BIGINT PATH '$')) AS l)

-- name: get_nodes
SELECT id, name, concurrency, types, started_at, heartbeat_at, heartbeat_interval,
    node_timeout
FROM {nodes} ORDER BY id

-- name: create_group
-- An upsert: two nodes setting a new group at once both succeed, one after the other.
INSERT INTO {groups} (name, paused, max_running, max_running_per_user, updated_at)
VALUES (:name, false, NULL, NULL, {now})
ON DUPLICATE KEY UPDATE name = name

-- name: lock_group_settings
SELECT paused, max_running, max_running_per_user FROM {groups} WHERE name = :name FOR UPDATE

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
-- (state, done_at) for each state.
SELECT state, count(*) AS tasks FROM {tasks}
WHERE state IN ('finished', 'failed') AND done_at >= :since
GROUP BY state

-- name: prune_lock
-- One pruner at a time (docs/design.md §4.5): a named lock of the session, tried without
-- waiting (1: ours), released by prune_unlock after the round.
SELECT GET_LOCK(:key, 0) AS locked

-- name: prune_unlock
SELECT RELEASE_LOCK(:key)

-- name: prune
-- Up to :limit tasks in :state (FINISHED or FAILED) that ended more than :age seconds ago,
-- oldest first, removed. (MySQL takes no LIMIT in an IN subquery, nor a subquery of the table
-- a DELETE changes: a DELETE of one table with ORDER BY and LIMIT instead, through the done
-- index.)
DELETE FROM {tasks}
WHERE state = :state AND done_at < {now} - INTERVAL ROUND(:age * 1000000) MICROSECOND
ORDER BY state, done_at LIMIT :limit

-- name: delete_group
-- A group back to the default settings has no row (docs/design.md §4.5).
DELETE FROM {groups} WHERE name = :name

-- name: register_task_types
-- The task types a worker runs, :rows a JSON array of [name, max_attempts, has_cleanup],
-- stored or updated (the last worker to start wins), in name order (the driver sorts them).
INSERT INTO {task_types} (name, max_attempts, has_cleanup, updated_at)
SELECT v.name, v.max_attempts, v.has_cleanup, {now}
FROM JSON_TABLE(:rows, '$[*]' COLUMNS (
    ord FOR ORDINALITY,
    name VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[0]',
    max_attempts INTEGER PATH '$[1]',
    has_cleanup BOOL PATH '$[2]')) AS v
ORDER BY v.ord
ON DUPLICATE KEY UPDATE max_attempts = v.max_attempts, has_cleanup = v.has_cleanup,
    updated_at = {now}

-- name: get_task_types
-- The stored task types named in :names (all of them with :all), by name.
SELECT name, max_attempts, has_cleanup, updated_at FROM {task_types}
WHERE :all OR name IN (SELECT v FROM JSON_TABLE(:names, '$[*]'
    COLUMNS (v VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS nl)
ORDER BY name

-- name: schedule_columns
-- The columns of a schedule as _rows.schedule reads them (a fragment).
name, type, cron, every, timezone, context, user_name, group_name, priority, max_attempts,
    declared, next_tick, last_tick, last_task_id, created_at, updated_at

-- name: put_schedule
-- Create or replace a schedule (docs/design.md §17). Its next tick is kept unless its period
-- changed: a node that declares its types' schedules at start moves nothing. MySQL assigns
-- left to right, each assignment seeing the ones before it: next_tick compares the stored
-- period before cron, every and timezone are assigned. No RETURNING: the driver reads the row
-- back (get_schedule).
INSERT INTO {schedules} (name, type, cron, every, timezone, context, user_name,
    group_name, priority, max_attempts, declared, next_tick, last_tick, last_task_id,
    created_at, updated_at)
VALUES (:name, :type, :cron, :every, :timezone, :context, :user, :group, :priority,
    :max_attempts, :declared, :next_tick, NULL, NULL, {now}, {now})
ON DUPLICATE KEY UPDATE
    next_tick = CASE WHEN cron <=> VALUES(cron) AND every <=> VALUES(every)
            AND timezone = VALUES(timezone)
        THEN next_tick ELSE VALUES(next_tick) END,
    type = VALUES(type), cron = VALUES(cron), every = VALUES(every),
    timezone = VALUES(timezone), context = VALUES(context), user_name = VALUES(user_name),
    group_name = VALUES(group_name), priority = VALUES(priority),
    max_attempts = VALUES(max_attempts), declared = VALUES(declared), updated_at = {now}

-- name: get_schedule
SELECT {schedule_columns} FROM {schedules} WHERE name = :name

-- name: delete_schedule
-- Deleted rows: 0 when there was no such schedule.
DELETE FROM {schedules} WHERE name = :name

-- name: get_schedules
SELECT {schedule_columns} FROM {schedules} ORDER BY name

-- name: lock_due_schedules
-- The due schedules of :types, with the database's clock; a schedule another node is
-- enqueueing is skipped, not waited for.
SELECT {schedule_columns}, {now} AS now FROM {schedules}
WHERE next_tick <= {now}
    AND type IN (SELECT v FROM JSON_TABLE(:types, '$[*]'
        COLUMNS (v VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS tl)
ORDER BY next_tick, name LIMIT :limit
FOR UPDATE SKIP LOCKED

-- name: advance_schedule
-- Compare-and-set: the schedule moves on only from the next tick it was read with, in the
-- transaction that inserts the tick's task (each tick is enqueued once). Matched rows, as the
-- dialect counts them: 0 when another node advanced it.
UPDATE {schedules} SET next_tick = :next_tick, last_tick = :tick, last_task_id = :task_id,
    updated_at = {now}
WHERE name = :name AND next_tick = :expected

-- name: next_schedule_due
-- Seconds until the next tick of the schedules of :types (NULL: there are none).
SELECT TIMESTAMPDIFF(MICROSECOND, {now}, min(next_tick)) / 1000000 FROM {schedules}
WHERE type IN (SELECT v FROM JSON_TABLE(:types, '$[*]'
    COLUMNS (v VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) AS tl)
