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


def _first_process() -> bool:
    """Rank 0 under Lightning's own launcher, torchrun or SLURM: messages are printed once, not per rank."""
    return all(int(os.environ.get(key, "0")) == 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _sweep_job() -> str | None:
    """"job 3 (position=pi scale=1)" inside a multirun sweep, None in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    return f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)})"


def _fail(error: Exception) -> None:
    """A user's mistake (or a diverged run) gets one sentence and exit status 2, not a traceback.

    In a multirun sweep the other jobs still run (one refused value should not cost a sweep its other runs);
    the sweep lists its failed jobs at the end and exits 2.
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


def _record_unexpected_failure(job: str, error: Exception) -> None:
    global unexpected_failure
    logging.getLogger("train").exception("%s failed", job)
    failed_jobs.append(f"{job}: {type(error).__name__}: {error} (traceback in the job's log, {_job_log()})")
    unexpected_failure = True
    import gc

    import torch

    gc.collect()  # the failed job's model and optimizer, before the next job allocates its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _job_log() -> str:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    return os.path.join(hydra_cfg.runtime.output_dir, f"{hydra_cfg.job.name}.log")


def finish_sweep() -> None:
    """After a multirun sweep: list its failed jobs and exit 2 (refused ones only) or 1 (any other error)."""
    if not failed_jobs:
        return
    if _first_process():
        print(f"error: {len(failed_jobs)} job(s) of the sweep failed:\n  " + "\n  ".join(failed_jobs), file=sys.stderr)
    sys.exit(1 if unexpected_failure else 2)


if __name__ == "__main__":
    main()
    finish_sweep()
