"""Meta's original checkpoint format: consolidated.NN.pth model-parallel shards plus params.json.

Two things differ from the project's layout. Large models are split over model-parallel ranks
(13B: 2 shards, 33B: 4, 65B/70B: 8), each shard holding a slice of every matrix; and Meta
rotates adjacent pairs (2i, 2i+1) of each query/key head as complex numbers, where the project
(like HF) rotates pairs (i, i + d/2). Loading merges the slices and permutes the rows of wq and
wk once per head; saving writes one unsplit shard in Meta's interleaved layout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from einops import rearrange
from torch import Tensor

from .args import ModelArgs
from .checkpoints import (
    META_SHARD,
    CheckpointError,
    Pretrained,
    cast_tensor,
    check_tokenizer,
    resolve_dtype,
    safe_torch_load,
    tokenizer_info,
)
from .llama import Llama

log = logging.getLogger(__name__)

# Dimension along which Meta's model-parallel layers slice each tensor; None: replicated on every rank.
# Column-parallel layers (outputs sliced) split dim 0, row-parallel ones (inputs sliced) dim 1.
_SPLIT_DIM: dict[str, int | None] = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
}
EMBEDDING = "tok_embeddings.weight"  # dim 1 (LLaMA 1/2: ParallelEmbedding), dim 0 (LLaMA 3: VocabParallelEmbedding)
# LLaMA 1 shards also carry the rotary inverse frequencies; the model computes its own.
_IGNORED = {"rope.freqs"}

PARAMS_KEYS = {
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
    "max_seq_len",
}
# LLaMA 3.1's use_scaled_rope: its apply_scaling hard-codes these. LLaMA 3.2's 1B and 3B text models set the
# same flag but were released with factor 32 (HF's conversion script says so; params.json cannot), and both
# generations read a 131072-token context.
LLAMA31_SCALING = {"kind": "llama3", "scale": 8.0, "original_window": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA32_SHAPES = {(2048, 16), (3072, 28)}  # (dim, n_layers) of LLaMA 3.2 1B and 3B
SCALED_ROPE_CONTEXT = 131072


def scaled_rope(dim: int, n_layers: int) -> dict[str, Any]:
    """The llama3 position config that Meta's use_scaled_rope stands for, for a model of this shape."""
    factor = 32.0 if (dim, n_layers) in LLAMA32_SHAPES else 8.0
    return {**LLAMA31_SCALING, "scale": factor}


# ----------------------------------------------------------------------------- rotary layout


def from_meta_layout(weight: Tensor, n_heads: int) -> Tensor:
    """Rows of a Meta wq/wk (interleaved pairs 2i, 2i+1) reordered to the half-split layout (i, i + d/2)."""
    return rearrange(weight, "(h i two) c -> (h two i) c", h=n_heads, two=2).contiguous()


def to_meta_layout(weight: Tensor, n_heads: int) -> Tensor:
    """The inverse of from_meta_layout: half-split rows back to Meta's interleaved pairs."""
    return rearrange(weight, "(h two i) c -> (h i two) c", h=n_heads, two=2).contiguous()


# ----------------------------------------------------------------------------- params.json


def guess_max_seq_len(params: Mapping[str, Any]) -> tuple[int, str]:
    """The pretraining window params.json leaves out, from the keys each LLaMA generation introduced."""
    theta = float(params.get("rope_theta") or 10000.0)
    if theta == 1e6:
        return 16384, "Code Llama (rope_theta 1e6)"
    if theta >= 500000:
        return 8192, "LLaMA 3 (rope_theta 500000)"
    if "n_kv_heads" in params or float(params.get("norm_eps", 1e-6)) == 1e-5:
        return 4096, "LLaMA 2 (n_kv_heads or norm_eps 1e-5)"
    return 2048, "LLaMA 1 (norm_eps 1e-6, no newer keys)"


def args_from_params(
    params: Mapping[str, Any], *, vocab_size: int | None = None, max_seq_len: int | None = None, source: str = "params.json"
) -> tuple[ModelArgs, dict[str, Any], str]:
    """(ModelArgs, position config, how the window was chosen) from a Meta params.json.

    `vocab_size` stands in for params' -1 ("take it from the tokenizer"); `max_seq_len`
    overrides the window, which Meta's files do not record.
    """
    unknown = sorted(set(params) - PARAMS_KEYS)
    if unknown:
        raise CheckpointError(
            f"{source} has key(s) {unknown} this loader does not know and that may change the architecture; "
            f"only {sorted(PARAMS_KEYS)} are understood, so convert such a model with the tools of its release."
        )
    missing = sorted({"dim", "n_layers", "n_heads"} - set(params))
    if missing:
        raise CheckpointError(f"{source} lacks {missing}; use the params.json that came with the consolidated.*.pth shards.")
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:
        if vocab_size is None:
            raise CheckpointError(
                f"{source} has vocab_size={vocab} (take it from the tokenizer) but no tokenizer.model was found; "
                "put the tokenizer.model that came with the weights beside params.json."
            )
        vocab = int(vocab_size)
    try:
        shape = int(params["dim"]), int(params["n_layers"])
    except (TypeError, ValueError):
        raise CheckpointError(f"{source} has dim={params['dim']!r}, n_layers={params['n_layers']!r}; both must be integers.") from None
    position = scaled_rope(*shape) if params.get("use_scaled_rope") else {"kind": "rope"}
    if max_seq_len is not None:
        window, why = int(max_seq_len), "given explicitly"
    elif params.get("max_seq_len"):
        window, why = int(params["max_seq_len"]), "params.json max_seq_len"
    elif position["kind"] == "llama3":
        # Known, not guessed: the window is the one that scale multiplies to the released context (the
        # frequencies follow original_window, 8192).
        window = SCALED_ROPE_CONTEXT // int(position["scale"])
        why = f"LLaMA 3.1/3.2 (use_scaled_rope: a {SCALED_ROPE_CONTEXT}-token context at factor {position['scale']:g})"
    else:
        window, why = guess_max_seq_len(params)
    try:
        args = ModelArgs(
            dim=int(params["dim"]),
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=int(params["n_kv_heads"]) if params.get("n_kv_heads") else None,
            vocab_size=vocab,
            multiple_of=int(params.get("multiple_of", 256)),
            ffn_dim_multiplier=float(params["ffn_dim_multiplier"]) if params.get("ffn_dim_multiplier") is not None else None,
            norm_eps=float(params.get("norm_eps", 1e-6)),
            rope_theta=float(params.get("rope_theta") or 10000.0),
            max_seq_len=window,
        )
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source} does not describe a valid LLaMA: {error}") from None
    return args, position, why


def params_from_args(args: ModelArgs, position: Mapping[str, Any]) -> dict[str, Any]:
    """A params.json that Meta's own code reads back into the same model.

    Only keys that matter are written: LLaMA 1/2's ModelArgs refuses keys it does not have
    (rope_theta, n_kv_heads), and max_seq_len is passed separately by Meta's loader, so it
    is never written (a reload guesses it or takes an override).
    """
    kind = position.get("kind", "rope")
    scale = float(position.get("scale") or 1.0)
    theta = float(position.get("theta") or args.rope_theta)
    original = int(position.get("original_window") or args.max_seq_len)
    params: dict[str, Any] = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads}
    if args.n_kv_heads is not None and args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    params["vocab_size"] = args.vocab_size
    params.update(_ffn_params(args))
    params["norm_eps"] = args.norm_eps
    rotary = ("rope", "pi", "ntk", "dynamic", "yarn", "llama3")
    if kind not in rotary:
        raise CheckpointError(f"position {kind!r} cannot be written to Meta's format, which only describes rotary encodings (RoPE).")
    if kind == "ntk" and scale != 1.0:  # static NTK is plain RoPE with a larger base
        theta = theta * scale ** (args.head_dim / (args.head_dim - 2))
    elif kind == "llama3" and scale != 1.0:
        wanted = {k: v for k, v in scaled_rope(args.dim, args.n_layers).items() if k != "kind"}
        actual = {
            "scale": scale,
            "original_window": original,
            "low_freq_factor": float(position.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(position.get("high_freq_factor", 4.0)),
        }
        if actual != wanted:
            raise CheckpointError(
                f"llama3 scaling {actual} cannot be written to Meta's params.json, whose use_scaled_rope means exactly "
                f"{wanted}; export with --to hf, whose rope_scaling can say it."
            )
        params["use_scaled_rope"] = True
        if args.max_seq_len != SCALED_ROPE_CONTEXT // int(scale):
            # params.json has no window for Meta's loader (it passes max_seq_len itself); a reload reads this flag
            # as LLaMA 3.1's 131072-token context.
            log.warning("Meta's params.json cannot record this model's window %d x %g: read back, it is taken to be %d "
                        "x %g (LLaMA 3.1's context); pass max_seq_len=%d when loading it (--max-seq-len with "
                        "python -m model.convert)", args.max_seq_len, scale, SCALED_ROPE_CONTEXT // int(scale), scale,
                        args.max_seq_len)
    elif kind not in ("rope", "ntk") and scale != 1.0:
        raise CheckpointError(
            f"position {kind!r} with scale {scale:g} cannot be written to Meta's params.json, which only knows rope_theta "
            "and LLaMA 3.1's use_scaled_rope; export with --to hf, whose rope_scaling can say it."
        )
    if theta != 10000.0:
        params["rope_theta"] = theta
    return params


def _ffn_params(args: ModelArgs) -> dict[str, Any]:
    """multiple_of / ffn_dim_multiplier that make Meta's hidden-size rule give args.hidden_dim."""
    derived = args.with_(ffn_dim=None)
    if args.ffn_dim is None or derived.hidden_dim == args.ffn_dim:
        out: dict[str, Any] = {"multiple_of": args.multiple_of}
        if args.ffn_dim_multiplier is not None:
            out["ffn_dim_multiplier"] = args.ffn_dim_multiplier
        return out
    # An explicit hidden size (from an HF config): rounding up to a multiple of the size itself
    # gives the size back whenever the unrounded value lies in (0, size].
    base = int(2 * (4 * args.dim) / 3)
    out = {"multiple_of": args.ffn_dim}
    if base > args.ffn_dim:
        out["ffn_dim_multiplier"] = args.ffn_dim / base
    check = args.with_(ffn_dim=None, multiple_of=out["multiple_of"], ffn_dim_multiplier=out.get("ffn_dim_multiplier"))
    if check.hidden_dim != args.ffn_dim:
        raise CheckpointError(f"the hidden size {args.ffn_dim} cannot be expressed with Meta's multiple_of/ffn_dim_multiplier rule.")
    return out


# ----------------------------------------------------------------------------- loading


def find_tokenizer(folder: Path) -> Path | None:
    """tokenizer.model beside the shards, or one level up (Meta's LLaMA 1/2 downloads keep it there)."""
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def shard_paths(folder: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth in rank order, refusing gaps in the numbering."""
    found = {int(m.group(1)): folder / m.group(0) for m in (META_SHARD.match(p.name) for p in folder.iterdir()) if m}
    if not found:
        raise CheckpointError(f"{folder} has no consolidated.NN.pth shards; pass the folder that holds Meta's weights.")
    expected = list(range(len(found)))
    if sorted(found) != expected:
        missing = sorted(set(expected) - set(found)) or [len(found)]
        raise CheckpointError(
            f"{folder} has {len(found)} Meta shard(s) but consolidated.{missing[0]:02d}.pth is missing; copy every shard of the checkpoint."
        )
    return [found[i] for i in expected]


def load_meta(folder: str | os.PathLike, *, dtype: str | torch.dtype | None = None, max_seq_len: int | None = None) -> Pretrained:
    """Merge Meta's model-parallel shards into one state dict in the project's names and half-split layout."""
    folder = Path(folder)
    paths = shard_paths(folder)
    params_path = folder / "params.json"
    if not params_path.is_file():
        raise CheckpointError(
            f"{folder} has Meta shards but no params.json; copy the params.json that came with the weights into that folder."
        )
    try:
        params = json.loads(params_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{params_path} is not readable JSON ({error}); copy it again from the original download.") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{params_path} must hold a JSON object of model settings; copy it again from the original download.")
    dtype = resolve_dtype(dtype)
    tokenizer = find_tokenizer(folder)
    tok = tokenizer_info(tokenizer) if tokenizer else None
    # mmap'd loads: a shard costs page cache, not process memory, until its tensors are read.
    shards = [_load_shard(path) for path in paths]
    vocab = tok.vocab_size if tok else None
    if int(params.get("vocab_size", -1)) <= 0 and vocab is None and "output.weight" in shards[0]:
        vocab = sum(shard["output.weight"].shape[0] for shard in shards)  # output is always split by vocabulary rows
    args, position, window_note = args_from_params(params, vocab_size=vocab, max_seq_len=max_seq_len, source=str(params_path))
    guessed = max_seq_len is None and not params.get("max_seq_len") and position["kind"] != "llama3"
    if guessed and int(os.environ.get("RANK", "0")) == 0:
        # The window is the L that PI's scale multiplies: a wrong guess mis-sizes every extension. Meta's own
        # releases never record it (the guess is right for them); a folder this project exported does not either.
        log.warning("%s does not record the pretraining window; %d is assumed, as for %s. For weights pretrained at "
                    "another window N, convert them with python -m model.convert %s OUT --to hf --max-seq-len N and "
                    "load OUT instead", params_path, args.max_seq_len, window_note, folder)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Llama(args).state_dict().items()}
    names = [name for name in shards[0] if name not in _IGNORED]
    for name in names:
        if name not in expected:
            raise CheckpointError(
                f"tensor {name} in {paths[0]} is not part of a LLaMA with {args.n_layers} layers; check that params.json belongs to these shards."
            )
    missing = sorted(set(expected) - set(names))
    if missing:
        raise CheckpointError(f"{paths[0]} lacks tensor {missing[0]} (and {len(missing) - 1} more); the shard is incomplete, so copy it again.")
    state: dict[str, Tensor] = {}
    for name in names:
        pieces = [_take(shard, name, path) for shard, path in zip(shards, paths)]
        merged = _merge(name, pieces, paths, expected[name], args)
        del pieces  # the slices go as soon as the merged tensor exists
        if name.endswith("attention.wq.weight"):
            merged = from_meta_layout(merged, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            merged = from_meta_layout(merged, args.kv_heads)
        state[name] = cast_tensor(merged, dtype)
    for shard, path in zip(shards[1:], paths[1:]):
        extra = sorted(set(shard) - _IGNORED)
        if extra:
            raise CheckpointError(f"{path} has tensor {extra[0]} that {paths[0].name} lacks; the shards come from different checkpoints.")
    del shards
    if tok is not None:
        check_tokenizer(args, tok)
    return Pretrained(
        args=args,
        position=position,
        state_dict=state,
        tokenizer_path=tokenizer,
        source_format="meta",
        extra={"path": str(folder), "shards": len(paths), "max_seq_len_source": window_note},
    )


def _load_shard(path: Path) -> dict[str, Tensor]:
    shard = safe_torch_load(path)
    if not isinstance(shard, dict) or not all(isinstance(v, Tensor) for v in shard.values()):
        raise CheckpointError(f"{path} is not a plain dict of tensors as Meta saves them; it is not a Meta consolidated shard.")
    return shard


def _take(shard: dict[str, Tensor], name: str, path: Path) -> Tensor:
    """Remove `name` from a shard (so the shard stops referencing it) and return it."""
    if name not in shard:
        raise CheckpointError(f"{path} lacks tensor {name} that the first shard has; the shards come from different checkpoints.")
    return shard.pop(name)


def _merge(name: str, pieces: list[Tensor], paths: list[Path], expected: tuple[int, ...], args: ModelArgs) -> Tensor:
    """Join one tensor's model-parallel slices, checking every shape on the way."""
    first = tuple(pieces[0].shape)
    for piece, path in zip(pieces[1:], paths[1:]):
        if tuple(piece.shape) != first:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(piece.shape)} in {path.name} but {first} in {paths[0].name}; every "
                "model-parallel shard holds an equal slice, so the shards come from different checkpoints or one is damaged."
            )
    if len(pieces) == 1:
        dim = None
    elif name == EMBEDDING:
        dim = _embedding_split_dim(first, len(pieces), expected, args)
    else:
        dim = _SPLIT_DIM[name.split(".", 2)[-1] if name.startswith("layers.") else name]
    merged_shape = list(first)
    if dim is not None:
        merged_shape[dim] *= len(pieces)
    if tuple(merged_shape) != expected:
        raise CheckpointError(
            f"tensor {name} merges to shape {tuple(merged_shape)} from {len(pieces)} shard(s) but the model that "
            f"params.json describes needs {expected}; check that params.json belongs to these shards."
        )
    if dim is None:
        for piece, path in zip(pieces[1:], paths[1:]):
            if not torch.equal(piece, pieces[0]):
                raise CheckpointError(
                    f"tensor {name} is replicated on every model-parallel rank but differs between {paths[0].name} and "
                    f"{path.name}; the shards come from different checkpoints."
                )
        return pieces[0]
    return torch.cat(pieces, dim=dim)


def _embedding_split_dim(piece: tuple[int, ...], n: int, expected: tuple[int, ...], args: ModelArgs) -> int:
    """LLaMA 1/2 slice the embedding by feature (dim 1), LLaMA 3 by vocabulary (dim 0): see which fits."""
    fits = [d for d in (0, 1) if piece[d] * n == expected[d] and piece[1 - d] == expected[1 - d]]
    if len(fits) == 1:
        return fits[0]
    if len(fits) == 2:  # vocabulary as wide as the model: only the generation can tell
        return 0 if args.vocab_size >= 128000 or args.rope_theta >= 500000 else 1
    return 1  # neither fits; the shape check reports it


# ----------------------------------------------------------------------------- saving


def save_meta(pretrained: Pretrained, folder: str | os.PathLike) -> None:
    """Write consolidated.00.pth (one unsplit shard, Meta layout), params.json and tokenizer.model into `folder`."""
    folder = Path(folder)
    args = pretrained.args
    params = params_from_args(args, pretrained.position)
    state: dict[str, Tensor] = {}
    for name, tensor in pretrained.state_dict.items():
        if name.startswith("position."):
            raise CheckpointError(f"tensor {name} has no place in Meta's format, which only holds rotary models.")
        if name.endswith("attention.wq.weight"):
            tensor = to_meta_layout(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = to_meta_layout(tensor, args.kv_heads)
        state[name] = _standalone(tensor)
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    if pretrained.tokenizer_path is not None:
        shutil.copyfile(pretrained.tokenizer_path, folder / "tokenizer.model")


def _standalone(tensor: Tensor) -> Tensor:
    """A contiguous tensor owning exactly its bytes: torch.save writes whole storages, views included."""
    tensor = tensor.detach().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


__all__ = [
    "args_from_params",
    "find_tokenizer",
    "from_meta_layout",
    "guess_max_seq_len",
    "load_meta",
    "params_from_args",
    "save_meta",
    "to_meta_layout",
]
