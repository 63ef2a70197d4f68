"""The deterministic train/validation/test split by document."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from data.errors import DataError

SPLITS = ("train", "validation", "test")
# Bump when the rule below changes: it is part of every cache key.
SPLIT_VERSION = 1
VAL_FRACTION = 0.05
TEST_FRACTION = 0.05


def split_sizes(n: int, val_fraction: float = VAL_FRACTION, test_fraction: float = TEST_FRACTION) -> dict[str, int]:
    """Documents per split: ceil(fraction * n) for validation and test (at least 1 each), the rest train."""
    if n < 3:
        raise DataError(
            f"found {n} document(s) but the split by document needs at least 3 "
            "(one each for train, validation and test); add more documents"
        )
    # round() first so float noise (0.05 * 20 = 1.0000000000000002) cannot bump the ceiling.
    n_val = max(1, math.ceil(round(n * val_fraction, 9)))
    n_test = max(1, math.ceil(round(n * test_fraction, 9)))
    if n_val + n_test >= n:
        n_val = n_test = (n - 1) // 2  # keep at least one training document
    return {"train": n - n_val - n_test, "validation": n_val, "test": n_test}


def split_documents(
    names: Sequence[str], val_fraction: float = VAL_FRACTION, test_fraction: float = TEST_FRACTION
) -> dict[str, list[int]]:
    """Indices of `names` per split: rank by sha256(name); first ranks test, next validation, rest train.

    Each split keeps the input order. The rank depends only on a document's own name, so adding
    or removing other documents moves few documents between splits, and never splits a document.
    """
    sizes = split_sizes(len(names), val_fraction, test_fraction)
    # Index as tie-break: identical names (duplicate jsonl texts) still get a stable order.
    ranked = sorted(range(len(names)), key=lambda i: (hashlib.sha256(names[i].encode("utf-8")).hexdigest(), i))
    test = set(ranked[: sizes["test"]])
    val = set(ranked[sizes["test"] : sizes["test"] + sizes["validation"]])
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i in range(len(names)):
        out["test" if i in test else "validation" if i in val else "train"].append(i)
    return out
