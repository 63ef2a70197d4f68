"""Position encodings as swappable modules.

Every scheme answers two questions for the model: what to add to the token embeddings
(`embed`, absolute schemes) and how to rotate queries and keys (`rotation`, rotary schemes).
The rotary variants differ only in small hooks of `RoPE`: the inverse frequencies
(NTK, dynamic NTK, YaRN, LLaMA 3.1), the positions themselves (PI divides them by the
scale) and an attention factor (YaRN).

Rotary tables are built once per length in float64 and stored in float32 as non-persistent
buffers: bf16 cannot even represent positions above 256 exactly, and a table that is not
part of the state dict can never go stale inside a checkpoint.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class PositionError(ValueError):
    """A position encoding was asked for something it cannot do."""


class Rotation(NamedTuple):
    """cos and sin of the rotation angles, (n, head_dim), float32, half-split layout."""

    cos: Tensor
    sin: Tensor


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotation(x: Tensor, rotation: Rotation) -> Tensor:
    """Rotate pairs (i, i + d/2) of x (b, h, n, d) in float32 and return x's dtype."""
    xf = x.float()
    return (xf * rotation.cos + rotate_half(xf) * rotation.sin).to(x.dtype)


class PositionEncoding(nn.Module):
    """No position information at all (NoPE): the causal mask alone orders the tokens."""

    kind = "none"
    # True when the rotation of a position depends on how long the context currently is
    # (dynamic NTK). Such schemes must rotate cached keys again at every step.
    length_dependent = False

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 1:
            raise PositionError(
                f"scale must be a number >= 1 (the factor by which the window grows), got {scale!r}."
            )
        self.scale = float(scale)

    def embed(self, x: Tensor, start: int) -> Tensor:
        """Add position information to token embeddings x (b, n, dim) at positions start..start+n-1."""
        return x

    def rotation(self, start: int, length: int, context_len: int, device: torch.device) -> Rotation | None:
        """Rotation for positions start..start+length-1 when the context holds context_len tokens."""
        return None

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


# ----------------------------------------------------------------------------- absolute


EXTEND_MODES = ("interpolate", "append")
TABLE_INIT_STD = 0.02


class LearnedAbsolute(PositionEncoding):
    """A learned table of positions (GPT-2 / ViT), extended to a longer window by interpolation
    (`extend="interpolate"`, the analogue of PI) or by untrained rows after the trained ones
    (`extend="append"`, the analogue of extrapolation: positions beyond L were never seen)."""

    kind = "absolute"

    def __init__(self, dim: int, length: int, scale: float = 1.0, extend: str = "interpolate") -> None:
        super().__init__(scale)
        self.extend = _checked_extend(extend)
        self.table = nn.Parameter(torch.empty(length, dim))
        nn.init.normal_(self.table, std=TABLE_INIT_STD)

    @property
    def length(self) -> int:
        return self.table.shape[0]

    def embed(self, x: Tensor, start: int) -> Tensor:
        end = start + x.shape[1]
        if end > self.length:
            raise PositionError(
                f"the learned absolute table has {self.length} positions but position {end - 1} was asked for; "
                f"extend it by interpolation (train with scale={end / self.length:g} or more, or call "
                "extend_to) instead of reading past its end."
            )
        return x + self.table[start:end].to(x.dtype)

    @torch.no_grad()
    def extend_to(self, length: int) -> None:
        """Give the table `length` rows, the way `extend` says."""
        self.table = nn.Parameter(resize_table(self.table.data, length, self.extend))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, extend={self.extend}"


def resize_table(table: Tensor, length: int, extend: str = "interpolate") -> Tensor:
    """A trained (n, dim) table made `length` rows long: resampled, or cut / given untrained rows."""
    resize = {"interpolate": interpolate_table, "append": append_rows}[_checked_extend(extend)]
    return resize(table, length)


def _checked_extend(extend: str) -> str:
    if extend not in EXTEND_MODES:
        raise PositionError(f"position.extend={extend!r} is not one of {', '.join(EXTEND_MODES)}.")
    return extend


def append_rows(table: Tensor, length: int) -> Tensor:
    """Keep the first rows as trained and add untrained ones, drawn as a fresh table's are.

    Positions past the trained window then read vectors the model has never seen, as RoPE
    extrapolation reads angles it has never seen; a shorter `length` keeps the first rows.
    """
    if length <= table.shape[0]:
        return table[:length].clone()
    fresh = torch.randn(length - table.shape[0], table.shape[1], device=table.device) * TABLE_INIT_STD
    return torch.cat([table, fresh.to(table.dtype)])


def interpolate_table(table: Tensor, length: int) -> Tensor:
    """Linearly resample a (n, dim) table to (length, dim), keeping both end points.

    With align_corners the first and last rows stay put and new row i reads old position
    i * (n - 1) / (length - 1): where that is an integer, the row is the old row exactly.
    """
    if length < 2 or table.shape[0] < 2:
        raise PositionError(f"cannot interpolate a table of {table.shape[0]} rows to {length} rows.")
    grid = rearrange(table.float(), "n d -> 1 d n")
    resampled = F.interpolate(grid, size=length, mode="linear", align_corners=True)
    return rearrange(resampled, "1 d n -> n d").to(table.dtype)


class Sinusoidal(PositionEncoding):
    """The original Transformer's fixed sinusoids, with positions divided by the scale (PI's way)."""

    kind = "sinusoidal"

    def __init__(self, dim: int, scale: float = 1.0, base: float = 10000.0) -> None:
        super().__init__(scale)
        if dim % 2:
            raise PositionError(f"sinusoidal encodings need an even model dimension, got {dim}.")
        self.dim, self.base = dim, base
        self.register_buffer("_table", torch.empty(0, dim), persistent=False)

    def _ensure(self, length: int, device: torch.device) -> Tensor:
        if self._table.shape[0] < length or self._table.device != device or self._table.dtype != torch.float32:
            positions = torch.arange(length, dtype=torch.float64, device=device) / self.scale
            freqs = self.base ** (-torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim)
            angles = torch.outer(positions, freqs)
            table = rearrange([angles.sin(), angles.cos()], "two n f -> n (f two)")
            self._table = table.float()
        return self._table

    def embed(self, x: Tensor, start: int) -> Tensor:
        table = self._ensure(start + x.shape[1], x.device)
        return x + table[start : start + x.shape[1]].to(x.dtype)


# ----------------------------------------------------------------------------- rotary


class RoPE(PositionEncoding):
    """Rotary position embedding (Su et al.): pair j of a head rotates by position * theta^(-2j/d)."""

    kind = "rope"

    def __init__(self, head_dim: int, theta: float = 10000.0, scale: float = 1.0, original_window: int = 2048) -> None:
        super().__init__(scale)
        if head_dim % 2:
            raise PositionError(f"rotary encodings need an even head dimension, got {head_dim}.")
        self.head_dim, self.theta, self.original_window = head_dim, float(theta), int(original_window)
        self.register_buffer("_cos", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("_sin", torch.empty(0, head_dim), persistent=False)
        self._table_context: int | None = None  # the context length a length-dependent table was built for

    # --- the hooks a scaling law overrides ------------------------------------------------
    def base_inv_freq(self, theta: float | None = None) -> Tensor:
        """theta^(-2j/d) for j < d/2, in float64."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        return 1.0 / (theta or self.theta) ** exponents

    def inv_freq(self, context_len: int) -> Tensor:
        return self.base_inv_freq()

    def positions(self, positions: Tensor) -> Tensor:
        return positions

    def attention_factor(self) -> float:
        return 1.0

    # --- tables ---------------------------------------------------------------------------
    def _build(self, length: int, context_len: int, device: torch.device) -> None:
        positions = self.positions(torch.arange(length, dtype=torch.float64))
        angles = torch.outer(positions, self.inv_freq(context_len))
        angles = torch.cat((angles, angles), dim=-1)  # half-split layout: pair (j, j + d/2)
        factor = self.attention_factor()
        self._cos = (angles.cos() * factor).float().to(device)
        self._sin = (angles.sin() * factor).float().to(device)

    def rotation(self, start: int, length: int, context_len: int, device: torch.device) -> Rotation:
        end = start + length
        # module.to(bfloat16) casts buffers too: a table that is no longer float32 is rebuilt.
        stale = self._cos.shape[0] < end or self._cos.device != device or self._cos.dtype != torch.float32
        if self.length_dependent:
            # The table is valid for one context length only; keep it sized to that length.
            stale = stale or self._table_context != context_len
            build_len = max(end, context_len)
        else:
            # Grow geometrically so a decode loop rebuilds O(log n) times, not once per token.
            build_len = max(end, 2 * self._cos.shape[0]) if self._cos.shape[0] < end else self._cos.shape[0]
        if stale:
            self._build(build_len, context_len, device)
            self._table_context = context_len
        return Rotation(self._cos[start:end], self._sin[start:end])

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta:g}, scale={self.scale:g}, original_window={self.original_window}"


class PositionInterpolation(RoPE):
    """PI (Chen et al. 2023): f'(x, m) = f(x, m / s); integer positions become fractional ones inside [0, L)."""

    kind = "pi"

    def positions(self, positions: Tensor) -> Tensor:
        return positions / self.scale


class NTKAware(RoPE):
    """NTK-aware scaling: raise the base so the lowest frequency stretches by the scale, the highest not at all."""

    kind = "ntk"

    def inv_freq(self, context_len: int) -> Tensor:
        d = self.head_dim
        return self.base_inv_freq(self.theta * self.scale ** (d / (d - 2)))


class DynamicNTK(RoPE):
    """Dynamic NTK: the NTK base grows with the current context length beyond the original window.

    A position's rotation depends on the whole context length, so with a KV cache the cached
    keys are kept unrotated and rotated again with the current table at every step: each
    decoding step then gives the same logits as a full forward over the tokens so far (the
    bug of HF issue #25104 was caching keys rotated with the base of an earlier, shorter
    context). With one layer that is exact. In deeper layers the cached keys and values were
    computed from hidden states of earlier steps, i.e. earlier bases: only recomputing the
    prefix removes that. One full forward over n tokens reads every position with the base
    for n, so its logits at earlier positions differ from the step-by-step ones by design.
    """

    kind = "dynamic"
    length_dependent = True

    def __init__(self, head_dim: int, theta: float = 10000.0, scale: float = 1.0, original_window: int = 2048) -> None:
        super().__init__(head_dim, theta, scale, original_window)
        self.length_dependent = self.scale != 1.0

    def inv_freq(self, context_len: int) -> Tensor:
        if self.scale == 1.0:  # scale 1 means no scaling, as for every other scheme (HF would still grow the base)
            return self.base_inv_freq()
        n, window, d = max(context_len, self.original_window), self.original_window, self.head_dim
        theta = self.theta * ((self.scale * n / window) - (self.scale - 1)) ** (d / (d - 2))
        return self.base_inv_freq(theta)


class YaRN(RoPE):
    """YaRN (Peng et al. 2023): interpolate the low frequencies, keep the high ones, ramp in between,
    and scale attention logits by (0.1 ln s + 1)^2 through cos and sin."""

    kind = "yarn"

    def __init__(
        self,
        head_dim: int,
        theta: float = 10000.0,
        scale: float = 1.0,
        original_window: int = 2048,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        attention_factor: float | None = None,
    ) -> None:
        super().__init__(head_dim, theta, scale, original_window)
        self.beta_fast, self.beta_slow, self._attention_factor = beta_fast, beta_slow, attention_factor

    def _dim_for_rotations(self, rotations: float) -> float:
        """The pair index whose wavelength fits `rotations` full turns in the original window."""
        return (self.head_dim * math.log(self.original_window / (rotations * 2 * math.pi))) / (2 * math.log(self.theta))

    def inv_freq(self, context_len: int) -> Tensor:
        low = max(math.floor(self._dim_for_rotations(self.beta_fast)), 0)
        high = min(math.ceil(self._dim_for_rotations(self.beta_slow)), self.head_dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(self.head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: keep the original (extrapolated) frequency, 0: interpolate it
        base = self.base_inv_freq()
        return base / self.scale * (1 - keep) + base * keep

    def attention_factor(self) -> float:
        if self._attention_factor is not None:
            return self._attention_factor
        return 1.0 if self.scale <= 1 else 0.1 * math.log(self.scale) + 1.0


class Llama3(RoPE):
    """LLaMA 3.1's scaling: divide low frequencies by the scale, keep high ones, interpolate smoothly between."""

    kind = "llama3"

    def __init__(
        self,
        head_dim: int,
        theta: float = 500000.0,
        scale: float = 1.0,
        original_window: int = 8192,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
    ) -> None:
        super().__init__(head_dim, theta, scale, original_window)
        if high_freq_factor <= low_freq_factor:
            raise PositionError(
                f"llama3 scaling needs high_freq_factor > low_freq_factor, got {high_freq_factor} and {low_freq_factor}."
            )
        self.low_freq_factor, self.high_freq_factor = low_freq_factor, high_freq_factor

    def inv_freq(self, context_len: int) -> Tensor:
        base = self.base_inv_freq()
        wavelen = 2 * math.pi / base
        low_freq_wavelen = self.original_window / self.low_freq_factor
        high_freq_wavelen = self.original_window / self.high_freq_factor
        smooth = (self.original_window / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        medium = (1 - smooth) * base / self.scale + smooth * base
        scaled = torch.where(wavelen > low_freq_wavelen, base / self.scale, base)
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, medium, scaled)


# ----------------------------------------------------------------------------- registry

ROTARY: dict[str, type[RoPE]] = {
    cls.kind: cls for cls in (RoPE, PositionInterpolation, NTKAware, DynamicNTK, YaRN, Llama3)
}
KINDS = ("none", "absolute", "sinusoidal", *ROTARY)


def build_position_encoding(
    kind: str,
    *,
    dim: int,
    head_dim: int,
    window: int,
    rope_theta: float = 10000.0,
    scale: float = 1.0,
    theta: float | None = None,
    original_window: int | None = None,
    extend: str | None = None,
    **params: Any,
) -> PositionEncoding:
    """Build the scheme named `kind` for a model of width `dim` whose base window is `window` tokens.

    `theta` and `original_window` default to the model's own rope_theta and window; `params`
    are the scheme's extra settings (YaRN's betas, LLaMA 3.1's frequency factors); `extend` is the
    learned absolute table's way to a longer window (interpolate or append).
    """
    if kind not in KINDS:
        raise PositionError(f"unknown position encoding {kind!r}; choose one of {', '.join(KINDS)}.")
    if extend is not None and kind != "absolute":
        raise PositionError(f"position.extend applies to the learned absolute table only, not to {kind!r}.")
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PositionError(f"position.{name}={value!r} must be a number.")
    if kind in ROTARY:
        cls = ROTARY[kind]
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "head_dim"}
        unknown = sorted(set(params) - accepted)
        if unknown:
            raise PositionError(f"position {kind!r} has no setting(s) {unknown}; it takes {sorted(accepted)}.")
        return cls(
            head_dim,
            theta=theta or rope_theta,
            scale=scale,
            original_window=original_window or window,
            **params,
        )
    if params or theta is not None:
        raise PositionError(f"position {kind!r} takes no settings besides scale, got {sorted(params) or ['theta']}.")
    if kind == "absolute":
        PositionEncoding(scale)  # validates the scale
        return LearnedAbsolute(dim, length=max(2, round(window * scale)), scale=scale, extend=extend or "interpolate")
    if kind == "sinusoidal":
        return Sinusoidal(dim, scale=scale)
    return PositionEncoding(scale)
