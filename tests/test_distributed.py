"""Scaling out on CPU: DDP and FSDP2 (2 processes, gloo) train like one process with the same global batch,
FSDP saves and resumes sharded checkpoints, and those consolidate into one ordinary checkpoint.

The multi-process runs go through train.py in a subprocess: Lightning's launcher starts the other
ranks by re-running sys.argv, which under pytest would re-run the test session.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import compose_config

from data.datamodule import ResumableSampler, TextDataModule
from model.checkpoints import load_pretrained
from training.config import ConfigError
from training.consolidate import consolidate, is_sharded_checkpoint
from training.distributed import ShardedDataParallel, build_strategy
from training.run import train

ROOT = Path(__file__).resolve().parents[1]
# A constant lr after warmup, so that a run stopped at step 4 and resumed to 6 follows the same
# schedule as one run of 6 steps; last.ckpt every 2 steps.
COMMON = ["stage=pretrain", "optim.pretrain.schedule=constant", "trainer.checkpoint_every_n_steps=2",
          "trainer.val_check_interval=3", "register_base=false"]
STEPS = 6


def losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "logs" / "metrics.csv").open(newline="") as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def one_process(cache_dir, tmp_path_factory):
    """The reference: one process, global batch 4 (it also builds the token cache the ranks share)."""
    run_dir = tmp_path_factory.mktemp("one_process")
    cfg = compose_config("experiment=smoke", f"data.cache_dir={cache_dir}", f"run_dir={run_dir}", *COMMON,
                         "optim.pretrain.batch_size=4", f"optim.pretrain.max_steps={STEPS}")
    result = train(cfg)
    return {"run_dir": run_dir, "losses": losses(run_dir),
            "weights": torch.load(result.last_checkpoint, weights_only=True)["state_dict"]}


def run_train(cache_dir: Path, run_dir: Path, *overrides: str, timeout: int = 120) -> subprocess.CompletedProcess:
    args = ["experiment=smoke", f"data.cache_dir={cache_dir}", f"run_dir={run_dir}", *COMMON, *overrides]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_close_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- fast


def test_the_ranks_batches_together_are_the_one_process_batch():
    """2 ranks x batch 2 read exactly the 4 samples that 1 process x batch 4 reads, pass after pass."""
    seen = [0]
    one = list(ResumableSampler(10, seed=3, position=lambda: seen[0]))
    ranks = [list(ResumableSampler(10, seed=3, position=lambda: seen[0], rank=r, world_size=2)) for r in (0, 1)]
    for b in range(len(one) // 4):  # global batch b
        together = ranks[0][2 * b:2 * b + 2] + ranks[1][2 * b:2 * b + 2]
        assert sorted(together) == sorted(one[4 * b:4 * b + 4])
    # From a saved position, the stream continues where it was, across the end of a pass.
    seen[0] = 8
    second_pass = list(ResumableSampler(10, seed=3, position=lambda: 10))
    assert list(ResumableSampler(10, seed=3, position=lambda: seen[0]))[:4] == (one + second_pass)[8:12]
    assert sorted(second_pass) == list(range(10)) and second_pass != one
    # Two ranks resumed mid-pass (6 global samples trained) read on exactly as one resumed process does.
    resumed_one = list(ResumableSampler(10, seed=3, position=lambda: 6))
    resumed = [list(ResumableSampler(10, seed=3, position=lambda: 6, rank=r, world_size=2)) for r in (0, 1)]
    assert resumed[0][:2] + resumed[1][:2] == [resumed_one[0], resumed_one[2], resumed_one[1], resumed_one[3]]
    assert resumed_one[:4] == (one + second_pass)[6:10]


def test_fsdp_is_fsdp2_through_lightnings_model_parallel_strategy():
    strategy = build_strategy("fsdp")
    assert isinstance(strategy, ShardedDataParallel) and strategy._tensor_parallel_size == 1
    assert build_strategy("ddp") == "ddp"


def test_a_distributed_fine_tune_without_a_cached_base_asks_for_one_first(tmp_path):
    cfg = compose_config("experiment=smoke", f"data.cache_dir={tmp_path / 'empty_cache'}", f"run_dir={tmp_path / 'run'}",
                         "position=pi", "scale=2", "trainer.devices=2", "trainer.strategy=ddp")
    with pytest.raises(ConfigError, match="pretrain it once in one process"):
        train(cfg)


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(cache_dir, one_process, tmp_path):
    run_train(cache_dir, tmp_path, "trainer.devices=2", "trainer.strategy=ddp", "optim.pretrain.batch_size=2",
              f"optim.pretrain.max_steps={STEPS}")
    got, expected = losses(tmp_path), one_process["losses"]
    assert sorted(got) == sorted(expected) == list(range(STEPS))
    for step in expected:  # the logged loss is the global batch's (synchronised over ranks)
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    assert_close_weights(torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"],
                         one_process["weights"])


# A sitecustomize that records the callback's perplexity and passkey calls per rank (rank-<r>.jsonl in OUT): every
# process of the run imports it, the rank the launcher starts included.
RECORDING_SITECUSTOMIZE = """
import json, os
import evaluation.callback as callback
read, decode = callback.sliding_window_perplexity, callback.run_passkey
def record(entry):
    with open(os.path.join({out!r}, "rank-" + os.environ.get("LOCAL_RANK", "0") + ".jsonl"), "a") as handle:
        handle.write(json.dumps(entry) + "\\n")
def recorded_read(model, documents, window, *args, **kwargs):
    result = read(model, documents, window, *args, **kwargs)
    record({{"window": window, "shard": kwargs["shard"], "tokens": result.tokens}})
    return result
def recorded_decode(*args, **kwargs):
    result = decode(*args, **kwargs)
    record({{"passkey_shard": kwargs["shard"], "distances": result.distances}})
    return result
callback.sliding_window_perplexity, callback.run_passkey = recorded_read, recorded_decode
"""


@pytest.mark.slow
def test_ddp_ranks_divide_the_by_step_perplexity_and_add_it_up(cache_dir, tmp_path):
    """Two DDP ranks each read half of the by-step evaluation's windows and decode half of its passkey distances
    (recorded per rank); the all-reduced row is what one process doing all of it with the same weights gets."""
    from omegaconf import OmegaConf

    from evaluation.callback import ExtensionEvalCallback
    from evaluation.passkey import plan_passkey
    from evaluation.perplexity import sliding_window_perplexity, window_stride

    run_dir, out, site = tmp_path / "run", tmp_path / "records", tmp_path / "site"
    out.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(RECORDING_SITECUSTOMIZE.format(out=str(out)))
    # A 256-token window holds the passkey prompt (the smoke model's 64 does not); 3 keys at each of 8 distances.
    long_enough = ["model.max_seq_len=256", "eval.every_n_steps=3", "eval.passkey_trials=3"]
    args = ["experiment=smoke", f"data.cache_dir={cache_dir}", f"run_dir={run_dir}", *COMMON, "trainer.devices=2",
            "trainer.strategy=ddp", "optim.pretrain.batch_size=2", "optim.pretrain.max_steps=3", *long_enough]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    row = json.loads((run_dir / "eval_by_step.json").read_text())[-1]
    assert row["step"] == 3 and row["passkey_window"] == 256
    windows = sorted(int(k.removeprefix("ppl_")) for k in row if k.startswith("ppl_"))
    model = load_pretrained(run_dir / "checkpoints" / "last.ckpt").build_model().eval()
    cfg = compose_config("experiment=smoke", f"data.cache_dir={cache_dir}", *COMMON, *long_enough)
    data = TextDataModule(**OmegaConf.to_container(cfg.data, resolve=True), seq_len=256)
    callback = ExtensionEvalCallback(windows=windows, max_documents=int(cfg.eval.max_documents), passkey_window=256,
                                     passkey_trials=3, batch_size=int(cfg.eval.batch_size))
    one_process = callback.evaluate_model(model, data, step=3)
    for window in windows:
        assert row[f"ppl_{window}"] == pytest.approx(one_process[f"ppl_{window}"], rel=1e-6), window
    assert (row["passkey_k_max"], row["passkey_success"]) == (one_process["passkey_k_max"], one_process["passkey_success"])

    # What each rank did at the last evaluation: a strict share of the windows and of the distances.
    records = [[json.loads(line) for line in (out / f"rank-{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)]
    reads = [[r for r in rank_records if "window" in r][-len(windows):] for rank_records in records]
    for window, first, second in zip(windows, *reads, strict=True):
        whole = sliding_window_perplexity(model, callback._documents, window, window_stride(256, window, 0.125),
                                          int(cfg.eval.batch_size)).tokens
        assert (first["shard"], second["shard"]) == ([0, 2], [1, 2])
        assert 0 < first["tokens"] < whole and first["tokens"] + second["tokens"] == whole
    decoded = [[r for r in rank_records if "passkey_shard" in r][-1] for rank_records in records]
    planned = plan_passkey(data.tokenizer, 256, callback.passkey_positions, 3, callback.seed).distances
    assert (decoded[0]["distances"], decoded[1]["distances"]) == (planned[0::2], planned[1::2])


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_saves_shards_resumes_and_consolidates(cache_dir, one_process, tmp_path):
    fsdp = ["trainer.devices=2", "trainer.strategy=fsdp", "trainer.activation_checkpointing=full",
            "optim.pretrain.batch_size=2"]
    run_train(cache_dir, tmp_path, *fsdp, "optim.pretrain.max_steps=4")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and is_sharded_checkpoint(last)
    assert sorted(p.name for p in last.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    refused = subprocess.run([sys.executable, "train.py", "experiment=smoke", f"data.cache_dir={cache_dir}",
                              f"run_dir={tmp_path}", *COMMON, *fsdp, "position=pi", "scale=2", f"resume={last}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "was trained with position=rope, scale=1" in refused.stderr, refused.stderr[-2000:]
    run_train(cache_dir, tmp_path, *fsdp, f"optim.pretrain.max_steps={STEPS}", f"resume={last}")

    got, expected = losses(tmp_path), one_process["losses"]
    assert sorted(got) == list(range(STEPS))  # steps 0-3 from the first run, 4-5 from the resumed one
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    # Old shard folders were replaced, not piled up: last and best, one folder each.
    assert len([p for p in last.parent.iterdir() if p.is_dir() and not p.is_symlink()]) == 2

    single = consolidate(last, tmp_path / "consolidated.ckpt")
    assert torch.load(single, weights_only=True)["global_step"] == STEPS
    assert_close_weights(torch.load(single, weights_only=True)["state_dict"], one_process["weights"])
    loaded = load_pretrained(single)  # an ordinary project checkpoint
    assert loaded.args.n_layers == 2 and loaded.position["kind"] == "rope"


@pytest.mark.slow
def test_fsdp_with_bf16_mixed_and_activation_checkpointing_trains_close_to_float32(cache_dir, one_process, tmp_path):
    run_train(cache_dir, tmp_path, "trainer.devices=2", "trainer.strategy=fsdp", "trainer.activation_checkpointing=full",
              "trainer.precision=bf16-mixed", "optim.pretrain.batch_size=2", "optim.pretrain.max_steps=3")
    got = losses(tmp_path)
    for step in range(3):
        assert got[step] == pytest.approx(one_process["losses"][step], abs=0.05), step


@pytest.mark.slow
def test_a_ddp_sweep_goes_on_past_a_diverged_job(cache_dir, tmp_path):
    """`-m` with trainer.strategy=ddp: Lightning starts rank 1 with the sweep's own command line, so both ranks run
    every job in order; a job that diverges on both (lr 1e12) fails in each, and the next job still trains on two."""
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "experiment=smoke", f"data.cache_dir={cache_dir}", "trainer.devices=2",
         "trainer.strategy=ddp", "stage=pretrain", "register_base=false", "optim.pretrain.max_steps=6",
         "optim.pretrain.lr=1e12,5e-4", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stderr.count("error: 1 job(s) of the sweep failed:\n  job 0 (") == 1  # printed by rank 0 only
    assert "the training loss became nan at step" in result.stderr
    assert not (tmp_path / "0" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "1" / "checkpoints" / "last.ckpt").exists()
    assert (result.stdout + result.stderr).count("All distributed processes registered. Starting with 2 processes") == 2
