"""The one schema definition of the tables: SQLAlchemy Core metadata that alembic migrates.

Runtime I/O never goes through SQLAlchemy (see ``sql.py`` and ``database.py``),
and nothing the store imports imports this module: it exists so that ``alembic
check`` can prove the migrations and the code agree. The functions and the
retention procedure are in ``migrations/schema.sql``.
"""

from __future__ import annotations

import re

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import DOUBLE_PRECISION, JSONB

from .database import EVENTS

PREFIX = "mcp_events_"
VERSION_TABLE = "mcp_events_alembic_version"

SEQUENCE = "mcp_events_seq"
# Child partitions are named after the parent plus the lower bound of their range.
PARTITION_NAME = re.compile(rf"^{EVENTS}_p\d+$")

metadata = MetaData(
    naming_convention={
        "pk": "%(table_name)s_pkey",
        "fk": "%(table_name)s_%(column_0_name)s_fkey",
        "uq": "%(table_name)s_%(column_0_N_name)s_key",
        "ix": "%(table_name)s_%(column_0_N_name)s_idx",
    }
)

event_seq = Sequence(SEQUENCE, metadata=metadata)

sessions = Table(
    "mcp_events_sessions",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    # The scope: the MCP session id, or whatever key the caller passed to session().
    Column("key", Text, nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    # The registry (see registry.py). NULL registered_at: never adoptable (an opening
    # that failed, a session of a previous release, a key that is no MCP session).
    Column("registered_at", DateTime(timezone=True), nullable=True),
    Column("protocol_version", Text, nullable=True),
    # The initialize request's params as the client sent them; with the version, what
    # another worker needs to serve the session as initialized.
    Column("handshake", JSONB, nullable=True),
    # The authenticated principal that opened it; NULL when unauthenticated.
    Column("owner", JSONB, nullable=True),
    # Seconds it may stay idle; NULL: it never expires.
    Column("idle_timeout", DOUBLE_PRECISION, nullable=True),
    # Written in batches by the workers that serve it, and by whom last.
    Column("last_active_at", DateTime(timezone=True), nullable=True),
    Column("active_worker", Integer, nullable=True),
    # deleted, idle, expired or failed-open: for operators.
    Column("ended_reason", Text, nullable=True),
    # Who a session store bound the session to (rest_framework_mcp's principal id);
    # NULL for the SDK integration's sessions, whose principal is in owner.
    Column("principal", Text, nullable=True),
)

# Retention finds the ended sessions at every run; partial, so it holds only the
# few sessions that ended and are not yet removed, and costs appends nothing.
Index(
    "mcp_events_sessions_ended_at_idx",
    sessions.c.ended_at,
    postgresql_where=sessions.c.ended_at.isnot(None),
)

streams = Table(
    "mcp_events_streams",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column(
        "session_id",
        BigInteger,
        ForeignKey("mcp_events_sessions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    # bytea, not text: a stream id is a JSON-RPC request id chosen by the client and
    # may hold characters (NUL, lone surrogates) that a text column refuses.
    # A stream id longer than INDEXED_STREAM_ID_BYTES (store.py) is kept as 0xFF and
    # its SHA-256, its id in full in full_name: a btree entry must stay small.
    Column("name", LargeBinary, nullable=False),
    # Random per stream and part of every event id, so ids cannot be guessed.
    Column("tag", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The stream id when it is too long for name (see above), else NULL.
    Column("full_name", LargeBinary, nullable=True),
    # The worker that runs the stream's request (workers.py); NULL: unknown.
    Column("worker_id", Integer, nullable=True),
    UniqueConstraint("session_id", "name"),
)

# One row per server process that uses the store; its id is also the second key of
# its lease, a session-level advisory lock (see sql.py).
workers = Table(
    "mcp_events_workers",
    metadata,
    Column("id", Integer, Identity(always=False), primary_key=True),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The heartbeat.
    Column("seen_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("pid", Integer, nullable=True),
    Column("host", Text, nullable=True),
)

events = Table(
    EVENTS,
    metadata,
    Column(
        "stream_key",
        BigInteger,
        ForeignKey("mcp_events_streams.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seq", BigInteger, primary_key=True, server_default=text(f"nextval('{SEQUENCE}'::regclass)")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The JSON-RPC message as UTF-8 JSON bytes, or NULL for a priming event (a cursor
    # only). bytea, not jsonb: jsonb rejects "\u0000" inside strings, which JSON-RPC
    # allows, and bytea was the fastest to write (benchmarks/message_column.py).
    Column("message", LargeBinary, nullable=True),
    postgresql_partition_by="RANGE (seq)",
)

# Retention's "the next batch of seqs" and "anything newer than the cutoff in this
# partition?" (see migration 0002 and retention.py). BRIN: rows arrive in seq and
# time order, so a few bytes per 32 pages answer both, and appends pay next to
# nothing, unlike a btree on seq.
Index(
    "mcp_events_events_seq_created_at_idx",
    events.c.seq,
    events.c.created_at,
    postgresql_using="brin",
    postgresql_with={"pages_per_range": "32"},
)


# rest_framework_mcp's tasks (mcp_pg_events.rest_framework.PostgresTaskStore).
tasks = Table(
    "mcp_events_tasks",
    metadata,
    # The server's name: two servers sharing a database cannot read each other's tasks.
    Column("namespace", Text, primary_key=True),
    Column("task_id", Text, primary_key=True),
    Column("principal", Text, nullable=False),
    # The status, also inside the record: for operators, and so that a finished
    # task cannot be reopened by a late write from another process.
    Column("status", Text, nullable=False),
    # The record as UTF-8 JSON bytes; bytea, as the events' messages, since jsonb
    # rejects "\u0000" in strings, which tool arguments and results may hold.
    Column("record", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Stamped at creation from the task's ttlMs; reads ignore the row after it,
    # retention deletes it.
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

Index("mcp_events_tasks_expires_at_idx", tasks.c.expires_at)


def is_partition(name: str | None) -> bool:
    """True for the child partitions of the events table, which alembic must not manage."""
    return name is not None and PARTITION_NAME.match(name) is not None


def owns(name: str | None) -> bool:
    """True for the objects this library manages, so alembic ignores the host app's tables."""
    return name is not None and name.startswith(PREFIX) and not is_partition(name)
