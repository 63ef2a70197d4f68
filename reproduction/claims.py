"""The paper's five qualitative claims, judged from the reproduction's numbers by stated criteria.

The criteria are fixed here, before any run, and printed in the report next to each verdict:
a claim "held", held only "partly" (named how), "did not hold", or was "not testable".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

HELD, PARTLY, NOT_HELD, UNTESTABLE = "held", "partly", "did not hold", "not testable"

# Thresholds of the verdicts (see each judge for how they are used).
EXPLOSION_RATIO = 10.0      # claim 1: the paper's base goes from 7.2 to > 1000 (> 100x)
DEGRADATION_RATIO = 1.5
MONOTONE_TOLERANCE = 0.01   # claim 2: a window may be at most 1% worse than the shorter one
COST_HELD = 1.05            # claim 5: PI's perplexity at L within 5% of the base's
COST_PARTLY = 1.15
NEAR_L = 2.0                # claim 4: direct fine-tuning "stays near L": k_max <= 2 L


@dataclass(frozen=True)
class Claim:
    number: int
    text: str
    paper: str
    ours: str
    criterion: str
    verdict: str


@dataclass(frozen=True)
class Numbers:
    """What the claims are judged on; perplexities by window, k_max by model."""

    window: int                                   # L
    long_window: int                              # L' = scale x L
    ppl: Mapping[str, Mapping[int, float]]        # model -> window -> perplexity (test split)
    base: str                                     # the RoPE base read without fine-tuning
    pi: str                                       # PI after N fine-tuning steps
    fine_tuned: Sequence[str]                     # direct fine-tuning after N and 10N steps
    k_max: Mapping[str, int]                      # passkey k_max at window L'
    largest_k: int                                # the largest distance tested at L'
    base_k_max_at_window: int                     # the base's own k_max at window L
    base_largest_k_at_window: int

    def __post_init__(self) -> None:
        if not self.fine_tuned:  # claims 3 and 4 compare PI with them: with none, both would hold vacuously
            raise ValueError("the claims need at least one direct fine-tune to compare PI with")


def multiple(window: int, base: int) -> str:
    """A window as a multiple of L: "L", "8L", "2.5L"."""
    return "L" if window == base else f"{window / base:g}L"


def _nan(*values: float) -> bool:
    """A NaN perplexity is a numeric failure of the run, not a measurement: the claims it enters are not testable."""
    return any(math.isnan(v) for v in values)


def judge_all(n: Numbers) -> list[Claim]:
    return [explodes(n), keeps_falling(n), extrapolation_worse(n), passkey(n), little_cost(n)]


def explodes(n: Numbers) -> Claim:
    base = n.ppl[n.base]
    longer = {w: p for w, p in base.items() if w > n.window}
    worst = max(longer, key=lambda w: -1.0 if math.isnan(longer[w]) else longer[w])
    ratio = longer[worst] / base[n.window]
    if _nan(base[n.window], *longer.values()) or not math.isfinite(base[n.window]):
        verdict = UNTESTABLE  # no number, or the base broken inside its own window: nothing to explode from
    else:
        verdict = HELD if ratio >= EXPLOSION_RATIO else PARTLY if ratio >= DEGRADATION_RATIO else NOT_HELD
    return Claim(
        1, "Without fine-tuning, perplexity explodes beyond the trained window L (plain RoPE).",
        "7.20 at L, > 1000 at 2L to 16L (LLaMA 7B, PG-19)",
        f"{base[n.window]:.2f} at L, {longer[worst]:.2f} at {multiple(worst, n.window)} ({ratio:.2f}x)",
        f"held: >= {EXPLOSION_RATIO:g}x at some window beyond L; partly (degrades, no explosion): >= {DEGRADATION_RATIO:g}x; "
        "not testable: a NaN, or the base not finite at L",
        verdict,
    )


def keeps_falling(n: Numbers) -> Claim:
    pi = n.ppl[n.pi]
    windows = sorted(pi)
    steps_ok = all(pi[b] <= pi[a] * (1 + MONOTONE_TOLERANCE) for a, b in zip(windows, windows[1:]))
    fell = pi[windows[-1]] < pi[windows[0]]
    if _nan(*pi.values()):
        verdict = UNTESTABLE
    elif not all(math.isfinite(pi[w]) for w in windows):  # inf <= inf would pass the comparisons
        verdict = NOT_HELD
    else:
        verdict = HELD if steps_ok and fell else PARTLY if pi[windows[-1]] <= pi[windows[0]] * (1 + MONOTONE_TOLERANCE) else NOT_HELD
    return Claim(
        2, "With PI fine-tuning, perplexity keeps falling as the eval window grows up to L'.",
        "PI to 16384 (8x): 7.11, 6.93, 6.82, 6.83 at L, 2L, 4L, 8L",
        ", ".join(f"{pi[w]:.2f}" for w in windows) + " at " + ", ".join(multiple(w, n.window) for w in windows),
        f"held: each longer window at most {MONOTONE_TOLERANCE:.0%} worse than the one before and L' below L; "
        f"partly: L' no worse than L (within {MONOTONE_TOLERANCE:.0%})",
        verdict,
    )


def extrapolation_worse(n: Numbers) -> Claim:
    at = n.long_window
    pi = n.ppl[n.pi][at]
    worse = [name for name in n.fine_tuned if n.ppl[name][at] > pi]
    if _nan(pi, *(n.ppl[name][at] for name in n.fine_tuned)):
        verdict = UNTESTABLE
    else:  # an infinite direct fine-tune is worse than a finite PI; an infinite PI is worse than every one
        verdict = HELD if len(worse) == len(n.fine_tuned) else PARTLY if worse else NOT_HELD
    return Claim(
        3, "Direct fine-tuning (extrapolation) is worse than PI at long windows, even with 10x the steps.",
        "at 8192 (4x): FT 10000 steps 7.69 vs PI 1000 steps 6.95",
        f"at L' = {at}: PI {pi:.2f}; " + "; ".join(f"{name} {n.ppl[name][at]:.2f}" for name in n.fine_tuned),
        "held: every direct fine-tune has a higher perplexity than PI at L'; partly: only some do",
        verdict,
    )


def passkey(n: Numbers) -> Claim:
    ours = (f"base at L: k_max {n.base_k_max_at_window} of {n.base_largest_k_at_window} tested; at L' = {n.long_window} "
            f"(largest k tested {n.largest_k}): PI {n.k_max[n.pi]}; " + "; ".join(f"{m} {n.k_max[m]}" for m in n.fine_tuned))
    criterion = (f"held: PI's k_max is the largest k tested at L' and every direct fine-tune's k_max <= {NEAR_L:g}L; "
                 "partly: PI's k_max beats every direct fine-tune's; not testable: the base cannot retrieve within L")
    if n.base_k_max_at_window == 0:
        verdict = UNTESTABLE
    elif n.k_max[n.pi] >= n.largest_k and all(n.k_max[m] <= NEAR_L * n.window for m in n.fine_tuned):
        verdict = HELD
    elif all(n.k_max[n.pi] > n.k_max[m] for m in n.fine_tuned):
        verdict = PARTLY
    else:
        verdict = NOT_HELD
    return Claim(
        4, "PI reaches passkey k_max = L' within ~200 steps; direct fine-tuning stays near L.",
        "PI-8192: 8192 after 200 steps; FT-8192: 1792 (200 steps), 2560 after 10000 steps (L = 2048)",
        ours, criterion, verdict,
    )


def little_cost(n: Numbers) -> Claim:
    base, pi = n.ppl[n.base][n.window], n.ppl[n.pi][n.window]
    ratio = pi / base
    if _nan(base, pi) or not math.isfinite(base):
        verdict = UNTESTABLE  # inf / inf, or PI's cost measured against a base broken inside its own window
    else:
        verdict = HELD if ratio <= COST_HELD else PARTLY if ratio <= COST_PARTLY else NOT_HELD
    return Claim(
        5, "PI costs little inside the original window.",
        "at L = 2048: base 7.20, PI-8192 7.13, PI-16384 7.11; PIQA 78.9 -> 78.2",
        f"at L = {n.window}: base {base:.2f}, PI {pi:.2f} ({ratio:.3f}x)",
        f"held: PI's perplexity at L within {COST_HELD - 1:.0%} of the base's; partly: within {COST_PARTLY - 1:.0%}",
        verdict,
    )
