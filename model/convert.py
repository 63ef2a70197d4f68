"""Convert a checkpoint of any loadable format to an HF transformers folder or to Meta's format.

    python -m model.convert SRC DST --to hf|meta [--dtype float32|bfloat16|float16] [--force]

SRC is anything `load_pretrained` reads (a project .ckpt, a Meta folder, an HF folder). DST is
written atomically: into a temporary folder beside it that is renamed at the end, so a failed
conversion leaves nothing behind. A non-empty DST is only replaced with --force.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from .checkpoints import CheckpointError, Pretrained, atomic_directory, load_pretrained
from .hf import DEFAULT_MAX_SHARD_BYTES, save_hf
from .meta import params_from_args, save_meta
from .position import PositionError

TARGETS = ("hf", "meta")


def export(
    pretrained: Pretrained,
    destination: str | os.PathLike,
    to: str,
    *,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write `pretrained` to the folder `destination` in format `to` ("hf" or "meta"), atomically."""
    if to not in TARGETS:
        raise CheckpointError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}.")
    if to == "meta":
        params_from_args(pretrained.args, pretrained.position)  # refuse an inexpressible position before writing
    destination = Path(destination).expanduser().absolute()
    with atomic_directory(destination, force=force) as staging:
        if to == "hf":
            save_hf(pretrained, staging, max_shard_bytes=max_shard_bytes)
        else:
            save_meta(pretrained, staging)
    return destination


def convert(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    to: str,
    *,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    max_seq_len: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Load `source` (any format, tensors cast to `dtype` as they are read) and export it to `destination`."""
    if to not in TARGETS:
        raise CheckpointError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}.")
    src = Path(source).expanduser().absolute()
    dst = Path(destination).expanduser().absolute()
    src_folder = src if src.is_dir() else src.parent
    if dst == src_folder or dst in src.parents:
        # --force would replace the folder the weights are being read from.
        raise CheckpointError(f"destination {dst} holds the source checkpoint; write the conversion to another folder.")
    pretrained = load_pretrained(src, dtype=dtype, max_seq_len=max_seq_len)
    return export(pretrained, dst, to, force=force, max_shard_bytes=max_shard_bytes)


def parse_size(text: str) -> int:
    """Bytes from "5GB", "500MB", "200KiB" or a plain number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise CheckpointError(f"shard size {text!r} is not a size; write it like 5GB or 500MB.")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(prefix.upper() or "_"))


def main(argv: list[str] | None = None) -> int:
    """The command line; user errors print one line to stderr and exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a project .ckpt file, a Meta folder (consolidated.*.pth + params.json) or an HF folder")
    parser.add_argument("destination", help="the folder to create")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the format to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the weights (default: keep)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty destination")
    parser.add_argument("--max-seq-len", type=int, help="the window the weights were trained at (Meta's params.json lacks it)")
    parser.add_argument("--max-shard-size", default="5GB", help="HF export: largest safetensors file (default 5GB)")
    options = parser.parse_args(argv)
    try:
        written = convert(
            options.source,
            options.destination,
            options.to,
            dtype=options.dtype,
            force=options.force,
            max_seq_len=options.max_seq_len,
            max_shard_bytes=parse_size(options.max_shard_size),
        )
    except (CheckpointError, PositionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk or a read-only folder: the user's to fix, not a bug
        print(f"error: could not write {options.destination}: {error.strerror or error}.", file=sys.stderr)
        return 2
    print(f"wrote {options.to} checkpoint to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
