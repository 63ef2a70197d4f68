"""Sampling with the KV cache (temperature + nucleus), for a quick qualitative look at a model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evaluation.errors import EvaluationError
from evaluation.perplexity import float32_logits


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """One token per row of logits (b, vocab): greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p; the most likely token always stays.
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_p: float = 0.95,
    eos_id: int | None = None,
    seed: int = 0,
    max_len: int | None = None,
) -> list[int]:
    """New token ids after `prompt`, stopping at eos_id or after max_new_tokens."""
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 0:
        raise EvaluationError(
            f"generate needs temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 0, "
            f"got {temperature}, {top_p} and {max_new_tokens}."
        )
    if not prompt:
        raise EvaluationError("the generation prompt is empty; give at least one token (the BOS token counts).")
    device = next(model.parameters()).device
    total = len(prompt) + max_new_tokens
    if max_len is not None and total > max_len:
        raise EvaluationError(
            f"the prompt ({len(prompt)} tokens) plus max_new_tokens={max_new_tokens} exceeds the {max_len} positions "
            "the model can read; shorten one of them."
        )
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.new_cache(1, total)
    hidden = model.hidden_states(torch.tensor([list(prompt)], device=device), cache)[:, -1]
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(float32_logits(model, hidden), temperature, top_p, generator)  # (1,)
        new.append(int(token))
        if eos_id is not None and new[-1] == eos_id:
            break
        hidden = model.hidden_states(token[:, None], cache)[:, -1]
    return new
