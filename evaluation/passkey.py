"""Passkey retrieval, the paper's measure of the effective context window.

Prompts come from data.synthetic_passkey.PasskeyPrompter (the layout the training documents
share): the key sits exactly k tokens from the end and the prompt plus the answer fill the
window. k is the distance from the key's first token (its first occurrence in "The pass key is
12345. Remember it. 12345 is the pass key.") to the end of the prompt.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# One layout for training documents and evaluation prompts (re-exported here for the evaluation's users).
from data.synthetic_passkey import FILLER, INSTRUCTION, KEY_LINE, QUESTION, PasskeyPrompt, PasskeyPrompter, TokenizerLike  # noqa: F401
from evaluation.errors import EvaluationError
from evaluation.perplexity import float32_logits
from model.args import ModelArgs

DEFAULT_THRESHOLD = 0.2  # the paper: every k' <= k_max retrieves the key in at least 20% of trials
# The share of the free GPU memory a batch of prompts may plan on; the rest is the allocator's slack and the
# attention kernels' workspace.
MEMORY_SHARE = 0.8

log = logging.getLogger(__name__)


def prompt_bytes(args: ModelArgs, tokens: int, itemsize: int) -> int:
    """Memory one prompt of `tokens` tokens needs while it is decoded: its KV cache (2 x layers x kv heads x head
    dim per token) and the widest activations of its prefill (the MLP's three hidden_dim-wide tensors and a few
    copies of the residual stream). LLaMA 7B at 32k tokens in bf16: 16 GiB of cache, 3 GiB of activations."""
    cache = 2 * args.n_layers * args.kv_heads * args.head_dim * tokens * itemsize
    prefill = tokens * (3 * args.hidden_dim + 4 * args.dim) * itemsize
    return cache + prefill


def fitted_batch_size(batch_size: int, args: ModelArgs, tokens: int, itemsize: int, free_bytes: int | None) -> int:
    """`batch_size`, lowered (to 1 at least) until a batch of prompts fits MEMORY_SHARE of `free_bytes` (None: no
    limit known, as on CPU). passkey.batch_size=10 at 32k tokens would plan 160 GiB of KV cache for LLaMA 7B."""
    if free_bytes is None:
        return batch_size
    return max(1, min(batch_size, int(free_bytes * MEMORY_SHARE) // prompt_bytes(args, tokens, itemsize)))


def spread_distances(smallest: int, largest: int, count: int) -> list[int]:
    """`count` distances spread uniformly over [smallest, largest] (fewer if the range is short)."""
    if count < 1:
        raise EvaluationError(f"passkey.num_positions={count} must be at least 1.")
    if largest < smallest:
        raise EvaluationError(f"the passkey window is too short: the key fits no closer than {smallest} tokens to the end.")
    if count == 1:
        return [largest]
    return sorted({round(x) for x in np.linspace(smallest, largest, count)})


def k_max(distances: Sequence[int], success_rates: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> int:
    """The largest k such that every tested k' <= k succeeds in at least `threshold` of the trials (0 if none)."""
    best = 0
    for distance, rate in sorted(zip(distances, success_rates)):
        if rate < threshold:
            break
        best = distance
    return best


@dataclass
class PasskeyResult:
    """A success grid (distances x trials) and the effective window it implies."""

    window: int
    prompt_length: int
    distances: list[int]
    successes: list[list[bool]]
    threshold: float = DEFAULT_THRESHOLD
    answers: list[list[str]] = field(default_factory=list)
    keys: list[list[str]] = field(default_factory=list)  # the key of each trial, as in `successes`

    @property
    def success_rates(self) -> list[float]:
        """The fraction of trials that returned the key, per distance."""
        return [sum(row) / len(row) for row in self.successes]

    @property
    def k_max(self) -> int:
        """The effective context window under the threshold rule."""
        return k_max(self.distances, self.success_rates, self.threshold)

    def to_dict(self) -> dict[str, object]:
        """Every number and answer, for results.json."""
        return {
            "window": self.window,
            "prompt_length": self.prompt_length,
            "threshold": self.threshold,
            "k_max": self.k_max,
            "distances": self.distances,
            "success_rates": self.success_rates,
            "successes": self.successes,
            "answers": self.answers,
            "keys": self.keys,
        }


def is_retrieved(text: str, key: str) -> bool:
    """The answer spells the key as a whole number: "12345." and "12345 is" count, "123456" does not (the
    continuation may run past the key: every prompt gets the longest key's answer budget)."""
    return text.startswith(key) and not text[len(key) : len(key) + 1].isdigit()


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy decoding of n_new tokens for a batch of equal-length prompts (b, n), with the KV cache."""
    batch, length = prompts.shape
    cache = model.new_cache(batch, length + n_new)
    hidden = model.hidden_states(prompts, cache)[:, -1:]
    generated = []
    for step in range(n_new):
        next_token = float32_logits(model, hidden).argmax(-1)  # (b, 1)
        generated.append(next_token)
        if step + 1 < n_new:
            hidden = model.hidden_states(next_token, cache)
    return torch.cat(generated, dim=1)


@dataclass(frozen=True)
class PasskeyPlan:
    """The keys, prompt length and distances of one passkey evaluation, fixed before any model runs."""

    keys: list[list[str]]  # one row of `trials` keys per distance
    n_answer: int  # tokens generated after each prompt: the longest key's answer
    length: int  # prompt tokens: window - n_answer
    distances: list[int]


def plan_passkey(tokenizer: TokenizerLike, window: int, num_positions: int = 32, trials: int = 10, seed: int = 0) -> PasskeyPlan:
    """The paper's layout for `window`: `num_positions` distances up to it, `trials` random 5-digit keys at each;
    one clear error when the window cannot hold a prompt (checked before any evaluation starts)."""
    for name, value in (("num_positions", num_positions), ("trials", trials)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvaluationError(f"passkey.{name}={value!r} must be a positive integer.")
    prompter = PasskeyPrompter(tokenizer)
    rng = random.Random(seed)  # the same keys for every model, so rows of a table are comparable
    keys = [[str(rng.randint(10000, 99999)) for _ in range(trials)] for _ in range(num_positions)]
    # One answer budget for all keys keeps every prompt the same length (one batch shape).
    n_answer = max(prompter.answer_length(k) for row in keys for k in row)
    length = window - n_answer
    # Keys may tokenize to different lengths: use the distances every key can reach.
    ranges = [prompter.distance_range(length, k) for k in {k for row in keys for k in row}]
    smallest, largest = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if largest < smallest:
        shortest = window + smallest - largest
        raise EvaluationError(f"a {window}-token passkey window cannot hold the paper's prompt and answer, which need at "
                              f"least {shortest} tokens; pass passkey.window={shortest} or more.")
    return PasskeyPlan(keys, n_answer, length, spread_distances(smallest, largest, num_positions))


def run_passkey(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    window: int,
    num_positions: int = 32,
    trials: int = 10,
    seed: int = 0,
    batch_size: int = 10,
    threshold: float = DEFAULT_THRESHOLD,
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
    agree_batch_size: Callable[[int], int] | None = None,
) -> PasskeyResult:
    """Run the protocol: `num_positions` distances up to the window, `trials` random 5-digit keys at each.

    shard=(rank, ranks) decodes every ranks-th distance of the plan, from the rank-th on, and returns those
    rows only (the ranks' rows together are the whole grid). `agree_batch_size` (e.g. the minimum over the
    processes) turns the batch size fitted to this GPU's free memory into one every process uses: under FSDP each
    forward gathers weights from all of them, so they must run the same forwards.
    """
    rank, ranks = shard
    if not 0 <= rank < ranks:
        raise ValueError(f"shard={shard} must be (rank, ranks) with 0 <= rank < ranks")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"passkey.batch_size={batch_size!r} must be a positive integer.")
    plan = plan_passkey(tokenizer, window, num_positions, trials, seed)
    parameter = next(model.parameters())
    device = torch.device(device) if device is not None else parameter.device
    if hasattr(model, "args"):  # a Llama: its KV cache can be sized (an HF adapter decodes its own way)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        fitted = fitted_batch_size(batch_size, model.args, window, parameter.element_size(), free)
        if agree_batch_size is not None:
            fitted = agree_batch_size(fitted)
        if fitted < batch_size:
            log.info("passkey: %d prompts per batch instead of passkey.batch_size=%d, so that their %d-token KV caches fit "
                     "in the GPU's free memory", fitted, batch_size, window)
        batch_size = fitted
    prompter = PasskeyPrompter(tokenizer)
    n_answer, length = plan.n_answer, plan.length
    distances, keys = plan.distances[rank::ranks], plan.keys[: len(plan.distances)][rank::ranks]
    successes, answers = [], []
    for distance, row_keys in zip(distances, keys):
        row_ok, row_text = [], []
        for first in range(0, trials, batch_size):
            batch_keys = row_keys[first : first + batch_size]
            prompts = torch.tensor([prompter.build(k, distance, length).tokens for k in batch_keys], device=device)
            continuations = greedy_continuations(model, prompts, n_answer)
            for key, continuation in zip(batch_keys, continuations.tolist()):
                text = tokenizer.decode(continuation).strip()
                row_text.append(text)
                row_ok.append(is_retrieved(text, key))
        successes.append(row_ok)
        answers.append(row_text)
    return PasskeyResult(window, length, distances, successes, threshold, answers, keys)
