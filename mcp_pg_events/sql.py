"""All runtime SQL, one named statement each, parameters as ``$n``.

The tables are in ``schema.py``, the functions and the retention procedure in
``migrations/schema.sql`` (and the migrations that install them); nothing here is
built from user data. ``database.py`` runs these.

Advisory locks, every key this package takes (two-key form: namespace, key):
- ``(1835233381, hashint8(stream key))``, transaction-level: one append in
  flight per stream, across processes (``APPEND_BATCH``).
- ``hashtext('mcp_events_partitions')``, transaction-level: one partition
  maintainer at a time (``mcp_events_ensure_partitions``).
- ``hashtext('mcp_events_retention')``, session-level: one retention run per
  database (``mcp_events_retention``).
- ``(1835233382, worker id)``, session-level on the worker's lease connection:
  held while the worker process lives (``LOCK_WORKER``); transaction-level by
  whoever ends a dead worker's request, which fences the worker out meanwhile
  (``WORKER_DEAD``).
"""

# Find or create a session's stream; returns its key, tag and newest seq. The
# no-op updates make RETURNING give the existing row on conflict. A new stream
# records the worker that creates it: the one that runs its request.
# $1 session key, $2 stream name (bytes), $3 tag for a new stream,
# $4 the stream id in full when the name is its hash, else NULL, $5 worker id or NULL
UPSERT_STREAM = """
WITH session AS (
    INSERT INTO mcp_events_sessions (key) VALUES ($1)
    ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key
    RETURNING id
)
INSERT INTO mcp_events_streams (session_id, name, tag, full_name, worker_id)
SELECT session.id, $2, $3, $4, $5 FROM session
ON CONFLICT (session_id, name) DO UPDATE SET tag = mcp_events_streams.tag
RETURNING id, tag,
    (SELECT max(e.seq) FROM mcp_events_events e WHERE e.stream_key = mcp_events_streams.id) AS last_seq
"""

# A stream's key, tag and newest seq, if it exists: where to follow it "from now".
# An append in flight holds the stream's advisory lock and takes its seq after
# the newest committed row, so whatever commits after this read has a larger seq.
# $1 session key, $2 stream name (bytes)
STREAM_HEAD = """
SELECT st.id, st.tag,
    (SELECT max(e.seq) FROM mcp_events_events e WHERE e.stream_key = st.id) AS last_seq
FROM mcp_events_streams st
JOIN mcp_events_sessions se ON se.id = st.session_id
WHERE se.key = $1 AND st.name = $2
"""

# Append a batch of events (at most one per stream), committed together by the
# implicit transaction of the statement. Each stream's advisory lock (held until
# commit) keeps two appends to one stream from being in flight at once, even from
# two processes. Without it, a bigserial is not commit order: an append could take
# seq 10, another seq 11 and commit first, and a reader that saw 11 would resume
# after it and never see 10. The locks are taken in the order of their keys, so two
# batches cannot deadlock; the aggregate must finish before the join emits a row,
# so every nextval() runs after every lock is granted. The same row sets
# synchronous_commit for this transaction only (SET LOCAL, read at commit): the
# store's durability setting, without a round trip of its own.
# $1 stream keys, $2 message bytes (NULL for a priming event), same length,
# $3 synchronous_commit (NULL: the session's, left as it is)
APPEND_BATCH = """
INSERT INTO mcp_events_events (stream_key, seq, message)
SELECT batch.stream_key, nextval('mcp_events_seq'), batch.message
FROM (
    SELECT count(pg_advisory_xact_lock(1835233381, lock_key)) AS locked,
        set_config('synchronous_commit', coalesce($3::text, current_setting('synchronous_commit')), true)
            AS durability
    FROM (SELECT DISTINCT hashint8(k) AS lock_key FROM unnest($1::bigint[]) AS k ORDER BY 1) AS lock_keys
) AS stream_locks,
unnest($1::bigint[], $2::bytea[]) AS batch(stream_key, message)
RETURNING stream_key, seq
"""

# The newest row of each stream: after a connection dropped mid-append, tells
# whether that batch committed.
# $1 stream keys
NEWEST_EVENTS = """
SELECT k AS stream_key, e.seq, e.message
FROM unnest($1::bigint[]) AS k
CROSS JOIN LATERAL (
    SELECT seq, message FROM mcp_events_events WHERE stream_key = k ORDER BY seq DESC LIMIT 1
) AS e
"""

# Mark a session ended: retention then treats its events as expired once the
# grace period has passed, whatever their age. The first end counts; ending
# again does not push it back. Returns the row id, for the ended notification.
# $1 session key, $2 why (deleted, idle, expired, failed-open; NULL: by the application)
END_SESSION = """
UPDATE mcp_events_sessions SET ended_at = now(), ended_reason = $2
WHERE key = $1 AND ended_at IS NULL
RETURNING id
"""

# --- the session registry (registry.py) ---

# Register a session as its id first goes out: from now on any worker can serve it.
# Once only: a registered row is never overwritten (nor its owner changed).
# $1 session key, $2 initialize params (json text), $3 negotiated protocol version,
# $4 owner (json text or NULL), $5 idle timeout in seconds or NULL, $6 worker id or NULL
REGISTER_SESSION = """
INSERT INTO mcp_events_sessions AS se
    (key, registered_at, handshake, protocol_version, owner, idle_timeout, last_active_at, active_worker)
VALUES ($1, now(), $2::jsonb, $3, $4::jsonb, $5, now(), $6)
ON CONFLICT (key) DO UPDATE SET
    registered_at = now(), handshake = EXCLUDED.handshake, protocol_version = EXCLUDED.protocol_version,
    owner = EXCLUDED.owner, idle_timeout = EXCLUDED.idle_timeout, last_active_at = now(),
    active_worker = EXCLUDED.active_worker
WHERE se.registered_at IS NULL AND se.ended_at IS NULL
RETURNING id
"""

# What a worker that does not hold a session needs to serve it, and whether it may:
# ended, or idle past its timeout (plus the slack of batched activity writes).
# $1 session key, $2 slack in seconds
ADOPTABLE_SESSION = """
SELECT id, handshake::text AS handshake, protocol_version, owner::text AS owner,
    ended_at IS NOT NULL AS ended,
    idle_timeout IS NOT NULL AND last_active_at < now() - make_interval(secs => idle_timeout + $2) AS expired
FROM mcp_events_sessions
WHERE key = $1 AND registered_at IS NOT NULL
"""

# Record when the sessions a worker serves were last active (each given as seconds
# ago, so a batch written late still says when), and which worker said so last.
# Returns the sessions still live: one missing has ended (or is gone).
# $1 session keys, $2 seconds since each was active, $3 worker id or NULL
TOUCH_SESSIONS = """
UPDATE mcp_events_sessions se
SET last_active_at = greatest(se.last_active_at, t.at),
    active_worker = CASE WHEN se.last_active_at IS NULL OR t.at >= se.last_active_at
                         THEN $3 ELSE se.active_worker END
FROM (
    SELECT k, now() - make_interval(secs => a) AS at FROM unnest($1::text[], $2::float8[]) AS u(k, a)
) AS t
WHERE se.key = t.k AND se.ended_at IS NULL
RETURNING se.id, se.key
"""

# End a session a worker found idle past its timeout, unless another worker has
# used it since: the newest activity was this worker's, or is that old anyway.
# $1 session key, $2 worker id or NULL, $3 idle timeout in seconds
END_SESSION_IF_IDLE = """
UPDATE mcp_events_sessions SET ended_at = now(), ended_reason = 'idle'
WHERE key = $1 AND ended_at IS NULL
  AND (active_worker = $2 OR last_active_at IS NULL
       OR last_active_at <= now() - make_interval(secs => $3))
RETURNING id
"""

# Which of these sessions (row ids) ended, or are gone: after the listener was
# down, the notifications it missed.
# $1 session row ids
ENDED_SESSIONS = """
SELECT k AS id FROM unnest($1::bigint[]) AS k
WHERE NOT EXISTS (SELECT FROM mcp_events_sessions se WHERE se.id = k AND se.ended_at IS NULL)
"""

# --- workers (workers.py) ---

# A new worker's row. $1 pid, $2 host
REGISTER_WORKER = "INSERT INTO mcp_events_workers (pid, host) VALUES ($1, $2) RETURNING id"

# The worker's lease: held by its lease connection for as long as the process
# lives; released by PostgreSQL the moment that connection ends (a kill included).
# $1 worker id
LOCK_WORKER = "SELECT pg_try_advisory_lock(1835233382, $1)"

# The heartbeat; no row when the worker was ended or forgotten meanwhile.
# $1 worker id
HEARTBEAT = "UPDATE mcp_events_workers SET seen_at = now() WHERE id = $1 AND ended_at IS NULL RETURNING id"

# A clean shutdown: the worker's unanswered requests will not be answered.
# $1 worker id
END_WORKER = "UPDATE mcp_events_workers SET ended_at = now() WHERE id = $1 AND ended_at IS NULL"

# The workers among these that may be dead: ended, gone, or silent for longer than
# the grace period (WORKER_DEAD decides).
# $1 worker ids, $2 grace period in seconds
SILENT_WORKERS = """
SELECT k AS id FROM unnest($1::int[]) AS k
WHERE NOT EXISTS (
    SELECT FROM mcp_events_workers w
    WHERE w.id = k AND w.ended_at IS NULL AND w.seen_at >= now() - make_interval(secs => $2)
)
"""

# Inside the transaction that ends a dead worker's request: is it dead? Ended or
# forgotten: yes; heard from within the grace period: no; else its lease says, at
# once. CASE, because SQL promises no order for AND/OR: the lock is only tried
# last, and, when granted, keeps the worker from taking its lease back until commit.
# $1 worker id, $2 grace period in seconds
WORKER_DEAD = """
SELECT CASE
    WHEN w.id IS NULL OR w.ended_at IS NOT NULL THEN true
    WHEN w.seen_at >= now() - make_interval(secs => $2) THEN false
    ELSE pg_try_advisory_xact_lock(1835233382, w.id)
END
FROM (SELECT $1::int AS k) AS x
LEFT JOIN mcp_events_workers w ON w.id = x.k
"""

# The stream's append lock, as APPEND_BATCH takes it: whoever writes into a stream
# holds it until commit. $1 stream key
LOCK_STREAM = "SELECT pg_advisory_xact_lock(1835233381, hashint8($1::bigint))"

# A request stream as its orphan closer needs it, locked: its worker, its name, and
# its newest message. No row for a stream of an ended session.
# $1 stream key
ORPHAN_STREAM = """
SELECT st.worker_id, st.name,
    (SELECT e.message FROM mcp_events_events e
     WHERE e.stream_key = st.id AND e.message IS NOT NULL
     ORDER BY e.seq DESC LIMIT 1) AS last_message
FROM mcp_events_streams st
JOIN mcp_events_sessions se ON se.id = st.session_id
WHERE st.id = $1 AND se.ended_at IS NULL
FOR UPDATE OF st
"""

# The error that ends a dead worker's request, stored like any event; the stream
# then names no worker, so no one closes it twice.
# $1 stream key, $2 message bytes
CLOSE_ORPHAN = """
WITH closed AS (UPDATE mcp_events_streams SET worker_id = NULL WHERE id = $1)
INSERT INTO mcp_events_events (stream_key, seq, message) VALUES ($1, nextval('mcp_events_seq'), $2)
RETURNING seq
"""

# Which of these streams still exist (retention removes empty ones).
# $1 stream keys
EXISTING_STREAMS = "SELECT id FROM mcp_events_streams WHERE id = ANY($1::bigint[])"

# A wake-up for live readers, sent after the commit it announces (see wakeups.py):
# one notification per payload, all in one transaction.
# $1 channel, $2 payloads
NOTIFY = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"

# End the server process of an append whose answer was lost, and wait (up to 10 s)
# until it is gone, so it cannot commit after we looked. Only a process of our own
# role in this database: a pid may have been reused. NULL when it is already gone.
# $1 pid
END_BACKEND = """
SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity
WHERE pid = $1 AND usename = current_user AND datname = current_database()
"""

# The session a cursor's stream belongs to, for a store asked to replay without
# being told the session (FastMCP's own session scoping, see store.py): the caller
# accepts only sessions of the shape it made.
# $1 stream key, $2 tag
CURSOR_SESSION = """
SELECT se.key FROM mcp_events_streams st
JOIN mcp_events_sessions se ON se.id = st.session_id
WHERE st.id = $1 AND st.tag = $2
"""

# The stream (st) of a client's cursor, when the cursor's event still exists and
# the stream belongs to this session; no row for a foreign, forged or expired
# cursor. Every read that starts from a cursor goes through this one check; the
# statements below join it to constants of their own (S608: no input is joined).
# $1 stream key, $2 seq, $3 tag, $4 session key
_CURSOR_IN_SESSION = """
FROM mcp_events_streams st
JOIN mcp_events_sessions se ON se.id = st.session_id
WHERE st.id = $1 AND st.tag = $3 AND se.key = $4
  AND EXISTS (SELECT FROM mcp_events_events e WHERE e.stream_key = $1 AND e.seq = $2)
"""

# Resolve a subscription's cursor: the stream's id (in full, also when the indexed
# name is its hash), the newest message at or before the cursor (a subscription
# whose cursor is at or past the response of its request has nothing to wait for),
# and the worker that runs its request.
# $1 stream key, $2 seq, $3 tag, $4 session key
CURSOR_STREAM = (
    """
SELECT coalesce(st.full_name, st.name) AS name, st.worker_id,
    (SELECT e.message FROM mcp_events_events e
     WHERE e.stream_key = $1 AND e.seq <= $2 AND e.message IS NOT NULL
     ORDER BY e.seq DESC LIMIT 1) AS last_message"""  # noqa: S608
    + _CURSOR_IN_SESSION
)

# One page of a replay, in order, priming rows skipped. Pages keep memory bounded
# and no transaction stays open while the client is slow.
#
# LIMIT (SELECT $3), not LIMIT $3: without statistics (a partition autovacuum
# has not analyzed yet) the planner guesses a stream's rows at a 600th of the
# partition's; below a page, a known limit had it scan the whole rest of the
# stream and sort it, in every custom plan (3.6 ms instead of 0.3 ms for a page
# of 500 at the start of a 10,000-event stream): each connection's first five
# pages, asyncpg caching the statement, and every page without that cache. A
# limit it cannot know has it plan for a fraction of the rows: the index, in order.
# $1 stream key, $2 seq after which to read, $3 page size
REPLAY_PAGE = """
SELECT seq, message FROM mcp_events_events
WHERE stream_key = $1 AND seq > $2 AND message IS NOT NULL
ORDER BY seq
LIMIT (SELECT $3::int)
"""

# A replay's cursor check and its first page in one round trip: the cursor's
# check (_CURSOR_IN_SESSION), and REPLAY_PAGE's page, read only when it passed.
# Rows are (name, seq, message) in seq order; the stream's name (a client's
# request id, up to 1 MiB) on the first row only. One row with a NULL seq when
# nothing follows the cursor; none when the cursor is not valid in this session.
# $1 stream key, $2 seq after which to read, $3 tag, $4 session key, $5 page size
REPLAY_FROM_CURSOR = (
    """
SELECT CASE WHEN e.n IS NULL OR e.n = 1 THEN c.name END AS name, e.seq, e.message
FROM (
    SELECT coalesce(st.full_name, st.name) AS name"""  # noqa: S608
    + _CURSOR_IN_SESSION
    + """) AS c
LEFT JOIN LATERAL (
    SELECT seq, message, row_number() OVER (ORDER BY seq) AS n
    FROM (
        SELECT seq, message FROM mcp_events_events
        WHERE stream_key = $1 AND seq > $2 AND message IS NOT NULL
        ORDER BY seq
        LIMIT (SELECT $5::int)
    ) AS page
) AS e ON true
ORDER BY e.seq
"""
)

# The next page of many live subscriptions at once, each after its own cursor,
# priming rows included (they move a cursor on). One query per wake-up, however
# many subscriptions it wakes; each lateral probe reads only partitions above its
# cursor. The first column is the 1-based position of the cursor in the arrays.
# The limit is a subquery for the reason REPLAY_PAGE's is.
# $1 stream keys, $2 seqs after which to read, $3 rows per subscription at most
TAIL_PAGES = """
SELECT c.i, e.seq, e.message
FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS c(stream_key, after, i)
CROSS JOIN LATERAL (
    SELECT seq, message FROM mcp_events_events
    WHERE stream_key = c.stream_key AND seq > c.after
    ORDER BY seq
    LIMIT (SELECT $3::int)
) AS e
ORDER BY c.i, e.seq
"""

# Create the partitions the sequence needs next (SECURITY DEFINER, see the migration).
ENSURE_PARTITIONS = "SELECT mcp_events_ensure_partitions()"

# The schema version alembic recorded.
SCHEMA_VERSION = "SELECT version_num FROM mcp_events_alembic_version"
# Whether the version table exists: before the first migration it does not.
HAS_SCHEMA_VERSION = "SELECT to_regclass('mcp_events_alembic_version') IS NOT NULL"

# The oldest code revision a database newer than the code still serves (see
# database.check_schema); asked only of a database newer than the code.
COMPATIBLE_SINCE = "SELECT mcp_events_compatible_since()"

# The listener's liveness probe.
PING = "SELECT 1"

# Retention's connection: the whole run is one CALL whose steps commit one by one
# inside, so a statement timeout meant for the application would cut it short.
NO_STATEMENT_TIMEOUT = "SET statement_timeout = 0"

# One retention run (see migrations/schema.sql).
# $1 ttl, $2 batch size, $3 ended grace, $4 partition max age (NULL: a quarter of the ttl),
# $5 partitions ahead, $6 lock timeout, $7 dry run
RETENTION = """
CALL mcp_events_retention(
    ttl => $1, batch_size => $2, ended_grace => $3, partition_max_age => $4,
    partitions_ahead => $5, lock_timeout => $6, dry_run => $7
)
"""

# --- the operator's commands (`status`, `sessions`, `tail`) ---------------------------------
# They run as the tables' owner or the runtime role, and read what grants.sql gives
# the runtime role, or catalogs that every role may read.

# The server, as status shows it.
SERVER = "SELECT current_setting('server_version') AS version, current_database() AS db, current_user AS role"

# A bound on each statement of an operator's command (a probe must not hang behind a lock).
# $1 e.g. '10s'
STATEMENT_TIMEOUT = "SELECT set_config('statement_timeout', $1, false)"

# The attached partitions of the events table, oldest first, with their size on disk
# and the planner's row estimate (-1: never analyzed). The bounds are parsed as in
# mcp_events_partitions(), which the runtime role may not execute.
PARTITION_SIZES = r"""
SELECT c.relname AS name, b[1]::bigint AS lower, b[2]::bigint AS upper,
    pg_total_relation_size(c.oid) AS bytes, c.reltuples::bigint AS rows
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL regexp_match(
    pg_get_expr(c.relpartbound, c.oid), 'FROM \(''?(-?\d+)''?\) TO \(''?(-?\d+)''?\)'
) AS b
WHERE i.inhparent = 'mcp_events_events'::regclass
ORDER BY 2
"""

# The seq the next append takes (as mcp_events_next_seq()). Needs SELECT on the
# sequence: the owner's and the retention role's.
NEXT_SEQ = "SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM mcp_events_seq"

# The same from USAGE alone (the runtime role's): NULL until the sequence's first
# use after its creation or a roll-over.
NEXT_SEQ_FROM_USAGE = "SELECT pg_sequence_last_value('mcp_events_seq') + 1"

# How old events older than $1 are, if there are any: the oldest of the first
# thousand found, partitions oldest first (retention removes a prefix of the
# sequence, so that is about the oldest of all, and a database that retention
# neglects is not read whole). The BRIN index on (seq, created_at) skips every
# page range without one: a database within its bounds answers without reading
# the table.
# $1 interval
OLDEST_AGE_BEYOND = """
SELECT now() - min(created_at) FROM (
    SELECT created_at FROM mcp_events_events WHERE created_at < now() - $1::interval LIMIT 1000
) AS old
"""

# Sessions and streams: not ended, and those with an event in the last $1 (the
# BRIN index again: only the newest page ranges are read); ended ones waiting for
# retention, and how long ago the first of them ended. Reads no session key.
# $1 interval
SESSION_COUNTS = """
SELECT
    (SELECT count(*) FROM mcp_events_sessions WHERE ended_at IS NULL) AS open_sessions,
    (SELECT count(*) FROM mcp_events_streams st
     JOIN mcp_events_sessions se ON se.id = st.session_id WHERE se.ended_at IS NULL) AS open_streams,
    (SELECT count(DISTINCT st.session_id) FROM mcp_events_events e
     JOIN mcp_events_streams st ON st.id = e.stream_key
     WHERE e.created_at >= now() - $1::interval) AS active_sessions,
    (SELECT count(DISTINCT e.stream_key) FROM mcp_events_events e
     WHERE e.created_at >= now() - $1::interval) AS active_streams,
    (SELECT count(*) FROM mcp_events_sessions WHERE ended_at IS NOT NULL) AS ended_sessions,
    (SELECT now() - min(ended_at) FROM mcp_events_sessions WHERE ended_at IS NOT NULL) AS oldest_end_age
"""

# The LISTEN connections of stores on this database (one per store process), and
# how many of them this role may see the state of (its own, or all with
# pg_read_all_stats); the cluster-wide notification queue's fill, 0 to 1.
# $1 the listener's application_name
LISTENERS = """
SELECT count(*) AS listeners,
    count(state) AS visible,
    count(*) FILTER (WHERE state = 'idle in transaction') AS stuck,
    pg_notification_queue_usage() AS queue_usage
FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1
"""

# The newest sessions ($2 at most; $1: ended ones too) with their streams, events,
# message bytes and newest event. `registry` holds the session row's other columns
# (those a newer schema adds), but never the key, nor the handshake it may keep.
# The sessions are chosen first, so that only theirs are counted.
# $1 include ended sessions, $2 limit
SESSIONS = """
WITH chosen AS (
    SELECT * FROM mcp_events_sessions
    WHERE $1 OR ended_at IS NULL
    ORDER BY created_at DESC, id DESC
    LIMIT $2
)
SELECT se.key, se.created_at, se.ended_at,
    to_jsonb(se) - 'id' - 'key' - 'created_at' - 'ended_at' - 'handshake' AS registry,
    totals.streams, totals.events, totals.bytes, totals.newest_event
FROM chosen se
CROSS JOIN LATERAL (
    SELECT count(*) AS streams, coalesce(sum(ev.events), 0)::bigint AS events,
        coalesce(sum(ev.bytes), 0)::bigint AS bytes, max(ev.newest) AS newest_event
    FROM mcp_events_streams st
    CROSS JOIN LATERAL (
        SELECT count(*) AS events, sum(octet_length(e.message)) AS bytes, max(e.created_at) AS newest
        FROM mcp_events_events e WHERE e.stream_key = st.id
    ) ev
    WHERE st.session_id = se.id
) totals
ORDER BY se.created_at DESC, se.id DESC
"""

# One session by key, as SESSIONS shows it, and its client's name and version
# from the handshake, when the schema keeps one.
# $1 session key
SESSION = """
SELECT se.key, se.created_at, se.ended_at,
    to_jsonb(se) - 'id' - 'key' - 'created_at' - 'ended_at' - 'handshake' AS registry,
    to_jsonb(se) #> '{handshake,clientInfo}' AS client
FROM mcp_events_sessions se
WHERE se.key = $1
"""

# A session's streams, oldest first, with their events, message bytes, first and
# newest seq, and newest event.
# $1 session key
SESSION_STREAMS = """
SELECT st.id, st.name, st.tag, st.created_at, ev.events, coalesce(ev.bytes, 0)::bigint AS bytes,
    ev.first_seq, ev.last_seq, ev.newest
FROM mcp_events_streams st
JOIN mcp_events_sessions se ON se.id = st.session_id
CROSS JOIN LATERAL (
    SELECT count(*) AS events, sum(octet_length(e.message)) AS bytes, min(e.seq) AS first_seq,
        max(e.seq) AS last_seq, max(e.created_at) AS newest
    FROM mcp_events_events e WHERE e.stream_key = st.id
) ev
WHERE se.key = $1
ORDER BY st.id
"""

# Whether the session exists and has ended, and its streams newer than stream key
# $2 with their key, tag, name and newest seq: how `tail` finds the streams to
# follow, at its start and then periodically. One row with NULL stream columns when
# there is no newer stream; none when there is no such session.
# $1 session key, $2 stream key
NEW_STREAMS = """
SELECT se.ended_at, st.id, st.tag, st.name,
    (SELECT max(e.seq) FROM mcp_events_events e WHERE e.stream_key = st.id) AS last_seq
FROM mcp_events_sessions se
LEFT JOIN mcp_events_streams st ON st.session_id = se.id AND st.id > $2
WHERE se.key = $1
ORDER BY st.id
"""

# When these events of a stream were stored, for `tail`'s lines.
# $1 stream key, $2 seqs
EVENT_TIMES = """
SELECT seq, created_at FROM mcp_events_events WHERE stream_key = $1 AND seq = ANY($2::bigint[])
"""

# --- rest_framework_mcp (mcp_pg_events.rest_framework) --------------------------------------

# Find or create a session's stream, as UPSERT_STREAM does, with the database's
# clock and the stream's newest event and its creation time: where a reader that
# subscribed a moment ago starts (see STREAM_SEQ_BEFORE).
# $1 session key, $2 stream name (bytes), $3 tag for a new stream
STREAM_NEWEST = """
WITH session AS (
    INSERT INTO mcp_events_sessions (key) VALUES ($1)
    ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key
    RETURNING id
), stream AS (
    INSERT INTO mcp_events_streams (session_id, name, tag)
    SELECT session.id, $2, $3 FROM session
    ON CONFLICT (session_id, name) DO UPDATE SET tag = mcp_events_streams.tag
    RETURNING id, tag
)
SELECT stream.id, stream.tag, now() AS now, newest.seq, newest.created_at
FROM stream
LEFT JOIN LATERAL (
    SELECT e.seq, e.created_at FROM mcp_events_events e
    WHERE e.stream_key = stream.id ORDER BY e.seq DESC LIMIT 1
) AS newest ON true
"""

# The newest event of a stream created before a moment. Within a stream created_at
# grows with seq (one append in flight per stream, each its own transaction), so
# this is the stream's head as of that moment.
# $1 stream key, $2 timestamptz
STREAM_SEQ_BEFORE = """
SELECT e.seq FROM mcp_events_events e
WHERE e.stream_key = $1 AND e.created_at < $2
ORDER BY e.seq DESC LIMIT 1
"""

# A resuming reader's cursor in the stream of this name of this session: whether
# its event is still there. No row for a cursor that is not that stream's
# (another session's, another stream's, a forged tag): those stay silent.
# $1 stream key, $2 seq, $3 tag, $4 session key, $5 stream name (bytes)
STREAM_CURSOR = """
SELECT EXISTS (SELECT FROM mcp_events_events e WHERE e.stream_key = $1 AND e.seq = $2) AS present
FROM mcp_events_streams st
JOIN mcp_events_sessions se ON se.id = st.session_id
WHERE st.id = $1 AND st.tag = $3 AND se.key = $4 AND st.name = $5
"""

# A new session bound to its principal, active as of now.
# $1 session key, $2 principal
SESSION_CREATE = "INSERT INTO mcp_events_sessions (key, principal, last_active_at) VALUES ($1, $2, now())"

# A live session's principal, with its activity recorded, and the database's clock
# (the GET stream that follows starts there). Live: bound to a principal, not ended,
# active within the idle window and younger than the maximum age (NULL: none).
# Activity is written only when the last write is older than $4 seconds: at most
# one row update per session per interval, however many requests.
# $1 session key, $2 idle seconds, $3 maximum age in seconds or NULL, $4 seconds
SESSION_OWNER = """
WITH live AS (
    SELECT id, principal, coalesce(last_active_at, created_at) AS active_at
    FROM mcp_events_sessions
    WHERE key = $1 AND principal IS NOT NULL AND ended_at IS NULL
      AND coalesce(last_active_at, created_at) > now() - make_interval(secs => $2)
      AND ($3::float8 IS NULL OR created_at > now() - make_interval(secs => $3::float8))
), touched AS (
    UPDATE mcp_events_sessions se SET last_active_at = now()
    FROM live
    WHERE se.id = live.id AND live.active_at < now() - make_interval(secs => $4)
)
SELECT principal, now() FROM live
"""

# Whether a session is live (as SESSION_OWNER), without recording activity.
# $1 session key, $2 idle seconds, $3 maximum age in seconds or NULL
SESSION_EXISTS = """
SELECT EXISTS (
    SELECT FROM mcp_events_sessions
    WHERE key = $1 AND principal IS NOT NULL AND ended_at IS NULL
      AND coalesce(last_active_at, created_at) > now() - make_interval(secs => $2)
      AND ($3::float8 IS NULL OR created_at > now() - make_interval(secs => $3::float8))
)
"""

# A new task, expiring $6 seconds from now.
# $1 namespace, $2 task id, $3 principal, $4 status, $5 record (JSON bytes), $6 seconds
TASK_CREATE = """
INSERT INTO mcp_events_tasks (namespace, task_id, principal, status, record, expires_at)
VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
"""

# A task's record, unless it expired (retention deletes it later).
# $1 namespace, $2 task id
TASK_GET = "SELECT record FROM mcp_events_tasks WHERE namespace = $1 AND task_id = $2 AND expires_at > now()"

# Overwrite a task in place, keeping its expiry. An expired or deleted task is not
# brought back, and a finished one (completed, failed, cancelled) never changes
# status again: a worker's late progress write cannot reopen a task a client
# cancelled meanwhile in another process.
# $1 namespace, $2 task id, $3 principal, $4 status, $5 record (JSON bytes)
TASK_SAVE = """
UPDATE mcp_events_tasks SET principal = $3, status = $4, record = $5, updated_at = now()
WHERE namespace = $1 AND task_id = $2 AND expires_at > now()
  AND (status NOT IN ('completed', 'failed', 'cancelled') OR status = $4)
"""

# $1 namespace, $2 task id
TASK_DELETE = "DELETE FROM mcp_events_tasks WHERE namespace = $1 AND task_id = $2"
