"""The paper's passkey prompt as tokens: one layout for the evaluation and for training documents.

The paper's 7B model can already copy a number it read earlier; a few-million-parameter model
trained on Shakespeare cannot, so its passkey k_max is 0 at every window and the passkey claims
cannot be tested. Mixing a small share of answered passkey prompts (each at most `max_tokens`
long, i.e. within the base window L) into the training tokens teaches retrieval *within L*
only; whether it carries to 8L is then up to the position encoding, which is what the
reproduction measures. Training documents are built by the same `PasskeyPrompter` as the
evaluation's prompts (evaluation/passkey.py), so the two differ only in their keys and lengths.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from data.errors import DataError

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# Part of the token cache key: bump when the documents this module generates change.
# 4: the evaluation's token layout (was text with word-level filler cuts); distances uniform; each
# document placed whole inside one block of max_tokens (BlockPlacement), no longer cut by windowing.
# 5: keys drawn from a stream of their own; with random.Random(seed), as the evaluation's, a third of the
# evaluation's keys had been trained on.
RECIPE = 5


class TokenizerLike(Protocol):
    """The part of data.tokenizer.Tokenizer the prompts need."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class PasskeyPrompt:
    """Prompt tokens with the key's first token at index key_index."""

    tokens: list[int]
    key: str
    key_index: int

    @property
    def distance(self) -> int:
        """k: tokens from the key's first token to the end of the prompt."""
        return len(self.tokens) - self.key_index


def piece_separator(tokenizer: TokenizerLike) -> str:
    """What must start a separately encoded piece of text so that it does not run into the piece before it:
    "" where encoding already starts a new word (sentencepiece's dummy prefix), else " " (byte-level BPE)."""
    joined = tokenizer.decode([*tokenizer.encode("a", bos=False), *tokenizer.encode("b", bos=False)])
    return "" if joined == "a b" else " "


class PasskeyPrompter:
    """Builds passkey prompts of an exact length with the key at an exact distance from the end.

    The prompt is built from separately tokenized pieces (instruction, filler, key line, filler,
    question), so its token layout is known exactly: the filler is repeated, and cut at a token
    boundary for the remainder, until the key sits exactly k tokens from the end. k is the
    distance from the key's first token (its first occurrence in the key line) to the end.
    """

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.tokenizer = tokenizer
        # The pieces after the instruction start with this: nothing for sentencepiece, whose dummy prefix starts
        # every encoded piece with a word boundary, a space for LLaMA 3's BPE, which would otherwise glue the
        # pieces into "...there.The grass..." (a prompt the model has never seen text like).
        self.space = piece_separator(tokenizer)
        self.head = [tokenizer.bos_id, *tokenizer.encode(INSTRUCTION, bos=False)]
        self.filler = tokenizer.encode(self.space + FILLER, bos=False)
        self.question = tokenizer.encode(self.space + QUESTION, bos=False)

    def _key_line(self, key: str) -> tuple[list[int], int]:
        """Tokens of the key line and the index of the token that holds the key's first digit."""
        line = self.space + KEY_LINE.format(key=key)
        tokens = self.tokenizer.encode(line, bos=False)
        offset = line.index(key)
        # Decoded prefixes align with the text (the dummy-prefix space is dropped by decode):
        # the first token whose prefix reaches past `offset` holds the key's first character.
        for i in range(len(tokens)):
            if len(self.tokenizer.decode(tokens[: i + 1])) > offset:
                return tokens, i
        raise DataError(f"the tokenizer lost the key {key} in {line!r}; use a tokenizer that round-trips ASCII text.")

    def answer(self, key: str, end: str = "") -> list[int]:
        """The tokens that follow the question when the key (then `end`) is written after it as running text.

        Taken in context, so the separating space is whatever the tokenizer makes of it: a "▁"
        piece for LLaMA's sentencepiece, a " " token or a space glued to the digits for others.
        """
        full = self.tokenizer.encode(f"{self.space}{QUESTION} {key}{end}", bos=False)
        if full[: len(self.question)] != self.question:  # the key merged into the question's last token
            return self.tokenizer.encode(f"{self.space}{key}{end}", bos=False)
        return full[len(self.question) :]

    def answer_length(self, key: str) -> int:
        """Tokens the model must generate to spell the key after "The pass key is"."""
        return len(self.answer(key))

    def distance_range(self, length: int, key: str = "12345") -> tuple[int, int]:
        """The smallest and largest k a prompt of `length` tokens can place the key at."""
        line, at = self._key_line(key)
        smallest = len(line) - at + len(self.question)
        largest = length - len(self.head) - at
        return smallest, largest

    def build(self, key: str, distance: int, length: int) -> PasskeyPrompt:
        """A prompt of exactly `length` tokens with `key` exactly `distance` tokens from its end."""
        line, at = self._key_line(key)
        smallest, largest = self.distance_range(length, key)
        if not smallest <= distance <= largest:
            raise DataError(
                f"a {length}-token passkey prompt can place the key {smallest} to {largest} tokens from the end, "
                f"not {distance}; pick a distance in that range or a longer window."
            )
        after = distance - (len(line) - at) - len(self.question)
        before = length - len(self.head) - at - distance
        tokens = [
            *self.head,
            *self._filler(before),
            *line,
            *self._filler(after),
            *self.question,
        ]
        return PasskeyPrompt(tokens=tokens, key=key, key_index=len(self.head) + before + at)

    def _filler(self, n: int) -> list[int]:
        """n filler tokens: whole repeats, then the first tokens of one more.

        The cut repeat goes last because the piece after it (key line or question) starts a
        new word: a cut can leave a word unfinished but never glues two words together.
        """
        repeats, rest = divmod(n, len(self.filler))
        return self.filler * repeats + self.filler[:rest]


def passkey_documents(tokenizer: TokenizerLike, count: int, max_tokens: int, seed: int) -> list[list[int]]:
    """`count` answered passkey prompts as token ids (BOS, prompt, answer, EOS), each at most `max_tokens` long.

    The key-to-question distance is drawn uniformly from every distance that fits, then the
    filler before the key uniformly from what is left: every distance up to the window is trained
    on equally often, as the evaluation tests them. (Drawing the total length first and splitting
    it made long distances rare, and a CPU base then retrieved at short ones only.)
    """
    if count < 0:
        raise DataError(f"the number of passkey documents must be >= 0, not {count}")
    prompter = PasskeyPrompter(tokenizer)
    # Not random.Random(seed): evaluation.passkey draws its keys from that stream, and with the same seed
    # (reproduce.py uses one for both) the two fell into step and shared about a third of their keys.
    # A stream of its own shares keys only by chance (count / 90000 of the evaluation's).
    rng = random.Random(f"passkey-training-documents-{seed}")
    documents: list[list[int]] = []
    while len(documents) < count:
        key = str(rng.randint(10000, 99999))
        answer = [*prompter.answer(key, end="."), tokenizer.eos_id]
        longest = max_tokens - len(answer)  # the longest prompt that leaves room for the answer
        smallest, largest = prompter.distance_range(longest, key)
        if smallest > largest:
            shortest = max_tokens + smallest - largest
            raise DataError(f"a passkey document needs at least {shortest} tokens but data.passkey_max_tokens={max_tokens}; "
                            f"raise it (it defaults to the model's window) or set data.passkey_share=0.")
        distance = rng.randint(smallest, largest)
        length = rng.randint(longest - (largest - distance), longest)  # the filler before the key: 0 up to what fits
        documents.append([*prompter.build(key, distance, length).tokens, *answer])
    return documents


def count_for_share(share: float, corpus_tokens: int, mean_document_tokens: float) -> int:
    """How many passkey documents make up `share` of all training tokens next to `corpus_tokens`."""
    if not 0 <= share < 1 or math.isnan(share):
        raise DataError(f"data.passkey_share={share!r} must be a fraction in [0, 1), e.g. 0.1.")
    if share == 0:
        return 0
    return math.ceil(share / (1 - share) * corpus_tokens / mean_document_tokens)


@dataclass
class BlockPlacement:
    """Documents to place whole inside `block`-token blocks of a split's token stream.

    Training windows are cut from one stream of tokens at multiples of seq_len (data/packing.py),
    so a document laid down at an arbitrary offset is split across two windows unless it happens
    to start early enough; for a passkey prompt the key then sits in one window and its answer in
    the next, and the model learns to guess the answer instead of copying it (the cause of the
    first CPU reproduction's weak retrieval: only prompts short enough to survive the cut were
    learnt). Each document here starts at a multiple of `block` and is at most `block` tokens
    long, so it lies inside every window of seq_len tokens when seq_len is a multiple of `block`.
    The corpus fills the gaps, so no token is wasted except padding after the corpus' end.
    """

    documents: Sequence[Sequence[int]]  # token ids, BOS and EOS included, each at most `block` long
    at: list[int]  # sorted: document j goes in once at[j] corpus tokens have been written
    block: int
    padding: int = 0  # pad tokens written after the corpus ran out (set by place)

    def __post_init__(self) -> None:
        if len(self.documents) != len(self.at) or list(self.at) != sorted(self.at):
            raise ValueError("BlockPlacement needs one sorted corpus offset per document")
        if any(len(d) > self.block for d in self.documents):
            raise ValueError(f"a document longer than the {self.block}-token block cannot be placed whole")

    def place(self, corpus: Iterable[Sequence[int]], pad_id: int) -> Iterator[Sequence[int]]:
        """The corpus documents' tokens with the documents placed in: pieces in stream order.

        A document due at corpus offset c goes in at the first multiple of `block` (in the output
        stream) at or after the point where c corpus tokens have been written; the corpus tokens
        up to that multiple come first. A corpus document can thus be cut in two pieces around
        an inserted one, which windowing does to it anyway.
        """
        written = consumed = j = 0
        for document in corpus:
            start = 0
            while j < len(self.documents):
                take = max(self.at[j] - consumed, 0)
                take += -(written + take) % self.block  # on to the next block boundary
                if start + take > len(document):
                    break
                if take:
                    yield document[start : start + take]
                    start, written, consumed = start + take, written + take, consumed + take
                yield self.documents[j]
                written += len(self.documents[j])
                j += 1
            if start < len(document):
                yield document[start:]
                written, consumed = written + len(document) - start, consumed + len(document) - start
        for document in self.documents[j:]:  # due after the corpus' end: pad to each boundary
            pad = -written % self.block
            if pad:
                yield [pad_id] * pad
                self.padding += pad
            yield document
            written += pad + len(document)


def spread_offsets(count: int, corpus_tokens: int, seed: int) -> list[int]:
    """`count` seeded uniform corpus offsets in [0, corpus_tokens], sorted: where documents go in."""
    rng = random.Random(seed)
    return sorted(rng.randint(0, corpus_tokens) for _ in range(count))
