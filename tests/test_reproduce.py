"""The reproduction: claim verdicts from numbers (fast), and the whole pipeline in miniature (slow)."""

from __future__ import annotations

import json
import shutil
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from reproduction.claims import HELD, NOT_HELD, PARTLY, UNTESTABLE, Numbers, judge_all

REPO = Path(__file__).resolve().parents[1]
BASE, PI, FT, FT_LONG = "base", "pi", "ft", "ft long"


def numbers(**changes) -> Numbers:
    """The paper's picture at L = 256, L' = 2048: every claim holds."""
    values = dict(
        window=256, long_window=2048,
        ppl={BASE: {256: 60.0, 512: 900.0, 1024: 2000.0, 2048: 3000.0},
             PI: {256: 61.0, 512: 58.0, 1024: 57.0, 2048: 56.9},
             FT: {256: 62.0, 512: 64.0, 1024: 70.0, 2048: 80.0},
             FT_LONG: {256: 61.0, 512: 61.0, 1024: 63.0, 2048: 66.0}},
        base=BASE, pi=PI, fine_tuned=[FT, FT_LONG],
        k_max={PI: 1990, FT: 300, FT_LONG: 500}, largest_k=1990,
        base_k_max_at_window=200, base_largest_k_at_window=200,
    )
    values.update(changes)
    return Numbers(**values)


def verdicts(n: Numbers) -> list[str]:
    return [claim.verdict for claim in judge_all(n)]


def test_the_papers_picture_holds_every_claim() -> None:
    assert verdicts(numbers()) == [HELD] * 5


def test_each_claim_can_fail_or_hold_in_part() -> None:
    paper = numbers()
    mild = {**paper.ppl, BASE: {256: 60.0, 512: 65.0, 1024: 80.0, 2048: 100.0}}
    flat = {**paper.ppl, BASE: {256: 60.0, 512: 61.0, 1024: 62.0, 2048: 63.0}}
    assert verdicts(numbers(ppl=mild))[0] == PARTLY
    assert verdicts(numbers(ppl=flat))[0] == NOT_HELD

    bumpy = {**paper.ppl, PI: {256: 61.0, 512: 63.0, 1024: 57.0, 2048: 56.0}}
    rising = {**paper.ppl, PI: {256: 61.0, 512: 62.0, 1024: 64.0, 2048: 70.0}}
    assert verdicts(numbers(ppl=bumpy))[1] == PARTLY
    assert verdicts(numbers(ppl=rising))[1] == NOT_HELD

    long_better = {**paper.ppl, FT_LONG: {256: 60.0, 512: 56.0, 1024: 55.0, 2048: 55.0}}
    both_better = {**long_better, FT: {256: 60.0, 512: 56.0, 1024: 55.0, 2048: 56.0}}
    assert verdicts(numbers(ppl=long_better))[2] == PARTLY
    assert verdicts(numbers(ppl=both_better))[2] == NOT_HELD

    assert verdicts(numbers(base_k_max_at_window=0))[3] == UNTESTABLE
    assert verdicts(numbers(k_max={PI: 1500, FT: 300, FT_LONG: 500}))[3] == PARTLY
    assert verdicts(numbers(k_max={PI: 1990, FT: 300, FT_LONG: 1990}))[3] == NOT_HELD

    costly = {**paper.ppl, PI: {**paper.ppl[PI], 256: 66.0}}
    ruinous = {**paper.ppl, PI: {**paper.ppl[PI], 256: 90.0}}
    assert verdicts(numbers(ppl=costly))[4] == PARTLY
    assert verdicts(numbers(ppl=ruinous))[4] == NOT_HELD


def test_a_nan_perplexity_makes_its_claims_untestable_and_an_infinite_one_is_judged_as_what_it_means() -> None:
    """NaN is a numeric failure, not a measurement; inf is a model that broke down. inf <= inf * 1.01 must not
    make an all-infinite PI "partly" keep falling, nor an infinite base make PI's cost look small."""
    nan, inf = math.nan, math.inf
    paper = numbers().ppl
    assert verdicts(numbers(ppl={**paper, BASE: {**paper[BASE], 2048: nan}}))[0] == UNTESTABLE
    assert verdicts(numbers(ppl={**paper, BASE: {**paper[BASE], 2048: inf}}))[0] == HELD  # exploded indeed
    broken_base = verdicts(numbers(ppl={**paper, BASE: {**paper[BASE], 256: inf}}))
    assert broken_base[0] == UNTESTABLE and broken_base[4] == UNTESTABLE
    assert verdicts(numbers(ppl={**paper, PI: {w: inf for w in paper[PI]}}))[1:3] == [NOT_HELD, NOT_HELD]
    assert verdicts(numbers(ppl={**paper, PI: {**paper[PI], 512: nan}}))[1] == UNTESTABLE
    assert verdicts(numbers(ppl={**paper, FT: {**paper[FT], 2048: nan}}))[2] == UNTESTABLE
    assert verdicts(numbers(ppl={**paper, FT: {**paper[FT], 2048: inf}}))[2] == HELD
    assert verdicts(numbers(ppl={**paper, PI: {**paper[PI], 256: nan}}))[4] == UNTESTABLE
    with pytest.raises(ValueError, match="at least one direct fine-tune"):
        numbers(fine_tuned=[])


def test_windows_that_are_not_whole_multiples_of_l_are_labelled_as_what_they_are() -> None:
    """scale=2.5 reads L, 2L and 2.5L: not "L, 2L, 2L" with the paper's 2L numbers under 2.5L."""
    from reproduction.claims import multiple
    from reproduction.report import by_step_section, ppl_section

    assert [multiple(w, 128) for w in (128, 256, 320, 1024)] == ["L", "2L", "2.5L", "8L"]
    text = ppl_section([128, 256, 320], 128, {"PI": {128: 40.0, 256: 39.0, 320: 38.5}})
    assert "| model | L = 128 | 2L = 256 | 2.5L = 320 |" in text
    assert "| PI to 8L (16384), 1000 steps | 7.11 | 6.93 | - |" in text
    windows = {BASE: {128: 40.0, 256: 400.0, 320: 900.0}, PI: {128: 41.0, 256: 40.0, 320: 39.9},
               FT: {128: 42.0, 256: 45.0, 320: 50.0}}
    claims = judge_all(numbers(window=128, long_window=320, ppl=windows, fine_tuned=[FT], k_max={PI: 300, FT: 100}, largest_k=300))
    assert claims[0].ours.endswith("900.00 at 2.5L (22.50x)") and claims[1].ours.endswith("at L, 2L, 2.5L")
    by_step = by_step_section({"PI": [{"step": 0, "ppl_128": 40.0, "ppl_320": None}]}, [128, 256, 320], 128)
    assert "| step | ppl L | ppl 2L | ppl 2.5L | passkey k_max |" in by_step and "| 0 | 40.00 | - | inf | - |" in by_step


def test_the_attention_table_names_its_extent_and_gives_the_real_pairs_their_shared_values() -> None:
    """B(s)/d and the bound ratio where B(s) = d depend on the frequencies only: a real query/key column has them
    (not as per-pair medians). The extrapolation row names the configured extent, not always 2L."""
    from reproduction.report import attention_section

    fit = {"head_dim": 128, "window": 2048, "extent": 4.0, "inside_max": 0.5, "interpolation_max": 0.5,
           "extrapolation_max": 8000.0, "bound_ratio_min": 650.0, "bound_ratio_at_b_equal_d": 589.46}
    real = {"pairs": 8, "inside_max_median": 0.7, "interpolation_max_median": 0.7, "extrapolation_max_median": 90.0,
            "bound_ratio_min_median": 640.0, "bound_ratio_at_b_equal_d": 589.46, "b_over_d_min": 1.1}
    text = attention_section({"paper_fit": fit, "query_key": {"base": real}}, "base")
    assert "| max \\|a(s)\\|, integers in (L, 4L] | 8000 | 90 |" in text
    assert "| bound ratio where B(s) = d | 589.5 | 589.5 |" in text


def test_the_ablation_table_splits_passkey_success_at_the_base_window() -> None:
    from reproduction.report import long_passkey_section, success_within_and_beyond

    result = {"distances": [50, 128, 129, 600, 1000], "success_rates": [1.0, 0.5, 0.2, 0.0, 0.4], "k_max": 128}
    assert success_within_and_beyond(result, 128) == pytest.approx((0.75, 0.2))
    assert success_within_and_beyond({"distances": [10], "success_rates": [1.0]}, 128) == (1.0, None)

    runs = ["PI, 4 steps", "PI, 4 steps, passkeys to L' = 1024"]
    ppl = {name: {128: 40.0, 1024: 38.0} for name in runs}
    text = long_passkey_section(128, 1024, [128, 1024], {"finetune_steps": 4, "long_finetune_steps": 8,
                                                         "passkey_share": 0.2, "passkey_trials": 10, "passkey_positions": 5},
                                reference_rows=runs[:1], ablation_rows=runs[1:], ppl=ppl,
                                passkey={name: result for name in runs},
                                by_step={runs[1]: [{"step": 0, "ppl_1024": 50.0, "passkey_k_max": 0}]}, figure="f.png")
    assert "| PI, 4 steps, passkeys to L' = 1024 | 40.00 | 38.00 | 128 | 0.75 | 0.20 |" in text
    assert "not used for any verdict" in text


def test_a_fine_tune_that_ends_well_above_its_best_validation_step_is_marked_overfit() -> None:
    from reproduction.report import DIVERGED, FIT, NO_CURVE, OVERFIT, fit_check, fit_section, fit_warning

    def curve(*points: tuple[int, float | None]) -> list[dict]:
        return [{"step": step, "ppl_2048": ppl} for step, ppl in points]

    runs = {
        # Shapes of the 2026-11-27 GPU run: PI settles, the 10N direct fine-tune climbs after step 250.
        "PI, 200 steps": curve((0, 670.0), (100, 61.8), (200, 58.6)),
        "FT, 2000 steps": curve((0, 68300.0), (250, 70.7), (1000, 185.2), (2000, 1140.0)),
        # Step 0 is never the best: against 50 at step 0 this run would be 28% up; against step 100, 6.7%.
        "low start": curve((0, 50.0), (100, 60.0), (200, 64.0)),
        # Either side of the 10% line.
        "just over": curve((0, 900.0), (100, 100.0), (200, 110.5)),
        "just under": curve((0, 900.0), (100, 100.0), (200, 109.5)),
        # The final value is the last step's, whatever the rows' order and the highest value.
        "spike": curve((300, 70.0), (0, 900.0), (200, 200.0), (100, 80.0)),
        # A last value that was not finite (stored as null) is a divergence, however good the earlier ones.
        "blown up": curve((0, 900.0), (100, 60.0), (200, None)),
        "never evaluated": curve((0, 900.0)),
    }
    passes = {"PI, 200 steps": 1.7, "FT, 2000 steps": 17.0}
    fits = {f.title: f for f in fit_check(runs, 2048, passes, {"FT, 2000 steps": 1.3})}
    assert {title: f.verdict for title, f in fits.items()} == {
        "PI, 200 steps": FIT, "FT, 2000 steps": OVERFIT, "low start": FIT, "just over": OVERFIT, "just under": FIT,
        "spike": FIT, "blown up": DIVERGED, "never evaluated": NO_CURVE}
    assert (fits["low start"].best_step, fits["low start"].best_ppl) == (100, 60.0)
    assert (fits["spike"].final_ppl, fits["spike"].best_step) == (70.0, 300)
    assert (fits["blown up"].final_ppl, fits["blown up"].best_ppl) == (None, 60.0)

    table = fit_section(list(fits.values()), 256, 2048)
    assert "| FT, 2000 steps | L' | 17.00 | 1.30 | 70.70 (step 250) | 1.14e+03 | 16.12 | **overfit** |" in table
    assert "| blown up | L' | - | - | 60.00 (step 100) | - | - | **diverged** |" in table
    assert "| never evaluated | L' | - | - | - | - | - | no curve |" in table
    warning = fit_warning(list(fits.values()))
    assert warning.startswith("**Caution:** FT, 2000 steps and just over ended more than 10% above their best")
    assert "blown up ended with a validation perplexity that is not finite" in warning
    assert "PI, 200 steps" not in warning and "these runs" in warning
    assert "this run " in fit_warning([fits["FT, 2000 steps"]])
    assert fit_warning([fits["PI, 200 steps"], fits["never evaluated"]]) == ""


def test_the_base_is_judged_from_its_training_log(tmp_path: Path) -> None:
    """The base has no by-step table: its curve is the val/ppl column of Lightning's metrics.csv."""
    from reproduction.report import DIVERGED, FIT, OVERFIT, fit_section, judge_fit, metrics_curve

    log = tmp_path / "metrics.csv"
    # Lightning writes training and validation rows apart; validation after optimizer step 100 says step 99.
    log.write_text("epoch,step,train/loss,train/ppl,val/loss,val/ppl\n"
                   "0,9,6.0,403.4,,\n0,99,,,4.2,66.7\n0,199,4.0,54.6,,\n0,199,,,3.9,49.4\n1,299,,,4.0,54.6\n")
    assert metrics_curve(log) == [(100, 66.7), (200, 49.4), (300, 54.6)]
    base = judge_fit("base", 128, metrics_curve(log), 6.4, 9.7)
    assert (base.verdict, base.best_step, base.best_ppl, base.final_ppl) == (OVERFIT, 200, 49.4, 54.6)  # 10.5% up
    assert "| base | L | 6.40 | 9.70 | 49.40 (step 200) | 54.60 | 1.11 | **overfit** |" in fit_section([base], 128, 1024)
    log.write_text(log.read_text() + "1,399,,,inf,inf\n")
    assert judge_fit("base", 128, metrics_curve(log), None, None).verdict == DIVERGED
    assert metrics_curve(tmp_path / "missing.csv") == []
    log.write_text("epoch,step,val/ppl\n0,99,50.0\n0,199,54.0\n")
    assert judge_fit("base", 128, metrics_curve(log), None, None).verdict == FIT  # 8% up


def test_inside_window_rows_compress_the_base_step_by_step_and_quote_the_answers(tmp_path: Path) -> None:
    from reproduction.pipeline import BASE_ROW, Reproduction, Stage
    from reproduction.report import inside_window_section

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        run = Reproduction(compose(config_name="reproduce", overrides=["budget=mini", f"work_dir={tmp_path}"]))
    for stage in ("pi", "pi_long", "ft", "ft_long"):
        run.stages[stage] = Stage(stage, f"{stage} title", [])
    rows = run.inside_window_variants()
    base = str(run.checkpoint("base"))
    assert rows[0] == {"name": BASE_ROW, "ckpt": base}
    assert [r["position"] for r in rows[1:7]] == [{"kind": "pi", "scale": s} for s in (1.05, 1.1, 1.25, 2, 4, 8)]
    assert all(r["ckpt"] == base for r in rows[1:7])
    assert [r["name"] for r in rows[7:]] == ["ft title", "ft_long title", "pi title", "pi_long title"]
    assert "position" not in rows[7]  # a fine-tune is read with its own encoding
    for scale, expected in (("6", [1.05, 1.1, 1.25, 2, 4, 6]), ("1.1", [1.05, 1.1])):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            odd = Reproduction(compose(config_name="reproduce", overrides=["budget=mini", f"work_dir={tmp_path}", f"scale={scale}"]))
        odd.stages = run.stages
        assert [r["position"]["scale"] for r in odd.inside_window_variants() if "position" in r] == expected

    def result(answers: list[list[str]], keys: list[list[str]]) -> dict:
        successes = [[a.startswith(k) for a, k in zip(row, key_row)] for row, key_row in zip(answers, keys)]
        rates = [sum(row) / len(row) for row in successes]
        return {"k_max": 60 if all(r >= 0.2 for r in rates) else 0, "distances": [36, 60], "success_rates": rates,
                "answers": answers, "successes": successes, "keys": keys}

    keys = [["52445", "10981"], ["67767", "25315"]]
    base_row = result([["52445.", "10981."], ["67767.", "25315."]], keys)
    # Near-copies with 4, 3 and 3 of 5 digits in place; a non-digit answer has none.
    compressed = result([["The grass is\ngreen. The sky is blue. The sun", "10991"], ["77667", "53315"]], keys)
    # Right answers do not count; a short wrong answer is scored out of the key's length: "1098" 4 of 5, "33." 0.
    mixed = result([["52445.", "1098"], ["67767", "33."]], keys)
    text = inside_window_section({BASE_ROW: base_row, "base read with PI at scale 2, no fine-tuning": compressed, "mixed": mixed},
                                 {BASE_ROW: {128: 41.1}, "base read with PI at scale 2, no fine-tuning": {128: 77.13}}, 128, 10, 16)
    assert f"| {BASE_ROW} | 41.10 | 60 | 60 | 1.00 | - | \"52445.\" for 52445 (right) |" in text
    assert ('| base read with PI at scale 2, no fine-tuning | 77.13 | 60 | 0 | 0.00 | 0.50 | '
            '"The grass is green. The..." for 52445 (wrong) |') in text  # (0 + 4 + 3 + 3) / 4 / 5
    assert '| mixed | - | 60 | 60 | 0.50 | 0.40 | "52445." for 52445 (right) |' in text  # (4 + 0) / 2 / 5
    old = {k: v for k, v in compressed.items() if k != "keys"}  # a results.json written before keys were kept
    assert inside_window_section({"old": old}, {}, 128, 10, 16).endswith('| old | - | 60 | 0 | 0.00 | n/a | "The grass is green. The..." (wrong) |')
    assert inside_window_section({"never answered": {**old, "answers": []}}, {}, 128, 10, 16).endswith(" | - |")


def test_the_long_fine_tunes_are_also_read_at_their_best_validation_step_when_it_came_before_the_last(tmp_path: Path) -> None:
    import torch

    from reproduction.pipeline import Reproduction, Stage

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        run = Reproduction(compose(config_name="reproduce", overrides=["budget=mini", f"work_dir={tmp_path}"]))
    # (step of best.ckpt or None for no file): ft_long overfit after step 100; pi_long was best at its last step.
    for stage, best_step in (("ft_long", 100), ("pi_long", 800), ("ft", None), ("pi", None)):
        checkpoints = tmp_path / "runs" / stage / "checkpoints"
        checkpoints.mkdir(parents=True)
        torch.save({"global_step": 800}, checkpoints / "last.ckpt")
        if best_step is not None:
            torch.save({"global_step": best_step}, checkpoints / "best.ckpt")
        run.stages[stage] = Stage(stage, f"{stage} title", [])
    best = tmp_path / "runs" / "ft_long" / "checkpoints" / "best.ckpt"
    assert run.best_variants(["ft_long", "pi_long", "ft"]) == [
        {"name": "ft_long title, best validation step (100)", "ckpt": str(best)}]
    names = [row["name"] for row in run.extension_variants()]
    assert names[-1] == "ft_long title, best validation step (100)" and "ft_long title" in names
    sys.path.insert(0, str(REPO))
    from reproduce import _early_stopping_text

    text = _early_stopping_text(run)
    assert text.startswith(' The row "ft_long title, best validation step (100)" reads that fine-tune\'s checkpoint') and text.endswith("uses it.")


@pytest.mark.parametrize("budget", ["cpu", "gpu", "mini"])
def test_every_budget_composes_into_valid_training_configs(budget: str) -> None:
    from training.config import validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="reproduce", overrides=[f"budget={budget}"])
        b = cfg.budget
        assert b.name == budget and b.long_finetune_steps > b.finetune_steps
        for position, scale in (("rope", 1), ("pi", cfg.scale), ("rope", cfg.scale)):
            train_cfg = compose(config_name="config", overrides=[
                f"model={b.model}", f"trainer={b.trainer}", f"position={position}", f"scale={scale}",
                f"data.passkey_share={cfg.budget.passkey_share}", *([f"model.max_seq_len={b.window}"] if b.get("window") else []),
            ])
            validate(train_cfg)
        # The report replaces its folder: by default it goes beside the runs, in a folder git ignores, never over
        # a committed report in results/.
        report, work = Path(cfg.report_dir), Path(cfg.work_dir)
        assert report.is_relative_to(work) and not report.is_relative_to("results")
        if (REPO / ".git").exists():  # a source tree without git (an sdist) has nothing to overwrite
            ignored = subprocess.run(["git", "check-ignore", "-q", str(report / "README.md")], cwd=REPO)
            assert ignored.returncode == 0, f"{report} is not git-ignored"


def test_the_base_is_evaluated_by_step_only_where_the_budget_asks(tmp_path: Path) -> None:
    """GPU: the pretraining curve at L says when the base retrieves and when it overfits. CPU: no new
    override, so the committed CPU report's base (and every fine-tune built on it) stays reusable."""
    from reproduction.pipeline import Reproduction

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        gpu = Reproduction(compose(config_name="reproduce", overrides=["budget=gpu", f"work_dir={tmp_path}"]))
        cpu = Reproduction(compose(config_name="reproduce", overrides=["budget=cpu", f"work_dir={tmp_path}"]))
    assert gpu._pretrain_eval() == ["eval.every_n_steps=125", "eval.windows=[256]", "eval.max_documents=3",
                                    "eval.passkey_trials=5", "eval.batch_size=32"]
    assert cpu._pretrain_eval() == []
    # GPU batches the evaluations' windows; the CPU budget writes no such override (its stages stay reusable)
    assert "ppl.batch_size=32" in gpu._evaluation_overrides("x", ["ppl"], {})
    assert not any(o.startswith("ppl.batch_size") for o in cpu._evaluation_overrides("x", ["ppl"], {}))
    assert cpu.base_by_step() is None and gpu.base_by_step() is None  # no run yet
    (tmp_path / "runs" / "base").mkdir(parents=True)
    (tmp_path / "runs" / "base" / "eval_by_step.json").write_text('[{"step": 0, "ppl_256": 4000.0}]')
    assert gpu.base_by_step() == [{"step": 0, "ppl_256": 4000.0}] and cpu.base_by_step() is None


@pytest.mark.parametrize("scale", ["1", "0.5", "eight"])
def test_a_scale_that_extends_nothing_is_refused_before_any_stage(tmp_path: Path, scale: str) -> None:
    from reproduction.pipeline import Reproduction
    from training.config import ConfigError

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="reproduce", overrides=["budget=mini", f"work_dir={tmp_path}", f"scale={scale}"])
        with pytest.raises(ConfigError, match="must be a number > 1: the reproduction extends L"):
            Reproduction(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_finished_stage_is_reused_until_its_settings_or_its_base_change(tmp_path: Path, monkeypatch) -> None:
    import training.run
    from reproduction.pipeline import Reproduction

    trained = []

    def fake_train(cfg):  # what the pipeline needs from a run: its checkpoint and summary
        run_dir = Path(cfg.run_dir)
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "last.ckpt").write_text(str(len(trained)))
        (run_dir / "summary.json").write_text(json.dumps({"seq_len": 128, "metrics": {}, "run": len(trained)}))
        trained.append(run_dir.name)

    monkeypatch.setattr(training.run, "train", fake_train)

    def stages(*overrides: str, conf: Path = REPO / "conf") -> None:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            run = Reproduction(compose(config_name="reproduce", overrides=["budget=mini", f"work_dir={tmp_path}", *overrides]))
            run.pretrain()
            run.finetune("pi", "PI", "pi", 4, 2)

    stages()
    stages()  # nothing changed: both reused
    assert trained == ["base", "pi"]
    stages("budget.finetune_lr=0.001")  # the fine-tune's settings changed: only it runs again
    assert trained == ["base", "pi", "pi"]
    stages("budget.pretrain_steps=31")  # a new base: the fine-tune built on the old one is stale
    assert trained == ["base", "pi", "pi", "base", "pi"]
    stages("budget.pretrain_steps=31", "reuse=false")
    assert trained[-2:] == ["base", "pi"] and len(trained) == 7
    # Same settings over new training data (a new passkey recipe changes the token cache): all stale.
    monkeypatch.setattr("data.datamodule.PASSKEY_RECIPE", -1)
    stages("budget.pretrain_steps=31")
    assert trained[-2:] == ["base", "pi"] and len(trained) == 9
    # The same overrides over an edited config group (AdamW's betas): what they compose to changed, all stale.
    edited = tmp_path / "conf"
    shutil.copytree(REPO / "conf", edited)
    optim = edited / "optim" / "adamw.yaml"
    optim.write_text(optim.read_text().replace("betas: [0.9, 0.95]", "betas: [0.9, 0.99]"))
    stages("budget.pretrain_steps=31", conf=edited)
    assert trained[-2:] == ["base", "pi"] and len(trained) == 11
    stages("budget.pretrain_steps=31", conf=edited)
    assert len(trained) == 11  # and reused from then on


# Stands in for `python train.py OVERRIDES run_dir=DIR` in a stage's own process: writes what the pipeline reads
# from a finished run after FAKE_TRAIN_SECONDS, or, where FAIL_STAGES names its run_dir, writes a checkpoint
# "at step 2" and fails at once as train.py does (one `error:` sentence, exit status 2). Its pid goes to
# run_dir/pid as it starts.
FAKE_TRAIN = """
import json, os, sys, time
from pathlib import Path
run_dir = Path(next(a for a in sys.argv[1:] if a.startswith("run_dir="))[len("run_dir="):])
(run_dir / "pid").write_text(str(os.getpid()))
if run_dir.name in os.environ.get("FAIL_STAGES", "").split(","):
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "last.ckpt").write_text("2")
    print("error: data.passkey_share=2 must be between 0 and 1.", file=sys.stderr)
    sys.exit(2)
time.sleep(float(os.environ.get("FAKE_TRAIN_SECONDS_" + run_dir.name.upper(), os.environ["FAKE_TRAIN_SECONDS"])))
(run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
(run_dir / "checkpoints" / "last.ckpt").write_text("weights")
(run_dir / "summary.json").write_text(json.dumps({"seq_len": 1024, "metrics": {}, "argv": sys.argv[1:],
                                                  "threads": os.environ["OMP_NUM_THREADS"]}))
"""


def _fake_stages(monkeypatch) -> tuple[list[str], list[str]]:
    """Stages run in this process and in their own (FAKE_TRAIN) processes, by name, as they start."""
    import training.run
    from reproduction.pipeline import Reproduction

    trained_here, started = [], []

    def fake_train(cfg):  # a stage run in this process
        run_dir = Path(cfg.run_dir)
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "last.ckpt").write_text("weights")
        (run_dir / "summary.json").write_text(json.dumps({"seq_len": 128, "metrics": {}}))
        trained_here.append(run_dir.name)

    def fake_command(self, stage, extra):
        started.append(stage.name)
        return [sys.executable, "-c", FAKE_TRAIN, *stage.overrides, f"run_dir={self.run_dir(stage.name)}", *extra]

    monkeypatch.setattr(training.run, "train", fake_train)
    monkeypatch.setattr(Reproduction, "stage_command", fake_command)
    return trained_here, started


def test_fine_tunes_run_side_by_side_in_their_own_processes_and_a_failed_one_stops_the_run(tmp_path: Path, monkeypatch) -> None:
    from reproduction.pipeline import Reproduction, StageError

    trained_here, started = _fake_stages(monkeypatch)
    monkeypatch.setenv("FAKE_TRAIN_SECONDS", "1.0")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        def run_all(*overrides: str) -> Reproduction:
            run = Reproduction(compose(config_name="reproduce", overrides=[
                "budget=mini", f"work_dir={tmp_path}", "budget.parallel_stages=2", *overrides]))
            run.pretrain()  # one stage: in this process
            run.run_stages(run.finetune_stages())
            return run

        run = run_all()
        assert trained_here == ["base"]
        # The 10N fine-tunes first (they set the wall time), two at a time, each with its stage's own overrides
        # and half of the cores this process may use.
        assert started[:2] == ["ft_long", "pi_long"] and sorted(started) == ["ft", "ft_long", "pi", "pi_long"]
        assert list(run.stages) == ["base", "pi", "ft", "ft_long", "pi_long"]  # the report's order, not the finishing order
        for name in ("pi", "ft", "ft_long", "pi_long"):
            stage = run.stages[name]
            assert stage.summary["argv"] == [*stage.overrides, f"run_dir={run.run_dir(name)}"]
            assert stage.summary["threads"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
            assert stage.seconds >= 1.0 and (run.run_dir(name) / "reproduce_stage.json").is_file()
        # Never more than two at once, and two at some moment: a sweep over the starts and ends.
        events = sorted(e for s in run.stages.values() for a, b in s.spans for e in ((a, 1), (b, -1)))
        at_once = [sum(step for _, step in events[: i + 1]) for i in range(len(events))]
        assert max(at_once) == 2 == run.most_at_once()
        # The total counts time the stages shared once: four 1 s runs, two at a time, in about 2 s (plus starts).
        fine_tunes = sum(run.stages[n].seconds for n in ("pi", "ft", "ft_long", "pi_long"))
        assert run.stages_wall_seconds() < run.stages["base"].seconds + fine_tunes - 1.5

        started.clear()
        again = run_all()
        assert started == [] and all(stage.reused for stage in again.stages.values())
        assert again.stages_wall_seconds() == pytest.approx(run.stages_wall_seconds()) and again.most_at_once() == 2

        # One of the first two fails at once: the other, and the two still queued, run to the end and are reused by
        # the next call; the error names the stage, train.py's sentence and where its whole output is.
        monkeypatch.setenv("FAIL_STAGES", "ft_long")
        started.clear()
        with pytest.raises(StageError, match=r"stage ft_long failed \(exit status 2: error: data.passkey_share=2 must be "
                                             r"between 0 and 1.\); its output: .*ft_long/process.log"):
            run_all("budget.finetune_lr=0.001")
        assert sorted(started) == ["ft", "ft_long", "pi", "pi_long"]
        monkeypatch.delenv("FAIL_STAGES")
        started.clear()
        run_all("budget.finetune_lr=0.001")
        assert started == [] and trained_here == ["base", "ft_long"]  # one stage left to run: in this process

        # Two stages cut after a checkpoint: the next call continues both, side by side, from it.
        monkeypatch.setattr("training.faults.checkpoint_step", lambda path: int(Path(path).read_text()))
        monkeypatch.setenv("FAIL_STAGES", "pi,ft")
        with pytest.raises(StageError, match="stage pi failed .* stage ft failed"):
            run_all("budget.finetune_lr=0.002")
        monkeypatch.delenv("FAIL_STAGES")
        started.clear()
        run = run_all("budget.finetune_lr=0.002")
        assert sorted(started) == ["ft", "pi"]
        for name in ("ft", "pi"):
            assert run.stages[name].summary["argv"][-1] == f"resume={run.checkpoint(name)}"
            assert run.stages[name].resumed_at == [2]
            assert "error: data.passkey_share=2" in (run.run_dir(name) / "process.log").read_text()  # both parts' output


def test_evaluations_run_as_soon_as_the_runs_they_read_finish_while_the_others_train(tmp_path: Path, monkeypatch) -> None:
    import time

    from evaluation.errors import EvaluationError
    from reproduction.pipeline import PendingEvaluation, Reproduction

    import torch

    trained_here, started = _fake_stages(monkeypatch)
    threads: dict[str, int] = {}  # evaluation -> torch's threads in this process while it ran
    monkeypatch.setenv("FAKE_TRAIN_SECONDS", "0.2")
    for name in ("FT_LONG", "PI_LONG"):
        monkeypatch.setenv(f"FAKE_TRAIN_SECONDS_{name}", "5")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        def run_all(parallel: int, *overrides: str, broken: type[BaseException] | None = None) -> tuple[Reproduction, dict[str, set[str]]]:
            run = Reproduction(compose(config_name="reproduce", overrides=[
                "budget=mini", f"work_dir={tmp_path}", f"budget.parallel_stages={parallel}", *overrides]))
            run.pretrain()
            seen: dict[str, set[str]] = {}  # evaluation -> the stages finished when it started

            def evaluation(name: str, seconds: float) -> PendingEvaluation:
                def make() -> None:
                    seen[name] = set(run.finished)
                    threads[name] = torch.get_num_threads()
                    trained_here.append(f"evaluation {name}")
                    began = time.time()
                    time.sleep(seconds)  # as an evaluation does, it records when it ran
                    if broken:
                        raise broken("the passkey window is longer than the table.")
                    ended = time.time()
                    run.evaluations[name], run.evaluation_spans[name] = (ended - began, False), (began, ended)
                return PendingEvaluation(name, needs[name], make)

            needs = {"of the base": (), "of ft": ("ft",), "of the long ones": ("ft_long", "pi_long")}
            run.run_stages(run.finetune_stages(), then=[evaluation("of the base", 2.5), evaluation("of ft", 0.5),
                                                        evaluation("of the long ones", 0.2)])
            return run, seen

        # Side by side: the base's evaluation while all four train, ft's once it finished (the long ones still
        # training), the last once both long ones had.
        all_threads = torch.get_num_threads()
        run, seen = run_all(4)
        # While they trained, this process's evaluations took one process's share of the cores, as each of them.
        share = max(1, len(os.sched_getaffinity(0)) // 4)
        assert threads["of the base"] == threads["of ft"] == min(all_threads, share) and torch.get_num_threads() == all_threads
        assert seen == {"of the base": {"base"}, "of ft": {"base", "pi", "ft"}, "of the long ones": {"base", "pi", "ft", "ft_long", "pi_long"}}
        # ft's process ended while this process evaluated the base for 2.5 s: its seconds are its own (0.2 s of
        # sleep and a Python start), not until the evaluation let this process look.
        assert run.stages["ft"].seconds < 2.0
        # Two evaluations overlapped the training; the total counts that time once.
        overlap = run.evaluation_seconds_while_training()
        assert overlap == pytest.approx(run.evaluations["of the base"][0] + run.evaluations["of ft"][0], abs=0.05)
        stages, evaluations = run.stages_wall_seconds(), sum(seconds for seconds, _ in run.evaluations.values())
        assert run.wall_seconds() == pytest.approx(stages + evaluations - overlap)

        # One at a time in this process: each evaluation right after the last stage it reads.
        trained_here.clear()
        run_all(1, "budget.finetune_lr=0.001")
        assert trained_here == ["evaluation of the base", "pi", "ft", "evaluation of ft", "ft_long", "pi_long",
                                "evaluation of the long ones"]

        # Evaluations that fail, side by side or one at a time: the fine-tunes run to the end (reusable), then the
        # first error.
        for parallel, lr in ((4, 0.002), (1, 0.003)):
            trained_here.clear()
            with pytest.raises(EvaluationError, match="the passkey window"):
                run_all(parallel, f"budget.finetune_lr={lr}", broken=EvaluationError)
            assert all((run.run_dir(name) / "reproduce_stage.json").is_file() for name in ("pi", "ft", "ft_long", "pi_long"))
            assert trained_here.count("evaluation of the base") == 1  # each failed once, none was tried again
            started.clear()
            run_all(4, f"budget.finetune_lr={lr}")
            assert started == []

        # Cut (Ctrl-C, or SIGTERM's SystemExit) during the base's evaluation, after the N-step fine-tunes ended: those
        # two are recorded, the next call reuses them and trains only the 10N ones again.
        with pytest.raises(KeyboardInterrupt):
            run_all(4, "budget.finetune_lr=0.004", broken=KeyboardInterrupt)
        assert [(run.run_dir(name) / "reproduce_stage.json").is_file() for name in ("pi", "ft", "ft_long", "pi_long")] == [
            True, True, False, False]
        started.clear()
        run_all(4, "budget.finetune_lr=0.004")
        assert sorted(started) == ["ft_long", "pi_long"]

        # An evaluation that waits for a stage nobody planned would never run: refused at once.
        run = Reproduction(compose(config_name="reproduce", overrides=["budget=mini", f"work_dir={tmp_path}"]))
        with pytest.raises(ValueError, match="reads nothing_like_it, a stage not planned"):
            run.run_stages([], then=[PendingEvaluation("odd", ("nothing_like_it",), lambda: None)])


def test_evaluations_made_one_per_run_merge_into_the_tables_rows_in_order(tmp_path: Path) -> None:
    from reproduction.pipeline import Reproduction

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        run = Reproduction(compose(config_name="reproduce", overrides=["budget=mini", f"work_dir={tmp_path}"]))
    passkey = {"k_max": 3}
    run.results = {"base": {"config": {"ppl": {"stride": 256}}, "ppl_table": {"b1": {128: 5.0}, "b2": {128: 6.0}},
                            "passkey": {"b1": passkey, "b2": passkey}},
                   "ft": {"config": {}, "ppl_table": {"f": {128: 7.0}}, "passkey": {"f": passkey}}}
    rows = [{"name": "b2"}, {"name": "f"}, {"name": "b1"}]
    merged = run.merged(["base", "ft"], rows)
    assert list(merged["ppl_table"]) == list(merged["passkey"]) == ["b2", "f", "b1"]
    assert merged["ppl_table"]["f"] == {128: 7.0} and merged["config"] == {"ppl": {"stride": 256}} and "ppl" not in merged
    with pytest.raises(ValueError, match="no ppl_table result for 'lost'"):
        run.merged(["base", "ft"], [*rows, {"name": "lost"}])


def test_a_stage_cut_midway_continues_from_its_last_checkpoint_while_its_settings_are_unchanged(tmp_path: Path, monkeypatch) -> None:
    import time

    import training.faults
    import training.run
    from reproduction.pipeline import Reproduction

    class Cut(Exception):
        """The device call's time limit, a crash: the run stops after a periodic checkpoint."""

    calls: list[tuple[str, str | None]] = []
    cut_at: dict[str, int] = {}  # stage -> the step of its last checkpoint before the cut

    def fake_train(cfg):  # the step is the checkpoint's text
        run_dir = Path(cfg.run_dir)
        calls.append((run_dir.name, cfg.resume))
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        time.sleep(0.05)  # file times are coarser than time.time(): the checkpoint comes after the start
        if run_dir.name in cut_at:
            (run_dir / "checkpoints" / "last.ckpt").write_text(str(cut_at.pop(run_dir.name)))
            raise Cut
        (run_dir / "checkpoints" / "last.ckpt").write_text("4")
        (run_dir / "summary.json").write_text(json.dumps({"seq_len": 1024, "metrics": {}}))

    monkeypatch.setattr(training.run, "train", fake_train)
    monkeypatch.setattr(training.faults, "checkpoint_step", lambda path: int(Path(path).read_text()))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        def fine_tune(*overrides: str):
            run = Reproduction(compose(config_name="reproduce", overrides=["budget=mini", f"work_dir={tmp_path}", *overrides]))
            run.pretrain()
            return run.finetune("pi", "PI", "pi", 4, 2)  # 4 steps

        cut_at["pi"] = 2
        with pytest.raises(Cut):
            fine_tune()
        last = str(tmp_path / "runs" / "pi" / "checkpoints" / "last.ckpt")
        stage = fine_tune()  # the same settings: on from step 2
        assert calls[-1] == ("pi", last) and stage.resumed_at == [2] and not stage.reused
        # Its time: the cut part up to its checkpoint, and the part that finished it.
        assert len(stage.spans) == 2 and stage.seconds == pytest.approx(sum(b - a for a, b in stage.spans))
        assert stage.spans[0][1] <= stage.spans[1][0]
        again = fine_tune()
        assert again.reused and again.resumed_at == [2] and again.spans == stage.spans
        from reproduce import _resumed_text

        assert _resumed_text(again) == " (cut, continued from step 2; its training ppl covers the steps since)"
        assert _resumed_text(type(again)("x", "never cut", [])) == ""

        # Cut twice: both steps are recorded.
        cut_at["pi"] = 1
        with pytest.raises(Cut):
            fine_tune("budget.finetune_lr=0.001")
        assert calls[-1] == ("pi", None)  # new settings: from the start
        cut_at["pi"] = 3
        with pytest.raises(Cut):
            fine_tune("budget.finetune_lr=0.001")
        assert fine_tune("budget.finetune_lr=0.001").resumed_at == [1, 3] and calls[-1] == ("pi", last)

        # Starts over: a cut run with other settings, a new base, a checkpoint at the last step or at step 0,
        # and reuse=false.
        for change, step in (("budget.finetune_lr=0.002", 2), ("budget.finetune_lr=0.003", 4),
                             ("budget.finetune_lr=0.004", 0)):
            cut_at["pi"] = step
            with pytest.raises(Cut):
                fine_tune(change)
            fine_tune("budget.finetune_lr=0.005" if step == 2 else change)
            assert calls[-1] == ("pi", None)
        cut_at["pi"] = 2
        with pytest.raises(Cut):
            fine_tune("budget.finetune_lr=0.006")
        fine_tune("budget.finetune_lr=0.006", "budget.pretrain_steps=31")  # a new base
        assert calls[-2:] == [("base", None), ("pi", None)]
        # reuse=false: the base itself, cut, starts over.
        cut_at["base"] = 10
        with pytest.raises(Cut):
            fine_tune("budget.pretrain_steps=32")
        with pytest.raises(Cut):  # the same settings: the base goes on from step 10 (and pi, new with it, is cut)
            cut_at["pi"] = 1
            fine_tune("budget.pretrain_steps=32")
        assert calls[-2:] == [("base", str(tmp_path / "runs" / "base" / "checkpoints" / "last.ckpt")), ("pi", None)]
        cut_at["base"] = 10
        with pytest.raises(Cut):
            fine_tune("budget.pretrain_steps=33")
        with pytest.raises(Cut):
            cut_at["pi"] = 1
            fine_tune("budget.pretrain_steps=33", "reuse=false")
        assert calls[-2:] == [("base", None), ("pi", None)]


# Runs the stages as the test above does, in a process of its own that the test then ends with SIGTERM.
INTERRUPTED_REPRODUCTION = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import pytest
from hydra import compose, initialize_config_dir
from reproduction.pipeline import Reproduction
from test_reproduce import _fake_stages

with pytest.MonkeyPatch.context() as monkeypatch:
    _fake_stages(monkeypatch)
    with initialize_config_dir(config_dir=sys.argv[1] + "/conf", version_base="1.3"):
        run = Reproduction(compose(config_name="reproduce", overrides=["budget=mini", "work_dir=" + sys.argv[2],
                                                                       "budget.parallel_stages=4"]))
        run.pretrain()
        run.run_stages(run.finetune_stages())
"""


def test_a_sigterm_ends_the_training_processes_with_the_reproduction(tmp_path: Path) -> None:
    """`timeout` (bench/run_gpu.sh) or a scheduler stops the reproduction: no training process may run on."""
    import signal
    import time

    env = {**os.environ, "FAKE_TRAIN_SECONDS": "120"}
    parent = subprocess.Popen([sys.executable, "-c", INTERRUPTED_REPRODUCTION, str(REPO), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_files = [tmp_path / "runs" / name / "pid" for name in ("pi", "ft", "ft_long", "pi_long")]
    deadline = time.time() + 60
    while not all(f.is_file() and f.read_text() for f in pid_files) and parent.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert parent.poll() is None, parent.communicate()[0][-3000:]
    children = [int(f.read_text()) for f in pid_files]
    try:
        parent.send_signal(signal.SIGTERM)  # to the reproduction alone, not its process group
        output = parent.communicate(timeout=30)[0]
        assert parent.returncode == 128 + signal.SIGTERM, output[-3000:]
        for pid in children:
            with pytest.raises(ProcessLookupError):  # ended and reaped by the reproduction
                os.kill(pid, 0)
    finally:  # where the test fails: no sleeping stand-in outlives it
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not any((tmp_path / "runs" / name / "reproduce_stage.json").exists() for name in ("pi", "ft", "ft_long", "pi_long"))


def test_the_number_of_stages_at_once_is_checked_before_any_stage(tmp_path: Path) -> None:
    from reproduction.pipeline import Reproduction
    from training.config import ConfigError

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for value in ("0", "true", "2.5"):
            cfg = compose(config_name="reproduce", overrides=["budget=mini", f"work_dir={tmp_path}", f"budget.parallel_stages={value}"])
            with pytest.raises(ConfigError, match="budget.parallel_stages=.* must be a whole number >= 1"):
                Reproduction(cfg)
    assert not any(tmp_path.iterdir())


def test_a_finished_evaluation_is_reused_until_its_rows_or_their_runs_change(tmp_path: Path, monkeypatch) -> None:
    import evaluation.run
    import training.run
    from evaluation.report import write_json
    from reproduction.pipeline import Reproduction

    evaluated = []

    def fake_train(cfg):
        run_dir = Path(cfg.run_dir)
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "last.ckpt").write_text("weights")
        (run_dir / "summary.json").write_text(json.dumps({"seq_len": 128, "metrics": {}}))

    def fake_evaluate(cfg):  # writes results.json as evaluate() does: int windows, a non-finite perplexity
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results = {"ppl_table": {row.name: {128: 40.0 + len(evaluated), 1024: float("inf")} for row in cfg.variants},
                   "ppl": {row.name: {128: {"ppl": float("nan"), "tokens": 3}} for row in cfg.variants}}
        write_json(out / "results.json", results)
        evaluated.append(out.name)
        return results

    monkeypatch.setattr(training.run, "train", fake_train)
    monkeypatch.setattr(evaluation.run, "evaluate", fake_evaluate)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        def run_all(*overrides: str, rows: int = 1, reuse_evaluation: bool = True) -> tuple[dict, tuple[float, bool]]:
            run = Reproduction(compose(config_name="reproduce", overrides=["budget=mini", f"work_dir={tmp_path}", *overrides]))
            run.pretrain()
            run.cfg.reuse = reuse_evaluation  # the base stays reused either way
            variants = [{"name": f"row {i}", "ckpt": str(run.checkpoint("base"))} for i in range(rows)]
            results = run.evaluate("extensions", ["ppl"], variants)
            return results, run.evaluations["extensions"]

        first, (seconds, reused) = run_all()
        assert not reused and seconds >= 0
        # Read back from the file, also when it ran just now: windows are ints, "not finite" is inf.
        assert first["ppl_table"] == {"row 0": {128: 40.0, 1024: float("inf")}}
        assert first["ppl"]["row 0"][128] == {"ppl": float("inf"), "tokens": 3}
        assert run_all() == (first, (seconds, True)) and evaluated == ["extensions"]  # unchanged: reused, its time kept
        run_all(rows=2)  # another row: evaluated again
        assert evaluated == ["extensions"] * 2
        run_all("budget.passkey_trials=3", rows=2)  # any setting of the composed evaluate config counts
        assert evaluated == ["extensions"] * 3
        run_all(rows=2, reuse_evaluation=False)
        assert evaluated == ["extensions"] * 4
        run_all("budget.pretrain_steps=31", rows=2)  # a new base: its evaluations are stale
        assert evaluated == ["extensions"] * 5
        monkeypatch.setattr("reproduction.pipeline.evaluation_code", lambda: "edited")  # new evaluation code
        run_all("budget.pretrain_steps=31", rows=2)
        assert evaluated == ["extensions"] * 6
        # A damaged record, or none (cut before it was written): evaluated again, in an emptied folder.
        record = tmp_path / "eval" / "extensions" / "reproduce_eval.json"
        record.write_text('{"key": ')
        assert run_all("budget.pretrain_steps=31", rows=2)[0]["ppl_table"]["row 1"][128] == 46.0
        record.unlink()
        (tmp_path / "eval" / "extensions" / "half-written.png").write_text("")
        assert run_all("budget.pretrain_steps=31", rows=2)[0]["ppl_table"]["row 1"][128] == 47.0
        assert evaluated == ["extensions"] * 8 and record.is_file()
        assert not (tmp_path / "eval" / "extensions" / "half-written.png").exists()


@pytest.mark.slow
def test_the_whole_pipeline_in_miniature(tmp_path: Path) -> None:
    """budget=mini end to end through the CLI: every stage, every evaluation, the report."""
    report = tmp_path / "report"
    command = [sys.executable, "reproduce.py", "budget=mini", f"work_dir={tmp_path / 'work'}", f"report_dir={report}"]
    env = {**os.environ, "PI_LLAMA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (report / "README.md").read_text()
    for section in ("## Claims", "## Overfitting check", "| RoPE base at L = 128 | L |", "## The base by pretraining step", "Table 1 analog", "Table 3 analog",
                    "Table 4 analog", "## Passkey inside L", "| base read with PI at scale 8, no fine-tuning |",
                    "Ablation beyond the paper", "Figure 2 analog"):
        assert section in text
    for figure in ("ppl_by_window.png", "by_step.png", "passkey.png", "figure2_fit.png", "by_step_ablation.png"):
        assert (report / figure).stat().st_size > 1000
    # The claims' ratios and their bootstrap intervals over the test text: 3 plays cut to 2048 tokens make 3
    # blocks, too few for an interval, and the report says so.
    assert "How much the test text decides the ratios behind claims 3 and 5" in text
    assert ("- claim 3, at 8L: PI, 4 steps / FT (direct), 8 steps: no interval (3 blocks, fewer than the 20 an "
            "interval needs)") in text
    assert "- claim 5, at L: PI, 4 steps / RoPE (base), no fine-tuning: no interval (3 blocks" in text
    results = json.loads((report / "results.json").read_text())
    assert [(r["claim"], r["ratio"], r["problem"][:8]) for r in results["claims_sampling"]] == [(3, None, "3 blocks")] * 2 + [(5, None, "3 blocks")]
    assert len(results["claims"]) == 5 and all(c["verdict"] in (HELD, PARTLY, NOT_HELD, UNTESTABLE) for c in results["claims"])
    assert set(results["ppl"]) >= {"RoPE (base), no fine-tuning", "PI, 4 steps", "FT (direct), 8 steps", "PI, 8 steps"}
    assert [row["step"] for row in results["by_step"]["PI, 4 steps"]] == [0, 2, 4]
    ablation = results["ablation_long_passkey"]
    assert set(ablation["ppl"]) == set(ablation["passkey"]) == set(ablation["by_step"]) == {
        f"{run}, {steps} steps, passkeys to L' = 1024" for run in ("PI", "FT (direct)") for steps in (4, 8)}
    assert "data.passkey_max_tokens=1024" in results["stages"]["pi_lpk"]["command"]
    # A second run reuses every finished stage and evaluation, and writes the same report.
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = again.stdout + again.stderr
    assert again.returncode == 0 and log.count("reusing the finished run") == 9, log[-3000:]
    # The base's three, two per fine-tune (at L' and inside L), the ablation's.
    assert log.count("reusing the finished evaluation") == 3 + 2 * 4 + 1, log[-3000:]
    rerun = json.loads((report / "results.json").read_text())
    assert {k: rerun[k] for k in ("ppl", "passkey", "claims", "attention")} == {k: results[k] for k in ("ppl", "passkey", "claims", "attention")}
    assert rerun["timings_s"] == results["timings_s"]  # each evaluation's time from when it ran


@pytest.mark.slow
def test_the_gpu_budgets_trainer_settings_run_the_pipeline_on_cpu_through_the_device_script(tmp_path: Path) -> None:
    """`bash bench/run_gpu.sh reproduce` (the lent GPU's call for this issue) with budget=gpu's trainer group
    (bf16-mixed, chunked loss) and overrides (no activation checkpointing), the fused AdamW and bf16
    evaluation, on the mini budget's sizes and the CPU: the GPU's reproduction call should not be the first
    run of that path."""
    args = ('budget=mini budget.trainer=gpu budget.dtype=bfloat16 budget.long_passkey_ablation=false budget.parallel_stages=4 '
            'budget.trainer_overrides=["trainer.accelerator=cpu","optim.fused=true","trainer.activation_checkpointing=none"]')
    out = tmp_path / "out"
    env = {**os.environ, "PI_LLAMA_CACHE": str(tmp_path / "cache"), "OUT": str(out), "TMPDIR": str(tmp_path),
           "RUN_GPU_REPRODUCE_ARGS": args,
           "RUN_GPU_REPRODUCE_WORK": str(tmp_path / "reproduce-work")}
    # An earlier call's finished evaluation that this call does not use (another setting or other code) on a
    # warm machine: never packed as this call's.
    stale = tmp_path / "reproduce-work" / "eval" / "from-an-earlier-call"
    stale.mkdir(parents=True)
    (stale / "results.json").write_text("{}")
    (stale / "reproduce_eval.json").write_text('{"key": {}, "seconds": 1.0}')
    done = subprocess.run(["bash", "bench/run_gpu.sh", "reproduce"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + (out / "reproduce.log").read_text()[-3000:]
    # The device tool returns at most 8 files, none deeper than two folders: everything comes back packed in
    # one archive, beside the log and the report's text.
    back = sorted(path.name for path in out.iterdir())
    assert back == ["reproduce.log", "reproduction-gpu.md", "reproduction-gpu.tgz"], back
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with tarfile.open(out / "reproduction-gpu.tgz") as archive:
        archive.extractall(unpacked, filter="data")
    report = unpacked / "report"
    results = json.loads((report / "results.json").read_text())
    pi_command = results["stages"]["pi"]["command"]
    assert "trainer=gpu" in pi_command and "optim.fused=true" in pi_command
    assert len(results["claims"]) == 5
    text = (report / "README.md").read_text()
    assert (out / "reproduction-gpu.md").read_text() == text
    # The report's command line can be pasted into a shell: the override with a list is quoted.
    assert "'budget.trainer_overrides=[\"trainer.accelerator=cpu\",\"optim.fused=true\",\"trainer.activation_checkpointing=none\"]'" in text
    # Only the report, the evaluations' files and each stage's small records come back from the device: the
    # checkpoints stay in its work folder.
    assert not list(unpacked.rglob("*.ckpt")) and (tmp_path / "reproduce-work" / "runs" / "pi" / "checkpoints" / "last.ckpt").exists()
    for stage in ("base", "pi", "ft", "ft_long", "pi_long"):
        for record in ("summary.json", "reproduce_stage.json", "eval_by_step.json", "logs/metrics.csv"):
            assert (unpacked / "runs" / stage / record).is_file(), (stage, record)
    # As budget=gpu does, the four fine-tunes ran side by side, each a train.py process whose output came back.
    spans = []
    for stage in ("pi", "ft", "ft_long", "pi_long"):
        assert (unpacked / "runs" / stage / "process.log").stat().st_size > 0
        record = json.loads((unpacked / "runs" / stage / "reproduce_stage.json").read_text())
        spans += record["spans"]
    assert max(start for start, _ in spans) < min(finish for _, finish in spans)  # all four were running at one moment
    assert "Up to 4 fine-tunes ran at once" in text
    assert (unpacked / "eval" / "extensions_base" / "results.json").is_file()
    assert (unpacked / "eval" / "inside_window_pi_long" / "results.json").is_file()
    assert not (unpacked / "eval" / "from-an-earlier-call").exists()
    # The same call again (a cut run's second call): every stage and evaluation reused, all packed again.
    again = subprocess.run(["bash", "bench/run_gpu.sh", "reproduce"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=900)
    log = (out / "reproduce.log").read_text()
    assert again.returncode == 0 and log.count("reusing the finished evaluation") == 3 + 2 * 4, log[-3000:]
    with tarfile.open(out / "reproduction-gpu.tgz") as archive:
        names = archive.getnames()
    assert "eval/extensions_pi/results.json" in names and "report/README.md" in names
