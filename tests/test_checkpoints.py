"""Checkpoint import/export: HF and Meta folders against independent references, round trips, bad files, the CLI."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from conftest import ROOT, tiny_args, tiny_model

from model import build_model, keep_stored_settings
from model.checkpoints import (
    PROJECT_KEY,
    CheckpointError,
    Pretrained,
    atomic_directory,
    check_same_tokenizer,
    check_tokenizer,
    detect_format,
    load_into,
    load_pretrained,
    project_payload,
    tokenizer_info,
)
from model.convert import convert, export, parse_size
from evaluation.limits import extended_window
from model.meta import args_from_params, guess_max_seq_len, params_from_args

transformers = pytest.importorskip("transformers")

VOCAB = 128  # divisible by the shard counts below, as Meta's vocabularies are
STD = 0.1  # a larger init than training's, so logits are O(1) and 1e-5 is a real tolerance


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory) -> Path:
    """A 128-piece sentencepiece model with LLaMA's special ids (unk 0, bos 1, eos 2)."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog position interpolation llama window context rotary".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, model_type="bpe", vocab_size=VOCAB,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    return path


def fake_tiktoken_file(path: Path, extra_merges: int = 0) -> Path:
    """A tiktoken BPE file: the 256 single bytes, plus a few merges, as "base64 rank" lines."""
    import base64

    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" the"][:extra_merges]
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens)))
    return path


def assert_one_clear_line(message: str) -> None:
    assert "\n" not in message and "\x1b" not in message and "Traceback" not in message, message


def leftovers(parent: Path, name: str) -> list[Path]:
    """Anything the converter would leave behind for destination `name`: itself or its temporary folders."""
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def hf_model(**config) -> "transformers.LlamaForCausalLM":
    defaults = dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32, rms_norm_eps=1e-5, initializer_range=STD,
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    defaults.update(config)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**defaults)).eval()


def save_project_checkpoint(path: Path, model, position: dict, tokenizer: Path | None = None) -> Path:
    """A checkpoint shaped like the trainer's: Lightning's state_dict plus the project's payload."""
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save({"state_dict": state, PROJECT_KEY: project_payload(model.args, position, tokenizer), "global_step": 7}, path)
    return path


# ----------------------------------------------------------------------------- Meta: an independent reference


def random_meta_weights(params: dict, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in Meta's own layout and names (not derived from any loader)."""
    g = torch.Generator().manual_seed(seed)
    dim, heads = params["dim"], params["n_heads"]
    kv, head_dim = params.get("n_kv_heads", heads), dim // heads
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier"):
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    hidden = params["multiple_of"] * math.ceil(hidden / params["multiple_of"])

    def rand(*shape):
        return torch.randn(*shape, generator=g) * STD

    weights = {"tok_embeddings.weight": rand(vocab, dim), "norm.weight": 1 + rand(dim), "output.weight": rand(vocab, dim)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        weights |= {
            p + "attention.wq.weight": rand(heads * head_dim, dim),
            p + "attention.wk.weight": rand(kv * head_dim, dim),
            p + "attention.wv.weight": rand(kv * head_dim, dim),
            p + "attention.wo.weight": rand(dim, heads * head_dim),
            p + "feed_forward.w1.weight": rand(hidden, dim),
            p + "feed_forward.w2.weight": rand(dim, hidden),
            p + "feed_forward.w3.weight": rand(hidden, dim),
            p + "attention_norm.weight": 1 + rand(dim),
            p + "ffn_norm.weight": 1 + rand(dim),
        }
    return weights


def split_model_parallel(weights: dict, n: int, embedding_dim: int) -> list[dict]:
    """Slice full weights the way Meta's ColumnParallel / RowParallel / ParallelEmbedding layers hold them."""
    shards: list[dict] = [{} for _ in range(n)]
    for name, tensor in weights.items():
        if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) or name == "output.weight":
            dim = 0
        elif name.endswith(("wo.weight", "w2.weight")):
            dim = 1
        elif name == "tok_embeddings.weight":
            dim = embedding_dim
        else:
            dim = None  # norms (and rope.freqs) are replicated on every rank
        pieces = [tensor.clone() for _ in range(n)] if dim is None else [c.clone() for c in tensor.chunk(n, dim=dim)]
        for shard, piece in zip(shards, pieces):
            shard[name] = piece
    return shards


def write_meta(folder: Path, weights: dict, params: dict, n_shards: int, embedding_dim: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(split_model_parallel(weights, n_shards, embedding_dim)):
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def llama31_scaled(freqs: torch.Tensor) -> torch.Tensor:
    """LLaMA 3.1's frequency scaling, per frequency, as its reference code states it."""
    factor, low, high, old_window = 8.0, 1.0, 4.0, 8192
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_window / high:
            out.append(freq)
        elif wavelen > old_window / low:
            out.append(freq / factor)
        else:
            smooth = (old_window / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


def meta_reference_logits(weights: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's forward in float64, reading Meta-layout tensors: adjacent pairs rotate as complex numbers."""
    w = {k: v.double() for k, v in weights.items()}
    dim, heads = params["dim"], params["n_heads"]
    kv, head_dim, eps = params.get("n_kv_heads", heads), dim // heads, params["norm_eps"]
    theta = params.get("rope_theta", 10000.0)
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if params.get("use_scaled_rope"):
        freqs = llama31_scaled(freqs)
    b, n = tokens.shape
    freqs_cis = torch.polar(torch.ones(n, head_dim // 2, dtype=torch.float64), torch.outer(torch.arange(n).double(), freqs))

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x):  # (b, n, h, head_dim)
        pairs = torch.view_as_complex(x.reshape(b, n, x.shape[2], head_dim // 2, 2).contiguous())
        return torch.view_as_real(pairs * freqs_cis[None, :, None, :]).flatten(3)

    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    h = w["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, w[p + "attention_norm.weight"])
        q = rotate((x @ w[p + "attention.wq.weight"].T).view(b, n, heads, head_dim))
        k = rotate((x @ w[p + "attention.wk.weight"].T).view(b, n, kv, head_dim))
        v = (x @ w[p + "attention.wv.weight"].T).view(b, n, kv, head_dim)
        k, v = (t.repeat_interleave(heads // kv, dim=2) for t in (k, v))  # repeat_kv: query head j reads kv head j // rep
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(head_dim) + mask, dim=-1)
        h = h + (scores @ v).transpose(1, 2).reshape(b, n, dim) @ w[p + "attention.wo.weight"].T
        x = rms(h, w[p + "ffn_norm.weight"])
        gate = x @ w[p + "feed_forward.w1.weight"].T
        h = h + (gate * torch.sigmoid(gate) * (x @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return (rms(h, w["norm.weight"]) @ w["output.weight"].T).float()


BASE_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 16}
META_CASES = {
    # LLaMA 1: vocab -1 (from the sentencepiece tokenizer one level up), rope.freqs in the shard.
    "llama1-1shard": ({**BASE_PARAMS, "norm_eps": 1e-6, "vocab_size": -1}, 1, 1),
    "llama1-4shards": ({**BASE_PARAMS, "norm_eps": 1e-6, "vocab_size": VOCAB}, 4, 1),
    "llama2-gqa-2shards": ({**BASE_PARAMS, "n_kv_heads": 2, "norm_eps": 1e-5, "vocab_size": VOCAB}, 2, 1),
    # LLaMA 3.1: theta 500000, scaled rope, GQA, embeddings sliced by vocabulary, tiktoken tokenizer, vocab -1.
    "llama31-gqa-2shards": (
        {**BASE_PARAMS, "n_kv_heads": 2, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0,
         "use_scaled_rope": True, "vocab_size": -1},
        2,
        0,
    ),
}  # fmt: skip


def make_meta_case(case: str, root: Path, sp_tokenizer: Path) -> tuple[Path, dict, dict]:
    params, n_shards, embedding_dim = META_CASES[case]
    folder = root / "llama" / "model"
    folder.mkdir(parents=True)
    vocab = VOCAB
    if case.startswith("llama31"):
        fake_tiktoken_file(folder / "tokenizer.model")
        vocab = 256 + 256  # ranks + LLaMA 3's special tokens
    elif case == "llama1-1shard":
        (root / "llama" / "tokenizer.model").write_bytes(sp_tokenizer.read_bytes())  # Meta keeps it one level up
    weights = random_meta_weights(params, vocab)
    if case.startswith("llama1"):
        head_dim = params["dim"] // params["n_heads"]
        weights["rope.freqs"] = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    write_meta(folder, weights, params, n_shards, embedding_dim)
    weights.pop("rope.freqs", None)
    return folder, weights, params


# ----------------------------------------------------------------------------- HF folders


def _save_bin(model, folder: Path, shards: int) -> None:
    """What transformers 4's save_pretrained(safe_serialization=False) wrote: torch.save of the state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names, weight_map = list(state), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({k: state[k] for k in part}, folder / file)
        weight_map |= dict.fromkeys(part, file)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


HF_CONFIGS = {
    "llama2-gqa": dict(max_position_embeddings=32),
    "llama3-rope": dict(
        rope_theta=500000.0,
        max_position_embeddings=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ),  # fmt: skip
    # LLaMA 3.1's layout: max_position_embeddings (131072) is not original x factor (65536); at this size 256 vs 128
    "llama31-context": dict(
        rope_theta=500000.0, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ),  # fmt: skip
    # LLaMA 3.2 1B/3B: tied embeddings (no lm_head saved), llama3 scaling at factor 32
    "llama32-tied": dict(
        rope_theta=500000.0, max_position_embeddings=512, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 16,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ),  # fmt: skip
    # early YaRN configs: no original_max_position_embeddings, which transformers takes to be max_position_embeddings
    "yarn-without-original": dict(max_position_embeddings=32, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
    # DeepSeek-style YaRN temperature: the ratio of two weighted mscale terms (1.0 here, not 0.1 ln 4 + 1)
    "yarn-mscale": dict(
        max_position_embeddings=128,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.707,
                      "mscale_all_dim": 1.0},
    ),  # fmt: skip
    # Vicuna/LongChat 16K: max_position_embeddings is the original window, max_sequence_length the extended one
    "linear-max-sequence-length": dict(max_position_embeddings=32, max_sequence_length=128,
                                       rope_scaling={"rope_type": "linear", "factor": 4.0}),
}
# The window each config is read at: the model reads L x scale tokens.
HF_EXTENDED_WINDOWS = {"llama2-gqa": 32, "llama3-rope": 128, "llama31-context": 256, "llama32-tied": 512,
                       "yarn-without-original": 128, "yarn-mscale": 128, "linear-max-sequence-length": 128}


@pytest.mark.parametrize("config", list(HF_CONFIGS))
def test_hf_configs_load_with_the_same_logits_and_window(tmp_path, config):
    hf = hf_model(**HF_CONFIGS[config])
    hf.save_pretrained(tmp_path / "hf")
    if config == "yarn-without-original":  # transformers 5 writes the default out; the configs of 2023 did not
        saved = json.loads((tmp_path / "hf" / "config.json").read_text())
        del saved["rope_parameters"]["original_max_position_embeddings"]
        (tmp_path / "hf" / "config.json").write_text(json.dumps(saved))
    pretrained = load_pretrained(tmp_path / "hf")
    model = pretrained.build_model().eval()
    tokens = torch.randint(0, VOCAB, (2, 100))  # beyond the original window of every config
    ours, theirs = logits(model, tokens), hf(input_ids=tokens).logits.detach()
    assert ours.abs().max() > 0.25
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert extended_window(model) == HF_EXTENDED_WINDOWS[config]


def test_a_config_group_naming_the_checkpoints_encoding_keeps_its_stored_settings(tmp_path):
    """`position=llama3 scale=8` (original_window null) on LLaMA 3.1 read from HF: its original window is the
    checkpoint's 8192-analogue (16 here), not the model's window (32 = 256 / 8); otherwise other frequencies."""
    hf = hf_model(**HF_CONFIGS["llama31-context"])
    hf.save_pretrained(tmp_path / "hf")
    pretrained = load_pretrained(tmp_path / "hf")
    group = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "position" / "llama3.yaml"))
    group["scale"] = 8.0
    kept = keep_stored_settings(group, pretrained.position)
    assert kept["original_window"] == 16 and pretrained.args.max_seq_len == 32
    tokens = torch.randint(0, VOCAB, (1, 100))
    model = build_model(pretrained.args, kept).eval()
    load_into(model, pretrained.state_dict)
    torch.testing.assert_close(logits(model, tokens), hf(input_ids=tokens).logits.detach(), rtol=0, atol=1e-5)
    naive = build_model(pretrained.args, group).eval()  # the group alone: original_window = the model's window
    load_into(naive, pretrained.state_dict)
    assert (logits(naive, tokens) - logits(model, tokens)).abs().max() > 1e-3
    # another encoding, or an explicit setting, takes nothing from the checkpoint
    assert keep_stored_settings({"kind": "yarn", "scale": 8.0, "original_window": None}, pretrained.position)["original_window"] is None
    assert keep_stored_settings({**group, "original_window": 64}, pretrained.position)["original_window"] == 64
    # YaRN's attention factor belongs to its scale: kept at the stored scale, not carried to another one
    yarn = {"kind": "yarn", "scale": 40.0, "original_window": 4096, "attention_factor": 1.1557}
    assert keep_stored_settings({"kind": "yarn", "scale": 40.0, "attention_factor": None}, yarn)["attention_factor"] == 1.1557
    assert keep_stored_settings({"kind": "yarn", "scale": 80.0, "attention_factor": None}, yarn)["attention_factor"] is None


HF_REFUSED_ROPE = [
    ({"rope_type": "yarn", "factor": 4.0, "truncate": False}, "truncate=false"),
    ({"rope_type": "yarn", "factor": 4.0, "mystery": 1}, r"key\(s\) \['mystery'\] that this loader does not implement"),
    ({"rope_type": "dynamic", "factor": 1.0}, "dynamic rope scaling has factor 1"),
    ({"rope_type": "linear", "factor": 0}, "factor=0; a factor must be >= 1"),
    ({"rope_type": "linear", "factor": 4.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": "x"}, "could not convert string to float"),
    ({"rope_type": "longrope", "factor": 4.0}, "rope type 'longrope' is not supported"),
]


@pytest.mark.parametrize("rope, message", HF_REFUSED_ROPE, ids=[m[:24] for _, m in HF_REFUSED_ROPE])
def test_hf_rope_settings_this_project_would_read_differently_are_refused_naming_the_file(tmp_path, rope, message):
    hf_model().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("rope_parameters", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "rope_scaling": rope}))
    with pytest.raises(CheckpointError, match=rf"config.json does not describe a LLaMA this project can build: .*{message}"):
        load_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        load_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("save", ["safetensors", "sharded", "bin", "sharded-bin"])
@pytest.mark.parametrize("config", ["llama2-gqa", "llama3-rope"])
def test_hf_folder_loads_with_the_same_logits(tmp_path, config, save):
    hf = hf_model(**HF_CONFIGS[config])
    folder = tmp_path / "hf"
    if save == "safetensors":
        hf.save_pretrained(folder)
    elif save == "sharded":
        hf.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        _save_bin(hf, folder, shards=1 if save == "bin" else 3)
    pretrained = load_pretrained(folder)
    assert pretrained.source_format == "hf"
    model = pretrained.build_model().eval()
    tokens = torch.randint(0, VOCAB, (2, 100))  # beyond the original window of both configs
    ours, theirs = logits(model, tokens), hf(input_ids=tokens).logits.detach()
    assert ours.abs().max() > 0.25
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_hf_legacy_rope_scaling_config_reads_like_rope_parameters(tmp_path):
    hf = hf_model(**HF_CONFIGS["llama3-rope"])
    hf.save_pretrained(tmp_path / "new")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert "rope_parameters" in config  # transformers 5 writes the new form
    legacy = dict(config)
    rope = dict(legacy.pop("rope_parameters"))
    legacy["rope_theta"] = rope.pop("rope_theta")
    legacy["rope_scaling"] = rope
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(legacy))
    (tmp_path / "old" / "model.safetensors").write_bytes((tmp_path / "new" / "model.safetensors").read_bytes())
    new, old = load_pretrained(tmp_path / "new"), load_pretrained(tmp_path / "old")
    assert new.args == old.args and new.position == old.position
    assert new.position["kind"] == "llama3" and new.args.rope_theta == 500000.0 and new.args.max_seq_len == 16


def test_hf_load_casts_to_the_requested_dtype(tmp_path):
    hf_model().save_pretrained(tmp_path / "hf")
    pretrained = load_pretrained(tmp_path / "hf", dtype="bfloat16")
    assert {t.dtype for t in pretrained.state_dict.values()} == {torch.bfloat16}
    model = pretrained.build_model()
    assert model.output.weight.dtype == torch.bfloat16
    pretrained = load_pretrained(tmp_path / "hf")
    model = pretrained.build_model(dtype="float16")  # cast while building: the float32 tensors are not kept
    assert model.output.weight.dtype == pretrained.state_dict["output.weight"].dtype == torch.float16
    assert model.output.weight.data_ptr() == pretrained.state_dict["output.weight"].data_ptr()
    with pytest.raises(CheckpointError, match="dtype 'int8' is not supported"):
        load_pretrained(tmp_path / "hf", dtype="int8")


# ----------------------------------------------------------------------------- Meta folders


@pytest.mark.parametrize("case", list(META_CASES))
def test_meta_folder_matches_an_independent_reference_of_metas_math(tmp_path, sp_tokenizer, case):
    folder, weights, params = make_meta_case(case, tmp_path, sp_tokenizer)
    pretrained = load_pretrained(folder)
    assert pretrained.source_format == "meta" and pretrained.extra["shards"] == META_CASES[case][1]
    assert pretrained.tokenizer_path is not None or case.startswith("llama1-4") or case.startswith("llama2")
    model = pretrained.build_model().eval()
    tokens = torch.randint(0, model.args.vocab_size, (2, 40))
    ours, reference = logits(model, tokens), meta_reference_logits(weights, params, tokens)
    assert ours.abs().max() > 0.25
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    # Guard: Meta's layout read as if it were the half-split one (no permutation) must disagree.
    unpermuted = build_model(pretrained.args, pretrained.position).eval()
    load_into(unpermuted, weights)
    assert (logits(unpermuted, tokens) - reference).abs().max() > 1e-2


def test_meta_params_are_read_per_llama_generation(tmp_path, sp_tokenizer):
    folder, _, _ = make_meta_case("llama31-gqa-2shards", tmp_path, sp_tokenizer)
    pretrained = load_pretrained(folder)
    args = pretrained.args
    # use_scaled_rope: LLaMA 3.1's 131072-token context, read as 16384 x 8 with the frequencies of an 8192 window
    assert (args.vocab_size, args.n_kv_heads, args.rope_theta, args.max_seq_len) == (512, 2, 500000.0, 16384)
    assert args.hidden_dim == 16 * math.ceil(int(1.3 * int(2 * 4 * 64 / 3)) / 16)
    assert pretrained.position == {"kind": "llama3", "scale": 8.0, "original_window": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert extended_window(pretrained.build_model()) == 131072
    # LLaMA 3.2 1B and 3B set the same flag with factor 32 (the same context: 4096 x 32)
    llama32_1b = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "ffn_dim_multiplier": 1.5,
                  "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}
    args, position, _ = args_from_params(llama32_1b)
    assert (position["scale"], position["original_window"], args.max_seq_len) == (32.0, 8192, 4096)
    assert params_from_args(args, position)["use_scaled_rope"] is True  # and it writes back as the same flag

    # the window Meta leaves out: LLaMA 1 2048, LLaMA 2 4096, LLaMA 3 8192, or the caller's
    assert guess_max_seq_len({"dim": 4096, "norm_eps": 1e-6})[0] == 2048
    assert guess_max_seq_len({"dim": 4096, "norm_eps": 1e-5})[0] == 4096
    assert guess_max_seq_len({"dim": 8192, "n_kv_heads": 8, "norm_eps": 1e-5})[0] == 4096
    assert guess_max_seq_len({"dim": 4096, "rope_theta": 500000.0})[0] == 8192
    assert guess_max_seq_len({"dim": 4096, "rope_theta": 1e6})[0] == 16384
    args, _, why = args_from_params({**BASE_PARAMS, "vocab_size": 32, "max_seq_len": 1024})
    assert args.max_seq_len == 1024 and "params.json" in why
    assert load_pretrained(folder, max_seq_len=4096).args.max_seq_len == 4096


def test_a_meta_export_whose_llama3_window_params_json_cannot_hold_says_so(caplog):
    """LLaMA 3 8B (window 8192) read with llama3 x8 would come back as 16384 x 8: the export warns."""
    args, position, _ = args_from_params({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 32, "rope_theta": 500000.0,
                                          "use_scaled_rope": True}, max_seq_len=8192)
    with caplog.at_level("WARNING", logger="model.meta"):
        assert params_from_args(args, position)["use_scaled_rope"] is True
    assert "cannot record this model's window 8192 x 8: read back, it is taken to be 16384 x 8" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="model.meta"):
        params_from_args(args.with_(max_seq_len=16384), position)
    assert "cannot record" not in caplog.text


def test_meta_vocab_minus_one_without_a_tokenizer_comes_from_the_output_rows(tmp_path, sp_tokenizer):
    folder, _, _ = make_meta_case("llama1-1shard", tmp_path, sp_tokenizer)
    (folder.parent / "tokenizer.model").unlink()
    pretrained = load_pretrained(folder)
    assert pretrained.args.vocab_size == VOCAB and pretrained.tokenizer_path is None
    assert pretrained.args.max_seq_len == 2048 and "LLaMA 1" in pretrained.extra["max_seq_len_source"]


def test_meta_load_casts_as_it_merges(tmp_path, sp_tokenizer):
    folder, _, _ = make_meta_case("llama2-gqa-2shards", tmp_path, sp_tokenizer)
    pretrained = load_pretrained(folder, dtype=torch.bfloat16)
    assert {t.dtype for t in pretrained.state_dict.values()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- round trips


EXPORT_POSITIONS = [
    {"kind": "rope"},
    {"kind": "pi", "scale": 4.0},
    {"kind": "ntk", "scale": 4.0},
    {"kind": "dynamic", "scale": 4.0},
    {"kind": "yarn", "scale": 4.0},
    {"kind": "llama3", "scale": 4.0},
]


@pytest.mark.parametrize("position", EXPORT_POSITIONS, ids=lambda p: p["kind"])
def test_project_to_hf_runs_in_transformers_with_the_same_logits(tmp_path, sp_tokenizer, position):
    model = tiny_model(position, vocab_size=VOCAB)
    ckpt = save_project_checkpoint(tmp_path / "last.ckpt", model, position, sp_tokenizer)
    convert(ckpt, tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == sp_tokenizer.read_bytes()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(0, VOCAB, (2, 100))  # 100 > the original window of 32: PI's extended range
    ours = logits(model, tokens)
    assert ours.abs().max() > 0.25
    torch.testing.assert_close(hf(input_ids=tokens).logits.detach(), ours, rtol=0, atol=1e-5)
    # ... and back into the project: the same tensors bit for bit, the same model (static NTK comes back as
    # plain RoPE with the larger base, which HF has no other way to say)
    back = load_pretrained(tmp_path / "hf")
    assert all(torch.equal(back.state_dict[k], v) for k, v in model.state_dict().items())
    if position["kind"] != "ntk":
        assert back.position["kind"] == position["kind"] and back.args.max_seq_len == model.args.max_seq_len
    torch.testing.assert_close(logits(back.build_model(), tokens), ours, rtol=0, atol=1e-5)


def test_hf_export_tokenizes_as_the_project_does(tmp_path):
    """AutoTokenizer on the exported folder is LLaMA's tokenizer: BOS first, then the ids the project trains
    and evaluates on (without tokenizer_config.json it would prepend no BOS). Two known differences are left
    out: HF reads "</s>" in the text as EOS, and treats whitespace at the very start of a text its own way."""
    from data.tokenizer import train_tokenizer

    corpus = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
              "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 20
    ours = train_tokenizer(corpus, tmp_path / "tokenizer.model", vocab_size=300)  # byte fallback, as the bundled one
    model = tiny_model(vocab_size=ours.vocab_size)
    convert(save_project_checkpoint(tmp_path / "last.ckpt", model, {"kind": "rope"}, ours.path), tmp_path / "hf", "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["To be, or not to be: that is the question.", "Whether 'tis nobler\n\n  in the mind  to suffer",
             "unseen: ÿ 漢字 and digits 1604"]
    for text in texts:
        ids = hf(text)["input_ids"]
        assert ids[0] == ours.bos_id and ids == ours.encode(text, bos=True), text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ours.encode(text, bos=False)), text
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")


def test_hf_export_of_a_tiktoken_tokenizer_says_which_files_to_add(tmp_path, caplog):
    tokenizer = fake_tiktoken_file(tmp_path / "tokenizer.model")  # 256 ranks + LLaMA 3's 256 special tokens
    model = tiny_model(vocab_size=512)
    with caplog.at_level("WARNING", logger="model.hf"):
        export(Pretrained.from_model(model, {"kind": "rope"}, tokenizer), tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    assert not (tmp_path / "hf" / "tokenizer_config.json").exists()  # a LlamaTokenizer config would be wrong for it
    assert "tokenizer_config.json of the model's HF release into the exported folder" in caplog.text


def test_hf_export_shards_above_the_size_limit(tmp_path):
    model = tiny_model({"kind": "pi", "scale": 4.0}, vocab_size=VOCAB)
    export(Pretrained.from_model(model, {"kind": "pi", "scale": 4.0}), tmp_path / "hf", "hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((tmp_path / "hf" / f).stat().st_size < 40_000 + 70_000 for f in files)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0} and config["max_position_embeddings"] == 128
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(0, VOCAB, (1, 100))
    torch.testing.assert_close(hf(input_ids=tokens).logits.detach(), logits(model, tokens), rtol=0, atol=1e-5)


def test_a_meta_folder_says_when_its_window_is_guessed(tmp_path, sp_tokenizer, caplog):
    """params.json never records the pretraining window, the L that PI's scale multiplies: a guess is said."""
    model = tiny_model({"kind": "rope"}, vocab_size=VOCAB)  # window 32: no LLaMA generation's
    export(Pretrained.from_model(model, {"kind": "rope"}, sp_tokenizer), tmp_path / "meta", "meta")
    with caplog.at_level("WARNING", logger="model.meta"):
        guessed = load_pretrained(tmp_path / "meta")
    assert guessed.args.max_seq_len != 32 and "does not record the pretraining window" in caplog.text
    assert "--max-seq-len N" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="model.meta"):
        assert load_pretrained(tmp_path / "meta", max_seq_len=32).args.max_seq_len == 32
    assert "does not record" not in caplog.text


@pytest.mark.parametrize(
    "position, changes",
    [
        ({"kind": "rope"}, {}),
        ({"kind": "rope"}, {"n_kv_heads": None, "ffn_dim": 200}),  # explicit hidden size: multiple_of/multiplier found
        ({"kind": "llama3", "scale": 8.0, "original_window": 8192}, {"rope_theta": 500000.0}),
    ],
)
def test_project_to_meta_and_back_is_exact(tmp_path, sp_tokenizer, position, changes):
    model = tiny_model(position, vocab_size=VOCAB, **changes)
    export(Pretrained.from_model(model, position, sp_tokenizer), tmp_path / "meta", "meta")
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    back = load_pretrained(tmp_path / "meta", max_seq_len=model.args.max_seq_len)
    same = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta", "max_seq_len")
    assert [getattr(back.args, f) for f in same] == [getattr(model.args, f) for f in same]
    assert back.position["kind"] == position["kind"]
    assert set(back.state_dict) == set(model.state_dict())
    assert all(torch.equal(back.state_dict[k], v) for k, v in model.state_dict().items())
    # The written shard is in Meta's layout: the independent reference reads it directly.
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    tokens = torch.randint(0, VOCAB, (1, 40))
    torch.testing.assert_close(meta_reference_logits(shard, params, tokens), logits(model, tokens), rtol=0, atol=1e-5)


def test_meta_export_refuses_what_params_json_cannot_say(tmp_path):
    model = tiny_model({"kind": "pi", "scale": 4.0})
    with pytest.raises(CheckpointError, match="cannot be written to Meta's params.json.*--to hf") as info:
        export(Pretrained.from_model(model, {"kind": "pi", "scale": 4.0}), tmp_path / "meta", "meta")
    assert_one_clear_line(str(info.value))
    assert not leftovers(tmp_path, "meta")


def test_absolute_position_cannot_go_to_hf_and_nothing_is_written(tmp_path):
    position = {"kind": "absolute", "scale": 2.0}
    ckpt = save_project_checkpoint(tmp_path / "abs.ckpt", tiny_model(position), position)
    with pytest.raises(CheckpointError, match="no HF transformers equivalent") as info:
        convert(ckpt, tmp_path / "out", "hf")
    assert_one_clear_line(str(info.value))
    assert not leftovers(tmp_path, "out")


# ----------------------------------------------------------------------------- bad files


def _meta_without_params(root, sp):
    folder, _, _ = make_meta_case("llama2-gqa-2shards", root, sp)
    (folder / "params.json").unlink()
    return folder


def _meta_truncated_shard(root, sp):
    folder, _, _ = make_meta_case("llama2-gqa-2shards", root, sp)
    shard = folder / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return folder


def _meta_mismatched_shapes(root, sp):
    folder, _, _ = make_meta_case("llama2-gqa-2shards", root, sp)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    shard["layers.1.attention.wq.weight"] = shard["layers.1.attention.wq.weight"][:16]
    torch.save(shard, folder / "consolidated.01.pth")
    return folder


def _meta_norms_differ(root, sp):
    folder, _, _ = make_meta_case("llama2-gqa-2shards", root, sp)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = shard["norm.weight"] + 1
    torch.save(shard, folder / "consolidated.01.pth")
    return folder


def _meta_missing_shard(root, sp):
    folder, _, _ = make_meta_case("llama1-4shards", root, sp)
    (folder / "consolidated.02.pth").unlink()
    return folder


def _meta_unknown_param(root, sp):
    folder, _, params = make_meta_case("llama2-gqa-2shards", root, sp)
    (folder / "params.json").write_text(json.dumps({**params, "moe_experts": 8}))
    return folder


def _meta_wrong_params(root, sp):
    folder, _, params = make_meta_case("llama2-gqa-2shards", root, sp)
    (folder / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    return folder


def _meta_tokenizer_too_big(root, sp):
    folder, _, params = make_meta_case("llama1-1shard", root, sp)
    # 128-piece tokenizer beside a 64-row vocabulary
    weights = random_meta_weights({**params, "vocab_size": 64}, 64)
    shutil_rmtree_shards(folder)
    write_meta(folder, weights, {**params, "vocab_size": 64}, 1)
    return folder


def shutil_rmtree_shards(folder: Path) -> None:
    for shard in folder.glob("consolidated.*.pth"):
        shard.unlink()


class RunsCode:
    """Unpickling this calls print(): harmless here, but any callable could stand in its place."""

    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def _meta_code_pickle(root, sp):
    folder, _, _ = make_meta_case("llama1-4shards", root, sp)
    shard = torch.load(folder / "consolidated.00.pth", weights_only=True)
    shard["norm.weight"] = RunsCode()
    torch.save(shard, folder / "consolidated.00.pth")
    return folder


def _project_code_pickle(root, sp):
    model = tiny_model()
    path = save_project_checkpoint(root / "evil.ckpt", model, {"kind": "rope"})
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"] = RunsCode()
    torch.save(checkpoint, path)
    return path


def _hf_without_weights(root, sp):
    hf_model().config.to_json_file(root / "config.json")
    return root


def _hf_truncated(root, sp):
    hf_model().save_pretrained(root / "hf")
    weights = root / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5000])
    return root / "hf"


def _hf_missing_shard(root, sp):
    hf_model().save_pretrained(root / "hf", max_shard_size="20KB")
    next((root / "hf").glob("model-00002-*.safetensors")).unlink()
    return root / "hf"


def _hf_not_llama(root, sp):
    hf_model().save_pretrained(root / "hf")
    config = json.loads((root / "hf" / "config.json").read_text())
    (root / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    return root / "hf"


def _hf_config_mismatch(root, sp):
    hf_model().save_pretrained(root / "hf")
    config = json.loads((root / "hf" / "config.json").read_text())
    (root / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 160}))
    return root / "hf"


def _missing_path(root, sp):
    return root / "no" / "such" / "checkpoint"


def _empty_folder(root, sp):
    (root / "empty").mkdir()
    return root / "empty"


def _run_folder(root, sp):
    (root / "run" / "checkpoints").mkdir(parents=True)
    (root / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (root / "run" / "summary.json").write_text("{}")
    return root / "run"


def _summary_json(root, sp):
    return _run_folder(root, sp) / "summary.json"


BAD_SOURCES = {
    "meta-missing-params": (_meta_without_params, "has Meta shards but no params.json"),
    "meta-truncated-shard": (_meta_truncated_shard, "consolidated.01.pth is not a readable torch checkpoint.*truncated or corrupt"),
    "meta-mismatched-shapes": (_meta_mismatched_shapes, r"layers.1.attention.wq.weight has shape \(16, 64\) in consolidated.01.pth but \(32, 64\)"),
    "meta-norms-differ": (_meta_norms_differ, "norm.weight is replicated .* but differs"),
    "meta-missing-shard": (_meta_missing_shard, "consolidated.02.pth is missing"),
    "meta-unknown-param": (_meta_unknown_param, r"key\(s\) \['moe_experts'\]"),
    "meta-params-do-not-fit": (_meta_wrong_params, r"attention.wk.weight merges to shape \(32, 64\) .* needs \(64, 64\)"),
    "meta-tokenizer-too-big": (_meta_tokenizer_too_big, "tokenizer .* has 128 tokens but .* only 64 rows"),
    "meta-code-pickle": (_meta_code_pickle, "pickled reference to .*print, which could run code"),
    "project-code-pickle": (_project_code_pickle, "pickled reference to .*print, which could run code"),
    "hf-without-weights": (_hf_without_weights, "has no weights"),
    "hf-truncated": (_hf_truncated, "not a readable safetensors file"),
    "hf-missing-shard": (_hf_missing_shard, "lists shard model-00002"),
    "hf-not-llama": (_hf_not_llama, "describes a 'mistral' model"),
    "hf-config-mismatch": (_hf_config_mismatch, r"feed_forward.w\d.weight has shape \(\d+, \d+\) in .* needs \(\d+, \d+\)"),
    "missing-path": (_missing_path, "does not exist"),
    "empty-folder": (_empty_folder, "holds no checkpoint"),
    "run-folder": (_run_folder, r"is a training run's folder; pass its checkpoint, .*run/checkpoints/last.ckpt"),
    "summary-json": (_summary_json, "summary.json is a json file, not a checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_fail_with_one_clear_error_and_write_nothing(tmp_path, sp_tokenizer, case, capsys):
    make, message = BAD_SOURCES[case]
    source = make(tmp_path, sp_tokenizer)
    out = tmp_path / "converted"
    with pytest.raises(CheckpointError, match=message) as info:
        convert(source, out / "hf", "hf")
    assert_one_clear_line(str(info.value))
    assert not leftovers(tmp_path, "converted")
    assert "this ran while loading" not in capsys.readouterr().out


def test_destination_rules_refuse_overwrite_replace_with_force_and_clean_up(tmp_path, monkeypatch):
    pretrained = Pretrained.from_model(tiny_model(), {"kind": "rope"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not empty; choose a new folder or pass --force"):
        export(pretrained, out, "hf")
    assert (out / "keep.txt").read_text() == "mine"
    export(pretrained, out, "hf", force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    # A failure half-way through writing leaves neither the destination nor a temporary folder.
    import safetensors.torch

    def write_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", write_then_fail)
    with pytest.raises(OSError):
        export(pretrained, tmp_path / "new" / "nested", "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(CheckpointError, match="holds the source checkpoint"):
        convert(out, out, "meta", force=True)


def test_atomic_directory_publishes_only_on_success(tmp_path):
    with atomic_directory(tmp_path / "d") as staging:
        assert staging.parent == tmp_path and not (tmp_path / "d").exists()
        (staging / "f").write_text("x")
    assert (tmp_path / "d" / "f").read_text() == "x"
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "e") as staging:
        (staging / "f").write_text("x")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_an_atomically_written_file_gets_the_permissions_an_ordinary_one_would(tmp_path):
    import os

    from model.checkpoints import atomic_write_bytes

    previous = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "results.json", b"{}")
        (tmp_path / "ordinary").write_bytes(b"{}")
    finally:
        os.umask(previous)
    # The temporary file it renames is made 0600; a report others read must not stay so.
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == (tmp_path / "ordinary").stat().st_mode & 0o777 == 0o644


def test_detect_format(tmp_path, sp_tokenizer):
    folder, _, _ = make_meta_case("llama1-4shards", tmp_path, sp_tokenizer)
    assert detect_format(folder) == detect_format(folder / "consolidated.00.pth") == "meta"
    hf_model().save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == detect_format(tmp_path / "hf" / "config.json") == "hf"
    ckpt = save_project_checkpoint(tmp_path / "x.ckpt", tiny_model(), {"kind": "rope"})
    assert detect_format(ckpt) == "project"
    # A converted HF folder that kept Meta's params.json is HF: the shards decide, not the config's name.
    (tmp_path / "hf" / "params.json").write_text("{}")
    assert detect_format(tmp_path / "hf") == "hf"
    (tmp_path / "meta-config-only").mkdir()
    (tmp_path / "meta-config-only" / "params.json").write_text("{}")
    assert detect_format(tmp_path / "meta-config-only") == "meta"  # whose reader then names the missing shards
    loaded = load_pretrained(ckpt, dtype="float16")
    assert loaded.extra["global_step"] == 7 and loaded.state_dict["output.weight"].dtype == torch.float16


# ----------------------------------------------------------------------------- tokenizers


def test_check_tokenizer_refuses_vocabularies_that_do_not_fit(sp_tokenizer):
    info = tokenizer_info(sp_tokenizer)
    assert (info.kind, info.vocab_size, info.bos_id, info.eos_id) == ("sentencepiece", VOCAB, 1, 2)
    check_tokenizer(tiny_model(vocab_size=VOCAB).args, sp_tokenizer)
    check_tokenizer(tiny_model(vocab_size=VOCAB + 64).args, sp_tokenizer)  # a padded table is fine
    with pytest.raises(CheckpointError, match="has 128 tokens but the model's embedding table tok_embeddings.weight has only 101 rows"):
        check_tokenizer(tiny_model(vocab_size=101).args, sp_tokenizer)
    with pytest.raises(CheckpointError, match="made for different vocabularies"):
        check_tokenizer(tiny_model(vocab_size=4096).args, info)


def test_tiktoken_files_are_recognised_without_tiktoken(tmp_path):
    path = fake_tiktoken_file(tmp_path / "tokenizer.model", extra_merges=4)
    info = tokenizer_info(path)
    assert (info.kind, info.vocab_size, info.bos_id, info.eos_id) == ("tiktoken", 260 + 256, 260, 261)


def _tiktoken_importable() -> bool:
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_tiktoken_importable(), reason="tiktoken is installed here; the error for its absence cannot show")
def test_llama3_tokenizer_without_tiktoken_says_how_to_install_it(tmp_path):
    from data.errors import DataError
    from data.tiktoken_tokenizer import TiktokenTokenizer, load_tokenizer

    path = fake_tiktoken_file(tmp_path / "tokenizer.model")
    for load in (TiktokenTokenizer.load, load_tokenizer):
        with pytest.raises(DataError, match="needs the tiktoken package; pip install tiktoken"):
            load(path)


TIKTOKEN_SCRIPT = """
import pickle, sys
from data.tiktoken_tokenizer import TiktokenTokenizer, load_tokenizer
tok = load_tokenizer(sys.argv[1])
assert isinstance(tok, TiktokenTokenizer)
assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (260 + 256, 260, 261), (tok.vocab_size, tok.bos_id, tok.eos_id)
text = "the theme: <|end_of_text|> is plain text here, caf\\u00e9 \\u4e2d\\u6587\\n\\n" + " " * 30000 + "x" * 30000
ids = tok.encode(text, bos=True, eos=True)
assert ids[0] == 260 and ids[-1] == 261 and 261 not in ids[1:-1], ids[:20]
assert 259 in tok.encode(" the", bos=False) or 258 in tok.encode("the", bos=False)
assert tok.decode(ids) == text
assert pickle.loads(pickle.dumps(tok)).encode("the") == tok.encode("the")
print("ok")
"""


def test_llama3_tiktoken_reader_when_tiktoken_is_available(tmp_path):
    """Runs where tiktoken imports, or where PI_LLAMA_TIKTOKEN_DIR names a `pip install --target` folder."""
    extra = os.environ.get("PI_LLAMA_TIKTOKEN_DIR")
    if not _tiktoken_importable() and not (extra and Path(extra, "tiktoken").is_dir()):
        pytest.skip("tiktoken is not installed (set PI_LLAMA_TIKTOKEN_DIR to a pip --target folder to run this)")
    path = fake_tiktoken_file(tmp_path / "tokenizer.model", extra_merges=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), extra, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", TIKTOKEN_SCRIPT, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


# ----------------------------------------------------------------------------- the command line


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "model.convert", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_converts_and_reports_user_errors_in_one_line(tmp_path, sp_tokenizer):
    position = {"kind": "pi", "scale": 4.0}
    model = tiny_model(position, vocab_size=VOCAB)
    ckpt = save_project_checkpoint(tmp_path / "pi.ckpt", model, position, sp_tokenizer)
    done = _cli(str(ckpt), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_pretrained(tmp_path / "hf").state_dict["output.weight"].dtype == torch.bfloat16

    done = _cli(str(tmp_path / "missing.ckpt"), str(tmp_path / "out"), "--to", "meta")
    assert done.returncode == 2
    assert done.stderr.startswith("error: checkpoint path") and "does not exist" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200KiB") == 200 * 1024 and parse_size("1234") == 1234
    with pytest.raises(CheckpointError, match="is not a size"):
        parse_size("big")


def test_the_training_window_is_stored_and_a_damaged_one_is_refused(tmp_path):
    model = tiny_model({"kind": "pi", "scale": 4.0})
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    payload = project_payload(model.args, {"kind": "pi", "scale": 4.0}, None, train_seq_len=96)
    torch.save({"state_dict": state, PROJECT_KEY: payload, "global_step": 3}, tmp_path / "ok.ckpt")
    assert load_pretrained(tmp_path / "ok.ckpt").extra["train_seq_len"] == 96
    older = save_project_checkpoint(tmp_path / "older.ckpt", model, {"kind": "pi", "scale": 4.0})
    assert load_pretrained(older).extra["train_seq_len"] is None  # written before the window was stored
    torch.save({"state_dict": state, PROJECT_KEY: {**payload, "train_seq_len": "96"}}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"bad.ckpt records a training window '96' that is not a positive integer"):
        load_pretrained(tmp_path / "bad.ckpt")


def test_two_unreadable_tokenizer_files_are_not_the_same_tokenizer(tmp_path):
    """Neither has a vocabulary to compare: None == None must not let a mismatch through."""
    first, second = tmp_path / "a.model", tmp_path / "b.model"
    first.write_bytes(b"not a tokenizer")
    second.write_bytes(b"nor this one")
    with pytest.raises(CheckpointError, match="is not the one these weights come with"):
        check_same_tokenizer(Pretrained(tiny_args(), {"kind": "rope"}, {}, tokenizer_path=first), second)


def test_weights_missing_from_a_non_strict_load_are_named_not_left_on_the_meta_device():
    model = tiny_model()
    state = {name: tensor for name, tensor in model.state_dict().items() if name != "output.weight"}
    with torch.device("meta"):
        empty = build_model(model.args, {"kind": "rope"})
    with pytest.raises(CheckpointError, match=r"the checkpoint has no weights for \['output.weight'\]"):
        load_into(empty, state, strict=False)


def test_a_tiktoken_file_with_other_line_endings_is_the_same_tokenizer_and_other_ranks_are_not(tmp_path):
    ranks = [b"IQ== 0", b"Ig== 1", b"Iw== 2", b"JA== 3"]
    own, crlf, swapped = tmp_path / "own.model", tmp_path / "crlf.model", tmp_path / "swapped.model"
    own.write_bytes(b"\n".join(ranks) + b"\n")
    crlf.write_bytes(b"\r\n".join(ranks) + b"\r\n")
    swapped.write_bytes(b"\n".join([b"Ig== 0", b"IQ== 1", *ranks[2:]]) + b"\n")
    pretrained = Pretrained(tiny_args(), {"kind": "rope"}, {}, tokenizer_path=own)
    check_same_tokenizer(pretrained, crlf)
    with pytest.raises(CheckpointError, match="is not the one these weights come with"):
        check_same_tokenizer(pretrained, swapped)
