"""Tests for the data package: tokenizer, split, sources, token cache, packing, DataModule, configs."""

from __future__ import annotations

import gzip
import inspect
import json
import logging
import lzma
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import data.tokenizer as tokenizer_mod
from data import (
    DataError,
    PackedWindows,
    TextDataModule,
    Tokenizer,
    load_documents,
    split_documents,
    train_tokenizer,
)
from data.splits import split_sizes
from data.tokens import cache_key

REPO = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while seven bold kings sing of winter and war".split()


def _prose(seed: int, n_lines: int = 40) -> str:
    """Deterministic lowercase filler text (few distinct characters, so tiny vocabularies fit)."""
    r = random.Random(seed)
    return "\n".join(" ".join(r.choice(WORDS) for _ in range(10)) + "." for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="module")
def shk(tmp_path_factory: pytest.TempPathFactory) -> TextDataModule:
    """The bundled corpus with the project's own 4096-piece tokenizer, trained once per module."""
    cache = tmp_path_factory.mktemp("shk_cache")
    return TextDataModule(seq_len=128, batch_size=4, eval_batch_size=2, cache_dir=str(cache), seed=0).prepare()


@pytest.fixture(scope="module")
def tok(shk: TextDataModule) -> Tokenizer:
    """The module's shared tokenizer."""
    return shk.tokenizer


# -- tokenizer --------------------------------------------------------------------------------


def test_special_ids(tok: Tokenizer) -> None:
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tok.vocab_size == 4096
    assert len(tok.fingerprint) == 16 and tok.path.is_file()


@pytest.mark.parametrize(
    "text",
    [
        "To be, or not to be: that is the question.",
        "  leading spaces,\ttabs and\n\nblank lines  ",
        "\nstarts with a newline",
        "naïve café — 東京 🙂 ∑ Ωmega",  # outside the ASCII training set: byte fallback
        "x\r\ny 1234567890",
        "",
    ],
)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_unseen_characters_use_byte_pieces_not_unk(tok: Tokenizer) -> None:
    ids = tok.encode("東京🙂", bos=False)
    assert tok.unk_id not in ids
    assert all(tok.id_to_piece(i).startswith("<0x") for i in ids if tok.id_to_piece(i) != "▁")


def test_bos_eos_flags(tok: Tokenizer) -> None:
    plain = tok.encode("Hamlet", bos=False)
    assert tok.encode("Hamlet") == [1, *plain]
    assert tok.encode("Hamlet", bos=True, eos=True) == [1, *plain, 2]
    assert tok.decode(torch.tensor([1, *plain, 2])) == "Hamlet"


def test_tokenizer_training_is_deterministic_and_atomic(tmp_path: Path) -> None:
    texts = [_prose(i) for i in range(5)]
    a = train_tokenizer(texts, tmp_path / "a.model", 300)
    b = train_tokenizer(texts, tmp_path / "b.model", 300)
    assert a.fingerprint == b.fingerprint and a.vocab_size == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no temp files left
    assert Tokenizer.load(tmp_path / "a.model").fingerprint == a.fingerprint
    assert pickle.loads(pickle.dumps(a)).encode("the fox") == a.encode("the fox")


def test_tokenizer_vocab_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="vocab_size=100 is too small"):
        train_tokenizer(["abc"], tmp_path / "t.model", 100)
    with pytest.raises(DataError, match="vocab_size=5000 is too large"):
        train_tokenizer([_prose(0)], tmp_path / "t.model", 5000)
    with pytest.raises(DataError, match="empty"):
        train_tokenizer(["", "   "], tmp_path / "t.model", 300)


def test_load_rejects_tiktoken_file(tmp_path: Path) -> None:
    fake = tmp_path / "tokenizer.model"
    fake.write_text("IQ== 0\nIg== 1\nIw== 2\n")  # LLaMA 3's format: base64 token, rank
    with pytest.raises(DataError, match=r"looks like a tiktoken BPE file \(LLaMA 3\)"):
        Tokenizer.load(fake)


def test_load_rejects_missing_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01 not a protobuf \xff")
    with pytest.raises(DataError, match="is not a sentencepiece model"):
        Tokenizer.load(junk)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(DataError, match="Hugging Face tokenizer.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")


# -- split ------------------------------------------------------------------------------------


def test_split_sizes() -> None:
    assert split_sizes(42) == {"train": 36, "validation": 3, "test": 3}
    assert split_sizes(3) == {"train": 1, "validation": 1, "test": 1}
    assert split_sizes(20) == {"train": 18, "validation": 1, "test": 1}
    assert split_sizes(100) == {"train": 90, "validation": 5, "test": 5}
    with pytest.raises(DataError, match="at least 3"):
        split_sizes(2)


def test_split_is_disjoint_complete_deterministic_and_order_free() -> None:
    names = [f"doc_{i:03d}.txt" for i in range(57)]
    idx = split_documents(names)
    flat = idx["train"] + idx["validation"] + idx["test"]
    assert sorted(flat) == list(range(57))  # covers every document exactly once
    assert idx == split_documents(names)  # deterministic
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    by_name = {s: {names[i] for i in v} for s, v in idx.items()}
    assert by_name == {s: {shuffled[i] for i in v} for s, v in split_documents(shuffled).items()}


def test_shakespeare_split_is_by_document() -> None:
    docs = load_documents("shakespeare")
    assert {s: len(v) for s, v in docs.items()} == {"train": 36, "validation": 3, "test": 3}
    assert load_documents("shakespeare") == docs
    heads = {s: {d[:300] for d in v} for s, v in docs.items()}
    assert not heads["train"] & heads["validation"]
    assert not heads["train"] & heads["test"]
    assert not heads["validation"] & heads["test"]
    # Whole documents only: every held-out play is a complete record of the bundled file.
    with lzma.open(REPO / "data" / "corpus" / "shakespeare.jsonl.xz", "rt", encoding="utf-8") as f:
        records = {r["file"]: r["text"] for r in map(json.loads, f)}
    assert len(records) == 42
    test_files = ("henry_vi_part_2_gut.txt", "lovers_complaint_gut.txt", "timon_of_athens_gut.txt")
    assert sorted(docs["test"]) == sorted(records[n] for n in test_files)


# -- packing ----------------------------------------------------------------------------------


def test_packing_targets_every_token_once() -> None:
    tokens = np.arange(103, dtype=np.uint16)
    ds = PackedWindows(tokens, seq_len=10)
    assert len(ds) == 10  # (103 - 1) // 10; the 2-token tail is dropped
    windows = [ds[i] for i in range(len(ds))]
    assert all(w.shape == (11,) and w.dtype == torch.int64 for w in windows)
    targets = torch.cat([w[1:] for w in windows]).numpy()
    assert np.array_equal(targets, tokens[1:101])
    assert all(windows[i][-1] == windows[i + 1][0] for i in range(len(ds) - 1))


def test_packing_on_real_store(shk: TextDataModule) -> None:
    store = shk.store("validation")
    toks = np.asarray(store.tokens)
    starts, ends = store.offsets[:-1], store.offsets[1:] - 1
    assert (toks[starts] == 1).all() and (toks[ends] == 2).all()  # BOS ... EOS around each document
    assert (toks == 1).sum() == store.num_documents  # and nowhere else
    ds = shk.dataset("validation")
    assert len(ds) == (store.num_tokens - 1) // 128
    targets = np.concatenate([ds[i][1:].numpy() for i in range(len(ds))])
    assert np.array_equal(targets, toks[1 : 1 + len(ds) * 128])


def test_split_too_small_for_one_window() -> None:
    with pytest.raises(DataError, match=r"validation split has 10 tokens.*seq_len \+ 1 = 11"):
        PackedWindows(np.arange(10), seq_len=10, split="validation")


def test_datamodule_seq_len_too_long(shk: TextDataModule) -> None:
    dm = TextDataModule(seq_len=2 * 10**6, cache_dir=str(shk.cache_dir))
    with pytest.raises(DataError, match=r"the train split has \d+ tokens, fewer than one window"):
        dm.setup("fit")


def test_packed_windows_pickle_small(shk: TextDataModule) -> None:
    ds = shk.dataset("train")
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # the memmap is reopened in the worker, not copied
    assert torch.equal(pickle.loads(blob)[5], ds[5])


# -- DataModule and cache ---------------------------------------------------------------------


def test_documents_decode_to_source_text(shk: TextDataModule) -> None:
    texts = load_documents("shakespeare")["test"]
    docs = shk.documents("test")
    assert len(docs) == 3
    assert [shk.tokenizer.decode(d) for d in docs] == texts


def test_loaders(shk: TextDataModule) -> None:
    a = next(iter(shk.train_dataloader()))
    b = next(iter(shk.train_dataloader()))
    assert a.shape == (4, 129) and a.dtype == torch.int64
    assert torch.equal(a, b)  # same seed, same order
    val = next(iter(shk.val_dataloader()))
    assert torch.equal(val, torch.stack([shk.dataset("validation")[i] for i in range(2)]))
    assert len(shk.train_dataloader()) == len(shk.dataset("train")) // 4  # drop_last


def test_cache_is_reused_without_tokenizing(shk: TextDataModule, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    bin_file = shk.token_dir / "train.bin"
    mtime = bin_file.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenized or re-trained")

    monkeypatch.setattr(Tokenizer, "encode", boom)
    monkeypatch.setattr(Tokenizer, "encode_batch", boom)
    monkeypatch.setattr(tokenizer_mod.spm.SentencePieceTrainer, "train", boom)
    with caplog.at_level(logging.INFO, logger="data"):
        dm = TextDataModule(seq_len=128, batch_size=4, cache_dir=str(shk.cache_dir)).prepare()
    assert "using cached tokens at" in caplog.text
    assert dm.token_dir == shk.token_dir and bin_file.stat().st_mtime_ns == mtime
    assert dm.store("train").num_tokens == shk.store("train").num_tokens


def test_a_damaged_token_cache_is_refused_then_built_again(shk: TextDataModule, tmp_path: Path, caplog) -> None:
    """A split whose metadata is there but whose train.bin was cut short (a copy that stopped, a machine that
    crashed before writing it out) is not read past its end: opened directly it is refused with the fix, and the
    DataModule builds it again, to the same tokens; the other splits are left as they are."""
    import shutil

    from data.tokens import TokenStore, is_complete

    cache = tmp_path / "cache"
    shutil.copytree(shk.cache_dir, cache)
    dm = TextDataModule(seq_len=128, batch_size=4, cache_dir=str(cache))
    tokens = dm.token_dir / "train.bin"
    full = tokens.read_bytes()
    tokens.write_bytes(full[: len(full) // 2])
    test_mtime = (dm.token_dir / "test.bin").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="data"):
        assert not is_complete(dm.token_dir, "train")
        assert is_complete(dm.token_dir, "test")
    assert "train split of the token cache" in caplog.text and "is damaged (train.bin holds" in caplog.text
    with pytest.raises(DataError, match=r"train split of the token cache .* is damaged .*; open it through TextDataModule .*, which builds a damaged split anew"):
        TokenStore(dm.token_dir, "train")
    dm.prepare()
    assert tokens.read_bytes() == full and is_complete(dm.token_dir, "train")
    assert (dm.token_dir / "test.bin").stat().st_mtime_ns == test_mtime
    assert np.array_equal(dm.store("train").document(3), shk.store("train").document(3))
    assert not list(dm.token_dir.glob("*.tmp"))  # hidden temporary files included


def test_a_split_is_tokenized_when_first_read_and_alone(shk: TextDataModule, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the test split (evaluate.py) tokenizes that split only: not the train split, which on PG-19 is
    11 GB of text. Its tokens are those of the cache built all at once, and the train split comes when asked for."""
    from data.tokens import is_complete

    tokenized: list[int] = []
    encode_batch = Tokenizer.encode_batch

    def counting(self, texts, **kwargs):
        tokenized.extend(len(t) for t in texts)
        return encode_batch(self, texts, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode_batch", counting)
    dm = TextDataModule(seq_len=128, tokenizer=str(shk.tokenizer.path), cache_dir=str(tmp_path))
    test = dm.documents("test")
    assert dm.token_dir.name == shk.token_dir.name  # the same tokenizer and corpus: the same cache key
    assert sorted(p.name for p in dm.token_dir.glob("*.json")) == ["test.meta.json"]
    assert not (dm.token_dir / "train.bin").exists() and not is_complete(dm.token_dir, "train")
    assert sum(tokenized) == sum(map(len, load_documents("shakespeare", splits=("test",))["test"]))
    assert all(np.array_equal(a, b) for a, b in zip(test, shk.documents("test"), strict=True))
    assert np.array_equal(dm.store("train").tokens, shk.store("train").tokens)
    assert sorted(p.name for p in dm.token_dir.glob("*.json")) == ["test.meta.json", "train.meta.json"]


def test_a_local_corpus_is_read_once_to_train_the_tokenizer_and_tokenize_every_split(tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import data.sources as sources_mod

    reads: list[int] = []
    read = sources_mod._read_shakespeare
    monkeypatch.setattr(sources_mod, "_read_shakespeare", lambda: reads.append(1) or read())
    dm = TextDataModule(seq_len=128, vocab_size=512, cache_dir=str(tmp_path))
    assert dm.tokenizer.vocab_size == 512 and dm.prepare().store("test").num_tokens > 0
    assert len(reads) == 1


def test_a_cache_built_before_per_split_metadata_is_read_as_it_is(shk: TextDataModule, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches from before 2026-11-27 mark all three splits finished with one meta.json: they are read, not rebuilt."""
    import shutil

    from data.tokens import META_FILE, is_complete, read_split_meta

    cache = tmp_path / "cache"
    shutil.copytree(shk.cache_dir, cache)
    directory = cache / "tokens" / shk.token_dir.name
    metas = {split: read_split_meta(directory, split) for split in ("train", "validation", "test")}
    common = {k: v for k, v in metas["train"].items() if k not in ("split", "num_tokens", "num_documents", "placed")}
    legacy = {**common, "splits": {s: {"num_tokens": m["num_tokens"], "num_documents": m["num_documents"]} for s, m in metas.items()}}
    (directory / META_FILE).write_text(json.dumps(legacy))
    for split in metas:
        (directory / f"{split}.meta.json").unlink()

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(Tokenizer, "encode_batch", boom)
    dm = TextDataModule(seq_len=128, batch_size=4, cache_dir=str(cache)).prepare()
    assert all(is_complete(directory, split) for split in metas)
    assert dm.store("validation").num_tokens == shk.store("validation").num_tokens
    assert not list(directory.glob("*.meta.json"))


def test_a_process_waits_for_another_building_the_tokenizer_then_uses_it(shk: TextDataModule, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Under torchrun every rank resolves the tokenizer at once: one trains it, the others wait on its lock and
    load what it wrote, instead of each training its own copy (8x the memory on a node)."""
    import fcntl
    import shutil
    import threading
    import time

    dm = TextDataModule(seq_len=128, cache_dir=str(tmp_path))
    wanted = shk.tokenizer.path  # where the first module cached its tokenizer: the same name under tmp_path
    target = tmp_path / wanted.relative_to(shk.cache_dir)
    target.parent.mkdir(parents=True)

    def boom(*args, **kwargs):
        raise AssertionError("trained a second tokenizer")

    monkeypatch.setattr(tokenizer_mod.spm.SentencePieceTrainer, "train", boom)
    got: list[Tokenizer] = []
    with open(target.with_suffix(".lock"), "ab") as held, caplog.at_level(logging.INFO, logger="data"):
        fcntl.flock(held, fcntl.LOCK_EX)  # "rank 0" is training
        waiter = threading.Thread(target=lambda: got.append(dm.tokenizer))
        waiter.start()
        deadline = time.monotonic() + 30
        while "waiting for another process to finish building the tokenizer" not in caplog.text:
            assert time.monotonic() < deadline and waiter.is_alive(), "the second process did not wait"
            time.sleep(0.05)
        shutil.copyfile(wanted, target)  # "rank 0" writes its tokenizer, then lets go
        fcntl.flock(held, fcntl.LOCK_UN)
        waiter.join(30)
    assert got and got[0].fingerprint == shk.tokenizer.fingerprint


def test_a_process_waits_for_another_tokenizing_a_split_then_reads_it(shk: TextDataModule, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Two processes asking for the same missing split: one tokenizes it, the other waits on the split's lock and
    then reads it, rather than tokenizing it a second time."""
    import fcntl
    import shutil
    import threading
    import time

    cache = tmp_path / "cache"
    shutil.copytree(shk.cache_dir, cache)
    dm = TextDataModule(seq_len=128, cache_dir=str(cache))
    finished = dm.token_dir / "test.meta.json"
    kept = finished.read_bytes()
    finished.unlink()  # the test split is being built by "another process"

    def boom(*args, **kwargs):
        raise AssertionError("tokenized the split a second time")

    got: list[int] = []
    with open(dm.token_dir / "test.lock", "ab") as held, caplog.at_level(logging.INFO, logger="data"):
        fcntl.flock(held, fcntl.LOCK_EX)
        monkeypatch.setattr(Tokenizer, "encode_batch", boom)
        waiter = threading.Thread(target=lambda: got.append(dm.store("test").num_tokens))
        waiter.start()
        deadline = time.monotonic() + 30
        while "waiting for another process to finish building the test split's tokens" not in caplog.text:
            assert time.monotonic() < deadline and waiter.is_alive(), "the second process did not wait"
            time.sleep(0.05)
        finished.write_bytes(kept)  # the other process finishes the split, then lets go
        fcntl.flock(held, fcntl.LOCK_UN)
        waiter.join(30)
    assert got == [shk.store("test").num_tokens]


def test_a_rebuild_never_makes_a_finished_split_look_unfinished(shk: TextDataModule, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a file system refuses locks, two nodes may build the same split: the second build must not pull the
    first's finished split from under its readers while it writes the same files again."""
    import shutil

    import data.tokens as tokens_mod
    from data.tokens import TokenStore, is_complete, write_split

    cache = tmp_path / "cache"
    shutil.copytree(shk.cache_dir, cache)
    directory = cache / "tokens" / shk.token_dir.name
    seen: list[bool] = []
    atomic_write = tokens_mod.atomic_write

    def watching(path, write):  # a reader looks in before each file of the second build lands
        seen.append(is_complete(directory, "test"))
        atomic_write(path, write)

    monkeypatch.setattr(tokens_mod, "atomic_write", watching)
    write_split(directory, "test", load_documents("shakespeare", splits=("test",))["test"], shk.tokenizer,
                json.loads((directory / "test.meta.json").read_text())["source"])
    assert seen == [True, True] and is_complete(directory, "test")
    assert np.array_equal(TokenStore(directory, "test").tokens, shk.store("test").tokens)


def test_different_tokenizer_different_key(shk: TextDataModule, tmp_path: Path) -> None:
    other = train_tokenizer([_prose(0), _prose(1)], tmp_path / "other.model", 300)
    dm = TextDataModule(seq_len=128, tokenizer=str(other.path), cache_dir=str(shk.cache_dir))
    assert dm.token_dir != shk.token_dir
    ident = {"source": "shakespeare"}
    assert cache_key("a" * 16, ident) != cache_key("b" * 16, ident)
    assert cache_key("a" * 16, ident) != cache_key("a" * 16, {"source": "text_dir"})


def test_init_is_cheap_and_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PI_LLAMA_CACHE", str(tmp_path / "envcache"))
    dm = TextDataModule(source="text_dir", path=str(tmp_path / "missing"), seq_len=8)  # no data work yet
    assert dm.cache_dir == tmp_path / "envcache" and not dm.cache_dir.exists()
    with pytest.raises(DataError, match="does not exist"):
        dm.prepare()


# -- other sources ----------------------------------------------------------------------------


def test_text_dir_source(tmp_path: Path, tok: Tokenizer) -> None:
    root = tmp_path / "corpus"
    for i in range(6):
        f = root / f"part{i % 2}" / f"doc{i}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(_prose(i), encoding="utf-8")
    (root / "notes.md").write_text("ignored: not .txt")
    dm = TextDataModule(
        source="text_dir",
        path=str(root),
        tokenizer=str(tok.path),
        seq_len=32,
        batch_size=2,
        cache_dir=str(tmp_path / "c"),
    ).prepare()
    counts = {s: dm.store(s).num_documents for s in ("train", "validation", "test")}
    assert counts == {"train": 4, "validation": 1, "test": 1}
    originals = {_prose(i) for i in range(6)}
    assert {tok.decode(d) for s in counts for d in dm.documents(s)} == originals
    assert next(iter(dm.train_dataloader())).shape == (2, 33)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.xz"])
def test_jsonl_source_with_own_small_tokenizer(tmp_path: Path, suffix: str) -> None:
    lines = "".join(json.dumps({"id": i, "body": _prose(i, 30)}) + "\n" for i in range(8)).encode()
    path = tmp_path / f"docs{suffix}"
    opener = {".jsonl": open, ".jsonl.gz": gzip.open, ".jsonl.xz": lzma.open}[suffix]
    with opener(path, "wb") as f:
        f.write(lines)
    dm = TextDataModule(
        source="jsonl",
        path=str(path),
        text_field="body",
        vocab_size=300,
        seq_len=16,
        batch_size=2,
        cache_dir=str(tmp_path / "c"),
    ).prepare()
    assert dm.tokenizer.vocab_size == 300
    assert dm.tokenizer.path.parent == tmp_path / "c" / "tokenizers"
    assert sum(dm.store(s).num_documents for s in ("train", "validation", "test")) == 8
    assert {dm.tokenizer.decode(d) for d in dm.documents("test")} <= {_prose(i, 30) for i in range(8)}


# -- errors -----------------------------------------------------------------------------------


def test_error_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no .txt files found"):
        load_documents("text_dir", str(tmp_path))
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="no non-blank documents"):
        load_documents("text_dir", str(tmp_path))


def test_error_too_few_documents(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text(_prose(i))
    with pytest.raises(DataError, match="found 2 document"):
        load_documents("text_dir", str(tmp_path))


def test_error_non_utf8_file(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(_prose(i))
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8"):
        load_documents("text_dir", str(tmp_path))


def test_error_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_documents("jsonl", str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="needs data.path"):
        load_documents("text_dir", None)


def test_error_jsonl_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"body": "two"}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl line 3 has no 'text' field.*data\.text_field"):
        load_documents("jsonl", str(path))
    path.write_text('{"text": "one"}\n{not json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_documents("jsonl", str(path))


def test_error_unknown_source() -> None:
    with pytest.raises(DataError, match="unknown data source 'books'; choose one of: shakespeare, text_dir, jsonl, hf"):
        TextDataModule(source="books", seq_len=8)
    with pytest.raises(DataError, match="unknown data source"):
        load_documents("books")


def test_error_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="needs the `datasets` package"):
        load_documents("hf", hf_name="pg19")


def test_an_hf_dataset_keeps_its_own_test_split_and_carves_only_the_missing_one(monkeypatch: pytest.MonkeyPatch,
                                                                                caplog: pytest.LogCaptureFixture) -> None:
    class Split:
        def __init__(self, texts: list[str]) -> None:
            self.texts, self.column_names = texts, ["text"]

        def __getitem__(self, column: str) -> list[str]:
            return self.texts

    train = [f"training document number {i} " * 5 for i in range(200)]
    test = [f"the dataset's own test document {i}" for i in range(7)]
    fake = type(sys)("datasets")
    fake.load_dataset = lambda name, config, revision=None: {"train": Split(train), "test": Split(test)}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with caplog.at_level("WARNING"):
        documents = load_documents("hf", hf_name="some/dataset")
    assert documents["test"] == test  # not a carve-out of train
    assert documents["validation"] and set(documents["validation"]) <= set(train)
    assert sorted(documents["train"] + documents["validation"]) == sorted(train)  # nothing of train is lost
    assert "its validation split is carved out of its train split by document (its own test is used)" in caplog.text


def test_an_hf_dataset_turns_only_the_asked_for_splits_into_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate.py reads PG-19's test split: its 11 GB train split stays an Arrow table on disk. The revision asked
    for goes to load_dataset and into the cache key."""
    from data.sources import source_identity

    read: list[str] = []
    asked: list[str | None] = []

    class Split:
        def __init__(self, name: str, texts: list[str]) -> None:
            self.name, self.texts, self.column_names = name, texts, ["text"]

        def __getitem__(self, column: str) -> list[str]:
            read.append(self.name)
            return self.texts

    def load_dataset(name: str, config: str | None, revision: str | None = None) -> dict[str, Split]:
        asked.append(revision)
        return {s: Split(s, [f"{s} document {i}" for i in range(5)]) for s in ("train", "validation", "test")}

    fake = type(sys)("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    documents = load_documents("hf", hf_name="pg19", hf_revision="abc123", splits=("test",))
    assert list(documents) == ["test"] and documents["test"][0] == "test document 0"
    assert read == ["test"] and asked == ["abc123"]
    pinned = source_identity("hf", hf_name="pg19", hf_revision="abc123")
    assert pinned["hf_revision"] == "abc123" and pinned != source_identity("hf", hf_name="pg19", hf_revision="def456")
    assert "hf_revision" not in source_identity("hf", hf_name="pg19")  # unpinned caches keep their keys
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_documents("hf", hf_name="pg19", splits=("dev",))


@pytest.mark.parametrize("own", [("train", "validation", "test"), ("train", "test"), ("train", "validation"), ("train",)])
def test_any_subset_of_an_hf_datasets_splits_is_what_all_three_hold(own: tuple[str, ...],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked for a few splits (train, or only test), a dataset gives each the documents it gives it when asked for
    all three: a carved split is carved the same way, and train gets back what was carved for the dataset's own."""
    import itertools

    class Split:
        def __init__(self, texts: list[str]) -> None:
            self.texts, self.column_names = texts, ["text"]

        def __getitem__(self, column: str) -> list[str]:
            return self.texts

    fake = type(sys)("datasets")
    fake.load_dataset = lambda name, config, revision=None: {s: Split([f"{s} text {i} " * 3 for i in range(60)]) for s in own}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    everything = load_documents("hf", hf_name="some/dataset")
    for k in (1, 2):
        for subset in itertools.permutations(("train", "validation", "test"), k):
            assert load_documents("hf", hf_name="some/dataset", splits=subset) == {s: everything[s] for s in subset}


def test_error_tiktoken_tokenizer_in_datamodule(tmp_path: Path) -> None:
    fake = tmp_path / "tokenizer.model"
    fake.write_text("IQ== 0\nIg== 1\n")
    dm = TextDataModule(tokenizer=str(fake), seq_len=8, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="tiktoken"):
        dm.prepare()


# -- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shakespeare", "text_dir", "jsonl", "pg19"])
def test_config_keys_match_constructor(name: str) -> None:
    cfg = OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml")
    # Set by train.py from optim.<stage>.batch_size and the trainer, not by the data group.
    params = set(inspect.signature(TextDataModule.__init__).parameters) - {"self", "seq_len", "seed", "batch_size",
                                                                          "accumulate_grad_batches"}
    assert set(cfg.keys()) == params
    if name in ("text_dir", "jsonl"):
        assert OmegaConf.is_missing(cfg, "path")
    else:
        dm = TextDataModule(**OmegaConf.to_container(cfg), seq_len=8, seed=0)  # cheap: no data work
        assert dm.vocab_size == (32000 if name == "pg19" else 4096)


# -- synthetic passkey documents ----------------------------------------------------------------


def test_passkey_documents_are_evaluation_prompts_answered(tok: Tokenizer) -> None:
    from data.synthetic_passkey import INSTRUCTION, QUESTION, PasskeyPrompter, passkey_documents

    documents = passkey_documents(tok, 300, max_tokens=256, seed=3)
    assert max(map(len, documents)) > 250  # the window is used up to its end
    assert all(len(d) <= 256 and d[0] == tok.bos_id and d[-1] == tok.eos_id for d in documents)
    prompter, question = PasskeyPrompter(tok), tok.encode(QUESTION, bos=False)
    distances = []
    for ids in documents:
        text = tok.decode(ids)
        key = text.rsplit(" ", 1)[1].rstrip(".")
        assert len(key) == 5 and key.isdigit() and text.startswith(INSTRUCTION)
        # The prompt part is token for token what the evaluation builds for this key, length and distance.
        end = max(i for i in range(len(ids)) if ids[i - len(question) : i] == question)
        first = text.index(f"The pass key is {key}. Remember it.")
        prompt = ids[:end]
        key_index = next(i for i in range(len(prompt)) if len(tok.decode(prompt[: i + 1])) > first + len("The pass key is "))
        distance = len(prompt) - key_index
        assert prompt == prompter.build(key, distance, len(prompt)).tokens
        assert tok.decode(ids[end:]).strip() == f"{key}."
        distances.append(distance)
    # Distances spread uniformly over what fits: a few fixed offsets could be learnt by position, and rare
    # long ones were not learnt at all.
    smallest, largest = prompter.distance_range(256 - 8)
    assert min(distances) < smallest + 10 and max(distances) > largest - 10
    thirds = np.histogram(distances, bins=3, range=(smallest, largest))[0]
    assert thirds.min() > 0.2 * len(documents), thirds
    assert passkey_documents(tok, 5, 256, seed=3) == documents[:5]  # seeded


@pytest.mark.parametrize("seed", [0, 1234])
def test_passkey_training_keys_are_not_the_evaluations_keys(tok: Tokenizer, seed: int) -> None:
    """Training and evaluation at the same seed (as reproduce.py runs them) share keys only by chance:
    a model tested on keys it was trained on could complete a half-read key from memory."""
    from data.synthetic_passkey import passkey_documents
    from evaluation.passkey import plan_passkey

    trained = {tok.decode(ids).rsplit(" ", 1)[1].rstrip(".") for ids in passkey_documents(tok, 1000, max_tokens=256, seed=seed)}
    tested = [key for row in plan_passkey(tok, 256, num_positions=32, trials=10, seed=seed).keys for key in row]
    shared = sum(key in trained for key in tested)
    # By chance: 320 keys x 1000 / 90000 = 3.6 expected; sharing one stream gave about a third of them.
    assert shared <= 12, f"{shared} of {len(tested)} evaluation keys were trained on"


def test_passkey_mix_is_the_requested_share_of_train_only(shk: TextDataModule) -> None:
    block = 128
    mixed = TextDataModule(seq_len=2 * block, batch_size=4, cache_dir=str(shk.cache_dir), seed=0,
                           passkey_share=0.1, passkey_max_tokens=block).prepare()
    assert mixed.tokenizer.path == shk.tokenizer.path  # the corpus' tokenizer, not a new one
    assert mixed.token_dir != shk.token_dir
    key_line = shk.tokenizer.encode("Remember it.", bos=False)
    bos = shk.tokenizer.bos_id
    pieces, starts = mixed.documents("train"), mixed.store("train").offsets[:-1]
    placed = [(d, s) for d, s in zip(pieces, starts) if d[0] == bos and _contains(d.tolist(), key_line)]
    corpus = [d for d, s in zip(pieces, starts) if not (d[0] == bos and _contains(d.tolist(), key_line))]
    # The corpus is all there, in order, only cut around the placed documents.
    assert np.array_equal(np.concatenate(corpus), np.concatenate(shk.documents("train")))
    share = sum(len(d) for d, _ in placed) / mixed.store("train").num_tokens
    assert 0.095 < share < 0.11, share
    # Every passkey document lies whole inside one training window: it starts at a block boundary.
    assert all(len(d) <= block and s % block == 0 for d, s in placed)
    windows, seq_len = mixed.dataset("train"), 2 * block
    for document, start in placed:
        window, offset = divmod(int(start), seq_len)
        if window < len(windows):  # the incomplete tail window is dropped
            assert torch.equal(windows[window][offset : offset + len(document)], torch.from_numpy(document.astype(np.int64)))
    for split in ("validation", "test"):
        assert [d.tolist() for d in mixed.documents(split)] == [d.tolist() for d in shk.documents(split)]


@pytest.mark.parametrize("seed", range(20))
def test_block_placement_keeps_the_corpus_and_puts_each_document_inside_one_block(seed: int) -> None:
    from data.synthetic_passkey import BlockPlacement, spread_offsets

    rng = random.Random(seed)
    block = rng.choice([4, 8, 16])
    corpus = [list(range(1000 * i, 1000 * i + rng.randint(1, 60))) for i in range(1, rng.randint(1, 8))]
    total = sum(map(len, corpus))
    extra = [[-1 - j] * rng.randint(1, block) for j in range(rng.randint(0, 12))]
    placement = BlockPlacement(extra, spread_offsets(len(extra), total, seed), block)
    stream = [t for piece in placement.place(corpus, pad_id=-999) for t in piece]
    # The corpus, in order and complete, is what remains once the placed documents and padding are removed.
    assert [t for t in stream if t >= 0] == [t for d in corpus for t in d]
    assert stream.count(-999) == placement.padding
    corpus_positions = [i for i, t in enumerate(stream) if t >= 0]
    previous_end = 0
    for j, document in enumerate(extra):
        start = stream.index(document[0])
        assert stream[start : start + len(document)] == document and start % block == 0
        # Due once at[j] corpus tokens are written (and after the document before it); it goes in at
        # the first block boundary from there: neither early nor late.
        due = max(corpus_positions[placement.at[j] - 1] + 1 if placement.at[j] else 0, previous_end)
        assert start == -(-due // block) * block, (j, start, due)
        previous_end = start + len(document)
    if placement.padding:  # padding only ever follows the whole corpus
        assert all(t < 0 for t in stream[stream.index(-999):])


def test_block_placement_rejects_a_document_longer_than_its_block() -> None:
    from data.synthetic_passkey import BlockPlacement

    with pytest.raises(ValueError, match="longer than the 4-token block"):
        BlockPlacement([[1, 2, 3, 4, 5]], [0], 4)


def _contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


@pytest.mark.parametrize("settings", [{"passkey_share": 1.0}, {"passkey_share": -0.1}, {"passkey_share": "a"},
                                      {"passkey_max_tokens": 0}])
def test_bad_passkey_settings(settings: dict, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="passkey_"):
        TextDataModule(seq_len=64, cache_dir=str(tmp_path), **settings)


def test_passkey_window_too_short_for_a_document(tok: Tokenizer) -> None:
    from data.synthetic_passkey import passkey_documents

    with pytest.raises(DataError, match="passkey_max_tokens=20"):
        passkey_documents(tok, 1, max_tokens=20, seed=0)


def test_a_data_position_says_what_it_counts_and_a_resume_warns_when_that_changed(
        shk: TextDataModule, caplog: pytest.LogCaptureFixture) -> None:
    state = shk.state_dict()
    assert state["order"] == 2 and state["tokens"] == shk.token_dir.name
    with caplog.at_level("WARNING"):
        shk.load_state_dict(state)
        assert not caplog.records  # the same data: nothing to say
        shk.load_state_dict({"samples_seen": 5, "seed": 0})  # written before order and tokens were saved
        shk.load_state_dict({**state, "tokens": "other-cache"})
    assert "from the second pass on, this run may read another order" in caplog.records[0].getMessage()
    assert f"token cache other-cache, this run reads {shk.token_dir.name}" in caplog.records[1].getMessage()
    shk.load_state_dict(state)
