"""Checks of a composed training config, run before any data or model work."""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from model import ModelArgs, PositionError, build_position

from training.resolvers import creatable, nearest_existing
from training.schedule import SCHEDULES

STAGES = ("auto", "pretrain", "finetune")
NONFINITE_POLICIES = ("stop", "skip")
COMMON_STRATEGIES = ("auto", "ddp", "fsdp")  # checked without importing Lightning (seconds of start-up)
PROJECT_TRAINER_KEYS = (
    "activation_checkpointing", "compile", "loss_chunk_tokens", "peak_tflops", "checkpoint_every_n_steps", "on_nonfinite",
)


class ConfigError(ValueError):
    """A value in the training config cannot work; the message names it and the fix."""


# Scalings that are plain RoPE at scale 1 (dynamic NTK too: here, unlike in transformers, scale 1 does not
# grow its base past the window; model/position.py).
UNSCALED_IS_ROPE = ("pi", "ntk", "dynamic", "yarn", "llama3")


def resolve_stage(cfg: DictConfig) -> str:
    """pretrain or finetune: `auto` means finetune when there is something to extend (init or scale > 1)."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r} is not one of {', '.join(STAGES)}.")
    if cfg.stage != "auto":
        return str(cfg.stage)
    return "finetune" if cfg.init is not None or float(cfg.scale) > 1 else "pretrain"


def model_args_from_config(model_cfg: Any, vocab_size: int | None = None) -> ModelArgs:
    """ModelArgs from conf/model/*.yaml; a null vocab_size takes the tokenizer's."""
    values = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    if values.get("vocab_size") is None:
        values["vocab_size"] = vocab_size or 32000
    try:
        return ModelArgs.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


def validate(cfg: DictConfig) -> str:
    """Fail fast on values that cannot work; returns the resolved stage."""
    scale = cfg.scale
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale) or scale < 1:
        raise ConfigError(f"scale={scale!r} must be a number >= 1 (the factor by which the window grows), e.g. scale=8.")
    if cfg.seq_len is not None and (not isinstance(cfg.seq_len, int) or cfg.seq_len <= 0):
        raise ConfigError(f"seq_len={cfg.seq_len!r} must be a positive integer (or null for model.max_seq_len * scale).")
    stage = resolve_stage(cfg)
    for key in ("init", "resume"):
        value = cfg.get(key)
        if value is not None and not Path(str(value)).expanduser().exists():
            raise ConfigError(f"{key}={value} does not exist; give the path of a checkpoint file or folder.")
    vocab = cfg.model.get("vocab_size")
    if stage == "finetune" and cfg.init is None and cfg.resume is None and vocab is not None:
        # Without init= a fine-tune starts from the bundled base, pretrained here first on the bundled corpus
        # with its tokenizer: right for the project's own models (vocab_size null), never for a published
        # shape such as model=llama1-7b, which would be pretrained from scratch instead of loaded.
        raise ConfigError(f"fine-tuning a model with its own {vocab}-token vocabulary, as the published LLaMA shapes have, "
                          "needs its pretrained weights: pass init=/path/to/checkpoint (a Meta or HF folder, or a .ckpt).")
    args = model_args_from_config(cfg.model)
    try:
        position = build_position(args, OmegaConf.to_container(cfg.position, resolve=True))
    except PositionError as error:
        raise ConfigError(str(error)) from None
    if cfg.init is None:  # with init= the shape comes from the checkpoint; train() checks it then
        check_window_fits(position, cfg.seq_len or round(args.max_seq_len * float(scale)), args.max_seq_len)
    validate_eval(cfg.eval, position if cfg.init is None else None)
    del position
    kind, position_scale = cfg.position.get("kind"), cfg.position.get("scale")
    if position_scale is not None and float(position_scale) != float(scale):
        # The stage and the window follow the top-level scale; position.scale=8 alone would pretrain at the
        # base window an encoding meant for 8x the window (or fine-tune a window that the encoding does not fit).
        raise ConfigError(f"position.scale={position_scale:g} differs from scale={float(scale):g}; set the scale once "
                          f"with scale={position_scale:g} (position.scale follows it, and so do the window and the stage).")
    if kind in UNSCALED_IS_ROPE and float(position_scale if position_scale is not None else scale) == 1:
        # Not a run anyone asks for: the same as position=rope, and with scale 1 stage=auto pretrains from scratch.
        raise ConfigError(f"position={kind} at scale 1 reads positions exactly as plain RoPE does; pass scale=S to "
                          f"extend the window S times (e.g. position={kind} scale=8), or position=rope to pretrain.")
    recipe = cfg.optim[stage]
    for key in ("max_steps", "batch_size"):
        if not isinstance(recipe[key], int) or recipe[key] <= 0:
            raise ConfigError(f"optim.{stage}.{key}={recipe[key]!r} must be a positive integer.")
    if isinstance(recipe.lr, bool) or not isinstance(recipe.lr, Real) or not 0 < recipe.lr < math.inf:
        raise ConfigError(f"optim.{stage}.lr={recipe.lr!r} must be a positive finite number.")
    _validate_schedule(recipe, f"optim.{stage}")
    validate_trainer(cfg.trainer)
    if cfg.resume is not None:
        check_resumable(Path(str(cfg.resume)).expanduser(), str(cfg.trainer.strategy),
                        OmegaConf.to_container(cfg.position, resolve=True))
    if cfg.run_dir is not None:
        check_writable(Path(str(cfg.run_dir)))
    return stage


def _validate_schedule(recipe: DictConfig, where: str) -> None:
    """The warmup and decay settings, checked before tokenizing and loading weights (minutes for a 7B)."""
    if recipe.schedule not in SCHEDULES:
        raise ConfigError(f"{where}.schedule={recipe.schedule!r} is not a schedule; choose one of {', '.join(SCHEDULES)}.")
    if isinstance(recipe.warmup_steps, bool) or not isinstance(recipe.warmup_steps, int) or recipe.warmup_steps < 0:
        raise ConfigError(f"{where}.warmup_steps={recipe.warmup_steps!r} must be an integer >= 0 (0: no warmup).")
    for key in ("warmup_start_ratio", "min_lr_ratio"):
        value = recipe.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
            raise ConfigError(f"{where}.{key}={value!r} must be a fraction of the peak lr in [0, 1].")
    if isinstance(recipe.weight_decay, bool) or not isinstance(recipe.weight_decay, Real) or not 0 <= recipe.weight_decay < math.inf:
        raise ConfigError(f"{where}.weight_decay={recipe.weight_decay!r} must be a finite number >= 0.")


def validate_eval(settings: DictConfig, position: Any = None) -> None:
    """The in-training evaluation's settings (eval.*), and its windows against a learned table's length."""
    def counts(value: Any, least: int) -> bool:
        return not isinstance(value, bool) and isinstance(value, int) and value >= least

    for key, least in (("every_n_steps", 0), ("max_documents", 1), ("passkey_trials", 0), ("batch_size", 1)):
        if not counts(settings[key], least):
            raise ConfigError(f"eval.{key}={settings[key]!r} must be an integer >= {least}"
                              + (" (0 turns the evaluation off)." if key == "every_n_steps" else "."))
    cut = settings.max_tokens_per_document
    if cut is not None and not counts(cut, 2):
        raise ConfigError(f"eval.max_tokens_per_document={cut!r} must be null (twice the longest window, at least 4096) "
                          "or an integer >= 2.")
    windows = settings.windows
    if windows is not None and (isinstance(windows, str) or not hasattr(windows, "__len__") or not windows
                                or not all(counts(w, 2) for w in windows)):
        raise ConfigError(f"eval.windows={windows!r} must be null (the base and the training window) or a list of "
                          "integers >= 2, e.g. eval.windows=[256,2048].")
    length = getattr(position, "length", None)
    if settings.every_n_steps and windows is not None and length is not None and max(windows) > length:
        raise ConfigError(f"eval.windows={list(windows)} reaches past the {length} positions of the learned absolute "
                          f"table; use windows <= {length}.")


def check_window_fits(position: Any, seq_len: int, base_window: int) -> None:
    """A learned absolute table cannot be read past its end; only scale (interpolation) lengthens it."""
    length = getattr(position, "length", None)
    if length is not None and seq_len > length:
        raise ConfigError(
            f"seq_len={seq_len} is longer than the {length} positions of the learned absolute table; pass "
            f"scale={seq_len / base_window:g} (the table is interpolated to window * scale) or a seq_len <= {length}."
        )


def check_resumable(path: Path, strategy: str, position: dict[str, Any] | None = None) -> None:
    """resume= needs a training checkpoint (loops and optimizer state), sharded only under trainer.strategy=fsdp,
    and one trained with `position`, the position config this run composes.

    Lightning restores the weights and the optimizer into whatever run the config builds: resumed without the
    interrupted run's overrides, a PI fine-tune would go on as a RoPE run at the base window.
    """
    if path.is_dir():
        if not (path / "meta.pt").is_file():
            raise ConfigError(f"resume={path} is a folder but not a sharded checkpoint (no meta.pt); give checkpoints/last.ckpt.")
        if strategy != "fsdp":
            raise ConfigError(f"resume={path} is a sharded checkpoint; resume it with trainer.strategy=fsdp, "
                              f"or make one file with python -m training.consolidate and start from it with init=.")
    try:
        checkpoint = checkpoint_metadata(path)
    except Exception as error:  # noqa: BLE001 (torch's message is long; its type says enough)
        raise ConfigError(f"resume={path} cannot be read as a checkpoint ({type(error).__name__}); it is truncated, "
                          "corrupt or not a torch file, so resume from an earlier one.") from None
    # A sharded folder keeps the loops and the optimizer in its shards; its meta.pt has the rest.
    needed = {"global_step"} if path.is_dir() else {"loops", "optimizer_states", "global_step"}
    if not isinstance(checkpoint, dict) or not needed <= checkpoint.keys():
        raise ConfigError(f"resume={path} holds weights without the training state (step, optimizer, data position); "
                          f"start from its weights with init={path} instead.")
    trained = (checkpoint.get("hyper_parameters") or {}).get("position")
    if position is not None and isinstance(trained, dict) and position_label(trained) != position_label(position):
        raise ConfigError(f"resume={path} was trained with {position_label(trained)} but this run composes "
                          f"{position_label(position)}; resume with the interrupted run's overrides "
                          f"({position_label(trained).replace(',', '')}).")


def checkpoint_metadata(path: Path) -> Any:
    """A training checkpoint's step, hyper-parameters and (single file) loops: a file, or a sharded folder's meta.pt.

    Memory-mapped, so only the small pickle is read, never the tensors; safe (weights_only).
    """
    target = path / "meta.pt" if path.is_dir() else path
    return torch.load(target, map_location="cpu", mmap=True, weights_only=True)


def kind_and_scale(position: dict[str, Any]) -> tuple[str, float]:
    """A position config's encoding and scale (1 when unset), comparable across int/float spellings."""
    scale = position.get("scale")
    return str(position.get("kind", "rope")), float(scale) if scale is not None else 1.0


def position_label(position: dict[str, Any]) -> str:
    """"position=pi, scale=8": the encoding a resumed run must share with the interrupted one (its further
    settings, such as YaRN's betas, are not compared: a resume without overrides loses kind and scale)."""
    kind, scale = kind_and_scale(position)
    return f"position={kind}, scale={scale:g}"


def validate_trainer(trainer: DictConfig) -> None:
    """The project's trainer levers and the strategy name (Lightning's own errors come with a traceback)."""
    if trainer.on_nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(f"trainer.on_nonfinite={trainer.on_nonfinite!r} is not one of {', '.join(NONFINITE_POLICIES)}.")
    every = trainer.checkpoint_every_n_steps
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
        raise ConfigError(f"trainer.checkpoint_every_n_steps={every!r} must be a non-negative integer (0 or null: "
                          "only at validation and at the end).")
    if trainer.strategy not in COMMON_STRATEGIES and not _is_lightning_strategy(trainer.strategy):
        raise ConfigError(f"trainer.strategy={trainer.strategy!r} is not a strategy; use auto, ddp or fsdp "
                          "(or another name Lightning registers).")
    if isinstance(trainer.num_nodes, bool) or not isinstance(trainer.num_nodes, int) or trainer.num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={trainer.num_nodes!r} must be a positive integer.")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate!r} must be a positive integer.")
    limit = trainer.get("limit_train_batches")
    # Lightning steps at every epoch's end: an epoch cut inside an accumulation would end in a short step.
    if isinstance(limit, int) and not isinstance(limit, bool) and limit % accumulate:
        raise ConfigError(f"trainer.limit_train_batches={limit} is not a multiple of trainer.accumulate_grad_batches="
                          f"{accumulate}; every epoch would end in a short step, so use a multiple (or null).")
    if isinstance(limit, float) and limit != 1.0 and accumulate > 1:
        raise ConfigError(f"trainer.limit_train_batches={limit} (a fraction) with trainer.accumulate_grad_batches="
                          f"{accumulate} may cut epochs inside an accumulation; give it as a number of batches, a "
                          f"multiple of {accumulate}.")


def _is_lightning_strategy(name: Any) -> bool:
    from .distributed import strategy_names

    return isinstance(name, str) and name in strategy_names()


def check_writable(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a writable folder."""
    if not creatable(path):
        raise ConfigError(f"output folder {path} cannot be written ({nearest_existing(path)} is not a writable folder); "
                          "choose another run_dir.")
