"""Loading pretrained weights, whatever format they come in.

`load_pretrained(path)` detects the format and returns a `Pretrained`: the model's arguments,
its position config, a state dict in the project's names and layout, and the tokenizer file
that belongs to it. Every load is safe: safetensors, or torch.load(weights_only=True).

The project's own checkpoints are Lightning checkpoints (also plain torch files) holding
    state_dict: {"model.<name>": tensor}   (the LightningModule's)
    pi_llama:   {"model_args": {...}, "position": {...}, "tokenizer_model": bytes | None, "format": 1}
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .args import ModelArgs
from .llama import Llama

PROJECT_KEY = "pi_llama"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


@dataclass
class Pretrained:
    """Weights plus everything needed to rebuild the model they belong to."""

    args: ModelArgs
    position: dict[str, Any]
    state_dict: dict[str, Tensor]
    tokenizer_path: Path | None = None
    source_format: str = "project"
    extra: dict[str, Any] = field(default_factory=dict)

    def build_model(self, position: Mapping[str, Any] | None = None, strict: bool = True) -> Llama:
        """The model with these weights, read with the stored position encoding or with `position`."""
        from . import build_position  # late import: model/__init__ imports this module's siblings

        with torch.device("meta"):
            model = Llama(self.args, build_position(self.args, position or self.position))
        load_into(model, self.state_dict, strict=strict)
        return model


def load_into(model: Llama, state: Mapping[str, Tensor], strict: bool = True) -> None:
    """Copy `state` into `model` (which may live on the meta device), checking every shape first.

    A learned absolute table of another length is resampled by interpolation; a table the
    model does not have (or one the checkpoint lacks) is reported by name.
    """
    own = model.state_dict()
    state = dict(state)
    if "position.table" in state and "position.table" in own and state["position.table"].shape != own["position.table"].shape:
        from .position import interpolate_table

        state["position.table"] = interpolate_table(state["position.table"], own["position.table"].shape[0])
    for name, tensor in state.items():
        if name in own and tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensor.shape)} in the checkpoint but {tuple(own[name].shape)} in the model; "
                "the checkpoint was made for another model shape (check model= and the checkpoint's config)."
            )
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"the checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                "was it saved with another position encoding or model?"
            )
    model.load_state_dict(state, strict=strict, assign=True)
    # Non-persistent buffers (rotary tables) were created on the meta device: rebuild lazily on first use.
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module.register_buffer(name, torch.empty(0, *buffer.shape[1:]), persistent=False)


def safe_torch_load(path: Path) -> Any:
    """torch.load restricted to tensors and plain data; anything that would run code is refused."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a saved checkpoint file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds Python objects that could run code when unpickled ({str(error).splitlines()[0][:200]}); "
            "refusing to load it. Re-save its tensors with safetensors or torch.save of a plain state dict."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {str(error).splitlines()[0][:200]}") from None


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def project_payload(args: ModelArgs, position: Mapping[str, Any], tokenizer_path: Path | None) -> dict[str, Any]:
    """What the project stores beside the weights so a checkpoint rebuilds its own model."""
    tokenizer_model = Path(tokenizer_path).read_bytes() if tokenizer_path else None
    return {
        "format": FORMAT_VERSION,
        "model_args": args.to_dict(),
        "position": dict(position),
        "tokenizer_model": tokenizer_model,
    }


def load_project_checkpoint(path: Path) -> Pretrained:
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or PROJECT_KEY not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no {PROJECT_KEY!r} entry).")
    meta = checkpoint[PROJECT_KEY]
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    tokenizer_path = _materialise_tokenizer(meta.get("tokenizer_model"))
    return Pretrained(
        args=ModelArgs.from_dict(meta["model_args"]),
        position=dict(meta["position"]),
        state_dict=state,
        tokenizer_path=tokenizer_path,
        source_format="project",
        extra={"global_step": checkpoint.get("global_step"), "path": str(path)},
    )


def _materialise_tokenizer(model_bytes: bytes | None) -> Path | None:
    """Write an embedded tokenizer to a content-addressed cache file (once) and return its path."""
    if not model_bytes:
        return None
    cache = Path(os.environ.get("PI_LLAMA_CACHE", Path.home() / ".cache" / "pi_llama")) / "tokenizers"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"embedded-{hashlib.sha256(model_bytes).hexdigest()[:16]}.model"
    if not path.exists():
        atomic_write_bytes(path, model_bytes)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_pretrained(path: str | os.PathLike) -> Pretrained:
    """Load a checkpoint of any supported format (detected from what the path holds)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; check init=/ckpt= (absolute paths are safest).")
    return load_project_checkpoint(path)
