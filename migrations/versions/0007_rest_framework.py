"""Django REST framework MCP servers: tasks, the principal of a session, retention for both.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

``mcp_pg_events.rest_framework`` keeps the sessions of ``rest_framework_mcp``
in ``mcp_events_sessions`` (the row its SSE stream already hangs from) and its
tasks in a table of their own:

- ``mcp_events_sessions.principal``: who the session is bound to, NULL for the
  sessions of the SDK integration and for rows made by an append;
- ``mcp_events_sessions.last_active_at`` (added by 0006 for the SDK's
  sessions): a session store bumps it too, at most once a minute, so that
  retention removes sessions idle for the ttl instead of every session one ttl
  after its creation;
- ``mcp_events_tasks``: one row per task, its record as JSON bytes, and when it
  expires.

The retention procedure and its dry-run plan are replaced (0006's, with these
changes): sessions go when idle (``coalesce(last_active_at, created_at)``)
rather than when old, a last step deletes expired tasks, and
``partitions_ahead`` is refused past 99, as ``RetentionSettings`` refuses it.
Their signatures do not change, so callers and grants stay as they are.

Additive: one nullable column (no rewrite, no long lock), a new table, two
replaced routines. The previous release keeps running on it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The dry-run plan of 0006, with idle sessions and expired tasks.
PLAN = r"""
CREATE OR REPLACE FUNCTION mcp_events_retention_plan(
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
    -- Workers write a session's activity in batches: how late that may be, at most.
    v_activity_slack CONSTANT interval := interval '10 minutes';
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
    WHERE (se.ended_at <= p_ended_cutoff
           OR (se.created_at < p_cutoff AND coalesce(se.last_active_at, se.created_at) < p_cutoff))
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
    SELECT count(*) INTO v_rows FROM mcp_events_sessions se
    WHERE se.ended_at IS NULL AND se.registered_at IS NOT NULL AND se.idle_timeout IS NOT NULL
      AND se.last_active_at < now() - make_interval(secs => se.idle_timeout) - v_activity_slack;
    RAISE NOTICE 'would end % sessions idle past their timeout', v_rows;
    SELECT count(*) INTO v_rows FROM mcp_events_workers w WHERE w.seen_at < p_cutoff OR w.ended_at < p_cutoff;
    RAISE NOTICE 'would forget % workers', v_rows;
    RAISE NOTICE 'would remove % expired tasks',
        (SELECT count(*) FROM mcp_events_tasks t WHERE t.expires_at < now());
END
$$
"""

# The retention procedure of 0002 (see there for each step), with sessions that go
# when idle rather than old, and step 7: expired tasks.
RETENTION = r"""
CREATE OR REPLACE PROCEDURE mcp_events_retention(
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
    -- Workers write a session's activity in batches: how late that may be, at most.
    v_activity_slack CONSTANT interval := interval '10 minutes';
    v_tasks bigint := 0;
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
    -- 99: roles other than the owner may create 100 partitions ahead
    -- (mcp_events_ensure_partitions), and a roll-over asks for one more.
    IF partitions_ahead IS NULL OR partitions_ahead < 1 OR partitions_ahead > 99 THEN
        RAISE EXCEPTION 'partitions_ahead must be between 1 and 99, got %', partitions_ahead
            USING ERRCODE = 'invalid_parameter_value';
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

    -- Sessions with no stream left: ended ones, and those not in use within the
    -- ttl (their last recorded activity, else their creation): no worker holds
    -- them, and a session store (rest_framework's) records activity while one is
    -- in use.
    v_after := 0;
    LOOP
        SELECT max(page.id) INTO v_last FROM (
            SELECT se.id FROM mcp_events_sessions se WHERE se.id > v_after ORDER BY se.id LIMIT batch_size
        ) AS page;
        EXIT WHEN v_last IS NULL;
        SELECT coalesce(array_agg(c.id), '{}') INTO v_ids FROM (
            SELECT se.id FROM mcp_events_sessions se
            WHERE se.id > v_after AND se.id <= v_last
              AND (se.ended_at <= v_ended_cutoff
                   OR (se.created_at < v_cutoff AND coalesce(se.last_active_at, se.created_at) < v_cutoff))
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

    -- 7. Registered sessions idle past their timeout: their worker died, or the
    -- client went away while no worker held them, so no idle timer ends them.
    -- Their events go at a later run, after ended_grace; workers that still hold
    -- one (they should not) hear of it on the sessions' channel.
    v_count := 0;
    LOOP
        v_ids := ARRAY(
            SELECT se.id FROM mcp_events_sessions se
            WHERE se.ended_at IS NULL AND se.registered_at IS NOT NULL AND se.idle_timeout IS NOT NULL
              AND se.last_active_at < now() - make_interval(secs => se.idle_timeout) - v_activity_slack
            ORDER BY se.id
            LIMIT 500
            FOR UPDATE SKIP LOCKED
        );
        EXIT WHEN cardinality(v_ids) = 0;
        UPDATE mcp_events_sessions se SET ended_at = now(), ended_reason = 'expired' WHERE se.id = ANY(v_ids);
        PERFORM pg_notify('mcp_events_ended_v1', array_to_string(v_ids, ','));
        COMMIT;
        v_count := v_count + cardinality(v_ids);
    END LOOP;
    IF v_count > 0 THEN
        RAISE NOTICE 'ended % sessions idle past their timeout', v_count;
    END IF;

    -- 8. Workers that ended, or stopped beating, longer than the ttl ago: their
    -- requests' streams have expired by now.
    DELETE FROM mcp_events_workers w WHERE w.seen_at < v_cutoff OR w.ended_at < v_cutoff;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    COMMIT;
    IF v_count > 0 THEN
        RAISE NOTICE 'forgot % workers', v_count;
    END IF;

    -- 9. Tasks past their expiry (stamped at creation by the task store), a batch
    -- per transaction. By primary key: a worker saving a task waits for, or is
    -- waited for by, the one row it touches.
    LOOP
        WITH gone AS (
            DELETE FROM mcp_events_tasks t
            WHERE (t.namespace, t.task_id) IN (
                SELECT x.namespace, x.task_id FROM mcp_events_tasks x
                WHERE x.expires_at < now()
                LIMIT batch_size
            )
            RETURNING 1
        )
        SELECT count(*) INTO v_count FROM gone;
        COMMIT;
        EXIT WHEN v_count = 0;
        v_tasks := v_tasks + v_count;
        RAISE NOTICE 'removed % expired tasks (% so far)', v_count, v_tasks;
    END LOOP;

    PERFORM pg_advisory_unlock(v_lock_key);
END
$$
"""

# The texts these replace, to put back on downgrade.
_PREVIOUS = "0006_session_registry.py"


# Every function of ours runs with a fixed search_path (see 0004): the tables'
# schema, pg_temp last, so that no caller's temporary object is ever resolved.
PIN_PLAN = """
DO $pin$
DECLARE
    v_schema name := (
        SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = 'mcp_events_events'::regclass
    );
BEGIN
    EXECUTE format(
        'ALTER FUNCTION %I.mcp_events_retention_plan(timestamptz, timestamptz, interval) '
        'SET search_path = pg_catalog, %I, pg_temp',
        v_schema, v_schema
    );
END
$pin$
"""


def _previous_routines() -> tuple[str, str]:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name(_PREVIOUS)
    spec = importlib.util.spec_from_file_location("mcp_events_previous_retention", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return (
        module.PLAN,
        module.RETENTION,
    )


def upgrade() -> None:
    op.add_column("mcp_events_sessions", sa.Column("principal", sa.Text(), nullable=True))
    op.create_table(
        "mcp_events_tasks",
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("task_id", sa.Text(), nullable=False),
        sa.Column("principal", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("record", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("namespace", "task_id", name="mcp_events_tasks_pkey"),
    )
    op.create_index("mcp_events_tasks_expires_at_idx", "mcp_events_tasks", ["expires_at"])
    op.execute(PLAN)
    op.execute(PIN_PLAN)
    op.execute(RETENTION)


def downgrade() -> None:
    plan, retention = _previous_routines()
    op.execute(retention)
    op.execute(plan)
    op.execute(PIN_PLAN)
    op.drop_index("mcp_events_tasks_expires_at_idx", table_name="mcp_events_tasks")
    op.drop_table("mcp_events_tasks")
    op.drop_column("mcp_events_sessions", "principal")
