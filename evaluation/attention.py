"""The paper's Figure-2 analysis: why interpolating rotary positions is safe and extrapolating is not.

A rotary attention score, as a function of the relative position s, is
    a(s) = Re[sum_j h_j e^{i s theta_j}],  theta_j = c^(-2j/d),  j < d/2,
with h_j = q~_j conj(k~_j) for the complex pairs q~_j of a query and k~_j of a key. In the
half-split layout pair j is the real pair (j, j + d/2): x~_j = x_j + i x_{j+d/2}.

Fitting h to random values on the integers of [0, L] by least squares gives a function that
is small there and between the integers (interpolation) but huge beyond L (extrapolation):
the slow frequencies are nearly collinear on [0, L], so the fit leans on large coefficients
that cancel only where they were fitted. The bounds: interpolation error
<= d max|h_j| / (32 ln c) (Theorem 3.1, unit spacing), extrapolation |a(s)| <= 2 max|h_j| B(s)
with B(s) = sum_k |A_{k+1}(s)|, A_k(s) = sum_{j<k} e^{i s theta_j} (RoPE's Abel bound).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from einops import rearrange

from evaluation.errors import EvaluationError


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """theta_j = c^(-2j/d) for j < d/2."""
    if head_dim < 2 or head_dim % 2:
        raise EvaluationError(f"attention.head_dim={head_dim} must be an even number >= 2.")
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def score_basis(positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """(n, d) real design matrix: a(s) = basis(s) @ [Re h, Im h]."""
    angles = np.outer(positions, inv_freq)
    return np.concatenate([np.cos(angles), -np.sin(angles)], axis=1)


def scores(h: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """a(s) for complex coefficients h (p, d/2) at `positions` (n,) -> (p, n)."""
    coefficients = np.concatenate([h.real, h.imag], axis=-1)  # (p, d)
    return coefficients @ score_basis(positions, inv_freq).T


def abel_sum(positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """B(s) = sum_{k<d/2} |A_{k+1}(s)| with A_k(s) = sum_{j<k} e^{i s theta_j}."""
    partial = np.cumsum(np.exp(1j * np.outer(positions, inv_freq)), axis=1)
    return np.abs(partial).sum(axis=1)


def interpolation_bound(head_dim: int, max_h: float | np.ndarray, theta: float) -> float | np.ndarray:
    """Theorem 3.1 at unit spacing: |a(s) - a_linear(s)| <= d max|h_j| / (32 ln c).

    As the paper states it, an approximation: the worst-case h exceeds it by 14% at d = 128 and 2.5x at
    d = 16 (tests/test_evaluation.py); `interpolation_bound_exact` is the bound that always holds.
    """
    return head_dim * max_h / (32 * math.log(theta))


def interpolation_bound_exact(inv_freq: np.ndarray, max_h: float | np.ndarray) -> float | np.ndarray:
    """The Taylor bound before the paper's approximation: max|a''| / 8 <= max|h_j| sum_j theta_j^2 / 8.

    The paper replaces sum_j theta_j^2 = sum_j c^(-4j/d) by d / (4 ln c), which is smaller
    than the sum (1 / (1 - e^-x) > 1 / x): about 15% for d = 128, a factor 2.5 for d = 16.
    """
    return max_h * float(np.sum(inv_freq**2)) / 8


def _regions(window: int, extent: float, step: float) -> dict[str, np.ndarray]:
    if extent <= 1:
        raise EvaluationError(f"attention.extent={extent} must be > 1 (extrapolate up to extent x window).")
    if not 0 < step < 1:
        raise EvaluationError(f"attention.step={step} must be in (0, 1): the spacing of the fractional positions.")
    n_fine = int(round(window / step))
    return {
        "inside": np.arange(window + 1, dtype=np.float64),
        "interpolation": np.linspace(0.0, window, n_fine + 1),
        "extrapolation": np.arange(window + 1, int(extent * window) + 1, dtype=np.float64),
    }


def analyse_coefficients(
    h: np.ndarray, inv_freq: np.ndarray, theta: float, window: int, extent: float = 2.0, step: float = 1 / 16
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-row maxima of |a(s)| on each region, the measured interpolation error and both bounds.

    Returns (summary: name -> (p,) arrays, curves: the positions and a(s) of every region).
    """
    h = np.atleast_2d(h)
    head_dim = 2 * h.shape[-1]
    regions = _regions(window, extent, step)
    curves: dict[str, np.ndarray] = {}
    for name, positions in regions.items():
        curves[f"{name}_s"] = positions
        curves[name] = scores(h, positions, inv_freq)
    # Linear interpolation between the neighbouring integers, the reference of Theorem 3.1.
    fine = regions["interpolation"]
    inside = curves["inside"]
    low = np.minimum(np.floor(fine).astype(int), window - 1)
    frac = fine - low
    linear = inside[:, low] * (1 - frac) + inside[:, low + 1] * frac
    max_h = np.abs(h).max(axis=-1)
    b_over_d = abel_sum(regions["extrapolation"], inv_freq) / head_dim
    curves["b_over_d"] = b_over_d
    interp_bound = interpolation_bound(head_dim, max_h, theta)
    extrap_bound_min = 2 * max_h * b_over_d.min() * head_dim
    summary = {
        "max_abs_h": max_h,
        "inside_max": np.abs(inside).max(-1),
        "interpolation_max": np.abs(curves["interpolation"]).max(-1),
        "extrapolation_max": np.abs(curves["extrapolation"]).max(-1),
        "interpolation_error_max": np.abs(curves["interpolation"] - linear).max(-1),
        "interpolation_bound": interp_bound,
        "interpolation_bound_exact": interpolation_bound_exact(inv_freq, max_h),
        "extrapolation_bound_min": extrap_bound_min,
        "extrapolation_bound_mean": 2 * max_h * b_over_d.mean() * head_dim,
    }
    summary["extrapolation_over_inside"] = summary["extrapolation_max"] / summary["inside_max"]
    summary["interpolation_over_inside"] = summary["interpolation_max"] / summary["inside_max"]
    # 2 max|h| B(s) / (d max|h| / (32 ln c)) = 64 ln c B(s)/d: about 600 where B(s) = d.
    summary["bound_ratio_min"] = extrap_bound_min / interp_bound
    summary["bound_ratio_mean"] = summary["extrapolation_bound_mean"] / interp_bound
    return summary, curves


def _region_facts(theta: float, head_dim: int, window: int, extent: float, b_over_d: np.ndarray) -> dict[str, float]:
    return {
        "head_dim": head_dim,
        "window": window,
        "theta": theta,
        "extent": extent,
        "b_over_d_min": float(b_over_d.min()),
        "b_over_d_mean": float(b_over_d.mean()),
        "bound_ratio_at_b_equal_d": 64 * math.log(theta),
    }


def fit_random_scores(
    head_dim: int = 128,
    window: int = 2048,
    theta: float = 10000.0,
    extent: float = 2.0,
    step: float = 1 / 16,
    seed: int = 0,
    rcond: float | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Least-squares fit of uniform [-1, 1] values on the integers of [0, window] with the rotary basis."""
    if window < 2:
        raise EvaluationError(f"attention.window={window} must be at least 2.")
    inv_freq = inverse_frequencies(head_dim, theta)
    rng = np.random.default_rng(seed)
    positions = np.arange(window + 1, dtype=np.float64)
    targets = rng.uniform(-1.0, 1.0, size=positions.shape)
    solution, *_ = np.linalg.lstsq(score_basis(positions, inv_freq), targets, rcond=rcond)
    h = solution[: head_dim // 2] + 1j * solution[head_dim // 2 :]
    summary, curves = analyse_coefficients(h, inv_freq, theta, window, extent, step)
    curves["targets"] = targets
    facts = {key: float(value[0]) for key, value in summary.items()}
    facts["fit_rms_error"] = float(np.sqrt(np.mean((curves["inside"][0] - targets) ** 2)))
    facts.update(_region_facts(theta, head_dim, window, extent, curves["b_over_d"]))
    facts["rcond"] = rcond
    facts["seed"] = seed
    return facts, curves


@torch.no_grad()
def query_key_coefficients(
    model: torch.nn.Module, tokens: torch.Tensor, pairs: int = 64, seed: int = 0
) -> tuple[np.ndarray, list[dict[str, int]]]:
    """h_j = q~_j conj(k~_j) for `pairs` random (layer, head, query m, key n <= m) of a real forward pass.

    Queries and keys are taken before rotation (the outputs of wq and wk), so h holds the content
    part of the score and the rotation supplies e^{i (m - n) theta_j}.
    """
    args = model.args
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(model.layers):
        for name in ("wq", "wk"):
            module = getattr(layer.attention, name)
            hooks.append(module.register_forward_hook(_capture(captured, (index, name), args.head_dim)))
    try:
        model.hidden_states((tokens[None] if tokens.dim() == 1 else tokens[:1]).long())
    finally:
        for hook in hooks:
            hook.remove()
    n = tokens.shape[-1]
    if n < 2:
        raise EvaluationError("the attention analysis needs a document of at least 2 tokens.")
    rng = np.random.default_rng(seed)
    group = args.n_heads // args.kv_heads
    coefficients, where = [], []
    for _ in range(pairs):
        layer, head = int(rng.integers(args.n_layers)), int(rng.integers(args.n_heads))
        query_pos = int(rng.integers(1, n))
        key_pos = int(rng.integers(0, query_pos + 1))
        q = captured[(layer, "wq")][0, head, query_pos]
        k = captured[(layer, "wk")][0, head // group, key_pos]
        half = args.head_dim // 2
        q_c = torch.complex(q[:half].double(), q[half:].double())
        k_c = torch.complex(k[:half].double(), k[half:].double())
        coefficients.append((q_c * k_c.conj()).numpy())
        where.append({"layer": layer, "head": head, "query": query_pos, "key": key_pos})
    return np.stack(coefficients), where


def _capture(store: dict, key: tuple[int, str], head_dim: int):
    """A forward hook that keeps a projection's output as (b, heads, n, head_dim)."""

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        store[key] = rearrange(output.float().cpu(), "b n (h d) -> b h n d", d=head_dim)

    return hook


def geometric_theta(position: Any) -> float | None:
    """The base c of the rotary frequencies c^(-2j/d) a position encoding reads with, or None when they are not
    of that form (the analysis and its bounds assume it): RoPE's and PI's own theta (PI moves positions, not
    frequencies), NTK's enlarged one; YaRN, LLaMA 3.1 and dynamic NTK bend the frequencies per j or per length."""
    kind = getattr(position, "kind", None)
    if kind in ("rope", "pi") or (kind in ("yarn", "llama3", "dynamic") and position.scale == 1):
        return float(position.theta)  # (the scalings are plain RoPE at scale 1)
    if kind == "ntk":
        d = position.head_dim
        return float(position.theta * position.scale ** (d / (d - 2)))
    return None


def analyse_model(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    pairs: int = 64,
    extent: float = 2.0,
    step: float = 1 / 16,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Figure 2 with a checkpoint's real queries and keys, on the model's own window L and the frequencies its
    position encoding reads with (see geometric_theta)."""
    args = model.args
    theta = geometric_theta(model.position)
    if theta is None:
        raise EvaluationError(f"the attention analysis needs RoPE's geometric frequencies; position {model.position.kind!r} bends them.")
    inv_freq = inverse_frequencies(args.head_dim, theta)
    h, where = query_key_coefficients(model, tokens, pairs, seed)
    summary, curves = analyse_coefficients(h, inv_freq, theta, args.max_seq_len, extent, step)
    facts: dict[str, Any] = {}
    for key, values in summary.items():
        facts[f"{key}_median"] = float(np.median(values))
        facts[f"{key}_max"] = float(np.max(values))
    # The fraction of pairs within the rigorous Taylor bound (the paper's is an approximation of it).
    facts["interpolation_bound_holds"] = float(np.mean(summary["interpolation_error_max"] <= summary["interpolation_bound_exact"] * (1 + 1e-9)))
    facts["pairs"] = len(where)
    facts.update(_region_facts(theta, args.head_dim, args.max_seq_len, extent, curves["b_over_d"]))
    curves["pairs"] = np.array([[w["layer"], w["head"], w["query"], w["key"]] for w in where])
    return facts, curves


def pair_medians(facts: dict[str, Any]) -> dict[str, Any]:
    """A real query/key analysis under the names a fit uses: the per-pair medians, and what every pair shares
    (B(s)/d and the bound ratio where B(s) = d depend on the frequencies only; the shape)."""
    shared = {k: facts[k] for k in ("b_over_d_min", "bound_ratio_at_b_equal_d", "head_dim", "window", "theta") if k in facts}
    return {k.removesuffix("_median"): v for k, v in facts.items() if k.endswith("_median")} | shared
