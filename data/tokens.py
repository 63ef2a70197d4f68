"""The on-disk token cache: per split, one memory-mapped token file, its document offsets and its metadata.

Each split is built on its own, when first read: evaluating on PG-19's test split tokenizes that split,
not the 11 GB of its train split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import DataError
from data.splits import SPLITS
from data.synthetic_passkey import BlockPlacement
from data.tokenizer import Tokenizer
from model.checkpoints import atomic_write, atomic_write_bytes, fsync_directory

log = logging.getLogger(__name__)

# Bump when the file layout changes: it is part of the cache key.
CACHE_FORMAT = 1
# Caches built before 2026-11-27 marked all three splits finished at once with this file; they are read as they
# are. A split built since has a <split>.meta.json of its own, written last.
META_FILE = "meta.json"
_ENCODE_BATCH = 64  # documents per sentencepiece call; bounds memory on large corpora


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (halves the cache for LLaMA's 32k vocab)."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def cache_key(tokenizer_fingerprint: str, source_identity: Mapping[str, Any]) -> str:
    """sha256 over the tokenizer, the source identity (incl. split rule version) and the cache format."""
    material = {"format": CACHE_FORMAT, "tokenizer": tokenizer_fingerprint, "source": source_identity}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()


def encoded(documents: Sequence[str], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Each document's ids as BOS + ids + EOS, tokenized in batches (bounded memory on large corpora)."""
    for lo in range(0, len(documents), _ENCODE_BATCH):
        yield from tokenizer.encode_batch(documents[lo : lo + _ENCODE_BATCH], bos=True, eos=True)


def split_meta_file(directory: Path, split: str) -> Path:
    """Where `split`'s metadata goes: its presence means the split is finished."""
    return Path(directory) / f"{split}.meta.json"


def read_split_meta(directory: Path, split: str) -> dict[str, Any] | None:
    """`split`'s metadata (dtype, special ids, token and document counts...), or None if it was never finished.

    Raises OSError or ValueError on an unreadable file.
    """
    own = split_meta_file(directory, split)
    if own.is_file():
        return _json_object(own)
    legacy = Path(directory) / META_FILE
    if legacy.is_file():
        meta = _json_object(legacy)
        splits = meta.get("splits")
        counts = splits.get(split) if isinstance(splits, dict) else None
        if isinstance(counts, dict):
            return {**{k: v for k, v in meta.items() if k != "splits"}, "split": split, **counts}
    return None


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ValueError for anything else (a file cut short, a list)."""
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} holds a JSON {type(value).__name__}, not an object")
    return value


def is_complete(directory: Path, split: str, warn: bool = True) -> bool:
    """Whether `directory` holds a finished `split` whose files are as long as its metadata says.

    A damaged one (a copy cut short, a crash of a machine that had not written the files out) counts as
    unfinished, so it is built again rather than read past its end hours into a run; `warn` says so.
    """
    try:
        if read_split_meta(directory, split) is None:
            return False
    except (OSError, ValueError):
        pass  # unreadable metadata: cache_damage says what
    damage = cache_damage(directory, split)
    if damage is not None and warn:
        log.warning("the %s split of the token cache %s is damaged (%s); building it again", split, directory, damage)
    return damage is None


def cache_damage(directory: Path, split: str) -> str | None:
    """What in the finished-looking `split` of `directory` disagrees with its metadata (None: nothing)."""
    return _checked_meta(directory, split)[1]


def _checked_meta(directory: Path, split: str) -> tuple[dict[str, Any] | None, str | None]:
    """`split`'s metadata and what in its files disagrees with it (None: nothing), from one reading."""
    try:
        meta = read_split_meta(directory, split)
        if meta is None:
            return None, f"{split_meta_file(directory, split).name} is missing"
        itemsize = np.dtype(meta["dtype"]).itemsize
        tokens, offsets_file = Path(directory) / f"{split}.bin", Path(directory) / f"{split}.idx.npy"
        if not tokens.is_file() or not offsets_file.is_file():
            return meta, f"{tokens.name} or {offsets_file.name} is missing"
        if tokens.stat().st_size != meta["num_tokens"] * itemsize:
            return meta, f"{tokens.name} holds {tokens.stat().st_size // itemsize:,} tokens, its metadata says {meta['num_tokens']:,}"
        offsets = np.load(offsets_file, mmap_mode="r")
        if len(offsets) != meta["num_documents"] + 1 or int(offsets[-1]) != meta["num_tokens"]:
            return meta, f"{offsets_file.name} does not end at the {meta['num_tokens']:,} tokens its metadata says"
    except (OSError, ValueError, KeyError, TypeError) as error:  # unreadable JSON or offsets, a field missing
        return None, f"{type(error).__name__}: {error}"
    return meta, None


def write_split(
    directory: Path,
    split: str,
    documents: Sequence[str],
    tokenizer: Tokenizer,
    identity: Mapping[str, Any],
    placement: BlockPlacement | None = None,
) -> dict[str, Any]:
    """Tokenize `split`'s documents (each as BOS + ids + EOS) into `directory`, atomically; return its metadata.

    `placement` puts extra, already tokenized documents into the stream whole inside aligned blocks (the
    passkey mix); the offsets then mark pieces (corpus fragments and placed documents) rather than whole
    corpus documents.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A damaged split's old metadata is not removed first: builders that could not lock (see data/locking.py) may
    # be rebuilding a split another has just finished. Every build of one cache key writes the same files, and
    # a reader between two renames finds files that disagree with the metadata and calls the split damaged.
    dtype = token_dtype(tokenizer.vocab_size)
    start = time.perf_counter()
    pieces: Iterable[Sequence[int]] = encoded(documents, tokenizer)
    if placement is not None:
        pieces = placement.place(pieces, pad_id=tokenizer.eos_id)
    offsets = array("q", [0])  # 8 bytes per piece, not a Python int each

    def write_tokens(handle: Any) -> None:
        for ids in pieces:
            handle.write(np.asarray(ids, dtype=dtype).tobytes())
            offsets.append(offsets[-1] + len(ids))

    # Every file goes through a temporary file of its writer's own (mkstemp), on disk before it is renamed into
    # place: concurrent builders (one per node on a shared file system) never write one file together. The
    # metadata, which marks the split finished, comes last.
    atomic_write(directory / f"{split}.bin", write_tokens)
    atomic_write(directory / f"{split}.idx.npy", lambda handle: np.save(handle, np.frombuffer(offsets, dtype=np.int64)))
    meta: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "tokenizer": {"path": str(tokenizer.path), "fingerprint": tokenizer.fingerprint},
        "source": dict(identity),
        "split": split,
        "num_tokens": offsets[-1],
        "num_documents": len(offsets) - 1,
    }
    if placement is not None:
        meta["placed"] = {"documents": len(placement.documents), "block": placement.block,
                          "tokens": sum(map(len, placement.documents)), "padding": placement.padding}
    fsync_directory(directory)  # the data files' renames, before the metadata says they are there
    atomic_write_bytes(split_meta_file(directory, split), json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"))
    fsync_directory(directory)
    log.info("tokenized %s: %d docs / %s tokens in %.1f s -> %s", split, meta["num_documents"], f"{meta['num_tokens']:,}",
             time.perf_counter() - start, directory)
    return meta


class TokenStore:
    """One split of a token cache, memory-mapped lazily (cheap to pickle into DataLoader workers)."""

    def __init__(self, directory: Path, split: str) -> None:
        """Open `split` of the finished cache in `directory`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        meta, damage = _checked_meta(Path(directory), split)
        if meta is None or damage is not None:
            raise DataError(f"the {split} split of the token cache {directory} is damaged or unfinished ({damage}); "
                            "open it through TextDataModule (train.py, evaluate.py), which builds a damaged split anew.")
        self.directory = Path(directory)
        self.split = split
        self.dtype = np.dtype(meta["dtype"])
        self.bos_id: int = meta["bos_id"]
        self.eos_id: int = meta["eos_id"]
        self._num_tokens: int = meta["num_tokens"]
        self._offsets = np.load(self.directory / f"{split}.idx.npy")
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the split, documents back to back (read-only memmap)."""
        if self._tokens is None:
            if self._num_tokens == 0:
                # np.memmap refuses empty files.
                self._tokens = np.zeros(0, dtype=self.dtype)
            else:
                self._tokens = np.memmap(self.directory / f"{self.split}.bin", dtype=self.dtype, mode="r")
        return self._tokens

    @property
    def offsets(self) -> np.ndarray:
        """Start of each document in `tokens`, plus the total as a last entry."""
        return self._offsets

    @property
    def num_tokens(self) -> int:
        """Tokens in the split, BOS/EOS included."""
        return self._num_tokens

    @property
    def num_documents(self) -> int:
        """Documents in the split."""
        return len(self._offsets) - 1

    def document(self, i: int) -> np.ndarray:
        """Token ids of document `i`: BOS, its tokens, EOS."""
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"document {i} out of range for {self.num_documents} documents in {self.split!r}")
        i %= self.num_documents
        return self.tokens[self._offsets[i] : self._offsets[i + 1]]

    def documents(self) -> list[np.ndarray]:
        """Every document's token ids, in order."""
        return [self.document(i) for i in range(self.num_documents)]

    def __len__(self) -> int:
        return self.num_documents

    def __getstate__(self) -> dict[str, Any]:
        # Drop the memmap: pickling it would copy the whole split into every worker.
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def __repr__(self) -> str:
        where = f"{str(self.directory)!r}, {self.split!r}"
        return f"TokenStore({where}, docs={self.num_documents}, tokens={self.num_tokens})"
