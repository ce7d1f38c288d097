"""The event log: the one source of truth for every run (schema, DuckDB store, replay, the writer actor)."""
