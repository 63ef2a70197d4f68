"""How long a context a model can read, checked before any long computation starts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model import Llama, ModelArgs, PositionEncoding
from model.checkpoints import Pretrained
from model.position import LearnedAbsolute

from evaluation.errors import EvaluationError


def readable_length(position: PositionEncoding) -> int | None:
    """The most positions `position` can encode; None when any length can be read (rotary, sinusoidal, none)."""
    if isinstance(position, LearnedAbsolute):
        return position.length
    return None


def window_of(args: ModelArgs, position: PositionEncoding) -> int:
    """The window a model of `args` read with `position` is meant for: the base window times the scale (PI's L')."""
    return max(1, round(args.max_seq_len * position.scale))


def meant_window(pretrained: Pretrained, position: Mapping[str, Any], module: PositionEncoding) -> int:
    """The window a checkpoint read with `position` (built as `module`) is meant for.

    Read with the encoding it was trained with, that is the window it was trained at, when the checkpoint
    records it (`seq_len=` may have made it other than the base window times the scale). Read with another
    encoding, scale or theta, and for checkpoints that do not record it, it is the base window times the scale.
    """
    trained = pretrained.extra.get("train_seq_len")
    if trained is not None and _reading(position) == _reading(pretrained.position):
        return int(trained)
    return window_of(pretrained.args, module)


def _reading(position: Mapping[str, Any]) -> tuple[str, float, float | None]:
    """Encoding, scale and rotary base: what makes two readings of one checkpoint different encodings."""
    scale, theta = position.get("scale"), position.get("theta")
    return str(position.get("kind", "rope")), float(scale) if scale is not None else 1.0, float(theta) if theta else None


def extended_window(model: Llama) -> int:
    """The window the model is meant to read: the base window times the position scale (PI's L')."""
    return window_of(model.args, model.position)


def check_window(model: Llama, length: int, what: str) -> None:
    """Raise one clear EvaluationError when `length` tokens do not fit the model's position encoding."""
    limit = readable_length(model.position)
    if limit is not None and length > limit:
        raise EvaluationError(
            f"{what} needs {length} positions but the model's learned absolute position table has only {limit}; "
            f"lower the window or read the model with a larger scale (e.g. position=absolute scale={length / model.args.max_seq_len:g})."
        )
