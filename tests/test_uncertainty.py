"""The block bootstrap over the text a perplexity reads (evaluation/uncertainty.py), on synthetic blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.uncertainty import MIN_BLOCKS, blocks_of, pairing_problem, ppl_interval, ppl_ratio
from reproduction.report import Comparison, sampling_ratios, sampling_text


def _blocks(losses, tokens=4096, documents="same"):
    """Blocks whose mean loss per token is `losses` (nats), each of `tokens` scored tokens."""
    counts = np.full(len(losses), tokens, dtype=np.float64)
    return {"documents": documents, "nll": (np.asarray(losses) * counts).tolist(), "tokens": counts.tolist()}


def test_the_interval_holds_the_estimate_is_reproducible_and_narrows_with_more_text():
    rng = np.random.default_rng(0)
    few, many = _blocks(rng.normal(3.5, 0.3, 25)), _blocks(rng.normal(3.5, 0.3, 2500))
    for blocks in (few, many):
        point = math.exp(sum(blocks["nll"]) / sum(blocks["tokens"]))
        low, high = ppl_interval(blocks)
        assert low < point < high
        assert ppl_interval(blocks, seed=0) == (low, high)  # seeded: the same interval every time
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    assert width(ppl_interval(many)) < width(ppl_interval(few)) / 5  # ~sqrt(100) = 10x narrower


def test_the_95_percent_interval_holds_the_true_perplexity_about_95_percent_of_the_time():
    """Coverage: blocks drawn from a source whose perplexity is known. The percentile bootstrap of 40 blocks
    covers a little under 95% (its known small-sample bias); far from it would be a wrong interval."""
    rng = np.random.default_rng(1)
    true_loss, replications = 3.0, 300
    covered = 0
    for _ in range(replications):
        # Blocks of unequal size and difficulty: a token-weighted mean, as a perplexity is.
        counts = rng.integers(1000, 8000, size=40).astype(np.float64)
        losses = true_loss + rng.normal(0, 0.4, size=40)
        low, high = ppl_interval({"nll": losses * counts, "tokens": counts}, resamples=400, seed=int(rng.integers(1 << 30)))
        covered += low <= math.exp(true_loss) <= high
    assert 0.88 <= covered / replications <= 0.99, covered


def test_a_paired_ratio_is_exact_for_a_uniform_shift_and_narrower_than_its_parts():
    rng = np.random.default_rng(2)
    hard_and_easy = rng.normal(3.5, 0.5, 50)  # passages differ much more than the two models do on them
    a = _blocks(hard_and_easy)
    shifted = _blocks(hard_and_easy + 0.1)  # 0.1 nats worse on every block
    value, (low, high) = ppl_ratio(shifted, a)
    assert value == pytest.approx(math.exp(0.1)) and low == pytest.approx(math.exp(0.1)) and high == pytest.approx(math.exp(0.1))
    b = _blocks(hard_and_easy + 0.05 + rng.normal(0, 0.02, 50))
    value, (low, high) = ppl_ratio(b, a)
    assert low < value < high and low > 1  # b is worse, and the paired interval says so
    (a_low, a_high), (b_low, b_high) = ppl_interval(a), ppl_interval(b)
    assert b_low < a_high  # unpaired, the two intervals overlap: they could not tell the models apart
    assert high - low < (b_high / a_low - b_low / a_high) / 10


def test_the_interval_is_token_weighted_as_the_perplexity_is():
    """Large easy blocks and small hard ones: the perplexity weighs blocks by their tokens, and so must every
    resample (an unweighted mean of block losses would centre the interval on the hard blocks)."""
    rng = np.random.default_rng(4)
    counts = np.array([8000.0] * 15 + [500.0] * 15)
    losses = np.array([2.0] * 15 + [5.0] * 15) + rng.normal(0, 0.05, 30)
    blocks = {"nll": losses * counts, "tokens": counts}
    low, high = ppl_interval(blocks)
    weighted, unweighted = math.exp((losses * counts).sum() / counts.sum()), math.exp(losses.mean())
    assert low < weighted < high < unweighted / 2


def test_no_interval_without_enough_comparable_blocks_or_with_a_broken_down_model():
    enough, fewer = _blocks(np.linspace(3.0, 3.2, MIN_BLOCKS)), _blocks(np.linspace(3.0, 3.2, MIN_BLOCKS - 1))
    assert ppl_interval(enough) is not None and ppl_interval(fewer) is None  # a percentile bootstrap of few blocks covers far less than 95%
    assert ppl_interval({"nll": [1.0] * 29 + [math.inf], "tokens": [1] * 30}) is None
    assert ppl_interval(_blocks([800.0] * 30)) is None  # an overflowing perplexity has no interval worth stating
    assert pairing_problem(enough, enough) is None and ppl_ratio(enough, enough) == (1.0, (1.0, 1.0))
    assert pairing_problem(enough, _blocks(np.linspace(3.0, 3.2, MIN_BLOCKS), documents="other")) == "not read on the same documents"
    assert pairing_problem(enough, _blocks(np.linspace(3.0, 3.2, MIN_BLOCKS), tokens=10)).startswith(
        "the same documents cut into other blocks")
    assert pairing_problem(fewer, fewer) == f"{MIN_BLOCKS - 1} blocks, fewer than the {MIN_BLOCKS} an interval needs"
    assert pairing_problem(enough, None) == "no blocks recorded"
    unmarked = {k: v for k, v in enough.items() if k != "documents"}
    assert pairing_problem(unmarked, unmarked) == "blocks recorded without the documents' fingerprint"
    empty_block = {**enough, "tokens": [0.0, *enough["tokens"][1:]]}
    assert pairing_problem(empty_block, empty_block) == "a block with no tokens (a shard's share)"
    assert "one nll and one token count each" in pairing_problem(enough, {**enough, "nll": enough["nll"][1:]})
    broken = {**enough, "nll": [math.nan, *enough["nll"][1:]]}
    assert pairing_problem(enough, broken) == "a loss that is not finite" and ppl_ratio(enough, broken) is None
    with pytest.raises(ValueError, match="one nll and one token count each"):
        ppl_interval({"nll": [1.0, 2.0], "tokens": [1]})


def test_the_reproduction_states_the_claims_ratios_with_intervals_and_nothing_for_older_records():
    rng = np.random.default_rng(3)
    text = rng.normal(3.6, 0.4, 30)
    records = {"PI, 200 steps": {2048: {"ppl": 40.0, "blocks": _blocks(text + 0.1)}, 256: {"blocks": _blocks(text)}},
               "FT (direct), 200 steps": {2048: {"ppl": 36.0, "blocks": _blocks(text)}},
               "base": {256: {"blocks": _blocks(text - 0.02)}},
               "other text": {256: {"blocks": _blocks(text, documents="validation")}}}
    comparisons = [Comparison(3, "PI, 200 steps", "FT (direct), 200 steps", 2048), Comparison(5, "PI, 200 steps", "base", 256),
                   Comparison(5, "PI, 200 steps", "other text", 256)]
    ratios = sampling_ratios(records, comparisons, seed=0)
    assert ratios[0]["ratio"] == pytest.approx(math.exp(0.1)) and ratios[0]["ci95"] == pytest.approx([math.exp(0.1)] * 2)
    lines = sampling_text(ratios, base_window=256).strip().splitlines()
    assert lines[-3] == f"- claim 3, at 8L: PI, 200 steps / FT (direct), 200 steps = {math.exp(0.1):.3f} (95%: 1.105 to 1.105; 30 blocks)"
    assert lines[-2].startswith(f"- claim 5, at L: PI, 200 steps / base = {math.exp(0.02):.3f} (95%: ")
    assert lines[-1] == "- claim 5, at L: PI, 200 steps / other text: no interval (not read on the same documents)"
    older = {name: {w: {k: v for k, v in r.items() if k != "blocks"} for w, r in by.items()} for name, by in records.items()}
    assert sampling_ratios(older, comparisons, seed=0) == [] and sampling_text([], base_window=256) == ""
    assert blocks_of(None) is None and blocks_of({"ppl": 3.0}) is None
