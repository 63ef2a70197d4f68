"""Reproduce the paper's findings at small scale, in one command, with a report.

    python reproduce.py                  # CPU: the bundled 5M model, L = 128 -> L' = 1024
    python reproduce.py budget=gpu       # one H100/H200: a ~28M model, L = 256 -> 2048, bf16 (README)
    python reproduce.py budget=mini      # the pipeline in a few minutes (numbers meaningless)

1. Pretrain a RoPE base at window L on the bundled corpus, with a share of answered passkey
   prompts (each <= L tokens) so that it can retrieve within its own window.
2. Extend it to L' = scale x L: PI fine-tuning (N steps), direct fine-tuning with extrapolated
   positions (N and 10N steps), and without fine-tuning: the base read with plain RoPE, PI,
   NTK-aware, dynamic NTK and YaRN. Beyond the paper's design: PI with 10N steps too, and (where
   the budget enables it) the four fine-tunes again with passkey prompts up to L' in their data.
3. Evaluate all of them: sliding-window perplexity at L..L' (test split), passkey k_max, the
   by-step table from the fine-tuning runs (validation split), the attention-bound analysis.
4. Write report_dir/README.md (default work_dir/report; tables laid out like the paper's, its numbers beside ours, and a
   verdict on each claim), PNG plots and results.json.
Settings: conf/reproduce.yaml and conf/budget/. Checkpoints stay in work_dir (git-ignored).
"""

from __future__ import annotations

import datetime
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("reproduce")


@hydra.main(version_base="1.3", config_path="conf", config_name="reproduce")
def main(cfg: DictConfig) -> None:
    from data import DataError
    from evaluation.errors import EvaluationError
    from model.checkpoints import CheckpointError
    from model.position import PositionError
    from reproduction.pipeline import StageError
    from training.config import ConfigError
    from training.faults import NonFiniteLossError

    try:
        reproduce(cfg)
    except (ConfigError, DataError, CheckpointError, EvaluationError, PositionError, NonFiniteLossError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def reproduce(cfg: DictConfig) -> Path:
    """Run every stage (reusing finished ones) and write the report; returns the report folder."""
    from reproduction.pipeline import Reproduction, evaluation_name

    run = Reproduction(cfg)
    run.pretrain()
    # All of them start from the base alone: with budget.parallel_stages > 1 they run side by side, and the
    # evaluations of the base, then of each fine-tune as it finishes, meanwhile (final_evaluations).
    fine_tune_plan = run.finetune_stages()
    ablation_plan = run.long_passkey_ablation_stages() if cfg.budget.get("long_passkey_ablation", False) else []
    fine_tunes, ablation_stages = [s.name for s in fine_tune_plan], [s.name for s in ablation_plan]
    run.run_stages(fine_tune_plan + ablation_plan, then=run.final_evaluations(fine_tunes, ablation_stages))

    extensions, inside = (run.merged([evaluation_name(table, part) for part in ("base", *fine_tunes)], rows)
                          for table, rows in (("extensions", run.extension_variants()),
                                              ("inside_window", run.inside_window_variants())))
    ablation = {**run.results["ablation_long_passkey"], "stages": ablation_stages} if ablation_stages else None
    timings = {name: stage.seconds for name, stage in run.stages.items()}
    # Each stage's and evaluation's own run time, also when reused from an earlier call; stages and evaluations
    # that ran at once count their shared time once in the total.
    timings["evaluation"] = sum(seconds for seconds, _ in run.evaluations.values())
    timings["total"] = run.wall_seconds()
    return write_report(cfg, run, extensions, inside, run.results["attention"], timings, ablation)


def write_report(cfg: DictConfig, run: Any, extensions: dict[str, Any], inside: dict[str, Any],
                 attention: dict[str, Any], timings: dict[str, float], ablation: dict[str, Any] | None = None) -> Path:
    """`inside`: the evaluation of run.inside_window_variants (passkey at window L, perplexity at L)."""
    from evaluation import report as tables
    from evaluation.callback import default_document_cut
    from evaluation.run import stride_text
    from model.checkpoints import atomic_directory
    from reproduction import report
    from reproduction.claims import Numbers, judge_all
    from reproduction.pipeline import BASE_ROW, NO_FINE_TUNING, device_description

    L, long_window, windows = run.window, run.long_window, run.windows
    base_passkey = inside["passkey"][BASE_ROW]
    stages = run.stages
    pi, ft, ft_long = stages["pi"].title, stages["ft"].title, stages["ft_long"].title
    ppl = extensions["ppl_table"]
    k_max = {name: result["k_max"] for name, result in extensions["passkey"].items()}
    numbers = Numbers(
        window=L, long_window=long_window, ppl=ppl, base=NO_FINE_TUNING[0][0], pi=pi, fine_tuned=[ft, ft_long],
        k_max=k_max, largest_k=max(r["distances"][-1] for r in extensions["passkey"].values()),
        base_k_max_at_window=base_passkey["k_max"], base_largest_k_at_window=base_passkey["distances"][-1],
    )
    claims = judge_all(numbers)
    # The ratios claims 3 and 5 are judged on, for the bootstrap over the test text under the claims.
    comparisons = [report.Comparison(3, pi, name, long_window) for name in (ft, ft_long)]
    comparisons.append(report.Comparison(5, pi, numbers.base, L))
    sampling = report.sampling_ratios(extensions["ppl"], comparisons, cfg.seed)
    pi_long = stages["pi_long"].title
    by_step = {pi: run.by_step("pi"), ft: run.by_step("ft"), ft_long: run.by_step("ft_long"), pi_long: run.by_step("pi_long")}
    corpus = run.train_tokens()
    fine_tunes = [stages[name] for name in ("pi", "ft", "ft_long", "pi_long")]
    base_stage = stages["base"]
    fits = [report.judge_fit(base_stage.title, L, report.metrics_curve(run.metrics_log("base")),
                             run.tokens_seen("base") / corpus, base_stage.summary.get("metrics", {}).get("train/ppl"))]
    fits += report.fit_check(by_step, long_window, passes={s.title: run.tokens_seen(s.name) / corpus for s in fine_tunes},
                             train_ppl={s.title: s.summary.get("metrics", {}).get("train/ppl") for s in fine_tunes})
    device = device_description(str(cfg.budget.trainer))
    today = datetime.date.today().isoformat()
    budget = OmegaConf.to_container(cfg.budget, resolve=True)
    command = _command(budget)

    with atomic_directory(Path(str(cfg.report_dir)), force=True) as out:
        eval_dir = run.work / "eval"
        # The tables at L' merge several evaluations (one per run, each made once its run finished): drawn here.
        stride = stride_text(OmegaConf.create(extensions["config"]["ppl"]))
        tables.plot_passkey(out / "passkey.png", extensions["passkey"])
        figures = {
            # no plot when no row has a finite perplexity
            "ppl": "ppl_by_window.png" if tables.plot_perplexity(out / "ppl_by_window.png", windows, ppl, stride) else "",
            "passkey": "passkey.png",
            "attention": report.copy_figure(eval_dir / "attention" / "attention.png", out / "figure2_fit.png"),
        }
        report.plot_by_step(out / "by_step.png", by_step, long_window)
        ablation_text, ablation_json = "", None
        if ablation is not None:
            ablation_by_step = {stages[name].title: run.by_step(name) for name in ablation["stages"]}
            report.plot_by_step(out / "by_step_ablation.png", ablation_by_step, long_window)
            reference = [stages[name].title for name in ("pi", "ft", "ft_long", "pi_long")]
            ablation_text = report.long_passkey_section(
                L, long_window, windows, budget, reference_rows=reference, ablation_rows=list(ablation_by_step),
                ppl={**ppl, **ablation["ppl_table"]}, passkey={**extensions["passkey"], **ablation["passkey"]},
                by_step=ablation_by_step, figure="by_step_ablation.png")
            ablation_json = {"ppl": ablation["ppl_table"], "passkey": ablation["passkey"], "by_step": ablation_by_step}
        base_figures = [f for f in attention["figures"] if f.startswith("attention_")]
        if base_figures:
            figures["base_qk"] = report.copy_figure(eval_dir / "attention" / base_figures[0], out / "figure2_base_qk.png")
        stage_rows = [[s.name, s.title, f"`{s.command}`", f"{run.tokens_seen(s.name) / 1e6:.2f}M ({run.tokens_seen(s.name) / corpus:.2f})",
                       f"{s.seconds:.0f}" + (" (reused)" if s.reused else "") + _resumed_text(s),
                       f"{tables.format_ppl(_val_ppl(s.summary))} at {s.summary['seq_len']}"] for s in stages.values()]
        verdicts = ", ".join(f"claim {c.number} {c.verdict}" for c in claims)
        text = f"""# Position Interpolation, reproduced at small scale ({budget['name']})

`{command}` on {today}, {device}. Total {timings['total'] / 60:.1f} min (evaluation {timings['evaluation'] / 60:.1f} min){_reused_text(run)}.
Seed {cfg.seed}. Base window L = {L}, extended window L' = {long_window} (scale {cfg.scale}).

**Verdicts:** {verdicts}.

{report.fit_warning(fits)}## Setup

- Model: `model={budget['model']}` ({_shape(run)}), trained with `trainer={budget['trainer']}`{_extra_overrides(budget)} on the bundled Shakespeare corpus
  (36 train / 3 validation / 3 test plays, split by play).
- Passkey mix: {_share_text(cfg, L)}
- Fine-tuning recipe (all extensions): AdamW betas 0.9/0.95, weight decay 0, 20 warmup steps from 10% of
  lr {budget['finetune_lr']}, then constant; batch {budget['finetune_batch_size']} x {long_window} tokens.
  N = {budget['finetune_steps']} (the paper: 1000 for PI), the long direct fine-tune {budget['long_finetune_steps']} steps
  (the paper: 10000). A PI fine-tune of {budget['long_finetune_steps']} steps is added beyond the paper's design; the
  verdicts use the paper's pairs (PI {budget['finetune_steps']} steps against direct fine-tuning).
- Nothing was tuned on the test plays: the by-step tables use the validation plays, the final tables the test plays.

The train split holds {corpus / 1e6:.2f}M tokens; "tokens (passes)" counts what each stage trained on.

{tables.markdown_table(["stage", "what", "command", "tokens (passes)", "seconds", "final val ppl (window)"], stage_rows)}

{_at_once_text(run)}## Claims

{report.claims_section(claims)}{report.sampling_text(sampling, L)}

## Overfitting check

{report.fit_section(fits, L, long_window)}

{_base_by_step_text(run, budget)}## Table 1 analog: perplexity by evaluation window

Sliding window with stride min(256, W/8) at window W (the paper's 256 at its shortest window, 2048: every
scored token is read with at least 7/8 of the window before it), the test plays{_ppl_cut(budget)}. "No fine-tuning" rows read the RoPE base
with that scaling at scale {cfg.scale}.{_early_stopping_text(run)}

{report.ppl_section(windows, L, ppl)}

{f"![perplexity by window]({figures['ppl']})" if figures['ppl'] else "(No perplexity plot: no row has a finite perplexity.)"}

## Table 3 analog: by fine-tuning step

Validation plays ({budget['eval_documents']} documents, first {default_document_cut(windows)} tokens each; the same stride rule), passkey with
{budget['eval_passkey_trials']} trials at each of 8 distances up to L'. Step 0 is the base read with the run's encoding.
The paper: {report.PAPER_BY_STEP}

{report.by_step_section(by_step, windows, L)}

![by step](by_step.png)

## Table 4 analog: passkey retrieval

{budget['passkey_trials']} random keys at each of {budget['passkey_positions']} distances up to the window; k_max is the
largest k such that every k' <= k succeeds in at least 20% of the trials. The paper: {report.PAPER_PASSKEY}

{report.passkey_section(extensions['passkey'], BASE_ROW, base_passkey)}

![passkey]({figures['passkey']})

## Passkey inside L: the base, PI's compression alone, and the fine-tunes

{report.inside_window_section(inside["passkey"], inside["ppl_table"], L, budget['passkey_trials'], budget['passkey_positions'])}

{ablation_text}## Figure 2 analog: attention-score bounds

The paper: {report.PAPER_FIGURE_2}

{report.attention_section(attention['attention'], BASE_ROW)}

![Figure 2 fit]({figures['attention']})
{f"![base q/k]({figures['base_qk']})" if 'base_qk' in figures else ''}

Raw numbers: `results.json`. Checkpoints and per-run logs: `{cfg.work_dir}` (not committed).
"""
        (out / "README.md").write_text(text)
        tables.write_json(out / "results.json", {
            "command": command, "date": today, "device": device, "settings": OmegaConf.to_container(cfg, resolve=True),
            "timings_s": timings, "stages": {s.name: {"title": s.title, "command": s.command, "summary": _relative(s.summary)}
                                             for s in stages.values()},
            "ppl": ppl, "passkey": extensions["passkey"], "passkey_base_at_L": base_passkey, "passkey_inside_L": inside["passkey"], "ppl_inside_L": inside["ppl_table"], "by_step": by_step,
            "attention": attention["attention"], "claims": [c.__dict__ for c in claims], "claims_sampling": sampling,
            "fit": [f.__dict__ for f in fits], "base_by_step": run.base_by_step(),
            **({"ablation_long_passkey": ablation_json} if ablation_json is not None else {}),
        })
    log.info("report: %s (%s)", Path(str(cfg.report_dir)) / "README.md", verdicts)
    print(f"report written to {Path(str(cfg.report_dir)).resolve() / 'README.md'}: {verdicts}")
    return Path(str(cfg.report_dir))


def _base_by_step_text(run: Any, budget: dict[str, Any]) -> str:
    """The base's pretraining curve at L (perplexity and passkey k_max by step), where the budget evaluated it."""
    from evaluation.callback import default_document_cut
    from reproduction import report

    rows = run.base_by_step()
    if rows is None:
        return ""
    return (f"## The base by pretraining step\n\nValidation plays ({budget['eval_documents']} documents, first "
            f"{default_document_cut([run.window])} tokens "
            f"each) at L = {run.window}, passkey with {budget['eval_passkey_trials']} trials at each of 8 distances up to L, "
            f"every {budget['pretrain_eval_every_n_steps']} steps: when the base learns to retrieve, and whether its "
            "perplexity has stopped falling before the last step.\n\n"
            + report.by_step_section({run.stages["base"].title: rows}, [run.window], run.window) + "\n\n")


def _resumed_text(stage: Any) -> str:
    """A stage that was cut and continued from its last checkpoint: its seconds count the work kept, and its
    summary's training perplexity (an epoch aggregate, not in the checkpoint) only the steps after the last cut."""
    if not stage.resumed_at:
        return ""
    return (f" (cut, continued from step {', then '.join(map(str, stage.resumed_at))}; its training ppl covers the "
            "steps since)")


def _at_once_text(run: Any) -> str:
    """Where stages, or stages and evaluations, overlapped in time, what their seconds mean."""
    at_once, meanwhile = run.most_at_once(), run.evaluation_seconds_while_training()
    text = ""
    if at_once >= 2:
        text = (f"Up to {at_once} fine-tunes ran at once (`budget.parallel_stages`), each its own `train.py` process on "
                "the same device: a stage's seconds are its own wall time, from its process's start (about 5 s of it "
                "importing Lightning) to its end (for a stage cut and continued, the work kept), the device shared with "
                "the others and with the evaluations made meanwhile. "
                f"Time they shared counts once in the total: the stages ran for {run.stages_wall_seconds():.0f} s. ")
    if meanwhile >= 1:
        text += ("Each evaluation ran in `reproduce.py`'s own process as soon as the runs it reads had finished, "
                 f"{meanwhile:.0f} s of them while fine-tunes still trained (counted once in the total too). ")
    return text.rstrip() + "\n\n" if text else ""


def _early_stopping_text(run: Any) -> str:
    early = run.best_variants(["ft_long", "pi_long"])
    if not early:
        return ""
    one = len(early) == 1
    return (f" {'The row' if one else 'The rows'} \"{_names(early)}\" {'reads that' if one else 'read each'} "
            "fine-tune's checkpoint with the lowest validation loss at L' (validation plays, checked every "
            "`trainer.val_check_interval` steps) instead of its last: early stopping, which the paper's protocol "
            f"does not use; no verdict uses {'it' if one else 'them'}.")


def _names(variants: list[dict[str, Any]]) -> str:
    return '" and "'.join(v["name"] for v in variants)


def _relative(value: Any) -> Any:
    """Paths under the current folder written relative to it: the committed report names no machine's folders."""
    if isinstance(value, dict):
        return {k: _relative(v) for k, v in value.items()}
    prefix = str(Path.cwd()) + "/"
    return value.removeprefix(prefix) if isinstance(value, str) else value


def _val_ppl(summary: dict[str, Any]) -> float | None:
    return summary.get("metrics", {}).get("val/ppl")


def _reused_text(run: Any) -> str:
    """How much of the run was reused from earlier runs in work_dir (the times above count it as it took then)."""
    stages = sum(stage.reused for stage in run.stages.values())
    evaluations = sum(reused for _, reused in run.evaluations.values())
    if not stages and not evaluations:
        return ""
    return (f"; {stages} of {len(run.stages)} stages and {evaluations} of {len(run.evaluations)} evaluations"
            " were reused from earlier runs with the same settings (stages: the same composed training config and"
            " data, not compared on the training code), their times counted as they ran then")


def _command(budget: dict[str, Any]) -> str:
    """The command line of this run: its Hydra overrides, or the budget alone outside hydra.main."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        # Paths only say where the files went; everything else changes what was measured.
        task = HydraConfig.get().overrides.task
        kept = [o for o in task if not o.split("=", 1)[0].endswith(("work_dir", "report_dir"))]
        return " ".join(["python reproduce.py", *map(shlex.quote, kept)])
    return "python reproduce.py" + ("" if budget["name"] == "cpu" else f" budget={budget['name']}")


def _extra_overrides(budget: dict[str, Any]) -> str:
    extra = list(budget.get("trainer_overrides") or [])
    return f" and `{' '.join(map(str, extra))}`" if extra else ""


def _shape(run: Any) -> str:
    from model.checkpoints import load_pretrained

    pretrained = load_pretrained(run.checkpoint("base"))
    args, params = pretrained.args, pretrained.build_model(pretrained.position).num_parameters()
    return (f"dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads ({args.n_kv_heads} kv), "
            f"vocab {args.vocab_size}, {params / 1e6:.1f}M parameters")


def _share_text(cfg: DictConfig, window: int) -> str:
    if not cfg.budget.passkey_share:
        return "none: the training data is the corpus alone."
    return (f"{cfg.budget.passkey_share:.0%} of the training tokens (pretraining and fine-tuning) are answered passkey prompts "
            f"built exactly as the evaluation's prompts (data/synthetic_passkey.py), each at most L = {window} tokens "
            "long and placed whole inside one training window, with the key-to-question distance uniform over what "
            "fits, so the base learns to retrieve within its own window only. Evaluation keys are drawn independently.")


def _ppl_cut(budget: dict[str, Any]) -> str:
    cut = budget.get("ppl_max_tokens_per_document")
    return f" (first {cut} tokens of each)" if cut else " (whole)"


if __name__ == "__main__":
    main()
