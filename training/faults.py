"""Surviving faults: RNG state in checkpoints, a checkpoint on SIGTERM, metrics kept across a resume."""

from __future__ import annotations

import csv
import logging
import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .config import checkpoint_metadata

log = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite and trainer.on_nonfinite=stop."""

    def __init__(self, value: str, step: int, checkpoint: Path | None = None) -> None:
        self.value, self.step, self.checkpoint = value, step, checkpoint
        kept = f", and {checkpoint} is the last good checkpoint" if checkpoint is not None else ""
        super().__init__(
            f"the training loss became {value} at step {step}, so the run stopped before that step changed any "
            f"weight{kept}; lower the learning rate, check the data, or set trainer.on_nonfinite=skip to skip such steps."
        )


def rng_states() -> dict[str, Any]:
    """Every generator a training step may draw from, as plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of rng_states()."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class FaultTolerance(L.Callback):
    """Puts the RNG state into every checkpoint (restored when training resumes) and writes
    `sigterm_path` when Lightning stops the run on SIGTERM.

    Lightning 2.6 only notes a SIGTERM, finishes the current batch and raises SIGTERMException
    (a SystemExit) without saving anything; the checkpoint is written here, from on_exception,
    while the strategy is still set up. RNG states are the saving process's (rank 0's); every
    rank is seeded alike, so that is also what the other ranks had.
    """

    def __init__(self, sigterm_path: Path) -> None:
        self.sigterm_path = Path(sigterm_path)
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Restored states not applied yet (a resume with nothing left to train never reaches
        # on_train_start) are still the run's own: save those, not this process's fresh ones.
        return {"rng": self._pending if self._pending is not None else rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at on_train_start: restoring earlier would be undone by whatever setup draws.
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Loggers label rows with the loop's count of stepped batches. Restarting from a checkpoint of a
        # step that validated (e.g. the end-of-run last.ckpt when max_steps is a multiple of
        # val_check_interval), Lightning 2.6 skips the repeated validation but counts that step once more,
        # so every later row would be logged one step late. That count moves once per optimizer step,
        # as the global step does.
        loop = trainer.fit_loop.epoch_loop
        if loop._batches_that_stepped != trainer.global_step:
            loop._batches_that_stepped = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return  # a crash or a non-finite loss: keep the last good checkpoint as it is
        loop = trainer.fit_loop.epoch_loop
        if loop._should_accumulate():
            log.warning("SIGTERM arrived inside a gradient-accumulation window; the checkpoint resumes after "
                        "the micro-batches already seen, without their accumulated gradient")
        trainer.save_checkpoint(self.sigterm_path, weights_only=False)
        log.warning("SIGTERM: saved %s at step %d; continue with the same overrides and resume=%s", self.sigterm_path, trainer.global_step,
                    self.sigterm_path)


class ResumingCSVLogger(CSVLogger):
    """CSVLogger that, when a run resumes into the same folder, keeps the rows logged before the
    checkpoint's step (Lightning's writer would delete the whole file) and appends after them."""

    def __init__(self, *args: Any, keep_before_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keep_before_step = keep_before_step

    @property
    def experiment(self) -> Any:
        if self._experiment is None and self._keep_before_step is not None and rank_zero_only.rank == 0:
            path = Path(self.log_dir) / "metrics.csv"
            earlier = _rows_before(path, self._keep_before_step) if path.is_file() else []
            with warnings.catch_warnings():  # "previous log files will be deleted": their rows are kept below
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                writer = super().experiment  # this deletes the old file
            writer.metrics[:0] = earlier
            self._keep_before_step = None
            return writer
        return super().experiment


def _rows_before(path: Path, step: int) -> list[dict[str, Any]]:
    """Rows of a metrics.csv logged before `step` (values kept as written; empty cells dropped)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: v for k, v in row.items() if v != ""} for row in rows if row.get("step") and int(row["step"]) < step]


def checkpoint_step(path: str | Path) -> int | None:
    """The global step a checkpoint (a file, or a sharded folder's meta.pt) was saved at; None if unreadable."""
    try:
        return int(checkpoint_metadata(Path(path)).get("global_step"))
    except Exception:  # noqa: BLE001 (a checkpoint that cannot be read fails later with its own message)
        return None
