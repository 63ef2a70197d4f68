"""Perplexity by window and passkey k_max every N fine-tuning steps: the paper's "by step" tables from one run.

Uses `trainer.lightning_module.model` (a Llama) and `trainer.datamodule` (documents(split) and
tokenizer). Rows go to the loggers and to `out_path` (a JSON list of rows, default
<log_dir>/eval_by_step.json) with a CSV and a Markdown table beside it. Keep it cheap: a few
short documents and a few passkey trials per distance.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from data.errors import DataError
from evaluation import report
from evaluation.errors import EvaluationError
from evaluation.limits import check_window, extended_window
from evaluation.passkey import PasskeyResult, plan_passkey, run_passkey
from evaluation.perplexity import prepare_documents, sliding_window_perplexity, window_stride

log = logging.getLogger(__name__)


def default_document_cut(windows: Sequence[int]) -> int:
    """Tokens read per document when none are given: twice the longest window, at least 4096.

    A document no longer than a window is read in one piece, so its score is the same at every longer
    window: cut shorter than the longest window, that column would repeat the one before it. Twice the
    window lets it slide over half a document; 4096 keeps short windows reading as much text as before.
    The cost grows with the square of the window: at 8192 (stride 256) each document is 33 windows of
    8192 tokens per evaluation, divided over DDP's ranks (under FSDP every rank reads them all).
    """
    return max(4096, 2 * max(windows))


@rank_zero_only  # every rank holds the same documents: said once
def _warn_short_documents(documents: Sequence[np.ndarray], windows: Sequence[int], split: str) -> None:
    for window in windows:
        short = sum(len(doc) < window for doc in documents)
        if short:  # read whole, with less context than the window: the column then says less than its name
            log.warning("by-step evaluation: %d of %d %s documents are shorter than the window %d; they are read "
                        "whole, with less context (eval.max_tokens_per_document cuts them, if set)", short, len(documents), split, window)


class ExtensionEvalCallback(Callback):
    """Evaluate sliding-window perplexity at several windows and passkey k_max every `every_n_steps` steps."""

    def __init__(
        self,
        every_n_steps: int = 100,
        windows: Sequence[int] = (256, 512, 1024, 2048),
        stride: int = 256,
        max_stride_fraction: float | None = 0.125,
        split: str = "validation",
        max_documents: int | None = 2,
        max_tokens_per_document: int | None = None,
        batch_size: int = 4,
        passkey_window: int | None = None,
        passkey_positions: int = 8,
        passkey_trials: int = 2,
        at_start: bool = True,
        out_path: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise EvaluationError(f"every_n_steps={every_n_steps} must be at least 1.")
        if not windows or min(windows) < 2:
            raise EvaluationError(f"windows={list(windows)} must be a non-empty list of lengths >= 2.")
        self.every_n_steps, self.windows, self.stride, self.split = every_n_steps, list(windows), stride, split
        self.max_stride_fraction = max_stride_fraction  # as evaluate.py's ppl.max_stride_fraction
        if max_tokens_per_document is None:
            max_tokens_per_document = default_document_cut(self.windows)
        self.max_documents, self.max_tokens_per_document, self.batch_size = max_documents, max_tokens_per_document, batch_size
        self.passkey_window, self.passkey_positions, self.passkey_trials = passkey_window, passkey_positions, passkey_trials
        self.at_start, self.out_path, self.seed = at_start, Path(out_path) if out_path else None, seed
        self.rows: list[dict[str, Any]] = []
        self._documents: list[np.ndarray] | None = None
        self._last_step: int | None = None
        self._passkey_skipped = False

    # -- hooks --------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Step 0: the paper's "PI without fine-tuning" column. A run resumed from a checkpoint between two
        # evaluations starts at that step: it gets no row of its own there, the table stays on its grid.
        if self.at_start and trainer.global_step == 0:
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps: with gradient accumulation it repeats across batches.
        if trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluate(trainer, pl_module)  # the final step, whatever N divides

    # -- work ---------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_model(self, model: torch.nn.Module, datamodule: Any, step: int, ranks: Ranks | None = None) -> dict[str, Any]:
        """One row: perplexity per window and passkey k_max for `model` now.

        `ranks` (None: this process alone) are the processes evaluating together: with ranks.shard =
        (rank, n) this one reads its share of the perplexity windows and decodes its share of the passkey
        distances, and ranks.sum adds the shares up.
        """
        ranks = ranks or ONE_PROCESS
        shard, divided = ranks.shard, ranks.shard[1] > 1
        if self._documents is None:
            self._documents = prepare_documents(datamodule.documents(self.split), self.max_documents, self.max_tokens_per_document)
            _warn_short_documents(self._documents, self.windows, self.split)
        row: dict[str, Any] = {"step": step}
        for window in self.windows:
            check_window(model, window, f"the callback's ppl window {window}")
            stride = window_stride(self.stride, window, self.max_stride_fraction)
            result = sliding_window_perplexity(model, self._documents, window, stride, self.batch_size, shard=shard)
            if divided:  # the totals only: the row reads nothing else (per_document and blocks stay this rank's share)
                result.nll, tokens = ranks.sum([result.nll, float(result.tokens)])
                result.tokens = int(round(tokens))
            row[f"ppl_{window}"] = result.ppl
        if self.passkey_trials > 0 and not self._passkey_skipped:
            window = self.passkey_window or extended_window(model)
            check_window(model, window, f"the callback's passkey window {window}")
            try:
                passkey = run_passkey(model, datamodule.tokenizer, window, self.passkey_positions, self.passkey_trials,
                                      self.seed, batch_size=self.passkey_trials, shard=shard, agree_batch_size=ranks.min)
            except (EvaluationError, DataError) as error:  # a window too short for the prompt, a tokenizer that
                # loses the key: not worth stopping training
                log.warning("passkey evaluation skipped for this run: %s", error)
                self._passkey_skipped = True
                return row
            if divided:
                passkey = _whole_passkey_grid(passkey, datamodule.tokenizer, self.passkey_positions, self.passkey_trials,
                                              self.seed, shard, ranks.sum)
            row["passkey_window"] = window
            row["passkey_k_max"] = passkey.k_max
            row["passkey_success"] = float(np.mean(passkey.success_rates))
        return row

    # -- checkpointing: a resumed run keeps the rows of the steps before it (step 0 included) --

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [{k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()} for row in self.rows],
                "passkey_skipped": self._passkey_skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(row) for row in state_dict.get("rows", [])]
        self._last_step = self.rows[-1]["step"] if self.rows else None  # resumed at that step: not evaluated again
        self._passkey_skipped = bool(state_dict.get("passkey_skipped", False))

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or trainer.sanity_checking:
            return
        self._last_step = step
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            # Run on every rank: a sharded (FSDP) forward needs all of them; only rank 0 writes.
            ranks = _trainer_ranks(trainer, pl_module.device)
            with trainer.strategy.precision_plugin.forward_context():
                row = self.evaluate_model(model, trainer.datamodule, step, ranks)
        finally:
            model.train(was_training)
        self.rows.append(row)
        metrics = {f"longctx/{k}": float(v) for k, v in row.items() if k != "step" and _finite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if trainer.is_global_zero:
            self._write(trainer)
            log.info("long-context eval at step %d: %s", step, {k: round(v, 3) for k, v in metrics.items()})

    def _write(self, trainer: L.Trainer) -> None:
        path = self.out_path or Path(trainer.log_dir or trainer.default_root_dir) / "eval_by_step.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Rewritten whole, atomically, after every evaluation (a few rows): the files are complete whenever
        # training stops.
        report.write_text(path, json.dumps(report.to_jsonable(self.rows), indent=1) + "\n")
        columns = list(dict.fromkeys(k for r in self.rows for k in r))  # the union: a skipped passkey leaves gaps
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        report.write_text(path.with_suffix(".csv"), table.getvalue())
        report.write_text(path.with_suffix(".md"), report.by_step_markdown(self.rows) + "\n")


@dataclass(frozen=True)
class Ranks:
    """The processes an evaluation runs on together: the share of the work this one does, and the all-reduces."""

    shard: tuple[int, int]  # (rank, n): every n-th piece of the divided work from the rank-th on; (0, 1): all of it
    sum: Callable[[list[float]], list[float]]  # each number summed over the processes
    min: Callable[[int], int]  # the smallest over the processes


ONE_PROCESS = Ranks((0, 1), lambda values: values, lambda value: value)


def _trainer_ranks(trainer: L.Trainer, device: torch.device) -> Ranks:
    """The trainer's processes, with the all-reduces on `device` (NCCL reduces CUDA tensors only)."""
    if trainer.world_size == 1:
        return ONE_PROCESS

    def reduce(values: list[float], op: str) -> list[float]:
        # float64: token counts stay exact, nll sums keep their digits
        return trainer.strategy.reduce(torch.tensor(values, dtype=torch.float64, device=device), reduce_op=op).tolist()

    return Ranks(_shard(trainer), lambda values: reduce(values, "sum"), lambda value: int(reduce([value], "min")[0]))


def _shard(trainer: L.Trainer) -> tuple[int, int]:
    """(rank, n) the work is divided over: DDP's ranks each hold the whole model and do a share. Under FSDP or
    DeepSpeed every forward gathers weights from every rank, so each rank does all of it (in the same batches)."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy) and trainer.world_size > 1:
        return trainer.global_rank, trainer.world_size
    return 0, 1


def _whole_passkey_grid(
    part: PasskeyResult, tokenizer: Any, positions: int, trials: int, seed: int, shard: tuple[int, int],
    sum_over_ranks: Callable[[list[float]], list[float]],
) -> PasskeyResult:
    """The success grid of every distance from each rank's rows (rank r decoded rows r, r + ranks, ...)."""
    plan = plan_passkey(tokenizer, part.window, positions, trials, seed)  # every rank's: the same keys and distances
    rank, ranks = shard
    grid = np.zeros((len(plan.distances), trials))
    grid[rank::ranks] = np.asarray(part.successes, dtype=np.float64).reshape(-1, trials)
    summed = np.asarray(sum_over_ranks(grid.ravel().tolist())).reshape(grid.shape)
    return PasskeyResult(part.window, part.prompt_length, plan.distances, (summed > 0.5).tolist(), part.threshold,
                         keys=plan.keys[: len(plan.distances)])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
