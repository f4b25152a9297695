"""The catalogue and recommendations database (PostgreSQL, or SQLite as the embedded default)."""
