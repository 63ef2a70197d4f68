"""A sharded Meta checkpoint loads without holding two copies of the weights (measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")

# Anonymous memory is what the process itself allocated; mmap'd checkpoint pages are file-backed
# page cache the kernel can drop, so RssAnon is the measure of "copies in memory".
MEASURE = """
import sys, threading, time
sys.path.insert(0, sys.argv[2])
import torch
from model import ModelArgs, build_model
from model.checkpoints import load_pretrained

# The first model built on the meta device imports torch's meta kernels (~70 MB of Python objects,
# whatever the checkpoint's size): pay that before the baseline.
with torch.device("meta"):
    build_model(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=8))

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

base = anon()
peak = [base]
done = threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
pretrained = load_pretrained(sys.argv[1])
done.set()
thread.join()
peak[0] = max(peak[0], anon())
print(peak[0] - base, sum(t.numel() * t.element_size() for t in pretrained.state_dict.values()))
"""


def _write_fake_meta(folder: Path, n_shards: int = 2) -> int:
    """A ~220 MB float32 Meta checkpoint (contents irrelevant, shapes real) in `n_shards` shards; returns its size."""
    dim, layers, heads, vocab, hidden = 1024, 3, 8, 8000, 2816
    params = {"dim": dim, "n_layers": layers, "n_heads": heads, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": vocab}
    (folder / "params.json").write_text(json.dumps(params))
    total = 0
    for rank in range(n_shards):
        part = lambda rows, cols: torch.zeros(rows, cols)  # noqa: E731
        shard = {
            "tok_embeddings.weight": part(vocab, dim // n_shards),
            "norm.weight": torch.ones(dim),
            "output.weight": part(vocab // n_shards, dim),
        }
        for i in range(layers):
            p = f"layers.{i}."
            shard |= {
                p + "attention.wq.weight": part(dim // n_shards, dim),
                p + "attention.wk.weight": part(dim // n_shards, dim),
                p + "attention.wv.weight": part(dim // n_shards, dim),
                p + "attention.wo.weight": part(dim, dim // n_shards),
                p + "feed_forward.w1.weight": part(hidden // n_shards, dim),
                p + "feed_forward.w2.weight": part(dim, hidden // n_shards),
                p + "feed_forward.w3.weight": part(hidden // n_shards, dim),
                p + "attention_norm.weight": torch.ones(dim),
                p + "ffn_norm.weight": torch.ones(dim),
            }
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
        total += sum(t.numel() * t.element_size() for name, t in shard.items() if rank == 0 or "norm" not in name)
        del shard
    return total


def test_merging_shards_keeps_one_copy_of_the_weights(tmp_path):
    size = _write_fake_meta(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peak, loaded = map(int, done.stdout.split())
    assert loaded == size
    # One merged copy plus a few tensors in flight; loading the shards into memory and then
    # concatenating them would need two copies (2x).
    assert peak < 1.5 * size, f"peak anonymous memory {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"
