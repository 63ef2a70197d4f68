"""Faults: a crashed, killed or SIGTERM'd run resumes exactly; non-finite losses stop or skip; atomic swaps."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_training import compose_config

from training.distributed import ShardedDataParallel, _point_link
from training.faults import NonFiniteLossError, rng_states, set_rng_states
from training.module import CausalLMTask
from training.run import train

ROOT = Path(__file__).resolve().parents[1]
# Epochs of 4 batches, so 10 steps cross two epoch boundaries; last.ckpt every 3 steps.
RESUMABLE = ["stage=pretrain", "trainer.limit_train_batches=4", "trainer.checkpoint_every_n_steps=3",
             "trainer.val_check_interval=5", "register_base=false"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def smoke(cache_dir, run_dir, *overrides):
    return compose_config("experiment=smoke", f"data.cache_dir={cache_dir}", f"run_dir={run_dir}", *overrides)


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step from a run's metrics.csv."""
    with (run_dir / "logs" / "metrics.csv").open(newline="") as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"


class _CrashAt(L.Callback):
    """Raises before the step `step`, like a machine failing mid-run (without the kill)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _with_callback(monkeypatch, callback):
    original = L.Trainer.__init__

    def init(self, *args, callbacks=None, **kwargs):
        original(self, *args, callbacks=[*(callbacks or []), callback], **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", init)


def test_a_crashed_run_resumes_mid_epoch_exactly_like_an_uninterrupted_one(cache_dir, tmp_path, monkeypatch):
    full = train(smoke(cache_dir, tmp_path / "full", *RESUMABLE, "optim.pretrain.max_steps=10"))
    _with_callback(monkeypatch, _CrashAt(7))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(smoke(cache_dir, tmp_path / "cut", *RESUMABLE, "optim.pretrain.max_steps=10"))
    monkeypatch.undo()
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 6  # the periodic checkpoint, mid-way through the second epoch
    assert saved["TextDataModule"]["samples_seen"] == 6 * 4  # the data position: 6 batches of 4
    assert "rng" in next(v for k, v in saved["callbacks"].items() if k.startswith("FaultTolerance"))

    resumed = train(smoke(cache_dir, tmp_path / "cut", *RESUMABLE, "optim.pretrain.max_steps=10", f"resume={last}"))
    expected = losses(tmp_path / "full")
    assert sorted(expected) == list(range(10))
    assert losses(tmp_path / "cut") == expected  # exact: the rows before the crash were kept, the rest recomputed
    assert_same_weights(full.last_checkpoint, resumed.last_checkpoint)
    assert torch.load(resumed.last_checkpoint, weights_only=True)["global_step"] == 10


def test_a_checkpoint_at_a_validation_step_holds_that_validation_and_the_resumed_run_keeps_the_same_best(
        cache_dir, tmp_path, monkeypatch):
    """last.ckpt and validation every 3 steps: the one at step 6 waits for step 6's validation. Lightning does not
    validate again at the step it resumes from, so a checkpoint written before it resumed with the best-model record
    of step 3, and a later, worse validation could have replaced best.ckpt."""
    coinciding = ["stage=pretrain", "trainer.limit_train_batches=4", "trainer.checkpoint_every_n_steps=3",
                  "trainer.val_check_interval=3", "register_base=false"]
    full = train(smoke(cache_dir, tmp_path / "full", *coinciding, "optim.pretrain.max_steps=10"))
    _with_callback(monkeypatch, _CrashAt(7))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(smoke(cache_dir, tmp_path / "cut", *coinciding, "optim.pretrain.max_steps=10"))
    monkeypatch.undo()

    def best(checkpoint: Path) -> float:
        states = torch.load(checkpoint, weights_only=True)["callbacks"]
        return float(next(v for k, v in states.items() if "'monitor': 'val/loss'" in k)["best_model_score"])

    with (tmp_path / "full" / "logs" / "metrics.csv").open(newline="") as handle:
        validations = [float(row["val/loss"]) for row in csv.DictReader(handle) if row.get("val/loss")]
    assert len(validations) == 3  # after steps 3, 6 and 9
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert best(last) == pytest.approx(min(validations[:2]))  # step 6's validation is in it
    resumed = train(smoke(cache_dir, tmp_path / "cut", *coinciding, "optim.pretrain.max_steps=10", f"resume={last}"))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert_same_weights(full.last_checkpoint, resumed.last_checkpoint)
    assert best(resumed.last_checkpoint) == best(full.last_checkpoint) == pytest.approx(min(validations))


def test_a_finished_run_extended_by_resume_logs_every_step_where_an_uninterrupted_run_does(cache_dir, tmp_path):
    """The end-of-run last.ckpt (max_steps 5, mid-epoch, a validation step) resumed with a larger max_steps.

    A constant learning rate after warmup (the fine-tuning recipe's), so that the longer run's schedule
    agrees with the shorter one's where they overlap.
    """
    extendable = [*RESUMABLE, "optim.pretrain.schedule=constant"]
    full = train(smoke(cache_dir, tmp_path / "full", *extendable, "optim.pretrain.max_steps=8"))
    train(smoke(cache_dir, tmp_path / "short", *extendable, "optim.pretrain.max_steps=5"))
    last = tmp_path / "short" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5
    extended = train(smoke(cache_dir, tmp_path / "short", *extendable, "optim.pretrain.max_steps=8", f"resume={last}"))
    expected = losses(tmp_path / "full")
    assert sorted(expected) == list(range(8))
    assert losses(tmp_path / "short") == expected  # same steps, same values: no row shifted or missing
    assert_same_weights(full.last_checkpoint, extended.last_checkpoint)


@pytest.mark.parametrize("max_steps", [4, 5], ids=["last-step-validated", "between-validations"])
def test_the_last_step_is_written_once(cache_dir, tmp_path, monkeypatch, max_steps):
    """With checkpoint_every_n_steps=0, last.ckpt is written at each validation step (every 2 steps here),
    and the end of the run writes it only if that did not already happen at the last step (a repeated
    write costs tens of GB for a 7B model)."""
    saved: list[tuple[str, int]] = []
    original = L.Trainer.save_checkpoint

    def save_checkpoint(self, filepath, *args, **kwargs):
        saved.append((Path(filepath).name, self.global_step))
        return original(self, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", save_checkpoint)
    result = train(smoke(cache_dir, tmp_path, "stage=pretrain", f"optim.pretrain.max_steps={max_steps}",
                         "trainer.checkpoint_every_n_steps=0", "register_base=false"))
    assert saved.count(("last.ckpt", 2)) == 1  # the first validation step's
    assert saved.count(("last.ckpt", max_steps)) == 1
    last = torch.load(result.last_checkpoint, weights_only=True)
    assert last["global_step"] == max_steps
    # Written after the last validation: the best-model record it carries is the final one.
    best_record = next(v for k, v in last["callbacks"].items() if "'monitor': 'val/loss'" in k)
    assert Path(best_record["best_model_path"]) == result.best_checkpoint
    assert float(best_record["best_model_score"]) == pytest.approx(min(
        float(row["val/loss"]) for row in csv.DictReader((tmp_path / "logs" / "metrics.csv").open()) if row.get("val/loss")))


def test_with_gradient_accumulation_only_a_micro_batch_that_stepped_can_write_last_ckpt(cache_dir, tmp_path, monkeypatch):
    """The micro-batches between two optimizer steps see the step before them: the first ones of a run (step 0) and
    of a resumed run (the checkpoint's step) must neither save nor defer a save to a later validation."""
    saved: list[tuple[str, int]] = []
    original = L.Trainer.save_checkpoint

    def record_saves() -> None:
        def save_checkpoint(self, filepath, *args, **kwargs):
            saved.append((Path(filepath).name, self.global_step))
            return original(self, filepath, *args, **kwargs)
        monkeypatch.setattr(L.Trainer, "save_checkpoint", save_checkpoint)

    accumulating = ["stage=pretrain", "trainer.accumulate_grad_batches=2", "register_base=false"]
    record_saves()
    # A validation only at the last step, periodic saves every 3: last.ckpt once, by train() after fit.
    train(smoke(cache_dir, tmp_path / "short", *accumulating, "optim.pretrain.max_steps=2", "trainer.val_check_interval=2",
                "trainer.checkpoint_every_n_steps=3"))
    assert saved == [("best.ckpt", 2), ("last.ckpt", 2)]

    # Cut after step 4 (last.ckpt at 3), resumed: step 3's checkpoint is not rewritten one micro-batch into step 4.
    cut = [*accumulating, "optim.pretrain.max_steps=6", "trainer.val_check_interval=5", "trainer.checkpoint_every_n_steps=3"]
    _with_callback(monkeypatch, _CrashAt(4))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(smoke(cache_dir, tmp_path / "cut", *cut))
    monkeypatch.undo()
    record_saves()
    saved.clear()
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    train(smoke(cache_dir, tmp_path / "cut", *cut, f"resume={last}"))
    assert saved == [("best.ckpt", 5), ("last.ckpt", 6)]


def test_validation_and_its_checkpoint_come_every_n_optimizer_steps_with_gradient_accumulation(cache_dir, tmp_path,
                                                                                              monkeypatch):
    """val_check_interval counts optimizer steps (Lightning counts batches): 2 micro-batches per step here."""
    events: list[tuple[str, int]] = []

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            events.append(("validation", trainer.global_step))

    original = L.Trainer.save_checkpoint

    def save_checkpoint(self, filepath, *args, **kwargs):
        events.append((Path(filepath).name, self.global_step))
        return original(self, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", save_checkpoint)
    _with_callback(monkeypatch, Record())
    train(smoke(cache_dir, tmp_path, "stage=pretrain", "optim.pretrain.max_steps=4", "trainer.accumulate_grad_batches=2",
                "trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=0", "register_base=false"))
    assert [step for name, step in events if name == "validation"] == [2, 4]
    assert [step for name, step in events if name == "last.ckpt"] == [2, 4]
    # The reproduction report reads the validation curve back from the CSV log at the same steps.
    from reproduction.report import metrics_curve
    assert [step for step, _ in metrics_curve(tmp_path / "logs" / "metrics.csv")] == [2, 4]
    assert events.index(("validation", 4)) < events.index(("last.ckpt", 4))  # the final one after the final validation
    assert events.index(("validation", 2)) < events.index(("last.ckpt", 2))  # a periodic one after its validation too


def test_resuming_a_finished_run_rewrites_its_checkpoint_with_the_same_rng_states(cache_dir, tmp_path):
    """Nothing left to train: the restored RNG states are never applied, and must not be replaced on saving."""
    overrides = ["stage=pretrain", "optim.pretrain.max_steps=3", "register_base=false"]
    train(smoke(cache_dir, tmp_path, *overrides))
    last = tmp_path / "checkpoints" / "last.ckpt"

    def rng(path: Path) -> dict:
        saved = torch.load(path, weights_only=True)
        return next(v for k, v in saved["callbacks"].items() if k.startswith("FaultTolerance"))["rng"]

    before = rng(last)
    torch.manual_seed(999)  # this process's state now differs from the run's
    train(smoke(cache_dir, tmp_path, *overrides, f"resume={last}"))
    after = rng(last)
    assert torch.equal(after["torch"], before["torch"]) and after["python"] == before["python"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    states = rng_states()
    torch.save(states, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def _nan_at_step(monkeypatch, step: int) -> None:
    """The loss of the training step at global step `step` becomes NaN (validation is untouched)."""
    original = CausalLMTask._nll

    def nll(self, batch):
        value, tokens = original(self, batch)
        if self.training and self.trainer.global_step == step:
            value = value * float("nan")
        return value, tokens

    monkeypatch.setattr(CausalLMTask, "_nll", nll)


# fused=False checks the loss on the host every step; fused=True skips on the device through the
# fused AdamW's found_inf and reads the record back once per log interval.
@pytest.mark.parametrize("fused", [False, True])
def test_a_nan_loss_stops_the_run_in_one_sentence_and_keeps_the_last_good_checkpoint(cache_dir, tmp_path, monkeypatch, fused):
    _nan_at_step(monkeypatch, 3)
    cfg = smoke(cache_dir, tmp_path, "stage=pretrain", "optim.pretrain.max_steps=6", "trainer.checkpoint_every_n_steps=1",
                "register_base=false", f"optim.fused={fused}", "trainer.log_every_n_steps=2")
    with pytest.raises(NonFiniteLossError, match=r"the training loss became nan at step 3, so the run stopped before "
                                                  r"that step changed any weight, and .*last.ckpt is the last good "
                                                  r"checkpoint; .*on_nonfinite=skip"):
        train(cfg)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    # On the device path the run stops at the next check (step 4), before step 4's validation, which its
    # last.ckpt waits for (val_check_interval 2): the last one written is step 3's either way.
    assert saved["global_step"] == 3
    assert {int(state["step"]) for state in saved["optimizer_states"][0]["state"].values()} == {3}
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("fused", [False, True])
def test_on_nonfinite_skip_leaves_the_weights_and_optimizer_untouched_for_that_step(cache_dir, tmp_path, monkeypatch, fused):
    _nan_at_step(monkeypatch, 2)
    cfg = smoke(cache_dir, tmp_path, "stage=pretrain", "optim.pretrain.max_steps=4", "trainer.on_nonfinite=skip",
                "register_base=false", f"optim.fused={fused}")
    result = train(cfg)
    saved = torch.load(result.last_checkpoint, weights_only=True)
    assert saved["global_step"] == 4  # a skipped step still counts
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    adam = saved["optimizer_states"][0]["state"]
    assert {int(state["step"]) for state in adam.values()} == {3}  # AdamW stepped 3 times, not 4
    assert result.metrics["train/skipped_steps"] == 1


@pytest.mark.parametrize("fused", [False, True])
def test_one_bad_micro_batch_skips_its_whole_accumulated_step(cache_dir, tmp_path, monkeypatch, fused):
    from training.module import CausalLMTask

    calls = []
    original = CausalLMTask._nll

    def nll(self, batch):
        value, tokens = original(self, batch)
        if self.training:
            calls.append(1)
            if len(calls) == 3:  # the first micro-batch of step 1 only; its second one is finite
                value = value * float("nan")
        return value, tokens

    monkeypatch.setattr(CausalLMTask, "_nll", nll)
    cfg = smoke(cache_dir, tmp_path, "stage=pretrain", "optim.pretrain.max_steps=3", "trainer.on_nonfinite=skip",
                "register_base=false", "trainer.accumulate_grad_batches=2", f"optim.fused={fused}")
    result = train(cfg)
    saved = torch.load(result.last_checkpoint, weights_only=True)
    assert saved["global_step"] == 3
    assert {int(state["step"]) for state in saved["optimizer_states"][0]["state"].values()} == {2}
    assert result.metrics["train/skipped_steps"] == 1


def test_the_fused_path_never_reads_the_loss_on_the_host_between_checks(cache_dir, tmp_path, monkeypatch):
    """The device path's only reads are the checks, once per log interval (the lever for GPU step overhead)."""
    from training.module import CausalLMTask

    reads = []
    original = CausalLMTask._check_device_flags
    monkeypatch.setattr(CausalLMTask, "_check_device_flags", lambda self, *a, **k: (reads.append(self.trainer.global_step), original(self, *a, **k)))
    monkeypatch.setattr(CausalLMTask, "_any_rank_nonfinite", lambda self, loss: pytest.fail("a per-step host check ran"))
    cfg = smoke(cache_dir, tmp_path, "stage=pretrain", "optim.pretrain.max_steps=6", "register_base=false",
                "optim.fused=true", "trainer.log_every_n_steps=3")
    train(cfg)
    assert reads == [3, 6, 6]  # two intervals, then once more at the end of training


def test_a_sharded_checkpoint_is_switched_in_atomically_and_a_failed_save_keeps_the_old_one(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ShardedDataParallel()  # no process group: broadcast and barrier are no-ops

    def write(self, checkpoint, path, storage_options=None):
        Path(path).mkdir(parents=True)
        (Path(path) / "meta.pt").write_text(str(checkpoint["global_step"]))
        if checkpoint["global_step"] == 3:
            raise OSError("disk full")

    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", write)
    link = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"global_step": 1}, link)
    strategy.save_checkpoint({"global_step": 2}, link)
    assert link.is_symlink() and (link / "meta.pt").read_text() == "2"
    with pytest.raises(OSError, match="disk full"):
        strategy.save_checkpoint({"global_step": 3}, link)
    assert (link / "meta.pt").read_text() == "2"  # still the last complete save
    assert sum(1 for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt.1-")) == 0  # step 1's folder is gone
    strategy.remove_checkpoint(link)
    assert not link.exists() and not link.is_symlink()


def _lightnings_next_slurm_checkpoint(run_dir: Path) -> tuple[str, str | None]:
    """What Lightning would name its next SLURM checkpoint in run_dir, and which one a requeued job resumes from."""
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    newest = _CheckpointConnector._CheckpointConnector__max_ckpt_version_in_folder(run_dir, "hpc_ckpt_")
    return Path(_CheckpointConnector.hpc_save_path(run_dir)).name, None if newest is None else f"hpc_ckpt_{newest}.ckpt"


def test_the_projects_temporary_names_leave_lightnings_slurm_checkpoint_numbering_alone(tmp_path, monkeypatch):
    """Lightning numbers the checkpoint it saves before SLURM requeues a job from the digits of every name holding
    "ckpt_" in the run folder. A sharded save's hidden folder ".hpc_ckpt_1.ckpt.<step>-<time>" made it resume from
    hpc_ckpt_1<step><time>.ckpt, which does not exist; so did a file save's temporary file, while it was written."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from model.checkpoints import atomic_write

    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", lambda self, checkpoint, path, storage_options=None:
                        Path(path).mkdir(parents=True))
    strategy = ShardedDataParallel()  # no process group: broadcast and barrier are no-ops
    strategy.save_checkpoint({"global_step": 12}, tmp_path / "hpc_ckpt_1.ckpt")
    assert len(list(tmp_path.iterdir())) == 2  # the link and its hidden folder
    assert _lightnings_next_slurm_checkpoint(tmp_path) == ("hpc_ckpt_2.ckpt", "hpc_ckpt_1.ckpt")
    seen = []
    atomic_write(tmp_path / "hpc_ckpt_2.ckpt", lambda handle: seen.append(_lightnings_next_slurm_checkpoint(tmp_path)))
    assert seen == [("hpc_ckpt_2.ckpt", "hpc_ckpt_1.ckpt")]  # its temporary file is there, and not counted


SLURM_TASK = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "pi", "SLURM_JOB_ID": "7",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


def test_a_job_slurm_requeued_resumes_from_lightnings_checkpoint_as_a_resume(cache_dir, tmp_path, monkeypatch):
    """Lightning saves run_dir/hpc_ckpt_<n>.ckpt on SLURM's signal and requeues the job, which starts again with the
    same command (resume= null). train.py resumes it from that checkpoint as if given resume=: the steps before
    it keep their metrics rows, and the run ends as an uninterrupted one does."""
    steps = [*RESUMABLE, "optim.pretrain.schedule=constant"]
    full = train(smoke(cache_dir, tmp_path / "full", *steps, "optim.pretrain.max_steps=6"))
    train(smoke(cache_dir, tmp_path / "job", *steps, "optim.pretrain.max_steps=3"))
    (tmp_path / "job" / "checkpoints" / "last.ckpt").rename(tmp_path / "job" / "hpc_ckpt_1.ckpt")  # as the signal's
    for name, value in {**SLURM_TASK, "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(name, value)
    resumed = train(smoke(cache_dir, tmp_path / "job", *steps, "optim.pretrain.max_steps=6"))
    assert losses(tmp_path / "job") == losses(tmp_path / "full")  # rows 0-2 kept, 3-5 from the resumed run
    assert_same_weights(full.last_checkpoint, resumed.last_checkpoint)


def test_a_requeued_job_goes_on_from_the_newest_checkpoint_of_its_run(tmp_path, monkeypatch):
    """Lightning's hpc checkpoint, SIGTERM's or a periodic last.ckpt written after it, or the command line's resume=:
    whichever is newest. Outside SLURM, or in a run folder no job of which was requeued, nothing changes."""
    from training.slurm import is_requeued_run, requeue_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    saved = {run / "hpc_ckpt_1.ckpt": 40, run / "hpc_ckpt_2.ckpt": 90, run / "checkpoints" / "last.ckpt": 120,
             tmp_path / "given.ckpt": 100}
    for path in saved:
        path.touch()
    step = saved.get
    given = tmp_path / "given.ckpt"
    assert requeue_checkpoint(run, None, step) is None and requeue_checkpoint(run, given, step) == given  # no SLURM
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    assert is_requeued_run(run)  # Lightning's checkpoint is there: Lightning itself would resume from it
    assert requeue_checkpoint(run, None, step) == run / "checkpoints" / "last.ckpt"  # written after the signal
    saved[run / "checkpoints" / "last.ckpt"] = 60
    assert requeue_checkpoint(run, None, step) == run / "hpc_ckpt_2.ckpt"
    assert requeue_checkpoint(run, given, step) == given  # a newer resume= than any of them
    saved[run / "hpc_ckpt_2.ckpt"] = None  # unreadable: left out
    assert requeue_checkpoint(run, None, step) == run / "checkpoints" / "last.ckpt"
    for path in run.glob("hpc_ckpt_*"):
        path.unlink()
    assert not is_requeued_run(run) and requeue_checkpoint(run, None, step) is None  # a new job in an old folder
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # requeued (preempted, no signal): last.ckpt is what there is
    assert requeue_checkpoint(run, None, step) == run / "checkpoints" / "last.ckpt"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's way to opt out of its SLURM environment
    assert requeue_checkpoint(run, None, step) is None


def test_a_real_folder_in_the_way_is_replaced_by_the_link(tmp_path):
    (tmp_path / "last.ckpt").mkdir()
    (tmp_path / ".last.ckpt.new").mkdir()
    _point_link(tmp_path / "last.ckpt", tmp_path / ".last.ckpt.new")
    assert (tmp_path / "last.ckpt").resolve() == (tmp_path / ".last.ckpt.new").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.new", "last.ckpt"]


# ----------------------------------------------------------------------------- real processes, real signals

# train.py with every training step slowed down, so that a signal can land mid-run; sleeping
# changes no number the run computes.
SLOW_TRAIN = (
    "import runpy, sys, time\n"
    "from training.module import CausalLMTask\n"
    "step = CausalLMTask.training_step\n"
    "def slow(self, *args):\n"
    "    time.sleep(0.25)\n"
    "    return step(self, *args)\n"
    "CausalLMTask.training_step = slow\n"
    "sys.argv = ['train.py', *sys.argv[1:]]\n"
    "runpy.run_path('train.py', run_name='__main__')\n"
)


def _start_slow_run(cache_dir: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    args = ["experiment=smoke", f"data.cache_dir={cache_dir}", f"run_dir={run_dir}", *overrides]
    return subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def _wait_for(condition, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the condition held:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _saved_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 (not written yet)
        return None


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run_exactly(cache_dir, tmp_path):
    overrides = [*RESUMABLE, "optim.pretrain.max_steps=12", "trainer.checkpoint_every_n_steps=2"]
    train(smoke(cache_dir, tmp_path / "full", *overrides))  # also builds the token cache before the subprocess
    run = tmp_path / "killed"
    process = _start_slow_run(cache_dir, run, *overrides)
    last = run / "checkpoints" / "last.ckpt"
    _wait_for(lambda: (_saved_step(last) or 0) >= 4, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    killed_at = _saved_step(last)
    assert killed_at is not None and 4 <= killed_at < 12

    train(smoke(cache_dir, run, *overrides, f"resume={last}"))
    expected, got = losses(tmp_path / "full"), losses(run)
    assert all(step in got for step in range(killed_at, 12))  # the resumed part is all there
    assert {s: got[s] for s in got} == {s: expected[s] for s in got}  # exactly equal, step by step
    assert_same_weights(tmp_path / "full" / "checkpoints" / "last.ckpt", last)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_first_and_it_resumes_exactly(cache_dir, tmp_path):
    overrides = [*RESUMABLE, "optim.pretrain.max_steps=12", "trainer.checkpoint_every_n_steps=100"]
    train(smoke(cache_dir, tmp_path / "full", *overrides))
    run = tmp_path / "stopped"
    process = _start_slow_run(cache_dir, run, *overrides)
    metrics = run / "logs" / "metrics.csv"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, process)  # a few steps in
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    last = run / "checkpoints" / "last.ckpt"
    stopped_at = _saved_step(last)
    assert stopped_at is not None and 2 <= stopped_at < 12  # written on SIGTERM: no periodic save was due

    train(smoke(cache_dir, run, *overrides, f"resume={last}"))
    expected, got = losses(tmp_path / "full"), losses(run)
    assert all(step in got for step in range(stopped_at, 12))
    assert {s: got[s] for s in got} == {s: expected[s] for s in got}
    assert_same_weights(tmp_path / "full" / "checkpoints" / "last.ckpt", last)
    # The resumed run replaced the SIGTERM file rather than writing a last-v1.ckpt beside it.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_train_py_stops_a_diverging_run_with_one_sentence_and_exit_status_2(cache_dir, tmp_path):
    """lr=1e30: finite, so accepted, but the loss is NaN within a few steps."""
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=smoke", f"data.cache_dir={cache_dir}", f"run_dir={tmp_path}",
         "stage=pretrain", "optim.pretrain.lr=1e30", "trainer.checkpoint_every_n_steps=1", "register_base=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the training loss became nan at step" in errors[0]
    assert f"{tmp_path / 'checkpoints' / 'last.ckpt'} is the last good checkpoint" in errors[0]
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert f"at step {saved['global_step']}," in errors[0]  # the checkpoint is from just before the bad step
