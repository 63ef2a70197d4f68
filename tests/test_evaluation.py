"""The paper's measurements on tiny random models: sliding-window perplexity against a brute force
and against HF transformers, the passkey prompt and k_max rule, the Figure-2 attention analysis."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from data.errors import DataError
from data.tokenizer import train_tokenizer
from evaluation import (
    EvaluationError,
    PasskeyPrompter,
    check_window,
    fit_random_scores,
    generate,
    k_max,
    query_key_coefficients,
    run_passkey,
    sliding_spans,
    sliding_window_perplexity,
    window_stride,
)
from evaluation import passkey as passkey_module
from evaluation import perplexity as perplexity_module
from evaluation.attention import analyse_coefficients, inverse_frequencies, scores
from evaluation.passkey import FILLER, INSTRUCTION, KEY_LINE, QUESTION, greedy_continuations, is_retrieved
from evaluation.perplexity import float32_logits, prepare_documents
from model.position import apply_rotation

VOCAB = 320


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A 320-piece BPE tokenizer trained in milliseconds on the passkey prompt's words."""
    rng = random.Random(0)
    words = re.findall(r"[A-Za-z]+", " ".join([INSTRUCTION, FILLER, QUESTION, KEY_LINE]))
    lines = [INSTRUCTION, FILLER, QUESTION] + [KEY_LINE.format(key=rng.randint(10000, 99999)) for _ in range(50)]
    lines += [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(500)]
    return train_tokenizer(["\n".join(lines)], tmp_path_factory.mktemp("tok") / "tiny.model", VOCAB)


def _documents(lengths, vocab=101, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n) for n in lengths]


# ----------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("n_tokens", [0, 1, 2, 5, 16, 17, 40, 41, 100])
@pytest.mark.parametrize("window, stride", [(16, 4), (16, 16), (16, 5), (8, 1)])
def test_spans_score_every_token_after_the_first_exactly_once(n_tokens, window, stride):
    scored = [t for s in sliding_spans(n_tokens, window, stride) for t in range(s.score_from, s.end)]
    assert scored == list(range(1, n_tokens))
    effective = min(stride, window - 1)  # a stride of the whole window is read as window - 1: no token is dropped
    for span in sliding_spans(n_tokens, window, stride):
        assert span.end - span.start <= window and span.start % effective == 0
        if span.start > 0:
            assert span.score_from - span.start >= window - effective  # at least window - stride tokens of context


def _brute_force_nll(model, doc, window, stride):
    """Each token scored by its own forward over the left context the protocol gives it."""
    tokens = torch.as_tensor(doc)
    total, count = 0.0, 0
    stride = min(stride, window - 1)  # a window's first token cannot be scored: the next window starts one earlier
    for p in range(1, len(tokens)):
        # Window k starts at k * stride and is the first to reach token p when k * stride + window > p.
        start = 0 if p < window else ((p - window) // stride + 1) * stride
        if start == p:  # a window's first token has no context inside it
            continue
        with torch.no_grad():
            logits = model(tokens[None, start:p])[0, -1]
        total += F.cross_entropy(logits[None].double(), tokens[p : p + 1]).item()
        count += 1
    return total, count


@pytest.mark.parametrize("position", [{"kind": "rope"}, {"kind": "pi", "scale": 4.0}, {"kind": "absolute", "scale": 4.0}], ids=lambda p: p["kind"])
@pytest.mark.parametrize("window, stride", [(16, 4), (16, 16), (12, 5)])
def test_sliding_window_perplexity_equals_brute_force(position, window, stride):
    model = tiny_model(position)
    docs = _documents([70, 9, 33, 2])  # longer than, shorter than and a multiple of the stride
    result = sliding_window_perplexity(model, docs, window, stride, batch_size=3)
    brute = [_brute_force_nll(model, d, window, stride) for d in docs]
    assert result.tokens == sum(c for _, c in brute)
    assert result.nll == pytest.approx(sum(n for n, _ in brute), rel=1e-5)
    for per_doc, (nll, count) in zip(result.per_document, brute):
        assert per_doc["tokens"] == count and per_doc["nll"] == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(sum(n for n, _ in brute) / result.tokens), rel=1e-5)


def test_shards_of_the_windows_add_up_to_the_whole_reading():
    """DDP's ranks divide the by-step evaluation's windows (shard=(rank, ranks)): each window is read by one
    rank, in the batch it would have been in, so the ranks' sums are the one-process numbers."""
    model = tiny_model()
    docs = _documents([70, 9, 33, 41, 64])
    whole = sliding_window_perplexity(model, docs, 16, 4, batch_size=3)
    shards = [sliding_window_perplexity(model, docs, 16, 4, batch_size=3, shard=(rank, 3)) for rank in range(3)]
    assert all(0 < shard.tokens < whole.tokens for shard in shards)  # each rank reads a share, none all of it
    assert sum(shard.tokens for shard in shards) == whole.tokens
    assert sum(shard.nll for shard in shards) == pytest.approx(whole.nll, rel=1e-12)
    for d, per_doc in enumerate(whole.per_document):
        assert sum(shard.per_document[d]["tokens"] for shard in shards) == per_doc["tokens"]
    with pytest.raises(ValueError, match=r"shard=\(3, 3\) must be \(rank, ranks\)"):
        sliding_window_perplexity(model, docs, 16, 4, shard=(3, 3))


def _brute_force_losses(model, doc, window, stride):
    """Each scored position's loss, by its own forward over the left context the protocol gives it."""
    tokens, stride = torch.as_tensor(doc), min(stride, window - 1)
    losses = {}
    for p in range(1, len(tokens)):
        start = 0 if p < window else ((p - window) // stride + 1) * stride
        with torch.no_grad():
            logits = model(tokens[None, start:p])[0, -1]
        losses[p] = F.cross_entropy(logits[None].double(), tokens[p : p + 1]).item()
    return losses


@pytest.mark.parametrize("window, stride, chunk", [(16, 4, 8192), (48, 8, 8192), (48, 8, 10)],
                         ids=["window-below-block", "window-above-block", "logits-in-chunks"])
def test_blocks_are_fixed_ranges_of_positions_the_same_at_any_window_and_add_up(monkeypatch, window, stride, chunk):
    """The bootstrap's blocks (evaluation/uncertainty.py): block b of a document holds the losses of its
    positions 1 + 20b .. 20(b + 1) (20 tokens a block here), whatever window and stride read them, even a window
    longer than a block; they add up to each document and to the whole, and DDP's shards add up to them."""
    monkeypatch.setattr(perplexity_module, "BLOCK_TOKENS", 20)
    monkeypatch.setattr(perplexity_module, "LOGIT_CHUNK_TOKENS", chunk)  # 10: a window's targets over several chunks
    docs = _documents([70, 9, 41, 1, 0, 20])
    model = tiny_model()
    result = sliding_window_perplexity(model, docs, window, stride, batch_size=3)
    expected_nll, expected_tokens = [], []
    for doc in docs:
        losses = _brute_force_losses(model, doc, window, stride)
        for first in range(1, len(doc), 20):
            positions = range(first, min(first + 20, len(doc)))
            expected_nll.append(sum(losses[p] for p in positions))
            expected_tokens.append(len(positions))
    assert result.blocks["tokens"] == expected_tokens == [20, 20, 20, 9, 8, 20, 20, 19]  # 1- and 0-token documents have none
    assert result.blocks["nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert sum(result.blocks["nll"]) == pytest.approx(result.nll, rel=1e-12) and sum(expected_tokens) == result.tokens
    other = sliding_window_perplexity(tiny_model({"kind": "pi", "scale": 4.0}), docs, 32, 5, batch_size=2)
    assert other.blocks["tokens"] == result.blocks["tokens"] and other.blocks["documents"] == result.blocks["documents"]
    assert sliding_window_perplexity(model, docs[:3], window, stride).blocks["documents"] != result.blocks["documents"]
    shards = [sliding_window_perplexity(model, docs, window, stride, batch_size=3, shard=(rank, 2)) for rank in range(2)]
    assert [a + b for a, b in zip(*(s.blocks["tokens"] for s in shards))] == result.blocks["tokens"]
    assert [a + b for a, b in zip(*(s.blocks["nll"] for s in shards))] == pytest.approx(result.blocks["nll"], rel=1e-12)


def test_passkey_shards_are_the_whole_grids_rows(tokenizer):
    """Rank r of n decodes distances r, r + n, ...: those rows of the one-process grid, with the same keys."""
    model = tiny_model(vocab_size=VOCAB, max_seq_len=256)
    whole = run_passkey(model, tokenizer, 256, num_positions=5, trials=2, batch_size=2)
    for rank in range(2):
        part = run_passkey(model, tokenizer, 256, num_positions=5, trials=2, batch_size=2, shard=(rank, 2))
        assert part.distances == whole.distances[rank::2] and part.keys == whole.keys[rank::2]
        assert part.successes == whole.successes[rank::2] and part.answers == whole.answers[rank::2]


def test_the_passkey_batch_is_the_one_the_processes_agree_on(tokenizer, monkeypatch):
    """Under FSDP every forward gathers weights from all ranks: a rank with less free GPU memory than the others
    (a smaller fitted batch) would run more forwards and hang them. The agreed size (the minimum over the
    ranks, from the callback) is the one every rank decodes with."""
    model = tiny_model(vocab_size=VOCAB, max_seq_len=256)
    batches: list[int] = []
    decode = passkey_module.greedy_continuations
    monkeypatch.setattr(passkey_module, "greedy_continuations",
                        lambda model, prompts, n: batches.append(len(prompts)) or decode(model, prompts, n))
    asked: list[int] = []
    agreed = run_passkey(model, tokenizer, 256, num_positions=2, trials=4, batch_size=4,
                         agree_batch_size=lambda fitted: asked.append(fitted) or 2)
    assert asked == [4] and batches == [2, 2, 2, 2]
    assert agreed.successes == run_passkey(model, tokenizer, 256, num_positions=2, trials=4, batch_size=4).successes


def test_stride_equal_to_window_scores_every_token_reading_each_window_start_with_one_token_of_context():
    """Non-overlapping chunks would leave each chunk's first token unscored (a 64-token document: 60 of 63)."""
    model = tiny_model()
    doc = _documents([64])[0]
    result = sliding_window_perplexity(model, [doc], window=16, stride=16)
    assert result.tokens == 63
    assert result.nll == pytest.approx(sliding_window_perplexity(model, [doc], window=16, stride=15).nll, rel=1e-12)


def test_short_windows_are_read_with_the_papers_least_context():
    """The paper's stride 256 at its windows >= 2048 leaves every scored token >= 7/8 of the window as context;
    at a small model's window of 256 the same stride would give the window's tokens 0 to 255 tokens of it."""
    assert [window_stride(256, w) for w in (2048, 4096, 1024, 256, 128, 4)] == [256, 256, 128, 32, 16, 1]
    assert window_stride(256, 256, None) == 256
    model = tiny_model()
    doc = _documents([200])[0]
    capped = sliding_window_perplexity(model, [doc], window=32, stride=window_stride(256, 32))
    spans = sliding_spans(len(doc), 32, window_stride(256, 32))
    assert min(s.score_from - s.start for s in spans[1:]) >= 28 and capped.tokens == 199


def test_batching_does_not_change_the_result():
    model = tiny_model({"kind": "pi", "scale": 2.0})
    docs = _documents([90, 45, 61])
    results = [sliding_window_perplexity(model, docs, 24, 8, batch_size=b).nll for b in (1, 2, 7)]
    assert results[1] == pytest.approx(results[0], rel=1e-6) and results[2] == pytest.approx(results[0], rel=1e-6)


def test_output_head_runs_on_scored_positions_only():
    """Memory stays flat: the vocabulary projection sees at most batch x stride rows after the first window."""
    model = tiny_model()
    rows = []
    model.output.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[:2]))
    sliding_window_perplexity(model, _documents([200]), window=32, stride=8, batch_size=2)
    assert rows[0] == (1, 31)  # the first window scores all its tokens
    assert all(n == 8 and b <= 2 for b, n in rows[1:])
    assert sum(b * n for b, n in rows) == 199


def test_the_output_head_is_read_in_float32_from_a_bf16_model_and_under_autocast():
    """bf16 logits are rounded to 8 bits of mantissa, as large as the gaps the paper's tables report: the
    evaluations apply the head in float32 to the (bf16) hidden states."""
    model = tiny_model()
    hidden = torch.randn(2, 5, model.args.dim, generator=torch.Generator().manual_seed(0))
    weight = model.output.weight.detach().clone()
    under_autocast_exact = hidden @ weight.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.output(hidden).dtype == torch.bfloat16  # what the head gives there by itself
        logits = float32_logits(model, hidden)
    assert logits.dtype == torch.float32 and torch.allclose(logits, under_autocast_exact, rtol=1e-5, atol=1e-6)

    model = model.to(torch.bfloat16)
    hidden = hidden.bfloat16()
    exact = hidden.float() @ model.output.weight.float().T  # float32 arithmetic on the bf16 values
    logits = float32_logits(model, hidden)
    assert logits.dtype == torch.float32 and torch.allclose(logits, exact, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.output(hidden).float(), logits)  # the bf16 head rounds


class _TieInBf16(torch.nn.Module):
    """A bf16 decoder whose every hidden state is (1, 1) and whose head scores token 5 at 8.0 and token 7 at
    8.03125: in bf16 (steps of 1/16 at 8) the two tie and argmax takes 5; in float32, 7 is the answer."""

    def __init__(self) -> None:
        super().__init__()
        self.output = torch.nn.Linear(2, 10, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            self.output.weight.zero_()
            self.output.weight[5] = torch.tensor([8.0, 0.0])
            self.output.weight[7] = torch.tensor([8.0, 0.03125])

    def new_cache(self, batch: int, length: int) -> None:
        return None

    def hidden_states(self, tokens: torch.Tensor, cache: None = None) -> torch.Tensor:
        return torch.ones(*tokens.shape, 2, dtype=torch.bfloat16)


def test_greedy_passkey_decoding_and_generation_read_a_bf16_head_in_float32():
    model = _TieInBf16()
    assert int(model.output(model.hidden_states(torch.ones(1, 1))).argmax(-1)) == 5  # the bf16 head's tie
    assert greedy_continuations(model, torch.ones(2, 3, dtype=torch.long), 2).tolist() == [[7, 7], [7, 7]]
    assert generate(model, [1, 2, 3], max_new_tokens=2, temperature=0) == [7, 7]


def test_long_first_windows_make_their_logits_a_chunk_at_a_time(monkeypatch):
    """A first window scores all its tokens: at 32k tokens and a 128k vocabulary its float32 logits alone would
    be 16 GiB. The head sees at most LOGIT_CHUNK_TOKENS scored positions of the batch at a time, and the
    numbers are the brute force's."""
    import evaluation.perplexity as perplexity

    monkeypatch.setattr(perplexity, "LOGIT_CHUNK_TOKENS", 10)
    model = tiny_model({"kind": "pi", "scale": 2.0})
    rows = []
    model.output.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[:2]))
    docs = _documents([70, 33])
    result = sliding_window_perplexity(model, docs, window=24, stride=6, batch_size=2)
    assert max(b * n for b, n in rows) <= 10 and (2, 5) in rows  # the two first windows of 23 scored tokens: 5 at a time
    brute = [_brute_force_nll(model, d, 24, 6) for d in docs]
    assert result.tokens == 69 + 32 and result.nll == pytest.approx(sum(n for n, _ in brute), rel=1e-5)


def test_perplexity_matches_hf_transformers():
    pytest.importorskip("transformers")
    from hf_oracle import hf_twin

    class HFScorer:
        """HF's LlamaForCausalLM seen through the two calls the protocol makes."""

        def __init__(self, hf):
            self.hf = hf

        def hidden_states(self, tokens):
            return self.hf.model(input_ids=tokens).last_hidden_state

        def output(self, hidden):
            return self.hf.lm_head(hidden)

        def parameters(self):
            return self.hf.parameters()

    docs = _documents([120, 50])
    for position in ({"kind": "rope"}, {"kind": "pi", "scale": 4.0}):
        model = tiny_model(position)
        hf = HFScorer(hf_twin(model, position))
        for window, stride in ((64, 16), (32, 32)):  # 64 reads beyond the base window of 32
            ours = sliding_window_perplexity(model, docs, window, stride)
            with torch.no_grad():
                theirs = sliding_window_perplexity(hf, docs, window, stride)
            assert ours.tokens == theirs.tokens
            assert ours.ppl == pytest.approx(theirs.ppl, rel=1e-5)
            assert abs(ours.ppl - 101) > 1  # not the uniform-prediction value: the models really differ from chance


def test_document_selection_keeps_long_documents_and_truncates():
    docs = _documents([10, 50, 30, 80])
    kept = prepare_documents(docs, max_documents=2, max_tokens_per_document=40, min_tokens_per_document=30)
    assert [len(d) for d in kept] == [40, 30]
    with pytest.raises(EvaluationError, match="max_documents"):
        prepare_documents(docs, max_documents=0)


def test_bad_stride_is_one_clear_error():
    with pytest.raises(EvaluationError, match="stride=20 must be between 1 and the window"):
        sliding_spans(100, 16, 20)


def test_window_beyond_an_absolute_table_is_one_clear_error():
    model = tiny_model({"kind": "absolute"})  # 32 learned positions
    check_window(model, 32, "ppl window 32")
    with pytest.raises(EvaluationError, match="ppl window 64 needs 64 positions .* only 32"):
        check_window(model, 64, "ppl window 64")


# ----------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("length", [200, 300, 517])
def test_passkey_prompt_puts_the_key_at_the_requested_distance(tokenizer, length):
    prompter = PasskeyPrompter(tokenizer)
    smallest, largest = prompter.distance_range(length)
    rng = random.Random(length)
    for distance in sorted({smallest, smallest + 1, largest - 1, largest, *rng.sample(range(smallest, largest), min(20, largest - smallest))}):
        key = str(rng.randint(10000, 99999))
        prompt = prompter.build(key, distance, length)
        assert len(prompt.tokens) == length and prompt.distance == distance
        # Counted independently: the key starts exactly `distance` tokens before the end.
        tail, head = tokenizer.decode(prompt.tokens[-distance:]), tokenizer.decode(prompt.tokens[:-distance])
        assert tail.lstrip().startswith(f"{key}. Remember it. {key} is the pass key.")
        assert tail.rstrip().endswith(QUESTION)
        assert key not in head and head.rstrip().endswith("The pass key is")
        assert tokenizer.decode(prompt.tokens).startswith(INSTRUCTION)
        assert re.search(r"pass key\.\S", tail) is None  # the filler never glues onto the key line
        assert prompt.tokens[0] == tokenizer.bos_id and prompt.tokens.count(tokenizer.bos_id) == 1


class ByteTokenizer:
    """A byte-level tokenizer without sentencepiece's dummy prefix, as LLaMA 3's BPE: "a" + "b" encodes to "ab"."""

    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode()


def test_passkey_prompt_keeps_words_apart_under_a_tokenizer_without_a_dummy_prefix(tokenizer):
    """Pieces encoded apart and joined would read "...there.The grass is green..." and "...is yellow.What is..."
    under LLaMA 3's tokenizer; sentencepiece's prompts are unchanged (no separator)."""
    assert PasskeyPrompter(tokenizer).space == ""
    byte_tokenizer = ByteTokenizer()
    prompter = PasskeyPrompter(byte_tokenizer)
    smallest, largest = prompter.distance_range(700)
    for distance in (smallest, smallest + 7, (smallest + largest) // 2, largest - 3, largest):
        prompt = prompter.build("40213", distance, 700)
        text = byte_tokenizer.decode(prompt.tokens)
        assert text.startswith(INSTRUCTION + " ")  # a cut filler repeat may follow, as under sentencepiece
        assert re.search(r"[\w.][A-Z]", text) is None, text  # no sentence runs into the next
        assert "The pass key is 40213. Remember it. 40213 is the pass key." in text and text.endswith(" " + QUESTION)
        assert prompt.distance == distance and byte_tokenizer.decode(prompt.tokens[-distance:]).startswith("40213.")
    assert byte_tokenizer.decode(prompter.answer("40213")) == " 40213"


def test_passkey_prompt_refuses_an_unreachable_distance(tokenizer):
    prompter = PasskeyPrompter(tokenizer)
    smallest, largest = prompter.distance_range(200)
    with pytest.raises(DataError, match=f"place the key {smallest} to {largest} tokens from the end"):
        prompter.build("12345", largest + 1, 200)


def test_a_passkey_batch_is_cut_to_what_the_gpus_free_memory_holds(tokenizer, monkeypatch):
    """passkey.batch_size=10 prompts of 32k tokens would plan 160 GiB of KV cache for LLaMA 7B in bf16: the batch
    is lowered to what fits, never below 1, and left as asked where no limit is known (CPU)."""
    import evaluation.passkey as passkey
    from model.args import preset

    llama = preset("llama1-7b")
    assert passkey.prompt_bytes(llama, 32768, 2) == 32768 * 2 * (2 * 32 * 32 * 128 + 3 * 11008 + 4 * 4096)
    sixty = 60 * 2**30
    assert [passkey.fitted_batch_size(10, llama, w, 2, sixty) for w in (4096, 8192, 16384, 32768)] == [10, 10, 5, 2]
    assert passkey.fitted_batch_size(10, llama, 32768, 2, 2**30) == 1 and passkey.fitted_batch_size(10, llama, 32768, 2, None) == 10
    # run_passkey decodes in the batches the fit allows
    batches = []
    greedy = passkey.greedy_continuations
    monkeypatch.setattr(passkey, "fitted_batch_size", lambda batch, args, tokens, itemsize, free: 3)
    monkeypatch.setattr(passkey, "greedy_continuations", lambda model, prompts, n: batches.append(len(prompts)) or greedy(model, prompts, n))
    run_passkey(tiny_model(vocab_size=VOCAB), tokenizer, 300, num_positions=2, trials=7, batch_size=10)
    assert batches == [3, 3, 1, 3, 3, 1]


def test_k_max_follows_the_twenty_percent_rule():
    distances = [100, 200, 300, 400, 500, 600]
    assert k_max(distances, [1.0, 0.9, 0.2, 0.3, 0.0, 0.0]) == 400  # 0.2 counts as success
    assert k_max(distances, [1.0, 0.1, 1.0, 1.0, 1.0, 1.0]) == 100  # a gap ends it even if later k succeed
    assert k_max(distances, [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == 0
    assert k_max(distances, [1.0] * 6) == 600
    assert k_max(list(reversed(distances)), [0.0, 0.0, 0.5, 0.5, 0.5, 0.5]) == 400  # order of the input does not matter
    assert k_max(distances, [0.5, 0.4, 0.3, 0.3, 0.3, 0.3], threshold=0.35) == 200


def test_greedy_decoding_with_the_cache_equals_full_forwards():
    model = tiny_model({"kind": "pi", "scale": 2.0})
    prompts = torch.randint(3, 101, (3, 20))
    fast = greedy_continuations(model, prompts, 6)
    tokens = prompts
    with torch.no_grad():
        for _ in range(6):
            tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(fast, tokens[:, 20:])


def test_passkey_grid_and_k_max_from_an_oracle_that_sees_only_the_last_tokens(tokenizer, monkeypatch):
    """A stand-in decoder that answers correctly only when the key is among the last 120 prompt tokens."""
    reach = 120

    in_prompts = []

    def oracle(model, prompts, n_new):
        answers = []
        for prompt in prompts.tolist():
            in_prompts.append(re.search(r"(\d{5})\. Remember", tokenizer.decode(prompt)).group(1))
            found = re.search(r"(\d{5})\. Remember", tokenizer.decode(prompt[-reach:]))  # the key's first occurrence
            answer = tokenizer.encode(found.group(1) if found else "00000", bos=False)
            answers.append((answer + [tokenizer.eos_id] * n_new)[:n_new])
        return torch.tensor(answers)

    monkeypatch.setattr(passkey_module, "greedy_continuations", oracle)
    model = tiny_model(vocab_size=VOCAB, max_seq_len=64)
    result = run_passkey(model, tokenizer, window=256, num_positions=8, trials=3, seed=1)
    assert len(result.distances) == 8 and all(len(row) == 3 for row in result.successes)
    assert result.distances[-1] > reach
    assert result.success_rates == [1.0 if d <= reach else 0.0 for d in result.distances]
    assert result.k_max == max(d for d in result.distances if d <= reach)
    assert [key for row in result.keys for key in row] == in_prompts  # the key each prompt hid, trial by trial
    assert result.to_dict()["keys"] == result.keys
    # A short range gives fewer distances than asked for: one row of keys per distance tested, not per position asked.
    in_prompts.clear()
    few = run_passkey(model, tokenizer, window=180, num_positions=30, trials=2, seed=1)
    assert len(few.distances) < 30 and len(few.keys) == len(few.distances) == len(few.successes)
    assert [key for row in few.keys for key in row] == in_prompts


def test_passkey_runs_on_a_real_tiny_model(tokenizer):
    model = tiny_model({"kind": "pi", "scale": 4.0}, vocab_size=VOCAB, max_seq_len=64)
    result = run_passkey(model, tokenizer, window=256, num_positions=4, trials=2, batch_size=2)
    assert result.prompt_length == 256 - 6  # "▁" + five digits
    assert len(result.answers) == 4 and result.k_max in [0, *result.distances]


# ----------------------------------------------------------------------------- attention analysis


def test_attention_fit_reproduces_figure_2_for_d128_l2048():
    facts, curves = fit_random_scores(head_dim=128, window=2048, theta=10000.0, extent=2.0, seed=0)
    assert facts["inside_max"] < 1.5  # bounded on the fitted integers
    assert facts["interpolation_max"] < 1.05 * facts["inside_max"]  # and between them
    assert facts["extrapolation_max"] > 100 * facts["inside_max"]  # but not beyond L
    assert facts["interpolation_error_max"] <= facts["interpolation_bound"]  # Theorem 3.1
    assert facts["bound_ratio_at_b_equal_d"] == pytest.approx(64 * math.log(10000.0))  # ~589: "~600x tighter"
    assert facts["bound_ratio_mean"] > 500
    assert curves["interpolation"].shape == (1, 2048 * 16 + 1)


def test_interpolation_error_bound_holds_for_random_coefficients():
    inv_freq = inverse_frequencies(64, 10000.0)
    rng = np.random.default_rng(0)
    h = rng.normal(size=(50, 32)) + 1j * rng.normal(size=(50, 32))
    summary, _ = analyse_coefficients(h, inv_freq, 10000.0, window=256)
    assert np.all(summary["interpolation_error_max"] <= summary["interpolation_bound_exact"])
    assert np.all(summary["interpolation_error_max"] <= summary["interpolation_bound"])  # random h: far from the worst


@pytest.mark.parametrize("head_dim", [16, 128])
def test_the_exact_interpolation_bound_is_tight_and_the_papers_form_is_not_a_bound_at_small_d(head_dim):
    """The worst case of Theorem 3.1: h_j = e^(-i s0 theta_j) lines up every term's curvature at s0 = n + 1/2, where
    linear interpolation between n and n + 1 errs by about max|a''| / 8 = sum_j theta_j^2 / 8, the exact bound. The
    paper's d / (32 ln c) replaces that sum by a smaller integral, which the worst case exceeds: 2.5x at d = 16,
    by 14% at d = 128."""
    inv_freq = inverse_frequencies(head_dim, 10000.0)
    s0 = 100.5
    h = np.exp(-1j * s0 * inv_freq)[None]
    summary, _ = analyse_coefficients(h, inv_freq, 10000.0, window=256)
    error, exact, paper = (float(summary[k][0]) for k in ("interpolation_error_max", "interpolation_bound_exact",
                                                          "interpolation_bound"))
    assert 0.95 * exact <= error <= exact
    assert error > (2 if head_dim == 16 else 1.1) * paper


def test_query_key_coefficients_give_the_model_rotary_scores():
    """h_j from the half-split pairs (j, j + d/2) reproduces q_m . k_n after the model's own rotation."""
    model = tiny_model({"kind": "rope"})
    tokens = torch.randint(3, 101, (30,))
    h, where = query_key_coefficients(model, tokens, pairs=12, seed=3)
    captured = {}
    hooks = [getattr(layer.attention, n).register_forward_hook(lambda m, i, o, key=(idx, n): captured.__setitem__(key, o))
             for idx, layer in enumerate(model.layers) for n in ("wq", "wk")]
    with torch.no_grad():
        model(tokens[None])
    for hook in hooks:
        hook.remove()
    d, group = model.args.head_dim, model.args.n_heads // model.args.kv_heads
    rotation = model.position.rotation(0, 30, 30, torch.device("cpu"))
    inv_freq = inverse_frequencies(d, model.args.rope_theta)
    for coefficients, w in zip(h, where):
        q = captured[(w["layer"], "wq")][0, :, w["head"] * d : (w["head"] + 1) * d]
        kv = w["head"] // group
        k = captured[(w["layer"], "wk")][0, :, kv * d : (kv + 1) * d]
        q_rot = apply_rotation(q[None, None], rotation)[0, 0, w["query"]]
        k_rot = apply_rotation(k[None, None], rotation)[0, 0, w["key"]]
        expected = float(q_rot @ k_rot)
        got = scores(coefficients[None], np.array([w["query"] - w["key"]], dtype=float), inv_freq)[0, 0]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- generation


def test_generation_greedy_matches_argmax_and_sampling_is_seeded():
    model = tiny_model()
    prompt = [1, 5, 9, 13]
    greedy = generate(model, prompt, max_new_tokens=8, temperature=0)
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(8):
            tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
    assert greedy == tokens[0, 4:].tolist()
    assert generate(model, prompt, 8, temperature=1.0, top_p=1e-6) == greedy  # a tiny nucleus keeps the top token only
    first, again = generate(model, prompt, 8, 1.0, 0.9, seed=3), generate(model, prompt, 8, 1.0, 0.9, seed=3)
    assert first == again and len(first) == 8
    with pytest.raises(EvaluationError, match="exceeds the 20 positions"):
        generate(model, prompt, 30, max_len=20)


def test_a_passkey_counts_as_retrieved_only_when_spelled_as_the_whole_number():
    assert is_retrieved("12345", "12345") and is_retrieved("12345.", "12345") and is_retrieved("12345 is the", "12345")
    assert not is_retrieved("123456", "12345") and not is_retrieved("1234", "12345") and not is_retrieved("x12345", "12345")


def test_the_real_query_key_analysis_reads_each_rows_own_frequencies():
    """A row read with NTK (or a RoPE theta override) is analysed with its frequencies, not the checkpoint's theta;
    encodings whose frequencies are not c^(-2j/d) are refused rather than analysed as if they were."""
    from evaluation.attention import analyse_model, geometric_theta

    base = tiny_model({"kind": "rope"})
    ntk = tiny_model({"kind": "ntk", "scale": 4.0})
    d = base.args.head_dim
    assert geometric_theta(base.position) == base.args.rope_theta
    assert geometric_theta(ntk.position) == pytest.approx(base.args.rope_theta * 4 ** (d / (d - 2)))
    assert geometric_theta(tiny_model({"kind": "pi", "scale": 4.0}).position) == base.args.rope_theta
    ntk.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 101, (40,))
    facts_base, _ = analyse_model(base, tokens, pairs=4)
    facts_ntk, _ = analyse_model(ntk, tokens, pairs=4)
    assert facts_ntk["theta"] == pytest.approx(geometric_theta(ntk.position))
    assert facts_ntk["extrapolation_max_median"] != facts_base["extrapolation_max_median"]
    assert geometric_theta(tiny_model({"kind": "yarn", "scale": 1.0}).position) == base.args.rope_theta  # plain RoPE
    with pytest.raises(EvaluationError, match="position 'yarn' bends them"):
        analyse_model(tiny_model({"kind": "yarn", "scale": 4.0}), tokens, pairs=4)


def test_passkey_decoding_runs_without_autograd(tokenizer):
    """Greedy decoding keeps no activations for a backward pass (at long windows they would not fit)."""
    model = tiny_model({"kind": "pi", "scale": 8.0}, vocab_size=VOCAB).eval()
    seen = []
    model.norm.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    run_passkey(model, tokenizer, 256, num_positions=1, trials=1)
    assert seen and not any(seen)
