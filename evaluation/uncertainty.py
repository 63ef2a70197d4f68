"""How much a perplexity owes to which test text was read: a block bootstrap over scored tokens.

A perplexity is exp(total nll / total tokens) over the scored tokens of a few documents. Another sample of
text from the same source would give another value. Neighbouring tokens' losses are correlated (a hard
passage is hard for a while), so resampling single tokens would understate the spread: the scored tokens
are cut into blocks of consecutive tokens within one document (`evaluation.perplexity` records each block's
nll and token count), and whole blocks are resampled with replacement. Two models read with the same
documents, window and stride have the same blocks, so their ratio is resampled in pairs, with the same
blocks for both: the interval of a comparison is narrower than either interval alone suggests, because a
passage that is hard for one model is mostly hard for the other.

What this does not measure: training noise (another seed, another data order). A small model's
perplexity beyond its trained window can move far more between seeds than between samples of text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
# Resampled at once: the index matrix is RESAMPLE_CHUNK x blocks.
RESAMPLE_CHUNK = 250


def _block_arrays(blocks: Mapping[str, Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    nll = np.asarray(blocks["nll"], dtype=np.float64)
    tokens = np.asarray(blocks["tokens"], dtype=np.float64)
    if nll.shape != tokens.shape or nll.ndim != 1:
        raise ValueError(f"blocks need one nll and one token count each, not {nll.shape} and {tokens.shape}")
    return nll, tokens


def _resampled_losses(nll: Sequence[np.ndarray], tokens: np.ndarray, resamples: int, seed: int) -> list[np.ndarray]:
    """Mean loss per token of each resample, for each nll array, all with the same resampled blocks."""
    rng = np.random.default_rng(seed)
    n = len(tokens)
    out: list[list[np.ndarray]] = [[] for _ in nll]
    for first in range(0, resamples, RESAMPLE_CHUNK):
        picks = rng.integers(0, n, size=(min(RESAMPLE_CHUNK, resamples - first), n))
        counted = tokens[picks].sum(axis=1)
        for values, collected in zip(nll, out):
            collected.append(values[picks].sum(axis=1) / counted)
    return [np.concatenate(parts) for parts in out]


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def ppl_interval(blocks: Mapping[str, Sequence[float]], level: float = LEVEL, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of exp(nll / tokens) over resampled blocks; None with fewer than 2 blocks
    or a loss that is not finite (a broken-down model has no interval worth stating)."""
    nll, tokens = _block_arrays(blocks)
    if len(tokens) < 2 or not np.isfinite(nll).all() or (tokens <= 0).any():
        return None
    (losses,) = _resampled_losses([nll], tokens, resamples, seed)
    low, high = _percentiles(losses, level)
    return _exp(low), _exp(high)


def ppl_ratio(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], level: float = LEVEL,
              resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, tuple[float, float]] | None:
    """ppl(a) / ppl(b) and its paired bootstrap interval: both read on the same resampled blocks.

    None when the two were not read on the same blocks (other documents, window or stride), with fewer than
    2 blocks, or with a loss that is not finite.
    """
    a_nll, a_tokens = _block_arrays(a)
    b_nll, b_tokens = _block_arrays(b)
    if a_tokens.shape != b_tokens.shape or not np.array_equal(a_tokens, b_tokens):
        return None
    if len(a_tokens) < 2 or not (np.isfinite(a_nll).all() and np.isfinite(b_nll).all()) or (a_tokens <= 0).any():
        return None
    point = (a_nll.sum() - b_nll.sum()) / a_tokens.sum()
    a_losses, b_losses = _resampled_losses([a_nll, b_nll], a_tokens, resamples, seed)
    low, high = _percentiles(a_losses - b_losses, level)
    return _exp(point), (_exp(low), _exp(high))


def blocks_of(record: Mapping[str, Any] | None) -> Mapping[str, Sequence[float]] | None:
    """The blocks a perplexity record in results.json holds (None for records written before they were kept)."""
    blocks = (record or {}).get("blocks")
    return blocks if isinstance(blocks, Mapping) and "nll" in blocks and "tokens" in blocks else None


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
