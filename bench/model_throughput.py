"""Forward+backward tokens/s of the project's Llama vs HF transformers' LlamaForCausalLM, same shape,
same process, same inputs, alternating runs; the median of repeated steps is reported.

    python bench/model_throughput.py                       # CPU, the bundled default shape
    python bench/model_throughput.py --shape tinyllama-1.1b --seq 2048 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelArgs, build_model  # noqa: E402
from model.args import PRESETS  # noqa: E402
from model.hf import to_hf_config, to_hf_state_dict  # noqa: E402

SHAPES = {
    "small": ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=64, max_seq_len=256),
    **PRESETS,
}


def step_time(model, logits_of, tokens: torch.Tensor, device: torch.device) -> float:
    """Seconds for one forward + backward of next-token cross-entropy."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    logits = logits_of(model, tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import transformers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    ours = build_model(shape, {"kind": "rope"}).to(device=device, dtype=dtype).train()
    config = transformers.LlamaConfig(**to_hf_config(shape, {"kind": "rope"}), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    tokens = torch.randint(0, shape.vocab_size, (args.batch, args.seq + 1), device=device)

    runs = {"project": (ours, lambda m, x: m(x)), "hf": (hf, lambda m, x: m(input_ids=x).logits)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, (model, logits_of) in runs.items():  # warm-up
        step_time(model, logits_of, tokens, device)
    for _ in range(args.steps):  # alternate so drifts in machine load hit both alike
        for name, (model, logits_of) in runs.items():
            times[name].append(step_time(model, logits_of, tokens, device))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# {args.shape} seq={args.seq} batch={args.batch} {args.dtype} on {device.type} ({where}); "
          f"torch {torch.__version__}, transformers {transformers.__version__}; median of {args.steps} steps")
    tokens_per_step = args.batch * args.seq
    medians = {name: statistics.median(t) for name, t in times.items()}
    print("| model | s/step | tokens/s |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {tokens_per_step / seconds:,.0f} |")
    print(f"project / hf speed: {medians['hf'] / medians['project']:.2f}x")


if __name__ == "__main__":
    main()
