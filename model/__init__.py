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


def keep_stored_settings(requested: Mapping[str, Any], stored: Mapping[str, Any]) -> dict[str, Any]:
    """`requested` with the settings it leaves null (but its scale) taken from `stored`, when both name the same
    encoding.

    A checkpoint may carry settings a config group leaves to the model: LLaMA 3.1 read from HF has
    original_window 8192 while its window is 16384 (x 8 = 131072), so `position=llama3 scale=8` with
    original_window null would otherwise rotate with the frequencies of a 16384 window.
    """
    merged = dict(requested)
    if merged.get("kind") != stored.get("kind"):
        return merged
    # The scale is the run's own choice, never inherited; YaRN's attention_factor is a function of the scale,
    # so it is kept only at the stored scale (a new scale gets its own default, 0.1 ln s + 1).
    skip = {"scale"}
    if float(merged.get("scale") or 1.0) != float(stored.get("scale") or 1.0):
        skip.add("attention_factor")
    for key, value in stored.items():
        if key not in skip and merged.get(key) is None and value is not None:
            merged[key] = value
    return merged


def build_model(args: ModelArgs, position: Mapping[str, Any] | None = None) -> Llama:
    """A freshly initialised model; `position` defaults to plain RoPE with the model's theta."""
    return Llama(args, build_position(args, position or {"kind": "rope"}))


__all__ = [
    "KINDS",
    "keep_stored_settings",
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
