-- The mcp-pg-events schema at revision 0007, as the migrations leave it.
--
-- For reading: how retention, partitions and the functions the roles may call
-- really work. Install with `mcp-pg-events migrate` (alembic), not from here;
-- a database built from this file is the same (tests/test_schema_sql.py) and is
-- marked as being at revision 0007. Regenerate: migrations/dump_schema.py.

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: mcp_events_compatible_since(); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_compatible_since() RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$ SELECT '0003'::text $$;

--
-- Name: mcp_events_create_partitions(integer, bigint); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_create_partitions(p_ahead integer DEFAULT 2, p_width bigint DEFAULT NULL::bigint) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
DECLARE
    -- Named in the DDL below, quoted when it must be: pg_catalog comes first in the search_path.
    v_schema CONSTANT text := (
        SELECT c.relnamespace::regnamespace::text FROM pg_class c WHERE c.oid = 'mcp_events_events'::regclass
    );
    v_top bigint;
    v_width bigint;
    v_last bigint;
    v_lower bigint;
    v_name text;
    v_created integer := 0;
BEGIN
    IF p_ahead IS NULL OR p_ahead < 1 THEN
        RAISE EXCEPTION 'p_ahead must be at least 1, got %', p_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One maintainer at a time; the others find the work done when they get the lock.
    PERFORM pg_advisory_xact_lock(hashtext('mcp_events_partitions'));

    SELECT b.upper, b.upper - b.lower INTO v_top, v_width
    FROM (
        SELECT m[1]::bigint AS lower, m[2]::bigint AS upper
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        CROSS JOIN LATERAL regexp_match(
            pg_get_expr(c.relpartbound, c.oid), 'FROM \(''?(-?\d+)''?\) TO \(''?(-?\d+)''?\)'
        ) AS m
        WHERE i.inhparent = 'mcp_events_events'::regclass
    ) b
    ORDER BY b.upper DESC
    LIMIT 1;

    v_width := coalesce(p_width, v_width, 1000000);
    IF v_width < 1 THEN
        RAISE EXCEPTION 'partition width must be positive, got %', v_width
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO v_last FROM mcp_events_seq;
    v_top := coalesce(v_top, 1);
    v_lower := v_top;
    IF v_last + 1 > v_top + v_width THEN
        v_lower := v_last + 1;
    END IF;

    WHILE v_lower <= v_last + p_ahead::bigint * v_width LOOP
        v_name := 'mcp_events_events_p' || v_lower;
        EXECUTE format(
            'CREATE TABLE %s.%I (LIKE %s.mcp_events_events INCLUDING DEFAULTS)', v_schema, v_name, v_schema
        );
        EXECUTE format(
            'ALTER TABLE %s.mcp_events_events ATTACH PARTITION %s.%I FOR VALUES FROM (%s) TO (%s)',
            v_schema, v_schema, v_name, v_lower, v_lower + v_width
        );
        v_created := v_created + 1;
        v_lower := v_lower + v_width;
    END LOOP;
    RETURN v_created;
END
$$;

--
-- Name: mcp_events_detach_oldest(timestamp with time zone, interval); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_detach_oldest(p_cutoff timestamp with time zone, p_lock_timeout interval) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
DECLARE
    -- Named in the DDL below, quoted when it must be: pg_catalog comes first in the search_path.
    v_schema CONSTANT text := (
        SELECT c.relnamespace::regnamespace::text FROM pg_class c WHERE c.oid = 'mcp_events_events'::regclass
    );
    v_cutoff timestamptz;
    v_relid regclass;
    v_name text;
    v_lower bigint;
    v_upper bigint;
BEGIN
    IF p_cutoff IS NULL THEN
        RAISE EXCEPTION 'p_cutoff must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_cutoff := least(p_cutoff, now());
    SELECT p.relid, p.name, p.lower, p.upper INTO v_relid, v_name, v_lower, v_upper
    FROM mcp_events_partitions() p WHERE p.attached ORDER BY p.lower LIMIT 1;
    IF v_name IS NULL
        OR NOT mcp_events_partition_expired(v_lower, v_upper, mcp_events_next_seq(), v_cutoff) THEN
        RETURN NULL;
    END IF;
    PERFORM mcp_events_set_lock_timeout(p_lock_timeout);
    LOCK TABLE mcp_events_streams IN SHARE ROW EXCLUSIVE MODE;
    LOCK TABLE ONLY mcp_events_events IN ACCESS EXCLUSIVE MODE;
    IF NOT mcp_events_partition_expired(v_lower, v_upper, mcp_events_next_seq(), v_cutoff) THEN
        RETURN NULL;
    END IF;
    EXECUTE format('ALTER TABLE %s.mcp_events_events DETACH PARTITION %s', v_schema, v_relid);
    RETURN v_name;
END
$$;

--
-- Name: mcp_events_drop_detached(text, interval); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_drop_detached(p_name text, p_lock_timeout interval) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
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
    EXECUTE format('DROP TABLE %s', v_relid);
    RETURN v_bytes;
END
$$;

--
-- Name: mcp_events_ensure_partitions(integer, bigint); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_ensure_partitions(p_ahead integer DEFAULT 2, p_width bigint DEFAULT NULL::bigint) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
BEGIN
    IF p_ahead IS NULL OR p_ahead < 1 THEN
        RAISE EXCEPTION 'p_ahead must be at least 1, got %', p_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- session_user: the role that logged in, whatever this function runs as.
    IF (p_width IS NOT NULL OR p_ahead > 100) AND NOT pg_has_role(
        session_user, (SELECT relowner FROM pg_class WHERE oid = 'mcp_events_events'::regclass), 'MEMBER'
    ) THEN
        RAISE EXCEPTION 'only the owner of mcp_events_events may set the partition width '
            'or create more than 100 partitions ahead'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN mcp_events_create_partitions(p_ahead, p_width);
END
$$;

--
-- Name: mcp_events_next_seq(); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_next_seq() RETURNS bigint
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
    SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM mcp_events_seq
$$;

--
-- Name: mcp_events_partition_expired(bigint, bigint, bigint, timestamp with time zone); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_partition_expired(p_lower bigint, p_upper bigint, p_next bigint, p_cutoff timestamp with time zone) RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
    SELECT p_upper <= p_next AND NOT EXISTS (
        SELECT FROM mcp_events_events WHERE seq >= p_lower AND seq < p_upper AND created_at >= p_cutoff
    )
$$;

--
-- Name: mcp_events_partitions(); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_partitions() RETURNS TABLE(relid regclass, name text, lower bigint, upper bigint, attached boolean)
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $_$
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
    JOIN pg_class parent ON parent.oid = 'mcp_events_events'::regclass
    WHERE c.relnamespace = parent.relnamespace
      AND c.relowner = parent.relowner
      AND c.relkind = 'r'
      AND NOT c.relispartition
      AND c.relname ~ '^mcp_events_events_p\d+$'
    ORDER BY 3
$_$;

--
-- Name: mcp_events_release_detached(text, interval); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_release_detached(p_name text, p_lock_timeout interval) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
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
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', v_relid, v_constraint);
    END LOOP;
END
$$;

--
-- Name: mcp_events_retention(interval, integer, interval, interval, integer, interval, boolean, boolean, boolean, integer, bigint, bigint, bigint, bigint, integer, bigint); Type: PROCEDURE
--

CREATE PROCEDURE public.mcp_events_retention(IN ttl interval, IN batch_size integer DEFAULT 2000, IN ended_grace interval DEFAULT '00:00:00'::interval, IN partition_max_age interval DEFAULT NULL::interval, IN partitions_ahead integer DEFAULT 2, IN lock_timeout interval DEFAULT '00:00:01'::interval, IN dry_run boolean DEFAULT false, INOUT locked_out boolean DEFAULT NULL::boolean, INOUT complete boolean DEFAULT NULL::boolean, INOUT partitions_dropped integer DEFAULT NULL::integer, INOUT rows_deleted bigint DEFAULT NULL::bigint, INOUT bytes_freed bigint DEFAULT NULL::bigint, INOUT streams_removed bigint DEFAULT NULL::bigint, INOUT sessions_removed bigint DEFAULT NULL::bigint, INOUT partitions_created integer DEFAULT NULL::integer, INOUT rolled_over_to bigint DEFAULT NULL::bigint)
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
$$;

--
-- Name: mcp_events_retention_plan(timestamp with time zone, timestamp with time zone, interval); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_retention_plan(p_cutoff timestamp with time zone, p_ended_cutoff timestamp with time zone, p_max_age interval, OUT partitions integer, OUT rows_deleted bigint, OUT bytes bigint, OUT streams bigint, OUT sessions bigint, OUT roll_over_to bigint) RETURNS record
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
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
$$;

--
-- Name: mcp_events_roll_over(interval, integer, interval, boolean); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_roll_over(p_max_age interval, p_ahead integer, p_lock_timeout interval, p_dry_run boolean DEFAULT false) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
DECLARE
    v_next bigint := mcp_events_next_seq();
    v_lower bigint;
    v_upper bigint;
BEGIN
    IF p_max_age IS NULL OR p_max_age < interval '0' THEN
        RAISE EXCEPTION 'p_max_age must be 0 or more, got %', p_max_age
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_ahead IS NULL OR p_ahead < 1 THEN
        RAISE EXCEPTION 'p_ahead must be at least 1, got %', p_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
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
$$;

--
-- Name: mcp_events_set_lock_timeout(interval); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_set_lock_timeout(p_timeout interval) RETURNS void
    LANGUAGE sql
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
    SELECT set_config(
        'lock_timeout', greatest(1, ceil(extract(epoch FROM p_timeout) * 1000))::bigint || 'ms', true
    )
$$;

--
-- Name: mcp_events_summarize(); Type: FUNCTION
--

CREATE FUNCTION public.mcp_events_summarize() RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
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
$$;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: mcp_events_alembic_version; Type: TABLE
--

CREATE TABLE public.mcp_events_alembic_version (
    version_num character varying(32) NOT NULL
);

--
-- Name: mcp_events_events; Type: TABLE
--

CREATE TABLE public.mcp_events_events (
    stream_key bigint NOT NULL,
    seq bigint NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    message bytea
)
PARTITION BY RANGE (seq);

--
-- Name: mcp_events_seq; Type: SEQUENCE
--

CREATE SEQUENCE public.mcp_events_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

--
-- Name: mcp_events_seq; Type: SEQUENCE OWNED BY
--

ALTER SEQUENCE public.mcp_events_seq OWNED BY public.mcp_events_events.seq;

--
-- Name: mcp_events_events_p1; Type: TABLE
--

CREATE TABLE public.mcp_events_events_p1 (
    stream_key bigint NOT NULL,
    seq bigint DEFAULT nextval('public.mcp_events_seq'::regclass) NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    message bytea
);

--
-- Name: mcp_events_events_p1000001; Type: TABLE
--

CREATE TABLE public.mcp_events_events_p1000001 (
    stream_key bigint NOT NULL,
    seq bigint DEFAULT nextval('public.mcp_events_seq'::regclass) NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    message bytea
);

--
-- Name: mcp_events_sessions; Type: TABLE
--

CREATE TABLE public.mcp_events_sessions (
    id bigint NOT NULL,
    key text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    ended_at timestamp with time zone,
    registered_at timestamp with time zone,
    protocol_version text,
    handshake jsonb,
    owner jsonb,
    idle_timeout double precision,
    last_active_at timestamp with time zone,
    active_worker integer,
    ended_reason text,
    principal text
);

--
-- Name: mcp_events_sessions_id_seq; Type: SEQUENCE
--

ALTER TABLE public.mcp_events_sessions ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.mcp_events_sessions_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

--
-- Name: mcp_events_streams; Type: TABLE
--

CREATE TABLE public.mcp_events_streams (
    id bigint NOT NULL,
    session_id bigint NOT NULL,
    name bytea NOT NULL,
    tag text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    full_name bytea,
    worker_id integer
);

--
-- Name: mcp_events_streams_id_seq; Type: SEQUENCE
--

ALTER TABLE public.mcp_events_streams ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.mcp_events_streams_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

--
-- Name: mcp_events_tasks; Type: TABLE
--

CREATE TABLE public.mcp_events_tasks (
    namespace text NOT NULL,
    task_id text NOT NULL,
    principal text NOT NULL,
    status text NOT NULL,
    record bytea NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL
);

--
-- Name: mcp_events_workers; Type: TABLE
--

CREATE TABLE public.mcp_events_workers (
    id integer NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    seen_at timestamp with time zone DEFAULT now() NOT NULL,
    ended_at timestamp with time zone,
    pid integer,
    host text
);

--
-- Name: mcp_events_workers_id_seq; Type: SEQUENCE
--

ALTER TABLE public.mcp_events_workers ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.mcp_events_workers_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

--
-- Name: mcp_events_events_p1; Type: TABLE ATTACH
--

ALTER TABLE ONLY public.mcp_events_events ATTACH PARTITION public.mcp_events_events_p1 FOR VALUES FROM ('1') TO ('1000001');

--
-- Name: mcp_events_events_p1000001; Type: TABLE ATTACH
--

ALTER TABLE ONLY public.mcp_events_events ATTACH PARTITION public.mcp_events_events_p1000001 FOR VALUES FROM ('1000001') TO ('2000001');

--
-- Name: mcp_events_events seq; Type: DEFAULT
--

ALTER TABLE ONLY public.mcp_events_events ALTER COLUMN seq SET DEFAULT nextval('public.mcp_events_seq'::regclass);

--
-- Name: mcp_events_alembic_version mcp_events_alembic_version_pkc; Type: CONSTRAINT
--

ALTER TABLE ONLY public.mcp_events_alembic_version
    ADD CONSTRAINT mcp_events_alembic_version_pkc PRIMARY KEY (version_num);

--
-- Name: mcp_events_events mcp_events_events_pkey; Type: CONSTRAINT
--

ALTER TABLE ONLY public.mcp_events_events
    ADD CONSTRAINT mcp_events_events_pkey PRIMARY KEY (stream_key, seq);

--
-- Name: mcp_events_events_p1000001 mcp_events_events_p1000001_pkey; Type: CONSTRAINT
--

ALTER TABLE ONLY public.mcp_events_events_p1000001
    ADD CONSTRAINT mcp_events_events_p1000001_pkey PRIMARY KEY (stream_key, seq);

--
-- Name: mcp_events_events_p1 mcp_events_events_p1_pkey; Type: CONSTRAINT
--

ALTER TABLE ONLY public.mcp_events_events_p1
    ADD CONSTRAINT mcp_events_events_p1_pkey PRIMARY KEY (stream_key, seq);

--
-- Name: mcp_events_sessions mcp_events_sessions_key_key; Type: CONSTRAINT
--

ALTER TABLE ONLY public.mcp_events_sessions
    ADD CONSTRAINT mcp_events_sessions_key_key UNIQUE (key);

--
-- Name: mcp_events_sessions mcp_events_sessions_pkey; Type: CONSTRAINT
--

ALTER TABLE ONLY public.mcp_events_sessions
    ADD CONSTRAINT mcp_events_sessions_pkey PRIMARY KEY (id);

--
-- Name: mcp_events_streams mcp_events_streams_pkey; Type: CONSTRAINT
--

ALTER TABLE ONLY public.mcp_events_streams
    ADD CONSTRAINT mcp_events_streams_pkey PRIMARY KEY (id);

--
-- Name: mcp_events_streams mcp_events_streams_session_id_name_key; Type: CONSTRAINT
--

ALTER TABLE ONLY public.mcp_events_streams
    ADD CONSTRAINT mcp_events_streams_session_id_name_key UNIQUE (session_id, name);

--
-- Name: mcp_events_tasks mcp_events_tasks_pkey; Type: CONSTRAINT
--

ALTER TABLE ONLY public.mcp_events_tasks
    ADD CONSTRAINT mcp_events_tasks_pkey PRIMARY KEY (namespace, task_id);

--
-- Name: mcp_events_workers mcp_events_workers_pkey; Type: CONSTRAINT
--

ALTER TABLE ONLY public.mcp_events_workers
    ADD CONSTRAINT mcp_events_workers_pkey PRIMARY KEY (id);

--
-- Name: mcp_events_events_seq_created_at_idx; Type: INDEX
--

CREATE INDEX mcp_events_events_seq_created_at_idx ON ONLY public.mcp_events_events USING brin (seq, created_at) WITH (pages_per_range='32');

--
-- Name: mcp_events_events_p1000001_seq_created_at_idx; Type: INDEX
--

CREATE INDEX mcp_events_events_p1000001_seq_created_at_idx ON public.mcp_events_events_p1000001 USING brin (seq, created_at) WITH (pages_per_range='32');

--
-- Name: mcp_events_events_p1_seq_created_at_idx; Type: INDEX
--

CREATE INDEX mcp_events_events_p1_seq_created_at_idx ON public.mcp_events_events_p1 USING brin (seq, created_at) WITH (pages_per_range='32');

--
-- Name: mcp_events_sessions_ended_at_idx; Type: INDEX
--

CREATE INDEX mcp_events_sessions_ended_at_idx ON public.mcp_events_sessions USING btree (ended_at) WHERE (ended_at IS NOT NULL);

--
-- Name: mcp_events_tasks_expires_at_idx; Type: INDEX
--

CREATE INDEX mcp_events_tasks_expires_at_idx ON public.mcp_events_tasks USING btree (expires_at);

--
-- Name: mcp_events_events_p1000001_pkey; Type: INDEX ATTACH
--

ALTER INDEX public.mcp_events_events_pkey ATTACH PARTITION public.mcp_events_events_p1000001_pkey;

--
-- Name: mcp_events_events_p1000001_seq_created_at_idx; Type: INDEX ATTACH
--

ALTER INDEX public.mcp_events_events_seq_created_at_idx ATTACH PARTITION public.mcp_events_events_p1000001_seq_created_at_idx;

--
-- Name: mcp_events_events_p1_pkey; Type: INDEX ATTACH
--

ALTER INDEX public.mcp_events_events_pkey ATTACH PARTITION public.mcp_events_events_p1_pkey;

--
-- Name: mcp_events_events_p1_seq_created_at_idx; Type: INDEX ATTACH
--

ALTER INDEX public.mcp_events_events_seq_created_at_idx ATTACH PARTITION public.mcp_events_events_p1_seq_created_at_idx;

--
-- Name: mcp_events_events mcp_events_events_stream_key_fkey; Type: FK CONSTRAINT
--

ALTER TABLE public.mcp_events_events
    ADD CONSTRAINT mcp_events_events_stream_key_fkey FOREIGN KEY (stream_key) REFERENCES public.mcp_events_streams(id) ON DELETE CASCADE;

--
-- Name: mcp_events_streams mcp_events_streams_session_id_fkey; Type: FK CONSTRAINT
--

ALTER TABLE ONLY public.mcp_events_streams
    ADD CONSTRAINT mcp_events_streams_session_id_fkey FOREIGN KEY (session_id) REFERENCES public.mcp_events_sessions(id) ON DELETE CASCADE;

INSERT INTO public.mcp_events_alembic_version (version_num) VALUES ('0007');
