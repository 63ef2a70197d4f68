"""How much a perplexity owes to which passages were read: a block bootstrap over scored tokens.

A perplexity is exp(total nll / total tokens) over the scored tokens of some documents. Other passages would
give another value. Neighbouring tokens' losses are correlated (a hard passage is hard for a while), so
resampling single tokens would understate the spread: `evaluation.perplexity` sums each block of
BLOCK_TOKENS consecutive positions of one document, and whole blocks are resampled with replacement. Two
models read on the same documents have the same blocks (at any window and stride), so their ratio is
resampled in pairs, with the same blocks for both: a passage that is hard for one model is mostly hard for
the other, and the interval of the comparison is narrower than the two intervals alone suggest.

What the intervals cover: other passages like these documents' blocks. Blocks of one document share its
overall difficulty, so with few documents (the reproduction's 3 test plays) the interval understates how
much another set of documents from the same source would move a perplexity; the paired ratios may suffer
less, where a document's difficulty cancels between the two models (not measured here). Below MIN_BLOCKS
blocks a percentile bootstrap covers far less than it says (about 75% at 3 blocks, 90% at 10, for a nominal
95%; a little under 95% above MIN_BLOCKS), so no interval is given. Training noise (another seed, another
data order) is not part of any of this.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
MIN_BLOCKS = 20
# Resampled at once: the index matrix is RESAMPLE_CHUNK x blocks.
RESAMPLE_CHUNK = 250


def _block_arrays(blocks: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
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


def ppl_interval(blocks: Mapping[str, Any], level: float = LEVEL, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of exp(nll / tokens) over resampled blocks.

    None with fewer than MIN_BLOCKS blocks, or a loss that is not finite or overflows (a broken-down model
    has no interval worth stating).
    """
    nll, tokens = _block_arrays(blocks)
    if len(tokens) < MIN_BLOCKS or not np.isfinite(nll).all() or (tokens <= 0).any():
        return None
    (losses,) = _resampled_losses([nll], tokens, resamples, seed)
    low, high = _percentiles(losses, level)
    return (_exp(low), _exp(high)) if math.isfinite(_exp(high)) else None


def pairing_problem(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> str | None:
    """Why two results' blocks cannot give a paired interval, in words; None when they can."""
    if a is None or b is None:
        return "no blocks recorded"
    if "documents" not in a or "documents" not in b:
        return "blocks recorded without the documents' fingerprint"
    if a["documents"] != b["documents"]:
        return "not read on the same documents"
    try:
        (a_nll, a_tokens), (b_nll, b_tokens) = _block_arrays(a), _block_arrays(b)
    except ValueError as error:
        return str(error)
    if not np.array_equal(a_tokens, b_tokens):
        return "the same documents cut into other blocks (another block size, or a shard's share)"
    if (a_tokens <= 0).any():
        return "a block with no tokens (a shard's share)"
    if len(a_tokens) < MIN_BLOCKS:
        return f"{len(a_tokens)} blocks, fewer than the {MIN_BLOCKS} an interval needs"
    if not (np.isfinite(a_nll).all() and np.isfinite(b_nll).all()):
        return "a loss that is not finite"
    return None


def ppl_ratio(a: Mapping[str, Any], b: Mapping[str, Any], level: float = LEVEL, resamples: int = RESAMPLES,
              seed: int = 0) -> tuple[float, tuple[float, float]] | None:
    """ppl(a) / ppl(b) and its paired bootstrap interval: both read on the same resampled blocks.

    None when `pairing_problem` names one (other documents, too few blocks, a loss that is not finite).
    """
    if pairing_problem(a, b) is not None:
        return None
    a_nll, tokens = _block_arrays(a)
    b_nll, _ = _block_arrays(b)
    point = (a_nll.sum() - b_nll.sum()) / tokens.sum()
    a_losses, b_losses = _resampled_losses([a_nll, b_nll], tokens, resamples, seed)
    low, high = _percentiles(a_losses - b_losses, level)
    return _exp(point), (_exp(low), _exp(high))


def blocks_of(record: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The blocks a perplexity record in results.json holds (None for records written before they were kept)."""
    blocks = (record or {}).get("blocks")
    return blocks if isinstance(blocks, Mapping) and "nll" in blocks and "tokens" in blocks else None


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
