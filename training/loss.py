"""Next-token cross-entropy that never holds float32 logits for the whole window."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _chunk_nll(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def next_token_nll(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int = 0) -> Tensor:
    """Summed negative log-likelihood of targets (b, n) given final hidden states (b, n, d).

    With chunk_tokens > 0 the output head and the softmax run chunk by chunk under
    activation checkpointing: only one chunk's logits exist at a time, in the forward and
    again in the backward, instead of b * n * vocab floats for the whole batch.
    """
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    if chunk_tokens <= 0 or hidden.shape[0] <= chunk_tokens:
        return _chunk_nll(hidden, weight, targets)
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(_chunk_nll, hidden[start:stop], weight, targets[start:stop], use_reentrant=False)
    return total
