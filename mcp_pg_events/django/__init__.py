"""The Django app of mcp-pg-events: ``manage.py migrate`` applies the event log's schema.

Add ``"mcp_pg_events.django"`` to ``INSTALLED_APPS``; then ``manage.py migrate``
brings the database of each alias it migrates to the schema this version of
mcp-pg-events needs, with Django's own connection and credentials, inside the
migration's transaction (``--database`` works as for any app; a router's
``allow_migrate`` is asked as for any ``RunPython``). The alembic migrations
stay the one definition of the schema, and ``mcp_events_alembic_version`` the
one record of where a database is: ``mcp-pg-events migrate`` and
``manage.py migrate`` may be mixed, and each finds the other's work done.
"""
