"""Going on with a job SLURM requeued: which checkpoint it resumes from, and whether it is a resume at all.

With `--signal=SIGUSR1@90 --requeue`, Lightning saves run_dir/hpc_ckpt_<n>.ckpt on the signal and
requeues the job, which starts again with the same command line. Lightning would resume from the
newest hpc checkpoint on its own, but train.py would not know it is resuming (the earlier metrics rows
would be dropped, the Hydra record replaced), and a newer last.ckpt (SIGTERM's, or a periodic one written
after the signal) would be ignored. So train.py picks the checkpoint itself and resumes as resume= does.

No Lightning import here: Hydra's output_subdir resolver asks too, before Lightning is loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def under_slurm() -> bool:
    """Whether this process is a SLURM task, as Lightning's SLURMEnvironment.detect() decides: SLURM_NTASKS is set
    and the job is not named bash or interactive."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def restarts() -> int:
    """How many times SLURM has requeued this job (SLURM_RESTART_COUNT; 0 when unset)."""
    value = os.environ.get("SLURM_RESTART_COUNT", "").strip()
    return int(value) if value.isdigit() else 0


def hpc_checkpoints(run_dir: Path) -> list[Path]:
    """Lightning's hpc_ckpt_<n>.ckpt in run_dir, oldest number first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in run_dir.iterdir() if (m := HPC_CHECKPOINT.fullmatch(path.name))]
    return [path for _, path in sorted(found)]


def is_requeued_run(run_dir: Path) -> bool:
    """Whether a run into run_dir goes on with an earlier job's: under SLURM, when SLURM counts a restart or
    Lightning's hpc checkpoint is there (Lightning resumes from it whenever it finds one)."""
    return under_slurm() and (restarts() > 0 or bool(hpc_checkpoints(run_dir)))


def requeue_checkpoint(run_dir: Path, resume: Path | None, step_of: Callable[[Path], int | None]) -> Path | None:
    """The checkpoint a run into run_dir resumes from: `resume` (the command line's, or None), unless this is a
    requeued job's run, which takes the newest of `resume`, Lightning's hpc checkpoints and
    run_dir/checkpoints/last.ckpt by their step (`step_of`; unreadable ones are left out)."""
    if not is_requeued_run(run_dir):
        return resume
    last = run_dir / "checkpoints" / "last.ckpt"
    candidates = [*hpc_checkpoints(run_dir), *([last] if last.exists() else []), *([resume] if resume else [])]
    steps = {path: step_of(path) for path in candidates}
    readable = [path for path in candidates if steps[path] is not None]
    if not readable:
        return resume
    return max(readable, key=lambda path: steps[path])  # the first of equal steps: Lightning's own hpc checkpoint
