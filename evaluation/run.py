"""`evaluate(cfg)`: load every model variant, run the requested tasks, write JSON, Markdown and plots.

A variant is one row of the comparison table: a checkpoint read with a position encoding
(its own, or an override such as PI scale 8 on a base model that was never fine-tuned).
"""

from __future__ import annotations

import datetime
import os
import inspect
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from model import Llama, build_position, keep_stored_settings
from model.checkpoints import CheckpointError, Pretrained, check_same_tokenizer, check_tokenizer, load_pretrained
from model.position import RoPE

from evaluation import report
from evaluation.attention import analyse_model, fit_random_scores, geometric_theta, pair_medians
from evaluation.errors import EvaluationError
from evaluation.generation import generate
from evaluation.limits import check_window, extended_window, meant_window, readable_length
from evaluation.passkey import plan_passkey, run_passkey
from evaluation.perplexity import BLOCK_TOKENS, prepare_documents, sliding_window_perplexity, window_stride
from evaluation.uncertainty import MIN_BLOCKS, ppl_interval

log = logging.getLogger(__name__)

TASKS = ("ppl", "passkey", "attention", "generate")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANT_KEYS = {"name", "ckpt", "position"}


@dataclass
class Variant:
    """One table row: a checkpoint and the position encoding it is read with (None: its own)."""

    name: str
    ckpt: str
    position: dict[str, Any] | None


def parse_tasks(task: Any) -> list[str]:
    """`task=ppl` or `task=[ppl,passkey]` -> a list of known task names."""
    tasks = [task] if isinstance(task, str) else list(task or [])
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvaluationError(f"unknown task {unknown[0] if unknown else task!r}; choose one or more of {', '.join(TASKS)} (e.g. task=[ppl,passkey]).")
    return list(dict.fromkeys(tasks))


def _position_label(position: Mapping[str, Any] | None) -> str:
    """" [pi x8]": how a row's name shows a position override."""
    if not position:
        return ""
    scale = position.get("scale")
    if "kind" not in position:  # a scale alone: each checkpoint's own encoding, rescaled
        return f" [x{float(scale):g}]" if scale is not None else ""
    return f" [{position['kind']}" + (f" x{scale:g}]" if scale not in (None, 1, 1.0) else "]")


def resolve_variants(cfg: DictConfig) -> list[Variant]:
    """Rows from `ckpt` (one per path, read with the `position`/`scale` override if any) plus `variants`."""
    ckpts = cfg.ckpt if cfg.ckpt is not None else []
    ckpts = [str(ckpts)] if isinstance(ckpts, (str, Path)) else [str(c) for c in ckpts]
    override: dict[str, Any] | None = None
    if "position" in cfg:
        override = OmegaConf.to_container(cfg.position, resolve=True)
        if override.get("scale") is None and override.get("kind") not in ("rope", "none", "absolute", "sinusoidal"):
            log.warning("position=%s without scale=S reads positions unscaled (scale 1); pass scale=8 for PI x8", override.get("kind"))
    elif cfg.scale is not None:
        override = {"scale": cfg.scale}  # rescale whatever encoding each checkpoint stores
    scale = (override or {}).get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 1):
        raise EvaluationError(f"scale={scale!r} must be a number >= 1, e.g. scale=8.")
    tag = _position_label(override)  # " [pi x8]", or " [x8]" for a scale alone
    rows = [Variant(_default_name(path, ckpts) + tag, path, override) for path in ckpts]
    for entry in cfg.variants or []:
        if not isinstance(entry, (DictConfig, Mapping)):
            raise EvaluationError(f"variants entry {entry!r} is not a mapping; write one as {{name: ..., ckpt: PATH, "
                                  "position: {kind: pi, scale: 8}}, or list plain checkpoints with ckpt=[a,b].")
        entry = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
        if entry.get("position") is not None and not isinstance(entry["position"], Mapping):
            raise EvaluationError(f"variant {entry} has position={entry['position']!r}; give a mapping such as "
                                  "position: {kind: pi, scale: 8}.")
        unknown = sorted(set(entry) - VARIANT_KEYS)
        if unknown:
            raise EvaluationError(f"variant {entry} has unknown key(s) {unknown}; a variant takes {sorted(VARIANT_KEYS)}.")
        path = entry.get("ckpt") or (ckpts[0] if len(ckpts) == 1 else None)
        if path is None:
            raise EvaluationError(f"variant {entry} needs a ckpt (it can only default to ckpt= when exactly one is given).")
        position = entry.get("position")
        name = entry.get("name") or _default_name(str(path), [str(path)]) + _position_label(position)
        rows.append(Variant(name, str(path), position))
    names = [r.name for r in rows]
    for row in rows:
        if names.count(row.name) > 1:
            raise EvaluationError(f"two table rows are both named {row.name!r}; give the variants distinct names.")
    return rows


def _default_name(path: str, all_paths: list[str]) -> str:
    """The shortest tail of the path that tells it from the others (a run's last.ckpt: `<run>/checkpoints/last`)."""
    parts = Path(path).with_suffix("").parts
    others = [Path(q).with_suffix("").parts for q in all_paths if q != path]
    for depth in range(1, len(parts) + 1):
        tail = parts[-depth:]
        if all(other[-depth:] != tail for other in others):
            return "/".join(tail)
    return "/".join(parts)


def _position_for(pretrained: Pretrained, override: dict[str, Any] | None) -> dict[str, Any]:
    if override is None:
        return dict(pretrained.position)
    if set(override) == {"scale"}:
        return {**pretrained.position, "scale": override["scale"]}
    return keep_stored_settings(override, pretrained.position)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device={name} was asked for but CUDA is not available; use device=cpu or device=auto.")
    return device


def output_dir(cfg: DictConfig) -> Path:
    """out_dir, else Hydra's run dir, else outputs/evaluate/<time> (evaluate() called outside Hydra)."""
    if cfg.out_dir:
        path = Path(cfg.out_dir)
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:
            path = Path("outputs/evaluate") / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EvaluationError(f"output folder {path} cannot be created ({error.strerror}); choose another out_dir.") from None
    if not os.access(path, os.W_OK):
        raise EvaluationError(f"output folder {path} is not writable; choose another out_dir.")
    return path


class DataSources:
    """One data module per tokenizer: variants with the same tokenizer share documents and the token cache."""

    def __init__(self, data_cfg: Mapping[str, Any], seq_len: int, seed: int) -> None:
        self.settings = dict(data_cfg)
        self.seq_len, self.seed = seq_len, seed
        self._modules: dict[str, Any] = {}
        self._documents: dict[tuple[str, str], list[np.ndarray]] = {}

    def module(self, tokenizer_path: Path | None) -> Any:
        """The data module reading with data.tokenizer if set, else with the checkpoint's own tokenizer."""
        from data.datamodule import TextDataModule  # late: tasks without data never import the data stack

        settings = dict(self.settings)
        if settings.get("tokenizer") is None and tokenizer_path is not None:
            settings["tokenizer"] = str(tokenizer_path)  # the checkpoint's own vocabulary, not a new one
        key = str(settings.get("tokenizer"))
        if key not in self._modules:
            accepted = set(inspect.signature(TextDataModule.__init__).parameters)
            settings.setdefault("seq_len", self.seq_len)
            settings.setdefault("seed", self.seed)
            self._modules[key] = TextDataModule(**{k: v for k, v in settings.items() if k in accepted})
        return self._modules[key]

    def documents(self, tokenizer_path: Path | None, split: str) -> list[np.ndarray]:
        """Token ids of every document of `split` (BOS ... EOS), loaded once per tokenizer."""
        module = self.module(tokenizer_path)
        key = (str(module.tokenizer_path), split)
        if key not in self._documents:
            self._documents[key] = module.documents(split)
        return self._documents[key]


def _build(pretrained: Pretrained, position: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Llama:
    model = pretrained.build_model(position)
    return model.to(device=device, dtype=dtype).eval()


def _check_vocab(model: Llama, tokenizer: Any, name: str) -> None:
    if tokenizer.vocab_size > model.args.vocab_size:
        raise EvaluationError(
            f"{name}: the tokenizer has {tokenizer.vocab_size} pieces but the model only {model.args.vocab_size}; "
            "set data.tokenizer to the tokenizer.model the checkpoint was trained with."
        )


def _check_tokenizer_for(ckpt: str, pretrained: Pretrained, data_tokenizer: str | None) -> None:
    """Weights are read with their own tokenizer, or with data.tokenizer when it is set: never with one trained on
    the corpus (its ids mean nothing to them), nor with one of another vocabulary."""
    if data_tokenizer is None:
        if pretrained.tokenizer_path is None:
            raise EvaluationError(f"{ckpt} comes without its tokenizer.model; pass data.tokenizer=/path/to/"
                                  "tokenizer.model, the one its weights were trained with.")
        return
    try:
        check_tokenizer(pretrained.args, data_tokenizer)
        check_same_tokenizer(pretrained, data_tokenizer)
    except CheckpointError as error:
        raise EvaluationError(f"{ckpt}: {str(error).rstrip('.')} (data.tokenizer={data_tokenizer}).") from None


def _warn_if_scale_is_extrapolation(variant: Variant, pretrained: Pretrained) -> None:
    """scale= alone on a RoPE checkpoint lengthens its window but interpolates nothing: plain RoPE ignores scale."""
    override, stored = variant.position, pretrained.position
    if (override is not None and set(override) == {"scale"} and stored.get("kind", "rope") == "rope"
            and float(override["scale"]) != float(stored.get("scale") or 1)):
        log.warning("%s: scale=%g on a RoPE checkpoint only lengthens the window, its positions are not interpolated; "
                    "pass position=pi scale=%g to read it with PI", variant.name, override["scale"], override["scale"])


def _preflight(variant: Variant, pretrained: Pretrained, position: dict[str, Any], cfg: DictConfig, tasks: list[str],
               sources: DataSources) -> None:
    """Check every window against the position encoding, and the passkey window against the prompt's length,
    before any long computation starts."""
    module = build_position(pretrained.args, position)
    if "passkey" in tasks:
        window = cfg.passkey.window or meant_window(pretrained, position, module)
        try:
            plan_passkey(sources.module(pretrained.tokenizer_path).tokenizer, window, cfg.passkey.num_positions,
                         cfg.passkey.trials, cfg.seed)
        except EvaluationError as error:
            raise EvaluationError(f"{variant.name}: {error}") from None
    limit = readable_length(module)
    if limit is None:
        return
    if "ppl" in tasks and max(cfg.ppl.windows) > limit:
        raise EvaluationError(
            f"{variant.name}: ppl window {max(cfg.ppl.windows)} is longer than the {limit} positions of its learned "
            f"absolute table; drop that window or read it with a larger scale (position=absolute scale=...)."
        )
    if "passkey" in tasks and cfg.passkey.window is not None and cfg.passkey.window > limit:
        raise EvaluationError(
            f"{variant.name}: passkey window {cfg.passkey.window} is longer than the {limit} positions of its learned "
            "absolute table; lower passkey.window or read it with a larger scale."
        )


class Collected:
    """Everything the tasks produce, written at the end as results.json, results.md and PNGs."""

    def __init__(self, cfg: DictConfig, tasks: list[str], device: torch.device, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.results: dict[str, Any] = {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "tasks": tasks,
            "device": str(device),
            "models": [],
            "timings_s": {},
        }
        self.ppl: dict[str, dict[str, Any]] = {}
        self.passkey: dict[str, dict[str, Any]] = {}
        self.attention: dict[str, Any] = {}
        self.samples: dict[str, str] = {}
        self.figures: list[str] = []

    def write(self) -> dict[str, Any]:
        cfg, out, results = self.cfg, self.out, self.results
        windows = list(cfg.ppl.windows)
        markdown = [f"# Evaluation\n\ntasks: {', '.join(results['tasks'])}; device: {results['device']}; dtype: {cfg.dtype}"]
        if self.ppl:
            table = {name: {w: r["ppl"] for w, r in by_window.items()} for name, by_window in self.ppl.items()}
            results["ppl"], results["ppl_table"] = self.ppl, table
            text = report.ppl_markdown(windows, table)
            stride = stride_text(cfg.ppl)
            markdown.append(f"## Perplexity (sliding window, stride {stride}, {cfg.split} split)\n\n{text}")
            markdown.append("How much the perplexities owe to the passages read: 95% intervals of a bootstrap over blocks of "
                            f"{BLOCK_TOKENS} consecutive tokens of each document (evaluation/uncertainty.py; none under "
                            f"{MIN_BLOCKS} blocks). Other documents could move them more, and another training seed is "
                            "not part of them.\n\n" + report.interval_markdown(windows, self.ppl))
            if report.plot_perplexity(out / "ppl.png", windows, table, stride):
                self.figures.append("ppl.png")
            print(text)
        if self.passkey:
            results["passkey"] = self.passkey
            rows = [[n, r["window"], r["k_max"], f"{np.mean(r['success_rates']):.2f}"] for n, r in self.passkey.items()]
            markdown.append("## Passkey retrieval\n\n" + report.markdown_table(["model", "window", "k_max", "mean success"], rows))
            report.plot_passkey(out / "passkey.png", self.passkey)
            self.figures.append("passkey.png")
        if self.attention:
            results["attention"] = self.attention
            markdown.append("## Attention-score analysis (Figure 2)\n\n" + _attention_markdown(self.attention))
        if self.samples:
            results["generate"] = self.samples
            prompt = cfg.generate.prompt
            markdown.append("## Samples\n\n" + "\n\n".join(f"**{n}**\n\n```\n{prompt}{s}\n```" for n, s in self.samples.items()))
        results["figures"] = self.figures
        report.write_json(out / "results.json", results)
        report.write_text(out / "results.md", "\n\n".join(markdown) + "\n")
        print(f"results written to {out.resolve()}")
        return results


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured tasks on every variant; returns the results written to results.json."""
    tasks = parse_tasks(cfg.task)
    variants = resolve_variants(cfg)
    if not variants and set(tasks) - {"attention"}:
        raise EvaluationError(f"task {','.join(tasks)} needs a model: pass ckpt=PATH (or a list, ckpt=[a,b]) or variants=[...].")
    if "ppl" in tasks:
        _check_ppl_settings(cfg)
    if "passkey" in tasks:
        _check_passkey_settings(cfg)
    if "attention" in tasks and (isinstance(cfg.attention.pairs, bool) or not isinstance(cfg.attention.pairs, int)
                                 or cfg.attention.pairs < 1):
        raise EvaluationError(f"attention.pairs={cfg.attention.pairs!r} must be a positive integer (query/key pairs per checkpoint).")
    device, dtype = resolve_device(cfg.device), _dtype(cfg.dtype)
    sources = DataSources(OmegaConf.to_container(cfg.data, resolve=True), seq_len=max([*cfg.ppl.windows, 2]), seed=cfg.seed)
    loaded: dict[str, Pretrained] = {}
    positions: dict[str, dict[str, Any]] = {}
    for ckpt in dict.fromkeys(v.ckpt for v in variants):  # each checkpoint, tokenizer and window is checked before
        pretrained = load_pretrained(ckpt)                   # the first long computation
        _check_tokenizer_for(ckpt, pretrained, cfg.data.get("tokenizer"))
        for variant in (v for v in variants if v.ckpt == ckpt):
            positions[variant.name] = _position_for(pretrained, variant.position)
            _warn_if_scale_is_extrapolation(variant, pretrained)
            _preflight(variant, pretrained, positions[variant.name], cfg, tasks, sources)
        if not loaded:  # the first is evaluated first; the others are read again in their turn, so that several
            loaded[ckpt] = pretrained  # checkpoints (of 7B: 13 GB each, in host memory) are never held at once
        del pretrained
    torch.manual_seed(cfg.seed)
    collected = Collected(cfg, tasks, device, output_dir(cfg))
    if "attention" in tasks:
        _paper_fit(cfg, collected)
    for i, variant in enumerate(variants):
        if variant.ckpt not in loaded:
            loaded[variant.ckpt] = load_pretrained(variant.ckpt)
        pretrained = loaded[variant.ckpt]
        position = positions[variant.name]
        model = _build(pretrained, position, device, dtype)
        collected.results["models"].append(
            {
                "name": variant.name,
                "ckpt": variant.ckpt,
                "position": position,
                "model_args": pretrained.args.to_dict(),
                "window": extended_window(model),
                "global_step": pretrained.extra.get("global_step"),
            }
        )
        tokenizer = sources.module(pretrained.tokenizer_path).tokenizer
        _check_vocab(model, tokenizer, variant.name)
        timings = collected.results["timings_s"].setdefault(variant.name, {})
        for task in tasks:
            start = time.perf_counter()
            if task == "ppl":
                _ppl(cfg, variant, model, sources.documents(pretrained.tokenizer_path, cfg.split), device, collected)
            elif task == "passkey":
                window = cfg.passkey.window or meant_window(pretrained, position, model.position)
                _passkey(cfg, variant, model, tokenizer, window, device, collected)
            elif task == "attention":
                _attention(cfg, variant, model, sources.documents(pretrained.tokenizer_path, cfg.split), device, collected)
            else:
                _generate(cfg, variant, model, tokenizer, collected)
            timings[task] = time.perf_counter() - start
        del model, pretrained
        if i + 1 < len(variants) and variants[i + 1].ckpt != variant.ckpt:
            del loaded[variant.ckpt]  # read again if a later row uses it: one checkpoint in memory at a time
    return collected.write()


def _ppl(cfg: DictConfig, variant: Variant, model: Llama, documents: list[np.ndarray], device: torch.device, collected: Collected) -> None:
    p = cfg.ppl
    docs = prepare_documents(documents, p.max_documents, p.max_tokens_per_document, p.min_tokens_per_document)
    if not docs and p.min_tokens_per_document is None:
        raise EvaluationError(f"the {cfg.split} split has no documents; evaluate on a corpus that has some (data=..., split=...).")
    if not docs:
        raise EvaluationError(f"no {cfg.split} document has ppl.min_tokens_per_document={p.min_tokens_per_document} tokens; lower it.")
    by_window = {}
    for window in p.windows:
        check_window(model, window, f"the ppl window {window}")
        short = sum(len(d) < window for d in docs)
        if short:  # the protocol reads them whole, with less context than the window: say so (the paper's are long)
            log.warning("%s: %d of %d documents are shorter than the ppl window %d; their tokens count in that column "
                        "with less context (ppl.min_tokens_per_document=%d leaves them out)", variant.name, short,
                        len(docs), window, window)
        stride = window_stride(int(p.stride), window, p.max_stride_fraction)
        result = sliding_window_perplexity(model, docs, window, stride, p.batch_size, device)
        by_window[window] = {**result.to_dict(), "ci95": ppl_interval(result.blocks, seed=cfg.seed)}
        log.info("%s: window %d ppl %.3f over %d tokens", variant.name, window, result.ppl, result.tokens)
    collected.ppl[variant.name] = by_window


def _passkey(cfg: DictConfig, variant: Variant, model: Llama, tokenizer: Any, window: int, device: torch.device,
             collected: Collected) -> None:
    p = cfg.passkey
    check_window(model, window, f"the passkey window {window}")
    result = run_passkey(model, tokenizer, window, p.num_positions, p.trials, cfg.seed, p.batch_size, p.threshold, device).to_dict()
    collected.passkey[variant.name] = result
    _print_passkey(variant.name, result)


def _paper_fit(cfg: DictConfig, collected: Collected) -> None:
    a = cfg.attention
    facts, curves = fit_random_scores(a.head_dim, a.window, a.theta, a.extent, a.step, cfg.seed, a.rcond)
    collected.attention["paper_fit"] = facts
    title = f"Figure 2: least-squares fit of random scores, d={a.head_dim}, L={a.window}, c={a.theta:g}"
    report.plot_attention(collected.out / "attention.png", facts, curves, title)
    collected.figures.append("attention.png")
    _print_attention("paper fit", facts)


def _attention(cfg: DictConfig, variant: Variant, model: Llama, documents: list[np.ndarray], device: torch.device, collected: Collected) -> None:
    """The fit for the model's own d, L and theta (once per shape), and its real queries and keys."""
    a, args = cfg.attention, model.args
    theta = geometric_theta(model.position)
    if theta is None:
        why = "is not rotary" if not isinstance(model.position, RoPE) else "bends RoPE's geometric frequencies, which the analysis assumes"
        collected.attention.setdefault("query_key", {})[variant.name] = {"skipped": f"position {model.position.kind!r} {why}"}
        log.warning("attention analysis skipped for %s: position %s %s", variant.name, model.position.kind, why)
        return
    label = f"fit d={args.head_dim} L={args.max_seq_len} c={theta:g}"
    fits = collected.attention.setdefault("fits", {})
    if label not in fits:
        fits[label], _ = fit_random_scores(args.head_dim, args.max_seq_len, theta, a.extent, a.step, cfg.seed, a.rcond)
        _print_attention(label, fits[label])
    tokens = torch.as_tensor(max(documents, key=len)[: args.max_seq_len].astype(np.int64), device=device)
    facts, curves = analyse_model(model, tokens, a.pairs, a.extent, a.step, cfg.seed)
    collected.attention.setdefault("query_key", {})[variant.name] = facts
    layer, head = curves["pairs"][0][:2]
    file = f"attention_{_slug(variant.name)}.png"
    title = f"{variant.name}: a real query/key pair (layer {layer}, head {head}), d={args.head_dim}, L={args.max_seq_len}"
    report.plot_attention(collected.out / file, facts, curves, title)
    collected.figures.append(file)
    _print_attention(f"{variant.name}, real queries/keys (median over {facts['pairs']} pairs)", pair_medians(facts))


def _generate(cfg: DictConfig, variant: Variant, model: Llama, tokenizer: Any, collected: Collected) -> None:
    g = cfg.generate
    prompt = tokenizer.encode(g.prompt, bos=True)
    new = generate(model, prompt, g.max_new_tokens, g.temperature, g.top_p, tokenizer.eos_id, cfg.seed, readable_length(model.position))
    collected.samples[variant.name] = tokenizer.decode(new)
    print(f"--- {variant.name}\n{g.prompt}{collected.samples[variant.name]}\n")


def _check_passkey_settings(cfg: DictConfig) -> None:
    p = cfg.passkey
    for key in ("num_positions", "trials", "batch_size"):
        if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1:
            raise EvaluationError(f"passkey.{key}={p[key]!r} must be a positive integer.")
    if p.window is not None and (isinstance(p.window, bool) or not isinstance(p.window, int) or p.window < 2):
        raise EvaluationError(f"passkey.window={p.window!r} must be an integer >= 2 or null (the model's window).")
    if isinstance(p.threshold, bool) or not isinstance(p.threshold, (int, float)) or not 0 < p.threshold <= 1:
        raise EvaluationError(f"passkey.threshold={p.threshold!r} must be a fraction in (0, 1] (the paper's: 0.2).")


def _check_ppl_settings(cfg: DictConfig) -> None:
    windows = list(cfg.ppl.windows)
    if not windows or any(not isinstance(w, int) or w < 2 for w in windows):
        raise EvaluationError(f"ppl.windows={windows} must be a non-empty list of integers >= 2.")
    stride, fraction = cfg.ppl.stride, cfg.ppl.max_stride_fraction
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise EvaluationError(f"ppl.stride={stride!r} must be a positive integer (the paper's is 256).")
    batch = cfg.ppl.batch_size
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise EvaluationError(f"ppl.batch_size={batch!r} must be a positive integer (windows per forward).")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1):
        raise EvaluationError(f"ppl.max_stride_fraction={fraction!r} must be in (0, 1] or null (the paper's least context: 0.125).")
    if fraction is None and stride > min(windows):
        raise EvaluationError(f"ppl.stride={stride} is longer than the window {min(windows)}; use a stride <= every window.")


def stride_text(ppl: Any) -> str:
    """How the tables name the stride: "256", or "min(256, window/8)" when the cap applies to some window."""
    fraction = ppl.max_stride_fraction
    if fraction is None or all(window_stride(int(ppl.stride), w, fraction) == ppl.stride for w in ppl.windows):
        return str(ppl.stride)
    cap = f"window/{1 / fraction:g}" if (1 / fraction).is_integer() else f"window x {fraction:g}"
    return f"min({ppl.stride}, {cap})"


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise EvaluationError(f"dtype={name!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")


def _print_passkey(name: str, result: Mapping[str, Any]) -> None:
    print(f"passkey {name} (window {result['window']}, {len(result['successes'][0])} trials per k):")
    for distance, rate in zip(result["distances"], result["success_rates"]):
        print(f"  k={distance:>6}  {'#' * round(rate * 10):<10}  {rate:.0%}")
    print(f"  k_max = {result['k_max']}")


ATTENTION_ROWS = (
    ("max_abs_h", "max |h_j|"),
    ("inside_max", "max |a(s)|, integers in [0, L]"),
    ("interpolation_max", "max |a(s)|, fractional s in [0, L]"),
    ("extrapolation_max", "max |a(s)|, integers in (L, extent L]"),
    ("extrapolation_over_inside", "extrapolation / inside"),
    ("interpolation_error_max", "max |a(s) - a_linear(s)|"),
    ("interpolation_bound", "interpolation bound d max|h| / (32 ln c)"),
    ("interpolation_bound_exact", "Taylor bound max|h| sum theta_j^2 / 8"),
    ("extrapolation_bound_min", "extrapolation bound 2 max|h| B(s), min over s"),
    ("bound_ratio_min", "bound ratio, min over s"),
    ("bound_ratio_mean", "bound ratio, mean over s"),
    ("b_over_d_min", "B(s)/d, min over s"),
    ("bound_ratio_at_b_equal_d", "bound ratio where B(s) = d (64 ln c)"),
)


def _print_attention(title: str, facts: Mapping[str, Any]) -> None:
    print(f"attention analysis, {title}:")
    for key, label in ATTENTION_ROWS:
        if key in facts:
            print(f"  {label:<48} {facts[key]:.4g}")


def _attention_markdown(results: Mapping[str, Any]) -> str:
    """Quantities (rows) by analysis (columns): the paper's fit, each model-shaped fit, each model's real q/k."""
    columns: list[tuple[str, Mapping[str, Any]]] = []
    if "paper_fit" in results:
        fit = results["paper_fit"]
        columns.append((f"fit d={fit['head_dim']} L={fit['window']} c={fit['theta']:g}", fit))
    columns += list(results.get("fits", {}).items())
    for name, facts in results.get("query_key", {}).items():
        if "skipped" not in facts:
            columns.append((f"{name}: real q/k, median of {facts['pairs']}", pair_medians(facts)))
    rows = [[label, *(f"{facts[key]:.4g}" if key in facts else "" for _, facts in columns)] for key, label in ATTENTION_ROWS]
    skipped = [f"{name}: {facts['skipped']}" for name, facts in results.get("query_key", {}).items() if "skipped" in facts]
    note = "\n\nNot analysed: " + "; ".join(skipped) + "." if skipped else ""
    return report.markdown_table(["quantity", *(c for c, _ in columns)], rows) + note
