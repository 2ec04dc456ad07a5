"""Deadlines, in seconds, for each blocking step of one sync; expiry aborts the group."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timeouts:
    """`header_s` bounds a receiver's wait for the next sync to start; `bucket_s` bounds each bucket
    (including a slow consumer on the far side); `commit_s` includes the last consumer finishing."""

    header_s: float = 300.0
    vote_s: float = 60.0
    bucket_s: float = 60.0
    commit_s: float = 120.0
