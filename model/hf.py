"""The HF transformers layout: parameter names and config.json, both directions, and HF folders.

The project already uses HF's half-split rotary layout, so the map is a pure renaming.
An HF folder holds config.json and the weights as model.safetensors, as safetensors shards
listed in model.safetensors.index.json, or as pytorch_model*.bin (+ index) from older saves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .args import ModelArgs
from .checkpoints import (
    CheckpointError,
    Pretrained,
    cast_tensor,
    check_tokenizer,
    resolve_dtype,
    safe_torch_load,
    tokenizer_info,
)

log = logging.getLogger(__name__)

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


# The rope_scaling keys each type is read with; any other key may change the frequencies, so it is refused
# rather than dropped. `finetuned` (early YaRN releases) is informational: transformers ignores it too.
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate", "finetuned"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}
_ROPE_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _yarn_mscale(factor: float, weight: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * weight * ln(s) + 1 (1 when nothing is scaled)."""
    return 0.1 * weight * math.log(factor) + 1.0 if factor > 1 else 1.0


def from_hf_config(config: Mapping[str, Any]) -> tuple[ModelArgs, dict[str, Any]]:
    """(ModelArgs, position config) from an HF config.json (legacy `rope_scaling` or newer `rope_parameters`).

    The project's window is the base window L whose multiple L x scale the model reads; HF's
    `max_position_embeddings` is, depending on the type and the model's age, either that extended window or L
    itself. For YaRN and LLaMA 3 scaling the frequencies follow `original_max_position_embeddings`, kept as the
    position's `original_window` (LLaMA 3.1: 8192, while it reads 131072 = 16384 x 8).
    """
    if not isinstance(config, Mapping):
        raise ValueError("it is not a JSON object of settings")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"its rope_scaling is {rope!r}, not a JSON object")
    rope = dict(rope)
    theta = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in _ROPE_KEYS:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(_ROPE_KEYS)}")
    unknown = sorted(set(rope) - _ROPE_KEYS[rope_type] - _ROPE_COMMON_KEYS)
    if unknown:
        raise ValueError(f"its {rope_type} rope scaling has key(s) {unknown} that this loader does not implement "
                         f"(it reads {sorted(_ROPE_KEYS[rope_type])}), so the model would be read with other frequencies")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor={rope['partial_rotary_factor']} rotates only part of each head; LLaMA rotates all of it")
    if rope.get("truncate", True) is False:
        raise ValueError("its yarn rope scaling sets truncate=false, an unrounded ramp this project does not implement")
    max_pos = int(config.get("max_position_embeddings", 2048))
    original = int(rope.get("original_max_position_embeddings") or max_pos)  # transformers' default, too
    given = rope.get("factor")
    factor = float(given) if given is not None else (max_pos / original if rope_type == "yarn" else 1.0)
    if rope_type != "default" and not factor >= 1:
        raise ValueError(f"its {rope_type} rope scaling has factor={rope.get('factor')!r}; a factor must be >= 1")
    position: dict[str, Any]
    if rope_type == "default":
        window, position = max_pos, {"kind": "rope"}
    elif rope_type == "linear":
        # max_position_embeddings is usually the extended window (LLaMA-2-7B-32K: 32768 at factor 8), but
        # some releases keep the original one there and state the extended one as max_sequence_length
        # (Vicuna/LongChat 16K: 4096 and 16384 at factor 4).
        extended = max_pos
        if int(config.get("max_sequence_length") or 0) == round(max_pos * factor):
            extended = int(config["max_sequence_length"])
        window, position = round(extended / factor), {"kind": "pi", "scale": factor}
    elif rope_type == "dynamic":
        if factor == 1.0:  # transformers still grows the base past the window; here scale 1 means no scaling
            raise ValueError("its dynamic rope scaling has factor 1, which transformers reads as growing the base past the "
                             "window and this project as no scaling; set the factor the model was meant for")
        window, position = max_pos, {"kind": "dynamic", "scale": factor}
    else:  # yarn, llama3: the extended window is max_position_embeddings when it exceeds the original one
        extended = max_pos if max_pos > original else round(original * factor)
        window = round(extended / factor)
        if rope_type == "yarn":
            position = {"kind": "yarn", "scale": factor, "original_window": original,
                        "beta_fast": float(rope.get("beta_fast") or 32.0), "beta_slow": float(rope.get("beta_slow") or 1.0)}
            attention = rope.get("attention_factor")
            if attention is None and rope.get("mscale") and rope.get("mscale_all_dim"):
                # transformers' rule for DeepSeek-style configs: the ratio of two weighted YaRN temperatures
                attention = _yarn_mscale(factor, float(rope["mscale"])) / _yarn_mscale(factor, float(rope["mscale_all_dim"]))
            if attention is not None:
                position["attention_factor"] = float(attention)
        else:
            position = {"kind": "llama3", "scale": factor, "original_window": original,
                        "low_freq_factor": float(rope["low_freq_factor"]), "high_freq_factor": float(rope["high_freq_factor"])}
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


# ----------------------------------------------------------------------------- folders

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # HF's own default shard size


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder, in the order its index lists them."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a valid weight index (no 'weight_map'); copy it again from the original download.") from None
            files = list(dict.fromkeys(weight_map.values()))
            for name in files:
                if not (folder / name).is_file():
                    raise CheckpointError(f"{index} lists shard {name} but {folder / name} does not exist; copy every shard of the checkpoint.")
            return [folder / name for name in files]
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"{folder} has no weights: expected model.safetensors, model.safetensors.index.json with its shards, "
        "or pytorch_model.bin; copy the weight files next to config.json."
    )


def load_hf(folder: str | os.PathLike, *, dtype: str | torch.dtype | None = None) -> Pretrained:
    """An HF LlamaForCausalLM folder as a Pretrained in the project's names (tensors cast to `dtype` as they are read)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; copy the config.json that came with the HF weights into that folder.")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path} is not readable JSON ({error}); copy it again from the original download.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object of model settings; copy it again from the original download.")
    _check_llama_config(config, config_path)
    try:
        args, position = from_hf_config(config)
    except (KeyError, TypeError, ValueError) as error:
        detail = f"it lacks {error}" if isinstance(error, KeyError) else str(error).rstrip(".")
        raise CheckpointError(f"{config_path} does not describe a LLaMA this project can build: {detail}.") from None
    dtype = resolve_dtype(dtype)
    state: dict[str, Tensor] = {}
    for path in hf_weight_files(folder):
        for hf_name, tensor in _read_weights(path):
            try:
                name = from_hf_name(hf_name)
            except KeyError as error:
                raise CheckpointError(f"{path}: {error.args[0]}") from None
            if name is not None:
                state[name] = cast_tensor(tensor, dtype)
    if config.get("tie_word_embeddings") and "output.weight" not in state and "tok_embeddings.weight" in state:
        # LLaMA 3.2 1B/3B read logits through the embedding matrix and save no lm_head; the project's LLaMA has
        # its own output matrix, so it starts as a copy (a copy, not a view: safetensors refuses shared tensors).
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    # HF's LLaMA 3 repositories keep Meta's tokenizer.model (tiktoken) under original/, beside tokenizer.json.
    found = [t for t in (folder / "tokenizer.model", folder / "original" / "tokenizer.model") if t.is_file()]
    tokenizer_path = found[0] if found else None
    if tokenizer_path is not None:
        check_tokenizer(args, tokenizer_info(tokenizer_path))
    return Pretrained(args, position, state, tokenizer_path, "hf", {"path": str(folder)})


def _check_llama_config(config: Mapping[str, Any], path: Path) -> None:
    """Refuse configs whose architecture differs from the project's LLaMA in ways the weights would hide."""
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{path} describes a {model_type!r} model; only model_type 'llama' (LlamaForCausalLM) can be loaded.")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path} uses hidden_act={config['hidden_act']!r}; LLaMA's SwiGLU needs 'silu'.")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{path} sets {flag}=true; the project's LLaMA has no bias terms, so these weights cannot be loaded.")


def _read_weights(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs of one weight file, read one tensor at a time."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except Exception as error:  # safetensors raises its own error types for a damaged file
            raise CheckpointError(f"{path} is not a readable safetensors file ({str(error)[:160]}); the file is truncated or corrupt, so copy it again.") from None
    else:
        state = safe_torch_load(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a dict of tensors; it is not an HF weight file.")
        for name in list(state):
            yield name, state.pop(name)  # popped so the file's dict stops referencing what was taken


def save_hf(pretrained: Pretrained, folder: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write config.json, generation_config.json, model.safetensors (sharded above max_shard_bytes),
    tokenizer.model and, for a sentencepiece tokenizer, tokenizer_config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    try:
        config = to_hf_config(pretrained.args, pretrained.position)
    except ValueError as error:
        raise CheckpointError(f"cannot export to HF transformers: {str(error).rstrip('.')}.") from None
    state = {}
    for name, tensor in pretrained.state_dict.items():
        try:
            state[to_hf_name(name)] = tensor.detach().contiguous()
        except KeyError as error:
            raise CheckpointError(f"cannot export to HF transformers: {error.args[0].rstrip('.')}.") from None
    if pretrained.tokenizer_path is not None:
        tok = tokenizer_info(pretrained.tokenizer_path)
        config["bos_token_id"], config["eos_token_id"] = tok.bos_id, tok.eos_id
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    if floating:
        config["torch_dtype"] = str(floating[0]).removeprefix("torch.")
    shards = _plan_shards(state, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        file_name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: state[name] for name in names}, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if pretrained.tokenizer_path is not None:
        shutil.copyfile(pretrained.tokenizer_path, folder / "tokenizer.model")
        if tok.kind == "sentencepiece":
            # The window the model reads (for dynamic NTK max_position_embeddings is the original one instead).
            extended = round(pretrained.args.max_seq_len * float(pretrained.position.get("scale") or 1.0))
            tokenizer_config = sentencepiece_tokenizer_config(pretrained.tokenizer_path, extended)
            (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        else:
            log.warning("this export writes no HF tokenizer configuration for LLaMA 3's tiktoken tokenizer.model: copy "
                        "tokenizer.json and tokenizer_config.json of the model's HF release into the exported folder.")


def sentencepiece_tokenizer_config(path: str | os.PathLike, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json for HF's LlamaTokenizer over a sentencepiece tokenizer.model.

    Without it AutoTokenizer falls back to a generic tokenizer that prepends no BOS, and LLaMA models are
    trained and evaluated (here too) with one. The special tokens are the model file's own pieces.
    """
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))

    def piece(index: int) -> str | None:
        return processor.id_to_piece(index) if index >= 0 else None

    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": piece(processor.bos_id()),
        "eos_token": piece(processor.eos_id()),
        "unk_token": piece(processor.unk_id()),
        "pad_token": piece(processor.pad_id()),
        "legacy": False,  # as Meta's LLaMA 2 HF release; either way ordinary text encodes as sentencepiece does
        "clean_up_tokenization_spaces": False,  # decode gives the text back as it was
        "model_max_length": max_length,
    }


def _plan_shards(state: Mapping[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy groups of tensors, in order, none over max_shard_bytes unless one tensor alone is."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards
