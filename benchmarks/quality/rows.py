"""Fixed-length token rows cut from a token stream: training batches and evaluation subsets."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def stream_rows(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    """Cut a token stream ``uint16[N]`` into non-overlapping rows: ``LongTensor[N // seq_len, seq_len]``."""
    n = len(stream) // seq_len
    return torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)


def spread(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows evenly spaced through ``rows`` (all of them when fewer): ``[min(count, N), S]``.

    Evenly spaced rather than the first ``count``, so a small evaluation set still covers
    documents from the whole split.
    """
    if count >= len(rows):
        return rows
    idx = torch.linspace(0, len(rows) - 1, count).round().long()
    return rows[idx]


def batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches ``LongTensor[batch_size, S]``: one seeded permutation per epoch."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(rows), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield rows[order[i : i + batch_size]]
        epoch += 1
