"""LLaMA with pluggable position encodings."""

from __future__ import annotations

from typing import Any, Mapping

from .args import PRESETS, ModelArgs, preset
from .llama import KVCache, Llama
from .position import KINDS, PositionEncoding, PositionError, build_position_encoding


def build_position(args: ModelArgs, position: Mapping[str, Any]) -> PositionEncoding:
    """The position module described by a config mapping such as {"kind": "pi", "scale": 8}."""
    settings = dict(position)
    kind = settings.pop("kind", None)
    if kind is None:
        raise PositionError(f"a position config needs a 'kind' (one of {', '.join(KINDS)}), got {sorted(settings)}.")
    settings = {k: v for k, v in settings.items() if v is not None}
    return build_position_encoding(
        kind, dim=args.dim, head_dim=args.head_dim, window=args.max_seq_len, rope_theta=args.rope_theta, **settings
    )


def build_model(args: ModelArgs, position: Mapping[str, Any] | None = None) -> Llama:
    """A freshly initialised model; `position` defaults to plain RoPE with the model's theta."""
    return Llama(args, build_position(args, position or {"kind": "rope"}))


__all__ = [
    "KINDS",
    "PRESETS",
    "KVCache",
    "Llama",
    "ModelArgs",
    "PositionEncoding",
    "PositionError",
    "build_model",
    "build_position",
    "preset",
]
