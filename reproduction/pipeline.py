"""The reproduction's stages: one RoPE base, its extensions to scale x L, and their evaluations.

Every training stage is a `training.run.train` call on a config composed from conf/ (the same
path as `python train.py ...`, whose overrides are logged), and every evaluation an
`evaluation.run.evaluate` call (the same as `python evaluate.py ...`). A finished stage is
reused when its settings are unchanged, and so is a finished evaluation, so an interrupted
reproduction picks up where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import time
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

    @property
    def command(self) -> str:
        """The equivalent command line (the run_dir override is added by the pipeline)."""
        return "python train.py " + " ".join(_quote(o) for o in self.overrides)


def _quote(override: str) -> str:
    return f"'{override}'" if any(c in override for c in "[]{}, ") else override


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
        self.stages: dict[str, Stage] = {}
        self.evaluations: dict[str, tuple[float, bool]] = {}  # name -> (seconds it took when it ran, reused)

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
        return self._run(Stage("base", f"RoPE base at L = {self.window}", [
            *self.common(), "stage=pretrain", "position=rope", "scale=1",
            f"optim.pretrain.max_steps={b.pretrain_steps}", f"optim.pretrain.batch_size={b.pretrain_batch_size}",
            f"optim.pretrain.warmup_steps={min(30, b.pretrain_steps // 4)}",
            *self._pretrain_eval(),
        ]))

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

    def finetune(self, name: str, title: str, kind: str, steps: int, every: int, *extra: str) -> Stage:
        """A fine-tune of the base to L' with the paper's recipe; `extra` overrides set an ablation apart."""
        b = self.budget
        return self._run(Stage(name, title, [
            *self.common(), "stage=finetune", f"init={self.checkpoint('base')}", f"position={kind}", f"scale={self.scale}",
            f"optim.finetune.max_steps={steps}", f"optim.finetune.batch_size={b.finetune_batch_size}",
            f"optim.finetune.lr={b.finetune_lr}",
            f"eval.every_n_steps={every}", f"eval.windows=[{','.join(map(str, self.windows))}]",
            f"eval.max_documents={b.eval_documents}", f"eval.passkey_trials={b.eval_passkey_trials}",
            *self._eval_batch(), *extra,
        ]))

    def long_passkey_ablation(self) -> list[str]:
        """Beyond the paper: the four fine-tunes again with passkey prompts up to L' (not L) in their data.

        The paper fine-tunes on PG-19 alone: LLaMA already retrieves at any distance in its window, so
        the test is whether PI keeps that skill usable over L'. A small base was trained to retrieve over
        at most L tokens; here PI and direct fine-tuning get the chance to learn retrieval over L', and
        the question becomes how fast each encoding does. Returns the stage names.
        """
        b = self.budget
        n, n_long = int(b.finetune_steps), int(b.long_finetune_steps)
        longer = f"data.passkey_max_tokens={self.long_window}"
        note = f"passkeys to L' = {self.long_window}"
        plan = [("pi_lpk", f"PI, {n} steps, {note}", "pi", n, int(b.eval_every_n_steps)),
                ("ft_lpk", f"FT (direct), {n} steps, {note}", "rope", n, int(b.eval_every_n_steps)),
                ("ft_lpk_long", f"FT (direct), {n_long} steps, {note}", "rope", n_long, int(b.long_eval_every_n_steps)),
                ("pi_lpk_long", f"PI, {n_long} steps, {note}", "pi", n_long, int(b.long_eval_every_n_steps))]
        for name, title, kind, steps, every in plan:
            self.finetune(name, title, kind, steps, every, longer)
        return [name for name, *_ in plan]

    def checkpoint(self, stage: str) -> Path:
        return self.work / "runs" / stage / "checkpoints" / "last.ckpt"

    def metrics_log(self, stage: str) -> Path:
        """The stage's Lightning CSV log (training and validation metrics by step)."""
        return self.work / "runs" / stage / "logs" / "metrics.csv"

    def _run(self, stage: Stage) -> Stage:
        from training.run import train  # noqa: PLC0415 (Lightning loads only when a stage runs)

        run_dir = self.work / "runs" / stage.name
        record = run_dir / "reproduce_stage.json"
        # A fine-tune depends on the base run as well as its own settings: a new base makes it stale.
        inputs = {name: self._fingerprint(name) for name in self.stages if f"init={self.checkpoint(name)}" in stage.overrides}
        inputs["data"] = self.data_key()  # same settings over new training data (e.g. a new passkey recipe): stale
        saved = _read_record(record) if self.cfg.reuse and self.checkpoint(stage.name).is_file() else None
        if saved is not None:
            if saved.get("overrides") == stage.overrides and saved.get("inputs") == inputs:
                log.info("stage %s: reusing the finished run in %s", stage.name, run_dir)
                stage.seconds, stage.reused, stage.summary = saved["seconds"], True, saved["summary"]
                self.stages[stage.name] = stage
                return stage
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished or differently configured run: start it over
        log.info("stage %s: %s run_dir=%s", stage.name, stage.command, run_dir)
        started = time.perf_counter()
        train(compose(config_name="config", overrides=[*stage.overrides, f"run_dir={run_dir}"]))
        stage.seconds = time.perf_counter() - started
        stage.summary = json.loads((run_dir / "summary.json").read_text())
        # Written last: its presence means the stage finished.
        _write_record(record, {"overrides": stage.overrides, "inputs": inputs, "seconds": stage.seconds, "summary": stage.summary})
        log.info("stage %s done in %.0f s (%s)", stage.name, stage.seconds, self.checkpoint(stage.name))
        self.stages[stage.name] = stage
        return stage

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
            return read_results(out / "results.json")
        if out.exists():
            shutil.rmtree(out)  # unfinished or stale: none of its files may be taken for this run's
        log.info("evaluation %s: python evaluate.py %s variants=<%d rows>", name, " ".join(overrides), len(variants))
        started = time.perf_counter()
        evaluate(cfg)
        seconds = time.perf_counter() - started
        _write_record(record, {"key": key, "seconds": seconds})  # written last: the evaluation finished
        self.evaluations[name] = (seconds, False)
        return read_results(out / "results.json")

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

    def extension_variants(self) -> list[dict[str, Any]]:
        base = str(self.checkpoint("base"))
        rows = [{"name": name, "ckpt": base, "position": {**position, "scale": self.scale}} for name, position in NO_FINE_TUNING]
        return rows + self.stage_variants(["ft", "ft_long", "pi", "pi_long"]) + self.best_variants(["ft_long", "pi_long"])

    def inside_window_variants(self) -> list[dict[str, Any]]:
        """Rows for passkey prompts of L tokens: the base, the base read with PI and no fine-tuning at
        scales 1.05, 1.1, 1.25, 2, 4, .. up to the run's scale, then the four fine-tunes with their own encoding.

        Inside L every key is as close, in tokens, as in pretraining: only the positions are
        compressed. Whether the base's retrieval survives that tells an encoding that breaks
        retrieval outright from one that only fails to carry it over longer distances; the small
        scales show how little compression it takes.
        """
        base = str(self.checkpoint("base"))
        candidates = {*SLIGHT_COMPRESSION, *(2**i for i in range(1, 8))}
        scales = sorted({s for s in candidates if s < self.scale} | {self.scale})
        rows = [{"name": BASE_ROW, "ckpt": base}]
        rows += [{"name": f"base read with PI at scale {s}, no fine-tuning", "ckpt": base, "position": {"kind": "pi", "scale": s}}
                 for s in scales]
        return rows + self.stage_variants(["ft", "ft_long", "pi", "pi_long"])

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
            best = last.with_name("best.ckpt")
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


def evaluation_code() -> str:
    """A fingerprint of the source an evaluation's numbers were computed by. (Stages are not keyed on
    the training code: retraining after every edit would cost far more than evaluating again.)"""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in EVALUATION_PACKAGES:
        for source in sorted((root / package).rglob("*.py")):
            digest.update(str(source.relative_to(root)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


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
