"""Operations dispatched per training step, by activation-checkpointing mode, and the step's time.

A small model on a large GPU is bound by per-step host work, not by arithmetic: the 28M reproduction model
took about as long a step on an H100/H200 (61-68 ms in the stages' last logged intervals) whether the step
held 2,048, 8,192 or 16,384 tokens. Every aten operation costs host time to dispatch, and most launch a
kernel (views and detaches do not), so their count per step is a proxy for that time which a CPU can
measure, and activation checkpointing's recomputation shows up in it directly.

    python bench/ops_per_step.py                                   # model=medium, 1 x 2048 tokens, CPU
    python bench/ops_per_step.py --device cuda --steps 20          # the same, with the step's time on a GPU

One step: forward under bf16 autocast, the chunked next-token loss, backward, gradient-norm clipping and
fused AdamW (train.py's optimizer on CUDA). Not included: Lightning's own per-step work, the non-finite-loss
flag and the perplexity metric's update, and train.py's second parameter group (no weight decay), so the
optimizer column is close to, not exactly, train.py's. Times are medians of --steps steps after two warm-up
steps. Counts differ somewhat between CPU and CUDA (autocast and attention dispatch there differ).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelArgs, build_model  # noqa: E402
from training.loss import next_token_nll  # noqa: E402
from training.memory import CHECKPOINTING, apply_activation_checkpointing  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched while active (views and casts included)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def model_args(name: str, vocab_size: int, seq_len: int) -> ModelArgs:
    """The model group's file, as train.py composes it, with the tokenizer's vocabulary filled in."""
    from omegaconf import OmegaConf

    fields = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    fields.update(vocab_size=vocab_size, max_seq_len=max(seq_len, int(fields["max_seq_len"])))
    return ModelArgs.from_dict(fields)


def measure(args: ModelArgs, mode: str, tokens: torch.Tensor, device: torch.device, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(args).to(device)
    if mode != "none":
        apply_activation_checkpointing(model, mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train.py on CUDA

    def model_part() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hidden = model.hidden_states(tokens[:, :-1])
            loss = next_token_nll(hidden, model.output.weight, tokens[:, 1:], 8192) / tokens[:, 1:].numel()
        loss.backward()

    def optimizer_part() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: optimizer state, allocator, kernels chosen
        model_part()
        optimizer_part()
    with CountOps() as model_ops:
        model_part()
    with CountOps() as optimizer_ops:
        optimizer_part()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model_part()
        optimizer_part()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"model_ops": sum(model_ops.counts.values()), "optimizer_ops": sum(optimizer_ops.counts.values()),
            "ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medium", help="a conf/model/ file (default: medium, the GPU reproduction's)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="the bundled tokenizer's size")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=list(CHECKPOINTING), choices=CHECKPOINTING)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode (the median is reported)")
    args = parser.parse_args()
    device = torch.device(args.device)
    margs = model_args(args.model, args.vocab_size, args.seq_len)
    tokens = torch.randint(0, args.vocab_size, (args.batch, args.seq_len + 1), device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"model={args.model}, {args.batch} x {args.seq_len} tokens, bf16 autocast, {where}, torch {torch.__version__}")
    print("| activation_checkpointing | ops: forward + backward | ops: clip + AdamW | ms a step (median) |")
    print("|---|---|---|---|")
    for mode in args.modes:
        row = measure(margs, mode, tokens, device, args.steps)
        print(f"| {mode} | {row['model_ops']} | {row['optimizer_ops']} | {row['ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
