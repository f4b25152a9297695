"""The catalogue and recommendations DB: schema, migrations, writes and queries."""

import logging

# alembic logs its setup at INFO on import and on every revision check; `recsketch db upgrade`
# says itself what it did. Set before alembic is first imported (by recsketch.db.migrate).
logging.getLogger("alembic").setLevel(logging.WARNING)
