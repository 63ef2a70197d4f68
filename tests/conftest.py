import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model import ModelArgs, build_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def tiny_args(**changes) -> ModelArgs:
    """A 2-layer GQA model small enough for exact float32 comparisons in milliseconds."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=16, max_seq_len=32)
    base.update(changes)
    return ModelArgs(**base)


def tiny_model(position=None, std: float = 0.1, **changes):
    """A tiny model with a larger init than training uses, so position errors show in the logits."""
    model = build_model(tiny_args(**changes), position).eval()
    model.reset_parameters(std=std)
    return model
