"""train(cfg) on the real composed config: one fast step per position type, resume, bad overrides."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from model import KINDS, ModelArgs
from model.checkpoints import load_pretrained
from training.config import ConfigError, validate
from training.run import base_path, train
from training.schedule import warmup_then

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def smoke(cache_dir, tmp_path, *overrides):
    return compose_config("experiment=smoke", f"data.cache_dir={cache_dir}", f"run_dir={tmp_path}", *overrides)


@pytest.mark.parametrize("kind", KINDS)
def test_one_fast_step_for_every_position_type(cache_dir, tmp_path, kind):
    cfg = smoke(cache_dir, tmp_path, "stage=pretrain", f"position={kind}", "scale=2", "optim.pretrain.max_steps=1")
    result = train(cfg)
    assert result.last_checkpoint.exists()
    loaded = load_pretrained(result.last_checkpoint)
    assert loaded.position["kind"] == kind and loaded.position["scale"] == 2
    assert torch.isfinite(torch.tensor(result.metrics["train/loss"]))


def test_the_summary_names_checkpoints_as_the_run_dir_is_named(cache_dir, tmp_path, monkeypatch):
    """A relative run_dir gives relative checkpoint paths in summary.json, `best` as well as `last`
    (Lightning makes the best path absolute): a summary copied off a machine names none of its folders."""
    monkeypatch.chdir(tmp_path)
    train(smoke(cache_dir, "run", "stage=pretrain", "optim.pretrain.max_steps=2", "register_base=false"))
    summary = OmegaConf.load(tmp_path / "run" / "summary.json")
    assert summary.last == str(Path("run") / "checkpoints" / "last.ckpt")
    assert summary.best == str(Path("run") / "checkpoints" / "best.ckpt") and Path(summary.best).is_file()


def test_finetune_without_init_pretrains_and_caches_the_bundled_base_then_extends_it(cache_dir, tmp_path):
    cfg = smoke(cache_dir, tmp_path / "ft", "position=pi", "scale=4")
    assert not base_path(cfg).exists()
    result = train(cfg)
    assert base_path(cfg).exists() and result.stage == "finetune"
    assert (tmp_path / "ft" / "base_pretrain" / "checkpoints" / "last.ckpt").exists()
    extended = load_pretrained(result.last_checkpoint)
    assert extended.position == {"kind": "pi", "scale": 4, "theta": None}
    assert extended.args.max_seq_len == 64  # the base window L; the model reads L * scale
    # The fine-tune trained on windows of L * scale tokens.
    summary = OmegaConf.load(tmp_path / "ft" / "summary.json")
    assert summary.seq_len == 256
    # Each checkpoint records the window it was trained at (evaluation's default passkey window).
    assert extended.extra["train_seq_len"] == 256 and load_pretrained(base_path(cfg)).extra["train_seq_len"] == 64
    # A later fine-tune finds the cached base instead of pretraining again; seq_len= is what it records.
    again = train(smoke(cache_dir, tmp_path / "ft2", "position=pi", "scale=2", "seq_len=96"))
    assert not (tmp_path / "ft2" / "base_pretrain").exists() and again.stage == "finetune"
    assert load_pretrained(again.last_checkpoint).extra["train_seq_len"] == 96


def test_init_from_a_checkpoint_starts_from_its_weights_and_extends_an_absolute_table(cache_dir, tmp_path):
    base = train(smoke(cache_dir, tmp_path / "base", "stage=pretrain", "position=absolute", "optim.pretrain.max_steps=2"))
    table = load_pretrained(base.last_checkpoint).state_dict["position.table"]
    n = table.shape[0]
    tables = {}
    for extend in ("interpolate", "append"):
        cfg = smoke(cache_dir, tmp_path / extend, f"init={base.last_checkpoint}", "position=absolute", "scale=2",
                    f"position.extend={extend}", "optim.finetune.lr=1e-12", "optim.finetune.max_steps=1")
        extended = load_pretrained(train(cfg).last_checkpoint)
        assert extended.position["extend"] == extend
        tables[extend] = extended.state_dict["position.table"]
        assert tables[extend].shape[0] == 2 * n
    # Interpolation keeps the end points and spreads the trained rows over the longer window;
    # append keeps the trained window as it was and adds rows it never trained.
    torch.testing.assert_close(tables["interpolate"][0], table[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(tables["interpolate"][-1], table[-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(tables["append"][:n], table, atol=1e-6, rtol=0)
    assert not torch.allclose(tables["append"][n:], tables["interpolate"][n:], atol=1e-3)


def test_init_from_an_hf_folder_fine_tunes_its_weights(cache_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from model.hf import to_hf_config

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=64)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(args, {"kind": "rope"})))
    hf.save_pretrained(tmp_path / "hf")
    cfg = smoke(cache_dir, tmp_path / "ft", f"init={tmp_path / 'hf'}", "position=pi", "scale=2",
                "optim.finetune.lr=1e-12", "optim.finetune.max_steps=1")
    # Without its tokenizer.model the weights' ids are unknown: refused, not read with a tokenizer trained here.
    with pytest.raises(ConfigError, match="comes without its tokenizer.model; pass data.tokenizer="):
        train(cfg)
    from data import TextDataModule

    tokenizer = TextDataModule(**OmegaConf.to_container(cfg.data, resolve=True), seq_len=64, seed=0).tokenizer.path
    (tmp_path / "hf" / "original").mkdir()
    shutil.copyfile(tokenizer, tmp_path / "hf" / "original" / "tokenizer.model")  # where HF's LLaMA 3 repos keep it
    tuned = load_pretrained(train(cfg).last_checkpoint)
    assert tuned.tokenizer_path is not None and tuned.tokenizer_path.read_bytes() == tokenizer.read_bytes()
    assert tuned.args.hidden_dim == args.hidden_dim and tuned.args.n_kv_heads == 2 and tuned.position["kind"] == "pi"
    expected = hf.state_dict()["model.layers.1.mlp.down_proj.weight"]
    torch.testing.assert_close(tuned.state_dict["layers.1.feed_forward.w2.weight"], expected, atol=1e-6, rtol=0)


class _RecordStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.optimizer_state = {k: v["exp_avg"].clone() for k, v in trainer.optimizers[0].state_dict()["state"].items()}


def test_resume_continues_at_the_same_step_with_the_same_optimizer_state(cache_dir, tmp_path, monkeypatch):
    first = train(smoke(cache_dir, tmp_path / "a", "stage=pretrain", "optim.pretrain.max_steps=3"))
    saved = torch.load(first.last_checkpoint, weights_only=True)
    recorder = _RecordStart()
    original_init = L.Trainer.__init__

    def with_recorder(self, *args, callbacks=None, **kwargs):
        original_init(self, *args, callbacks=[*(callbacks or []), recorder], **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", with_recorder)
    resumed = train(smoke(cache_dir, tmp_path / "b", "stage=pretrain", "optim.pretrain.max_steps=5",
                          f"resume={first.last_checkpoint}"))
    assert recorder.step == saved["global_step"] == 3
    for key, exp_avg in saved["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(recorder.optimizer_state[key], exp_avg["exp_avg"])
    assert torch.load(resumed.last_checkpoint, weights_only=True)["global_step"] == 5


def test_a_run_is_resumed_only_with_the_position_it_was_trained_with(cache_dir, tmp_path):
    """Lightning restores weights and optimizer into whatever run the config builds: without the interrupted
    run's overrides a PI run would go on as RoPE at the base window. Refused, naming the overrides."""
    pi = ("stage=pretrain", "position=pi", "scale=2", "optim.pretrain.max_steps=2", "register_base=false")
    first = train(smoke(cache_dir, tmp_path / "a", *pi))
    with pytest.raises(ConfigError, match=r"trained with position=pi, scale=2 but this run composes position=rope, "
                                          r"scale=1; resume with the interrupted run's overrides \(position=pi scale=2\)"):
        validate(smoke(cache_dir, tmp_path / "b", "stage=pretrain", "optim.pretrain.max_steps=3", f"resume={first.last_checkpoint}"))
    with pytest.raises(ConfigError, match="position=pi, scale=4"):
        validate(smoke(cache_dir, tmp_path / "b", *pi[:2], "scale=4", f"resume={first.last_checkpoint}"))
    validate(smoke(cache_dir, tmp_path / "b", *pi, f"resume={first.last_checkpoint}"))  # the same overrides: resumable


def test_a_run_is_resumed_only_on_the_tokenizer_it_was_trained_with(cache_dir, tmp_path, monkeypatch):
    """Other data settings (or a token cache rebuilt under another rule) give another tokenizer: the weights
    would go on training on ids that mean other pieces. Refused before any weights are loaded."""
    first = train(smoke(cache_dir, tmp_path / "a", "stage=pretrain", "optim.pretrain.max_steps=2", "register_base=false"))
    resume = [f"resume={first.last_checkpoint}", "stage=pretrain", "optim.pretrain.max_steps=3", "register_base=false"]
    with pytest.raises(ConfigError, match=rf"resume={first.last_checkpoint} was trained with another tokenizer than this "
                                          r"run's .*; resume with the interrupted run's init= and data settings"):
        train(smoke(cache_dir, tmp_path / "b", *resume, "data.vocab_size=400"))
    assert not (tmp_path / "b" / "checkpoints").exists()
    monkeypatch.setenv("HOME", str(tmp_path))  # and a path under ~ is read as the shell would read it
    home = ["resume='~/a/checkpoints/last.ckpt'", *resume[1:]]
    assert train(smoke(cache_dir, tmp_path / "a", *home)).metrics  # the same data settings: resumed


def test_a_resume_keeps_the_first_runs_hydra_record_and_hydra_writes_into_run_dir(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        first = compose("config", overrides=[f"run_dir={tmp_path / 'run'}"], return_hydra_config=True)
        resumed = compose("config", overrides=[f"run_dir={tmp_path / 'run'}", "resume=last.ckpt"], return_hydra_config=True)
        default = compose("config", return_hydra_config=True)
    assert first.hydra.run.dir == str(tmp_path / "run") and first.hydra.output_subdir == ".hydra"
    assert resumed.hydra.output_subdir.startswith(".hydra/resumed-")  # beside the first run's, not over it
    assert default.hydra.run.dir.startswith("outputs/")


def test_a_job_slurm_requeued_keeps_the_first_runs_hydra_record(tmp_path, monkeypatch):
    """The requeued job runs the same command line (no resume=) into the same run_dir: it resumes from Lightning's
    hpc checkpoint there, so its Hydra record goes beside the first run's as a resume's does."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "hpc_ckpt_1.ckpt").touch()

    def record() -> str:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[f"run_dir={run}"], return_hydra_config=True).hydra.output_subdir

    assert record() == ".hydra"  # not under SLURM: a new run into the folder
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "pi")
    assert record().startswith(".hydra/resumed-")
    (run / "hpc_ckpt_1.ckpt").unlink()
    assert record() == ".hydra"  # under SLURM, first start
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert record().startswith(".hydra/resumed-")


def test_the_bundled_base_of_a_passkey_mix_is_keyed_by_the_prompt_recipe(monkeypatch):
    """A new passkey recipe is new training data: a cached base trained on the old prompts is not reused."""
    import training.run as run

    plain, mixed = compose_config(), compose_config("data.passkey_share=0.2")
    before = (run._base_key(plain), run._base_key(mixed))
    monkeypatch.setattr(run, "PASSKEY_RECIPE", run.PASSKEY_RECIPE + 1)
    assert run._base_key(plain) == before[0] and run._base_key(mixed) != before[1]


def test_a_resumed_run_keeps_the_by_step_rows_of_the_steps_before_it(cache_dir, tmp_path):
    """The callback's rows travel in the checkpoint: step 0 (the paper's "no fine-tuning" row) survives a resume."""
    common = ("stage=pretrain", "position=pi", "scale=2", "register_base=false", "eval.every_n_steps=1",
              "eval.passkey_trials=0", "trainer.val_check_interval=1")
    first = train(smoke(cache_dir, tmp_path, *common, "optim.pretrain.max_steps=2"))
    train(smoke(cache_dir, tmp_path, *common, "optim.pretrain.max_steps=4", f"resume={first.last_checkpoint}"))
    rows = json.loads((tmp_path / "eval_by_step.json").read_text())
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]


def test_a_sharded_run_is_resumed_only_with_the_position_it_was_trained_with(cache_dir, tmp_path):
    """An FSDP run's last.ckpt folder: its meta.pt (the step and hyper-parameters beside the shards) is checked."""
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"global_step": 4, "hyper_parameters": {"position": {"kind": "pi", "scale": 8.0, "theta": None}}},
               folder / "meta.pt")
    fsdp = ("stage=pretrain", "trainer.strategy=fsdp", f"resume={folder}")
    with pytest.raises(ConfigError, match=r"trained with position=pi, scale=8 but this run composes position=rope, scale=1"):
        validate(smoke(cache_dir, tmp_path / "a", *fsdp))
    validate(smoke(cache_dir, tmp_path / "a", *fsdp, "position=pi", "scale=8"))
    (folder / "meta.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot be read as a checkpoint"):
        validate(smoke(cache_dir, tmp_path / "a", *fsdp))


def test_starting_from_an_extended_checkpoint_with_another_encoding_is_said(cache_dir, tmp_path, caplog):
    pi = train(smoke(cache_dir, tmp_path / "pi", "stage=pretrain", "position=pi", "scale=2", "optim.pretrain.max_steps=1",
                     "register_base=false"))
    one_step = ("optim.finetune.max_steps=1", "register_base=false")
    with caplog.at_level("WARNING", logger="train"):
        train(smoke(cache_dir, tmp_path / "a", f"init={pi.last_checkpoint}", *one_step))  # read as RoPE x1
    assert "was trained with position=pi scale=2; this run uses position=rope scale=1" in caplog.text
    assert "pass position=pi scale=2 to keep its encoding" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="train"):
        train(smoke(cache_dir, tmp_path / "b", f"init={pi.last_checkpoint}", "position=pi", "scale=2", *one_step))
    assert "was trained with" not in caplog.text


def test_init_keeps_its_own_tokenizer_and_refuses_a_data_tokenizer_of_another_vocabulary(cache_dir, tmp_path):
    """A model with a wider table than its tokenizer (model.vocab_size=1024 over the 512-piece one) trains on from
    its own embedded tokenizer; data.tokenizer= of another vocabulary than the table's is refused."""
    wide = train(smoke(cache_dir, tmp_path / "wide", "stage=pretrain", "model.vocab_size=1024", "optim.pretrain.max_steps=1",
                       "register_base=false"))
    one_step = ("optim.finetune.max_steps=1", "register_base=false")
    train(smoke(cache_dir, tmp_path / "own", f"init={wide.last_checkpoint}", *one_step))  # its own tokenizer: fine
    tokenizer = load_pretrained(wide.last_checkpoint).tokenizer_path
    with pytest.raises(ConfigError, match=r"has 512 tokens but .* has 1024 rows, so the two were made for different vocabularies"):
        train(smoke(cache_dir, tmp_path / "other", f"init={wide.last_checkpoint}", f"data.tokenizer={tokenizer}", *one_step))


def test_a_corpus_edited_in_place_gets_a_bundled_base_of_its_own(tmp_path):
    """The old base may have trained on documents the edited corpus now holds out (splits follow the documents)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in "abc":
        (corpus / f"{name}.txt").write_text(f"play {name}\n" * 20)
    cfg = compose_config("experiment=smoke", "data=text_dir", f"data.path={corpus}", f"data.cache_dir={tmp_path}")
    before = base_path(cfg)
    assert base_path(cfg) == before  # the same corpus: the same base
    (corpus / "b.txt").write_text("play b, revised\n" * 20)
    assert base_path(cfg) != before


def test_the_bundled_base_is_registered_per_recipe_and_never_by_a_resumed_run(cache_dir, tmp_path):
    def cfg(run: str, *overrides: str):  # seed 11: no other test of this module's cache registers these bases
        return smoke(cache_dir, tmp_path / run, "stage=pretrain", "seed=11", *overrides)

    default, shorter = cfg("a"), cfg("a", "optim.pretrain.max_steps=2")
    assert base_path(shorter) != base_path(default) and base_path(cfg("a", "seed=7")) != base_path(default)
    short = train(shorter)
    assert base_path(shorter).exists() and not base_path(default).exists()  # registered under its own recipe only
    base_path(shorter).unlink()
    # Lengthened on resume: another recipe than the checkpoint's, so not a base of either.
    train(cfg("b", "optim.pretrain.max_steps=3", f"resume={short.last_checkpoint}"))
    assert not base_path(cfg("b", "optim.pretrain.max_steps=3")).exists() and not base_path(shorter).exists()
    # Resumed with the interrupted run's own recipe (after a SIGTERM, say): registered as an uninterrupted run is.
    train(cfg("c", "optim.pretrain.max_steps=2", f"resume={short.last_checkpoint}"))
    assert base_path(shorter).exists()


@pytest.mark.parametrize("fused", [False, True])
def test_gradients_are_clipped_under_bf16_mixed_with_the_fused_adamw_as_on_gpu(cache_dir, tmp_path, monkeypatch, fused):
    """trainer=gpu (bf16-mixed, activation checkpointing, clipping) with the fused AdamW, run on CPU.
    Lightning's mixed-precision plugin refuses to clip for a fused optimizer; the task clips itself
    when no GradScaler is in use."""
    clip = 1e-3  # far below the tiny model's gradient norm, so every step is clipped
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def clip_and_record(params, max_norm, *args, **kwargs):
        params = list(params)
        before = original(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        seen.append((float(before), float(after), len(params)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_record)
    cfg = smoke(cache_dir, tmp_path, "stage=pretrain", "optim.pretrain.max_steps=2", "register_base=false",
                "trainer=gpu", "trainer.accelerator=cpu", f"optim.fused={str(fused).lower()}",
                f"trainer.gradient_clip_val={clip}")
    result = train(cfg)
    assert result.metrics["train/loss"] > 0
    n_params = len(load_pretrained(result.last_checkpoint).state_dict)
    assert len(seen) == 2  # once per optimizer step
    for before, after, count in seen:
        assert count == n_params  # every parameter had a gradient and was clipped
        assert before > 10 * clip and after == pytest.approx(clip, rel=1e-3)


def test_gradients_are_freed_after_each_optimizer_step_and_kept_across_accumulated_micro_batches(
        cache_dir, tmp_path, monkeypatch):
    """Lightning zeroes gradients after the next forward; the task frees them right after the step,
    so they never sit beside a forward's activations (the memory peak) - but not between the
    micro-batches of one accumulated step."""
    from training.module import CausalLMTask

    held = []  # per micro-batch: did any parameter hold a gradient when its forward began?
    original = CausalLMTask.training_step

    def training_step(self, batch, batch_idx):
        held.append(any(p.grad is not None for p in self.parameters()))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(CausalLMTask, "training_step", training_step)
    cfg = smoke(cache_dir, tmp_path, "stage=pretrain", "optim.pretrain.max_steps=3", "register_base=false",
                "trainer.accumulate_grad_batches=2")
    train(cfg)
    assert held == [False, True] * 3


def test_compiled_blocks_train_validate_and_save_the_same_weights_names(cache_dir, tmp_path):
    """trainer.compile=true (torch.compile per block, the GPU speed lever) through train(): the losses
    match the eager run's, and the checkpoint loads strictly into an uncompiled model."""
    common = ("stage=pretrain", "optim.pretrain.max_steps=2", "register_base=false", "trainer.val_check_interval=2",
              "trainer.activation_checkpointing=full")
    from torch._dynamo.utils import counters

    eager = train(smoke(cache_dir, tmp_path / "eager", *common))
    counters.clear()
    compiled = train(smoke(cache_dir, tmp_path / "compiled", *common, "trainer.compile=true"))
    assert counters["stats"]["unique_graphs"] > 0  # the blocks were compiled, not run eagerly
    for key in ("train/loss", "val/loss"):
        assert compiled.metrics[key] == pytest.approx(eager.metrics[key], rel=1e-3), key
    loaded = load_pretrained(compiled.last_checkpoint)
    assert loaded.state_dict.keys() == load_pretrained(eager.last_checkpoint).state_dict.keys()


def test_warmup_follows_the_paper_then_stays_constant():
    lr = warmup_then("constant", warmup_steps=20, warmup_start_ratio=0.1, max_steps=1000)
    assert lr(0) == pytest.approx(0.1) and lr(10) == pytest.approx(0.55) and lr(20) == 1.0 and lr(999) == 1.0
    cosine = warmup_then("cosine", warmup_steps=10, warmup_start_ratio=0.0, max_steps=110, min_lr_ratio=0.1)
    assert cosine(10) == 1.0 and cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("group", ["model", "position", "data", "trainer", "optim", "experiment"])
def test_every_config_option_composes_and_validates(group, tmp_path):
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options
    for option in options:
        overrides = [f"{group}={option}", f"run_dir={tmp_path}"]
        if group == "experiment" and option.startswith("paper"):
            overrides.append(f"init={tmp_path}")  # the paper's runs need real weights
        if group in ("data",) and option in ("text_dir", "jsonl"):
            overrides.append(f"data.path={tmp_path}")
        if group == "position":
            overrides.append("scale=2")  # scalings are refused at scale 1 (plain RoPE)
        cfg = compose_config(*overrides)
        OmegaConf.resolve(cfg)
        validate(cfg)


def test_model_config_files_equal_the_presets_in_code():
    from model.args import PRESETS

    for name, args in PRESETS.items():
        values = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
        assert ModelArgs.from_dict(values) == args


def test_multirun_sweep_composes(tmp_path):
    """`python train.py -m position=rope,pi,ntk scale=4` runs each value through the same train()."""
    for kind in ("rope", "pi", "ntk"):
        validate(compose_config(f"position={kind}", "scale=4", f"run_dir={tmp_path}"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scale=0.5"], "scale=0.5 must be a number >= 1"),
        (["scale=eight"], "scale='eight' must be a number >= 1"),
        (["seq_len=0"], "seq_len=0 must be a positive integer"),
        (["seq_len=-5"], "seq_len=-5 must be a positive integer"),
        (["init=/no/such/checkpoint"], "init=/no/such/checkpoint does not exist"),
        (["resume=/no/such.ckpt"], "resume=/no/such.ckpt does not exist"),
        (["stage=bogus"], "stage='bogus' is not one of"),
        (["optim.pretrain.max_steps=0"], "optim.pretrain.max_steps=0 must be a positive integer"),
        (["optim.pretrain.schedule=linear"], r"optim.pretrain.schedule='linear' is not a schedule; choose one of constant, cosine"),
        (["optim.pretrain.warmup_steps=-3"], r"optim.pretrain.warmup_steps=-3 must be an integer >= 0"),
        (["position=pi", "scale=8", "optim.finetune.warmup_start_ratio=5"],
         r"optim.finetune.warmup_start_ratio=5 must be a fraction of the peak lr in \[0, 1\]"),
        (["optim.pretrain.min_lr_ratio=-0.1"], r"optim.pretrain.min_lr_ratio=-0.1 must be a fraction"),
        (["optim.pretrain.weight_decay=-1"], r"optim.pretrain.weight_decay=-1 must be a finite number >= 0"),
        (["trainer.accumulate_grad_batches=0"], r"trainer.accumulate_grad_batches=0 must be a positive integer"),
        (["trainer.accumulate_grad_batches=2", "trainer.limit_train_batches=3"],
         r"trainer.limit_train_batches=3 is not a multiple of trainer.accumulate_grad_batches=2"),
        (["trainer.accumulate_grad_batches=4", "trainer.limit_train_batches=0.5"],
         r"trainer.limit_train_batches=0.5 \(a fraction\) with trainer.accumulate_grad_batches=4 may cut epochs"),
        (["model.n_heads=3"], "divisible by model.n_heads"),
        (["position=yarn", "position.beta_fast=x"], "position.beta_fast=.x. must be a number"),
        (["position=pi"], r"position=pi at scale 1 reads positions exactly as plain RoPE does; pass scale=S"),
        (["position=yarn", "seq_len=512"], r"position=yarn at scale 1"),
        (["position=pi", "position.scale=8"], r"position.scale=8 differs from scale=1; set the scale once with scale=8"),
        (["position=pi", "scale=4", "position.scale=8"], r"position.scale=8 differs from scale=4"),
        (["run_dir=/dev/null/run"], "cannot be written"),
        (["eval.every_n_steps=-1"], r"eval.every_n_steps=-1 must be an integer >= 0 \(0 turns the evaluation off\)"),
        (["eval.windows=[64,abc]"], r"eval.windows=.* must be null .* or a list of integers >= 2"),
        (["eval.max_documents=0"], "eval.max_documents=0 must be an integer >= 1"),
        (["eval.max_tokens_per_document=1"], r"eval.max_tokens_per_document=1 must be null \(twice the longest window"),
        (["position=absolute", "eval.every_n_steps=1", "eval.windows=[256,512]"],
         r"eval.windows=\[256, 512\] reaches past the 256 positions of the learned absolute table"),
    ],
)
def test_bad_values_fail_before_any_data_work(overrides, message):
    with pytest.raises((ConfigError, TypeError, ValueError), match=message):
        validate(compose_config(*overrides))


@pytest.mark.parametrize("overrides", [["no_such_key=1"], ["position=alibi"], ["model=gpt5"], ["optim.finetune.lr_typo=1"],
                                       ["data.batch_size=64"]])  # the batch size is optim.<stage>.batch_size
def test_unknown_keys_and_options_are_refused_by_hydra(overrides):
    with pytest.raises(HydraException):
        compose_config(*overrides)


def test_a_sweep_runs_on_past_a_refused_job_and_exits_non_zero_listing_it(tmp_path):
    """`-m position=pi,rope scale=1`: the PI job is refused, the RoPE pretrain still runs, the sweep exits 2."""
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "experiment=smoke", "position=pi,rope", "register_base=false",
         f"data.cache_dir={tmp_path}/cache", f"hydra.sweep.dir={tmp_path}/sweep", "run_dir=null"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: 1 job(s) of the sweep failed:\n  job 0 (experiment=smoke position=pi" in result.stderr
    assert "position=pi at scale 1 reads positions exactly as plain RoPE does" in result.stderr
    assert list((tmp_path / "sweep" / "1").rglob("last.ckpt")), "the RoPE job after the refused one did not run"


def test_a_sweep_goes_on_past_an_unexpected_error_and_lists_it_with_the_refused_jobs(tmp_path):
    """An out-of-memory in job 0 (simulated: train() patched to raise), a refusal in job 1, job 2 runs: the sweep
    lists both failures, with job 0's traceback in its log, and exits 1 (an error that is not the user's)."""
    script = f"""
import gc, runpy, sys, weakref, training.run
from training.config import ConfigError

gc.disable()  # only the sweep's own collection frees what the failed job left
held_by_failed_job = []

class Held:  # in a cycle, as a Trainer and its LightningModule are
    pass

def fake_train(cfg):
    if cfg.seed == 1:
        held = Held()
        held.me = held
        held_by_failed_job.append(weakref.ref(held))
        raise RuntimeError("CUDA out of memory (simulated)\\nTried to allocate ...")
    if cfg.seed == 2:
        raise ConfigError("refused by a check")
    open({str(tmp_path / "job2_ran")!r}, "w").write("freed" if held_by_failed_job[0]() is None else "still held")

training.run.train = fake_train
sys.argv = ["train.py", "-m", "experiment=smoke", "seed=1,2,3", "hydra.sweep.dir={tmp_path}/sweep", "run_dir=null"]
runpy.run_path("train.py", run_name="__main__")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: 2 job(s) of the sweep failed:\n  job 0 (experiment=smoke seed=1 run_dir=null): RuntimeError: CUDA out of memory (simulated) (traceback in " in result.stderr
    assert "Tried to allocate" not in result.stderr.split("job(s) of the sweep failed")[1]  # one line per job
    assert "\n  job 1 (experiment=smoke seed=2 run_dir=null): refused by a check" in result.stderr
    assert "Traceback (most recent call last)" in (tmp_path / "sweep" / "0" / "train.log").read_text()
    assert (tmp_path / "job2_ran").read_text() == "freed"  # the job after the failed ones ran, without their memory


def test_a_sweep_refuses_a_job_whose_run_dir_an_earlier_job_used(tmp_path):
    """`-m position=pi,ntk scale=2 run_dir=X`: the second job would overwrite the first's checkpoints."""
    common = [sys.executable, "train.py", "-m", "experiment=smoke", "register_base=false", "stage=pretrain",
              "optim.pretrain.max_steps=1", f"data.cache_dir={tmp_path}/cache", f"hydra.sweep.dir={tmp_path}/sweep"]
    result = subprocess.run([*common, "seed=1,2", f"run_dir={tmp_path}/same"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: 1 job(s) of the sweep failed:\n  job 1 (" in result.stderr
    assert f"seed=2 run_dir={tmp_path}/same): run_dir={tmp_path}/same is also job 0's, whose checkpoints" in result.stderr
    assert list((tmp_path / "same").rglob("last.ckpt")), "the first job did not run"


def test_train_py_reports_a_bad_override_in_one_sentence_and_exits_non_zero(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "scale=0.5", "run_dir=run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "error: scale=0.5 must be a number >= 1" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()
    # Hydra's record of the run (its overrides, its log) goes to run_dir, not to a stray outputs/<date>/<time>.
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text().strip() == "- scale=0.5\n- run_dir=run"
    assert "scale=0.5 must be a number >= 1" in (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "outputs").exists()


def test_a_run_dir_that_cannot_be_made_is_one_sentence_not_hydras_traceback(tmp_path):
    """Hydra makes its run folder (run_dir) before train.py runs: one it cannot make falls back to
    outputs/<date>/<time>, so that train.py's own check can name the problem."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "run_dir=/dev/null/run"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: output folder /dev/null/run cannot be written (/dev/null is not a writable "
                                     "folder); choose another run_dir.")


def _small_corpus(tmp_path: Path) -> list[str]:
    """Data overrides for a corpus of about 100 training windows of 64 tokens: a pass is a few steps."""
    import random as stdlib_random

    rng = stdlib_random.Random(0)
    words = "the king and queen of every land rode out to see a play about love war and grief".split()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(120))}) + "\n" for _ in range(24)))
    return ["data=jsonl", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300"]


def test_a_pass_shorter_than_one_optimizer_step_is_refused_in_one_sentence(tmp_path):
    from data.datamodule import TextDataModule
    from data.errors import DataError

    settings = OmegaConf.to_container(compose_config("experiment=smoke", *_small_corpus(tmp_path)).data, resolve=True)
    windows = len(TextDataModule(**settings, seq_len=64).prepare().dataset("train"))
    module = TextDataModule(**{**settings, "batch_size": windows // 2 + 1}, seq_len=64, accumulate_grad_batches=2).prepare()
    with pytest.raises(DataError, match=rf"the train split has {windows} windows .* fewer than one optimizer step takes "
                                        rf"\(batch_size {windows // 2 + 1} x accumulate_grad_batches 2 x 1 processes"):
        module.train_dataloader()


def test_accumulated_steps_stay_whole_across_the_ends_of_passes(tmp_path):
    """Lightning steps the optimizer at every epoch's end; an epoch of an odd number of batches under
    accumulate_grad_batches=2 made every pass end in a step of one micro-batch (scaled as two)."""
    from data.datamodule import TextDataModule

    data = _small_corpus(tmp_path)
    settings = OmegaConf.to_container(compose_config("experiment=smoke", *data).data, resolve=True)
    windows = len(TextDataModule(**settings, seq_len=64).prepare().dataset("train"))
    batch = next(b for b in range(2, windows) if (windows // b) % 2 == 1)  # a pass: an odd number of batches
    steps = 2 * (windows // (2 * batch)) + 3  # past the end of two passes
    cfg = compose_config("experiment=smoke", *data, f"run_dir={tmp_path / 'run'}", "stage=pretrain", "register_base=false",
                         f"optim.pretrain.max_steps={steps}", f"optim.pretrain.batch_size={batch}",
                         "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=1000")
    result = train(cfg)
    saved = torch.load(result.last_checkpoint, weights_only=True)
    assert saved["global_step"] == steps
    assert saved["TextDataModule"]["samples_seen"] == steps * 2 * batch  # every step had both micro-batches


def test_the_data_order_of_a_pass_is_not_another_seeds(tmp_path):
    from data.datamodule import ResumableSampler

    def order(seed: int, data_pass: int) -> list[int]:
        return ResumableSampler(50, seed, lambda: 50 * data_pass)._order(data_pass)

    assert order(7, 1) != order(8, 0) and order(7, 0) != order(7, 1)
    assert len(ResumableSampler(10, 0, lambda: 0, per_step=4)) == 8  # whole optimizer steps
    assert len(ResumableSampler(10, 0, lambda: 0, world_size=2, per_step=4)) == 4
