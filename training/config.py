"""Checks of a composed training config, run before any data or model work."""

from __future__ import annotations

import math
import os
from numbers import Real
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from model import ModelArgs, PositionError, build_position

STAGES = ("auto", "pretrain", "finetune")
PROJECT_TRAINER_KEYS = ("activation_checkpointing", "compile", "loss_chunk_tokens", "peak_tflops")


class ConfigError(ValueError):
    """A value in the training config cannot work; the message names it and the fix."""


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
    args = model_args_from_config(cfg.model)
    try:
        position = build_position(args, OmegaConf.to_container(cfg.position, resolve=True))
    except PositionError as error:
        raise ConfigError(str(error)) from None
    del position
    recipe = cfg.optim[stage]
    for key in ("max_steps", "batch_size"):
        if not isinstance(recipe[key], int) or recipe[key] <= 0:
            raise ConfigError(f"optim.{stage}.{key}={recipe[key]!r} must be a positive integer.")
    if not recipe.lr > 0:
        raise ConfigError(f"optim.{stage}.lr={recipe.lr!r} must be positive.")
    if cfg.run_dir is not None:
        check_writable(Path(str(cfg.run_dir)))
    return stage


def check_writable(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a writable folder."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ConfigError(f"output folder {path} cannot be written ({probe} is not a writable folder); choose another run_dir.")
