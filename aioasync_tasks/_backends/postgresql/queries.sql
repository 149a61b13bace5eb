-- Every statement the PostgreSQL driver runs, by name (read by _backends/_queries.py).
--
-- {tasks}, {nodes}, {groups}, {schedules} and {versions} stand for the tables, qualified by
-- the node's schema; {order_by} is the scheduling policy's ORDER BY (trusted code,
-- docs/design.md §6).
-- Parameters are bound by name (:name); lists are bound as arrays.
--
-- State values that a row moves between are bound parameters taken from the state table
-- (aioasync_tasks/_states.py). The literal 'pending', 'running', 'canceling' and 'deleting'
-- below only select rows, and match the predicates of the partial indexes of the migrations
-- word for word: PostgreSQL uses a partial index only for a query whose WHERE implies the
-- index's own, which a bound parameter never does.

-- name: applied_versions
-- Every migration applied (the versions need not be contiguous: docs/design.md §4.3).
SELECT version FROM {versions} ORDER BY version

-- name: migration_lock
-- Concurrent migrations of one schema run one after the other.
SELECT pg_advisory_xact_lock(hashtext(:key))

-- name: record_migration
INSERT INTO {versions} (version, applied_at) VALUES (:version, now())

-- name: lock_unique_keys
-- Before inserting tasks with unique keys: one advisory lock per key (:keys, each qualified by
-- the schema's channel and the type), taken in one order, the hashes' — two creators that
-- insert the same keys in different orders would otherwise each wait for a row the other
-- inserted into the unique index: a deadlock (docs/design.md §4.4).
SELECT pg_advisory_xact_lock(h)
FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest(CAST(:keys AS text[])) AS k) locks
ORDER BY h

-- name: notify
-- Delivered when the transaction commits, and only then.
SELECT pg_notify(:channel, :payload)

-- name: insert_task
INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,
    attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,
    run_at, trace_parent)
VALUES (:type, :user, :group, :state, NULL, :context, :priority, 0, :max_attempts,
    :has_cleanup, false, NULL, NULL, now(), now(), COALESCE(:run_at, now()), :trace_parent)
RETURNING id

-- name: insert_task_and_wake
-- One task and its wake-up in one statement (the notification is delivered at commit): one
-- row, its id in an array, as insert_tasks_and_wake gives them.
WITH ins AS ({insert_task})
SELECT array_agg(id) AS ids, pg_notify(:channel, 'wake') FROM ins

-- name: insert_tasks
-- Many tasks in one statement: one array per column. Ids come from the sequence in the order
-- the rows are inserted (ORDER BY ord).
INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,
    attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,
    run_at, trace_parent)
SELECT v.type, v.user_name, v.group_name, v.state, NULL, v.context, v.priority, 0,
    v.max_attempts, v.has_cleanup, false, NULL, NULL, now(), now(), COALESCE(v.run_at, now()),
    v.trace_parent
FROM unnest(CAST(:type AS text[]), CAST(:user AS text[]), CAST(:group AS text[]),
    CAST(:state AS text[]), CAST(:context AS text[]), CAST(:priority AS integer[]),
    CAST(:max_attempts AS integer[]), CAST(:has_cleanup AS boolean[]),
    CAST(:run_at AS timestamptz[]), CAST(:trace_parent AS text[])) WITH ORDINALITY
    AS v(type, user_name, group_name, state, context, priority, max_attempts, has_cleanup,
    run_at, trace_parent, ord)
ORDER BY v.ord
RETURNING id

-- name: insert_tasks_and_wake
-- Many tasks and one wake-up in one statement: one row, the ids in ascending order (the rows'
-- order, as insert_tasks gives them).
WITH ins AS ({insert_tasks})
SELECT array_agg(id ORDER BY id) AS ids, pg_notify(:channel, 'wake') FROM ins

-- name: insert_unique_task
-- One task with a unique key, unless a live task of its type holds that key already: then no
-- row is inserted and none returned (docs/design.md §4.4). The conflict target names the
-- partial unique index by its columns and its predicate.
INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,
    attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,
    run_at, unique_key, trace_parent)
VALUES (:type, :user, :group, :state, NULL, :context, :priority, 0, :max_attempts,
    :has_cleanup, false, NULL, NULL, now(), now(), COALESCE(:run_at, now()), :unique_key, :trace_parent)
ON CONFLICT (type, unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('init', 'pending', 'running', 'canceling', 'paused')
    DO NOTHING
RETURNING id

-- name: lock_unique_task
-- The live task of :type that holds :unique_key, locked (at most one: the unique index).
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > now() AS watched
FROM {tasks}
WHERE type = :type AND unique_key = :unique_key AND unique_key IS NOT NULL
    AND state IN ('init', 'pending', 'running', 'canceling', 'paused')
FOR UPDATE

-- name: replace_task
-- on_conflict="replace": the live task that holds the key takes the new task's context and
-- options, keeps its id and state, and starts afresh (compare-and-set on state and token).
UPDATE {tasks} SET context = :context, user_name = :user, group_name = :group,
    priority = :priority, max_attempts = :max_attempts, attempts = 0, error = NULL,
    handoff = false, progress = NULL, message = NULL, run_at = COALESCE(:run_at, now()),
    trace_parent = :trace_parent, updated_at = now()
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
-- Rows about to be changed by the state rules, locked in id order (no deadlocks).
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > now() AS watched
FROM {tasks} WHERE id = ANY(:ids) ORDER BY id FOR UPDATE

-- name: lock_owned_tasks
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > now() AS watched
FROM {tasks} WHERE id = ANY(:ids) AND node_id = :owner ORDER BY id FOR UPDATE

-- name: lock_tasks_of_nodes
-- The tasks of dead or departing nodes, and (:orphans) every owned task whose node row is gone.
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > now() AS watched
FROM {tasks}
WHERE node_id = ANY(CAST(:nodes AS bigint[]))
    OR (:orphans AND node_id IS NOT NULL
        AND NOT EXISTS (SELECT 1 FROM {nodes} n WHERE n.id = {tasks}.node_id))
ORDER BY id FOR UPDATE

-- name: lock_running_in_group
SELECT id, state, requested, has_cleanup, attempts, max_attempts, node_id, group_name, token,
    watched_until > now() AS watched
FROM {tasks} WHERE group_name = :group AND state = :state ORDER BY id FOR UPDATE

-- name: update_task
-- The state rules' decision for one locked row, written only if the row is still as it was
-- read: same state, same claim token (compare-and-set). A negative :delay keeps run_at.
UPDATE {tasks} SET state = :state, requested = :requested, node_id = :node_id,
    attempts = :attempts, handoff = :handoff, group_name = :group,
    context = COALESCE(:context, context), error = COALESCE(:error, error),
    progress = COALESCE(CAST(:progress AS double precision), progress),
    message = COALESCE(:message, message),
    run_at = CASE WHEN CAST(:delay AS double precision) < 0 THEN run_at
        ELSE now() + make_interval(secs => CAST(:delay AS double precision)) END,
    done_at = CASE WHEN :done THEN now() ELSE done_at END,
    updated_at = now()
WHERE id = :id AND token = :token AND state = :expected

-- name: batch_row
-- A fragment of the statements that write a batch (update_tasks, complete_at_once,
-- checkpoint): the place of row t in the batch — its id's in :ids, which are ascending and
-- distinct — found by width_bucket's binary search. Each value of a row is read at that place
-- in its array; the batch is never joined to the table, which a generic plan made on a young
-- table did as a nested loop over both: each row of the table compared with every row of the
-- batch, 10,000 comparisons for a batch of 100 (docs/design.md §15).
width_bucket(t.id, CAST(:ids AS bigint[]))

-- name: update_tasks
-- update_task for a batch of locked rows in one statement: one array per parameter, a row's
-- values at its place in them (batch_row).
UPDATE {tasks} t SET state = (CAST(:state AS text[]))[{batch_row}],
    requested = (CAST(:requested AS text[]))[{batch_row}],
    node_id = (CAST(:node_id AS bigint[]))[{batch_row}],
    attempts = (CAST(:attempts AS integer[]))[{batch_row}],
    handoff = (CAST(:handoff AS boolean[]))[{batch_row}],
    group_name = (CAST(:group AS text[]))[{batch_row}],
    context = COALESCE((CAST(:context AS text[]))[{batch_row}], t.context),
    error = COALESCE((CAST(:error AS text[]))[{batch_row}], t.error),
    progress = COALESCE((CAST(:progress AS double precision[]))[{batch_row}], t.progress),
    message = COALESCE((CAST(:message AS text[]))[{batch_row}], t.message),
    run_at = CASE WHEN (CAST(:delay AS double precision[]))[{batch_row}] < 0 THEN t.run_at
        ELSE now() + make_interval(secs => (CAST(:delay AS double precision[]))[{batch_row}])
        END,
    done_at = CASE WHEN (CAST(:done AS boolean[]))[{batch_row}] THEN now() ELSE t.done_at END,
    updated_at = now()
WHERE t.id = ANY(CAST(:ids AS bigint[]))
    AND t.token = (CAST(:token AS integer[]))[{batch_row}]
    AND t.state = (CAST(:expected AS text[]))[{batch_row}]

-- name: complete_at_once
-- The ends of executions whose outcome is certain for a task that still runs as claimed
-- (docs/design.md §15.1), in one statement outside a transaction: each row is written only if
-- it is still RUNNING, with no stop request, owned by :node under the execution's claim token
-- — a compare-and-set in place of the lock and the state rules of complete, which decide the
-- same outcome for such a row. A row that is not is left alone, and not returned: its end
-- goes through the locked path. Watchers of a task written hear of it from the statement
-- itself (watched_events).
WITH written AS (
    UPDATE {tasks} t SET state = (CAST(:states AS text[]))[{batch_row}], node_id = NULL,
        handoff = false,
        context = COALESCE((CAST(:contexts AS text[]))[{batch_row}], t.context),
        error = COALESCE((CAST(:errors AS text[]))[{batch_row}], t.error),
        progress = COALESCE((CAST(:progress AS double precision[]))[{batch_row}], t.progress),
        message = COALESCE((CAST(:messages AS text[]))[{batch_row}], t.message),
        done_at = now(), updated_at = now()
    WHERE t.id = ANY(CAST(:ids AS bigint[]))
        AND t.token = (CAST(:tokens AS integer[]))[{batch_row}]
        AND t.node_id = :node
        AND t.state = 'running'
        AND t.requested IS NULL
    RETURNING t.id, t.watched_until > now() AS watched
),
{watched_events}
SELECT id, (SELECT count(*) FROM events) AS events FROM written

-- name: delete_tasks
DELETE FROM {tasks} WHERE id = ANY(:ids)

-- name: lock_group
-- Taken in the order claims take it (group, then task).
SELECT name FROM {groups} WHERE name = :name FOR UPDATE

-- name: claim_prepare
-- One round trip before a claim (docs/design.md §6.3, §6.4, §6.8): share-lock our node row
-- (fencing: a node declared dead claims nothing); find the claim's window of queues; lock the
-- rows of the window's groups that have limits, in name order, so that claimers that could
-- exceed a limit run one after the other and the claim that follows (a fresh snapshot under
-- READ COMMITTED) counts every task the previous one took — the claim takes from the window's
-- queues only, so the groups it takes from are locked, and no others; and the seconds until
-- the next delayed task of :types is due (NULL: none). The window's rooms are counted in this
-- statement's snapshot, which may predate the locks: they only choose the queues the claim
-- looks at, and the claim counts the limits again. One row per queue of the window, in the
-- walk's order (none: one row, no queue).
--
-- The window: up to :window queues with pending tasks. The walk goes through the open groups
-- (not paused, with room under max_running and, unless :all_groups, in :groups) in name
-- order, starting after :after_group, round past the last to the first and no further than
-- :after_group. In each group it walks the users after the group's cursor (:cursor_groups,
-- :cursor_users), then from its first user up to the cursor (`lap`), through no more of them
-- than the group has room for (`quota`: each queue gives a task at least). Each step is one
-- seek of the queue index: the cost is bounded by :window whatever the number of queues.
WITH RECURSIVE
{claim_walk},
limited AS (
    SELECT count(*) AS n FROM ({limited_groups} ORDER BY name FOR UPDATE) l
)
SELECT me.registered, limited.n AS limited, due.next_due, w.group_name, w.user_name
FROM me CROSS JOIN limited CROSS JOIN due
LEFT JOIN walk w ON w.n > 0
ORDER BY w.n

-- name: claim
-- Up to :limit due tasks of :types in the queues of the window (:window_groups,
-- :window_users: claim_window), in the policy's order, skipping paused groups and never
-- exceeding a group's limits (docs/design.md §6).
WITH
pairs(group_name, user_name) AS (
    SELECT * FROM unnest(CAST(:window_groups AS text[]), CAST(:window_users AS text[]))
),
{claim_take}
{claim_update}

-- name: claim_at_once
-- A whole claim in one statement, run outside a transaction: one round trip, no BEGIN and no
-- COMMIT (docs/design.md §6.9). It takes tasks only when no group of its window has a limit:
-- the limits are exact because a claim that could exceed one locks its group first and counts
-- in a later snapshot (claim_prepare, then claim), which one statement cannot do. With a
-- limited group in the window it takes nothing, and says so (`limited`): the driver claims in
-- two statements. The first row describes the claim — `registered`, `limited`, `next_due`, and
-- the window's queues in walk order (`window_groups`, `window_users`) — and has no id; one row
-- follows per task taken, with the columns of claim. Watchers of a task taken hear of it as
-- they would from the driver's notify (watched_events).
WITH RECURSIVE
{claim_walk},
window_limited AS (SELECT count(*) AS n FROM ({limited_groups}) l),
pairs(group_name, user_name) AS (
    SELECT w.group_name, w.user_name FROM walk w CROSS JOIN me CROSS JOIN window_limited l
    WHERE w.n > 0 AND me.registered > 0 AND l.n = 0
),
{claim_take},
written AS ({claim_update}),
{watched_events}
SELECT me.registered, l.n > 0 AS limited, due.next_due,
    (SELECT array_agg(group_name ORDER BY n) FROM walk WHERE n > 0) AS window_groups,
    (SELECT array_agg(user_name ORDER BY n) FROM walk WHERE n > 0) AS window_users,
    (SELECT count(*) FROM events) AS events,
    NULL AS id, NULL AS type, NULL AS user_name, NULL AS group_name, NULL AS context,
    NULL AS attempts, NULL AS max_attempts, NULL AS handoff, NULL AS priority, NULL AS token,
    NULL AS watched, NULL AS waited, NULL AS trace_parent
FROM me CROSS JOIN window_limited l CROSS JOIN due
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, id, type, user_name, group_name, context, attempts,
    max_attempts, handoff, priority, token, watched, waited, trace_parent
FROM written

-- name: claim_update
-- A fragment of claim and claim_at_once: the UPDATE that takes the rows of the CTE `picked`
-- (event CLAIM: :from_state to :to_state), with the columns a claim returns.
UPDATE {tasks} t SET state = :to_state, node_id = :node, attempts = t.attempts + 1,
    token = t.token + 1, handoff = false, started_at = COALESCE(t.started_at, now()),
    updated_at = now()
WHERE t.id = ANY(ARRAY(SELECT claim_id FROM picked))
RETURNING id, type, user_name, group_name, context, attempts, max_attempts, handoff, priority,
    token, watched_until > now() AS watched, EXTRACT(EPOCH FROM now() - run_at) AS waited,
    trace_parent

-- name: limited_groups
-- A fragment of claim_prepare and claim_at_once: the groups of the walk's window that have a
-- limit (docs/design.md §6.4).
SELECT name FROM {groups}
WHERE (max_running IS NOT NULL OR max_running_per_user IS NOT NULL)
    AND name IN (SELECT group_name FROM walk WHERE n > 0)

-- name: watched_events
-- A fragment of the statements run outside a transaction (claim_at_once,
-- claim_cleanups_at_once, checkpoint_at_once, complete_at_once): the CTE `events`, one
-- pg_notify per 300 watched rows of the CTE `written` (its columns id and watched), each
-- :events_kind then the ids (under the 8,000 bytes of a payload: an id has at most 20
-- characters).
events AS (
    SELECT pg_notify(:events_channel, :events_kind || string_agg(CAST(id AS text), ',')) AS sent
    FROM (SELECT id, (row_number() OVER (ORDER BY id) - 1) / 300 AS chunk
          FROM written WHERE watched) w
    GROUP BY chunk
)

-- name: queue_order
-- A fragment: the order of the queue index (aioasync_tasks_queue_idx), whole. A seek of the
-- first PENDING row of a group or of a queue orders by all of it, though its first columns
-- decide which row that is: no other index gives this order, so no plan can find the row by
-- walking the group or user index past every row that is no longer PENDING — as plans made
-- when the statistics said every row was PENDING (an ANALYZE after a bulk create) did, reading
-- every finished task again at each claim (docs/design.md §15).
group_name, user_name, handoff DESC, priority DESC, id

-- name: claim_walk
-- A fragment of claim_prepare and claim_at_once, in a WITH RECURSIVE: the CTEs `walk`, the
-- window of queues (see claim_prepare), and those it is made of; `me` and `due`.
pending_groups(name) AS (
    (SELECT group_name FROM {tasks} WHERE state = 'pending' ORDER BY {queue_order} LIMIT 1)
    UNION ALL
    SELECT n.group_name FROM pending_groups g CROSS JOIN LATERAL
        (SELECT group_name FROM {tasks} WHERE state = 'pending' AND group_name > g.name
         ORDER BY {queue_order} LIMIT 1) n
),
cursors(group_name, user_name) AS (
    SELECT * FROM unnest(CAST(:cursor_groups AS text[]), CAST(:cursor_users AS text[]))
),
-- What runs in a group is counted only for a group with max_running (r: 0 for the others,
-- read from no row): the claim's cost does not grow with what runs in the other groups.
open_groups AS MATERIALIZED (
    SELECT p.name, c.user_name AS after_user,
        COALESCE(LEAST(g.max_running - COALESCE(r.n, 0), :window), :window) AS quota
    FROM pending_groups p
    LEFT JOIN {groups} g ON g.name = p.name
    CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM {tasks}
        WHERE g.max_running IS NOT NULL AND state IN ('running', 'canceling')
            AND group_name = p.name) r
    LEFT JOIN cursors c ON c.group_name = p.name
    WHERE NOT COALESCE(g.paused, false)
        AND (:all_groups OR p.name = ANY(CAST(:groups AS text[])))
        AND (g.max_running IS NULL OR g.max_running > COALESCE(r.n, 0))
),
-- A step is the next user of the same group while it has room (a: after the cursor, then
-- from the first user up to it), else the first queue of the next open group, or once of the
-- first open group (b, of the group nx). k: the queues taken from the step's group so far
-- (the first row: none, and no room left); lap: the group's walk is past its last user.
-- a and b read the queue index only, each the first row of its seeks in the order written
-- (UNION ALL … LIMIT 1 runs them one after the other and stops at the first row found): no
-- join of the tasks table, whose plan could read the whole table (docs/design.md §15).
walk(group_name, user_name, n, k, lap, wrapped) AS (
    SELECT CAST(:after_group AS text), CAST('' AS text), 0, CAST(:window AS integer),
        false, false
    UNION ALL
    SELECT COALESCE(a.group_name, b.group_name), COALESCE(a.user_name, b.user_name), w.n + 1,
        CASE WHEN a.id IS NOT NULL THEN w.k + 1 ELSE 1 END,
        CASE WHEN a.id IS NOT NULL THEN w.lap OR a.user_name < w.user_name
            ELSE COALESCE(b.user_name <= nx.after_user, false) END,
        w.wrapped OR (a.id IS NULL AND nx.name <= w.group_name)
    FROM walk w
    LEFT JOIN open_groups cur ON cur.name = w.group_name AND w.k < cur.quota
    LEFT JOIN LATERAL (
        (SELECT id, group_name, user_name FROM {tasks}
         WHERE NOT w.lap AND state = 'pending' AND group_name = cur.name
            AND user_name > w.user_name
         ORDER BY {queue_order} LIMIT 1)
        UNION ALL
        (SELECT id, group_name, user_name FROM {tasks}
         WHERE NOT w.lap AND state = 'pending' AND group_name = cur.name
            AND user_name <= cur.after_user
         ORDER BY {queue_order} LIMIT 1)
        UNION ALL
        (SELECT id, group_name, user_name FROM {tasks}
         WHERE w.lap AND state = 'pending' AND group_name = cur.name AND user_name > w.user_name
            AND user_name <= cur.after_user
         ORDER BY {queue_order} LIMIT 1)
        LIMIT 1) a ON true
    LEFT JOIN open_groups nx ON a.id IS NULL AND nx.name = COALESCE(
        (SELECT min(name) FROM open_groups WHERE name > w.group_name),
        CASE WHEN NOT w.wrapped THEN (SELECT min(name) FROM open_groups) END)
    LEFT JOIN LATERAL (
        (SELECT id, group_name, user_name FROM {tasks}
         WHERE state = 'pending' AND group_name = nx.name AND user_name > nx.after_user
         ORDER BY {queue_order} LIMIT 1)
        UNION ALL
        (SELECT id, group_name, user_name FROM {tasks}
         WHERE state = 'pending' AND group_name = nx.name
         ORDER BY {queue_order} LIMIT 1)
        LIMIT 1) b ON true
    WHERE w.n < :window AND (a.id IS NOT NULL OR b.id IS NOT NULL)
        AND (NOT (w.wrapped OR (a.id IS NULL AND nx.name <= w.group_name))
            OR COALESCE(a.group_name, b.group_name) <= CAST(:after_group AS text))
),
-- Our node's row, share-locked (fencing: 0, the node was declared dead).
me AS (
    SELECT count(*) AS registered FROM (SELECT id FROM {nodes} WHERE id = :node FOR KEY SHARE) m
),
-- The seconds until the next delayed task of :types is due (NULL: none).
due AS (
    SELECT EXTRACT(EPOCH FROM (min(run_at) - now())) AS next_due FROM {tasks}
    WHERE state = 'pending' AND run_at > now() AND type = ANY(:types)
)

-- name: claim_take
-- A fragment of claim and claim_at_once: from the CTE `pairs`, the window's queues, the CTE
-- `picked`, the rows the claim takes, locked (see claim), and the CTEs it is made of.
-- What runs now (all nodes) in each group of the window that has max_running, and (a, in
-- open_pairs) in each queue of the window: counted there alone, once each, so that the claim's
-- cost does not grow with what runs in other queues and groups.
group_active AS MATERIALIZED (
    SELECT w.group_name,
        (SELECT count(*) FROM {tasks}
         WHERE state IN ('running', 'canceling') AND group_name = w.group_name) AS n
    FROM (SELECT DISTINCT group_name FROM pairs) w
    JOIN {groups} g ON g.name = w.group_name AND g.max_running IS NOT NULL
),
-- Queues their group lets run: not paused, below both limits.
open_pairs AS (
    SELECT p.group_name, p.user_name, COALESCE(a.n, 0) AS user_running,
        g.max_running - COALESCE(ga.n, 0) AS group_room,
        g.max_running_per_user - COALESCE(a.n, 0) AS user_room
    FROM pairs p
    LEFT JOIN {groups} g ON g.name = p.group_name
    CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM {tasks}
        WHERE state IN ('running', 'canceling') AND group_name = p.group_name
            AND user_name = p.user_name) a
    LEFT JOIN group_active ga ON ga.group_name = p.group_name
    WHERE NOT COALESCE(g.paused, false)
        AND (:all_groups OR p.group_name = ANY(CAST(:groups AS text[])))
        AND (g.max_running IS NULL OR g.max_running > COALESCE(ga.n, 0))
        AND (g.max_running_per_user IS NULL OR g.max_running_per_user > COALESCE(a.n, 0))
),
-- Each open queue's first due task; the best :pool queues hold the best tasks.
heads AS (
    SELECT h.id, h.handoff, h.priority, h.run_at, h.group_name, h.user_name,
        op.user_running, 1 AS user_rank
    FROM open_pairs op CROSS JOIN LATERAL (
        SELECT id, handoff, priority, run_at, group_name, user_name FROM {tasks}
        WHERE state = 'pending' AND run_at <= now() AND type = ANY(:types)
            AND group_name = op.group_name AND user_name = op.user_name
        ORDER BY handoff DESC, priority DESC, id LIMIT 1) h
),
top_pairs AS (SELECT group_name, user_name FROM heads ORDER BY {order_by} LIMIT :pool),
-- Up to :pool due tasks of each of those queues, ranked within their queue.
candidates AS (
    SELECT c.id, c.handoff, c.priority, c.run_at, c.group_name, c.user_name, op.user_running,
        op.group_room, op.user_room,
        row_number() OVER (PARTITION BY c.group_name, c.user_name
            ORDER BY c.handoff DESC, c.priority DESC, c.id) AS user_rank
    FROM top_pairs tp
    JOIN open_pairs op ON op.group_name = tp.group_name AND op.user_name = tp.user_name
    CROSS JOIN LATERAL (
        SELECT id, handoff, priority, run_at, group_name, user_name FROM {tasks}
        WHERE state = 'pending' AND run_at <= now() AND type = ANY(:types)
            AND group_name = op.group_name AND user_name = op.user_name
        ORDER BY handoff DESC, priority DESC, id LIMIT :pool) c
),
-- The limits, applied in policy order.
allowed AS (
    SELECT id, handoff, priority, run_at, group_name, user_name, user_running, user_rank,
        group_room,
        row_number() OVER (PARTITION BY group_name ORDER BY {order_by}) AS group_rank
    FROM candidates WHERE user_room IS NULL OR user_rank <= user_room
),
-- :pool candidates in policy order (pick); the claim takes the first :limit it can lock, so
-- rows another claimer holds are skipped past, not lost.
chosen AS (
    SELECT id, group_name, CAST(:from_state AS text) AS state,
        row_number() OVER (ORDER BY {order_by}) AS pick
    FROM allowed WHERE group_room IS NULL OR group_rank <= group_room
    ORDER BY {order_by} LIMIT :pool
),
-- State and group are checked again under the row lock: a row another node claimed, or that
-- was moved to another group, since this statement's snapshot is skipped; so is a row the
-- node still runs an execution of (:busy). MATERIALIZED: the rows are locked once; a plan
-- that ran this again for each row it updates would skip the rows it had locked and take
-- the next ones, more than :limit in all. The rows are found by their ids, whatever the plan:
-- the state is compared with chosen's, a join condition, not one an index of the tasks could
-- serve alone (an index scan of every PENDING row, joined with the few chosen).
picked AS MATERIALIZED (
    SELECT r.id AS claim_id FROM {tasks} r JOIN chosen c ON c.id = r.id
    WHERE r.id = ANY(ARRAY(SELECT id FROM chosen))
        AND r.state = c.state AND r.group_name = c.group_name
        AND NOT (r.id = ANY(CAST(:busy AS bigint[])))
    ORDER BY c.pick LIMIT :limit
    FOR UPDATE OF r SKIP LOCKED
)

-- name: claim_cleanups
-- Unowned, due DELETING tasks, to run their cleanup handler (locked once: see claim), taken
-- only while our node's row exists: share-locked until the statement's transaction commits
-- (fencing, as the claim's `me`: a node declared dead claims nothing more under its old id).
WITH picked AS MATERIALIZED (
    SELECT c.id AS claim_id FROM {tasks} c
    WHERE c.state = 'deleting' AND c.node_id IS NULL AND c.run_at <= now()
        AND c.type = ANY(:types) AND c.state = :from_state
        AND NOT (c.id = ANY(CAST(:busy AS bigint[])))
        AND EXISTS (SELECT 1 FROM {nodes} WHERE id = :node FOR KEY SHARE)
    ORDER BY c.run_at, c.id LIMIT :limit
    FOR UPDATE OF c SKIP LOCKED
)
UPDATE {tasks} t SET state = :to_state, node_id = :node, attempts = t.attempts + 1,
    token = t.token + 1, updated_at = now()
WHERE t.id = ANY(ARRAY(SELECT claim_id FROM picked))
RETURNING id, type, user_name, group_name, context, attempts, max_attempts, handoff, priority,
    token, watched_until > now() AS watched, EXTRACT(EPOCH FROM now() - run_at) AS waited,
    trace_parent

-- name: claim_cleanups_at_once
-- claim_cleanups in one statement outside a transaction, with the task events of the watched
-- rows it took (watched_events): one round trip where a transaction takes four (§6.9).
WITH written AS ({claim_cleanups}),
{watched_events}
SELECT id, type, user_name, group_name, context, attempts, max_attempts, handoff, priority,
    token, watched, waited, trace_parent, (SELECT count(*) FROM events) AS events
FROM written

-- name: checkpoint
-- Many checkpoints in one statement, each written only under its execution's claim token: a
-- context, a progress and a message, each NULL to keep the stored one (docs/design.md §2.6);
-- a row's values at its place in the arrays (batch_row).
UPDATE {tasks} t SET context = COALESCE((CAST(:contexts AS text[]))[{batch_row}], t.context),
    progress = COALESCE((CAST(:progress AS double precision[]))[{batch_row}], t.progress),
    message = COALESCE((CAST(:messages AS text[]))[{batch_row}], t.message),
    updated_at = now()
WHERE t.id = ANY(CAST(:ids AS bigint[]))
    AND t.token = (CAST(:tokens AS integer[]))[{batch_row}]
    AND t.node_id = :node
    AND t.state = ANY(:states)
RETURNING t.id, t.watched_until > now() AS watched

-- name: checkpoint_at_once
-- checkpoint in one statement outside a transaction, with the task events of the watched rows
-- it wrote (watched_events, :events_kind): one round trip (docs/design.md §15).
WITH written AS ({checkpoint}),
{watched_events}
SELECT id, (SELECT count(*) FROM events) AS events FROM written

-- name: register_node
INSERT INTO {nodes} (name, concurrency, types, started_at, heartbeat_at, heartbeat_interval,
    node_timeout)
VALUES (:name, :concurrency, :types, now(), now(), :heartbeat_interval, :node_timeout)
RETURNING id

-- name: heartbeat
UPDATE {nodes} SET heartbeat_at = now() WHERE id = :node RETURNING id

-- name: owned_tasks
SELECT id, state, requested, token FROM {tasks} WHERE node_id = :node

-- name: dead_nodes
-- Other nodes whose heartbeat is older than their own node_timeout (the database's clock).
SELECT id FROM {nodes}
WHERE id <> :node
    AND heartbeat_at < now() - make_interval(secs => CAST(node_timeout AS double precision))
ORDER BY id FOR UPDATE SKIP LOCKED

-- name: delete_nodes
DELETE FROM {nodes} WHERE id = ANY(CAST(:nodes AS bigint[]))

-- name: get_nodes
SELECT id, name, concurrency, types, started_at, heartbeat_at, heartbeat_interval,
    node_timeout
FROM {nodes} ORDER BY id

-- name: create_group
-- An upsert: two nodes setting a new group at once both succeed, one after the other.
INSERT INTO {groups} (name, paused, max_running, max_running_per_user, updated_at)
VALUES (:name, false, NULL, NULL, now())
ON CONFLICT (name) DO NOTHING

-- name: lock_group_settings
SELECT paused, max_running, max_running_per_user FROM {groups} WHERE name = :name FOR UPDATE

-- name: update_group
UPDATE {groups} SET paused = :paused, max_running = :max_running,
    max_running_per_user = :max_running_per_user, updated_at = now()
WHERE name = :name

-- name: get_groups
-- Every group that has tasks or settings, with its settings (NULL when unset).
SELECT n.name, g.paused, g.max_running, g.max_running_per_user
FROM (SELECT name FROM {groups} UNION SELECT DISTINCT group_name FROM {tasks}) n
LEFT JOIN {groups} g ON g.name = n.name
ORDER BY n.name

-- name: db_now
-- The database clock (times a bulk delete compares with are taken from it).
SELECT now()

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

-- name: prune_lock
-- Retention runs on one node at a time: a transaction-scoped advisory lock, tried, never
-- waited for (docs/design.md §4.5).
SELECT pg_try_advisory_xact_lock(hashtext(:key)) AS locked

-- name: prune
-- Up to :limit tasks in :state (FINISHED or FAILED) that ended more than :age seconds ago,
-- oldest first, removed. done_at < … implies the done index's predicate (done_at IS NOT NULL).
DELETE FROM {tasks} WHERE id IN (
    SELECT id FROM {tasks}
    WHERE state = :state
        AND done_at < now() - make_interval(secs => CAST(:age AS double precision))
    ORDER BY state, done_at LIMIT :limit
    FOR UPDATE SKIP LOCKED)

-- name: delete_group
-- A group back to the default settings has no row (docs/design.md §4.5).
DELETE FROM {groups} WHERE name = :name

-- name: register_task_types
-- The task types a worker runs, stored or updated (the last worker to start wins), in name
-- order so that two workers never wait for each other's rows in opposite orders.
INSERT INTO {task_types} (name, max_attempts, has_cleanup, updated_at)
SELECT v.name, v.max_attempts, v.has_cleanup, now()
FROM unnest(CAST(:names AS text[]), CAST(:max_attempts AS integer[]),
    CAST(:has_cleanup AS boolean[])) AS v(name, max_attempts, has_cleanup)
ORDER BY v.name
ON CONFLICT (name) DO UPDATE SET max_attempts = excluded.max_attempts,
    has_cleanup = excluded.has_cleanup, updated_at = excluded.updated_at

-- name: get_task_types
-- The stored task types named in :names (all of them with :all), by name.
SELECT name, max_attempts, has_cleanup, updated_at FROM {task_types}
WHERE :all OR name = ANY(CAST(:names AS text[]))
ORDER BY name
-- name: schedule_columns
-- The columns of a schedule as _rows.schedule reads them (a fragment).
name, type, cron, every, timezone, context, user_name, group_name, priority, max_attempts,
    declared, next_tick, last_tick, last_task_id, created_at, updated_at

-- name: put_schedule
-- Create or replace a schedule (docs/design.md §17). Its next tick is kept unless its period
-- changed: a node that declares its types' schedules at start moves nothing.
INSERT INTO {schedules} AS s (name, type, cron, every, timezone, context, user_name,
    group_name, priority, max_attempts, declared, next_tick, last_tick, last_task_id,
    created_at, updated_at)
VALUES (:name, :type, :cron, :every, :timezone, :context, :user, :group, :priority,
    :max_attempts, :declared, :next_tick, NULL, NULL, now(), now())
ON CONFLICT (name) DO UPDATE SET type = excluded.type, cron = excluded.cron,
    every = excluded.every, timezone = excluded.timezone, context = excluded.context,
    user_name = excluded.user_name, group_name = excluded.group_name,
    priority = excluded.priority, max_attempts = excluded.max_attempts,
    declared = excluded.declared,
    next_tick = CASE WHEN s.cron IS NOT DISTINCT FROM excluded.cron
            AND s.every IS NOT DISTINCT FROM excluded.every
            AND s.timezone = excluded.timezone
        THEN s.next_tick ELSE excluded.next_tick END,
    updated_at = now()
RETURNING {schedule_columns}

-- name: delete_schedule
DELETE FROM {schedules} WHERE name = :name RETURNING name

-- name: get_schedules
SELECT {schedule_columns} FROM {schedules} ORDER BY name

-- name: lock_due_schedules
-- The due schedules of :types, with the database's clock; a schedule another node is
-- enqueueing right now is skipped, not waited for.
SELECT {schedule_columns}, now() AS now FROM {schedules}
WHERE next_tick <= now() AND type = ANY(:types)
ORDER BY next_tick, name LIMIT :limit
FOR UPDATE SKIP LOCKED

-- name: advance_schedule
-- Compare-and-set: the schedule moves on only from the next tick it was read with, in the
-- transaction that inserts the tick's task (each tick is enqueued once).
UPDATE {schedules} SET next_tick = :next_tick, last_tick = :tick, last_task_id = :task_id,
    updated_at = now()
WHERE name = :name AND next_tick = :expected
RETURNING name

-- name: next_schedule_due
-- Seconds until the next tick of the schedules of :types (NULL: there are none).
SELECT EXTRACT(EPOCH FROM (min(next_tick) - now())) FROM {schedules} WHERE type = ANY(:types)

-- name: watch_tasks
-- Someone waits for or watches these tasks for :seconds at least: their writes notify the
-- watchers meanwhile (docs/design.md §18). The row lock orders the mark after any write in
-- flight, so every later write sees it.
UPDATE {tasks} SET watched_until = GREATEST(watched_until,
    now() + make_interval(secs => CAST(:seconds AS double precision)))
WHERE id = ANY(:ids)
