"""The model against HF transformers, the KV cache against full forwards, and the rotary properties."""

import math

import pytest
import torch
from conftest import tiny_args, tiny_model
from hf_oracle import hf_logits, hf_twin

from model import PRESETS, ModelArgs, PositionError, build_model, build_position
from model.position import (
    LearnedAbsolute,
    PositionInterpolation,
    RoPE,
    append_rows,
    apply_rotation,
    interpolate_table,
)
from model.checkpoints import load_into

pytest.importorskip("transformers")

WINDOW = 32  # tiny_args' max_seq_len: lengths 20 and 100 are inside and beyond it
SCALINGS = [
    {"kind": "rope"},
    {"kind": "pi", "scale": 4.0},
    {"kind": "pi", "scale": 2.5},  # fractional scales are allowed
    {"kind": "dynamic", "scale": 4.0},
    {"kind": "yarn", "scale": 4.0},
    {"kind": "llama3", "scale": 4.0},
    {"kind": "ntk", "scale": 4.0},
]


@pytest.mark.parametrize("position", SCALINGS, ids=lambda p: f"{p['kind']}-{p.get('scale', 1)}")
@pytest.mark.parametrize("length", [20, 100])
def test_logits_match_hf_transformers(position, length):
    model = tiny_model(position)
    hf = hf_twin(model, position)
    tokens = torch.randint(0, model.args.vocab_size, (2, length))
    with torch.no_grad():
        ours = model(tokens)
    theirs = hf_logits(hf, tokens)
    assert ours.abs().max() > 0.25  # logits large enough for 1e-5 to be a real tolerance
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_hf_comparison_can_tell_scalings_apart():
    """Guards the oracle test: the HF twin of PI must disagree with a plain RoPE model beyond position 0."""
    model = tiny_model({"kind": "rope"})
    hf_pi = hf_twin(model, {"kind": "pi", "scale": 4.0})
    tokens = torch.randint(0, model.args.vocab_size, (1, 40))
    with torch.no_grad():
        assert (model(tokens) - hf_logits(hf_pi, tokens)).abs().max() > 1e-2


def test_llama3_shape_theta_500000_matches_hf():
    position = {"kind": "llama3", "scale": 8.0}
    model = tiny_model(position, rope_theta=500000.0, max_seq_len=64)
    hf = hf_twin(model, position)
    tokens = torch.randint(0, model.args.vocab_size, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), rtol=0, atol=1e-5)


ALL_POSITIONS = [p for p in SCALINGS if p["kind"] != "dynamic"] + [{"kind": "none"}, {"kind": "sinusoidal", "scale": 2.0}, {"kind": "absolute", "scale": 4.0}]


def _decode_in_steps(model, tokens):
    """Prefill inside the window, one chunk on top of a cached prefix, then one token at a time."""
    cache = model.new_cache(batch_size=tokens.shape[0], max_len=tokens.shape[1])
    bounds = [0, 24, 30, *range(31, tokens.shape[1] + 1)]
    with torch.no_grad():
        return [(end, model(tokens[:, start:end], cache)) for start, end in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("position", ALL_POSITIONS, ids=lambda p: p["kind"])
def test_kv_cache_prefill_then_decode_equals_full_forward(position):
    model = tiny_model(position)
    tokens = torch.randint(0, model.args.vocab_size, (2, 80))  # crosses the original window of 32
    steps = _decode_in_steps(model, tokens)
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(torch.cat([logits for _, logits in steps], dim=1), full, rtol=0, atol=2e-5)


def test_kv_cache_decoding_with_keys_and_values_repeated_per_query_head_equals_full_forward(monkeypatch):
    """On CUDA a causal mask (or float32) with grouped-query heads has no fused SDPA kernel, so the keys and values
    are repeated per query head there first. Forced on here: the repeated layout (query head i reads kv head
    i // group) must give the full forward's logits, through the masked chunk and the single-token steps."""
    import model.llama as llama

    model = tiny_model({"kind": "pi", "scale": 4.0}, n_heads=4, n_kv_heads=2)
    tokens = torch.randint(0, model.args.vocab_size, (2, 80))
    with torch.no_grad():
        full = model(tokens)  # SDPA's own grouped-query attention
    calls = []
    monkeypatch.setattr(llama, "_no_fused_gqa_kernel", lambda q, mask: calls.append(mask is not None) or True)
    steps = _decode_in_steps(model, tokens)
    torch.testing.assert_close(torch.cat([logits for _, logits in steps], dim=1), full, rtol=0, atol=2e-5)
    assert any(calls) and not all(calls)  # the masked chunk (24 -> 30) and the unmasked calls both took the path


def test_a_kv_cache_is_read_with_the_batch_it_was_made_for():
    """A cache of 3 rows fed 1 row would broadcast that row's keys into all 3 and return 3 rows of logits."""
    model = tiny_model()
    cache = model.new_cache(batch_size=3, max_len=16)
    with pytest.raises(ValueError, match="the KV cache was made for a batch of 3, not 1"):
        model(torch.randint(0, model.args.vocab_size, (1, 4)), cache)


def test_a_negative_number_of_key_value_heads_is_refused():
    with pytest.raises(ValueError, match="model.n_kv_heads must be positive"):
        tiny_args(n_kv_heads=-2)


def test_kv_cache_dynamic_ntk_each_step_equals_a_full_forward_of_its_prefix():
    """Dynamic NTK reads every position with the base of the current length, so the reference for
    a step is the full forward of the tokens so far (not one forward over all 80 tokens).

    Exact for one layer: the cached keys are rotated again with the current base. In deeper
    layers the cached keys and values were computed from hidden states of earlier steps
    (earlier bases); only recomputing the whole prefix removes that, as in every KV cache.
    """
    model = tiny_model({"kind": "dynamic", "scale": 4.0}, n_layers=1)
    tokens = torch.randint(0, model.args.vocab_size, (2, 80))
    for end, logits in _decode_in_steps(model, tokens):
        with torch.no_grad():
            reference = model(tokens[:, :end])[:, -logits.shape[1] :]
        torch.testing.assert_close(logits, reference, rtol=0, atol=2e-5)


def test_dynamic_ntk_cache_would_be_wrong_with_rotated_keys():
    """The HF #25104 failure: caching keys rotated at an earlier, shorter context changes the logits."""
    model = tiny_model({"kind": "dynamic", "scale": 4.0}, n_layers=1)
    tokens = torch.randint(0, model.args.vocab_size, (1, 64))
    with torch.no_grad():
        reference = model(tokens)[:, -1]
        cache = model.new_cache(1, 64)
        cache.raw_keys = False  # the buggy policy
        model(tokens[:, :40], cache)
        stale = [model(tokens[:, i : i + 1], cache) for i in range(40, 64)][-1][:, -1]
    assert (stale - reference).abs().max() > 1e-3


def _scores(position, q, k, start_q, start_k):
    rq = position.rotation(start_q, 1, 4096, q.device)
    rk = position.rotation(start_k, 1, 4096, k.device)
    return (apply_rotation(q, rq) * apply_rotation(k, rk)).sum(-1)


@pytest.mark.parametrize("kind", ["rope", "pi", "ntk", "yarn", "llama3"])
def test_rotary_scores_depend_only_on_relative_position(kind):
    position = build_position(tiny_args(), {"kind": kind, "scale": 4.0})
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    reference = _scores(position, q, k, 7, 3)
    for shift in (1, 50, 1000):
        torch.testing.assert_close(_scores(position, q, k, 7 + shift, 3 + shift), reference, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(_scores(position, q, k, 9, 3), reference, atol=1e-3)


@pytest.mark.parametrize("scale", [2.0, 4.0, 8.0, 2.5])
def test_pi_at_scale_s_on_position_p_equals_rope_on_p_over_s(scale):
    pi = PositionInterpolation(head_dim=16, scale=scale, original_window=32)
    rope = RoPE(head_dim=16, original_window=32)
    positions = torch.arange(200, dtype=torch.float64)
    expected = torch.outer(positions / scale, rope.base_inv_freq())
    got = pi.rotation(0, 200, 200, torch.device("cpu"))
    torch.testing.assert_close(got.cos[:, :8], expected.cos().float())
    torch.testing.assert_close(got.sin[:, :8], expected.sin().float())
    # and the PI table at p = s * m equals the RoPE table at integer m
    multiples = torch.arange(0, 200, int(scale)) if scale.is_integer() else torch.arange(0, 200, 5)
    rope_rows = (multiples / scale).long()
    torch.testing.assert_close(got.cos[multiples], rope.rotation(0, 200, 200, torch.device("cpu")).cos[rope_rows])


@pytest.mark.parametrize("kind", ["pi", "ntk", "dynamic", "yarn", "llama3", "sinusoidal"])
def test_scale_one_reduces_every_scaling_to_its_unscaled_form(kind):
    args = tiny_args()
    base_kind = "sinusoidal" if kind == "sinusoidal" else "rope"
    torch.manual_seed(1)
    scaled = build_model(args, {"kind": kind, "scale": 1.0}).eval()
    plain = build_model(args, {"kind": base_kind}).eval()
    plain.load_state_dict(scaled.state_dict())
    tokens = torch.randint(0, args.vocab_size, (1, 90))
    with torch.no_grad():
        assert torch.equal(scaled(tokens), plain(tokens))


def test_rotary_tables_are_float32_buffers_outside_the_state_dict_and_built_once():
    model = tiny_model({"kind": "pi", "scale": 4.0})
    assert not any("_cos" in k or "_sin" in k for k in model.state_dict())
    builds = []
    original = model.position._build
    model.position._build = lambda *a: (builds.append(a), original(*a))
    tokens = torch.randint(0, 101, (1, 64))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens)
        model(tokens)
    assert len(builds) == 1  # once per length, not per layer or per call
    assert model.position._cos.dtype == torch.float32
    # bf16 cannot hold position 257; the table must still tell 257 from 256
    table = model.position.rotation(0, 1024, 1024, torch.device("cpu"))
    assert not torch.equal(table.cos[256], table.cos[257])


def test_absolute_table_extension_keeps_end_points_and_coinciding_rows():
    old = torch.randn(5, 3)
    new = interpolate_table(old, 9)  # new row i reads old position i/2
    torch.testing.assert_close(new[0], old[0])
    torch.testing.assert_close(new[-1], old[-1])
    torch.testing.assert_close(new[::2], old)
    torch.testing.assert_close(new[1], (old[0] + old[1]) / 2)


def test_appended_absolute_rows_keep_the_trained_ones_and_start_untrained():
    torch.manual_seed(0)
    old = torch.randn(64, 32)
    new = append_rows(old, 256)
    assert torch.equal(new[:64], old)  # the trained window is untouched
    assert new[64:].std().item() == pytest.approx(0.02, rel=0.1)  # the rest drawn as a fresh table is
    assert torch.equal(append_rows(old, 16), old[:16])


def test_loading_a_shorter_absolute_table_resizes_it_the_way_the_model_says(tmp_path):
    base = tiny_model({"kind": "absolute"})  # 32 trained rows
    trained = base.position.table.detach().clone()
    for extend in ("interpolate", "append"):
        longer = tiny_model({"kind": "absolute", "scale": 4, "extend": extend})
        load_into(longer, base.state_dict())
        table = longer.position.table.detach()
        assert table.shape[0] == 128
        if extend == "append":
            assert torch.equal(table[:32], trained) and not torch.allclose(table[32:64], trained, atol=1e-3)
        else:
            assert torch.equal(table[0], trained[0]) and torch.equal(table[-1], trained[-1])
            assert not torch.equal(table[:32], trained)  # resampled: row i now reads old position i * 31 / 127


def test_extend_is_a_setting_of_the_absolute_table_only():
    with pytest.raises(PositionError, match="position.extend applies to the learned absolute table only"):
        build_position(tiny_args(), {"kind": "pi", "scale": 2, "extend": "append"})
    with pytest.raises(PositionError, match="position.extend='copy' is not one of interpolate, append"):
        build_position(tiny_args(), {"kind": "absolute", "scale": 2, "extend": "copy"})


def test_absolute_table_refuses_positions_beyond_its_end():
    position = LearnedAbsolute(dim=8, length=16)
    with pytest.raises(PositionError, match="extend it by interpolation"):
        position.embed(torch.zeros(1, 17, 8), 0)
    position.extend_to(32)
    assert position.embed(torch.zeros(1, 17, 8), 0).shape == (1, 17, 8)


@pytest.mark.parametrize(
    "position, message",
    [
        ({"kind": "alibi"}, "unknown position encoding 'alibi'"),
        ({"kind": "pi", "scale": 0.5}, "scale must be a number >= 1"),
        ({"kind": "pi", "scale": "eight"}, "scale must be a number >= 1"),
        ({"kind": "pi", "scale": math.nan}, "scale must be a number >= 1"),
        ({"kind": "none", "beta_fast": 3}, "takes no settings"),
        ({"kind": "llama3", "scale": 2, "low_freq_factor": 4, "high_freq_factor": 1}, "high_freq_factor > low_freq_factor"),
    ],
)
def test_bad_position_choices_raise_one_clear_error(position, message):
    with pytest.raises(PositionError, match=message):
        build_position(tiny_args(), position)


def test_bad_model_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by model.n_heads"):
        ModelArgs(dim=65, n_heads=4)
    with pytest.raises(ValueError, match="multiple of model.n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize(
    "name, params_billions, hidden",
    [
        ("llama1-7b", 6.74, 11008),
        ("llama1-13b", 13.0, 13824),
        ("llama1-33b", 32.5, 17920),
        ("llama1-65b", 65.2, 22016),
        ("llama2-70b", 69.0, 28672),
        ("llama3-8b", 8.03, 14336),
        ("tinyllama-1.1b", 1.10, 5632),
    ],
)
def test_presets_have_the_published_sizes(name, params_billions, hidden):
    args = PRESETS[name]
    assert args.hidden_dim == hidden
    per_layer = 2 * args.dim * args.dim + 2 * args.dim * args.kv_heads * args.head_dim + 3 * args.dim * hidden + 2 * args.dim
    total = args.n_layers * per_layer + 2 * args.vocab_size * args.dim + args.dim
    assert abs(total / 1e9 - params_billions) / params_billions < 0.01


def test_presets_build_on_the_meta_device():
    with torch.device("meta"):
        model = build_model(PRESETS["llama2-70b"], {"kind": "pi", "scale": 2})
    assert model.layers[0].attention.wk.weight.shape == (1024, 8192)


@pytest.mark.parametrize("kind", ["pi", "sinusoidal"])
def test_casting_the_model_to_bf16_keeps_position_tables_float32(kind):
    model = tiny_model({"kind": kind, "scale": 8.0})
    tokens = torch.randint(0, model.args.vocab_size, (1, 300))
    with torch.no_grad():
        model(tokens)  # builds the table in float32
        model.to(torch.bfloat16)  # casts buffers as well as weights
        model(tokens)
    table = model.position._cos if kind == "pi" else model.position._table
    assert table.dtype == torch.float32
    assert not torch.equal(table[256], table[257])
