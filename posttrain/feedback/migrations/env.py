"""Alembic's environment for the feedback app's schema.

`posttrain.feedback.db.upgrade` passes an open connection in `config.attributes`; a developer
writing a new revision passes a URL instead:

    from alembic import command
    from posttrain.feedback.db import alembic_config
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", "sqlite:///feedback.db")
    command.revision(config, "what changed", autogenerate=True)
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from posttrain.feedback.db import Base

config = context.config
# batch mode: SQLite cannot ALTER most things in place, so Alembic copies the table instead
options = {"target_metadata": Base.metadata, "render_as_batch": True}

if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), **options)
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    context.configure(connection=connection, **options)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        context.configure(connection=connection, **options)
        with context.begin_transaction():
            context.run_migrations()
