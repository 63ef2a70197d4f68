"""The HF transformers layout: parameter names and config.json, both directions.

The project already uses HF's half-split rotary layout, so the map is a pure renaming.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor

from .args import ModelArgs

# project name -> HF name; "{i}" is the layer index.
_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_HF_TO_TOP = {v: k for k, v in _TOP_MAP.items()}


def to_hf_name(name: str) -> str:
    """Project parameter name -> HF LlamaForCausalLM name."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _LAYER_MAP:
        return f"model.layers.{match.group(1)}.{_LAYER_MAP[match.group(2)]}"
    raise KeyError(f"parameter {name!r} has no counterpart in HF's LlamaForCausalLM.")


def from_hf_name(name: str) -> str | None:
    """HF name -> project name; None for HF entries the project does not keep (rotary buffers)."""
    if name in _HF_TO_TOP:
        return _HF_TO_TOP[name]
    match = _HF_LAYER_RE.match(name)
    if match and match.group(2) in _HF_TO_LAYER:
        return f"layers.{match.group(1)}.{_HF_TO_LAYER[match.group(2)]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise KeyError(f"unexpected tensor {name!r} in an HF LLaMA checkpoint.")


def to_hf_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a project state dict for HF; refuses tensors HF cannot hold (a learned position table)."""
    return {to_hf_name(name): tensor for name, tensor in state.items()}


def from_hf_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    renamed = {from_hf_name(name): tensor for name, tensor in state.items()}
    renamed.pop(None, None)
    return renamed  # type: ignore[return-value]


# ----------------------------------------------------------------------------- config.json


def to_hf_config(args: ModelArgs, position: Mapping[str, Any]) -> dict[str, Any]:
    """LlamaConfig keyword arguments equivalent to (args, position).

    HF's `max_position_embeddings` means the extended window for linear / YaRN / llama3
    scaling but the *original* window for dynamic NTK, which reads it as its threshold.
    """
    kind = position.get("kind", "rope")
    scale = float(position.get("scale", 1.0) or 1.0)
    theta = float(position.get("theta") or args.rope_theta)
    original = int(position.get("original_window") or args.max_seq_len)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "max_position_embeddings": round(args.max_seq_len * scale),
        "rope_theta": theta,
        "rope_scaling": None,
    }
    if kind == "rope" or (scale == 1.0 and kind in ("pi", "ntk", "dynamic", "yarn", "llama3")):
        return config
    if kind == "pi":
        config["rope_scaling"] = {"rope_type": "linear", "factor": scale}
    elif kind == "ntk":  # static NTK is plain RoPE with a larger base
        d = args.head_dim
        config["rope_theta"] = theta * scale ** (d / (d - 2))
    elif kind == "dynamic":
        config["rope_scaling"] = {"rope_type": "dynamic", "factor": scale}
        config["max_position_embeddings"] = original
    elif kind == "yarn":
        config["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": scale,
            "original_max_position_embeddings": original,
            "beta_fast": float(position.get("beta_fast", 32.0)),
            "beta_slow": float(position.get("beta_slow", 1.0)),
        }
        if position.get("attention_factor") is not None:
            config["rope_scaling"]["attention_factor"] = float(position["attention_factor"])
    elif kind == "llama3":
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": scale,
            "original_max_position_embeddings": original,
            "low_freq_factor": float(position.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(position.get("high_freq_factor", 4.0)),
        }
    else:
        raise ValueError(f"position {kind!r} has no HF transformers equivalent; only rotary schemes can be exported.")
    return config


def from_hf_config(config: Mapping[str, Any]) -> tuple[ModelArgs, dict[str, Any]]:
    """(ModelArgs, position config) from an HF config.json (legacy `rope_scaling` or newer `rope_parameters`)."""
    if config.get("tie_word_embeddings"):
        raise ValueError("this HF config ties input and output embeddings; LLaMA checkpoints never do.")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    max_pos = int(config.get("max_position_embeddings", 2048))
    factor = float(rope.get("factor") or 1.0)
    if rope_type == "default":
        window, position = max_pos, {"kind": "rope"}
    elif rope_type == "linear":
        window, position = round(max_pos / factor), {"kind": "pi", "scale": factor}
    elif rope_type == "dynamic":
        window, position = max_pos, {"kind": "dynamic", "scale": factor}
    elif rope_type == "yarn":
        window = int(rope.get("original_max_position_embeddings") or max_pos / factor)
        position = {"kind": "yarn", "scale": factor, "beta_fast": rope.get("beta_fast") or 32.0, "beta_slow": rope.get("beta_slow") or 1.0}
        if rope.get("attention_factor") is not None:
            position["attention_factor"] = float(rope["attention_factor"])
    elif rope_type == "llama3":
        window = int(rope["original_max_position_embeddings"])
        position = {
            "kind": "llama3",
            "scale": factor,
            "low_freq_factor": float(rope["low_freq_factor"]),
            "high_freq_factor": float(rope["high_freq_factor"]),
        }
    else:
        raise ValueError(f"rope type {rope_type!r} in config.json is not supported; supported: default, linear, dynamic, yarn, llama3.")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise ValueError(f"config.json has head_dim={head_dim} but hidden_size/num_attention_heads={hidden // heads}; such models are not LLaMA-shaped.")
    args = ModelArgs(
        dim=hidden,
        n_layers=int(config["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        vocab_size=int(config["vocab_size"]),
        ffn_dim=int(config["intermediate_size"]),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_seq_len=window,
    )
    return args, position
