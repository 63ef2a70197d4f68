"""Passkey-style training documents: the paper's passkey prompt, answered, short enough for the base window.

The paper's 7B model can already copy a number it read earlier; a few-million-parameter model
trained on Shakespeare cannot, so its passkey k_max is 0 at every window and the passkey claims
cannot be tested. Mixing a small share of answered passkey prompts (each at most `max_tokens`
long, i.e. within the base window L) into the training documents teaches retrieval *within L*
only; whether it carries to 8L is then up to the position encoding, which is what the
reproduction measures. Evaluation prompts (evaluation/passkey.py) use the same wording.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol

from data.errors import DataError

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# BOS and EOS are added around every document by the token cache.
_SPECIAL_TOKENS = 2
# Part of the token cache key: bump when the documents this module generates change.
RECIPE = 2


class Encoder(Protocol):
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


def filler(words: int) -> str:
    """The first `words` words of the filler repeated: any length, not only whole repeats.

    Whole repeats would put the key at a few fixed offsets from the question, which a model can
    learn to copy by position alone; word-level lengths make it find the key by content, as the
    evaluation (which cuts the filler at any token) requires.
    """
    pool = FILLER.split()
    return " ".join(pool[i % len(pool)] for i in range(words))


def passkey_document(key: str, before: int, after: int) -> str:
    """The paper's prompt with `before`/`after` filler words around the key line, followed by its answer."""
    pieces = [INSTRUCTION, filler(before), KEY_LINE.format(key=key), filler(after), QUESTION]
    return " ".join(p for p in pieces if p) + f" {key}."


def passkey_documents(tokenizer: Encoder, count: int, max_tokens: int, seed: int) -> list[str]:
    """`count` answered passkey prompts of at most `max_tokens` tokens (BOS and EOS included).

    The number of filler words is drawn uniformly from every amount that fits, and split
    uniformly between before and after the key, so the key-to-question distance covers the window.
    """
    if count < 0:
        raise DataError(f"the number of passkey documents must be >= 0, not {count}")
    fixed = len(tokenizer.encode(passkey_document("99999", 0, 0), bos=False)) + _SPECIAL_TOKENS
    if count and fixed > max_tokens:
        raise DataError(f"a passkey document needs at least {fixed} tokens but data.passkey_max_tokens={max_tokens}; "
                        f"raise it (it defaults to the model's window) or set data.passkey_share=0.")
    words = len(FILLER.split())
    tokens_per_word = len(tokenizer.encode(FILLER, bos=False)) / words
    most = max(0, int((max_tokens - fixed) / tokens_per_word))
    rng = random.Random(seed)
    documents = []
    while len(documents) < count:
        total = rng.randint(0, most)
        before = rng.randint(0, total)
        text = passkey_document(str(rng.randint(10000, 99999)), before, total - before)
        # The word count only estimates the token count: keep the document only if it fits.
        if len(tokenizer.encode(text, bos=False)) + _SPECIAL_TOKENS <= max_tokens:
            documents.append(text)
    return documents


def count_for_share(share: float, corpus_tokens: int, mean_document_tokens: float) -> int:
    """How many passkey documents make up `share` of all training tokens next to `corpus_tokens`."""
    if not 0 <= share < 1 or math.isnan(share):
        raise DataError(f"data.passkey_share={share!r} must be a fraction in [0, 1), e.g. 0.1.")
    if share == 0:
        return 0
    return math.ceil(share / (1 - share) * corpus_tokens / mean_document_tokens)


def interleave(corpus: Sequence[str], extra: Sequence[str], seed: int) -> list[str]:
    """`extra` documents spread at seeded random places between the corpus documents (corpus order kept)."""
    rng = random.Random(seed)
    slots = sorted(rng.randint(0, len(corpus)) for _ in extra)
    merged, taken = [], 0
    for i, document in enumerate(corpus):
        while taken < len(extra) and slots[taken] == i:
            merged.append(extra[taken])
            taken += 1
        merged.append(document)
    merged.extend(extra[taken:])
    return merged
