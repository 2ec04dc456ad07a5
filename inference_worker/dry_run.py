"""The vLLM side of `POST /check` (`layercast check`): ask every worker, merge their answers.

Read-only: runs `ManifestCheckMixin.layercast_check` through `WorkerRpc` (tagged `collective_rpc`); the load
path and problems reported are the first worker's that has any (TP ranks hold different shards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from configs.api import RuntimeTensor, WeightsStatus
from configs.check import CheckRequest, CheckResponse
from inference_worker.worker_rpc import WorkerRpc
from rpc.errors import SyncFailed

CHECK_RPC_TIMEOUT_S = 120.0


class VllmDryRun:
    def __init__(self, rpc: WorkerRpc, status: Callable[[], WeightsStatus]) -> None:
        self._rpc = rpc
        self._status = status

    async def check(self, req: CheckRequest) -> CheckResponse:
        body = req.model_dump(mode="json")
        results = await self._rpc.call("layercast_check", CHECK_RPC_TIMEOUT_S, **body)
        for rank, res in enumerate(results):
            if not res.get("ok"):
                raise SyncFailed(f"check failed on worker {rank}: {res.get('error')}", status_code=500)

        def first(key: str) -> Any:
            return next((r[key] for r in results if r.get(key)), None)

        refused = next((r for r in results if r["load_path"] is None), None)
        chosen = refused or results[0]
        status = self._status()
        return CheckResponse(
            load_path=chosen["load_path"],
            load_path_reason=chosen["load_path_reason"],
            num_workers=len(results),
            state=status.state,
            weights_version=status.weights_version,
            runtime_manifest=[RuntimeTensor(**t) for t in results[0]["runtime_manifest"]],
            checkpoint_problem=first("checkpoint_problem"),
            kernel_problem=first("kernel_problem"),
        )
