"""Retention: a BRIN index, partition maintenance functions, the retention procedure.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21

Upgrading builds the BRIN index on every existing partition: one sequential read
of the table, during which inserts wait (about a second per million events).

The retention work itself is the procedure ``mcp_events_retention``: the
``mcp-pg-events retention`` command calls it, and so can pg_cron. It commits after
every step (each detach, drop and delete batch is a short transaction of its own),
so it is safe to kill at any point and the next run finishes the job.

Readers must never see a stream with a hole: the store's replay returns None when
the cursor's event is gone, so a cursor that survives must have every later event
of its stream still there. Retention therefore only ever removes a prefix of the
sequence: whole partitions oldest first, then rows in ascending seq up to the
first event that has not expired; a stream's events are never newer-first.
Appends to one stream are serialized (advisory lock before nextval), so a
stream's events commit in seq order and no late commit can land below a
committed event of the same stream. Ended sessions go whole, stream by stream,
each oldest first.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The partitions of the events table, oldest first, and the tables that a killed
# retention run detached but did not drop (no bounds any more; the name still
# holds the lower bound). A detach only ever happens in retention, and ensure
# creates and attaches a table in one transaction, so any unattached table with a
# partition's name is a leftover.
PARTITIONS = r"""
CREATE FUNCTION mcp_events_partitions()
RETURNS TABLE (relid regclass, name text, lower bigint, upper bigint, attached boolean)
LANGUAGE sql
STABLE
SET search_path FROM CURRENT
AS $$
    SELECT c.oid::regclass, c.relname::text, b[1]::bigint, b[2]::bigint, true
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL regexp_match(
        pg_get_expr(c.relpartbound, c.oid), 'FROM \(''?(-?\d+)''?\) TO \(''?(-?\d+)''?\)'
    ) AS b
    WHERE i.inhparent = 'mcp_events_events'::regclass
    UNION ALL
    SELECT c.oid::regclass, c.relname::text, substr(c.relname, 20)::bigint, NULL, false
    FROM pg_class c
    WHERE c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'mcp_events_events'::regclass)
      AND c.relkind = 'r'
      AND NOT c.relispartition
      AND c.relname ~ '^mcp_events_events_p\d+$'
    ORDER BY 3
$$
"""

# The seq the next append will get. Partitions at or above it may still receive
# rows; only those wholly below it may go.
NEXT_SEQ = """
CREATE FUNCTION mcp_events_next_seq()
RETURNS bigint
LANGUAGE sql
STABLE
SET search_path FROM CURRENT
AS $$
    SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM mcp_events_seq
$$
"""

# Whether the partition [p_lower, p_upper) may go as a whole: the sequence has
# moved past it and none of its events is at or after the cutoff. The BRIN index
# makes this a read of the index, not of the partition, once it is summarized.
PARTITION_EXPIRED = """
CREATE FUNCTION mcp_events_partition_expired(
    p_lower bigint, p_upper bigint, p_next bigint, p_cutoff timestamptz
)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path FROM CURRENT
AS $$
    SELECT p_upper <= p_next AND NOT EXISTS (
        SELECT FROM mcp_events_events WHERE seq >= p_lower AND seq < p_upper AND created_at >= p_cutoff
    )
$$
"""

# lock_timeout for the rest of the transaction: DDL that waits for a lock makes
# every append queue behind it, so it gives up instead and the next run retries.
SET_LOCK_TIMEOUT = """
CREATE FUNCTION mcp_events_set_lock_timeout(p_timeout interval)
RETURNS void
LANGUAGE sql
SET search_path FROM CURRENT
AS $$
    SELECT set_config(
        'lock_timeout', greatest(1, ceil(extract(epoch FROM p_timeout) * 1000))::bigint || 'ms', true
    )
$$
"""

# Summarize the BRIN ranges written since the last run, so that the checks below
# read summaries instead of pages (an unsummarized range always matches). Skips a
# partition that a vacuum holds: vacuum summarizes too, and waiting for it could
# take long. SECURITY DEFINER: summarizing needs the owner.
SUMMARIZE = """
CREATE FUNCTION mcp_events_summarize()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    v_index regclass;
    v_table regclass;
    v_ranges bigint := 0;
BEGIN
    FOR v_index, v_table IN
        SELECT i.inhrelid::regclass, x.indrelid::regclass
        FROM pg_inherits i
        JOIN pg_index x ON x.indexrelid = i.inhrelid
        WHERE i.inhparent = 'mcp_events_events_seq_created_at_idx'::regclass
    LOOP
        BEGIN
            EXECUTE format('LOCK TABLE %s IN SHARE UPDATE EXCLUSIVE MODE NOWAIT', v_table);
            v_ranges := v_ranges + brin_summarize_new_values(v_index);
        EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
            NULL;
        END;
    END LOOP;
    RETURN v_ranges;
END
$$
"""

# Detach the oldest partition if it has expired as a whole; return its name, or
# NULL when it stays. Only ever the oldest: dropping a newer partition while an
# older one keeps events would leave a hole after a surviving cursor.
#
# The check runs twice: once cheaply without locks, then again after taking the
# locks DETACH needs anyway, which wait for any append still in flight into the
# partition (it took its seq before the sequence moved on) and keep new ones out
# until commit, so nothing lands in the partition after the check. DETACH locks
# the parent, then mcp_events_streams (the detached table gets foreign-key
# triggers of its own); a stream upsert locks streams, then reads events: taking
# both here, streams first, leaves no room for a deadlock with it. Raises
# lock_not_available after p_lock_timeout: appends queue behind a waiting
# DETACH, so it gives up rather than stall them.
DETACH_OLDEST = """
CREATE FUNCTION mcp_events_detach_oldest(p_cutoff timestamptz, p_lock_timeout interval)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    v_name text;
    v_lower bigint;
    v_upper bigint;
BEGIN
    SELECT p.name, p.lower, p.upper INTO v_name, v_lower, v_upper
    FROM mcp_events_partitions() p WHERE p.attached ORDER BY p.lower LIMIT 1;
    IF v_name IS NULL
        OR NOT mcp_events_partition_expired(v_lower, v_upper, mcp_events_next_seq(), p_cutoff) THEN
        RETURN NULL;
    END IF;
    PERFORM mcp_events_set_lock_timeout(p_lock_timeout);
    LOCK TABLE mcp_events_streams IN SHARE ROW EXCLUSIVE MODE;
    LOCK TABLE ONLY mcp_events_events IN ACCESS EXCLUSIVE MODE;
    IF NOT mcp_events_partition_expired(v_lower, v_upper, mcp_events_next_seq(), p_cutoff) THEN
        RETURN NULL;
    END IF;
    EXECUTE format('ALTER TABLE mcp_events_events DETACH PARTITION %I', v_name);
    RETURN v_name;
END
$$
"""

# Drop the foreign keys of a detached partition, in a transaction of its own
# before the DROP. They tie the table to mcp_events_streams, where their triggers
# live: a DROP with them would hold ACCESS EXCLUSIVE on mcp_events_streams, and
# so stall every append, through its commit, which removes the files (measured:
# 0.1 s for a 300 MB partition). Dropping the constraints takes that lock only for
# a catalog change, and gives up after p_lock_timeout.
RELEASE_DETACHED = """
CREATE FUNCTION mcp_events_release_detached(p_name text, p_lock_timeout interval)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    v_relid regclass;
    v_constraint text;
BEGIN
    SELECT p.relid INTO v_relid FROM mcp_events_partitions() p WHERE NOT p.attached AND p.name = p_name;
    IF v_relid IS NULL THEN
        RETURN;
    END IF;
    PERFORM mcp_events_set_lock_timeout(p_lock_timeout);
    FOR v_constraint IN SELECT conname FROM pg_constraint WHERE conrelid = v_relid AND contype = 'f' LOOP
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', p_name, v_constraint);
    END LOOP;
END
$$
"""

# Drop a detached partition (by this run, or left by a killed one); never an
# attached one. Returns the bytes it held, NULL if there is no such table.
DROP_DETACHED = """
CREATE FUNCTION mcp_events_drop_detached(p_name text, p_lock_timeout interval)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    v_relid regclass;
    v_bytes bigint;
BEGIN
    SELECT p.relid INTO v_relid FROM mcp_events_partitions() p WHERE NOT p.attached AND p.name = p_name;
    IF v_relid IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM mcp_events_set_lock_timeout(p_lock_timeout);
    v_bytes := pg_total_relation_size(v_relid);
    EXECUTE format('DROP TABLE %I', p_name);
    RETURN v_bytes;
END
$$
"""

# Roll over by time: when the partition the sequence writes into holds an event
# older than p_max_age, move the sequence to the next partition's lower bound (a
# jump; gaps in seq are harmless), so that a low-traffic deployment still gets
# whole partitions to drop instead of deleting rows. Returns the new next seq, or
# NULL when there is nothing to do; with p_dry_run only says what it would do.
#
# setval() could move the sequence backwards if appends carried it past the
# boundary between the check and the call, and a seq handed out twice would break
# the order readers rely on. A sequence cannot be LOCKed, but ALTER SEQUENCE blocks
# nextval() until commit; under it the check is final. The next partition is
# created first, so no append ever finds the jump without a partition.
ROLL_OVER = """
CREATE FUNCTION mcp_events_roll_over(
    p_max_age interval, p_ahead integer, p_lock_timeout interval, p_dry_run boolean DEFAULT false
)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    v_next bigint := mcp_events_next_seq();
    v_lower bigint;
    v_upper bigint;
BEGIN
    SELECT p.lower, p.upper INTO v_lower, v_upper
    FROM mcp_events_partitions() p WHERE p.attached AND p.lower <= v_next AND v_next < p.upper;
    IF v_upper IS NULL OR NOT EXISTS (
        SELECT FROM mcp_events_events
        WHERE seq >= v_lower AND seq < v_upper AND created_at < now() - p_max_age
    ) THEN
        RETURN NULL;
    END IF;
    IF p_dry_run THEN
        RETURN v_upper;
    END IF;
    PERFORM mcp_events_ensure_partitions(p_ahead + 1);
    PERFORM mcp_events_set_lock_timeout(p_lock_timeout);
    ALTER SEQUENCE mcp_events_seq OWNED BY mcp_events_events.seq;
    IF mcp_events_next_seq() >= v_upper THEN
        RETURN NULL;
    END IF;
    PERFORM setval('mcp_events_seq', v_upper, false);
    RETURN v_upper;
END
$$
"""

# What a run would do, without doing it: the same decisions as the procedure,
# reported as NOTICEs and totals. Read-only, so a caller can run it in a
# read-only transaction to prove that nothing changes.
PLAN = r"""
CREATE FUNCTION mcp_events_retention_plan(
    p_cutoff timestamptz,
    p_ended_cutoff timestamptz,
    p_max_age interval,
    OUT partitions integer,
    OUT rows_deleted bigint,
    OUT bytes bigint,
    OUT streams bigint,
    OUT sessions bigint,
    OUT roll_over_to bigint
)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_p record;
    v_next bigint := mcp_events_next_seq();
    -- Lowest seq left after the partition drops, then after the row deletes.
    v_start bigint := -9223372036854775808;
    v_horizon bigint;
    v_name text;
    v_lower bigint;
    v_upper bigint;
    v_rows bigint;
    v_bytes bigint;
BEGIN
    partitions := 0;
    bytes := 0;
    FOR v_p IN SELECT * FROM mcp_events_partitions() p WHERE NOT p.attached LOOP
        partitions := partitions + 1;
        bytes := bytes + pg_total_relation_size(v_p.relid);
        RAISE NOTICE 'would drop % (left detached by an earlier run), %',
            v_p.name, pg_size_pretty(pg_total_relation_size(v_p.relid));
    END LOOP;

    roll_over_to := mcp_events_roll_over(p_max_age, 1, interval '0', true);
    IF roll_over_to IS NOT NULL THEN
        RAISE NOTICE 'would roll over: the sequence would jump from % to %', v_next, roll_over_to;
        v_next := roll_over_to;
    END IF;

    FOR v_p IN SELECT * FROM mcp_events_partitions() p WHERE p.attached ORDER BY p.lower LOOP
        EXIT WHEN NOT mcp_events_partition_expired(v_p.lower, v_p.upper, v_next, p_cutoff);
        partitions := partitions + 1;
        bytes := bytes + pg_total_relation_size(v_p.relid);
        v_start := v_p.upper;
        RAISE NOTICE 'would drop partition %, %', v_p.name, pg_size_pretty(pg_total_relation_size(v_p.relid));
    END LOOP;

    SELECT p.name, p.lower, p.upper INTO v_name, v_lower, v_upper
    FROM mcp_events_partitions() p WHERE p.attached AND p.lower >= v_start ORDER BY p.lower LIMIT 1;
    IF mcp_events_partition_expired(v_lower, v_upper, v_next, p_cutoff + p_max_age) THEN
        RAISE NOTICE 'would leave the expired events of % to go with it: it expires whole within %',
            v_name, p_max_age;
        v_horizon := v_start;
    ELSE
        SELECT coalesce(min(seq), 9223372036854775807) INTO v_horizon
        FROM mcp_events_events WHERE seq >= v_start AND created_at >= p_cutoff;
    END IF;
    SELECT count(*), coalesce(sum(pg_column_size(e.*)), 0) INTO rows_deleted, v_bytes
    FROM mcp_events_events e WHERE seq >= v_start AND seq < v_horizon;
    bytes := bytes + v_bytes;
    RAISE NOTICE 'would delete % expired events, %', rows_deleted, pg_size_pretty(v_bytes);

    SELECT count(*), coalesce(sum(pg_column_size(e.*)), 0) INTO v_rows, v_bytes
    FROM mcp_events_events e
    JOIN mcp_events_streams st ON st.id = e.stream_key
    JOIN mcp_events_sessions se ON se.id = st.session_id
    WHERE se.ended_at <= p_ended_cutoff AND e.seq >= v_horizon;
    rows_deleted := rows_deleted + v_rows;
    bytes := bytes + v_bytes;
    RAISE NOTICE 'would delete % events of ended sessions, %', v_rows, pg_size_pretty(v_bytes);

    SELECT count(*) INTO streams
    FROM mcp_events_streams st
    JOIN mcp_events_sessions se ON se.id = st.session_id
    WHERE se.ended_at <= p_ended_cutoff
       OR (st.created_at < p_cutoff
           AND NOT EXISTS (
               SELECT FROM mcp_events_events e WHERE e.stream_key = st.id AND e.seq >= v_horizon
           ));
    SELECT count(*) INTO sessions
    FROM mcp_events_sessions se
    WHERE (se.ended_at <= p_ended_cutoff OR se.created_at < p_cutoff OR starts_with(se.key, 'provisional-'))
      AND NOT EXISTS (
          SELECT FROM mcp_events_streams st
          WHERE st.session_id = se.id
            AND (se.ended_at IS NULL OR se.ended_at > p_ended_cutoff)
            AND (st.created_at >= p_cutoff
                 OR EXISTS (
                     SELECT FROM mcp_events_events e WHERE e.stream_key = st.id AND e.seq >= v_horizon
                 ))
      );
    RAISE NOTICE 'would remove % streams and % sessions', streams, sessions;
END
$$
"""


# The retention run: what `mcp-pg-events retention` calls, and what pg_cron can
# call (`CALL mcp_events_retention(interval '1 hour')`, alone in the job's
# command). A PROCEDURE, not a function, so that it commits after every step: each
# detach, drop and delete batch is a short transaction, and a run killed at any
# point has lost nothing and left nothing half-done. (It cannot SET search_path:
# a procedure with SET clauses may not COMMIT. Call it with the schema of the
# tables on the search_path, as the store itself needs.)
#
# In order:
# 1. summarize new BRIN ranges;
# 2. roll over by time, then create partitions ahead of the sequence;
# 3. detach whole expired partitions, oldest first; then drop every detached
#    table (also those a killed run left behind), each in two steps (see
#    mcp_events_release_detached);
# 4. delete the expired rows that follow, in windows of batch_size seqs, in
#    ascending seq, up to the first event that has not expired (a window keyed
#    by seq touches one or two partitions through the BRIN index; by ctid on the
#    partitioned parent it would match rows of every partition). Not when the
#    oldest partition left will expire whole within partition_max_age: then its
#    expired rows wait to go with it, or nearly every event would be deleted row
#    by row (each partition is the oldest with live events for a while) and
#    drops would only ever find empty partitions. An event thus goes at most
#    about partition_max_age after it expired; the default, a quarter of the ttl,
#    keeps that short while a partition spans a quarter of the ttl at most;
# 5. delete the events of sessions that ended over ended_grace ago, stream by
#    stream, each oldest first;
# 6. remove the streams and sessions left empty.
# Steps 3 and 4 stop at the first partition or event that stays, so what goes is
# always a prefix of the sequence, and of every stream. A step that cannot get its
# lock within lock_timeout (or loses a deadlock) is left for the next run
# (complete is then false);
# when step 3 is, step 4 is skipped, since it would delete past the partition.
#
# Only one run at a time: a session advisory lock, released at the end (or when
# the session ends, if the run fails). dry_run only reports what would go.
RETENTION = r"""
CREATE PROCEDURE mcp_events_retention(
    ttl interval,
    batch_size integer DEFAULT 2000,
    ended_grace interval DEFAULT interval '0',
    partition_max_age interval DEFAULT NULL,
    partitions_ahead integer DEFAULT 2,
    lock_timeout interval DEFAULT interval '1 second',
    dry_run boolean DEFAULT false,
    INOUT locked_out boolean DEFAULT NULL,
    INOUT complete boolean DEFAULT NULL,
    INOUT partitions_dropped integer DEFAULT NULL,
    INOUT rows_deleted bigint DEFAULT NULL,
    INOUT bytes_freed bigint DEFAULT NULL,
    INOUT streams_removed bigint DEFAULT NULL,
    INOUT sessions_removed bigint DEFAULT NULL,
    INOUT partitions_created integer DEFAULT NULL,
    INOUT rolled_over_to bigint DEFAULT NULL
)
LANGUAGE plpgsql
AS $$
DECLARE
    -- One run per database, however started: the command and run_retention call this too.
    v_lock_key CONSTANT bigint := hashtext('mcp_events_retention');
    v_max_age CONSTANT interval := coalesce(partition_max_age, ttl / 4);
    v_cutoff timestamptz;
    v_ended_cutoff timestamptz;
    v_names text[];
    v_detached text[] := '{}';
    v_name text;
    v_lower bigint;
    v_upper bigint;
    v_bytes bigint;
    v_rows bigint;
    v_count bigint;
    v_blocked boolean := false;
    v_released boolean;
    v_from bigint;
    v_stop bigint;
    v_seen bigint;
    v_ids bigint[];
    v_after bigint;
    v_last bigint;
BEGIN
    IF ttl IS NULL OR ttl < interval '0' THEN
        RAISE EXCEPTION 'ttl must be 0 or more, got %', ttl;
    END IF;
    IF ended_grace IS NULL OR ended_grace < interval '0' THEN
        RAISE EXCEPTION 'ended_grace must be 0 or more, got %', ended_grace;
    END IF;
    IF v_max_age < interval '0' THEN
        RAISE EXCEPTION 'partition_max_age must be 0 or more, got %', v_max_age;
    END IF;
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be at least 1, got %', batch_size;
    END IF;
    IF partitions_ahead IS NULL OR partitions_ahead < 1 THEN
        RAISE EXCEPTION 'partitions_ahead must be at least 1, got %', partitions_ahead;
    END IF;
    IF lock_timeout IS NULL OR lock_timeout <= interval '0' THEN
        RAISE EXCEPTION 'lock_timeout must be positive, got %', lock_timeout;
    END IF;
    -- Against the database's clock, which stamped created_at; fixed for the whole run.
    v_cutoff := now() - ttl;
    v_ended_cutoff := now() - ended_grace;
    locked_out := false;
    complete := true;
    partitions_dropped := 0;
    rows_deleted := 0;
    bytes_freed := 0;
    streams_removed := 0;
    sessions_removed := 0;
    partitions_created := 0;
    rolled_over_to := NULL;

    IF dry_run THEN
        SELECT p.partitions, p.rows_deleted, p.bytes, p.streams, p.sessions, p.roll_over_to
        INTO partitions_dropped, rows_deleted, bytes_freed, streams_removed, sessions_removed, rolled_over_to
        FROM mcp_events_retention_plan(v_cutoff, v_ended_cutoff, v_max_age) p;
        RETURN;
    END IF;

    -- Inside a transaction block COMMIT is refused: fail here, before taking the lock.
    COMMIT;
    IF NOT pg_try_advisory_lock(v_lock_key) THEN
        locked_out := true;
        RAISE NOTICE 'another retention run holds the lock on this database: nothing done';
        RETURN;
    END IF;

    -- 1.
    PERFORM mcp_events_summarize();
    COMMIT;

    -- 2.
    v_count := (SELECT count(*) FROM mcp_events_partitions() p WHERE p.attached);
    BEGIN
        rolled_over_to := mcp_events_roll_over(v_max_age, partitions_ahead, lock_timeout);
    EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
        complete := false;
        RAISE NOTICE 'no roll-over: the sequence stayed in use for %', lock_timeout;
    END;
    COMMIT;
    IF rolled_over_to IS NOT NULL THEN
        RAISE NOTICE 'rolled over: the partition in use was older than %, appends now start at seq %',
            v_max_age, rolled_over_to;
    END IF;
    PERFORM mcp_events_ensure_partitions(partitions_ahead);
    partitions_created := (SELECT count(*) FROM mcp_events_partitions() p WHERE p.attached) - v_count;
    COMMIT;
    IF partitions_created > 0 THEN
        RAISE NOTICE 'created % partitions ahead of the sequence', partitions_created;
    END IF;

    -- 3.
    LOOP
        BEGIN
            v_name := mcp_events_detach_oldest(v_cutoff, lock_timeout);
        EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
            v_name := NULL;
            v_blocked := true;
            complete := false;
            RAISE NOTICE 'mcp_events_events stayed locked for %: the rest is for the next run',
                lock_timeout;
        END;
        COMMIT;
        EXIT WHEN v_name IS NULL;
        v_detached := v_detached || v_name;
        RAISE NOTICE 'detached %', v_name;
    END LOOP;
    -- Every detached table, this run's and those a killed run left behind.
    v_names := ARRAY(SELECT p.name FROM mcp_events_partitions() p WHERE NOT p.attached);
    FOREACH v_name IN ARRAY v_names LOOP
        v_bytes := NULL;
        v_released := false;
        BEGIN
            PERFORM mcp_events_release_detached(v_name, lock_timeout);
            v_released := true;
        EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
            NULL;
        END;
        COMMIT;
        IF v_released THEN
            BEGIN
                v_bytes := mcp_events_drop_detached(v_name, lock_timeout);
            EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
                NULL;
            END;
            COMMIT;
        END IF;
        IF v_bytes IS NULL THEN
            complete := false;
            RAISE NOTICE '% stays detached (a lock was not granted within %): the next run drops it',
                v_name, lock_timeout;
        ELSE
            partitions_dropped := partitions_dropped + 1;
            bytes_freed := bytes_freed + v_bytes;
            RAISE NOTICE 'dropped %, % freed',
                v_name || CASE WHEN v_name = ANY(v_detached) THEN ''
                               ELSE ' (left detached by an earlier run)' END,
                pg_size_pretty(v_bytes);
        END IF;
    END LOOP;

    -- 4.
    SELECT p.name, p.lower, p.upper INTO v_name, v_lower, v_upper
    FROM mcp_events_partitions() p WHERE p.attached ORDER BY p.lower LIMIT 1;
    IF NOT v_blocked
        AND mcp_events_partition_expired(v_lower, v_upper, mcp_events_next_seq(), v_cutoff + v_max_age) THEN
        v_blocked := true;
        IF EXISTS (
            SELECT FROM mcp_events_events e
            WHERE e.seq >= v_lower AND e.seq < v_upper AND e.created_at < v_cutoff
        ) THEN
            RAISE NOTICE '% expires whole within %: its expired events wait to go with it', v_name, v_max_age;
        END IF;
    END IF;
    IF NOT v_blocked THEN
        SELECT min(e.seq) INTO v_from FROM mcp_events_events e WHERE e.created_at < v_cutoff;
        -- An event that has not expired comes first: nothing after it may go yet.
        IF v_from IS NOT NULL AND EXISTS (SELECT FROM mcp_events_events e WHERE e.seq < v_from) THEN
            v_from := NULL;
        END IF;
        WHILE v_from IS NOT NULL LOOP
            SELECT coalesce(min(e.seq) FILTER (WHERE e.created_at >= v_cutoff), v_from + batch_size), count(*)
            INTO v_stop, v_seen
            FROM mcp_events_events e WHERE e.seq >= v_from AND e.seq < v_from + batch_size;
            WITH gone AS (
                DELETE FROM mcp_events_events e WHERE e.seq >= v_from AND e.seq < v_stop
                RETURNING pg_column_size(e.*) AS size
            )
            SELECT count(*), coalesce(sum(gone.size), 0) INTO v_rows, v_bytes FROM gone;
            COMMIT;
            rows_deleted := rows_deleted + v_rows;
            bytes_freed := bytes_freed + v_bytes;
            IF v_rows > 0 THEN
                RAISE NOTICE 'deleted % expired events (% so far)', v_rows, rows_deleted;
            END IF;
            EXIT WHEN v_stop < v_from + batch_size;
            v_from := v_from + batch_size;
            IF v_seen = 0 THEN
                -- A stretch with no events (a jump of the sequence): go to the next
                -- expired event, unless one that has not expired comes first.
                SELECT min(e.seq) INTO v_stop FROM mcp_events_events e
                WHERE e.seq >= v_from AND e.created_at < v_cutoff;
                EXIT WHEN v_stop IS NULL
                    OR EXISTS (SELECT FROM mcp_events_events e WHERE e.seq >= v_from AND e.seq < v_stop);
                v_from := v_stop;
            END IF;
        END LOOP;
    END IF;

    -- 5.
    LOOP
        v_ids := ARRAY(
            SELECT st.id FROM mcp_events_streams st
            JOIN mcp_events_sessions se ON se.id = st.session_id
            WHERE se.ended_at <= v_ended_cutoff
            ORDER BY st.id
            LIMIT 100
        );
        EXIT WHEN cardinality(v_ids) = 0;
        -- Stream by stream, each oldest first (LIMIT keeps the lateral order).
        WITH doomed AS (
            SELECT x.stream_key, x.seq
            FROM unnest(v_ids) AS s(id)
            CROSS JOIN LATERAL (
                SELECT e.stream_key, e.seq FROM mcp_events_events e
                WHERE e.stream_key = s.id ORDER BY e.seq LIMIT batch_size
            ) AS x
            LIMIT batch_size
        ), gone AS (
            DELETE FROM mcp_events_events e USING doomed d
            WHERE e.stream_key = d.stream_key AND e.seq = d.seq
            RETURNING pg_column_size(e.*) AS size
        )
        SELECT count(*), coalesce(sum(gone.size), 0) INTO v_rows, v_bytes FROM gone;
        -- Lock the emptied streams first, skipping any an append holds, then
        -- check again under a new snapshot: an event committed before the lock is
        -- seen, and none can be added after it.
        SELECT coalesce(array_agg(c.id), '{}') INTO v_ids FROM (
            SELECT st.id FROM mcp_events_streams st
            WHERE st.id = ANY(v_ids)
              AND NOT EXISTS (SELECT FROM mcp_events_events e WHERE e.stream_key = st.id)
            FOR UPDATE OF st SKIP LOCKED
        ) AS c;
        WITH gone AS (
            DELETE FROM mcp_events_streams st
            WHERE st.id = ANY(v_ids)
              AND NOT EXISTS (SELECT FROM mcp_events_events e WHERE e.stream_key = st.id)
            RETURNING 1
        )
        SELECT count(*) INTO v_count FROM gone;
        COMMIT;
        rows_deleted := rows_deleted + v_rows;
        bytes_freed := bytes_freed + v_bytes;
        streams_removed := streams_removed + v_count;
        IF v_rows > 0 OR v_count > 0 THEN
            RAISE NOTICE 'deleted % events and % streams of ended sessions', v_rows, v_count;
        END IF;
        -- Whatever is left is locked by appends: the next run.
        EXIT WHEN v_rows = 0 AND v_count = 0;
    END LOOP;

    -- 6. Page by page in key order; the same lock-then-check as above. Only
    -- streams older than the cutoff: a new stream is empty until its first event
    -- commits.
    v_after := 0;
    LOOP
        SELECT max(page.id) INTO v_last FROM (
            SELECT st.id FROM mcp_events_streams st WHERE st.id > v_after ORDER BY st.id LIMIT batch_size
        ) AS page;
        EXIT WHEN v_last IS NULL;
        SELECT coalesce(array_agg(c.id), '{}') INTO v_ids FROM (
            SELECT st.id FROM mcp_events_streams st
            WHERE st.id > v_after AND st.id <= v_last AND st.created_at < v_cutoff
              AND NOT EXISTS (SELECT FROM mcp_events_events e WHERE e.stream_key = st.id)
            FOR UPDATE OF st SKIP LOCKED
        ) AS c;
        WITH gone AS (
            DELETE FROM mcp_events_streams st
            WHERE st.id = ANY(v_ids)
              AND NOT EXISTS (SELECT FROM mcp_events_events e WHERE e.stream_key = st.id)
            RETURNING 1
        )
        SELECT count(*) INTO v_count FROM gone;
        COMMIT;
        streams_removed := streams_removed + v_count;
        IF v_count > 0 THEN
            RAISE NOTICE 'removed % empty streams', v_count;
        END IF;
        v_after := v_last;
    END LOOP;

    -- Sessions with no stream left: ended ones, old ones, and the provisional
    -- scopes of the SDK integration (they only ever hold a session's first streams).
    v_after := 0;
    LOOP
        SELECT max(page.id) INTO v_last FROM (
            SELECT se.id FROM mcp_events_sessions se WHERE se.id > v_after ORDER BY se.id LIMIT batch_size
        ) AS page;
        EXIT WHEN v_last IS NULL;
        SELECT coalesce(array_agg(c.id), '{}') INTO v_ids FROM (
            SELECT se.id FROM mcp_events_sessions se
            WHERE se.id > v_after AND se.id <= v_last
              AND (se.ended_at <= v_ended_cutoff OR se.created_at < v_cutoff
                   OR starts_with(se.key, 'provisional-'))
              AND NOT EXISTS (SELECT FROM mcp_events_streams st WHERE st.session_id = se.id)
            FOR UPDATE OF se SKIP LOCKED
        ) AS c;
        WITH gone AS (
            DELETE FROM mcp_events_sessions se
            WHERE se.id = ANY(v_ids)
              AND NOT EXISTS (SELECT FROM mcp_events_streams st WHERE st.session_id = se.id)
            RETURNING 1
        )
        SELECT count(*) INTO v_count FROM gone;
        COMMIT;
        sessions_removed := sessions_removed + v_count;
        IF v_count > 0 THEN
            RAISE NOTICE 'removed % sessions', v_count;
        END IF;
        v_after := v_last;
    END LOOP;

    PERFORM pg_advisory_unlock(v_lock_key);
END
$$
"""

# Everything above, in creation order; retention deletes data and drops tables,
# so none of it is left executable by PUBLIC (migrations/grants.sql grants it).
_ROUTINES = [
    ("mcp_events_partitions", PARTITIONS),
    ("mcp_events_next_seq", NEXT_SEQ),
    ("mcp_events_partition_expired", PARTITION_EXPIRED),
    ("mcp_events_set_lock_timeout", SET_LOCK_TIMEOUT),
    ("mcp_events_summarize", SUMMARIZE),
    ("mcp_events_detach_oldest", DETACH_OLDEST),
    ("mcp_events_release_detached", RELEASE_DETACHED),
    ("mcp_events_drop_detached", DROP_DETACHED),
    ("mcp_events_roll_over", ROLL_OVER),
    ("mcp_events_retention_plan", PLAN),
]


def upgrade() -> None:
    # Retention's questions are ranges of seq ("the next batch") and of created_at
    # ("anything newer than the cutoff in this partition?"). BRIN answers both from
    # a few bytes per 32 pages, since rows arrive in seq and time order, and costs
    # appends next to nothing; a btree on seq would cost every append.
    op.create_index(
        "mcp_events_events_seq_created_at_idx",
        "mcp_events_events",
        ["seq", "created_at"],
        postgresql_using="brin",
        postgresql_with={"pages_per_range": "32"},
    )
    # Retention looks up the ended sessions at every run; only they are in it.
    op.create_index(
        "mcp_events_sessions_ended_at_idx",
        "mcp_events_sessions",
        ["ended_at"],
        postgresql_where=sa.text("ended_at IS NOT NULL"),
    )
    for name, ddl in _ROUTINES:
        op.execute(ddl)
        op.execute(f"REVOKE ALL ON FUNCTION {name} FROM PUBLIC")
    op.execute(RETENTION)
    op.execute("REVOKE ALL ON PROCEDURE mcp_events_retention FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP PROCEDURE mcp_events_retention")
    for name, _ in reversed(_ROUTINES):
        op.execute(f"DROP FUNCTION {name}")
    op.drop_index("mcp_events_sessions_ended_at_idx", table_name="mcp_events_sessions")
    op.drop_index("mcp_events_events_seq_created_at_idx", table_name="mcp_events_events")
