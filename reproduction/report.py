"""The reproduction report: the paper's Tables 1, 3, 4 and Figure 2 laid out with our numbers beside theirs."""

from __future__ import annotations

import csv
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evaluation import report as tables  # noqa: E402
from evaluation.attention import pair_medians  # noqa: E402
from evaluation.perplexity import BLOCK_TOKENS  # noqa: E402
from evaluation.uncertainty import blocks_of, pairing_problem, ppl_ratio  # noqa: E402
from reproduction.claims import Claim, multiple  # noqa: E402

# The paper's numbers (LLaMA 7B, L = 2048, PG-19, stride 256), by window as a multiple of L.
PAPER_PPL = {
    "base, no fine-tuning": {1: "7.20", 2: "> 1000", 4: "> 1000", 8: "> 1000"},
    "FT to 4L (8192), 10000 steps": {1: "7.21", 2: "7.34", 4: "7.69"},
    "PI to 4L (8192), 1000 steps": {1: "7.13", 2: "6.96", 4: "6.95"},
    "PI to 8L (16384), 1000 steps": {1: "7.11", 2: "6.93", 4: "6.82", 8: "6.83"},
}
PAPER_BY_STEP = "PI to 8192, perplexity at 8192 by step: 16.10 at step 0, 7.12 at 200, 6.95 at 1000."
PAPER_PASSKEY = ("PI to 8192: k_max = 8192 (the whole window) after 200 steps; direct FT to 8192: "
                 "k_max = 1792 after 200 steps and 2560 after 10000 (L = 2048).")
PAPER_FIGURE_2 = ("d = 128, L = 2048: the least-squares fit stays within about [-1, 1] on [0, L] and exceeds 8000 "
                  "beyond L; at fractional positions inside [0, L] it stays smooth; the interpolation bound is ~600x "
                  "tighter than the extrapolation bound.")
ATTENTION_ROWS = (
    ("inside_max", "max |a(s)|, integers in [0, L]"),
    ("interpolation_max", "max |a(s)|, fractional s in [0, L]"),
    ("extrapolation_max", "max |a(s)|, integers in (L, {extent}L]"),
    ("bound_ratio_min", "extrapolation / interpolation bound, min over s"),
    ("bound_ratio_at_b_equal_d", "bound ratio where B(s) = d"),
)


def ppl_section(windows: Sequence[int], base: int, ppl: Mapping[str, Mapping[int, float]]) -> str:
    header = ["model", *(f"{multiple(w, base)} = {w}" for w in windows)]
    # A window a run was not read at is "-" (format_ppl would print a missing value as "inf", a breakdown).
    ours = [[name, *(tables.format_ppl(by_window[w]) if w in by_window else "-" for w in windows)]
            for name, by_window in ppl.items()]
    # The paper has whole multiples of its L only; a window of 2.5L has no paper number beside it.
    paper = [[name, *(values.get(w // base, "-") if w % base == 0 else "-" for w in windows)] for name, values in PAPER_PPL.items()]
    return (tables.markdown_table(header, ours)
            + "\n\nThe paper (LLaMA 7B, L = 2048, PG-19; columns are the same multiples of L):\n\n"
            + tables.markdown_table(["model", *(multiple(w, base) for w in windows)], paper))


def by_step_section(runs: Mapping[str, Sequence[Mapping[str, Any]]], windows: Sequence[int], base: int) -> str:
    """Perplexity at each window and passkey k_max by fine-tuning step, one table per run."""
    parts = []
    for title, rows in runs.items():
        header = ["step", *(f"ppl {multiple(w, base)}" for w in windows), "passkey k_max"]
        # A window the row has no value for is "-"; a value stored as null (not finite) reads "inf".
        body = [[row["step"], *(tables.format_ppl(row[f"ppl_{w}"]) if f"ppl_{w}" in row else "-" for w in windows),
                 row.get("passkey_k_max", "-")] for row in rows]
        parts.append(f"**{title}**\n\n" + tables.markdown_table(header, body))
    return "\n\n".join(parts)


def passkey_section(results: Mapping[str, Mapping[str, Any]], base_name: str, base_result: Mapping[str, Any]) -> str:
    rows = [[base_name + " (its own window L)", base_result["window"], base_result["distances"][-1], base_result["k_max"],
             f"{_mean(base_result['success_rates']):.2f}"]]
    rows += [[name, r["window"], r["distances"][-1], r["k_max"], f"{_mean(r['success_rates']):.2f}"] for name, r in results.items()]
    return tables.markdown_table(["model", "window", "largest k tested", "k_max", "mean success"], rows)


def inside_window_section(results: Mapping[str, Mapping[str, Any]], ppl: Mapping[str, Mapping[int, float]], window: int,
                          trials: int, positions: int) -> str:
    """Passkey prompts of L tokens (and perplexity at L) for the base, the base read with PI at growing
    scales, and the fine-tunes."""
    rows = [[name, _ppl_cell(ppl.get(name, {}).get(window)), r["distances"][-1], r["k_max"],
             f"{_mean(r['success_rates']):.2f}", _digits_in_place(r), _first_answer(r)]
            for name, r in results.items()]
    return (f"Beyond the paper, which reports no such table. Prompts of L = {window} tokens, so no key is further back, "
            f"in tokens, than in pretraining; {trials} keys at each of up to {positions} distances, and perplexity at "
            f"L on the test plays. The rows \"base read with PI\" compress the base's positions and nothing else: no "
            "weight has changed. The fine-tunes are read with their own encoding. A row with k_max 0 here already "
            "fails at the shortest distance inside L, so its failure at L' is not about the distance alone. \"Digits "
            "in place\" is the share of the key's five digits that a wrong answer has in the right place (about 0.1 "
            "for a random number): high values are near-copies of the key.\n\n"
            + tables.markdown_table(["model", "ppl at L", "largest k tested", "k_max", "mean success",
                                     "wrong answers: digits in place", "answer to the first key at the shortest k"], rows))


def _digits_in_place(result: Mapping[str, Any]) -> str:
    """Over the wrong answers: the share of the key's characters the answer has at the same index.

    At most (len(key) - 1) / len(key) for a wrong answer (all in place would be right); "-" where
    every answer was right, "n/a" for results written before the keys were kept.
    """
    if not result.get("keys"):
        return "n/a"
    pairs = [(str(answer).strip(), key) for answers, keys, ok in zip(result["answers"], result["keys"], result["successes"])
             for answer, key, right in zip(answers, keys, ok) if not right]
    if not pairs:
        return "-"
    return f"{_mean([sum(a == b for a, b in zip(answer, key)) / len(key) for answer, key in pairs]):.2f}"


def _first_answer(result: Mapping[str, Any]) -> str:
    """The model's continuation for the first key at the shortest distance, quoted, with the key, marked right or wrong."""
    answers, successes, keys = result.get("answers"), result.get("successes"), result.get("keys")
    if not answers or not answers[0]:
        return "-"
    text = " ".join(str(answers[0][0]).split())  # newlines would break the table row
    text = text if len(text) <= 24 else text[:23] + "..."
    key = f" for {keys[0][0]}" if keys and keys[0] else ""
    return f"\"{text}\"{key} ({'right' if successes[0][0] else 'wrong'})"


def success_within_and_beyond(result: Mapping[str, Any], window: int) -> tuple[float | None, float | None]:
    """Mean passkey success over the distances k <= L, and over k > L (None where none was tested)."""
    pairs = list(zip(result["distances"], result["success_rates"]))
    within = [rate for k, rate in pairs if k <= window]
    beyond = [rate for k, rate in pairs if k > window]
    return (_mean(within) if within else None), (_mean(beyond) if beyond else None)


def long_passkey_section(window: int, long_window: int, windows: Sequence[int], budget: Mapping[str, Any],
                         reference_rows: Sequence[str], ablation_rows: Sequence[str],
                         ppl: Mapping[str, Mapping[int, float]], passkey: Mapping[str, Mapping[str, Any]],
                         by_step: Mapping[str, Sequence[Mapping[str, Any]]], figure: str) -> str:
    """The ablation beyond the paper: fine-tunes whose passkey prompts reach L', beside the paper-setting ones."""

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = []
    for name in [*reference_rows, *ablation_rows]:
        within, beyond = success_within_and_beyond(passkey[name], window)
        rows.append([name, *(tables.format_ppl(ppl[name][w]) if w in ppl[name] else "-" for w in (window, long_window)),
                     passkey[name]["k_max"], rate(within), rate(beyond)])
    table = tables.markdown_table(
        ["model", f"ppl L = {window}", f"ppl L' = {long_window}", "passkey k_max at L'", "success, k <= L", "success, k > L"],
        rows)
    n, n_long = budget["finetune_steps"], budget["long_finetune_steps"]
    return f"""## Ablation beyond the paper: passkey prompts up to L' in fine-tuning

Not one of the paper's experiments, and not used for any verdict above. The paper fine-tunes on PG-19
alone: LLaMA already retrieves at any distance in its window, and claim 4 asks whether PI keeps that
skill usable over L'. In the paper-setting runs above the base was trained to retrieve over at most L
tokens. Where no extension retrieves beyond L there, two explanations compete: a small model's retrieval
may be bound to the number of tokens it learnt to look back over, or compressing positions may break
retrieval by itself. The "Passkey inside L" table above tests the second (PI without fine-tuning, on
prompts no longer than pretraining's). These four fine-tunes test the first: PI and direct fine-tuning
again ({n} and {n_long} steps, the same recipe and seed) with passkey prompts up to L' = {long_window}
tokens instead of L in their data, asking how fast each encoding learns to retrieve over L'. The
passkey share stays {budget['passkey_share']:.0%} of the tokens, so with prompts up to 8x longer there are
fewer of them (and far fewer short ones) than in the paper-setting fine-tunes, and they sit in different
places in the stream: the two settings differ in more than the prompt length.

The first four rows are the paper-setting fine-tunes from the tables above. Test plays; passkey as in
Table 4 ({budget['passkey_trials']} keys at each of {budget['passkey_positions']} distances up to L');
"success" is the mean share of keys retrieved over the distances tested on each side of L, so the
k <= L column rests on the few distances below L (one seed: read small differences as noise).

{table}

By fine-tuning step (validation plays, as in Table 3):

{by_step_section(by_step, windows, window)}

![by step, passkeys to L']({figure})

"""


# A run whose validation perplexity ends this much above its best evaluated value has stopped learning the
# task and started fitting its training text: its final checkpoint says little about the position
# encoding. The paper's runs see each token about once; ours repeat a 2M-token corpus.
OVERFIT_RATIO = 1.10
OVERFIT, DIVERGED, FIT, NO_CURVE = "overfit", "diverged", "no", "no curve"


@dataclass(frozen=True)
class Fit:
    """How one run ended against its own validation curve (the base at L, the fine-tunes at L')."""

    title: str
    window: int                     # the window of the validation curve
    passes: float | None            # passes over the train split during this run
    train_ppl: float | None         # training perplexity over the last (possibly partial) epoch
    best_ppl: float | None          # lowest finite validation perplexity after step 0
    best_step: int | None
    final_ppl: float | None         # the value at the last evaluated step; None where it was not finite
    verdict: str                    # FIT, OVERFIT, DIVERGED (the last value not finite) or NO_CURVE


def judge_fit(title: str, window: int, curve: Sequence[tuple[int, float | None]], passes: float | None,
              train_ppl: float | None) -> Fit:
    """One run's verdict from its validation curve, (step, perplexity) with None where not finite.

    Step 0 (the model before any update) is never the best. A run whose last value is not finite
    diverged, whatever came before it.
    """
    later = sorted((point for point in curve if point[0] > 0), key=lambda point: point[0])
    finite = [(step, float(ppl)) for step, ppl in later if _finite(ppl)]
    best_step, best = min(finite, key=lambda point: point[1]) if finite else (None, None)
    final = float(later[-1][1]) if later and _finite(later[-1][1]) else None
    if not later:
        verdict = NO_CURVE
    elif final is None or best is None:
        verdict = DIVERGED
    else:
        verdict = OVERFIT if final > OVERFIT_RATIO * best else FIT
    return Fit(title, window, passes, train_ppl, best, best_step, final, verdict)


def fit_check(runs: Mapping[str, Sequence[Mapping[str, Any]]], long_window: int, passes: Mapping[str, float],
              train_ppl: Mapping[str, float | None]) -> list[Fit]:
    """Each fine-tune's best and final validation perplexity at L' from its by-step rows.

    Non-finite perplexities are stored as null in the by-step JSON.
    """
    key = f"ppl_{long_window}"
    return [judge_fit(title, long_window, [(row["step"], row.get(key)) for row in rows], passes.get(title),
                      train_ppl.get(title)) for title, rows in runs.items()]


def metrics_curve(path: Path) -> list[tuple[int, float | None]]:
    """The validation perplexity by step from a run's Lightning CSV log (`logs/metrics.csv`); [] without one.

    Rows logged through `LightningModule.log` carry the count of optimizer steps before the current one
    (validation after step 100 says 99; rows with an explicit step, like the callback's `longctx/*`, do
    not): stored + 1, so the steps read like the by-step tables' and the checkpoints'.
    """
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/ppl")]
    curve = []
    for row in rows:
        value = float(row["val/ppl"])
        curve.append((int(row["step"]) + 1, value if math.isfinite(value) else None))
    return curve


def fit_section(fits: Sequence[Fit], window: int, long_window: int) -> str:
    def at(fit: Fit) -> str:
        return "L" if fit.window == window else ("L'" if fit.window == long_window else str(fit.window))

    rows = [[f.title, at(f), "-" if f.passes is None else f"{f.passes:.2f}", _ppl_cell(f.train_ppl),
             "-" if f.best_ppl is None else f"{_ppl_cell(f.best_ppl)} (step {f.best_step})", _ppl_cell(f.final_ppl),
             "-" if f.final_ppl is None or f.best_ppl is None else f"{f.final_ppl / f.best_ppl:.2f}",
             f"**{f.verdict}**" if f.verdict in (OVERFIT, DIVERGED) else f.verdict]
            for f in fits]
    return (f"Validation plays: the base's perplexity at L = {window} from its training log (every "
            f"`trainer.val_check_interval` steps), each fine-tune's at L' = {long_window} from the by-step tables below "
            f"(step 0 excluded). A run is marked overfit when its last value is more than {OVERFIT_RATIO - 1:.0%} "
            "above its best, diverged when its last value is not finite, \"no curve\" when it was not evaluated after "
            "step 0 (or its log is missing). The training perplexity is over the last, possibly partial, pass of the "
            "data loader (passkey prompts included).\n\n"
            + tables.markdown_table(["run", "window", "passes over the train split", "train ppl, last", "val ppl, best",
                                     "val ppl, final", "final / best", "verdict"], rows))


def fit_warning(fits: Sequence[Fit]) -> str:
    """One paragraph for the top of the report when a run overfit or diverged; empty otherwise."""
    overfit = [f.title for f in fits if f.verdict == OVERFIT]
    diverged = [f.title for f in fits if f.verdict == DIVERGED]
    if not overfit and not diverged:
        return ""
    parts = []
    if overfit:
        parts.append(f"{_join(overfit)} ended more than {OVERFIT_RATIO - 1:.0%} above "
                     f"{'its' if len(overfit) == 1 else 'their'} best validation perplexity")
    if diverged:
        parts.append(f"{_join(diverged)} ended with a validation perplexity that is not finite")
    flagged = len(overfit) + len(diverged)
    return (f"**Caution:** {'; '.join(parts)} (see \"Overfitting check\"). The verdicts compare final checkpoints, as "
            f"the paper does; for {'this run' if flagged == 1 else 'these runs'} the final checkpoint says more about "
            "the training than about the position encoding.\n\n")


def _ppl_cell(value: float | None) -> str:
    """A perplexity for a table cell; "-" where there is none (format_ppl would print inf)."""
    return "-" if value is None else tables.format_ppl(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def attention_section(attention: Mapping[str, Any], base_name: str) -> str:
    columns: list[tuple[str, Mapping[str, Any]]] = []
    fit = attention["paper_fit"]
    columns.append((f"fit, d={fit['head_dim']} L={fit['window']}", fit))
    for label, facts in attention.get("fits", {}).items():
        columns.append((label, facts))
    real = attention.get("query_key", {}).get(base_name)
    if real and "skipped" not in real:
        columns.append((f"{base_name}: real q/k (median of {real['pairs']} pairs)", pair_medians(real)))
    def cell(facts: Mapping[str, Any], key: str) -> str:
        if key not in facts:
            return ""
        return f"{facts[key]:.4g}" if _finite(facts[key]) else "not finite"  # results.json stores those as null

    extent = f"{fit.get('extent', 2.0):g}"
    rows = [[label.format(extent=extent), *(cell(facts, key) for _, facts in columns)] for key, label in ATTENTION_ROWS]
    return tables.markdown_table(["quantity", *(c for c, _ in columns)], rows)


def claims_section(claims: Sequence[Claim]) -> str:
    rows = [[c.number, c.text, c.paper, c.ours, f"**{c.verdict}**"] for c in claims]
    criteria = "\n".join(f"- Claim {c.number}: {c.criterion}." for c in claims)
    return (tables.markdown_table(["#", "claim", "paper", "this run", "verdict"], rows)
            + "\n\nCriteria (fixed in reproduction/claims.py before the runs):\n\n" + criteria
            + "\n\nHow much the verdicts say: they come from one seed and a few test documents, with no margin for "
            "noise, so a comparison decided by a small difference (claims 2, 3 and 5 near their thresholds, claim 4 "
            "by one tested distance) could go the other way with another seed. A direct fine-tune that overfits or "
            "diverges (the overfitting check below) loses claim 3's comparison for that reason, not only for "
            "extrapolating; claim 5 compares PI with the base it was fine-tuned from, so more training alone can "
            "pass it.")


@dataclass(frozen=True)
class Comparison:
    """A perplexity ratio a claim's verdict rests on: ppl(a) / ppl(b) at one window."""

    claim: int
    a: str
    b: str
    window: int


def sampling_ratios(records: Mapping[str, Mapping[int, Mapping[str, Any]]], comparisons: Sequence[Comparison],
                    seed: int) -> list[dict[str, Any]]:
    """Each comparison's ratio with its paired bootstrap interval over the test text, or why it has none.

    Empty when no evaluation kept its blocks (those made before they were kept), so an older report stays as it was.
    """
    found = [(c, *(blocks_of(records.get(name, {}).get(c.window)) for name in (c.a, c.b))) for c in comparisons]
    if not any(a or b for _, a, b in found):
        return []
    rows = []
    for c, a, b in found:
        row: dict[str, Any] = {"claim": c.claim, "a": c.a, "b": c.b, "window": c.window}
        problem = pairing_problem(a, b)
        if problem is None:
            value, (low, high) = ppl_ratio(a, b, seed=seed)
            row.update(ratio=value, ci95=[low, high], blocks=len(a["tokens"]))
        else:
            row.update(ratio=None, ci95=None, problem=problem)
        rows.append(row)
    return rows


def sampling_text(ratios: Sequence[Mapping[str, Any]], base_window: int) -> str:
    """The claims' perplexity ratios with their intervals, under the claims ("" without any)."""
    if not ratios:
        return ""
    lines = []
    for r in ratios:
        what = f"claim {r['claim']}, at {multiple(r['window'], base_window)}: {r['a']} / {r['b']}"
        if r["ratio"] is None:
            lines.append(f"- {what}: no interval ({r['problem']})")
        else:
            low, high = r["ci95"]
            lines.append(f"- {what} = {r['ratio']:.3f} (95%: {low:.3f} to {high:.3f}; {r['blocks']} blocks)")
    return ("\n\nHow much the test text decides the ratios behind claims 3 and 5: each with a 95% interval, where "
            f"there are enough blocks, from a paired bootstrap over blocks of {BLOCK_TOKENS} consecutive tokens of "
            "the test plays (both models read on the same resampled blocks; evaluation/uncertainty.py). A ratio "
            "whose interval holds its threshold "
            "(claim 3: 1; claim 5: 1.05 and 1.15) could be judged the other way on other passages of these plays. "
            "The blocks come from a few plays, so other plays could move it more, and another training seed is not "
            "part of these intervals.\n\n" + "\n".join(lines))


def plot_by_step(path: Path, runs: Mapping[str, Sequence[Mapping[str, Any]]], long_window: int) -> None:
    """Perplexity at L' and passkey k_max against fine-tuning steps, one line per run."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for title, rows in runs.items():
        steps = [r["step"] for r in rows]
        left.plot(steps, [r.get(f"ppl_{long_window}") for r in rows], marker="o", markersize=3, label=title)
        right.plot(steps, [r.get("passkey_k_max") for r in rows], marker="o", markersize=3, label=title)  # none: a gap
    left.set_yscale("log")
    left.set_xlabel("fine-tuning step")
    left.set_ylabel(f"perplexity at L' = {long_window} (validation)")
    right.set_xlabel("fine-tuning step")
    right.set_ylabel(f"passkey k_max at L' = {long_window}")
    right.set_ylim(0, long_window * 1.05)
    for ax in (left, right):
        ax.set_xscale("symlog", linthresh=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def copy_figure(source: Path, target: Path) -> str:
    """The figure copied into the report; its name there."""
    shutil.copyfile(source, target)
    return target.name


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
