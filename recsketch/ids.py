"""Sketchfab model ids: validated before they touch a path, a URL or a query."""

from __future__ import annotations

import re

from recsketch.errors import InvalidModelId

# Current ids are 32 lowercase hex characters; the real catalogue also holds legacy
# 26-27 character alphanumeric ids (954 of 28,824 rows in rec-a-sketch's model_urls.psv).
_MODEL_ID = re.compile(r"[0-9a-f]{32}|[0-9A-Za-z]{26,27}")


MAX_UID_LENGTH = 64  # the likes table's uid column (recsketch.db.schema)


def uid_problem(uid: str) -> str | None:
    """Why a liker's uid cannot be stored (the DB holds at most 64 characters, and no NUL), or None."""
    if not uid:
        return "empty uid"
    if len(uid) > MAX_UID_LENGTH:
        return f"a uid of {len(uid)} characters, over the {MAX_UID_LENGTH} the DB holds"
    if any(ord(c) < 32 for c in uid):
        return f"a uid with control characters ({uid[:20]!r})"
    return None


def is_model_id(value: object) -> bool:
    return isinstance(value, str) and _MODEL_ID.fullmatch(value) is not None


def validate_model_id(value: object, *, source: str = "model id") -> str:
    """Return ``value`` if it is a model id, else raise naming where it came from."""
    if not isinstance(value, str) or not is_model_id(value):
        raise InvalidModelId(f"{source}: {value!r} is not a Sketchfab model id "
                             "(32 lowercase hex characters or a legacy 26-27 character id)")
    return value


def run_folder_name(run_id: str) -> str:
    """A run's folder name under ``<data dir>/runs/``: its id reduced to characters that are
    safe in a path or an object key (an Airflow run id holds ``:`` and ``+``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._") or "run"


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 (but tab and newline), DEL, C1: escapes, bells


def printable(text: object) -> str:
    """Text from the API or a data file made safe for a terminal: control characters (escape
    sequences, bells, carriage returns) become U+FFFD, so a model name cannot drive the screen."""
    return _CONTROL.sub("\ufffd", str(text))


SKETCHFAB_MODEL_URL = "https://sketchfab.com/3d-models/{mid}"


def viewer_url(stored: str | None, mid: str) -> str:
    """The model's page to link to: the stored ``viewerUrl`` only when it is an https URL on
    sketchfab.com (the API's word is not trusted for a link: ``javascript:`` and ``data:`` were
    rendered as links), else the page built from its id."""
    from urllib.parse import urlsplit

    if stored:
        try:
            parts = urlsplit(stored)
        except ValueError:
            parts = None
        if parts is not None and parts.scheme == "https" and parts.hostname == "sketchfab.com" \
                and parts.port is None and not parts.username and not parts.password:
            return stored
    return SKETCHFAB_MODEL_URL.format(mid=validate_model_id(mid))
