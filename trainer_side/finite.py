"""Which of a model's weights hold NaN or infinity, found before a sync starts.

A non-finite weight must never reach a server: once a byte of a sync is loaded, refusing it leaves the
server torn. So the trainer checks every floating-point parameter (what the walker streams: this
rank's local shard of a DTensor; buffers such as rotary tables are not sent) before it announces the
sync, with one fused pass per (device, dtype) (`torch._foreach_norm` with ord=inf: NaN or inf in a
tensor makes its norm non-finite) and one host sync; names are looked up only when something is wrong.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # a DTensor: this rank's shard
    return to_local() if callable(to_local) else t


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters of `model` (local shards) holding NaN or inf."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for name, t in model.named_parameters():
        local = _local(t.detach())
        if local.is_floating_point() and local.numel() > 0:
            groups[(local.device, local.dtype)].append((name, local))
    bad: list[str] = []
    with torch.no_grad():
        for members in groups.values():
            norms = torch.stack(torch._foreach_norm([t for _, t in members], ord=float("inf")))
            finite = torch.isfinite(norms)
            if not bool(finite.all()):
                bad += [name for (name, _), ok in zip(members, finite.tolist(), strict=True) if not ok]
    return bad


def describe_nonfinite(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"non-finite values (NaN or inf) in {len(names)} weight tensor(s): {shown}"
