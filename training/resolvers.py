"""OmegaConf resolvers the configs use; registered on import, before Hydra composes anything."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def _creatable(path: Path) -> bool:
    """Whether `path` exists as a folder or could be made: its nearest existing ancestor is a writable folder."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK)


def _run_dir_or(run_dir: Any, default: Any) -> Any:
    """`${run_dir_or:${run_dir},'outputs/...'}`, Hydra's run folder: run_dir, or `default` when it is null.

    Also `default` when run_dir cannot be made: Hydra creates its folder before train.py runs, and would
    fail with a traceback where train.py's own check names the problem in one sentence.
    """
    if run_dir is None or not _creatable(Path(str(run_dir)).expanduser()):
        return default
    return run_dir


def register() -> None:
    if not OmegaConf.has_resolver("run_dir_or"):
        OmegaConf.register_new_resolver("run_dir_or", _run_dir_or)


register()
