"""The one exception type for data problems a user can cause and fix."""

from __future__ import annotations


class DataError(ValueError):
    """A bad data setting or input file; the message names the value and the fix."""
