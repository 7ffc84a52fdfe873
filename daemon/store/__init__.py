"""The database: SQLAlchemy models, Alembic migrations and the read-side queries the CLI, the page,
the report and the metrics share.
"""
