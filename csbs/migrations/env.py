"""Alembic environment of the csbs catalog. csbs runs it itself (``csbs.schema``), on the
connection it already holds; ``alembic`` on the command line works too, with
``-x url=...`` or ``CSBS_DATABASE_URL``."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import csbs.catalog  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        migrate(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ["CSBS_DATABASE_URL"]
    engine = create_engine(url)
    with engine.connect() as conn:
        migrate(conn)
    engine.dispose()


run()
