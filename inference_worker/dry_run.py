"""The vLLM side of `POST /check` (`layercast check`): ask every worker, merge their answers.

Read-only: runs `ManifestCheckMixin.layercast_check` through `WorkerRpc` (tagged `collective_rpc`); the load
path and problems reported are the first worker's that has any (TP ranks hold different shards).
"""

from __future__ import annotations

from collections.abc import Callable

from configs.api import WeightsStatus
from configs.check import CheckRequest, CheckResponse
from inference_worker.worker_results import CheckResult
from inference_worker.worker_rpc import WorkerRpc
from rpc.errors import SyncError

CHECK_RPC_TIMEOUT_S = 120.0


class VllmDryRun:
    def __init__(self, rpc: WorkerRpc, status: Callable[[], WeightsStatus]) -> None:
        self._rpc = rpc
        self._status = status

    async def check(self, req: CheckRequest) -> CheckResponse:
        body = req.model_dump(mode="json")
        results = await self._rpc.call("layercast_check", CHECK_RPC_TIMEOUT_S, CheckResult, **body)
        for rank, res in enumerate(results):
            if not res.ok:
                raise SyncError(f"check failed on worker {rank}: {res.error}", status_code=500)

        refused = next((r for r in results if r.load_path is None), None)
        chosen = refused or results[0]
        status = self._status()
        return CheckResponse(
            load_path=chosen.load_path,
            load_path_reason=chosen.load_path_reason,
            num_workers=len(results),
            state=status.state,
            weights_version=status.weights_version,
            runtime_manifest=results[0].runtime_manifest,
            checkpoint_problem=next((r.checkpoint_problem for r in results if r.checkpoint_problem), None),
            kernel_problem=next((r.kernel_problem for r in results if r.kernel_problem), None),
        )
