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
"""

# Find or create a session's stream; returns its key, tag and newest seq. The
# no-op updates make RETURNING give the existing row on conflict.
# $1 session key, $2 stream name (bytes), $3 tag for a new stream,
# $4 the stream id in full when the name is its hash, else NULL
UPSERT_STREAM = """
WITH session AS (
    INSERT INTO mcp_events_sessions (key) VALUES ($1)
    ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key
    RETURNING id
)
INSERT INTO mcp_events_streams (session_id, name, tag, full_name)
SELECT session.id, $2, $3, $4 FROM session
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
# so every nextval() runs after every lock is granted.
# $1 stream keys, $2 message bytes (NULL for a priming event), same length
APPEND_BATCH = """
INSERT INTO mcp_events_events (stream_key, seq, message)
SELECT batch.stream_key, nextval('mcp_events_seq'), batch.message
FROM (
    SELECT count(pg_advisory_xact_lock(1835233381, lock_key)) AS locked
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
# again does not push it back.
# $1 session key
END_SESSION = "UPDATE mcp_events_sessions SET ended_at = now() WHERE key = $1 AND ended_at IS NULL"

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

# Resolve a replay cursor: the stream's id (in full, also when the indexed name is
# its hash) when the cursor event still exists and belongs to this session, and
# the newest message at or before the cursor (a subscription whose cursor is at or
# past the response of its request has nothing to wait for). A foreign, forged or
# expired cursor gives no row.
# $1 stream key, $2 seq, $3 tag, $4 session key
CURSOR_STREAM = """
SELECT coalesce(st.full_name, st.name) AS name,
    (SELECT e.message FROM mcp_events_events e
     WHERE e.stream_key = $1 AND e.seq <= $2 AND e.message IS NOT NULL
     ORDER BY e.seq DESC LIMIT 1) AS last_message
FROM mcp_events_streams st
JOIN mcp_events_sessions se ON se.id = st.session_id
WHERE st.id = $1 AND st.tag = $3 AND se.key = $4
  AND EXISTS (SELECT FROM mcp_events_events e WHERE e.stream_key = $1 AND e.seq = $2)
"""

# One page of a replay, in order, priming rows skipped. Pages keep memory bounded
# and no transaction stays open while the client is slow.
# $1 stream key, $2 seq after which to read, $3 page size
REPLAY_PAGE = """
SELECT seq, message FROM mcp_events_events
WHERE stream_key = $1 AND seq > $2 AND message IS NOT NULL
ORDER BY seq
LIMIT $3
"""

# The next page of many live subscriptions at once, each after its own cursor,
# priming rows included (they move a cursor on). One query per wake-up, however
# many subscriptions it wakes; each lateral probe reads only partitions above its
# cursor. The first column is the 1-based position of the cursor in the arrays.
# $1 stream keys, $2 seqs after which to read, $3 rows per subscription at most
TAIL_PAGES = """
SELECT c.i, e.seq, e.message
FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS c(stream_key, after, i)
CROSS JOIN LATERAL (
    SELECT seq, message FROM mcp_events_events
    WHERE stream_key = c.stream_key AND seq > c.after
    ORDER BY seq
    LIMIT $3
) AS e
ORDER BY c.i, e.seq
"""

# Create the partitions the sequence needs next (SECURITY DEFINER, see the migration).
ENSURE_PARTITIONS = "SELECT mcp_events_ensure_partitions()"

# The schema version alembic recorded.
SCHEMA_VERSION = "SELECT version_num FROM mcp_events_alembic_version"

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
