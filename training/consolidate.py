"""Turn a sharded (trainer=fsdp) checkpoint folder into one ordinary project checkpoint file.

    python -m training.consolidate outputs/.../checkpoints/last.ckpt consolidated.ckpt [--force]

The result holds the full weights, the `pi_llama` payload (model shape, position config,
tokenizer) and the step it was saved at, so `evaluate.py ckpt=`, `train.py init=` and
`python -m model.convert` read it like any other project checkpoint. The optimizer state is left
out: the file is for export and evaluation; resume a sharded run from the folder itself.
Runs in one process, without a process group.

The folder is read with torch.distributed.checkpoint, whose index file is a pickle: consolidate
only folders your own runs wrote (the single-file loaders of this project refuse pickles that run
code; this format cannot).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from model.checkpoints import PROJECT_KEY, CheckpointError, atomic_write

META_FILE = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards
STATE_PREFIX = "state_dict."
KEPT_METADATA = ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters", PROJECT_KEY)


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A folder (or a link to one) holding meta.pt and a torch.distributed.checkpoint index."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / ".metadata").is_file()


def consolidated_state(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint as one dict: {"state_dict": full tensors, "pi_llama": ..., "global_step": ...}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give the sharded checkpoint folder (e.g. checkpoints/last.ckpt).")
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint folder (no meta.pt and .metadata in it); "
                              "a single-file checkpoint needs no consolidation.")
    try:
        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
        index = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # noqa: BLE001 (a damaged folder: say so in one sentence)
        raise CheckpointError(f"{path} cannot be read as a sharded checkpoint ({type(error).__name__}); "
                              "it is damaged or incomplete.") from None
    if PROJECT_KEY not in meta:
        raise CheckpointError(f"{path}/{META_FILE} has no {PROJECT_KEY} entry; it was not written by this project's train.py.")
    # Only the weights, allocated once at their full shapes and filled in place from the shards
    # (the optimizer's moments, twice the weights' size, are never read).
    weights = {
        key[len(STATE_PREFIX):]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in index.state_dict_metadata.items()
        if key.startswith(STATE_PREFIX) and isinstance(entry, TensorStorageMetadata)
    }
    if not weights:
        raise CheckpointError(f"{path} holds no model weights under 'state_dict'.")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"state_dict": weights}, checkpoint_id=str(path), no_dist=True)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"{path} has missing or damaged shards ({type(error).__name__}); copy the whole folder again.") from None
    return {"state_dict": weights, **{key: meta[key] for key in KEPT_METADATA if key in meta}}


def consolidate(source: str | os.PathLike, destination: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the consolidated checkpoint of `source` to the file `destination`, atomically."""
    destination = Path(destination).expanduser().absolute()
    if destination.is_dir():
        raise CheckpointError(f"{destination} is a folder; give the path of the file to write, e.g. {destination / 'model.ckpt'}.")
    if destination.exists() and not force:
        raise CheckpointError(f"{destination} exists; pass --force to replace it.")
    state = consolidated_state(source)
    atomic_write(destination, lambda handle: torch.save(state, handle))
    return destination


def main(argv: list[str] | None = None) -> int:
    """The command line; user errors print one line to stderr and exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m training.consolidate", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a sharded checkpoint folder written under trainer=fsdp (e.g. checkpoints/last.ckpt)")
    parser.add_argument("destination", help="the .ckpt file to write")
    parser.add_argument("--force", action="store_true", help="replace an existing destination file")
    options = parser.parse_args(argv)
    try:
        written = consolidate(options.source, options.destination, force=options.force)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk or a read-only folder
        print(f"error: could not write {options.destination}: {error.strerror or error}.", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
