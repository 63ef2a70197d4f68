"""train(cfg): one pretraining or fine-tuning run from a composed Hydra config."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from data import TextDataModule
from data.sources import source_identity
from data.synthetic_passkey import RECIPE as PASSKEY_RECIPE
from model import keep_stored_settings
from model.checkpoints import (PROJECT_KEY, CheckpointError, Pretrained, atomic_write, check_same_tokenizer, check_tokenizer,
                               load_into, load_pretrained, same_tokenizer)

from .callbacks import Throughput, measured_matmul_peak
from .config import PROJECT_TRAINER_KEYS, ConfigError, check_window_fits, checkpoint_metadata, kind_and_scale, model_args_from_config, validate
from .distributed import build_strategy
from .faults import FaultTolerance, NonFiniteLossError, ResumingCSVLogger, checkpoint_step
from .memory import AtomicCheckpointIO, apply_activation_checkpointing, compile_blocks
from .module import CausalLMTask
from .slurm import requeue_checkpoint

log = logging.getLogger("train")
# Lightning checks for a stateful DataLoader; the data position here lives in the DataModule's
# state instead (ResumableSampler), so resuming mid-epoch is exact and its warning does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


@dataclass
class RunResult:
    stage: str
    run_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    metrics: dict[str, float]


def train(cfg: DictConfig) -> RunResult:
    """Pretrain (stage=pretrain) or extend the window of (stage=finetune) a model, as `cfg` says."""
    given = Path(str(cfg.resume)).expanduser() if cfg.resume is not None else None
    chosen = requeue_checkpoint(_run_dir_path(cfg), given, checkpoint_step)
    if chosen != given:
        log.warning("SLURM requeued this job: resuming from %s, the newest checkpoint of the run", chosen)
        cfg.resume = str(chosen)
    stage = validate(cfg)
    run_dir = _run_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    recipe = cfg.optim[stage]
    log.info("stage=%s position=%s scale=%g run_dir=%s", stage, cfg.position.kind, cfg.scale, run_dir)

    init = cfg.init
    if stage == "finetune" and init is None and cfg.resume is None:
        if _is_multiprocess(cfg.trainer) and not base_path(cfg).exists():
            # Each rank would pretrain the base under a nested multi-process Trainer of its own.
            raise ConfigError(f"no bundled base at {base_path(cfg)} for this model and data; pretrain it once in one "
                              "process (`python train.py` with the same model and data) or pass init=PATH.")
        init = str(bundled_base(cfg, run_dir))
    pretrained = _load_init(init) if init is not None else None
    if pretrained is not None and pretrained.tokenizer_path is None and cfg.data.get("tokenizer") is None:
        # Else the data module would train a tokenizer on the corpus, whose ids mean nothing to these weights.
        raise ConfigError(f"init={init} comes without its tokenizer.model; pass data.tokenizer=/path/to/tokenizer.model, "
                          "the one its weights were trained with.")

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if pretrained is not None and data_cfg.get("tokenizer") is None and pretrained.tokenizer_path is not None:
        data_cfg["tokenizer"] = str(pretrained.tokenizer_path)  # the checkpoint's own vocabulary
    args = pretrained.args if pretrained is not None else None
    base_window = args.max_seq_len if args is not None else int(cfg.model.max_seq_len)
    seq_len = int(cfg.seq_len or round(base_window * float(cfg.scale)))
    if data_cfg.get("passkey_max_tokens") is None:
        data_cfg["passkey_max_tokens"] = base_window  # passkey documents stay within the base window L
    data_cfg["batch_size"] = int(recipe.batch_size)
    datamodule = TextDataModule(**data_cfg, seq_len=seq_len, seed=int(cfg.seed),
                                accumulate_grad_batches=int(cfg.trainer.get("accumulate_grad_batches") or 1))
    tokenizer = datamodule.tokenizer
    if args is None:
        args = model_args_from_config(cfg.model, tokenizer.vocab_size)
    elif OmegaConf.to_container(cfg.model) != OmegaConf.to_container(OmegaConf.create(args.to_dict())):
        log.info("the model shape comes from init=%s; the model= config group is not used", init)
    if args.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model only {args.vocab_size}; "
            "use the tokenizer the model was trained with (data.tokenizer=...)."
        )
    if cfg.resume is not None:
        _check_resume_tokenizer(Path(str(cfg.resume)).expanduser(), tokenizer.path)
    if pretrained is not None and cfg.data.get("tokenizer") is not None:
        try:  # a data.tokenizer of another vocabulary than the weights' is refused too, not only a larger one
            check_tokenizer(args, tokenizer)
            check_same_tokenizer(pretrained, tokenizer.path)
        except CheckpointError as error:
            raise ConfigError(f"{str(error).rstrip('.')} (data.tokenizer=...).") from None

    position = OmegaConf.to_container(cfg.position, resolve=True)
    if pretrained is not None:
        position = keep_stored_settings(position, pretrained.position)
    stored = kind_and_scale(pretrained.position) if pretrained is not None else None
    if stored is not None and stored[1] != 1.0 and stored != kind_and_scale(position):
        # Changing the encoding is the point of a fine-tune, but an extended checkpoint (PI, LLaMA 3.1's llama3
        # scaling) silently read as plain RoPE at its original window is rarely what was meant.
        log.warning("init=%s was trained with position=%s scale=%g; this run uses position=%s scale=%g, counted from "
                    "its base window %d: pass position=%s scale=%g to keep its encoding", init, *stored,
                    *kind_and_scale(position), base_window, *stored)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    levers = {key: trainer_cfg.pop(key) for key in PROJECT_TRAINER_KEYS}
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    optim_for_stage = {**{k: v for k, v in optim.items() if k not in ("pretrain", "finetune")}, **optim[stage]}
    task = CausalLMTask(
        model_args=args.to_dict(),
        position=position,
        optim=optim_for_stage,
        tokenizer_path=str(tokenizer.path),
        loss_chunk_tokens=int(levers["loss_chunk_tokens"]),
        weights_follow=pretrained is not None,
        on_nonfinite=str(levers["on_nonfinite"]),
        train_seq_len=seq_len,
    )
    check_window_fits(task.model.position, seq_len, args.max_seq_len)
    if pretrained is not None:
        _load_weights(task, pretrained)
    apply_activation_checkpointing(task.model, levers["activation_checkpointing"])
    if levers["compile"]:
        compile_blocks(task.model)

    trainer = _trainer(trainer_cfg, levers, task, run_dir, int(recipe.max_steps), seq_len, int(recipe.batch_size), cfg)
    checkpoints = run_dir / "checkpoints"
    started = time.perf_counter()
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.resume)
    except NonFiniteLossError as error:  # say which checkpoint is left to go back to
        last = checkpoints / "last.ckpt"
        raise NonFiniteLossError(error.value, error.step, last if last.exists() else None) from None
    elapsed = time.perf_counter() - started

    # The run's final last.ckpt: written here, once, after the last validation (PeriodicLastCheckpoint
    # leaves the last step to this write), so a run that stops between two periodic saves still ends
    # with its last step, and the best-model record inside it is current.
    trainer.save_checkpoint(checkpoints / "last.ckpt", weights_only=False)  # with optimizer state: resumable
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    # Lightning holds the path made absolute; name it as `last` is named (relative to the working directory
    # when run_dir is), so that a summary copied off a machine names no folder of that machine.
    best = str(checkpoints / Path(best).name) if best else ""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result = RunResult(stage, run_dir, checkpoints / "last.ckpt", Path(best) if best else None, metrics)
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(
            json.dumps({"stage": stage, "seconds": elapsed, "seq_len": seq_len, "metrics": metrics, "init": init,
                        "last": str(result.last_checkpoint), "best": best}, indent=2)
        )
        log.info("checkpoints: %s (last), %s (best)", result.last_checkpoint, best or "-")
        log.info("metrics: %s%s", run_dir / "logs" / "metrics.csv",
                 f" and TensorBoard at {run_dir / 'logs' / 'tensorboard'}" if len(trainer.loggers) > 1 else "")
        log.info("done in %.0f s: %s", elapsed, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        if stage == "pretrain" and cfg.init is None and cfg.register_base and _is_default_base(cfg):
            if cfg.resume is None or _saved_recipe(Path(str(cfg.resume)).expanduser()) == task.optim_config:
                _register_base(cfg, result.last_checkpoint)
            else:  # e.g. a fine-tune resumed without its overrides, or a run lengthened on resume
                log.warning("not registered as the bundled base: resumed from %s, whose recipe is not this run's",
                            cfg.resume)
    trainer.strategy.barrier("registered")  # other ranks return only once rank 0's files are in place
    return result


# ----------------------------------------------------------------------------- pieces


def _run_dir(cfg: DictConfig) -> Path:
    path = _run_dir_path(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run_dir_path(cfg: DictConfig) -> Path:
    """run_dir, or Hydra's output folder (a timestamped one outside @hydra.main), not yet made."""
    if cfg.run_dir is not None:
        return Path(str(cfg.run_dir))
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed outside @hydra.main (tests, notebooks)
        return Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def _check_resume_tokenizer(resume: Path, tokenizer: Path) -> None:
    """Refuse to resume on another tokenizer than the interrupted run's (other data settings, or a token
    cache rebuilt under another rule): its weights would go on training on ids that mean other pieces."""
    payload = checkpoint_metadata(resume).get(PROJECT_KEY) or {}
    embedded = payload.get("tokenizer_model") if isinstance(payload, dict) else None
    if not embedded:
        return
    with tempfile.TemporaryDirectory() as folder:
        own = Path(folder) / "tokenizer.model"
        own.write_bytes(embedded)
        if not same_tokenizer(own, tokenizer):
            raise ConfigError(f"resume={resume} was trained with another tokenizer than this run's {tokenizer}; resume "
                              "with the interrupted run's init= and data settings (the same corpus and data.tokenizer).")


def _saved_recipe(checkpoint: Path) -> dict[str, Any] | None:
    """The optimizer recipe a training checkpoint (a file or a sharded folder) was trained with."""
    return (checkpoint_metadata(checkpoint).get("hyper_parameters") or {}).get("optim")


def _is_multiprocess(trainer: DictConfig) -> bool:
    """Whether the run will start (or is one of) several processes."""
    return (trainer.devices not in (1, "1", [0]) or int(trainer.num_nodes) > 1
            or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def _load_init(init: str) -> Pretrained:
    if (Path(init) / "meta.pt").is_file():
        raise ConfigError(f"init={init} is a sharded (FSDP) checkpoint; resume it with resume={init}, or make one "
                          f"file first: python -m training.consolidate {init} OUT.ckpt")
    try:
        return load_pretrained(init, dtype=torch.float32)  # float32 master weights; autocast makes the bf16 copies
    except CheckpointError as error:
        raise ConfigError(str(error)) from None


def _load_weights(task: CausalLMTask, pretrained: Pretrained) -> None:
    """Copy pretrained weights in; a position table the base did not have starts fresh (and is said so)."""
    state = dict(pretrained.state_dict)
    own = task.model.state_dict()
    fresh = sorted(k for k in own if k.startswith("position.") and k not in state)
    dropped = sorted(k for k in state if k.startswith("position.") and k not in own)
    for key in dropped:
        state.pop(key)
    if fresh or dropped:
        log.warning("position encoding changed from %s to %s: new %s, dropped %s",
                    pretrained.position.get("kind"), task.position_config["kind"], fresh or "-", dropped or "-")
    for key in fresh:  # the model sits on the meta device: give new tables the model's own init
        state[key] = torch.empty(own[key].shape).normal_(std=0.02)
    try:
        load_into(task.model, state, strict=True)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None


class PeriodicLastCheckpoint(ModelCheckpoint):
    """last.ckpt every N optimizer steps, except at max_steps, which `train` writes itself after fit.

    At a step followed by a validation the save waits for that validation's end (Lightning's own deferral),
    after the best-model callback has taken its result: Lightning does not validate again at the step it
    resumes from, so a last.ckpt written before the validation would resume without it, and best.ckpt
    could later be replaced by a worse model. At max_steps the write after fit holds the final validation
    (saving here too would repeat the whole state: tens of GB for a 7B model). No version counter: a
    last.ckpt already there (a SIGTERM save, the run being resumed) is replaced, not kept beside a
    new last-v1.ckpt.
    """

    def __init__(self, *, validate_every: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validate_every = validate_every  # optimizer steps between validations
        self._last_step_seen: int | None = None
        self._deferred_at: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_step_seen = trainer.global_step  # 0, or the step a resumed run starts from

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        # Only a batch that made an optimizer step: with gradient accumulation the other micro-batches see the
        # step before them (after a resume, the checkpoint's own, which a save here would overwrite mid-step).
        if step == self._last_step_seen:
            return
        self._last_step_seen = step
        if step >= trainer.max_steps:
            return
        if self._every_n_train_steps >= 1 and step % self._every_n_train_steps == 0 and self._validates_at(trainer, step):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves it
            self._deferred_at = step
            return
        super().on_train_batch_end(trainer, *args, **kwargs)

    def _validates_at(self, trainer: L.Trainer, step: int) -> bool:
        """Whether a validation runs right after this optimizer step. Where it cannot tell (Lightning has not counted
        the validation batches): no, and the save is not deferred; an empty validation split would lose them all."""
        counted = trainer.num_val_batches  # Lightning counts them before the first training batch
        return bool(trainer.enable_validation and step % self.validate_every == 0 and counted and sum(counted) > 0)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._defer_save_until_validation and self._deferred_at != trainer.global_step:
            self._defer_save_until_validation = False  # its validation never came: a later one must not write it
        super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # Lightning's "save last if it never saved": train() writes the final one after fit


def _trainer(
    trainer_cfg: dict[str, Any],
    levers: dict[str, Any],
    task: CausalLMTask,
    run_dir: Path,
    max_steps: int,
    seq_len: int,
    batch_size: int,
    cfg: DictConfig,
) -> L.Trainer:
    checkpoints = run_dir / "checkpoints"
    best = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                           auto_insert_metric_name=False)
    val_every = min(int(trainer_cfg.pop("val_check_interval")), max_steps)  # in optimizer steps
    # last.ckpt every N steps (after the optimizer step, so a resume repeats nothing), or at each
    # validation step when N is 0: Lightning 2.6 writes "last" at a validation only when the same
    # callback also wrote a top-k file there, so a save_top_k=0 callback must be given the steps.
    # Writes are atomic, so a crash mid-write keeps the previous one.
    every = levers["checkpoint_every_n_steps"] or val_every
    last = PeriodicLastCheckpoint(dirpath=checkpoints, save_top_k=0, save_last=True, every_n_train_steps=every,
                                  enable_version_counter=False, validate_every=val_every)
    peak = levers["peak_tflops"] * 1e12 if levers["peak_tflops"] else None
    if peak is None and trainer_cfg["accelerator"] in ("gpu", "cuda") and torch.cuda.is_available():
        peak = measured_matmul_peak(torch.device("cuda"))
        log.info("MFU denominator: measured bf16 matmul peak %.0f TFLOP/s", peak / 1e12)
    tokens_per_step = seq_len * batch_size * int(trainer_cfg.get("accumulate_grad_batches", 1))
    callbacks: list[L.Callback] = [
        best,  # first: trainer.checkpoint_callback, whose best_model_path the summary reports
        last,
        FaultTolerance(checkpoints / "last.ckpt"),
        Throughput(tokens_per_step, task.flops_per_token(seq_len), peak, every=int(trainer_cfg["log_every_n_steps"])),
    ]
    if cfg.eval.every_n_steps:
        from evaluation.callback import ExtensionEvalCallback  # noqa: PLC0415 (optional dependency on evaluation/)

        windows = list(cfg.eval.windows or sorted({task.args.max_seq_len, seq_len}))
        callbacks.append(ExtensionEvalCallback(every_n_steps=int(cfg.eval.every_n_steps), windows=windows,
                                               max_documents=int(cfg.eval.max_documents),
                                               max_tokens_per_document=cfg.eval.max_tokens_per_document,
                                               passkey_trials=int(cfg.eval.passkey_trials),
                                               batch_size=int(cfg.eval.batch_size),
                                               passkey_window=seq_len,  # the window being trained
                                               out_path=run_dir / "eval_by_step.json"))
    resumed_at = checkpoint_step(cfg.resume) if cfg.resume is not None else None
    # Flushed every logging interval, so a killed run loses at most that many rows.
    loggers: list[Any] = [ResumingCSVLogger(run_dir, name="logs", version="", keep_before_step=resumed_at,
                                            flush_logs_every_n_steps=int(trainer_cfg["log_every_n_steps"]))]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(run_dir / "logs", name="tensorboard", version=""))
    strategy = build_strategy(trainer_cfg.pop("strategy"))
    return L.Trainer(
        **trainer_cfg,
        strategy=strategy,
        max_steps=max_steps,
        # Lightning counts this in batches; with gradient accumulation a step is several of them.
        val_check_interval=val_every * int(trainer_cfg.get("accumulate_grad_batches", 1)),
        check_val_every_n_epoch=None,  # validate by steps, across epoch boundaries
        callbacks=callbacks,
        logger=loggers,
        plugins=[AtomicCheckpointIO()] if strategy in ("auto", "ddp") else None,
        # The DataModule's ResumableSampler shards the data itself (and resumes mid-epoch).
        use_distributed_sampler=False,
        default_root_dir=run_dir,
    )


# ----------------------------------------------------------------------------- the bundled base


def _cache_dir(cfg: DictConfig) -> Path:
    root = cfg.data.get("cache_dir") or os.environ.get("PI_LLAMA_CACHE") or Path.home() / ".cache" / "pi_llama"
    return Path(root)


def _base_key(cfg: DictConfig) -> str:
    """The bundled base is identified by the model shape, the data, the pretraining recipe and the seed:
    a pretrain with other steps or another lr registers a base of its own instead of replacing the one
    that fine-tunes without init= start from.

    The data are its settings and its corpus as the token cache knows it (the bundled file's hash, a
    text_dir's or jsonl's file sizes and times): a corpus edited in place gets a base of its own, since
    the old one may have trained on documents that now fall in the validation or test split.
    """
    # hf_revision is left to the corpus identity, which holds it when set: bases registered before the key
    # existed keep their names.
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
            if k not in ("batch_size", "eval_batch_size", "num_workers", "cache_dir", "hf_revision")}
    d = cfg.data
    data["corpus"] = source_identity(d.source, d.get("path"), d.get("text_field", "text"), d.get("hf_name"),
                                     d.get("hf_config"), d.get("hf_revision"))
    if data.get("passkey_share"):  # a new prompt recipe is new training data (recipe 5: keys apart from the evaluation's)
        data["passkey_recipe"] = PASSKEY_RECIPE
    recipe = {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items() if k not in ("finetune", "fused")}
    blob = json.dumps({"model": OmegaConf.to_container(cfg.model, resolve=True), "data": data, "optim": recipe,
                       "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def base_path(cfg: DictConfig) -> Path:
    return _cache_dir(cfg) / "base" / f"base-{_base_key(cfg)}.ckpt"


def _is_default_base(cfg: DictConfig) -> bool:
    return cfg.position.kind == "rope" and float(cfg.scale) == 1 and cfg.seq_len in (None, cfg.model.max_seq_len)


def _register_base(cfg: DictConfig, checkpoint: Path) -> None:
    target = base_path(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    if checkpoint.is_dir():  # a sharded (trainer=fsdp) checkpoint: the base is its one-file form
        from .consolidate import consolidate

        consolidate(checkpoint, target, force=True)
    else:
        with open(checkpoint, "rb") as source:  # a rank of another node may register it too: a file of its own
            atomic_write(target, lambda handle: shutil.copyfileobj(source, handle))
    log.info("registered as the bundled base for this model, data, pretraining recipe and seed: %s (fine-tunes with "
             "init=null and the same ones start here)", target)


def bundled_base(cfg: DictConfig, run_dir: Path) -> Path:
    """The cached base for cfg's model and data; pretrained first (same model, data and seed) if missing."""
    path = base_path(cfg)
    if path.exists():
        log.info("fine-tuning the bundled base %s (pass init=... to start from another checkpoint)", path)
        return path
    log.warning("no bundled base at %s yet: pretraining it first at the base window "
                "(the same as running `python train.py` with this model and data); it is cached for later runs", path)
    base_cfg = cfg.copy()
    with open_dict(base_cfg):
        base_cfg.stage = "pretrain"
        base_cfg.scale = 1.0
        base_cfg.seq_len = None
        base_cfg.position = {"kind": "rope", "scale": 1.0, "theta": None}
        base_cfg.init = None
        base_cfg.resume = None
        base_cfg.register_base = True
        base_cfg.eval.every_n_steps = 0
        base_cfg.run_dir = str(run_dir / "base_pretrain")
    train(base_cfg)
    if not path.exists():
        raise ConfigError(f"pretraining the bundled base did not produce {path}; run `python train.py` and check its log.")
    return path
