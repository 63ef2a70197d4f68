"""Document sources: the bundled Shakespeare corpus, a folder of .txt, a .jsonl file, or a HF dataset."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import lzma
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from data.errors import DataError
from data.splits import SPLIT_VERSION, SPLITS, split_documents

log = logging.getLogger(__name__)

SOURCES = ("shakespeare", "text_dir", "jsonl", "hf")
CORPUS_PATH = Path(__file__).with_name("corpus") / "shakespeare.jsonl.xz"
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")

Documents = dict[str, list[str]]


def check_source(source: str) -> None:
    """Raise a DataError unless `source` is one of SOURCES."""
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose one of: {', '.join(SOURCES)}")


def load_documents(
    source: str,
    path: str | None = None,
    text_field: str = "text",
    hf_name: str | None = None,
    hf_config: str | None = None,
    hf_revision: str | None = None,
    splits: Sequence[str] = SPLITS,
) -> Documents:
    """Documents of each of `splits` ("train", "validation", "test") for the configured source.

    A local corpus is read whole either way (which split a document falls in depends on all their names);
    a Hugging Face dataset with its own splits turns only the asked-for ones into Python strings.
    """
    check_source(source)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise DataError(f"unknown split {unknown[0]!r}; choose from: {', '.join(SPLITS)}")
    if source == "hf":
        return _load_hf(hf_name, hf_config, text_field, hf_revision, splits)
    if source == "shakespeare":
        named = _read_shakespeare()
    elif source == "text_dir":
        named = _read_text_dir(_existing(path, source, want_dir=True))
    else:
        named = _read_jsonl(_existing(path, source, want_dir=False), text_field)
    documents = _split_named(named, origin=str(path) if path else "the bundled corpus")
    return {split: documents[split] for split in splits}


def source_identity(
    source: str,
    path: str | None = None,
    text_field: str = "text",
    hf_name: str | None = None,
    hf_config: str | None = None,
    hf_revision: str | None = None,
) -> dict[str, Any]:
    """A JSON-able description that changes whenever the documents (or split rule) may have changed.

    A Hugging Face dataset is known by name, config and the revision asked for: with no revision pinned
    (data.hf_revision), an update of the dataset on the hub is not seen, and the old tokens are read on.
    """
    check_source(source)
    ident: dict[str, Any] = {"source": source, "split_version": SPLIT_VERSION}
    if source == "shakespeare":
        # The bundled file is small: hash its content so copies and reinstalls share a cache.
        ident["sha256"] = hashlib.sha256(CORPUS_PATH.read_bytes()).hexdigest()
    elif source == "text_dir":
        root = _existing(path, source, want_dir=True)
        # Size + mtime instead of a content hash: hashing a large corpus on every run is too slow.
        ident["path"] = str(root)
        stats = [(f.relative_to(root).as_posix(), f.stat()) for f in _txt_files(root)]
        ident["files"] = [[name, st.st_size, st.st_mtime_ns] for name, st in stats]
    elif source == "jsonl":
        file = _existing(path, source, want_dir=False)
        st = file.stat()
        ident.update(path=str(file), size=st.st_size, mtime_ns=st.st_mtime_ns, text_field=text_field)
    else:
        # hf_splits 2: a dataset's own validation or test split is kept when it lacks the other (1 re-split train).
        ident.update(hf_name=hf_name, hf_config=hf_config, text_field=text_field, hf_splits=2)
        if hf_revision is not None:  # absent rather than null when unpinned: caches built before the key existed stay valid
            ident["hf_revision"] = hf_revision
    return ident


def _existing(path: str | None, source: str, want_dir: bool) -> Path:
    """The resolved `path`, checked to exist and to be a folder (text_dir) or a file (jsonl)."""
    kind = "folder of .txt files" if want_dir else ".jsonl, .jsonl.gz or .jsonl.xz file"
    if path is None or str(path).strip() in ("", "???"):
        raise DataError(f"data source {source!r} needs data.path; set it to a {kind}")
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise DataError(f"data.path {path!r} does not exist; set it to an existing {kind}")
    if want_dir and not p.is_dir():
        raise DataError(f"data.path {path!r} is not a folder; source 'text_dir' needs a folder of .txt files")
    if not want_dir and not p.is_file():
        raise DataError(f"data.path {path!r} is not a file; source 'jsonl' needs {kind}")
    return p


def _read_shakespeare() -> list[tuple[str, str]]:
    """(file name, text) of every play in the bundled corpus, sorted by file name."""
    with lzma.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return sorted((r["file"], r["text"]) for r in records)


def _txt_files(root: Path) -> list[Path]:
    """All .txt files under `root`, recursively, in a stable order."""
    return sorted((p for p in root.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _read_text_dir(root: Path) -> list[tuple[str, str]]:
    """(relative path, text) of every .txt file under `root`."""
    files = _txt_files(root)
    if not files:
        raise DataError(f"no .txt files found under {root}; point data.path at a folder that contains .txt documents")
    return [(f.relative_to(root).as_posix(), _decode(f.read_bytes(), f)) for f in files]


def _decode(raw: bytes, where: Path, line: int | None = None) -> str:
    """Strict UTF-8 decode (BOM dropped, CRLF -> LF) with a DataError naming the file."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        at = f"line {line}" if line is not None else f"byte offset {exc.start}"
        raise DataError(
            f"{where} is not valid UTF-8 ({at}: byte 0x{raw[exc.start]:02x}); "
            "re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from exc
    # Windows line endings would otherwise cost an extra byte token per line.
    return text.replace("\r\n", "\n")


def _open_binary(file: Path) -> BinaryIO:
    """Open a plain, gzip or xz file for reading bytes."""
    if file.name.endswith(".gz"):
        return gzip.open(file, "rb")  # type: ignore[return-value]
    if file.name.endswith(".xz"):
        return lzma.open(file, "rb")  # type: ignore[return-value]
    return open(file, "rb")


def _read_jsonl(file: Path, text_field: str) -> list[tuple[str, str]]:
    """(sha256 of text, text) for every line of a JSON-lines file."""
    if not file.name.endswith(_JSONL_SUFFIXES):
        raise DataError(f"data.path {str(file)!r} is not a {', '.join(_JSONL_SUFFIXES)} file; convert it to JSON lines")
    return list(_jsonl_records(file, text_field))


def _jsonl_records(file: Path, text_field: str) -> Iterator[tuple[str, str]]:
    """Yield (name, text) per non-blank line; the name is the text's hash, so order does not matter."""
    with _open_binary(file) as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, file, lineno)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{file} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line") from exc
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{file} line {lineno} has no {text_field!r} field (found {keys}); "
                    "set data.text_field to the field that holds the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"{file} line {lineno}: field {text_field!r} is a {type(text).__name__}, not a string; "
                    "set data.text_field to a text field"
                )
            yield hashlib.sha256(text.encode("utf-8")).hexdigest(), text


def _split_named(named: list[tuple[str, str]], origin: str) -> Documents:
    """Drop blank and duplicate documents, then split the rest by the stable per-document rule."""
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    blank = dupes = 0
    for name, text in named:
        if not text.strip():
            blank += 1
            continue
        # Exact duplicates could otherwise land in two splits and leak test text into training.
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen:
            dupes += 1
            continue
        seen.add(digest)
        kept.append((name, text))
    if blank or dupes:
        log.info("skipped %d blank and %d duplicate documents from %s", blank, dupes, origin)
    if not kept:
        raise DataError(f"{origin} has no non-blank documents; add text to it or point data.path elsewhere")
    idx = split_documents([name for name, _ in kept])
    return {split: [kept[i][1] for i in idx[split]] for split in SPLITS}


def _load_hf(
    hf_name: str | None, hf_config: str | None, text_field: str, hf_revision: str | None, splits: Sequence[str]
) -> Documents:
    """Documents of `splits` from `datasets.load_dataset`; its own splits are used when it has all three.

    The dataset's splits stay memory-mapped Arrow tables until a split's texts are asked for: only
    those become Python strings (PG-19's train split alone is 11 GB of them).
    """
    if not hf_name:
        raise DataError("data source 'hf' needs data.hf_name; set it to a Hugging Face dataset name such as pg19")
    try:
        import datasets  # optional dependency: only this source needs it
    except ImportError as exc:
        raise DataError(
            "data source 'hf' needs the `datasets` package, which is not installed; pip install datasets"
        ) from exc
    try:
        ds = datasets.load_dataset(hf_name, hf_config, revision=hf_revision)
    except Exception as exc:  # network, auth, unknown name, script datasets: all surface here
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise DataError(
            f"could not load Hugging Face dataset {hf_name!r} (config {hf_config!r}, revision {hf_revision!r}): "
            f"{reason}; check the name and revision, the network, or the local HF cache"
        ) from exc
    available = list(ds.keys())
    for split in available:
        columns = ds[split].column_names
        if text_field not in columns:
            raise DataError(
                f"Hugging Face dataset {hf_name!r} split {split!r} has no {text_field!r} column "
                f"(found {columns}); set data.text_field"
            )

    def own_texts(split: str) -> list[str]:
        return [t for t in ds[split][text_field] if t and t.strip()]

    if all(s in available for s in SPLITS) or all(s != "train" and s in available for s in splits):
        return {s: own_texts(s) for s in splits}  # nothing to carve out of train for these
    if "train" in available:
        texts = ds["train"][text_field]
        carved = _split_named([(hashlib.sha256(t.encode("utf-8")).hexdigest(), t) for t in texts if t], hf_name)
        own = [s for s in SPLITS if s != "train" and s in available]
        missing = [s for s in SPLITS if s != "train" and s not in available]
        # Warned, not logged: the numbers evaluated on a split carved out of train are not the dataset's own.
        log.warning("dataset %s has splits %s; its %s split%s carved out of its train split by document%s", hf_name,
                    available, " and ".join(missing), "s are" if len(missing) > 1 else " is",
                    f" (its own {' and '.join(own)} is used)" if own else "")
        documents = {s: own_texts(s) if s in own else carved[s] for s in splits if s != "train"}
        if "train" in splits:  # documents carved for a split the dataset has its own of go back to training
            documents["train"] = carved["train"] + [t for s in own for t in carved[s]]
        return {s: documents[s] for s in splits}
    raise DataError(f"Hugging Face dataset {hf_name!r} has splits {available} but no 'train'; pick another dataset")
