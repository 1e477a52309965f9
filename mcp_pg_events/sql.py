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
# $1 session key, $2 stream name (bytes), $3 tag for a new stream
UPSERT_STREAM = """
WITH session AS (
    INSERT INTO mcp_events_sessions (key) VALUES ($1)
    ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key
    RETURNING id
)
INSERT INTO mcp_events_streams (session_id, name, tag)
SELECT session.id, $2, $3 FROM session
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

# A wake-up for live readers, sent after the commit it announces (see wakeups.py).
# $1 channel, $2 payload
NOTIFY = "SELECT pg_notify($1, $2)"

# End the server process of an append whose answer was lost, and wait (up to 10 s)
# until it is gone, so it cannot commit after we looked. Only a process of our own
# role in this database: a pid may have been reused. NULL when it is already gone.
# $1 pid
END_BACKEND = """
SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity
WHERE pid = $1 AND usename = current_user AND datname = current_database()
"""

# Resolve a replay cursor: the stream's name when the cursor event still exists and
# belongs to this session, and the newest message at or before the cursor (a
# subscription whose cursor is at or past the response of its request has nothing
# to wait for). A foreign, forged or expired cursor gives no row.
# $1 stream key, $2 seq, $3 tag, $4 session key
CURSOR_STREAM = """
SELECT st.name,
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
