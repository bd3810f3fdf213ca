"""The control plane's database: SQLAlchemy 2 models, engine set-up and Alembic migrations."""

from cmbcluster.db.engine import create_db_engine, current_revision, session_factory, upgrade

__all__ = ["create_db_engine", "current_revision", "session_factory", "upgrade"]
