"""The one exception type for evaluation settings a user can get wrong."""

from __future__ import annotations


class EvaluationError(ValueError):
    """A bad evaluation setting; the message names the value and the fix."""
