"""Memory levers change memory, not results: chunked loss, activation checkpointing, atomic saves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from training.loss import next_token_nll
from training.memory import AtomicCheckpointIO, apply_activation_checkpointing


def _grads(model, tokens, chunk_tokens=0):
    model.zero_grad()
    hidden = model.hidden_states(tokens[:, :-1])
    nll = next_token_nll(hidden, model.output.weight, tokens[:, 1:], chunk_tokens)
    nll.backward()
    # By position, not name: a checkpoint wrapper renames parameters (its state dict does not).
    return nll.detach(), [p.grad.clone() for p in model.parameters()]


def test_chunked_loss_equals_the_plain_loss_and_gradients():
    model = tiny_model({"kind": "pi", "scale": 2.0}).train()
    tokens = torch.randint(0, model.args.vocab_size, (3, 41))
    plain, plain_grads = _grads(model, tokens)
    chunked, chunked_grads = _grads(model, tokens, chunk_tokens=7)  # 120 tokens in uneven chunks
    reference = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(plain, reference.detach())
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-4)
    for got, grad in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "mlp"])
def test_activation_checkpointing_keeps_names_and_gradients(mode):
    model = tiny_model({"kind": "rope"}).train()
    tokens = torch.randint(0, model.args.vocab_size, (2, 33))
    names = list(model.state_dict())
    _, expected = _grads(model, tokens)
    apply_activation_checkpointing(model, mode)
    assert list(model.state_dict()) == names  # checkpoints stay loadable either way
    _, got = _grads(model, tokens)
    for grad_got, grad in zip(got, expected, strict=True):
        torch.testing.assert_close(grad_got, grad, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_rejects_unknown_modes():
    with pytest.raises(ValueError, match="activation_checkpointing='sometimes'"):
        apply_activation_checkpointing(tiny_model(), "sometimes")


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
