"""Train or extend a LLaMA's context window.

    python train.py                          # pretrain the bundled base at its short window
    python train.py position=pi scale=8      # extend it 8x with Position Interpolation
    python train.py -m position=rope,pi,ntk scale=4   # an ablation sweep
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from data import DataError
from model.checkpoints import CheckpointError
from training.config import ConfigError
from training.run import train

USER_ERRORS = (ConfigError, DataError, CheckpointError)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except USER_ERRORS as error:
        # A user's mistake gets one sentence, not a traceback.
        logging.getLogger("train").error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
