"""A cheap, order-sensitive checksum of one bucket, computed where the bucket lives (CPU or GPU).

The bucket's 8-byte words are laid out as rows of `_COLS`; the checksum is three wrap-around int64 sums:
all words, row sums weighted by row number, column sums weighted by column number. Any single changed
word changes the first; moved words change a weighted one. Two passes over the data, O(rows + _COLS)
extra memory, no host sync (the result stays on the device until the commit).
Invariant: integer addition wraps mod 2^64, so the result is bit-identical on every rank and device.
"""

from __future__ import annotations

import torch

_COLS = 512


def bucket_checksum(bucket: torch.Tensor) -> torch.Tensor:
    """int64 tensor of shape (3,) for a uint8 bucket whose length is a multiple of 8."""
    words = bucket.view(torch.int64)
    n = words.numel() - words.numel() % _COLS
    grid, tail = words[:n].view(-1, _COLS), words[n:]
    rows = torch.cat([grid.sum(1), tail.sum().reshape(1)])
    cols = grid.sum(0)
    cols[: tail.numel()] += tail
    row_w = torch.arange(1, rows.numel() + 1, dtype=torch.int64, device=bucket.device)
    col_w = torch.arange(1, _COLS + 1, dtype=torch.int64, device=bucket.device)
    return torch.stack([rows.sum(), (rows * row_w).sum(), (cols * col_w).sum()])
