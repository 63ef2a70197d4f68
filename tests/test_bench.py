"""bench/gpu_train_throughput.py on CPU: the --quick table end to end, and its OOM and goal bookkeeping."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_train_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_table_prints_hf_and_project_rows_with_numbers(tmp_path):
    """Every case and impl of the GPU table, at tiny shapes (about 10 s on 2 cores)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    number = r"\d[\d,]*"
    for impl in ("hf", "project", "project bare loop", "project ckpt=mlp"):
        assert re.search(rf"^\| [^|]+ \| {re.escape(impl)} \| {number} \|", done.stdout, re.M), impl
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {row["impl"] for row in rows} >= {"hf", "project", "bare", "project-nobar", "project-nosync", "project-mlp"}
    assert all(row["status"] == "ok" and row["tokens_per_s"] > 0 for row in rows)
    assert all(row["speed_vs_hf"] > 0 for row in rows if row["impl"] != "hf" and row["case"] in ("1b-8k-on", "1b-8k-off"))
    assert {row["case"] for row in rows} >= {"1b-window-128", "1b-window-256", "7b-pi-16k"}
    table = (tmp_path / "bench.md").read_text()
    assert "| config | impl | tokens/s | MFU |" in table and "Trainer overhead vs the bare loop" in table


def test_window_probe_stops_at_the_first_oom_and_reports_the_longest_fit(bench, monkeypatch):
    setup = bench.compose_setup(torch.device("cpu"), quick=True)
    calls = []

    def fake_run(impl, case, setup):
        calls.append(case.seq)
        if case.seq > 256:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return bench.Measured(tokens_per_s=1000.0, peak_gib=None)

    monkeypatch.setattr(bench, "run_impl", fake_run)
    report = bench.Report(["# test"], None)
    windows = [128, 256, 512, 1024]
    bench.run_window_probe(bench.window_cases(True, windows), setup, report, deadline=float("inf"))
    assert calls == [128, 256, 512]  # nothing after the first OOM
    assert [row.status for row in report.rows] == ["ok", "ok", "oom"]
    summary = bench.goals(report, windows)
    assert any("longest 1.1B window that trained: 256 (goal 1024): MISS" in line for line in summary)


def test_goals_compare_against_hf_in_the_same_run(bench):
    report = bench.Report(["# test"], None)
    rows = [
        bench.Row("1b-8k-on", "x", "hf", 8192, tokens_per_s=30000.0, peak_gib=18.0),
        bench.Row("1b-8k-on", "x", "project", 8192, tokens_per_s=40000.0, peak_gib=15.0, speed_vs_hf=4 / 3),
        bench.Row("1b-8k-on", "x", "bare", 8192, tokens_per_s=41000.0),
        bench.Row("1b-32k-on", "x", "project", 32768, memory_vs_hf=0.85),
        bench.Row("7b-pi-16k", "x", "project", 16384, status="oom", note="out of memory"),
    ]
    report.rows.extend(rows)
    summary = "\n".join(bench.goals(report, [131072]))
    assert "tokens/s at 8192, ckpt on (full): 1.33x HF (goal >= 1.3x): PASS" in summary
    assert "peak memory at 32768: 0.85x HF (goal <= 0.8x): MISS" in summary
    assert "7B full PI fine-tuning step at 16384: oom" in summary and "MISS" in summary.splitlines()[2]
    assert "Trainer overhead vs the bare loop at 8192: +2.4% (goal <= 5%): PASS" in summary
    assert "MFU" in summary


@pytest.mark.slow
def test_the_device_scripts_fsdp_step_trains_saves_sharded_and_resumes_on_cpu(tmp_path):
    """bench/run_gpu.sh fsdp with a shrunk model on the CPU and a stub nvidia-smi: the GPU smoke's own path."""
    stub = tmp_path / "bin" / "nvidia-smi"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 1234\n")
    stub.chmod(0o755)
    # bf16-mixed and the fused AdamW, as on the GPU (the combination the 1.1B smoke first failed on).
    shrink = ("trainer.accelerator=cpu trainer.precision=bf16-mixed optim.fused=true model.n_layers=2 model.dim=128 "
              "model.n_heads=4 model.n_kv_heads=2 model.ffn_dim=256 model.max_seq_len=128")
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "TMPDIR": str(tmp_path), "FSDP_SMOKE_OVERRIDES": shrink, "PI_LLAMA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["bash", "bench/run_gpu.sh", "fsdp"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    log = (tmp_path / "out" / "fsdp.log").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Restored all states from the checkpoint" in log and "fsdp: exit status 0" in log
    table = log.split("fsdp: metrics.csv\n")[1].split("fsdp: ")[0]
    steps = {int(row["step"]) for row in csv.DictReader(io.StringIO(table)) if row.get("train/loss")}
    assert steps == set(range(6))  # train/loss at steps 0-5: 4 steps, then 2 after the resume
    assert not (tmp_path / "fsdp-1.1b").exists()  # the ~26 GB of 1.1B checkpoints do not outlive the step


def test_ops_per_step_counts_the_recomputation_that_activation_checkpointing_adds():
    """bench/ops_per_step.py on the tiny model: full checkpointing runs every block's forward twice, so its
    step dispatches more operations than without; the optimizer's part does not depend on the mode."""
    spec = importlib.util.spec_from_file_location("ops_per_step", ROOT / "bench" / "ops_per_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.model_args("tiny", vocab_size=256, seq_len=64)
    tokens = torch.randint(0, 256, (1, 65))
    rows = {mode: module.measure(args, mode, tokens, torch.device("cpu"), steps=1) for mode in ("none", "mlp", "full")}
    assert rows["none"]["model_ops"] < rows["mlp"]["model_ops"] < rows["full"]["model_ops"], rows
    # The recomputed forward is the extra: between half and all of a forward's count again (the backward has
    # none of it), so full checkpointing adds between 15% and 70% to the step's operations.
    assert 1.15 < rows["full"]["model_ops"] / rows["none"]["model_ops"] < 1.7, rows
    assert rows["none"]["optimizer_ops"] == rows["full"]["optimizer_ops"] > 0
    assert all(row["ms"] > 0 for row in rows.values())
