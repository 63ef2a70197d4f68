"""LLaMA 3's tokenizer.model: a tiktoken BPE file (lines "<base64 token> <rank>"), read with tiktoken.

The interface is that of data.tokenizer.Tokenizer (encode/decode, vocab_size, bos_id, eos_id,
path, fingerprint), so the data pipeline and the evaluators take either. tiktoken is an
optional dependency (`pip install tiktoken`); without it, loading says so in one sentence.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from data.errors import DataError

# The pre-tokenizer split of LLaMA 3 (Meta's llama3 tokenizer.py); needs the `regex` module's \p classes.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
# tiktoken's regex engine recurses per character of a run, so very long runs of spaces or of
# non-spaces overflow its stack; text is fed to it in pieces no longer than these.
_MAX_CHUNK_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN_CHARS},}}|\S{{{_MAX_RUN_CHARS},}}")
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")


def llama3_special_tokens(first_id: int) -> dict[str, int]:
    """LLaMA 3's 256 special tokens, numbered from `first_id` (128000 for the real vocabulary)."""
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL_TOKENS - 5)]
    return {name: first_id + i for i, name in enumerate(names)}


def is_tiktoken_file(path: str | os.PathLike[str]) -> bool:
    """True when the file starts like a tiktoken BPE file rather than a sentencepiece protobuf."""
    with open(path, "rb") as handle:
        first_line = handle.read(4096).split(b"\n", 1)[0]
    return bool(_TIKTOKEN_LINE.match(first_line))


def read_bpe_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """The token bytes -> rank table of a tiktoken BPE file."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise DataError(f"{path} line {number} is not '<base64 token> <rank>'; the tiktoken file is damaged, so copy it again") from None
    return ranks


class TiktokenTokenizer:
    """LLaMA 3's BPE: encode/decode plus its special ids and a content fingerprint."""

    def __init__(self, model_bytes: bytes, path: Path) -> None:
        """Build from the file's bytes; use `TiktokenTokenizer.load`."""
        try:
            import tiktoken
        except ImportError:
            raise DataError(
                f"{path} is LLaMA 3's tiktoken tokenizer and reading it needs the tiktoken package; pip install tiktoken"
            ) from None
        self._bytes = model_bytes
        self._path = Path(path)
        self._fingerprint = hashlib.sha256(model_bytes).hexdigest()[:16]
        ranks = read_bpe_ranks(model_bytes, self._path)
        self._specials = llama3_special_tokens(len(ranks))
        self._encoding = tiktoken.Encoding(
            name=self._path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self._specials
        )
        self._bos = self._specials["<|begin_of_text|>"]
        self._eos = self._specials["<|end_of_text|>"]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TiktokenTokenizer:
        """Load a tiktoken BPE `tokenizer.model`, with a clear DataError for anything else."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist; point at the tokenizer.model that came with the LLaMA 3 weights")
        data = path.read_bytes()
        if not _TIKTOKEN_LINE.match(data[:4096].split(b"\n", 1)[0]):
            raise DataError(f"{path} is not a tiktoken BPE file; LLaMA 1/2 sentencepiece models load with data.tokenizer.Tokenizer")
        return cls(data, path)

    @property
    def path(self) -> Path:
        """Where the model file lives."""
        return self._path

    @property
    def fingerprint(self) -> str:
        """First 16 hex chars of the sha256 of the model file bytes."""
        return self._fingerprint

    @property
    def vocab_size(self) -> int:
        """BPE ranks plus the 256 special tokens: the embedding table size the model needs."""
        return self._encoding.n_vocab

    @property
    def bos_id(self) -> int:
        """<|begin_of_text|> (128000 for LLaMA 3)."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """<|end_of_text|> (128001 for LLaMA 3)."""
        return self._eos

    @property
    def pad_id(self) -> int:
        """-1: LLaMA 3 has no pad token."""
        return -1

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in BOS/EOS; special-token text in `text` is plain text."""
        ids = [self._bos] if bos else []
        for piece in _pieces(text):
            ids.extend(self._encoding.encode(piece, allowed_special=set(), disallowed_special=()))
        if eos:
            ids.append(self._eos)
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        """Token ids of several texts."""
        return [self.encode(text, bos=bos, eos=eos) for text in texts]

    def decode(self, ids: Iterable[int] | Any) -> str:
        """Text of a sequence of ids (list, numpy array or tensor); BOS/EOS are dropped, as the sentencepiece wrapper does."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._encoding.decode([int(i) for i in ids if int(i) not in (self._bos, self._eos)])

    def id_to_piece(self, token_id: int) -> str:
        """The token of one id as text (special tokens by name; partial UTF-8 shown with replacement characters)."""
        return self._encoding.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")

    def __getstate__(self) -> dict[str, Any]:
        # tiktoken's Encoding is rebuilt from the bytes, so DataLoader workers can receive a tokenizer.
        return {"bytes": self._bytes, "path": self._path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["bytes"], state["path"])

    def __repr__(self) -> str:
        return f"TiktokenTokenizer(path={str(self._path)!r}, vocab_size={self.vocab_size}, fingerprint={self._fingerprint!r})"


def _pieces(text: str) -> Iterator[str]:
    """`text` cut so no piece is longer than _MAX_CHUNK_CHARS or holds a same-class run over _MAX_RUN_CHARS."""
    for start in range(0, len(text), _MAX_CHUNK_CHARS):
        chunk = text[start : start + _MAX_CHUNK_CHARS]
        cut = 0
        for run in _LONG_RUN.finditer(chunk):
            for boundary in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield chunk[cut:boundary]
                cut = boundary
        yield chunk[cut:]


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A tokenizer for any LLaMA tokenizer.model: TiktokenTokenizer for LLaMA 3's, data.tokenizer.Tokenizer otherwise."""
    path = Path(path).expanduser()
    if path.is_file() and is_tiktoken_file(path):
        return TiktokenTokenizer.load(path)
    from data.tokenizer import Tokenizer

    return Tokenizer.load(path)
