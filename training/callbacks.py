"""Callbacks: throughput and model FLOPs utilisation, measured without a host sync per step."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class Throughput(L.Callback):
    """Logs tokens/s every `every` steps, MFU against `peak_flops` when that is known, and on CUDA
    the peak memory the allocator has held since the run started (perf/peak_gib).

    The clock is read after a device synchronisation once per interval, never per step, so
    the measurement does not slow the loop it measures. The memory figure is an allocator
    counter read on the host: it needs no synchronisation.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None, every: int = 10) -> None:
        self.tokens_per_step, self.flops_per_token, self.peak_flops, self.every = tokens_per_step, flops_per_token, peak_flops, every
        self._start: float | None = None
        self._start_step = 0
        self.last: dict[str, float] = {}

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step = None, trainer.global_step
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._start is None:  # the first step compiles and warms up: start the clock after it
            self._sync(pl_module)
            self._start, self._start_step = time.perf_counter(), step
            return
        if step - self._start_step < self.every:
            return
        self._sync(pl_module)
        now = time.perf_counter()
        tokens_per_s = (step - self._start_step) * self.tokens_per_step / (now - self._start)
        self.last = {"perf/tokens_per_s": tokens_per_s}
        if self.peak_flops:
            self.last["perf/mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        if pl_module.device.type == "cuda":
            self.last["perf/peak_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(self.last, prog_bar=False)
        self._start, self._start_step = now, step


def measured_matmul_peak(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """bf16 matmul FLOP/s on this GPU: the ceiling MFU is reported against (not a datasheet number)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)
