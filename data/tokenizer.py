"""A thin sentencepiece wrapper with LLaMA's special ids, and a trainer for our own model."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from data.errors import DataError
from model.checkpoints import atomic_write_bytes

log = logging.getLogger(__name__)

# LLaMA 1/2 layout: unk=0, bos=1, eos=2, no pad piece (pad_id=-1).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1
# Byte pieces (256) + the three specials must fit, on top of every distinct character.
MIN_VOCAB_SIZE = 256 + 3
# Fixed, not os.cpu_count(): the thread count is recorded in the model file, so a
# machine-dependent value would change the fingerprint (and the token cache key).
TRAIN_THREADS = 2
TRAIN_SEED = 0
# Cap on training lines: sentencepiece reservoir-samples (seeded) above this, which keeps
# large corpora such as PG-19 tractable while using every line of small ones.
MAX_TRAIN_SENTENCES = 5_000_000
# A tiktoken BPE file (LLaMA 3's tokenizer.model) is lines of "<base64 token> <rank>".
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")


class Tokenizer:
    """A sentencepiece model: encode/decode plus its special ids and a content fingerprint."""

    def __init__(self, model_bytes: bytes, path: Path) -> None:
        """Wrap an already-validated serialized sentencepiece model; use `Tokenizer.load`."""
        self._bytes = model_bytes
        self._path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self._fingerprint = hashlib.sha256(model_bytes).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a sentencepiece `tokenizer.model`, with a clear DataError for anything else."""
        path = Path(path).expanduser()
        if not path.exists():
            raise DataError(
                f"tokenizer file {path} does not exist; set data.tokenizer to a sentencepiece "
                "tokenizer.model or to null to train the project's own tokenizer"
            )
        if path.is_dir():
            raise DataError(
                f"tokenizer path {path} is a folder; point data.tokenizer at the tokenizer.model file inside it"
            )
        data = path.read_bytes()
        _reject_tiktoken(path, data)
        try:
            tok = cls(data, path)
        except RuntimeError as exc:
            if data.lstrip()[:1] == b"{":
                raise DataError(
                    f"{path} looks like a Hugging Face tokenizer.json; point data.tokenizer at a sentencepiece "
                    "tokenizer.model (LLaMA 1/2) or set it to null to train one"
                ) from exc
            raise DataError(
                f"{path} is not a sentencepiece model ({_short(exc)}); point data.tokenizer at a "
                "LLaMA 1/2 style tokenizer.model or set it to null to train one"
            ) from exc
        if tok.bos_id < 0 or tok.eos_id < 0:
            raise DataError(
                f"sentencepiece model {path} has no BOS/EOS pieces (bos_id={tok.bos_id}, eos_id={tok.eos_id}); "
                "use a model trained with bos_id and eos_id set, like LLaMA's"
            )
        return tok

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
        """Number of pieces, i.e. the embedding table size the model needs."""
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (1 for LLaMA)."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (2 for LLaMA)."""
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (0 for LLaMA)."""
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        """Padding id; -1 for LLaMA, which has no pad piece."""
        return self._sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in BOS/EOS."""
        return self._sp.encode(text, out_type=int, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        """Token ids of several texts, encoded on TRAIN_THREADS threads inside sentencepiece."""
        return self._sp.encode(list(texts), out_type=int, add_bos=bos, add_eos=eos, num_threads=TRAIN_THREADS)

    def decode(self, ids: Iterable[int] | Any) -> str:
        """Text of a sequence of ids (list, numpy array or tensor); BOS/EOS are dropped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id, e.g. "<s>" or "<0x0A>"."""
        return self._sp.id_to_piece(int(token_id))

    def __getstate__(self) -> dict[str, Any]:
        # The C++ processor is rebuilt from the bytes, so DataLoader workers can receive a Tokenizer.
        return {"bytes": self._bytes, "path": self._path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["bytes"], state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self._path)!r}, vocab_size={self.vocab_size}, fingerprint={self._fingerprint!r})"


def train_tokenizer(texts: Iterable[str], out_path: Path, vocab_size: int) -> Tokenizer:
    """Train a LLaMA-style BPE sentencepiece model on `texts` and write it atomically to `out_path`."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size={vocab_size} is too small for a byte-fallback tokenizer; "
            f"use at least {MIN_VOCAB_SIZE} (256 byte pieces + 3 specials) plus room for characters"
        )
    out_path = Path(out_path)
    buf = io.BytesIO()
    start = time.perf_counter()
    # The seed only matters when the corpus exceeds MAX_TRAIN_SENTENCES and gets sampled.
    spm.set_random_generator_seed(TRAIN_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,  # any unseen character still encodes (as UTF-8 bytes)
            character_coverage=1.0,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            # Identity normalization and kept whitespace make decode(encode(x)) == x exact.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            input_sentence_size=MAX_TRAIN_SENTENCES,
            shuffle_input_sentence=True,
            num_threads=TRAIN_THREADS,
            minloglevel=2,  # sentencepiece is very chatty on stderr otherwise
        )
    except RuntimeError as exc:
        raise _training_error(exc, vocab_size) from exc
    model = buf.getvalue()
    atomic_write_bytes(out_path, model)  # other ranks or nodes may train it too: each writes a file of its own
    tok = Tokenizer(model, out_path)
    log.info(
        "trained a %d-piece BPE tokenizer in %.1f s -> %s (fingerprint %s)",
        vocab_size,
        time.perf_counter() - start,
        out_path,
        tok.fingerprint,
    )
    return tok


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-blank lines of every text: sentencepiece trains on one sentence per item, like LLaMA."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def _reject_tiktoken(path: Path, data: bytes) -> None:
    """Raise a DataError for a tiktoken BPE file, checked first because it can pass as an empty protobuf."""
    first_line = data[:4096].split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.match(first_line):
        raise DataError(
            f"{path} looks like a tiktoken BPE file (LLaMA 3); this project needs a sentencepiece "
            "tokenizer.model (LLaMA 1/2) or data.tokenizer=null to train its own"
        )


def _training_error(exc: RuntimeError, vocab_size: int) -> DataError:
    """Turn a sentencepiece trainer failure into a DataError that says what to change."""
    msg = str(exc)
    too_high = re.search(r"value <= (\d+)", msg)
    if too_high:
        return DataError(
            f"vocab_size={vocab_size} is too large for this training text (at most {too_high.group(1)} fits); "
            "lower vocab_size or add more text"
        )
    too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
    if too_low:
        return DataError(
            f"vocab_size={vocab_size} cannot hold the byte pieces, specials and every distinct character "
            f"of the training text; raise vocab_size to at least {too_low.group(1)}"
        )
    if "sentences_.empty()" in msg:
        return DataError("the tokenizer training text is empty; give the train split some non-blank text")
    return DataError(
        f"sentencepiece could not train a tokenizer with vocab_size={vocab_size} ({_short(exc)}); "
        "check the training text"
    )


def _short(exc: BaseException) -> str:
    """The exception message on one line, trimmed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
