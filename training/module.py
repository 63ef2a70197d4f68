"""The LightningModule: next-token training of a Llama with the paper's recipe."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor
from torchmetrics import Metric

from model import ModelArgs, build_model
from model.checkpoints import PROJECT_KEY, project_payload

from .config import NONFINITE_POLICIES
from .faults import NonFiniteLossError
from .loss import next_token_nll
from .schedule import warmup_then

log = logging.getLogger("train")


class TokenPerplexity(Metric):
    """exp of the token-weighted mean negative log-likelihood; sums synchronise across processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, tokens: int | Tensor) -> None:
        self.nll += nll_sum.detach().double()
        self.tokens += tokens

    def compute(self) -> Tensor:
        return torch.exp(self.nll / self.tokens.clamp(min=1)).float()


class CausalLMTask(L.LightningModule):
    """Holds the model and the recipe; everything it is built from is plain data, so the
    checkpoint's hyper-parameters rebuild it exactly (no nn.Module in save_hyperparameters)."""

    def __init__(
        self,
        model_args: Mapping[str, Any],
        position: Mapping[str, Any],
        optim: Mapping[str, Any],
        tokenizer_path: str | None = None,
        loss_chunk_tokens: int = 0,
        weights_follow: bool = False,
        on_nonfinite: str = "stop",
        train_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is not one of {', '.join(NONFINITE_POLICIES)}.")
        self.save_hyperparameters(ignore=["weights_follow", "on_nonfinite"])
        self.args = ModelArgs.from_dict(dict(model_args))
        self.position_config = dict(position)
        self.optim_config = dict(optim)
        self.tokenizer_path = tokenizer_path
        self.train_seq_len = train_seq_len  # stored in checkpoints: evaluation's default passkey window
        self.loss_chunk_tokens = loss_chunk_tokens
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self._skip_this_step = False
        # Set in configure_optimizers: with a fused AdamW a non-finite step is skipped on the
        # device (the optimizer's found_inf, as GradScaler does) and read back once per log interval.
        self._skip_on_device = False
        self._bad: dict[str, Any] = {}
        self._sharded = False
        # When pretrained weights will be assigned right after, build on the meta device:
        # a 7B model is then never materialised twice (random init + checkpoint).
        with torch.device("meta") if weights_follow else contextlib.nullcontext():
            self.model = build_model(self.args, self.position_config)
        self.train_ppl = TokenPerplexity()
        self.val_ppl = TokenPerplexity()

    # --- steps ------------------------------------------------------------------------------
    def _nll(self, batch: Tensor) -> tuple[Tensor, int]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        hidden = self.model.hidden_states(inputs)
        return next_token_nll(hidden, self.model.output.weight, targets, self.loss_chunk_tokens), targets.numel()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        nll, tokens = self._nll(batch)
        loss = nll / tokens
        if self._skip_on_device:
            finite = self._flag_nonfinite_on_device(loss)
            self.train_ppl.update(torch.where(finite, nll.detach(), 0.0), finite.long() * tokens)
        elif self._any_rank_nonfinite(loss):
            self._nonfinite(loss, batch_idx)
        else:
            self.train_ppl.update(nll, tokens)
        # sync_dist: the logged loss is the global batch's, as one process with the whole batch would log it.
        # Not in the progress bar on GPU: the bar reads it every step, a host sync that stalls the queue.
        self.log("train/loss", loss, prog_bar=self.device.type != "cuda", sync_dist=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        self.log("train/ppl", self.train_ppl, on_step=False, on_epoch=True)
        return loss

    def _any_rank_nonfinite(self, loss: Tensor) -> bool:
        """One host sync per step; the decision is shared so that every rank stops or skips alike."""
        return bool(self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False))

    def _nonfinite(self, loss: Tensor, batch_idx: int) -> None:
        step = self.trainer.global_step
        local = loss.item()
        value = str(local) if not math.isfinite(local) else "non-finite on another process"
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(value, step)
        # skip: the backward pass still runs (DDP and FSDP need every rank to take part), but
        # on_before_optimizer_step drops the gradients so the optimizer leaves the weights alone.
        self._skip_this_step = True
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        if self.trainer.is_global_zero:
            log.warning("loss %s at step %d (batch %d): step skipped (%d so far)", value, step, batch_idx, self.skipped_steps)

    def _flag_nonfinite_on_device(self, loss: Tensor) -> Tensor:
        """Mark this step for the fused optimizer to skip, without waiting for the GPU; returns `finite`.

        Under on_nonfinite=stop the mark is sticky: once a step is bad every later update is skipped
        too, so the weights stay those of the last good step until the next check stops the run.
        """
        bad = (~torch.isfinite(loss.detach())).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # every rank skips alike
        if not self._bad:
            self._bad = {"count": torch.zeros((), device=loss.device),
                         "first_step": torch.full((), -1, dtype=torch.long, device=loss.device),
                         "first_value": torch.zeros((), device=loss.device)}
        first = (bad > 0) & (self._bad["first_step"] < 0)
        self._bad["first_step"] = torch.where(first, self.trainer.global_step, self._bad["first_step"])
        self._bad["first_value"] = torch.where(first, loss.detach().float(), self._bad["first_value"])
        # Micro-batches of one optimizer step (gradient accumulation) share global_step: any bad one skips it.
        if self._bad.get("step") == self.trainer.global_step:
            bad_this_step = torch.maximum(self._bad["this_step"], bad)
            self._bad["count"] = self._bad["count"] + bad_this_step - self._bad["this_step"]
        else:
            bad_this_step = bad
            self._bad["count"] = self._bad["count"] + bad
        self._bad["step"], self._bad["this_step"] = self.trainer.global_step, bad_this_step
        skip = bad_this_step if self.on_nonfinite == "skip" else (self._bad["count"] > 0).float()
        self.trainer.optimizers[0].found_inf = skip
        return bad == 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, last = self.trainer.global_step, self.trainer.max_steps
        if self._skip_on_device and (step % self.trainer.log_every_n_steps == 0 or 0 < last <= step):
            self._check_device_flags()

    def on_train_end(self) -> None:
        if self._skip_on_device:
            self._check_device_flags(log_metric=False)  # Lightning allows no self.log here

    def _check_device_flags(self, log_metric: bool = True) -> None:
        """Read the device-side non-finite record (one host sync per log interval) and act on it."""
        if not self._bad:
            return
        count = int(self._bad["count"].item())
        if count == self.skipped_steps:
            return
        step, value = int(self._bad["first_step"].item()), float(self._bad["first_value"].item())
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(str(value) if not math.isfinite(value) else "non-finite on another process", step)
        if self.trainer.is_global_zero:
            log.warning("%d step(s) with a non-finite loss skipped so far (the first at step %d)", count, step)
        self.skipped_steps = count
        if log_metric:
            self.log("train/skipped_steps", float(count))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_this_step:
            # No gradient, no update: AdamW leaves parameters without .grad untouched (moments
            # included). The scheduler and global_step still advance: a skipped step is a step.
            for param in self.parameters():
                param.grad = None
            self._skip_this_step = False

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning zeroes gradients inside the next step's closure, after its forward pass, so the
        # last step's gradients (4 bytes a parameter) would sit beside the next forward's activations
        # at the memory peak. They are spent once the optimizer has stepped: free them now. Not where
        # the strategy accumulates itself (DeepSpeed): it calls this hook on every micro-batch.
        if not self.trainer.strategy.handles_gradient_accumulation:
            optimizer.zero_grad(set_to_none=True)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Under bf16-mixed, clip with Lightning's own code but without its fused-optimizer check.

        Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales gradients
        itself, the fused AdamW included, even under bf16 where no GradScaler exists and the
        gradients are already the true ones. Every other case (fp16's GradScaler, FSDP1, DeepSpeed,
        32-true) goes through Lightning unchanged.
        """
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        nll, tokens = self._nll(batch)
        self.val_ppl.update(nll, tokens)
        self.log("val/loss", nll / tokens, prog_bar=True, sync_dist=True, batch_size=batch.shape[0])

    def on_validation_epoch_end(self) -> None:
        ppl = self.val_ppl.compute()
        self.log("val/ppl", ppl, prog_bar=True, sync_dist=True)  # equal on every rank already; silences the DDP warning
        self.val_ppl.reset()

    # --- parallelism ----------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under trainer.strategy=fsdp (ModelParallelStrategy), shard each block with FSDP2."""
        mesh = self.device_mesh
        if mesh is None or self._sharded:
            return
        from .distributed import shard_model

        shard_model(self.model, mesh["data_parallel"])
        self._sharded = True

    # --- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_config
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                # Norm gains and the learned position table are not weight-decayed.
                (no_decay if param.ndim < 2 or name.startswith("position.") else decay).append(param)
        # fp16-mixed (getattr: the benchmark's bare loop hands in a stand-in trainer without plugins)
        grad_scaler = getattr(getattr(self.trainer, "precision_plugin", None), "scaler", None) is not None
        fused = cfg.get("fused")
        if fused is None:
            # Not with a GradScaler: Lightning unscales gradients for clipping only for optimizers
            # that do not unscale themselves, and refuses to clip for the fused one.
            fused = self.device.type == "cuda" and not grad_scaler
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg["lr"],
            betas=tuple(cfg["betas"]),
            eps=cfg["eps"],
            fused=fused,
        )
        # Not under FSDP2 (DTensor parameters are not mixed with a plain found_inf tensor here) nor
        # a GradScaler (it sets found_inf itself, for its own overflow skipping).
        self._skip_on_device = bool(fused) and not self._sharded and not grad_scaler
        max_steps = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else cfg["max_steps"]
        multiplier = warmup_then(
            cfg["schedule"], cfg["warmup_steps"], cfg["warmup_start_ratio"], max_steps, cfg.get("min_lr_ratio", 0.0)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        tokenizer = Path(self.tokenizer_path) if self.tokenizer_path else None
        checkpoint[PROJECT_KEY] = project_payload(self.args, self.position_config, tokenizer, self.train_seq_len)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM's formula 6N + 12*L*H*Q*T; N counts every matmul weight,
        the untied output head included, but not the input embedding (a lookup, not a matmul)."""
        a = self.args
        return 6 * self.model.num_parameters(exclude_embeddings=True) + 12 * a.n_layers * a.n_heads * a.head_dim * seq_len
