"""Train or extend a LLaMA's context window.

    python train.py                          # pretrain the bundled base at its short window
    python train.py position=pi scale=8      # extend it 8x with Position Interpolation
    python train.py -m position=rope,pi,ntk scale=4   # an ablation sweep
"""

from __future__ import annotations

import logging
import os
import sys
import hydra
from omegaconf import DictConfig

import training.resolvers  # noqa: F401  (conf/config.yaml's ${run_dir_or:...}, needed before Hydra composes)

SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process that signal ended
# Jobs of a multirun sweep that failed: the sweep goes on past them and exits non-zero at the end.
failed_jobs: list[str] = []
# Whether one of them failed by an error other than the project's refusals (an out-of-memory, a bug): exit 1, not 2.
unexpected_failure = False
# run_dir of each job of a sweep so far (Hydra's basic launcher runs them one after the other in this process).
sweep_run_dirs: dict[str, str] = {}
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def _first_process() -> bool:
    """Rank 0 under Lightning's own launcher, torchrun or SLURM: messages are printed once, not per rank."""
    return all(int(os.environ.get(key, "0")) == 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _sweep_job() -> str | None:
    """"job 3 (position=pi scale=1)" inside a multirun sweep run in this process, else None.

    Only Hydra's basic launcher runs the jobs here, one after the other, so that this process can list their
    failures at the end; under another launcher (submitit, joblib, ray) each job is a process of its own and
    fails as a single run does, which that launcher records.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.launcher.get("_target_") != BASIC_LAUNCHER:
        return None
    return f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)})"


def _fail(error: Exception) -> None:
    """A user's mistake (or a diverged run) gets one sentence and exit status 2, not a traceback.

    In a multirun sweep the other jobs still run (one refused value should not cost a sweep its other runs);
    the sweep lists its failed jobs at the end and exits 2 (1 when another error failed one of them).
    """
    job = _sweep_job()
    if job is not None:  # logged now, listed again on stderr when the sweep ends
        logging.getLogger("train").error("%s: %s", job, error)
        failed_jobs.append(f"{job}: {error}")
        return
    if _first_process():
        logging.getLogger("train").error("%s", error)
        print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def _check_own_run_dir(cfg: DictConfig) -> None:
    """In a sweep, a run_dir that an earlier job used would have this job overwrite its checkpoints."""
    job = _sweep_job()
    if job is None or cfg.run_dir is None:
        return
    from training.config import ConfigError

    run_dir = os.path.abspath(str(cfg.run_dir))
    if run_dir in sweep_run_dirs:
        raise ConfigError(f"run_dir={cfg.run_dir} is also {sweep_run_dirs[run_dir]}'s, whose checkpoints this job would "
                          "overwrite; give each job its own (e.g. run_dir=runs/${position.kind}-${scale}) or leave "
                          "run_dir null for the sweep's folders.")
    sweep_run_dirs[run_dir] = job.split(" (")[0]


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # Imported here, in two steps: a bad value is reported before Lightning loads (4 of the 5 s
    # a start takes), and Hydra's own errors come before either.
    from training.config import ConfigError, validate

    try:
        validate(cfg)
        _check_own_run_dir(cfg)
    except ConfigError as error:
        return _fail(error)

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from data import DataError
    from evaluation.errors import EvaluationError
    from model.checkpoints import CheckpointError
    from training.faults import NonFiniteLossError
    from training.run import train

    try:
        train(cfg)
    except (ConfigError, DataError, CheckpointError, EvaluationError, NonFiniteLossError) as error:
        _fail(error)
    except SIGTERMException:
        # Lightning ends a SIGTERM'd run with status 0; one cut short should not look finished.
        if _first_process():
            print("stopped by SIGTERM; checkpoints/last.ckpt in the run folder was saved first: continue with the "
                  "same overrides and resume=<that path>.", file=sys.stderr)
        sys.exit(SIGTERM_EXIT_CODE)
    except Exception as error:
        job = _sweep_job()
        if job is None:
            raise
        # Hydra would record it, run the other jobs and then raise the first such error with exit status 1, without
        # the list of the jobs refused above. The traceback goes to this job's log now; the list names it too.
        _record_unexpected_failure(job, error)
        if _distributed():
            # One rank's error (an out-of-memory) need not be the others': they may wait in a collective of this job
            # while this one starts the next. The sweep ends here.
            sys.exit(1)
    else:
        return
    # Out of the except block, whose traceback held the failed job's frames: its model and optimizer can go now,
    # before the next job allocates its own.
    _release_memory()


def _record_unexpected_failure(job: str, error: Exception) -> None:
    global unexpected_failure
    logging.getLogger("train").exception("%s failed", job)
    first_line = next(iter(str(error).strip().splitlines()), "")  # a CUDA out-of-memory message runs to several
    failed_jobs.append(f"{job}: {type(error).__name__}: {first_line} (traceback {_log_files()})")
    unexpected_failure = True


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _log_files() -> str:
    """Where the traceback just logged went: the job's log file(s) as Hydra's job logging set them up."""
    files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return "in " + ", ".join(files) if files else "above"


def list_failed_jobs() -> None:
    """After a multirun sweep, or when one is stopped (Ctrl-C, SIGTERM): its failed jobs so far, once."""
    if failed_jobs and _first_process():
        print(f"error: {len(failed_jobs)} job(s) of the sweep failed:\n  " + "\n  ".join(failed_jobs), file=sys.stderr)


def exit_status_of_sweep() -> int:
    """2 when every failed job was refused by the project's checks, 1 when another error failed one, else 0.

    Only the first process says so: under Lightning's DDP launcher, rank 0 is killed when another rank ends
    with a non-zero status before rank 0 has finished.
    """
    if not failed_jobs or not _first_process():
        return 0
    return 1 if unexpected_failure else 2


if __name__ == "__main__":
    try:
        main()
    finally:
        list_failed_jobs()
    sys.exit(exit_status_of_sweep())
