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


def tensor_checksum(t: torch.Tensor) -> torch.Tensor:
    """`bucket_checksum` of a tensor's bytes (zero-padded to 8), computed on its device."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() % 8:
        raw = torch.cat([raw, raw.new_zeros(8 - raw.numel() % 8)])
    return bucket_checksum(raw)


def weights_digest(named: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """`{name: [3 ints]}` for every tensor: compare a server's runtime weights with what was sent."""
    names = sorted(named)
    if not names:
        return {}
    sums = torch.stack([tensor_checksum(named[n]) for n in names]).cpu().tolist()
    return dict(zip(names, sums, strict=True))
