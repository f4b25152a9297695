"""ISO 8601 timestamps as every source writes them: PSV columns, the API, flags, the clock."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_utc(value: str) -> datetime:
    """A date or datetime, ``Z`` or an offset allowed; one without a zone is UTC (as the API's
    ``2021-03-18T09:36:25.430631`` is). Raises ValueError when it is none of these."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
