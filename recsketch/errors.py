"""The project's own error types: every bad input ends in one of these, naming the input."""

from __future__ import annotations


class RecsketchError(Exception):
    """Base class: a failure recsketch understood and can explain in one line."""


class ConfigError(RecsketchError):
    """A setting (environment variable or flag) is missing or out of range."""


class BadInputError(RecsketchError):
    """Input data (a PSV row, an API answer, an id) is malformed."""


class InvalidModelId(BadInputError):
    """A string is not a Sketchfab model id."""


class BadImageError(BadInputError):
    """A thumbnail is missing, undecodable or unsafe to decode."""


class UnknownModel(RecsketchError):
    """A model id that is not in the catalogue."""


class ApiError(RecsketchError):
    """The Sketchfab API failed after all retries, or answered something unusable."""


class WeightsUnavailable(RecsketchError):
    """Pretrained weights are neither cached nor downloadable."""


class DatabaseUnavailable(RecsketchError):
    """The recommendations DB cannot be reached, or went away mid-transaction."""


class StorageFull(RecsketchError):
    """The disk filled up while a file was written; the half-written file was removed."""


class PermanentApiError(ApiError):
    """The API refused the request itself (a 4xx other than 429): retrying cannot help."""


class RetryAfterTooLong(ApiError):
    """The API asked to wait longer than RECSKETCH_RETRY_AFTER_MAX_S allows."""


class SchemaBehind(ConfigError):
    """The recommendations DB's schema is older than the code: `recsketch db upgrade` first."""


class QualityGateFailed(RecsketchError):
    """A run measured worse than the live one by more than RECSKETCH_GATE_MIN_RATIO allows: not
    loaded (the live run stays served); ``force`` loads it anyway."""
