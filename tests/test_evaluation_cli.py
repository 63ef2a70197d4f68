"""evaluate.py end to end on tiny saved checkpoints, its config, its user errors, and the training callback."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_model
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_evaluation import VOCAB, tokenizer  # noqa: F401  (the session-scoped tokenizer fixture)

from evaluation import EvaluationError
from evaluation.callback import ExtensionEvalCallback, default_document_cut
from evaluation.passkey import FILLER, INSTRUCTION, QUESTION
from evaluation.perplexity import sliding_window_perplexity
from evaluation.run import evaluate
from data.tokenizer import train_tokenizer
from model.checkpoints import project_payload, tokenizer_info


def save_checkpoint(path: Path, model, position: dict, tokenizer_path: Path | None, step: int = 0,
                    train_seq_len: int | None = None) -> Path:
    """A checkpoint in the project's format (see model.checkpoints' docstring)."""
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "pi_llama": project_payload(model.args, position, tokenizer_path, train_seq_len),
            "global_step": step,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory, tokenizer):  # noqa: F811
    """Two tiny checkpoints (base RoPE window 32, and an absolute-position model) plus a small jsonl corpus."""
    root = tmp_path_factory.mktemp("project")
    torch.manual_seed(0)
    base = save_checkpoint(root / "base.ckpt", tiny_model({"kind": "rope"}, vocab_size=VOCAB), {"kind": "rope"}, tokenizer.path, 0)
    pi = save_checkpoint(root / "pi4.ckpt", tiny_model({"kind": "pi", "scale": 4.0}, vocab_size=VOCAB), {"kind": "pi", "scale": 4.0}, tokenizer.path, 50)
    absolute = save_checkpoint(root / "abs.ckpt", tiny_model({"kind": "absolute"}, vocab_size=VOCAB), {"kind": "absolute"}, tokenizer.path)
    # Weights without their tokenizer, one of them with 300 more embedding rows than the test tokenizer has pieces.
    untokenized = save_checkpoint(root / "untokenized.ckpt", tiny_model({"kind": "rope"}, vocab_size=VOCAB), {"kind": "rope"}, None)
    wider = save_checkpoint(root / "wider.ckpt", tiny_model({"kind": "rope"}, vocab_size=VOCAB + 300), {"kind": "rope"}, None)
    rng = random.Random(0)
    words = re.findall(r"[a-z]+", " ".join([INSTRUCTION, FILLER, QUESTION]).lower())
    with (root / "docs.jsonl").open("w") as handle:
        for _ in range(40):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(60, 160))) + "."
            handle.write(json.dumps({"text": text}) + "\n")
    return {"root": root, "base": base, "pi": pi, "absolute": absolute, "untokenized": untokenized, "wider": wider,
            "tokenizer": tokenizer.path, "docs": root / "docs.jsonl"}


def _data_overrides(project) -> list[str]:
    return ["data=jsonl", f"data.path={project['docs']}", f"data.cache_dir={project['root'] / 'cache'}"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PI_LLAMA_CACHE": str(cwd / "pi_cache"), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _position_searchpath(tmp_path: Path) -> list[str]:
    """The lead's conf/position group if it exists, else a stand-in with the same shape."""
    if (ROOT / "conf" / "position" / "pi.yaml").exists():
        return []
    folder = tmp_path / "extra_conf" / "position"
    folder.mkdir(parents=True)
    (folder / "pi.yaml").write_text("kind: pi\nscale: ${scale}\n")
    return [f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]"]


def test_evaluate_end_to_end_writes_json_markdown_and_plots(project, tmp_path):
    variants = f"variants=[{{name: base-read-with-pi4, ckpt: '{project['base']}', position: {{kind: pi, scale: 4}}}}]"
    result = _run(
        [
            f"ckpt=[{project['base']},{project['pi']}]",
            variants,
            "task=[ppl,passkey,attention,generate]",
            "ppl.windows=[16,32,64]",
            "ppl.stride=16",
            "ppl.max_documents=2",
            "passkey.window=256",
            "passkey.num_positions=3",
            "passkey.trials=2",
            "attention.window=256",
            "attention.pairs=8",
            "generate.max_new_tokens=5",
            "generate.prompt=the grass",
            f"hydra.run.dir={tmp_path / 'run'}",
            *_data_overrides(project),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    assert f"results written to {out.resolve()}" in result.stdout
    assert "k_max =" in result.stdout
    results = json.loads((out / "results.json").read_text())
    names = ["base", "pi4", "base-read-with-pi4"]
    assert [m["name"] for m in results["models"]] == names
    assert results["models"][2]["position"] == {"kind": "pi", "scale": 4}
    assert results["models"][1]["global_step"] == 50
    assert results["config"]["ppl"]["windows"] == [16, 32, 64]  # the exact config travels with the numbers
    assert set(results["ppl_table"]) == set(names) and all(set(r) == {"16", "32", "64"} for r in results["ppl_table"].values())
    assert all(math_ok(v) for r in results["ppl_table"].values() for v in r.values())
    # Reading the base model with PI changes its numbers beyond position 0.
    assert results["ppl_table"]["base"]["64"] != results["ppl_table"]["base-read-with-pi4"]["64"]
    assert set(results["passkey"]) == set(names) and results["passkey"]["pi4"]["window"] == 256
    assert results["attention"]["paper_fit"]["window"] == 256
    assert results["attention"]["query_key"]["pi4"]["pairs"] == 8
    assert list(results["attention"]["fits"]) == ["fit d=16 L=32 c=10000"]  # one fit per model shape, not per row
    assert results["attention"]["query_key"]["pi4"]["interpolation_bound_holds"] == 1.0
    assert set(results["generate"]) == set(names)
    for by_window in results["ppl"].values():  # the bootstrap's blocks; two short documents: too few for an interval
        for record in by_window.values():
            assert sum(record["blocks"]["tokens"]) == record["tokens"] and record["ci95"] is None
    markdown = (out / "results.md").read_text()
    assert "| model | 16 | 32 | 64 |" in markdown and "| base-read-with-pi4 |" in markdown
    assert "How much the perplexities owe to the passages read: 95% intervals" in markdown and "| base | - | - | - |" in markdown
    assert "| max \\|h_j\\| |" in markdown  # pipes inside cells are escaped
    for figure in results["figures"]:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"ppl.png", "passkey.png", "attention.png"} <= set(results["figures"])


def test_a_model_that_broke_down_still_gets_its_numbers_written(project, tmp_path):
    """Every perplexity inf or NaN (a diverged fine-tune): no log-scale plot can be drawn, the results are still
    written. A NaN loss (a numeric failure) stays NaN, in the tables and read back: only an overflowing one is
    an infinite perplexity, which the reproduction's claims read as "exploded"."""
    from evaluation.report import read_results

    nan_model, huge = tiny_model({"kind": "rope"}, vocab_size=VOCAB), tiny_model({"kind": "rope"}, vocab_size=VOCAB)
    with torch.no_grad():
        nan_model.norm.weight.fill_(float("nan"))
        huge.output.weight.mul_(1e6)  # finite losses of thousands of nats: exp overflows
    ckpts = [save_checkpoint(tmp_path / "nan.ckpt", nan_model, {"kind": "rope"}, project["tokenizer"]),
             save_checkpoint(tmp_path / "huge.ckpt", huge, {"kind": "rope"}, project["tokenizer"])]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt=[{ckpts[0]},{ckpts[1]}]", "task=ppl", "ppl.windows=[16,32]",
                                             f"out_dir={tmp_path / 'out'}", *_data_overrides(project)])
    results = evaluate(cfg)
    assert all(math.isnan(v) for v in results["ppl_table"]["nan"].values())
    assert all(v == math.inf for v in results["ppl_table"]["huge"].values())
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["ppl_table"]["nan"] == {"16": None, "32": None} and "ppl.png" not in written["figures"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| nan | nan | nan |" in markdown and "| huge | inf | inf |" in markdown
    assert "| nan | - | - |" in markdown and "| huge | - | - |" in markdown  # no interval (too few blocks here anyway)
    assert not (tmp_path / "out" / "ppl.png").exists()
    read = read_results(tmp_path / "out" / "results.json")
    assert all(math.isnan(v) for v in read["ppl_table"]["nan"].values()) and math.isnan(read["ppl"]["nan"][16]["ppl"])
    assert read["ppl_table"]["huge"] == {16: math.inf, 32: math.inf} and read["ppl"]["huge"][32]["ppl"] == math.inf


def test_each_perplexity_gets_an_interval_over_the_passages_read(project, tmp_path, monkeypatch):
    """With enough blocks (made small here), results.json holds each perplexity's 95% interval around it, and
    results.md a table of them."""
    from evaluation import perplexity, uncertainty

    monkeypatch.setattr(perplexity, "BLOCK_TOKENS", 16)
    monkeypatch.setattr(uncertainty, "MIN_BLOCKS", 5)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", tiny_model({"kind": "rope"}, vocab_size=VOCAB), {"kind": "rope"}, project["tokenizer"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt={ckpt}", "task=ppl", "ppl.windows=[16,32]", "ppl.max_documents=2",
                                             f"out_dir={tmp_path / 'out'}", *_data_overrides(project)])
    results = evaluate(cfg)
    for record in results["ppl"]["m"].values():
        assert len(record["blocks"]["tokens"]) >= 5 and sum(record["blocks"]["tokens"]) == record["tokens"]
        low, high = record["ci95"]
        assert low < record["ppl"] < high
    low, high = results["ppl"]["m"][32]["ci95"]
    assert f"| m | {results['ppl']['m'][16]['ci95'][0]:.2f} to " in (tmp_path / "out" / "results.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["ppl"]["m"]["32"]["ci95"] == [low, high]


def test_checkpoints_are_not_all_held_in_memory_while_the_others_are_evaluated(project, tmp_path, monkeypatch):
    """Three 7B checkpoints would need three times 13 GB of host memory: each is read for the checks, then again
    in its turn (the first is kept from the checks) and dropped when the next row reads another."""
    import gc
    import weakref

    import evaluation.run as run

    alive: list[weakref.ref] = []
    held_at_build: list[int] = []
    load, build = run.load_pretrained, run._build

    def counting_load(*args, **kwargs):
        pretrained = load(*args, **kwargs)
        alive.append(weakref.ref(pretrained))
        return pretrained

    def counting_build(pretrained, *args):
        gc.collect()
        held_at_build.append(sum(ref() is not None for ref in alive))
        return build(pretrained, *args)

    monkeypatch.setattr(run, "load_pretrained", counting_load)
    monkeypatch.setattr(run, "_build", counting_build)
    variants = f"variants=[{{name: base-pi, ckpt: '{project['base']}', position: {{kind: pi, scale: 4}}}}]"
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt=[{project['base']},{project['pi']},{project['absolute']}]", variants,
                                             "task=ppl", "ppl.windows=[16]", "ppl.max_documents=1", f"out_dir={tmp_path}",
                                             *_data_overrides(project)])
    results = evaluate(cfg)
    assert [m["name"] for m in results["models"]] == ["base", "pi4", "abs", "base-pi"]
    assert held_at_build == [1, 1, 1, 1], held_at_build  # one checkpoint in memory whenever a model is built
    assert len(alive) == 6  # three for the checks, then pi4, abs and base again for its last row


def test_an_empty_split_is_named_as_such(project):
    from evaluation.run import _ppl

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["task=ppl"])
    with pytest.raises(EvaluationError, match="the test split has no documents; evaluate on a corpus that has some"):
        _ppl(cfg, None, None, [], torch.device("cpu"), None)
    with pytest.raises(EvaluationError, match="no test document has ppl.min_tokens_per_document=5000 tokens; lower it"):
        _ppl(OmegaConf.merge(cfg, {"ppl": {"min_tokens_per_document": 5000}}), None, None, [np.arange(10)], torch.device("cpu"), None)


def test_a_data_tokenizer_other_than_the_checkpoints_own_is_refused_even_with_the_same_vocabulary(project, tmp_path):
    """Same size, other pieces: every id would mean another word, and the perplexity would look merely bad."""
    lines = [" ".join(random.Random(i).choice(["zebra", "quartz", "vortex", "plinth", "mauve"]) for _ in range(12))
             for i in range(400)]
    other = train_tokenizer(["\n".join(lines)], tmp_path / "other.model", VOCAB).path
    assert tokenizer_info(other).vocab_size == VOCAB and other.read_bytes() != project["tokenizer"].read_bytes()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        refused = compose("evaluate", overrides=[f"ckpt={project['base']}", f"data.tokenizer={other}", "task=ppl",
                                                 f"out_dir={tmp_path / 'a'}", *_data_overrides(project)])
        # A re-serialised copy: other bytes (a protobuf field sentencepiece does not know, number 100), same vocabulary.
        copy = tmp_path / "copy.model"
        copy.write_bytes(project["tokenizer"].read_bytes() + bytes([0xA0, 0x06, 0x01]))
        same = compose("evaluate", overrides=[f"ckpt={project['base']}", f"data.tokenizer={copy}", "task=ppl",
                                              "ppl.windows=[32]", f"out_dir={tmp_path / 'b'}", *_data_overrides(project)])
    with pytest.raises(EvaluationError, match=r"tokenizer .*other.model is not the one these weights come with"):
        evaluate(refused)
    assert not (tmp_path / "a").exists()
    assert "ppl_table" in evaluate(same)  # the same vocabulary in another file is the same tokenizer


def test_the_default_passkey_window_is_the_window_the_checkpoint_was_trained_at(project, tmp_path):
    """A PI x8 fine-tune of a 32-token base trained at seq_len=192, not 8 x 32: its own reading tests 192 tokens;
    read at another scale, or stored without its training window (older checkpoints), it is the base window x scale."""
    model = tiny_model({"kind": "pi", "scale": 8.0}, vocab_size=VOCAB)
    position = {"kind": "pi", "scale": 8.0}
    trained = save_checkpoint(tmp_path / "pi8-192.ckpt", model, position, project["tokenizer"], 10, train_seq_len=192)
    older = save_checkpoint(tmp_path / "pi8.ckpt", model, position, project["tokenizer"], 10)
    variants = (f"variants=[{{name: own, ckpt: '{trained}'}}, {{name: x6, ckpt: '{trained}', position: {{kind: pi, scale: 6}}}},"
                f" {{name: older, ckpt: '{older}'}}]")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[variants, "task=passkey", "passkey.num_positions=2", "passkey.trials=1",
                                             f"out_dir={tmp_path / 'out'}", *_data_overrides(project)])
    passkey = evaluate(cfg)["passkey"]
    assert {name: row["window"] for name, row in passkey.items()} == {"own": 192, "x6": 6 * 32, "older": 256}


def math_ok(value) -> bool:
    return isinstance(value, float) and 1 < value < 10 * VOCAB


def test_position_override_from_the_config_group_reads_a_base_model_with_pi(project, tmp_path):
    overrides = [f"ckpt={project['base']}", "position=pi", "scale=8", "task=ppl", "ppl.windows=[64]", "ppl.stride=16",
                 "ppl.max_documents=1", f"out_dir={tmp_path / 'out'}", *_data_overrides(project), *_position_searchpath(tmp_path)]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        evaluate(compose("evaluate", overrides=overrides))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["models"][0]["position"]["kind"] == "pi" and results["models"][0]["position"]["scale"] == 8
    assert results["models"][0]["name"] == "base [pi x8]"


def test_a_scale_alone_rescales_each_checkpoints_own_encoding_and_the_row_says_so(project, tmp_path, caplog):
    overrides = [f"ckpt=[{project['base']},{project['pi']}]", "scale=2", "task=ppl", "ppl.windows=[64]", "ppl.stride=16",
                 "ppl.max_documents=1", f"out_dir={tmp_path / 'out'}", *_data_overrides(project)]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"), caplog.at_level("WARNING"):
        evaluate(compose("evaluate", overrides=overrides))
    models = json.loads((tmp_path / "out" / "results.json").read_text())["models"]
    assert [(m["name"], m["position"]["kind"], m["position"]["scale"]) for m in models] == [
        ("base [x2]", "rope", 2), ("pi4 [x2]", "pi", 2)]  # PI x4 read at x2: the scale is replaced, not multiplied
    assert "scale=2 on a RoPE checkpoint only lengthens the window" in caplog.text  # the RoPE row: extrapolation


def test_user_errors_are_one_sentence_and_a_non_zero_exit(project, tmp_path):
    result = _run(["ckpt=/nonexistent/model.ckpt", f"out_dir={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: checkpoint path /nonexistent/model.ckpt does not exist")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ckpt={base}", "task=perplexity"], "unknown task 'perplexity'; choose one or more of ppl, passkey, attention, generate"),
        (["ckpt={absolute}", "task=passkey", "passkey.window=256"], "passkey window 256 is longer than the 32 positions"),
        (["ckpt={absolute}", "task=[ppl]", "ppl.windows=[16,48]", "ppl.stride=16"], "ppl window 48 is longer than the 32 positions of its learned absolute table"),
        (["ckpt={base}", "ppl.windows=[64]", "ppl.max_stride_fraction=null"], "ppl.stride=256 is longer than the window 64"),
        (["ckpt={base}", "ppl.max_stride_fraction=2"], r"ppl.max_stride_fraction=2 must be in \(0, 1\]"),
        (["ckpt={base}", "ppl.stride=0"], "ppl.stride=0 must be a positive integer"),
        (["ckpt={base}", "ppl.batch_size=0"], r"ppl.batch_size=0 must be a positive integer \(windows per forward\)"),
        (["ckpt={base}", "task=attention", "attention.pairs=0"], "attention.pairs=0 must be a positive integer"),
        (["task=ppl"], "needs a model: pass ckpt=PATH"),
        (["ckpt={base}", "variants=[{base}]"], "is not a mapping; write one as"),
        (["ckpt={base}", "variants=[{{name: x, position: pi}}]"], "has position='pi'; give a mapping"),
        (["ckpt={base}", "scale=abc"], "scale='abc' must be a number >= 1"),
        (["ckpt={base}", "task=passkey", "passkey.num_positions=0"], "passkey.num_positions=0 must be a positive integer"),
        (["ckpt={base}", "task=passkey", "passkey.window=40"],
         r"base: a 40-token passkey window cannot hold the paper's prompt and answer, which need at least \d+ tokens; "
         r"pass passkey.window=\d+ or more"),
        (["ckpt={base}", "variants=[{{nme: x}}]"], r"unknown key\(s\) \['nme'\]"),
        (["ckpt=[{base},{absolute}]", "variants=[{{name: x, position: {{kind: pi}}}}]"], "needs a ckpt"),
        (["ckpt=[{base},{base}]"], "two table rows are both named"),
        # Weights without their tokenizer are not read with one trained on the corpus, nor with another vocabulary.
        (["ckpt={untokenized}"], "untokenized.ckpt comes without its tokenizer.model; pass data.tokenizer="),
        (["ckpt={wider}", "data.tokenizer={tokenizer}", "task=ppl", "ppl.windows=[32]", "ppl.stride=16"],
         "so the two were made for different vocabularies"),
    ],
)
def test_bad_settings_are_refused_before_any_work(project, tmp_path, overrides, message):
    overrides = [o.format(**{k: v for k, v in project.items() if k != "docs"}) for o in overrides]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[*overrides, f"out_dir={tmp_path}", *_data_overrides(project)])
    with pytest.raises(EvaluationError, match=message):
        evaluate(cfg)
    assert not (tmp_path / "results.json").exists()


def test_unknown_keys_are_refused_by_struct_mode():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate")
        assert OmegaConf.is_struct(cfg)
        with pytest.raises(Exception, match="ppl.windowz"):
            compose("evaluate", overrides=["ppl.windowz=[1]"])


def test_evaluate_in_process_on_the_paper_attention_fit_only(tmp_path):
    """task=attention needs no checkpoint: the paper's d=128, L=2048 fit alone."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["task=attention", f"out_dir={tmp_path}"])
    results = evaluate(cfg)
    fit = results["attention"]["paper_fit"]
    assert fit["head_dim"] == 128 and fit["window"] == 2048
    assert fit["extrapolation_max"] > 100 * fit["inside_max"]
    assert (tmp_path / "attention.png").exists() and (tmp_path / "results.md").exists()


# ----------------------------------------------------------------------------- callback


class _Module(L.LightningModule):
    """The shape of the lead's LightningModule as far as the callback cares: `.model` is a Llama."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        logits = self.model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class _Data(L.LightningDataModule):
    """documents(split) and tokenizer, as data.datamodule.TextDataModule provides them."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        rng = np.random.default_rng(0)
        self._docs = [np.concatenate([[1], rng.integers(3, VOCAB, 300), [2]]) for _ in range(3)]

    def documents(self, split):
        return self._docs

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randint(3, VOCAB, (8, 33)), batch_size=2)


def test_callback_logs_and_writes_rows_every_n_steps(tmp_path, tokenizer):  # noqa: F811
    model = tiny_model({"kind": "pi", "scale": 8.0}, vocab_size=VOCAB)  # window 32 x 8 = 256
    callback = ExtensionEvalCallback(every_n_steps=2, windows=[32, 64], max_documents=2, max_tokens_per_document=128,
                                     passkey_positions=2, passkey_trials=1, out_path=tmp_path / "eval_by_step.json")
    trainer = L.Trainer(max_steps=4, callbacks=[callback], logger=L.pytorch.loggers.CSVLogger(tmp_path / "logs"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(_Module(model.train()), datamodule=_Data(tokenizer))
    assert [row["step"] for row in callback.rows] == [0, 2, 4]
    assert all(row["passkey_window"] == 256 and "ppl_64" in row for row in callback.rows)
    assert callback.rows[0]["ppl_32"] != callback.rows[-1]["ppl_32"]  # it saw the weights change
    assert [row["step"] for row in json.loads((tmp_path / "eval_by_step.json").read_text())] == [0, 2, 4]
    assert (tmp_path / "eval_by_step.csv").read_text().startswith("step,ppl_32,ppl_64,passkey_window,passkey_k_max,passkey_success")
    assert "| step | ppl_32 | ppl_64 |" in (tmp_path / "eval_by_step.md").read_text()
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "longctx/ppl_64" in logged and "longctx/passkey_k_max" in logged
    assert model.training  # handed back in training mode


def test_a_run_resumed_between_two_evaluations_keeps_the_rows_on_their_grid(tmp_path, tokenizer):  # noqa: F811
    """A run cut after a periodic checkpoint (step 3) and resumed from it: rows at 0, 2, 4, none at 3."""
    def fit(max_steps: int, ckpt_path: str | None = None) -> ExtensionEvalCallback:
        model = tiny_model({"kind": "pi", "scale": 8.0}, vocab_size=VOCAB)
        callback = ExtensionEvalCallback(every_n_steps=2, windows=[32], max_documents=1, max_tokens_per_document=64,
                                         passkey_trials=0, out_path=tmp_path / "eval_by_step.json")
        every_3 = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="step{step}", every_n_train_steps=3,
                                                      save_top_k=-1, auto_insert_metric_name=False)
        trainer = L.Trainer(max_steps=max_steps, callbacks=[callback, every_3], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
        trainer.fit(_Module(model.train()), datamodule=_Data(tokenizer), ckpt_path=ckpt_path)
        return callback

    assert [row["step"] for row in fit(3).rows] == [0, 2, 3]  # the cut run's last row comes after its checkpoint
    assert [row["step"] for row in fit(4, str(tmp_path / "step3.ckpt")).rows] == [0, 2, 4]


def test_callback_skips_a_passkey_that_does_not_fit_and_clamps_the_stride(tokenizer):  # noqa: F811
    model = tiny_model(vocab_size=VOCAB)  # window 32: too short for the passkey prompt
    callback = ExtensionEvalCallback(windows=[16, 32], max_documents=1, passkey_trials=1)
    row = callback.evaluate_model(model, _Data(tokenizer), step=0)
    assert set(row) == {"step", "ppl_16", "ppl_32"}  # stride 256 > window: read with stride window/8
    assert callback._passkey_skipped


class _PositionScorer(torch.nn.Module):
    """A stand-in model whose next-token distribution depends on the position only (log(1 + p) and a constant
    through a random head): its perplexity at a window depends on which positions the protocol reads, and a
    forward over 8192 tokens costs next to nothing."""

    position = None  # any length can be read

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.output = torch.nn.Linear(2, vocab, bias=False)
        torch.nn.init.normal_(self.output.weight, std=0.5, generator=torch.Generator().manual_seed(0))

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        p = torch.arange(tokens.shape[1], dtype=torch.float32)
        return torch.stack([torch.log1p(p), torch.ones_like(p)], -1).expand(tokens.shape[0], -1, -1)


class _LongDocuments:
    def __init__(self, length: int) -> None:
        rng = np.random.default_rng(1)
        self._docs = [rng.integers(3, VOCAB, length) for _ in range(2)]

    def documents(self, split):
        return self._docs


def test_by_step_perplexity_is_divided_over_ddp_ranks_only():
    """DDP's ranks hold the whole model: each reads a share of the windows. Under FSDP (ModelParallelStrategy) or
    DeepSpeed every forward gathers weights from every rank, so dividing the windows would hang the ranks."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, SingleDeviceStrategy

    from evaluation.callback import _shard

    def trainer(strategy, world_size=4, rank=2):
        return SimpleNamespace(strategy=strategy, world_size=world_size, global_rank=rank)

    assert _shard(trainer(DDPStrategy())) == (2, 4)
    assert _shard(trainer(DDPStrategy(), world_size=1, rank=0)) == (0, 1)
    assert _shard(trainer(ModelParallelStrategy())) == (0, 1)
    assert _shard(trainer(DeepSpeedStrategy.__new__(DeepSpeedStrategy))) == (0, 1)  # no deepspeed needed
    assert _shard(trainer(SingleDeviceStrategy("cpu"), world_size=1, rank=0)) == (0, 1)


def test_the_ranks_passkey_rows_make_the_whole_grid(tokenizer):  # noqa: F811
    """Rank r of 2 decoded distances r, r + 2, ...: each places its rows, the all-reduce adds the grids up, and
    every rank ends with the one-process grid and k_max."""
    from evaluation.callback import _whole_passkey_grid
    from evaluation.passkey import PasskeyResult, plan_passkey

    plan = plan_passkey(tokenizer, 256, 5, 2, seed=0)
    truth = [[True, False], [True, True], [False, True], [True, True], [False, False]][: len(plan.distances)]
    parts = [PasskeyResult(256, plan.length, plan.distances[r::2], truth[r::2]) for r in range(2)]
    local: list[list[float]] = []
    for rank in range(2):  # what each rank hands the all-reduce
        _whole_passkey_grid(parts[rank], tokenizer, 5, 2, 0, (rank, 2), lambda values: local.append(values) or values)
    total = [a + b for a, b in zip(*local)]
    for rank in range(2):
        whole = _whole_passkey_grid(parts[rank], tokenizer, 5, 2, 0, (rank, 2), lambda values: total)
        assert whole.distances == plan.distances and whole.successes == truth and whole.keys == plan.keys[: len(truth)]
        assert whole.k_max == PasskeyResult(256, plan.length, plan.distances, truth).k_max > 0


def test_by_step_columns_past_4096_tokens_read_documents_longer_than_their_window(caplog):
    """The by-step table at L' = 8192 (the paper's PG-19 fine-tunes): each column reads every document sliding at
    its own window. Cut at 4096 tokens (the old fixed default), 8192 read each document as one window, as 4096 did."""
    scorer, data = _PositionScorer(VOCAB), _LongDocuments(20_000)
    callback = ExtensionEvalCallback(windows=[4096, 8192], max_documents=2, passkey_trials=0, batch_size=16)
    row = callback.evaluate_model(scorer, data, step=0)
    kept = [doc[:16_384] for doc in data.documents("validation")]  # twice the longest window
    for window in (4096, 8192):
        assert row[f"ppl_{window}"] == sliding_window_perplexity(scorer, kept, window, 256, 16).ppl
    assert abs(row["ppl_8192"] - row["ppl_4096"]) > 1e-3 * row["ppl_4096"]

    cut = ExtensionEvalCallback(windows=[4096, 8192], max_documents=2, max_tokens_per_document=4096, passkey_trials=0)
    with caplog.at_level("WARNING", logger="evaluation.callback"):
        short = cut.evaluate_model(scorer, data, step=0)
    assert short["ppl_8192"] == short["ppl_4096"]  # one window per document in both columns: nothing measured
    assert "2 of 2 validation documents are shorter than the window 8192" in caplog.text
    # Short windows (every shipped budget's: L' <= 2048) read 4096 tokens per document, as before the default grew.
    assert default_document_cut([128, 256, 512, 1024]) == default_document_cut([256, 2048]) == 4096
