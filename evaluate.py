"""Evaluate checkpoints the way the PI paper does.

    python evaluate.py ckpt=PATH task=ppl
    python evaluate.py ckpt=PATH task=[ppl,passkey] position=pi scale=8   # a base model read with PI, no fine-tuning
    python evaluate.py ckpt=[base.ckpt,pi.ckpt] task=ppl ppl.windows=[256,512,1024,2048]
    python evaluate.py task=attention                                       # Figure 2, no checkpoint needed

Settings live in conf/evaluate.yaml; results (JSON, Markdown, PNG) go to Hydra's run dir or out_dir.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from data.errors import DataError
from evaluation.errors import EvaluationError
from evaluation.run import evaluate
from model.checkpoints import CheckpointError
from model.position import PositionError

USER_ERRORS = (EvaluationError, CheckpointError, PositionError, DataError)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Thin wrapper: a user error is one line on stderr and exit status 2, not a traceback."""
    try:
        evaluate(cfg)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
