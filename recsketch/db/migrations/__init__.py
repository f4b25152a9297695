"""Alembic migrations of the catalogue DB; ``recsketch.db.migrate`` runs them."""
