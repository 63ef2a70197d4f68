"""Writing results: one JSON with every number, Markdown tables in the paper's layout, PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: evaluation runs on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from model.checkpoints import atomic_write  # noqa: E402


def to_jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become null so the file stays strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_text(path: Path, text: str) -> None:
    """Atomically: a reader (or a run killed midway) sees the old file or the new one, never half of one."""
    atomic_write(path, lambda handle: handle.write(text.encode()))


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Indented, strict JSON, written atomically."""
    write_text(path, json.dumps(to_jsonable(payload), indent=2) + "\n")


def save_figure(fig: Any, path: Path) -> None:
    """A PNG, written atomically, and the figure closed."""
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, dpi=120, format="png"))
    finally:
        plt.close(fig)


def read_results(path: Path) -> dict[str, Any]:
    """A results.json with its perplexities keyed by int window, as `evaluate` builds them.

    Strict JSON stores a non-finite perplexity as null; it is read back as inf when its loss was a
    number (the model broke down: loss >= 700 nats) and as NaN when the loss was not (a numeric
    failure). A table entry without its record, or a record without a loss, reads as inf. Every other number is as the file has
    it, non-finite ones as None."""
    results = json.loads(path.read_text())
    records = results.get("ppl", {})
    if "ppl" in results:
        results["ppl"] = {name: {int(w): {**r, "ppl": _stored_ppl(r.get("ppl"), r)} for w, r in by_window.items()}
                          for name, by_window in records.items()}
    if "ppl_table" in results:
        results["ppl_table"] = {name: {int(w): _stored_ppl(ppl, records.get(name, {}).get(str(w))) for w, ppl in by_window.items()}
                                for name, by_window in results["ppl_table"].items()}
    return results


def _stored_ppl(ppl: float | None, record: Mapping[str, Any] | None) -> float:
    if ppl is not None:
        return ppl
    # A record written without its loss (older files) keeps the old reading: inf.
    return math.nan if record is not None and "loss" in record and record["loss"] is None else math.inf


def format_ppl(value: float | None) -> str:
    """Two decimals as in the paper; very large values in scientific notation."""
    if value is not None and math.isnan(value):
        return "nan"
    if value is None or not math.isfinite(value):
        return "inf"
    return f"{value:.2f}" if value < 1000 else f"{value:.3g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")  # "max |h_j|" must not split a cell

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ppl_markdown(windows: Sequence[int], table: Mapping[str, Mapping[int, float]]) -> str:
    """Rows = model variants, columns = eval windows (the paper's Table 1 layout)."""
    rows = [[name, *(format_ppl(by_window.get(w)) for w in windows)] for name, by_window in table.items()]
    return markdown_table(["model", *map(str, windows)], rows)


def interval_markdown(windows: Sequence[int], records: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> str:
    """Each perplexity's 95% bootstrap interval over the passages read ("-" where it has none: too few blocks,
    a loss that is not finite)."""
    def cell(record: Mapping[str, Any] | None) -> str:
        interval = (record or {}).get("ci95")
        return f"{format_ppl(interval[0])} to {format_ppl(interval[1])}" if interval else "-"

    rows = [[name, *(cell(by_window.get(w)) for w in windows)] for name, by_window in records.items()]
    return markdown_table(["model", *map(str, windows)], rows)


def by_step_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The paper's "by fine-tuning step" layout: one row per step, a column per metric."""
    if not rows:
        return ""
    columns = [c for c in rows[0] if c != "step"]
    body = [[row["step"], *(format_ppl(row[c]) if isinstance(row.get(c), float) else row.get(c, "") for c in columns)] for row in rows]
    return markdown_table(["step", *columns], body)


def plot_perplexity(path: Path, windows: Sequence[int], table: Mapping[str, Mapping[int, float]], stride: str) -> bool:
    """Perplexity by evaluation window, one line per model (log-log); a non-finite perplexity (a model that
    broke down) is left out of its line. False, and no file, when no model has a finite one."""
    finite = {name: [w for w in windows if w in by_window and math.isfinite(by_window[w] or math.nan) and by_window[w] > 0]
              for name, by_window in table.items()}
    if not any(finite.values()):
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ws in finite.items():
        ax.plot(ws, [table[name][w] for w in ws], marker="o", label=name + ("" if len(ws) == len(table[name]) else " (inf left out)"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(windows), [str(w) for w in windows])
    ax.set_xlabel("evaluation window (tokens)")
    ax.set_ylabel(f"perplexity (sliding window, stride {stride})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_passkey(path: Path, results: Mapping[str, Mapping[str, Any]]) -> None:
    """One success grid per model: trials (rows) x key distance k (columns), with k_max marked."""
    fig, axes = plt.subplots(len(results), 1, figsize=(8, 1.2 + 1.3 * len(results)), squeeze=False)
    for ax, (name, result) in zip(axes[:, 0], results.items()):
        grid = np.array(result["successes"], dtype=float).T  # (trials, distances)
        ax.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
        distances = result["distances"]
        step = max(1, len(distances) // 12)
        ax.set_xticks(range(0, len(distances), step), [str(d) for d in distances[::step]], fontsize=7)
        ax.set_yticks([])
        if result["k_max"] in distances:
            ax.axvline(distances.index(result["k_max"]) + 0.5, color="black", linewidth=2)
        ax.set_title(f"{name}: k_max = {result['k_max']} (window {result['window']})", fontsize=9)
    axes[-1, 0].set_xlabel("distance k of the key from the end (tokens)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_attention(path: Path, facts: Mapping[str, Any], curves: Mapping[str, np.ndarray], title: str, row: int = 0) -> None:
    """Figure 2: the fit on [0, L], the same function extrapolated, interpolated, and the two bounds."""
    window = int(facts["window"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    inside_s, inside = curves["inside_s"], curves["inside"][row]
    ax = axes[0, 0]
    if "targets" in curves:
        ax.plot(inside_s, curves["targets"], ".", markersize=2, color="gray", label="random targets")
    ax.plot(inside_s, inside, color="tab:red", linewidth=0.8, label="a(s) at integers")
    ax.set_title(f"inside [0, L={window}]: max |a| = {np.abs(inside).max():.3g}")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    ax.plot(inside_s, inside, color="tab:red", linewidth=0.8)
    ax.plot(curves["extrapolation_s"], curves["extrapolation"][row], color="tab:blue", linewidth=0.8, label="extrapolation s > L")
    ax.axvline(window, color="black", linestyle=":")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title(f"extrapolation: max |a| = {np.abs(curves['extrapolation'][row]).max():.3g}")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    middle = window // 2
    fine_s = curves["interpolation_s"]
    zoom = (fine_s >= middle) & (fine_s <= middle + 12)
    ax.plot(fine_s[zoom], curves["interpolation"][row][zoom], color="tab:green", label="a(s) at fractional s")
    integers = (inside_s >= middle) & (inside_s <= middle + 12)
    ax.plot(inside_s[integers], inside[integers], "o", color="tab:red", label="integers")
    for s in inside_s[integers]:
        ax.axvline(s, color="gray", linestyle=":", linewidth=0.5)
    ax.set_title(f"interpolation: max |a| = {np.abs(curves['interpolation'][row]).max():.3g} on [0, L]")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    theta, head_dim = float(facts["theta"]), int(facts["head_dim"])
    ax.plot(curves["extrapolation_s"], 64 * np.log(theta) * curves["b_over_d"], color="tab:blue", label="extrapolation / interpolation bound = 64 ln c B(s)/d")
    ax.axhline(64 * np.log(theta), color="black", linestyle=":", label=f"B(s) = d: {64 * np.log(theta):.0f}x")
    ax.set_yscale("log")
    ax.set_xlabel("s")
    ax.set_title(f"bound ratio (d={head_dim}, c={theta:g})")
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
