"""Sliding-window perplexity (Press et al. 2022), the protocol of the PI paper.

Windows of `window` tokens start every `stride` tokens. The first window scores all of its
tokens (each from the tokens before it); every later window scores only the tokens no earlier
window scored, i.e. its last `stride` tokens, so each of them is read with at least
window - stride tokens of left context. The output head is applied to the scored positions
only, at most LOGIT_CHUNK_TOKENS of them at a time, so the float32 logits stay small however long
the window: a first window of 32k tokens with LLaMA 3's 128k vocabulary would otherwise need 16 GiB.

The paper's stride is 256 at windows of 2048 and more, so every scored token sees at least 7/8 of
its window. Read at a short window (a small model's L), the same 256 tokens would leave tokens
with little or no context and inflate the short windows' perplexity; `window_stride` caps the
stride at a fraction of the window (1/8 by default) to keep the paper's least context.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.errors import EvaluationError


# Scored positions (over the whole batch) whose logits exist at once.
LOGIT_CHUNK_TOKENS = 8192
# Document positions per bootstrap block (evaluation/uncertainty.py): long enough that neighbouring blocks'
# losses are close to independent, short enough that a few documents still give tens of blocks.
BLOCK_TOKENS = 4096


class Scorer(Protocol):
    """What the protocol needs from a model: final hidden states and an output head (a Llama, or an HF adapter)."""

    def hidden_states(self, tokens: Tensor) -> Tensor: ...

    def output(self, hidden: Tensor) -> Tensor: ...


def float32_logits(model: Scorer, hidden: Tensor) -> Tensor:
    """The output head in float32 at least, from a bf16/fp16 model and under autocast too.

    bf16 logits are rounded to steps of 1/16 to 1/8 at the magnitudes LLaMA's logits reach (8 to 32): each
    token's log-likelihood moves by up to a few hundredths of a nat, and greedy passkey answers meet ties
    between digit tokens, which argmax breaks towards the lower token id. A half-precision Linear head, or
    one under autocast, is therefore applied in float32 (the weight's float copy lives for one call; only
    scored positions reach the head, so this costs little beside the model); any other head is called as it is.
    """
    head = model.output
    lower_precision = isinstance(head, torch.nn.Linear) and (
        head.weight.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(hidden.device.type))
    if not lower_precision:
        return head(hidden).float()
    bias = head.bias.float() if head.bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), head.weight.float(), bias)


@dataclass(frozen=True)
class Span:
    """One window tokens[start:end] of a document, whose targets score_from..end-1 are scored."""

    start: int
    end: int
    score_from: int

    @property
    def n_scored(self) -> int:
        """How many targets this window scores."""
        return self.end - self.score_from


def sliding_spans(n_tokens: int, window: int, stride: int) -> list[Span]:
    """The windows of a document of n_tokens tokens; together they score tokens 1..n_tokens-1 once each."""
    if window < 2:
        raise EvaluationError(f"perplexity window={window} is too short; a window needs at least 2 tokens.")
    if not 1 <= stride <= window:
        raise EvaluationError(
            f"stride={stride} must be between 1 and the window ({window}); a larger stride would skip tokens."
        )
    spans: list[Span] = []
    start, scored_until = 0, 0
    while scored_until < n_tokens:
        end = min(start + window, n_tokens)
        # The window's first token has no context inside the window, so it is never a target.
        score_from = max(scored_until, start + 1)
        if end > score_from:
            spans.append(Span(start, end, score_from))
        scored_until = end
        # With stride == window the next window would start at the first unscored token, which it cannot
        # score; starting one token earlier gives that token one token of context instead of dropping it.
        start = min(start + stride, scored_until - 1)
    return spans


def window_stride(stride: int, window: int, max_fraction: float | None = 0.125) -> int:
    """The stride `window` is read with: `stride`, at most window x max_fraction (None: no cap), at least 1."""
    if max_fraction is None:
        return stride
    return max(1, min(stride, int(window * max_fraction)))


@dataclass
class PerplexityResult:
    """Token-weighted negative log-likelihood over every scored token of every document."""

    window: int
    stride: int
    nll: float  # summed, in nats
    tokens: int
    documents: int
    per_document: list[dict[str, float]] = field(default_factory=list)
    # nll and token count of each block of BLOCK_TOKENS consecutive positions of one document (its last one
    # shorter), in document order, and the documents' fingerprint: the same blocks for any model, window and
    # stride on the same documents. Like per_document, a shard's are its share.
    blocks: dict[str, object] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per scored token, in nats."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        """exp(loss); inf rather than an OverflowError for a model that has fully broken down, NaN for a NaN loss
        (a numeric failure, not a measurement: it must not read as "perplexity exploded")."""
        if not self.tokens or math.isnan(self.loss):
            return math.nan
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def to_dict(self) -> dict[str, object]:
        """Every number, for results.json."""
        return {
            "window": self.window,
            "stride": self.stride,
            "ppl": self.ppl,
            "loss": self.loss,
            "tokens": self.tokens,
            "documents": self.documents,
            "per_document": self.per_document,
            "blocks": self.blocks,
        }


def prepare_documents(
    documents: Iterable[np.ndarray | Sequence[int]],
    max_documents: int | None = None,
    max_tokens_per_document: int | None = None,
    min_tokens_per_document: int | None = None,
) -> list[np.ndarray]:
    """Keep documents of at least min_tokens (the paper's proof-pile >= 32768), cut to max_tokens, at most max_documents."""
    for name, value in (
        ("max_documents", max_documents),
        ("max_tokens_per_document", max_tokens_per_document),
        ("min_tokens_per_document", min_tokens_per_document),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise EvaluationError(f"ppl.{name}={value!r} must be a positive integer or null.")
    kept: list[np.ndarray] = []
    for doc in documents:
        doc = np.asarray(doc)
        if min_tokens_per_document is not None and len(doc) < min_tokens_per_document:
            continue
        kept.append(doc[:max_tokens_per_document] if max_tokens_per_document else doc)
        if max_documents is not None and len(kept) == max_documents:
            break
    return kept


@torch.no_grad()
def sliding_window_perplexity(
    model: Scorer,
    documents: Sequence[np.ndarray | Sequence[int]],
    window: int,
    stride: int = 256,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> PerplexityResult:
    """Perplexity of `model` on `documents` (token ids each) with the sliding-window protocol.

    shard=(rank, ranks) reads every ranks-th batch of windows, from the rank-th on: the shards' nll and token
    counts (per document and per block too), summed over the ranks, are the whole result's, with the same batches.
    """
    if batch_size < 1:
        raise EvaluationError(f"ppl.batch_size={batch_size} must be at least 1.")
    rank, ranks = shard
    if not 0 <= rank < ranks:
        raise ValueError(f"shard={shard} must be (rank, ranks) with 0 <= rank < ranks")
    device = torch.device(device) if device is not None else _device_of(model)
    docs = [torch.as_tensor(np.asarray(d, dtype=np.int64)) for d in documents]
    # Windows of the same shape from any document run as one batch.
    groups: dict[tuple[int, int], list[tuple[int, Span]]] = defaultdict(list)
    for index, doc in enumerate(docs):
        for span in sliding_spans(len(doc), window, stride):
            groups[(span.end - span.start, span.score_from - span.start)].append((index, span))
    # Every window scores tokens 1..n-1 of its document once, so blocks of those positions are the same token
    # ranges at any window and stride: block b of a document holds its tokens 1 + b * BLOCK_TOKENS onwards.
    first_block = np.cumsum([0] + [-(-(len(doc) - 1) // BLOCK_TOKENS) if len(doc) > 1 else 0 for doc in docs])
    nll = np.zeros(len(docs), dtype=np.float64)
    counts = np.zeros(len(docs), dtype=np.int64)
    block_nll = np.zeros(int(first_block[-1]), dtype=np.float64)
    block_counts = np.zeros(int(first_block[-1]), dtype=np.int64)
    batches = [(length, offset, members[first : first + batch_size])
               for (length, offset), members in sorted(groups.items()) for first in range(0, len(members), batch_size)]
    for length, offset, batch in batches[rank::ranks]:
        tokens = torch.stack([docs[i][s.start : s.end] for i, s in batch]).to(device)  # (b, length)
        hidden = model.hidden_states(tokens)
        starts = np.array([s.start for _, s in batch])[:, None]
        block_base = first_block[[i for i, _ in batch]][:, None]
        per_window = np.zeros(len(batch), dtype=np.float64)
        chunk = max(1, LOGIT_CHUNK_TOKENS // len(batch))
        for first_scored in range(offset, length, chunk):
            last_scored = min(first_scored + chunk, length)
            # Position t predicts token t + 1: targets first..last-1 are read from positions first-1..last-2.
            logits = float32_logits(model, hidden[:, first_scored - 1 : last_scored - 1])  # (b, n, vocab)
            targets = tokens[:, first_scored:last_scored]
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            token_losses = losses.view(len(batch), -1).double().cpu().numpy()  # (b, n): b x n <= LOGIT_CHUNK_TOKENS
            per_window += token_losses.sum(-1)
            # Each target's document position, and the block it falls in.
            blocks = block_base + (starts + np.arange(first_scored, last_scored) - 1) // BLOCK_TOKENS
            block_nll += np.bincount(blocks.ravel(), weights=token_losses.ravel(), minlength=len(block_nll))
            block_counts += np.bincount(blocks.ravel(), minlength=len(block_counts))
        for (i, span), value in zip(batch, per_window):
            nll[i] += value
            counts[i] += span.n_scored
    per_document = [
        {"tokens": int(n), "nll": float(s), "ppl": math.exp(min(s / n, 700)) if n else math.nan} for s, n in zip(nll, counts)
    ]
    return PerplexityResult(
        window=window,
        stride=stride,
        nll=float(nll.sum()),
        tokens=int(counts.sum()),
        documents=len(docs),
        per_document=per_document,
        blocks={"documents": documents_fingerprint(docs), "nll": block_nll.tolist(), "tokens": block_counts.tolist()},
    )


def documents_fingerprint(docs: Sequence[Tensor]) -> str:
    """A digest of the documents' token ids: two results pair block by block only when it is the same."""
    digest = hashlib.blake2b(digest_size=8)
    for doc in docs:
        digest.update(len(doc).to_bytes(8, "little"))
        digest.update(doc.numpy().tobytes())
    return digest.hexdigest()


def _device_of(model: object) -> torch.device:
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return torch.device("cpu")
    first = next(iter(parameters()), None)
    return first.device if first is not None else torch.device("cpu")
