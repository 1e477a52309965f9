"""All runtime SQL, one named statement each, parameters as ``$n``.

The schema itself is in ``schema.py`` and the migrations; nothing here is built
from user data.
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

# Append one event, committed by the implicit transaction of the statement.
# The advisory lock (held until commit) keeps two appends to one stream from being
# in flight at once, even from two processes. Without it, a bigserial is not commit
# order: an append could take seq 10, another seq 11 and commit first, and a reader
# that saw 11 would resume after it and never see 10. The lock is taken in the FROM
# clause, so nextval() runs after it is granted.
# $1 stream key, $2 message bytes (NULL for a priming event)
APPEND = """
INSERT INTO mcp_events_events (stream_key, seq, message)
SELECT $1, nextval('mcp_events_seq'), $2
FROM (SELECT pg_advisory_xact_lock(1835233381, hashint8($1))) AS stream_lock
RETURNING seq
"""

# The newest row of a stream: after a connection dropped mid-append, tells whether
# that append committed.
# $1 stream key
LAST_EVENT = """
SELECT seq, message FROM mcp_events_events WHERE stream_key = $1 ORDER BY seq DESC LIMIT 1
"""

# End the server process of an append whose answer was lost, and wait (up to 10 s)
# until it is gone, so it cannot commit after we looked. Only a process of our own
# role in this database: a pid may have been reused. NULL when it is already gone.
# $1 pid
END_BACKEND = """
SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity
WHERE pid = $1 AND usename = current_user AND datname = current_database()
"""

# Resolve a replay cursor: the stream's name when the cursor event still exists and
# belongs to this session. A foreign, forged or expired cursor gives no row.
# $1 stream key, $2 seq, $3 tag, $4 session key
CURSOR_STREAM = """
SELECT st.name
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

# Create the partitions the sequence needs next (SECURITY DEFINER, see the migration).
ENSURE_PARTITIONS = "SELECT mcp_events_ensure_partitions()"

# The schema version alembic recorded.
SCHEMA_VERSION = "SELECT version_num FROM mcp_events_alembic_version"
