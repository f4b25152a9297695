"""One request budget for the whole deployment, kept in the catalogue DB.

Every crawl task, on any worker, reserves the start time of each request from one row
(``rate_budget``): ``next_at`` moves forward by ``1 / rate`` per request in a single atomic
UPDATE, so however many processes crawl at once, request starts are spaced at least
``1 / rate`` apart in total. On PostgreSQL the DB server's clock hands out the start times,
and each worker sleeps until its start on its own clock (NTP keeps them within a few ms);
SQLite serves the processes of one machine, on that machine's clock.
"""

from __future__ import annotations

import time

from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from recsketch.db.schema import rate_budget

POSTGRES_RESERVE = text(
    "UPDATE rate_budget SET next_at = GREATEST(next_at, EXTRACT(EPOCH FROM clock_timestamp())) + :interval "
    "WHERE name = :name RETURNING next_at - :interval")
SQLITE_RESERVE = text(
    "UPDATE rate_budget SET next_at = MAX(next_at, :now) + :interval WHERE name = :name RETURNING next_at - :interval")


class SharedRateLimiter:
    """At most ``rate`` request starts per second for everyone sharing ``name`` in this DB."""

    def __init__(self, engine: Engine, rate: float, name: str = "sketchfab") -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.engine = engine
        self.interval = 1.0 / rate
        self.name = name
        self.waited_s = 0.0
        postgres = engine.dialect.name == "postgresql"
        self._reserve = POSTGRES_RESERVE if postgres else SQLITE_RESERVE
        insert = (postgresql if postgres else sqlite).insert
        with engine.begin() as conn:
            conn.execute(insert(rate_budget).values(name=name, next_at=0.0).on_conflict_do_nothing())

    def reserve(self) -> float:
        """Take the next free start time (seconds since the epoch)."""
        with self.engine.begin() as conn:
            return float(conn.execute(self._reserve, {"interval": self.interval, "name": self.name,
                                                      "now": time.time()}).scalar_one())

    def wait(self) -> None:
        """Sleep until the reserved start, on this machine's clock: the time the reservation
        took to commit is not added to the wait (workers' clocks agree through NTP)."""
        delay = self.reserve() - time.time()
        if delay > 0:
            self.waited_s += delay
            time.sleep(delay)
