"""GPU checks (run with -m gpu on a CUDA machine): fast attention kernels only, one train(cfg) step with
MFU, float32 rotary tables under autocast, and the chunked loss in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import ModelArgs, build_model
from training.loss import next_token_nll
from training.memory import apply_activation_checkpointing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize(
    ("dim", "n_heads", "n_kv_heads"),
    [(2048, 32, 4), (4096, 32, 32)],  # TinyLlama's grouped-query layer, LLaMA-7B's multi-head layer
    ids=["gqa-tinyllama", "mha-7b"],
)
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_training_attention_runs_on_fast_sdpa_kernels_only(dim, n_heads, n_kv_heads, checkpointing):
    """With the math backend off, a fallback (a mask, float32 q/k/v, unsupported GQA) raises instead of crawling."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = ModelArgs(dim=dim, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=512, ffn_dim=256,
                     max_seq_len=1024)
    with CUDA:
        model = build_model(args, {"kind": "pi", "scale": 4.0}).train()
    apply_activation_checkpointing(model, checkpointing)  # the backward then recomputes attention too
    tokens = torch.randint(0, args.vocab_size, (1, 4097), device=CUDA)
    fast = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(fast):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model.hidden_states(tokens[:, :-1])
            nll = next_token_nll(hidden, model.output.weight, tokens[:, 1:], chunk_tokens=1024)
        nll.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(nll)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kv_cache_decoding_with_grouped_heads_runs_on_fused_sdpa_kernels_only(dtype):
    """A passkey prompt: prefill into an empty cache, a masked chunk on top, then single tokens, with grouped-query
    heads, in bf16 and float32 (evaluate's default). No call may need the math kernel, which materialises the
    (b, h, n, m) scores: 128 GiB at 32k tokens with 32 heads in float32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = ModelArgs(dim=2048, n_layers=1, n_heads=32, n_kv_heads=4, vocab_size=512, ffn_dim=256, max_seq_len=1024)
    with CUDA:
        model = build_model(args, {"kind": "pi", "scale": 4.0}).eval().to(dtype)
    tokens = torch.randint(0, args.vocab_size, (2, 4096 + 64 + 2), device=CUDA)
    cache = model.new_cache(2, tokens.shape[1])
    fast = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(fast), torch.no_grad():
        for start, end in ((0, 4096), (4096, 4160), (4160, 4161), (4161, 4162)):
            logits = model(tokens[:, start:end], cache)
    torch.cuda.synchronize()
    assert torch.isfinite(logits).all()


def test_attention_inputs_are_bf16_under_autocast(monkeypatch):
    """SDPA sees bf16 q/k/v (the flash kernels' dtype) and no mask, though weights and rotary tables are float32."""
    seen: list[torch.dtype] = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.extend([q.dtype, k.dtype, v.dtype])
        assert not args and kwargs.get("attn_mask") is None and kwargs.get("is_causal") is True
        return original(q, k, v, *args, **kwargs)

    args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128, ffn_dim=256, max_seq_len=256)
    with CUDA:
        model = build_model(args, {"kind": "pi", "scale": 2.0})
    tokens = torch.randint(0, args.vocab_size, (2, 512), device=CUDA)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.hidden_states(tokens)
    assert seen and set(seen) == {torch.bfloat16}


def test_rotary_tables_stay_float32_under_autocast():
    args = ModelArgs(dim=256, n_layers=1, n_heads=4, vocab_size=128, ffn_dim=256, max_seq_len=512)
    with CUDA:
        model = build_model(args, {"kind": "pi", "scale": 16.0})
    length = 8192
    tokens = torch.randint(0, args.vocab_size, (1, length), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.hidden_states(tokens)
        rotation = model.position.rotation(0, length, length, CUDA)
    assert model.position._cos.dtype == model.position._sin.dtype == torch.float32
    assert rotation.cos.dtype == rotation.sin.dtype == torch.float32 and rotation.cos.device.type == "cuda"
    # Against float64 angles: positions up to 8191/16 stay exact to float32 rounding (bf16 tables: ~4e-3 off).
    positions = torch.arange(length, dtype=torch.float64) / 16.0
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim)
    angles = torch.outer(positions, inv_freq)
    want = torch.cat((angles.cos(), angles.cos()), dim=-1)
    assert (rotation.cos.cpu().double() - want).abs().max() < 1e-5


def test_chunked_loss_matches_the_plain_loss_in_bf16_on_gpu():
    vocab, dim, n = 32000, 512, 4096
    hidden = torch.randn(2, n // 2, dim, device=CUDA, requires_grad=True)
    weight = (torch.randn(vocab, dim, device=CUDA) * dim**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (2, n // 2), device=CUDA)

    def run(chunk_tokens: int):
        hidden.grad = weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll = next_token_nll(hidden, weight, targets, chunk_tokens)
        nll.backward()
        return nll.detach(), hidden.grad.clone(), weight.grad.clone()

    plain, plain_hidden, plain_weight = run(0)
    chunked, chunked_hidden, chunked_weight = run(1000)  # uneven chunks, across the batch boundary
    assert plain.dtype == chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-4, atol=0)
    assert relative_error(chunked_hidden, plain_hidden) < 1e-2
    assert relative_error(chunked_weight, plain_weight) < 1e-2
    # Both are bf16-logit approximations of the float64 loss.
    logits = hidden.detach().double().flatten(0, 1) @ weight.detach().double().T
    reference = F.cross_entropy(logits, targets.flatten(), reduction="sum")
    assert abs(chunked.double().item() - reference.item()) / reference.item() < 1e-2


def test_one_train_step_on_gpu_logs_mfu(tmp_path):
    """train(cfg) with trainer=gpu; three steps, since Throughput starts its clock after the first."""
    from test_training import compose_config

    from training.run import train

    cfg = compose_config("experiment=smoke", "trainer=gpu", f"data.cache_dir={tmp_path / 'cache'}",
                         f"run_dir={tmp_path / 'run'}", "stage=pretrain", "optim.pretrain.max_steps=3")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.activation_checkpointing == "full"
    result = train(cfg)
    assert result.last_checkpoint.exists()
    assert torch.isfinite(torch.tensor(result.metrics["train/loss"]))
    assert result.metrics["perf/tokens_per_s"] > 0
    assert 0 < result.metrics["perf/mfu"] < 1
    assert 0 < result.metrics["perf/peak_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
