"""What `/update_weights` refuses before it arms anything (409), unless the request says `force: true`.

A sync id names one set of weights: once a sync landed (state `ready`, no error since), the same id is
refused, whatever version it carries (a retry of an applied sync is the orchestrator's to skip, and
other weights under an id already used would make `/weights` and the logs lie). A `weights_version`
older than the served one is refused too: versions only move forward. A sync that failed, was refused
or tore the weights can be retried under its own id (the server then shows `last_error`, or `torn`).

Limit: `WeightsStatus` keeps the last sync id tried, not the last one landed, and `/init_broadcaster`
clears `last_error`; so a refused sync retried under its id after a re-init reads as landed (use a new
sync id, or `force`).
"""

from __future__ import annotations

from collections.abc import Callable

from configs.api import UpdateWeightsRequest, WeightsStatus
from rpc.errors import ApiError, Conflict


def refusal(status: WeightsStatus, req: UpdateWeightsRequest) -> str | None:
    """Why `req` must not run on a server in `status`, or None (also always None with `req.force`)."""
    if req.force:
        return None
    if status.state == "ready" and status.last_error is None and req.sync_id == status.last_sync_id:
        return (
            f"sync id {req.sync_id!r} already landed on this server (it serves weights_version "
            f"{status.weights_version}); use a new sync id for new weights, or send force: true"
        )
    if status.weights_version is not None and req.weights_version < status.weights_version:
        return (
            f"weights_version {req.weights_version} is older than the weights_version "
            f"{status.weights_version} this server serves; versions only move forward (send force: true "
            "to go back)"
        )
    return None


def check(get_status: Callable[[], WeightsStatus], req: UpdateWeightsRequest) -> Conflict | None:
    """The 409 for `req`, or None. A server whose status is not available yet (engine not up) is
    left to the sync itself, which answers why."""
    try:
        status = get_status()
    except ApiError:
        return None
    reason = refusal(status, req)
    return Conflict(reason) if reason else None
