"""Adapter registry (what exists: SQLite or Redis) and content-addressed store (where the files are)."""
