"""Durable job state: SQLAlchemy models, the engine recipe, the store and migrations."""
