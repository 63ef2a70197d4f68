"""Training throughput and peak memory on one GPU: the project's Lightning path vs HF transformers.

Issue 6's table, in one process: for each shape and window, HF's LlamaForCausalLM (sdpa, fp32
weights, bf16 autocast, fused AdamW, its own loss) and the project through the Trainer that
train.py builds (CausalLMTask, the composed `trainer=gpu` config: bf16-mixed, activation
checkpointing, chunked loss, gradient clipping, fused AdamW), on the same random tokens. Then a bare
loop of the same model and optimizer (the Trainer's overhead), the longest window the 1.1B shape
trains at, and one full PI fine-tuning step of the LLaMA-7B shape at 16384 tokens.

    python bench/gpu_train_throughput.py                      # the whole table (about 5 minutes on an H200)
    python bench/gpu_train_throughput.py --suite compile      # the same model with trainer.compile=true
    python bench/gpu_train_throughput.py --only 1b-8k-on,7b-pi-16k
    python bench/gpu_train_throughput.py --quick              # tiny shapes, CPU allowed (a smoke test)

tokens/s is timed over the steps after warm-up, with a device sync only at the two ends of that
window; peak memory is torch.cuda.max_memory_allocated from just before the first step (weights,
gradients, AdamW state and activations). MFU is PaLM's formula (appendix B), 6N + 12*L*H*Q*T FLOPs
per token (N the non-embedding parameters, output head included; L layers, H heads, Q head size,
T the window), against a bf16 matmul peak measured here; recomputation is not counted. With OUT
set, the table is (re)written to $OUT/<--md> after every row, with the numbers in a .json beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import inspect
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from model import ModelArgs  # noqa: E402
from model.args import PRESETS  # noqa: E402
from model.hf import to_hf_config  # noqa: E402
from training.callbacks import Throughput, measured_matmul_peak  # noqa: E402
from training.config import PROJECT_TRAINER_KEYS  # noqa: E402
from training.loss import next_token_nll  # noqa: E402
from training.memory import apply_activation_checkpointing, compile_blocks  # noqa: E402
from training.module import CausalLMTask  # noqa: E402

GIB = 2**30
ISSUE_PEAK_TFLOPS = 804.0  # the issue's bf16 8192^3 matmul on its H200

# The issue's HF baseline (one H200, torch 2.11, transformers 5.x): (tokens/s, peak GiB) by case key.
ISSUE_HF = {
    "1b-8k-off": (38_230, 35.4),
    "1b-8k-on": (30_044, 18.3),
    "1b-32k-on": (18_790, 30.4),
    "7b-8k-on": (7_133, 101.9),
}


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One shape at one window; `impls` are the rows measured for it, HF first."""

    key: str
    label: str
    args: ModelArgs
    seq: int
    batch: int
    ckpt: str  # the project's activation checkpointing (HF: on unless "none")
    warmup: int
    timed: int
    impls: tuple[str, ...]

    @property
    def position(self) -> dict[str, Any]:
        """PI from the shape's base window to this window (plain RoPE when it is not longer)."""
        scale = self.seq / self.args.max_seq_len
        return {"kind": "pi", "scale": scale} if scale > 1 else {"kind": "rope"}

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.batch


@dataclass(frozen=True)
class Impl:
    """How a row runs: HF, a bare loop, or the Trainer path with some levers changed from the case's."""

    label: str
    ckpt: str | None = None  # None: the case's activation checkpointing
    compile: bool = False  # trainer.compile=true: torch.compile per block
    progress_bar: bool | None = None  # None: as conf/trainer says
    step_check: bool = True  # False: CausalLMTask's non-finite loss check is skipped


IMPLS: dict[str, Impl] = {
    "hf": Impl("hf"),
    "bare": Impl("project bare loop"),
    "project": Impl("project"),
    "project-mlp": Impl("project ckpt=mlp", ckpt="mlp"),
    "project-nobar": Impl("project no progress bar", progress_bar=False),
    "project-nosync": Impl("project no non-finite check", progress_bar=False, step_check=False),
    "project-compile": Impl("project compile", compile=True),
    "project-compile-mlp": Impl("project compile ckpt=mlp", ckpt="mlp", compile=True),
}


class UncheckedTask(CausalLMTask):
    """CausalLMTask without its non-finite loss check, to price it: the host check reads the loss every
    step (a sync); with fused AdamW (CUDA) the check runs on the device and syncs once per log interval."""

    def _any_rank_nonfinite(self, loss: torch.Tensor) -> bool:
        return False

    def _flag_nonfinite_on_device(self, loss: torch.Tensor) -> torch.Tensor:
        return torch.ones((), dtype=torch.bool, device=loss.device)


def main_cases(quick: bool) -> list[Case]:
    """The issue's table; --quick swaps in tiny shapes and windows with the same structure."""
    if quick:
        small = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_dim=128, max_seq_len=32)
        large = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=256, ffn_dim=256, max_seq_len=32)
        s8, s32, l8, l16, steps, long_steps = 64, 128, 64, 128, (1, 2), (1, 1)
    else:
        small, large = PRESETS["tinyllama-1.1b"], PRESETS["llama2-7b"]
        s8, s32, l8, l16, steps, long_steps = 8192, 32768, 8192, 16384, (3, 5), (2, 3)
    name_s, name_l = ("tiny", "tiny-mha") if quick else ("1.1B", "7B")
    return [
        Case("1b-8k-off", f"{name_s} {s8}x1 ckpt=off", small, s8, 1, "none", *steps, ("hf", "project")),
        Case("1b-8k-on", f"{name_s} {s8}x1 ckpt=on", small, s8, 1, "full", *steps,
             ("hf", "project", "bare", "project-nobar", "project-nosync", "project-mlp")),
        Case("1b-32k-on", f"{name_s} {s32}x1 ckpt=on", small, s32, 1, "full", *long_steps, ("hf", "project")),
        Case("7b-8k-on", f"{name_l} {l8}x1 ckpt=on", large, l8, 1, "full", *long_steps, ("hf", "project")),
        Case("7b-pi-16k", f"{name_l} PI {l16}x1 ckpt=on (full fine-tuning step)", large, l16, 1, "full", 1, 1,
             ("project",)),
    ]


def window_cases(quick: bool, windows: list[int]) -> list[Case]:
    """The 1.1B shape at growing windows, project only: one warm-up step, one timed step each."""
    args = main_cases(quick)[0].args
    name = "tiny" if quick else "1.1B"
    return [Case(f"1b-window-{w}", f"{name} {w}x1 ckpt=on (window probe)", args, w, 1, "full", 1, 1, ("project",))
            for w in windows]


def compile_cases(quick: bool) -> list[Case]:
    """torch.compile per block (trainer.compile=true) at 8192, each against HF in the same process.

    Ordered by what the goals need first; each case compiles anew (about a minute on an H100).
    """
    off, on = main_cases(quick)[:2]
    warmup = 3  # the first steps compile (forward and backward graphs)
    return [
        dataclasses.replace(on, key="1b-8k-on-compile", warmup=warmup, impls=("hf", "project-compile")),
        dataclasses.replace(off, key="1b-8k-off-compile", warmup=warmup, impls=("hf", "project-compile")),
        dataclasses.replace(on, key="1b-8k-mlp-compile", warmup=warmup, impls=("hf", "project-compile-mlp")),
    ]


# ----------------------------------------------------------------------------- setup


@dataclass
class Setup:
    device: torch.device
    peak_flops: float | None
    trainer_cfg: dict[str, Any]  # the composed trainer group, Lightning arguments only
    levers: dict[str, Any]  # activation_checkpointing, compile, loss_chunk_tokens, peak_tflops
    optim: dict[str, Any]  # the fine-tuning recipe, as train() hands it to CausalLMTask

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp(self) -> contextlib.AbstractContextManager:
        """The autocast the bf16-mixed Trainer uses around the forward (none on CPU: trainer=cpu is 32-true)."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()


def compose_setup(device: torch.device, quick: bool) -> Setup:
    """The project's own config (conf/), composed as train.py composes it, for the trainer and the recipe."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = ["trainer=gpu" if device.type == "cuda" else "trainer=cpu"]
    if quick:
        overrides.append("trainer.loss_chunk_tokens=48")  # the tiny windows still run the chunked loss
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    levers = {key: trainer_cfg.pop(key) for key in PROJECT_TRAINER_KEYS}
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    recipe = {**{k: v for k, v in optim.items() if k not in ("pretrain", "finetune")}, **optim["finetune"]}
    peak = None
    if device.type == "cuda":
        peak = levers["peak_tflops"] * 1e12 if levers["peak_tflops"] else measured_matmul_peak(device)
    return Setup(device, peak, trainer_cfg, levers, recipe)


def sync(setup: Setup) -> None:
    if setup.cuda:
        torch.cuda.synchronize(setup.device)


def release(setup: Setup) -> None:
    """Free everything the last run left: its objects are out of scope, so collect and empty the cache."""
    gc.collect()
    if setup.cuda:
        torch.cuda.synchronize(setup.device)
        torch.cuda.empty_cache()


def reset_peak(setup: Setup) -> None:
    if setup.cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)  # allocated and reserved


def peak_gib(setup: Setup) -> float | None:
    return torch.cuda.max_memory_allocated(setup.device) / GIB if setup.cuda else None


def fast_sdpa(setup: Setup) -> contextlib.AbstractContextManager:
    """On GPU the project runs with SDPA's math backend switched off: a fallback fails loudly, not slowly."""
    if not setup.cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


class RandomTokens(Dataset):
    """Windows of seq + 1 uniform random token ids; item i is the same for every impl."""

    def __init__(self, windows: int, seq: int, vocab_size: int) -> None:
        self.windows, self.seq, self.vocab_size = windows, seq, vocab_size

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(index)
        return torch.randint(0, self.vocab_size, (self.seq + 1,), generator=generator)


def loader(case: Case, setup: Setup) -> DataLoader:
    """Exactly warmup + timed batches; pinned on GPU like the project's DataModule."""
    steps = case.warmup + case.timed
    dataset = RandomTokens(steps * case.batch, case.seq, case.args.vocab_size)
    return DataLoader(dataset, batch_size=case.batch, num_workers=0, pin_memory=setup.cuda, drop_last=True)


def flops_per_token(case: Case) -> float:
    """The project's own count (CausalLMTask.flops_per_token), from a model built on the meta device."""
    task = CausalLMTask(case.args.to_dict(), case.position, {}, weights_follow=True)
    return task.flops_per_token(case.seq)


# ----------------------------------------------------------------------------- runs


@dataclass
class Measured:
    tokens_per_s: float
    peak_gib: float | None
    note: str = ""


class TimedLoop:
    """Times steps warmup+1 .. warmup+timed of any loop: call `after_step(k)` after step k (1-based)."""

    def __init__(self, warmup: int, timed: int, setup: Setup) -> None:
        if warmup < 1 or timed < 1:
            raise ValueError(f"need at least one warm-up and one timed step, got warmup={warmup}, timed={timed}.")
        self.warmup, self.timed, self.setup = warmup, timed, setup
        self.start: float | None = None
        self.seconds: float | None = None

    def after_step(self, step: int) -> None:
        if step == self.warmup:
            sync(self.setup)
            self.start = time.perf_counter()
        elif step == self.warmup + self.timed:
            sync(self.setup)
            self.seconds = time.perf_counter() - self.start

    def tokens_per_s(self, tokens_per_step: int) -> float:
        if self.seconds is None:
            raise RuntimeError("the timed steps did not all run")
        return self.timed * tokens_per_step / self.seconds


class StepWindow(L.Callback):
    """The TimedLoop inside the Trainer; at the end it drops the GPU state so that Lightning's
    teardown does not copy weights and AdamW moments to the CPU (84 GiB for the 7B shape)."""

    def __init__(self, timer: TimedLoop) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.timer.after_step(trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        for param in pl_module.parameters():
            param.grad = None
            param.data = torch.empty(0, device=param.device, dtype=param.dtype)


def build_task(case: Case, setup: Setup, ckpt: str, compile_: bool, step_check: bool = True) -> CausalLMTask:
    """CausalLMTask as train() builds it, on the device directly, with the project's levers applied."""
    task_class = CausalLMTask if step_check else UncheckedTask
    # The trainer-group levers that CausalLMTask takes as arguments (loss_chunk_tokens, ...), as train() passes them.
    accepted = inspect.signature(CausalLMTask.__init__).parameters
    levers = {key: value for key, value in setup.levers.items() if key in accepted}
    with setup.device:
        task = task_class(model_args=case.args.to_dict(), position=case.position, optim=setup.optim, **levers)
    apply_activation_checkpointing(task.model, ckpt)
    if compile_:
        compile_blocks(task.model)
    return task


def run_lightning(case: Case, setup: Setup, impl: Impl) -> Measured:
    """The Trainer train.py builds (training/run.py `_trainer`), minus checkpoint files and validation."""
    from lightning.pytorch.loggers import CSVLogger

    task = build_task(case, setup, impl.ckpt or case.ckpt, impl.compile, impl.step_check)
    timer = TimedLoop(case.warmup, case.timed, setup)
    steps = case.warmup + case.timed
    # The project's Throughput callback, timing steps 2..steps, so that perf/mfu is logged as in train().
    throughput = Throughput(case.tokens_per_step, task.flops_per_token(case.seq), setup.peak_flops, every=max(1, steps - 1))
    kwargs = dict(setup.trainer_cfg)
    strategy = kwargs.pop("strategy")
    kwargs.pop("val_check_interval")
    kwargs.update(limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False)
    if impl.progress_bar is not None:
        kwargs["enable_progress_bar"] = impl.progress_bar
    with tempfile.TemporaryDirectory(prefix="bench-") as run_dir:
        trainer = L.Trainer(
            **kwargs,
            strategy=strategy,
            max_steps=steps,
            callbacks=[throughput, StepWindow(timer)],
            logger=CSVLogger(run_dir, name="logs", version=""),
            default_root_dir=run_dir,
        )
        reset_peak(setup)
        with fast_sdpa(setup):
            trainer.fit(task, train_dataloaders=loader(case, setup))
    mfu = throughput.last.get("perf/mfu")
    note = f"Lightning perf/mfu {mfu:.3f}" if mfu is not None else ""
    return Measured(timer.tokens_per_s(case.tokens_per_step), peak_gib(setup), note)


def run_bare(case: Case, setup: Setup) -> Measured:
    """The same model, optimizer, schedule, clipping and autocast as the Trainer path, in a plain loop."""
    task = build_task(case, setup, case.ckpt, False)
    task.to(setup.device)  # so CausalLMTask picks fused AdamW exactly as under the Trainer
    steps = case.warmup + case.timed
    task.trainer = _MaxSteps(steps)  # configure_optimizers reads trainer.max_steps, nothing else
    configured = task.configure_optimizers()
    task.trainer = None
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    params = [p for p in task.parameters() if p.requires_grad]
    clip = setup.trainer_cfg.get("gradient_clip_val")
    timer = TimedLoop(case.warmup, case.timed, setup)
    reset_peak(setup)
    with fast_sdpa(setup):
        for step, batch in enumerate(loader(case, setup), start=1):
            batch = batch.to(setup.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with setup.amp:
                hidden = task.model.hidden_states(batch[:, :-1])
                nll = next_token_nll(hidden, task.model.output.weight, batch[:, 1:], task.loss_chunk_tokens)
                loss = nll / batch[:, 1:].numel()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            scheduler.step()
            timer.after_step(step)
    return Measured(timer.tokens_per_s(case.tokens_per_step), peak_gib(setup))


@dataclass
class _MaxSteps:
    max_steps: int


def run_hf(case: Case, setup: Setup) -> Measured:
    """HF's LlamaForCausalLM: sdpa, fp32 weights, bf16 autocast, fused AdamW, its own loss via labels."""
    import transformers

    config = transformers.LlamaConfig(**to_hf_config(case.args, case.position), attn_implementation="sdpa",
                                      use_cache=False)
    with setup.device:
        model = transformers.LlamaForCausalLM(config)
    model.to(dtype=torch.float32).train()
    note = ""
    if case.ckpt != "none":
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.2x renamed gradient_checkpointing_enable
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        note = "HF activation checkpointing per layer"
    recipe = setup.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], betas=tuple(recipe["betas"]), eps=recipe["eps"],
                                  weight_decay=recipe["weight_decay"], fused=setup.cuda)
    timer = TimedLoop(case.warmup, case.timed, setup)
    reset_peak(setup)
    for step, batch in enumerate(loader(case, setup), start=1):
        inputs = batch[:, :-1].to(setup.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with setup.amp:
            loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        timer.after_step(step)
    return Measured(timer.tokens_per_s(case.tokens_per_step), peak_gib(setup), note)


def run_impl(impl: str, case: Case, setup: Setup) -> Measured:
    if impl == "hf":
        return run_hf(case, setup)
    if impl == "bare":
        return run_bare(case, setup)
    return run_lightning(case, setup, IMPLS[impl])


# ----------------------------------------------------------------------------- the table


@dataclass
class Row:
    case: str
    label: str
    impl: str
    seq: int
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    speed_vs_hf: float | None = None
    memory_vs_hf: float | None = None
    reserved_gib: float | None = None  # max_memory_reserved: allocated plus the allocator's cache and fragmentation
    seconds: float = 0.0
    status: str = "ok"  # ok | oom | error | skipped
    note: str = ""

    def markdown(self) -> str:
        def num(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        status = "" if self.status == "ok" else f"**{self.status.upper()}** "
        return (f"| {self.label} | {IMPLS[self.impl].label} | {num(self.tokens_per_s, ',.0f')} | {num(self.mfu, '.1%')} | "
                f"{num(self.peak_gib, '.1f')} | {num(self.speed_vs_hf, '.2f')} | {num(self.memory_vs_hf, '.2f')} | "
                f"{status}{self.note} |")


HEADER = ("| config | impl | tokens/s | MFU | peak GiB | x HF tokens/s | x HF peak | note |\n"
          "|---|---|---|---|---|---|---|---|")


@dataclass
class Report:
    header: list[str]
    out_path: Path | None
    rows: list[Row] = field(default_factory=list)
    goals: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(row.markdown(), flush=True)
        self.write()

    def markdown(self) -> str:
        lines = [*self.header, "", HEADER, *(row.markdown() for row in self.rows)]
        if self.goals:
            lines += ["", "Issue 6 goals:", *(f"- {goal}" for goal in self.goals)]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.out_path is None:
            return
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.out_path.write_text(self.markdown())
        self.out_path.with_suffix(".json").write_text(json.dumps(
            {"header": self.header, "rows": [dataclasses.asdict(row) for row in self.rows], "goals": self.goals}, indent=2))


def measure(case: Case, impl: str, setup: Setup, fpt: float, hf: Row | None) -> Row:
    """One row; an OOM or any other failure becomes a row too, and the GPU is freed either way."""
    row = Row(case.key, case.label, impl, case.seq)
    started = time.perf_counter()
    try:
        result = run_impl(impl, case, setup)
        row.tokens_per_s, row.peak_gib, row.note = result.tokens_per_s, result.peak_gib, result.note
        if setup.peak_flops:
            row.mfu = result.tokens_per_s * fpt / setup.peak_flops
        if hf is not None and hf.status == "ok" and impl != "hf":
            row.speed_vs_hf = row.tokens_per_s / hf.tokens_per_s
            if row.peak_gib is not None and hf.peak_gib:
                row.memory_vs_hf = row.peak_gib / hf.peak_gib
    except Exception as error:  # noqa: BLE001 (a one-shot run on a lent GPU: record it and go on)
        if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error):
            row.status, row.peak_gib = "oom", peak_gib(setup)
            row.note = f"out of memory (peak before the failure {row.peak_gib:.1f} GiB)" if row.peak_gib else "out of memory"
        else:
            traceback.print_exc()
            first_line = str(error).splitlines()[0][:160] if str(error) else ""
            row.status, row.note = "error", f"{type(error).__name__}: {first_line}"
    row.seconds = time.perf_counter() - started
    if setup.cuda:
        row.reserved_gib = torch.cuda.max_memory_reserved(setup.device) / GIB
    release(setup)
    return row


def run_cases(cases: list[Case], setup: Setup, report: Report, deadline: float) -> None:
    for case in cases:
        fpt = flops_per_token(case)
        hf: Row | None = None
        for impl in case.impls:
            if time.perf_counter() > deadline:
                report.add(Row(case.key, case.label, impl, case.seq, status="skipped", note="time budget spent"))
                continue
            row = measure(case, impl, setup, fpt, hf)
            if impl == "hf":
                hf = row
            report.add(row)


def run_window_probe(cases: list[Case], setup: Setup, report: Report, deadline: float) -> None:
    """Growing windows until the first OOM; a window whose predicted time overruns the budget is skipped."""
    last_seconds, last_seq = None, None
    for case in cases:
        if last_seconds is not None:
            predicted = last_seconds * (case.seq / last_seq) ** 2  # attention dominates at these windows
            if time.perf_counter() + predicted > deadline:
                report.add(Row(case.key, case.label, "project", case.seq, status="skipped",
                               note=f"predicted {predicted:.0f} s overruns the time budget"))
                return
        row = measure(case, "project", setup, flops_per_token(case), None)
        report.add(row)
        if row.status != "ok":
            return
        last_seconds, last_seq = row.seconds, case.seq


def goals(report: Report, windows: list[int]) -> list[str]:
    """Each goal of issue 6 that this run measured, with its number and PASS or MISS."""
    by = {(row.case, row.impl): row for row in report.rows}
    found: list[str] = []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    for key, impl, target, what in [("1b-8k-on", "project", 1.3, "ckpt on (full)"),
                                    ("1b-8k-on", "project-mlp", 1.3, "ckpt on (mlp)"),
                                    ("1b-8k-on-compile", "project-compile", 1.3, "ckpt on (full), compiled"),
                                    ("1b-8k-mlp-compile", "project-compile-mlp", 1.3, "ckpt on (mlp), compiled"),
                                    ("1b-8k-off", "project", 1.2, "ckpt off"),
                                    ("1b-8k-off-compile", "project-compile", 1.2, "ckpt off, compiled")]:
        row = by.get((key, impl))
        if row is not None and row.speed_vs_hf is not None:
            found.append(f"tokens/s at {row.seq}, {what}: {row.speed_vs_hf:.2f}x HF (goal >= {target}x): "
                         f"{verdict(row.speed_vs_hf >= target)}")
    row = by.get(("1b-32k-on", "project"))
    if row is not None and row.memory_vs_hf is not None:
        found.append(f"peak memory at {row.seq}: {row.memory_vs_hf:.2f}x HF (goal <= 0.8x): "
                     f"{verdict(row.memory_vs_hf <= 0.8)}")
    probe = [row for row in report.rows if row.case.startswith("1b-window-") and row.status != "skipped"]
    if probe:
        longest = max((row.seq for row in probe if row.status == "ok"), default=0)
        target = max(windows)
        found.append(f"longest 1.1B window that trained: {longest or 'none'} (goal {target}): {verdict(longest >= target)}")
    row = by.get(("7b-pi-16k", "project"))
    if row is not None and row.status != "skipped":
        peak = f", {row.peak_gib:.1f} GiB peak" if row.peak_gib is not None else ""
        found.append(f"7B full PI fine-tuning step at {row.seq}: {row.status}{peak}: {verdict(row.status == 'ok')}")
    bare, trained = by.get(("1b-8k-on", "bare")), by.get(("1b-8k-on", "project"))
    if bare is not None and trained is not None and bare.status == trained.status == "ok":
        overhead = 1 - trained.tokens_per_s / bare.tokens_per_s
        found.append(f"Trainer overhead vs the bare loop at {bare.seq}: {overhead:+.1%} (goal <= 5%): "
                     f"{verdict(overhead <= 0.05)}")
        for impl, what in [("project-nobar", "without the progress bar"),
                           ("project-nosync", "without the progress bar and the non-finite check")]:
            row = by.get(("1b-8k-on", impl))
            if row is not None and row.status == "ok":
                found.append(f"  {what}: {1 - row.tokens_per_s / bare.tokens_per_s:+.1%}")
    found.append("MFU: PaLM's 6N + 12*L*H*Q*T per token against the measured bf16 matmul peak, in every row")
    return found


def header_lines(setup: Setup, suite: str, quick: bool) -> list[str]:
    import transformers

    if setup.cuda:
        props = torch.cuda.get_device_properties(setup.device)
        where = f"{props.name}, {props.total_memory / GIB:.1f} GiB, {props.multi_processor_count} SMs"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    peak = f"{setup.peak_flops / 1e12:.0f} TFLOP/s (issue: {ISSUE_PEAK_TFLOPS:.0f})" if setup.peak_flops else "n/a on CPU"
    adamw = "fused AdamW" if setup.cuda else "AdamW (foreach)"
    return [
        f"# Training throughput, project (Lightning) vs HF: suite={suite}{' --quick' if quick else ''}",
        "",
        f"- {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} on {where}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
        f"lightning {L.__version__}, python {platform.python_version()}",
        f"- PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}",
        f"- MFU = tokens/s x (6N + 12*L*H*Q*T) / measured bf16 8192^3 matmul peak = {peak}; "
        "N non-embedding parameters (output head included); PaLM appendix B; recomputation not counted",
        f"- project: trainer={'gpu' if setup.cuda else 'cpu'} ({setup.trainer_cfg['precision']}, "
        f"activation_checkpointing per row, loss_chunk_tokens={setup.levers['loss_chunk_tokens']}, "
        f"gradient_clip_val={setup.trainer_cfg.get('gradient_clip_val')}), optim.finetune recipe, {adamw}, "
        f"{'SDPA math backend disabled' if setup.cuda else 'SDPA unrestricted'}; PI with scale = window / base window",
        f"- hf: LlamaForCausalLM(attn_implementation='sdpa'), fp32 weights{' + bf16 autocast' if setup.cuda else ''}, "
        f"{adamw}, loss via labels, activation checkpointing (non-reentrant) when on, no gradient clipping",
        "- tokens/s over the timed steps after warm-up; peak = max_memory_allocated from the first step on",
        "- the issue's HF numbers (H200): "
        + ", ".join(f"{key} {tps:,} tok/s {gib} GiB" for key, (tps, gib) in ISSUE_HF.items()),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="main", choices=["main", "compile"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and windows (CPU allowed): a smoke test")
    parser.add_argument("--only", default="", help="comma-separated case keys (e.g. 1b-8k-on,7b-pi-16k,window)")
    parser.add_argument("--windows", default="", help="windows for the 1.1B probe (default 65536,131072; quick 128,256)")
    parser.add_argument("--budget-s", type=float, default=0, help="start no run after this many seconds (0: no limit)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (with --quick)")
    parser.add_argument("--md", default="bench.md", help="file name under $OUT for the table")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.quick:
        parser.error("the full table needs a CUDA GPU; use --quick for a CPU smoke test.")
    started = time.perf_counter()
    deadline = started + args.budget_s if args.budget_s > 0 else float("inf")
    torch.manual_seed(0)
    setup = compose_setup(device, args.quick)
    windows = [int(w) for w in args.windows.split(",") if w] or ([128, 256] if args.quick else [65536, 131072])
    only = {key for key in args.only.split(",") if key}

    def wanted(case: Case) -> bool:
        return not only or case.key in only or ("window" in only and case.key.startswith("1b-window-"))

    out = os.environ.get("OUT")
    report = Report(header_lines(setup, args.suite, args.quick), Path(out) / args.md if out else None)
    print("\n".join(report.header), "", HEADER, sep="\n", flush=True)
    if args.suite == "main":
        # The 7B comparison at 8192 is a baseline row, not a goal: it runs last, should the budget run short.
        cases = [c for c in main_cases(args.quick) if wanted(c)]
        run_cases([c for c in cases if c.key != "7b-8k-on"], setup, report, deadline)
        run_window_probe([c for c in window_cases(args.quick, windows) if wanted(c)], setup, report, deadline)
        run_cases([c for c in cases if c.key == "7b-8k-on"], setup, report, deadline)
    else:
        run_cases([c for c in compile_cases(args.quick) if wanted(c)], setup, report, deadline)
    report.goals = goals(report, windows)
    report.write()
    print(f"\n# done in {time.perf_counter() - started:.0f} s\n", flush=True)
    print(report.markdown(), flush=True)
    return 0 if all(row.status in ("ok", "oom", "skipped") for row in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
