-- Privileges for the roles that use mcp-pg-events without owning its tables.
--
-- Run it as the role that ran the migrations (the owner of every mcp_events_*
-- object), with the schema of the tables first on the search_path:
--
--   psql "$OWNER_DSN" -v runtime_role=app -v retention_role=app_retention -f grants.sql
--
-- Without psql: this file is plain SQL except for the \set line below and the
-- two variables. Drop the line, write each role's name, double-quoted, in place
-- of :"runtime_role" and :"retention_role", and run the rest in any client:
--
--   sed -e '/^\\/d' -e 's/:"runtime_role"/"app"/g' -e 's/:"retention_role"/"app_retention"/g' grants.sql
--
-- runtime_role:   the MCP server (PostgresEventStore).
-- retention_role: whoever runs `mcp-pg-events retention`, or schedules
--                 `CALL mcp_events_retention(...)` with pg_cron (a job runs as
--                 the role that scheduled it). It may be the same role.
--
-- Neither role gets DDL rights or ownership. Partitions are created by
-- mcp_events_ensure_partitions, and detached, dropped and rolled over by the
-- retention functions: all SECURITY DEFINER, running as the owner.
-- In a schema other than public, also: GRANT USAGE ON SCHEMA <schema> TO <role>;
-- Run it again after `mcp-pg-events migrate` adds a revision.
\set ON_ERROR_STOP on

-- The database. PostgreSQL lets PUBLIC, every role of the cluster, connect to a
-- new database and create temporary objects in it. Connecting is all it takes
-- to NOTIFY on the store's wake-up channel, which every listener must read;
-- temporary objects are what shadowed tables and types inside SECURITY DEFINER
-- functions before revision 0004 pinned their search_path (this is the second
-- line of defence). So only the owner and the two roles may connect, and
-- neither role may create temporary objects. Roles of your own that use this
-- database need a GRANT CONNECT of their own (and TEMPORARY, if they create
-- temporary tables). Only the database's owner may change this: run by
-- another role, this part changes nothing and says so in a WARNING.
SET mcp_events.runtime_role = :"runtime_role";
SET mcp_events.retention_role = :"retention_role";
DO $$
DECLARE
    v_database CONSTANT text := current_database();
    v_roles CONSTANT text[] := ARRAY[
        current_setting('mcp_events.runtime_role'), current_setting('mcp_events.retention_role')
    ];
    v_role text;
BEGIN
    IF pg_has_role((SELECT datdba FROM pg_database WHERE datname = v_database), 'MEMBER') THEN
        EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', v_database);
        FOREACH v_role IN ARRAY v_roles LOOP
            EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', v_database, v_role);
        END LOOP;
    ELSIF has_database_privilege('public', v_database, 'CONNECT, TEMPORARY')
        OR NOT has_database_privilege(v_roles[1], v_database, 'CONNECT')
        OR NOT has_database_privilege(v_roles[2], v_database, 'CONNECT') THEN
        RAISE WARNING 'only the owner of database % may revoke CONNECT and TEMPORARY on it from PUBLIC '
            'and grant CONNECT to the two roles: ask it to run this file too', v_database;
    END IF;
END
$$;
RESET mcp_events.runtime_role;
RESET mcp_events.retention_role;

-- The store: find or create sessions and streams (INSERT ... ON CONFLICT DO
-- UPDATE needs UPDATE), register sessions, record their activity and their end,
-- adopt another worker's session, append and replay.
GRANT SELECT, INSERT, UPDATE ON mcp_events_sessions, mcp_events_streams TO :"runtime_role";
-- Each server process's row: its lease, its heartbeat, and whether another is alive.
GRANT SELECT, INSERT, UPDATE ON mcp_events_workers TO :"runtime_role";
GRANT SELECT, INSERT ON mcp_events_events TO :"runtime_role";
-- nextval() in every append.
GRANT USAGE ON SEQUENCE mcp_events_seq TO :"runtime_role";
-- rest_framework_mcp's task store: create, read, update, delete tasks.
GRANT SELECT, INSERT, UPDATE, DELETE ON mcp_events_tasks TO :"runtime_role";
-- The schema check at connect time (and, on a database newer than the code,
-- whether it still serves this code).
GRANT SELECT ON mcp_events_alembic_version TO :"runtime_role";
GRANT EXECUTE ON FUNCTION mcp_events_compatible_since TO :"runtime_role", :"retention_role";
-- An append that finds no partition creates it and retries.
GRANT EXECUTE ON FUNCTION mcp_events_ensure_partitions TO :"runtime_role";
-- PostgreSQL lets PUBLIC execute a new function: only these two roles (and the
-- owner) may create partitions. The retention functions are revoked from PUBLIC
-- by their migration already.
REVOKE EXECUTE ON FUNCTION mcp_events_ensure_partitions FROM PUBLIC;

-- Retention: delete expired events, then the streams and sessions left empty
-- (UPDATE: it locks a stream or session row before removing it, so that an
-- append cannot add to it at that moment), and end sessions idle past their
-- timeout. A session id is a credential, and so are the principal and the
-- handshake of its session: retention reads none of them. The REVOKE takes back
-- the whole-table rights that earlier versions of this file granted.
GRANT SELECT, UPDATE, DELETE ON mcp_events_streams TO :"retention_role";
REVOKE SELECT, UPDATE ON mcp_events_sessions FROM :"retention_role";
GRANT SELECT (id, created_at, ended_at, registered_at, protocol_version, idle_timeout,
              last_active_at, active_worker, ended_reason),
      UPDATE (ended_at, ended_reason),
      DELETE
    ON mcp_events_sessions TO :"retention_role";
-- Forget workers gone for longer than the ttl.
GRANT SELECT, DELETE ON mcp_events_workers TO :"retention_role";
GRANT SELECT, DELETE ON mcp_events_events TO :"retention_role";
-- Expired tasks (SELECT: the DELETE finds them by expiry).
GRANT SELECT, DELETE ON mcp_events_tasks TO :"retention_role";
-- Where the sequence is: the partitions at or above it are never dropped.
GRANT SELECT ON mcp_events_seq, mcp_events_alembic_version TO :"retention_role";
GRANT EXECUTE ON PROCEDURE mcp_events_retention TO :"retention_role";
GRANT EXECUTE ON FUNCTION
    mcp_events_ensure_partitions,
    mcp_events_partitions,
    mcp_events_next_seq,
    mcp_events_partition_expired,
    mcp_events_summarize,
    mcp_events_detach_oldest,
    mcp_events_release_detached,
    mcp_events_drop_detached,
    mcp_events_roll_over,
    mcp_events_retention_plan
TO :"retention_role";
