"""Alembic migrations: the database schema's history. Apply with ``kontext migrate``."""
