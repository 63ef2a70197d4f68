"""Packing a split's token stream into fixed-length training windows."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from data.errors import DataError
from data.tokens import TokenStore


class PackedWindows(Dataset):
    """Non-overlapping windows of seq_len + 1 tokens over the concatenated documents.

    Window i covers tokens [i * seq_len, i * seq_len + seq_len + 1): inputs are its first
    seq_len tokens and targets its last seq_len, so consecutive windows share one boundary
    token and every token after the first is a target exactly once. The incomplete tail is dropped.
    """

    def __init__(self, tokens: TokenStore | np.ndarray, seq_len: int, split: str = "train") -> None:
        """Window `tokens` (a TokenStore or a 1-D id array) into seq_len + 1 token items."""
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be a positive number of tokens; set seq_len >= 1")
        self.source = tokens
        self.seq_len = seq_len
        self.split = split
        n = tokens.num_tokens if isinstance(tokens, TokenStore) else len(tokens)
        self.num_tokens = n
        if n < seq_len + 1:
            raise DataError(
                f"the {split} split has {n} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}; "
                f"lower seq_len or add text to the {split} split"
            )
        self._len = (n - 1) // seq_len

    def _array(self) -> np.ndarray:
        """The token ids, opened lazily so a pickled dataset maps the file in each worker."""
        return self.source.tokens if isinstance(self.source, TokenStore) else self.source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range for {self._len} windows")
        start = i * self.seq_len
        window = np.asarray(self._array()[start : start + self.seq_len + 1], dtype=np.int64)
        return torch.from_numpy(window)
