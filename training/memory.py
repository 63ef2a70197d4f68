"""Memory and speed levers applied to a built model from outside (the model code stays plain)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from model import Llama
from model.checkpoints import atomic_write

CHECKPOINTING = ("none", "full", "mlp")


def apply_activation_checkpointing(model: Llama, mode: str = "full") -> None:
    """Recompute activations in the backward pass instead of storing them (non-reentrant).

    "full" wraps every transformer block; "mlp" wraps only the feed-forward of each block,
    keeping the attention outputs (the expensive part to recompute at long context).
    The wrapper's state-dict hooks keep parameter names unchanged.
    """
    if mode not in CHECKPOINTING:
        raise ValueError(f"activation_checkpointing={mode!r} is not one of {', '.join(CHECKPOINTING)}.")
    if mode == "none":
        return
    wrap = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    for i, block in enumerate(model.layers):
        if mode == "full":
            model.layers[i] = wrap(block)
        else:
            block.feed_forward = wrap(block.feed_forward)


def compile_blocks(model: Llama) -> None:
    """torch.compile each block on its own: small graphs compile fast and are reused by every layer."""
    for block in model.layers:
        block.compile()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file beside the target, flushed, then renamed over it:
    a crash mid-write leaves the previous checkpoint intact, never half a file under its name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle))


