"""OmegaConf resolvers the configs use; registered on import, before Hydra composes anything."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .slurm import is_requeued_run


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its nearest ancestor that does."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def creatable(path: Path) -> bool:
    """Whether `path` exists as a folder or could be made: its nearest existing ancestor is a writable folder."""
    probe = nearest_existing(path)
    return probe.is_dir() and os.access(probe, os.W_OK)


def _run_dir_or(run_dir: Any, default: Any) -> Any:
    """`${run_dir_or:${run_dir},'outputs/...'}`, Hydra's run folder: run_dir, or `default` when it is null.

    Also `default` when run_dir cannot be made: Hydra creates its folder before train.py runs, and would
    fail with a traceback where train.py's own check names the problem in one sentence.
    """
    if run_dir is None or not creatable(Path(str(run_dir)).expanduser()):
        return default
    return run_dir


def _hydra_record(resume: Any, stamp: Any, run_dir: Any = None) -> str:
    """`${hydra_record:${resume},${now:...},${run_dir}}`, Hydra's output_subdir: .hydra, or .hydra/resumed-<stamp>
    for a resume, which writes into the interrupted run's folder and would otherwise replace its config and
    overrides. A job SLURM requeued into run_dir is a resume too (training/slurm.py)."""
    requeued = run_dir is not None and is_requeued_run(Path(str(run_dir)).expanduser())
    return ".hydra" if resume is None and not requeued else f".hydra/resumed-{stamp}"


def register() -> None:
    for name, resolver in (("run_dir_or", _run_dir_or), ("hydra_record", _hydra_record)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register()
