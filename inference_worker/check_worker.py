"""The worker half of `layercast check`: what `/init_broadcaster` would choose, decided read-only.

`layercast_check` runs on every worker through `collective_rpc` (mixed into the worker extension). It
asks the same functions `layercast_init` and the loaders use (`load_paths.choose_load_path`,
`load_paths.check_kernel_manifest`, `manifest_check.check_checkpoint_manifest`) and joins no group,
receives nothing and changes no tensor. Like every `layercast_*` RPC it never raises.
"""

from __future__ import annotations

from typing import Any

from inference_worker import load_paths, vllm_compat
from inference_worker.manifest_check import check_checkpoint_manifest
from inference_worker.worker_results import CheckResult, WorkerResult, failure, runtime_layout
from inference_worker.worker_rpc import tagged


class ManifestCheckMixin:
    """Mixed into the vLLM worker (with `LayercastWorkerExtension`)."""

    @tagged
    def layercast_check(
        self,
        load_path: str = "auto",
        checkpoint_manifest: list[list[Any]] | None = None,
        kernel_manifest: list[list[Any]] | None = None,
    ) -> WorkerResult:
        model = vllm_compat.worker_model(self)
        try:
            # As `layercast_init`: the trainer has not announced a manifest at init time.
            path: str | None
            path, reason = load_paths.choose_load_path(model, load_path, None)
        except load_paths.LoadPathError as exc:
            path, reason = None, str(exc)
        out = CheckResult(
            ok=True,
            load_path=path,  # type: ignore[arg-type]
            load_path_reason=reason,
            runtime_manifest=runtime_layout(load_paths.runtime_manifest(model)),
        )
        try:
            if checkpoint_manifest is not None:
                out.checkpoint_problem = check_checkpoint_manifest(model, checkpoint_manifest)
            if kernel_manifest is not None:
                out.kernel_problem = load_paths.check_kernel_manifest(model, kernel_manifest)
        except Exception as exc:  # a malformed entry: say so instead of failing the RPC
            return failure("failed", f"manifest check failed: {type(exc).__name__}: {exc}")
        return out
