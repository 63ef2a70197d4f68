"""The reproduction's stages: one RoPE base, its extensions to scale x L, and their evaluations.

Every training stage is a `training.run.train` call on a config composed from conf/ (the same
path as `python train.py ...`, whose overrides are logged), or, where stages run side by side
(budget.parallel_stages > 1), that `python train.py ...` command in a process of its own; every evaluation is an
`evaluation.run.evaluate` call (the same as `python evaluate.py ...`), made in this process as soon as
the runs it reads have finished, also while other stages still train in theirs. A finished stage is
reused when its settings are unchanged, and so is a finished evaluation, so an interrupted
reproduction picks up where it stopped; a stage cut midway continues from its last checkpoint.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("reproduce")

# The rows of the final tables: (name, run that holds the weights, position it is read with).
# None: the run's own encoding. The base rows read the RoPE base without any fine-tuning.
NO_FINE_TUNING = (
    ("RoPE (base), no fine-tuning", {"kind": "rope"}),
    ("PI, no fine-tuning", {"kind": "pi"}),
    ("NTK-aware, no fine-tuning", {"kind": "ntk"}),
    ("Dynamic NTK, no fine-tuning", {"kind": "dynamic"}),
    ("YaRN, no fine-tuning", {"kind": "yarn"}),
)


BASE_ROW = "RoPE (base)"  # the base read as trained (RoPE at L)
# The fine-tunes also read at their best validation step (early stopping; no verdict uses those rows).
BEST_ROW_STAGES = ("ft_long", "pi_long")
# PI scales below 2 for the passkey-inside-L rows: whole powers of two leave open how little compression
# breaks retrieval, and these resolve it where perplexity has barely moved.
SLIGHT_COMPRESSION = (1.05, 1.1, 1.25)


@dataclass
class Stage:
    """One training run of the reproduction."""

    name: str
    title: str
    overrides: list[str]
    seconds: float = 0.0
    reused: bool = False
    summary: dict[str, Any] = field(default_factory=dict)
    # When it ran, as (start, end) epoch seconds: one span, or one per part of a run that was cut and
    # continued (a cut part up to its last checkpoint, the work kept). Stages that ran at once overlap, and
    # the report's total counts their shared time once. Empty for a record written before this was kept.
    spans: list[tuple[float, float]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)  # the steps it was continued from, when it was cut

    @property
    def command(self) -> str:
        """The equivalent command line (the run_dir override is added by the pipeline)."""
        return "python train.py " + " ".join(_quote(o) for o in self.overrides)


def _quote(override: str) -> str:
    return f"'{override}'" if any(c in override for c in "[]{}, ") else override


STAGE_PLAN = "reproduce_stage.plan.json"  # written as a stage starts: the settings of the run in its folder


@dataclass
class PendingEvaluation:
    """An evaluation planned with the stages, made (by `Reproduction.run_stages`) once the stages it reads finished."""

    name: str
    needs: tuple[str, ...]  # the stages whose runs it reads
    run: Callable[[], Any]


class StageError(RuntimeError):
    """A training stage that ran in its own process (budget.parallel_stages > 1) failed."""


class Reproduction:
    """Runs the stages in work_dir and collects what the report needs."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg, self.budget = cfg, cfg.budget
        self.work = Path(str(cfg.work_dir))
        if isinstance(cfg.scale, bool) or not isinstance(cfg.scale, (int, float)) or not cfg.scale > 1:
            from training.config import ConfigError  # noqa: PLC0415

            # Checked before the first stage: the PI fine-tune would refuse scale 1 only after the base trained.
            raise ConfigError(f"scale={cfg.scale!r} must be a number > 1: the reproduction extends L to scale x L (e.g. scale=8).")
        self.scale = int(cfg.scale) if float(cfg.scale).is_integer() else float(cfg.scale)
        train_defaults = compose(config_name="config", overrides=[f"model={self.budget.model}"])
        self.window = int(self.budget.get("window") or train_defaults.model.max_seq_len)  # L
        self.long_window = round(self.window * float(cfg.scale))  # L'
        self.windows = sorted({self.window * 2**i for i in range(8) if self.window * 2**i < self.long_window} | {self.long_window})
        parallel = self.budget.get("parallel_stages", 1)
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            from training.config import ConfigError  # noqa: PLC0415

            raise ConfigError(f"budget.parallel_stages={parallel!r} must be a whole number >= 1 (1: one stage at a time, "
                              "in this process).")
        self.parallel_stages = parallel
        self.stages: dict[str, Stage] = {}
        self.finished: set[str] = set()  # stages whose run has finished (now or in an earlier call)
        self.evaluations: dict[str, tuple[float, bool]] = {}  # name -> (seconds it took when it ran, reused)
        # name -> when it ran (start, end), where its record kept that: evaluations overlap the fine-tunes
        self.evaluation_spans: dict[str, tuple[float, float]] = {}
        self.results: dict[str, dict[str, Any]] = {}  # name -> the evaluation's results.json

    # -- training ---------------------------------------------------------------------------

    def common(self) -> list[str]:
        b = self.budget
        overrides = [f"model={b.model}", f"trainer={b.trainer}", f"seed={self.cfg.seed}",
                     f"data.passkey_share={b.passkey_share}", "register_base=false",
                     "trainer.enable_progress_bar=false", *map(str, b.get("trainer_overrides") or [])]
        if b.get("window"):
            overrides.append(f"model.max_seq_len={self.window}")
        return overrides

    def pretrain(self) -> Stage:
        b = self.budget
        return self.run_stages([Stage("base", f"RoPE base at L = {self.window}", [
            *self.common(), "stage=pretrain", "position=rope", "scale=1",
            f"optim.pretrain.max_steps={b.pretrain_steps}", f"optim.pretrain.batch_size={b.pretrain_batch_size}",
            f"optim.pretrain.warmup_steps={min(30, b.pretrain_steps // 4)}",
            *self._pretrain_eval(),
        ])])[0]

    def _pretrain_eval(self) -> list[str]:
        """The by-step callback at L during pretraining, where the budget asks for it (not on CPU: the
        bundled CPU base was trained without it, and a new override would make it, and every fine-tune, stale)."""
        b = self.budget
        every = b.get("pretrain_eval_every_n_steps")
        if not every:
            return []
        return [f"eval.every_n_steps={every}", f"eval.windows=[{self.window}]", f"eval.max_documents={b.eval_documents}",
                f"eval.passkey_trials={b.eval_passkey_trials}", *self._eval_batch()]

    def _eval_batch(self) -> list[str]:
        """The by-step callback's windows per forward, where the budget sets it (written only then, so that the
        stages of a budget without it keep their overrides and stay reusable)."""
        size = self.budget.get("eval_batch_size")
        return [f"eval.batch_size={size}"] if size else []

    def finetune_stage(self, name: str, title: str, kind: str, steps: int, every: int, *extra: str) -> Stage:
        """A fine-tune of the base to L' with the paper's recipe, planned (`run_stages` runs it); `extra`
        overrides set an ablation apart."""
        b = self.budget
        return Stage(name, title, [
            *self.common(), "stage=finetune", f"init={self.checkpoint('base')}", f"position={kind}", f"scale={self.scale}",
            f"optim.finetune.max_steps={steps}", f"optim.finetune.batch_size={b.finetune_batch_size}",
            f"optim.finetune.lr={b.finetune_lr}",
            f"eval.every_n_steps={every}", f"eval.windows=[{','.join(map(str, self.windows))}]",
            f"eval.max_documents={b.eval_documents}", f"eval.passkey_trials={b.eval_passkey_trials}",
            *self._eval_batch(), *extra,
        ])

    def finetune(self, name: str, title: str, kind: str, steps: int, every: int, *extra: str) -> Stage:
        """One fine-tune of the base to L', run now (or reused)."""
        return self.run_stages([self.finetune_stage(name, title, kind, steps, every, *extra)])[0]

    def finetune_stages(self) -> list[Stage]:
        """The paper's comparison: PI for N steps, direct fine-tuning for N and 10N steps, and (beyond the
        paper's design) PI for 10N steps, which tells a slower PI adaptation at this scale from a worse end point."""
        b = self.budget
        n, n_long = int(b.finetune_steps), int(b.long_finetune_steps)
        every, every_long = int(b.eval_every_n_steps), int(b.long_eval_every_n_steps)
        return [self.finetune_stage("pi", f"PI, {n} steps", "pi", n, every),
                self.finetune_stage("ft", f"FT (direct), {n} steps", "rope", n, every),
                self.finetune_stage("ft_long", f"FT (direct), {n_long} steps", "rope", n_long, every_long),
                self.finetune_stage("pi_long", f"PI, {n_long} steps", "pi", n_long, every_long)]

    def long_passkey_ablation_stages(self) -> list[Stage]:
        """Beyond the paper: the four fine-tunes again with passkey prompts up to L' (not L) in their data.

        The paper fine-tunes on PG-19 alone: LLaMA already retrieves at any distance in its window, so
        the test is whether PI keeps that skill usable over L'. A small base was trained to retrieve over
        at most L tokens; here PI and direct fine-tuning get the chance to learn retrieval over L', and
        the question becomes how fast each encoding does.
        """
        b = self.budget
        n, n_long = int(b.finetune_steps), int(b.long_finetune_steps)
        longer = f"data.passkey_max_tokens={self.long_window}"
        note = f"passkeys to L' = {self.long_window}"
        plan = [("pi_lpk", f"PI, {n} steps, {note}", "pi", n, int(b.eval_every_n_steps)),
                ("ft_lpk", f"FT (direct), {n} steps, {note}", "rope", n, int(b.eval_every_n_steps)),
                ("ft_lpk_long", f"FT (direct), {n_long} steps, {note}", "rope", n_long, int(b.long_eval_every_n_steps)),
                ("pi_lpk_long", f"PI, {n_long} steps, {note}", "pi", n_long, int(b.long_eval_every_n_steps))]
        return [self.finetune_stage(name, title, kind, steps, every, longer) for name, title, kind, steps, every in plan]

    def checkpoint(self, stage: str) -> Path:
        return self.work / "runs" / stage / "checkpoints" / "last.ckpt"

    def metrics_log(self, stage: str) -> Path:
        """The stage's Lightning CSV log (training and validation metrics by step)."""
        return self.work / "runs" / stage / "logs" / "metrics.csv"

    def run_stages(self, stages: list[Stage], then: Sequence[PendingEvaluation] = ()) -> list[Stage]:
        """Run the planned stages, reusing each one whose finished run in work_dir has the same settings, and
        make each evaluation in `then` as soon as the stages it reads have finished.

        With budget.parallel_stages > 1, stages that have to run go up to that many at once, each as its own
        `python train.py ...` process (the command the report gives): on a GPU, a small model's step is bound
        by host work, so several runs share one card at nearly the speed of one, and the evaluations use the
        card in this process meanwhile (once every stage has started: a free slot is never left idle for one).
        Otherwise they run one after the other in this process, each evaluation after the last stage it reads.
        Either way a stage's record is written only once it finished, and a failed evaluation is reported
        once the stages are done (their runs are kept for the next call).
        """
        for stage in stages:
            later = [other.name for other in stages if f"init={self.checkpoint(other.name)}" in stage.overrides]
            if later:  # a programming error, not a user's: one call's stages may run at once
                raise ValueError(f"stage {stage.name} starts from {later[0]}, planned in the same call; run that one first")
            self.stages[stage.name] = stage  # the report lists stages in planned order, however they finish
        unknown = [f"{e.name} reads {need}" for e in then for need in e.needs if need not in self.stages]
        if unknown:  # also a programming error: it would wait for a stage that never runs
            raise ValueError(f"evaluation {unknown[0]}, a stage not planned")
        pending = [stage for stage in stages if not self._reuse(stage)]
        waiting, errors = list(then), []
        # One stage left (a cut call's last) still gets a process of its own when there is evaluating to do meanwhile.
        if self.parallel_stages > 1 and (len(pending) > 1 or (pending and waiting)):
            errors = self._train_in_processes(pending, waiting)
        else:
            errors = self._evaluate_ready(waiting)
            for stage in pending:
                self._train_here(stage)
                errors += self._evaluate_ready(waiting)
        if errors:
            raise errors[0]
        if waiting:  # a programming error: an evaluation of a stage that neither ran nor failed
            raise ValueError(f"evaluation {waiting[0].name} never ran: not all of {', '.join(waiting[0].needs)} finished")
        return stages

    def _next_ready(self, waiting: list[PendingEvaluation]) -> PendingEvaluation | None:
        """The first waiting evaluation whose stages have all finished, taken off the list."""
        for evaluation in waiting:
            if self.finished.issuperset(evaluation.needs):
                waiting.remove(evaluation)
                return evaluation
        return None

    def _evaluate_ready(self, waiting: list[PendingEvaluation]) -> list[Exception]:
        """Every waiting evaluation whose stages have finished; the errors of those that failed."""
        errors = []
        while (evaluation := self._next_ready(waiting)) is not None:
            error = _evaluate(evaluation)
            errors += [error] if error else []
        return errors

    def run_dir(self, stage: str) -> Path:
        return self.work / "runs" / stage

    def _inputs(self, stage: Stage) -> dict[str, str]:
        """What a stage depends on beyond its overrides: a fine-tune on the base run (a new base makes it
        stale), every stage on the training data (same settings over new data, e.g. a new passkey recipe) and
        on what its overrides compose to (an edited conf/optim/adamw.yaml or model shape, not only another
        override). The training code is not compared: retraining after every edit would cost far more."""
        inputs = {name: self._fingerprint(name) for name in self.stages
                  if name != stage.name and f"init={self.checkpoint(name)}" in stage.overrides}
        inputs["data"] = self.data_key()
        inputs["config"] = composed_settings_digest(stage.overrides)
        return inputs

    def _reuse(self, stage: Stage) -> bool:
        record = self.run_dir(stage.name) / "reproduce_stage.json"
        saved = _read_record(record) if self.cfg.reuse and self.checkpoint(stage.name).is_file() else None
        if saved is None or saved.get("overrides") != stage.overrides or saved.get("inputs") != self._inputs(stage):
            return False
        log.info("stage %s: reusing the finished run in %s", stage.name, self.run_dir(stage.name))
        self.finished.add(stage.name)
        stage.seconds, stage.reused, stage.summary = saved["seconds"], True, saved["summary"]
        stage.spans = [(float(a), float(b)) for a, b in saved.get("spans", [])]
        stage.resumed_at = list(saved.get("resumed_at", []))
        return True

    def _begin(self, stage: Stage, inputs: dict[str, str]) -> tuple[list[str], float]:
        """Prepare a stage's run_dir; returns the overrides to add to its own and when it started.

        A run of the stage with the same settings and inputs that was cut (a device call's time limit, a
        crash) continues from its last.ckpt, written every trainer.checkpoint_every_n_steps steps (on CPU a
        resume is exact: tests/test_faults.py); anything else starts over in an empty run_dir. The plan record says
        what the run in the folder was started with.
        """
        from training.faults import checkpoint_step  # noqa: PLC0415

        run_dir, last = self.run_dir(stage.name), self.checkpoint(stage.name)
        plan = _read_record(run_dir / STAGE_PLAN) if self.cfg.reuse else None
        same = plan is not None and plan.get("overrides") == stage.overrides and plan.get("inputs") == inputs
        step = checkpoint_step(last) if same and last.exists() else None  # a folder under trainer=fsdp
        extra: list[str] = []
        if step is not None and 0 < step < _steps(stage):
            assert plan is not None
            cut_at = last.stat().st_mtime  # the interrupted part's work up to this checkpoint is kept
            stage.spans = [(float(a), float(b)) for a, b in plan.get("spans", [])]
            stage.spans += [(float(plan["started"]), cut_at)] if cut_at > float(plan["started"]) else []
            stage.resumed_at = [*plan.get("resumed_at", []), step]
            extra = [f"resume={last}"]
            log.info("stage %s: continuing its interrupted run from step %d of %d (%s)", stage.name, step, _steps(stage), last)
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)  # no run with these settings to continue: start it over
            run_dir.mkdir(parents=True)
            stage.spans, stage.resumed_at = [], []
        started = time.time()
        _write_record(run_dir / STAGE_PLAN, {"overrides": stage.overrides, "inputs": inputs, "spans": stage.spans,
                                             "resumed_at": stage.resumed_at, "started": started})
        return extra, started

    def _train_here(self, stage: Stage) -> None:
        from training.run import train  # noqa: PLC0415 (Lightning loads only when a stage runs)

        inputs = self._inputs(stage)
        extra, started = self._begin(stage, inputs)
        log.info("stage %s: %s run_dir=%s", stage.name, stage.command, self.run_dir(stage.name))
        train(compose(config_name="config", overrides=[*stage.overrides, f"run_dir={self.run_dir(stage.name)}", *extra]))
        self._finish(stage, inputs, started, time.time())

    def _finish(self, stage: Stage, inputs: dict[str, str], started: float, finished: float) -> None:
        stage.spans = [*stage.spans, (started, finished)]
        stage.seconds = sum(end - start for start, end in stage.spans)
        stage.summary = json.loads((self.run_dir(stage.name) / "summary.json").read_text())
        # Written last: its presence means the stage finished.
        _write_record(self.run_dir(stage.name) / "reproduce_stage.json", {
            "overrides": stage.overrides, "inputs": inputs, "seconds": stage.seconds, "summary": stage.summary,
            "spans": stage.spans, "resumed_at": stage.resumed_at})
        self.finished.add(stage.name)
        log.info("stage %s done in %.0f s (%s)", stage.name, stage.seconds, self.checkpoint(stage.name))

    def stage_command(self, stage: Stage, extra: list[str]) -> list[str]:
        """The process that trains a stage when stages run at once: train.py with the stage's overrides
        (and `extra`: resume=... when it continues a run that was cut)."""
        return [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), *stage.overrides,
                f"run_dir={self.run_dir(stage.name)}", *extra]

    def _train_in_processes(self, stages: list[Stage], waiting: list[PendingEvaluation]) -> list[Exception]:
        """Up to budget.parallel_stages `train.py` processes at once, the longest stages first (they set the
        wall time), and meanwhile, in this process, each waiting evaluation once the stages it reads have
        finished. A failed stage lets the others finish (their records make them reusable) and then stops
        the reproduction with the end of its output. Returns the errors of the evaluations that failed."""
        queue = sorted(stages, key=_steps, reverse=True)
        inputs = {stage.name: self._inputs(stage) for stage in stages}
        if torch.cuda.is_available():
            gc.collect()  # the base's trainer and module, trained in this process, hold its tensors until collected
            torch.cuda.empty_cache()  # what they left cached here belongs to the new processes now
        threads = _threads_each(min(self.parallel_stages, len(stages)))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        # The evaluations made here meanwhile take a share like theirs, not every core.
        threads_here = torch.get_num_threads()
        torch.set_num_threads(min(threads_here, threads))
        running: dict[str, tuple[Stage, _Watched]] = {}
        failed: list[str] = []
        evaluation_errors: list[Exception] = []
        # Python's default SIGTERM ends this process at once and leaves the training processes running on
        # (`timeout` signals them too, but they save a checkpoint first, and nothing would kill a hung one):
        # raised as SystemExit here, it runs the `finally` that ends them. Only while they run: the base,
        # trained in this process, keeps Lightning's own handler (a checkpoint, then exit).
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if _main_thread() else None
        try:
            while queue or running:
                while queue and len(running) < self.parallel_stages:
                    stage = queue.pop(0)
                    running[stage.name] = (stage, self._start_process(stage, inputs[stage.name], env))
                failed += self._collect_ended(running, inputs)
                # Not while stages wait for a slot: one freed during a long evaluation would stay idle.
                evaluation = self._next_ready(waiting) if not queue else None
                if evaluation is None:
                    time.sleep(0.2)
                    continue
                # The processes run on meanwhile; their end times are taken as they end (_Watched).
                error = _evaluate(evaluation)
                evaluation_errors += [error] if error else []
                if torch.cuda.is_available():
                    gc.collect()
                    torch.cuda.empty_cache()  # the card's memory is shared with the training processes
        finally:  # interrupted (SIGTERM, Ctrl-C) or an error here: no training process outlives the reproduction
            # First record those that ended during the last evaluation: a cut call must not lose a finished stage
            # (the next one would find its last checkpoint at its last step and train it again).
            failed += self._collect_ended(running, inputs)
            for _, watched in running.values():
                watched.process.terminate()
            # Inside `timeout -k 5`. A stage cut here continues from its last periodic checkpoint next time (the
            # one its own SIGTERM handler writes may not finish: the write is atomic, the older one stays).
            deadline = time.time() + 3
            for _, watched in running.values():
                try:
                    watched.process.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    watched.process.kill()
                    watched.process.wait()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            torch.set_num_threads(threads_here)
        if failed:
            raise StageError("; ".join(failed) + ". Fix it and run the same command again: finished stages are reused.")
        return evaluation_errors + self._evaluate_ready(waiting)  # those that read the last stages to finish

    def _collect_ended(self, running: dict[str, tuple[Stage, _Watched]], inputs: dict[str, dict[str, str]]) -> list[str]:
        """Record the stages whose process has ended, taking them off `running`; why those that failed did."""
        failed = []
        for name, (stage, watched) in list(running.items()):
            if watched.ended is None:
                continue
            del running[name]
            error = self._collect(stage, watched.process.returncode, inputs[name], watched.started, watched.ended)
            if error:
                failed.append(error)
                log.error("%s", error)
        return failed

    def _start_process(self, stage: Stage, inputs: dict[str, str], env: dict[str, str]) -> _Watched:
        extra, started = self._begin(stage, inputs)
        output = self.run_dir(stage.name) / "process.log"
        log.info("stage %s: %s run_dir=%s (its own process; output in %s)", stage.name, stage.command,
                 self.run_dir(stage.name), output)
        with output.open("a") as stream:  # the child holds its own descriptor; this one closes either way
            process = subprocess.Popen(self.stage_command(stage, extra), stdout=stream, stderr=subprocess.STDOUT, env=env)
        return _Watched(process, started)

    def _collect(self, stage: Stage, status: int, inputs: dict[str, str], started: float, finished: float) -> str | None:
        """Record a stage whose process ended; the reason it failed, or None."""
        output = self.run_dir(stage.name) / "process.log"
        if status != 0:
            # A continued run that fails each time (e.g. a checkpoint this code cannot read) is retried from the
            # same checkpoint by the next call: say how to start the stage over.
            again = (f"; it continued from step {stage.resumed_at[-1]}: delete {self.run_dir(stage.name)} to start it over"
                     if stage.resumed_at else "")
            return f"stage {stage.name} failed (exit status {status}: {_last_error(output)}); its output: {output}{again}"
        try:
            self._finish(stage, inputs, started, finished)
        except (OSError, ValueError) as error:  # ended well but left no readable summary.json
            return f"stage {stage.name} ended without its summary ({error}); its output: {output}"
        return None

    def most_at_once(self) -> int:
        """The most stages whose runs overlapped at one moment (this call's or an earlier one's)."""
        events = sorted(event for s in self.stages.values() for start, end in s.spans
                        for event in ((start, 1), (end, -1)))  # an end sorts before a start at the same time
        most = now = 0
        for _, step in events:
            now += step
            most = max(most, now)
        return most

    def stages_wall_seconds(self) -> float:
        """Seconds the stages ran, time that several of them ran at once counted once (records from before
        start and finish times were kept count their own seconds)."""
        return _covered(self._stage_spans()) + sum(s.seconds for s in self.stages.values() if not s.spans)

    def wall_seconds(self) -> float:
        """Seconds the whole run took: the stages and the evaluations, time they shared counted once."""
        spans = self._stage_spans() + list(self.evaluation_spans.values())
        return (_covered(spans) + sum(s.seconds for s in self.stages.values() if not s.spans)
                + sum(seconds for name, (seconds, _) in self.evaluations.items() if name not in self.evaluation_spans))

    def evaluation_seconds_while_training(self) -> float:
        """Seconds of evaluation made while some stage trained (in its own process)."""
        stages, evaluations = self._stage_spans(), list(self.evaluation_spans.values())
        return _covered(stages) + _covered(evaluations) - _covered(stages + evaluations)

    def _stage_spans(self) -> list[tuple[float, float]]:
        return [span for s in self.stages.values() for span in s.spans]

    @functools.cached_property
    def data(self) -> Any:
        """The data every stage trains on (the corpus plus the passkey share), as the base run reads it."""
        from data import TextDataModule  # noqa: PLC0415

        data = OmegaConf.to_container(compose(config_name="config", overrides=self.common()).data, resolve=True)
        data["passkey_max_tokens"] = data.get("passkey_max_tokens") or self.window
        return TextDataModule(**data, seq_len=self.window, seed=int(self.cfg.seed))

    def train_tokens(self) -> int:
        """Tokens in the train split the stages read (the corpus plus the passkey share)."""
        return self.data.store("train").num_tokens

    def data_key(self) -> str:
        """The token cache's key: it changes with the corpus, the tokenizer or the passkey recipe."""
        return self.data.token_dir.name

    def tokens_seen(self, stage: str) -> int:
        """Training tokens of a stage: steps x batch x window."""
        summary = self.stages[stage].summary
        values = dict(o.split("=", 1) for o in self.stages[stage].overrides)
        phase = "pretrain" if stage == "base" else "finetune"
        return int(values[f"optim.{phase}.max_steps"]) * int(values[f"optim.{phase}.batch_size"]) * int(summary["seq_len"])

    def _fingerprint(self, stage: str) -> str:
        """Identifies one finished run of a stage: its record is rewritten (new time, summary) by every run."""
        record = self.work / "runs" / stage / "reproduce_stage.json"
        return hashlib.sha256(record.read_bytes()).hexdigest()[:16]

    def by_step_path(self, stage: str) -> Path:
        """Where the ExtensionEvalCallback writes a stage's by-step rows."""
        return self.work / "runs" / stage / "eval_by_step.json"

    def by_step(self, stage: str) -> list[dict[str, Any]]:
        """The rows the ExtensionEvalCallback wrote during a stage (validation split)."""
        return json.loads(self.by_step_path(stage).read_text())

    def base_by_step(self) -> list[dict[str, Any]] | None:
        """The base's by-step rows at L, where the budget evaluated its pretraining; None otherwise."""
        if not self.budget.get("pretrain_eval_every_n_steps") or not self.by_step_path("base").is_file():
            return None
        return self.by_step("base")

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, name: str, tasks: list[str], variants: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
        """One evaluate.py run over `variants`; `settings` are further conf/evaluate.yaml overrides.

        Returns its results.json as read back from the file, also when freshly run, so that a report is the
        same whether an evaluation ran now or was reused. A finished evaluation is reused while its command,
        its rows, the runs behind its checkpoints and the evaluation code are unchanged: a reproduction cut
        during its evaluations continues with the next one, and a report that needs a new measurement gets it.
        """
        from evaluation.report import read_results  # noqa: PLC0415
        from evaluation.run import evaluate  # noqa: PLC0415

        out = self.work / "eval" / name
        overrides = self._evaluation_overrides(name, tasks, settings)
        cfg = compose(config_name="evaluate", overrides=overrides)
        with open_dict(cfg):
            cfg.variants = variants
        # Every setting as composed (conf/evaluate.yaml's defaults too; not where the files go), the runs behind
        # the checkpoints, and the code that computes the numbers.
        settings_used = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "out_dir"}
        key = {"settings": settings_used, "checkpoints": self._checkpoint_fingerprints(variants), "code": evaluation_code()}
        record = out / "reproduce_eval.json"
        saved = _read_record(record) if self.cfg.reuse and (out / "results.json").is_file() else None
        if saved is not None and saved.get("key") == key:
            log.info("evaluation %s: reusing the finished evaluation in %s", name, out)
            record.touch()  # its time says this run used it (bench/run_gpu.sh packs what the current call used)
            self.evaluations[name] = (float(saved["seconds"]), True)
            if saved.get("span"):
                self.evaluation_spans[name] = (float(saved["span"][0]), float(saved["span"][1]))
            self.results[name] = read_results(out / "results.json")
            return self.results[name]
        if out.exists():
            shutil.rmtree(out)  # unfinished or stale: none of its files may be taken for this run's
        log.info("evaluation %s: python evaluate.py %s variants=<%d rows>", name, " ".join(overrides), len(variants))
        started, began = time.perf_counter(), time.time()
        evaluate(cfg)
        seconds, span = time.perf_counter() - started, (began, time.time())
        _write_record(record, {"key": key, "seconds": seconds, "span": span})  # written last: the evaluation finished
        self.evaluations[name], self.evaluation_spans[name] = (seconds, False), span
        self.results[name] = read_results(out / "results.json")
        return self.results[name]

    def _evaluation_overrides(self, name: str, tasks: list[str], settings: dict[str, Any]) -> list[str]:
        b = self.budget
        values = {"task": f"[{','.join(tasks)}]", "out_dir": self.work / "eval" / name, "seed": self.cfg.seed,
                  "dtype": b.dtype, "ppl.windows": f"[{','.join(map(str, self.windows))}]",
                  "ppl.stride": 256, "ppl.max_tokens_per_document": _null(b.ppl_max_tokens_per_document),
                  "passkey.num_positions": b.passkey_positions, "passkey.trials": b.passkey_trials,
                  "passkey.batch_size": b.passkey_trials,
                  **({"ppl.batch_size": b.ppl_batch_size} if b.get("ppl_batch_size") else {}),
                  **settings}  # one override per key: a setting replaces the default, and the logged command stays unambiguous
        return [f"{k}={v}" for k, v in values.items()]

    def _checkpoint_fingerprints(self, variants: list[dict[str, Any]]) -> dict[str, str]:
        """Each checkpoint's run: a stage's record fingerprint (it changes whenever the stage runs again)."""
        runs = self.work / "runs"
        prints = {}
        for ckpt in sorted({str(v["ckpt"]) for v in variants}):
            path = Path(ckpt)
            stage = path.parent.parent
            if stage.parent == runs and (stage / "reproduce_stage.json").is_file():
                prints[ckpt] = self._fingerprint(stage.name)
            elif path.is_file():  # not one of this reproduction's runs: the file itself
                stat = path.stat()
                prints[ckpt] = f"{stat.st_size}:{stat.st_mtime_ns}"
            else:
                prints[ckpt] = "missing"  # evaluate() says so in one sentence
        return prints

    def final_evaluations(self, fine_tunes: Sequence[str], ablation: Sequence[str] = ()) -> list[PendingEvaluation]:
        """The report's evaluations, one per run they read, for `run_stages` to make as soon as that run has
        finished: the base's (the no-fine-tuning rows, passkey inside L, the attention analysis) while the
        fine-tunes train, each fine-tune's while the longer ones still do. `merged` puts them back together.

        Each fine-tune: perplexity at L..L' and passkey over L' in `extensions_STAGE`, passkey and perplexity
        inside L in `inside_window_STAGE`. The long-passkey ablation, beyond the paper, once all its runs are done.
        """
        over_long = {"passkey.window": self.long_window}
        # Prompts of L tokens: the base's own retrieval (claim 4 needs it), what PI's compression alone does
        # to it, and what the fine-tunes keep of it.
        inside = {"passkey.window": self.window, "ppl.windows": f"[{self.window}]"}
        both = ["ppl", "passkey"]
        plan = [self._pending(evaluation_name("extensions", "base"), (), both, self.no_fine_tuning_variants, over_long),
                self._pending(evaluation_name("inside_window", "base"), (), both, self.inside_window_base_variants, inside),
                self._pending("attention", (), ["attention"], lambda: [{"name": BASE_ROW, "ckpt": str(self.checkpoint("base"))}], {})]
        for stage in fine_tunes:
            def rows(stage: str = stage) -> list[dict[str, Any]]:
                return self.stage_variants([stage]) + self.best_variants([stage] if stage in BEST_ROW_STAGES else [])
            plan += [self._pending(evaluation_name("extensions", stage), (stage,), both, rows, over_long),
                     self._pending(evaluation_name("inside_window", stage), (stage,), both,
                                   lambda stage=stage: self.stage_variants([stage]), inside)]
        if ablation:
            plan.append(self._pending("ablation_long_passkey", tuple(ablation), both,
                                      lambda: self.stage_variants(list(ablation)), over_long))
        return plan

    def _pending(self, name: str, needs: tuple[str, ...], tasks: list[str], rows: Callable[[], list[dict[str, Any]]],
                 settings: dict[str, Any]) -> PendingEvaluation:
        # The rows are listed when it runs: a fine-tune's best validation step is known only once it finished.
        return PendingEvaluation(name, needs, lambda: self.evaluate(name, tasks, rows(), **settings))

    def merged(self, evaluations: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Several finished evaluations' results as one: their perplexity and passkey results, in the order of
        `rows` (what one evaluation of all of them would have listed), and the first one's settings."""
        parts = [self.results[name] for name in evaluations]
        merged: dict[str, Any] = {"config": parts[0]["config"]}
        for key in ("ppl", "ppl_table", "passkey"):
            found = {name: value for part in parts for name, value in part.get(key, {}).items()}
            if found or any(key in part for part in parts):
                missing = [row["name"] for row in rows if row["name"] not in found]
                if missing:  # a programming error: the split of the rows into evaluations lost one
                    raise ValueError(f"no {key} result for {missing[0]!r} in the evaluations {', '.join(evaluations)}")
                merged[key] = {row["name"]: found[row["name"]] for row in rows}
        return merged

    def no_fine_tuning_variants(self) -> list[dict[str, Any]]:
        """The base read with each scaling at the run's scale, without fine-tuning."""
        base = str(self.checkpoint("base"))
        return [{"name": name, "ckpt": base, "position": {**position, "scale": self.scale}} for name, position in NO_FINE_TUNING]

    def extension_variants(self) -> list[dict[str, Any]]:
        """The rows of the tables at L': no fine-tuning, the four fine-tunes, and the long ones at their best step."""
        return (self.no_fine_tuning_variants() + self.stage_variants(["ft", "ft_long", "pi", "pi_long"])
                + self.best_variants(list(BEST_ROW_STAGES)))

    def inside_window_base_variants(self) -> list[dict[str, Any]]:
        """The base, and the base read with PI at 1.05 .. the run's scale: `inside_window_variants` without the fine-tunes."""
        base = str(self.checkpoint("base"))
        candidates = {*SLIGHT_COMPRESSION, *(2**i for i in range(1, 8))}
        scales = sorted({s for s in candidates if s < self.scale} | {self.scale})
        rows = [{"name": BASE_ROW, "ckpt": base}]
        return rows + [{"name": f"base read with PI at scale {s}, no fine-tuning", "ckpt": base, "position": {"kind": "pi", "scale": s}}
                       for s in scales]

    def inside_window_variants(self) -> list[dict[str, Any]]:
        """Rows for passkey prompts of L tokens: the base, the base read with PI and no fine-tuning at
        scales 1.05, 1.1, 1.25, 2, 4, .. up to the run's scale, then the four fine-tunes with their own encoding.

        Inside L every key is as close, in tokens, as in pretraining: only the positions are
        compressed. Whether the base's retrieval survives that tells an encoding that breaks
        retrieval outright from one that only fails to carry it over longer distances; the small
        scales show how little compression it takes.
        """
        return self.inside_window_base_variants() + self.stage_variants(["ft", "ft_long", "pi", "pi_long"])

    def best_variants(self, stages: list[str]) -> list[dict[str, Any]]:
        """Rows for the fine-tunes whose lowest validation loss came before their last step, read at that step.

        Early stopping on the validation plays (`best.ckpt`, val/loss at L' every val_check_interval
        steps), never on the test plays: it asks what each encoding reaches within its step budget
        when repeating a 2M-token corpus makes the last step overfit. Not the paper's protocol; no
        verdict uses these rows.
        """
        from training.faults import checkpoint_step  # noqa: PLC0415

        rows = []
        for stage in stages:
            last = self.checkpoint(stage)
            # The file the run's own summary names (a run_dir with an older best.ckpt in it gets best-v1.ckpt).
            best = last.with_name(Path(str(self.stages[stage].summary.get("best") or "best.ckpt")).name)
            step = checkpoint_step(best) if best.exists() else None
            if step is not None and step != checkpoint_step(last):
                rows.append({"name": f"{self.stages[stage].title}, best validation step ({step})", "ckpt": str(best)})
        return rows

    def stage_variants(self, stages: list[str]) -> list[dict[str, Any]]:
        """Evaluation rows for finished fine-tunes, each read with its own encoding."""
        return [{"name": self.stages[stage].title, "ckpt": str(self.checkpoint(stage))} for stage in stages]


# The packages an evaluation's numbers come from: the evaluators, the model and its position encodings
# (a no-fine-tuning row is the base read with one of them), and the data (documents, passkey prompts).
EVALUATION_PACKAGES = ("evaluation", "model", "data")


def composed_settings_digest(overrides: Sequence[str]) -> str:
    """A digest of the training config `overrides` compose to, every group's content resolved; the run folder,
    resume= and where the caches live are left out (they change no number)."""
    cfg = OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)), resolve=True)
    for key in ("run_dir", "resume"):
        cfg.pop(key, None)
    cfg.get("data", {}).pop("cache_dir", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def evaluation_code() -> str:
    """A fingerprint of the source an evaluation's numbers were computed by. (Stages are not keyed on
    the training code: retraining after every edit would cost far more than evaluating again.)"""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in EVALUATION_PACKAGES:
        for source in sorted((root / package).rglob("*.py")):
            digest.update(str(source.relative_to(root)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def _threads_each(processes: int) -> int:
    """CPU threads for each of `processes` training processes: their share of the cores this process may use
    (on a CPU, n runs at full thread count would oversubscribe), and no more than OMP_NUM_THREADS asks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // processes)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(asked)) if asked.isdigit() and int(asked) > 0 else share


def evaluation_name(table: str, run: str) -> str:
    """The folder (under work_dir/eval) of the evaluation of one run's rows of a report table ("base": the base's)."""
    return f"{table}_{run}"


def _covered(spans: Sequence[tuple[float, float]]) -> float:
    """Seconds inside at least one of the (start, end) spans."""
    total, end = 0.0, float("-inf")
    for start, finish in sorted(spans):
        total += max(0.0, finish - max(start, end))
        end = max(end, finish)
    return total


class _Watched:
    """A training process and when it ended, taken by a thread that waits for it: this process may be busy with an
    evaluation when it ends, and the stage's seconds are its own."""

    def __init__(self, process: subprocess.Popen, started: float) -> None:
        self.process, self.started = process, started
        self.ended: float | None = None
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        try:
            self.process.wait()
        finally:  # never left unset: the scheduling loop waits for it
            self.ended = time.time()


def _evaluate(evaluation: PendingEvaluation) -> Exception | None:
    """Make one evaluation; its error, logged, instead of raising it: the stages go on, the error comes after them."""
    try:
        evaluation.run()
    except Exception as error:  # noqa: BLE001 (Ctrl-C and SIGTERM's SystemExit are not caught)
        log.error("evaluation %s failed: %s", evaluation.name, error)
        return error
    return None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal handlers can be set only there


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _steps(stage: Stage) -> int:
    values = dict(o.split("=", 1) for o in stage.overrides if "=" in o)
    return int(values.get("optim.finetune.max_steps") or values.get("optim.pretrain.max_steps") or 0)


def _last_error(output: Path) -> str:
    """The line that says why a train.py process failed: its `error:` sentence, else its last line."""
    try:
        lines = [line.strip() for line in output.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":", 1)[0]]
    return (errors or lines or ["no output"])[-1]


def _read_record(path: Path) -> dict[str, Any] | None:
    """A finished stage's or evaluation's record; None when there is none or it is damaged (then it runs again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(path: Path, record: dict[str, Any]) -> None:
    """Written whole or not at all: a record's presence means the work it describes finished."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


def _null(value: Any) -> str:
    return "null" if value is None else str(value)


def device_description(trainer: str) -> str:
    """The card (GPU runs) or the processor (CPU runs) and the library versions, for the report."""
    import lightning  # noqa: PLC0415

    if trainer != "cpu" and torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = _cpu_name() + f", {torch.get_num_threads()} threads"
    return f"{device}; torch {torch.__version__}, lightning {lightning.__version__}, Python {platform.python_version()}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"
