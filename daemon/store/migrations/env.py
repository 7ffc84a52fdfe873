"""Alembic environment: migrations run on the connection the Store hands over.

`lorafarm` calls `Store.migrate()` at every start, so users never run Alembic by hand; a
developer adding a table writes a new file in `versions/` (autogenerate works against
`daemon.store.models.Base.metadata`).
"""

from alembic import context
from sqlalchemy import create_engine

from daemon.store.models import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        # Plain `alembic -x url=... upgrade head` from a shell.
        url = context.get_x_argument(as_dictionary=True)["url"]
        with create_engine(url).begin() as conn:
            _run(conn)
    else:
        _run(connection)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True)  # batch mode: SQLite cannot ALTER most things
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
