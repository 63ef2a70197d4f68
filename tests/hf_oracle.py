"""HF transformers' LlamaForCausalLM as a test oracle, built from a config (never from the hub)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from model import Llama
from model.hf import to_hf_config, to_hf_state_dict


def hf_twin(model: Llama, position: Mapping[str, Any]):
    """An HF model with the project's weights copied in through the project's own HF weight map."""
    transformers = __import__("transformers")
    config = transformers.LlamaConfig(**to_hf_config(model.args, position), attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert not unexpected, unexpected
    assert all("rotary_emb" in name for name in missing), missing
    return hf


@torch.no_grad()
def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=tokens).logits
