"""Model arguments and presets for the LLaMA shapes people actually load."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a LLaMA model; names follow Meta's params.json."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many key/value heads as query heads (no GQA)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_dim: int | None = None  # explicit hidden size; None derives it the way Meta does
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # the window the weights were (pre)trained at: PI's L

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}.")
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:
            raise ValueError(f"model.n_kv_heads must be positive (or null for as many as n_heads), got {self.n_kv_heads}.")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}.")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.kv_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"the head dimension dim/n_heads={self.head_dim} must be even for rotary encodings.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of (Meta's rule)."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelArgs":
        """Build from a mapping, refusing keys this class does not know (a typo must not be ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model argument(s) {unknown}; known ones are {sorted(known)}.")
        return cls(**values)

    def with_(self, **changes: Any) -> "ModelArgs":
        return replace(self, **changes)


PRESETS: dict[str, ModelArgs] = {
    # Meta's LLaMA 1 (params.json: norm_eps 1e-6, vocab_size -1 = 32000 from the tokenizer).
    "llama1-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6, max_seq_len=2048),
    "llama1-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6, max_seq_len=2048),
    "llama1-33b": ModelArgs(dim=6656, n_layers=60, n_heads=52, norm_eps=1e-6, max_seq_len=2048),
    "llama1-65b": ModelArgs(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-6, max_seq_len=2048),
    # LLaMA 2: 4096-token window; 70B uses grouped-query attention with 8 key/value heads.
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, max_seq_len=4096),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, max_seq_len=4096),
    "llama2-70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, max_seq_len=4096
    ),
    # LLaMA 3 8B: theta 500000 and a 128256-token tiktoken vocabulary.
    "llama3-8b": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=1024,
        ffn_dim_multiplier=1.3,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    "tinyllama-1.1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048),
}


def preset(name: str) -> ModelArgs:
    """Look up a named shape; the error lists the names that exist."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.") from None
