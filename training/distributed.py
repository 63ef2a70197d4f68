"""Scaling out on Lightning's own strategies: DDP by name, FSDP2 through ModelParallelStrategy.

FSDP here is FSDP2 (`torch.distributed.fsdp.fully_shard`), applied in the LightningModule's
configure_model hook: one unit per transformer block (with its activation-checkpoint wrapper
inside, as torchtitan orders them), the rest of the model as the root unit. Parameters stay
float32 (the master weights); `precision=bf16-mixed` autocasts the compute as on one device.
Checkpoints are sharded torch.distributed.checkpoint folders (one file per rank plus meta.pt)
that `python -m training.consolidate` turns into one ordinary project checkpoint.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from model import Llama
from model.checkpoints import hidden_name

FSDP = "fsdp"


def strategy_names() -> list[str]:
    """The strategy names trainer.strategy accepts: Lightning's registry, `auto`, and `fsdp` (FSDP2)."""
    return sorted({"auto", FSDP, *StrategyRegistry.available_strategies()})


def build_strategy(name: str) -> Any:
    """The Trainer's `strategy` argument for a conf/trainer name."""
    return ShardedDataParallel() if name == FSDP else name


def shard_model(model: Llama, mesh: Any) -> None:
    """FSDP2 over `mesh`: each block (or its checkpoint wrapper) is one unit, the model the root.

    `hidden_states` is registered as a forward method, because the loss calls it (and then the
    output head's weight) instead of `forward`; the root's parameters stay gathered until the
    backward pass, so using `model.output.weight` after it is valid.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "hidden_states")


class ShardedDataParallel(ModelParallelStrategy):
    """ModelParallelStrategy as pure FSDP2: every process is a data-parallel replica (no tensor
    parallelism), and sharded checkpoints are written atomically.

    A sharded checkpoint is a folder written by every rank, so it cannot be renamed into place
    like a file; each save goes into a fresh hidden folder beside the target, and once every rank
    has finished, the target (a symbolic link) is switched to it with one atomic rename. A crash
    mid-save leaves the link on the previous complete checkpoint.
    """

    def __init__(self) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True)

    def setup_environment(self) -> None:
        # "auto" would mean one replica per node; here every process of every node is one.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        target = Path(self.broadcast(str(filepath)))
        stamp = self.broadcast(f"{checkpoint.get('global_step', 0)}-{time.time_ns()}")
        staging = target.with_name(f"{hidden_name(target.name)}.{stamp}")
        super().save_checkpoint(checkpoint, staging, storage_options)  # every rank writes its shard
        self.barrier()
        if self.is_global_zero:
            _point_link(target, staging)
        self.barrier()

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            _remove_link_and_target(Path(filepath))


def _point_link(link: Path, folder: Path) -> None:
    """Make `link` a symbolic link to `folder` (a sibling) atomically; delete what it pointed to."""
    previous = link.resolve() if link.is_symlink() else None
    if link.exists() and not link.is_symlink():  # a real file or folder from elsewhere: moved aside, then removed
        aside = link.with_name(f"{hidden_name(link.name)}.replaced-{time.time_ns()}")
        os.replace(link, aside)
        previous = aside
    temporary = link.with_name(f"{hidden_name(link.name)}.link-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    os.symlink(folder.name, temporary)  # relative: the run folder can be moved
    os.replace(temporary, link)
    if previous is not None and previous != folder.resolve() and previous.exists():
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink()


def _remove_link_and_target(path: Path) -> None:
    """Delete a checkpoint: the link and the folder it names, or a plain file or folder."""
    target = path.resolve() if path.is_symlink() else path
    if path.is_symlink():
        path.unlink()
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
