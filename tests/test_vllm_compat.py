"""Fails loudly when a vLLM upgrade changes what ``inference_worker.vllm_compat`` relies on.

Static part: version, signatures, private names. Live part: one CPU engine on a tiny random Qwen3-MoE
with vLLM's default CPU kernels (oneDNN linear, CPU fused MoE): worker attributes, recorded reload
metadata, opaque-layout detection, and a layerwise reload that reproduces the fresh engine exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any
from weakref import WeakKeyDictionary

import pytest

from inference_worker import vllm_compat
from inference_worker.extension import LayercastWorkerExtension
from tests.conftest import TinyModel, greedy, start_llm, stop_llm


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_version() -> None:
    vllm_compat.check_vllm_version()
    assert vllm_compat.vllm_version().startswith(vllm_compat.EXPECTED_VLLM_VERSION)


def test_reload_api() -> None:
    from vllm.model_executor.model_loader import reload
    from vllm.model_executor.model_loader.reload import layerwise, types
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    assert _params(reload.record_metadata_for_reloading) == ["model"]
    assert _params(reload.initialize_layerwise_reload) == ["model"]
    assert _params(reload.finalize_layerwise_processing) == ["model", "model_config"]
    assert callable(reload.finalize_layerwise_reload)
    assert _params(process_weights_after_loading) == ["model", "model_config", "target_device"]
    assert isinstance(layerwise.LAYERWISE_INFO, WeakKeyDictionary)
    fields = set(types.LayerReloadingInfo.__dataclass_fields__)
    needed = {"restore_metadata", "kernel_tensors", "load_numel", "load_numel_total", "loaded_weights"}
    assert needed <= fields
    assert callable(types.LayerReloadingInfo.can_load)


def test_worker_api() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert _params(GPUModelRunner.reload_weights) == [
        "self",
        "weights_iterator",
        "weights_path",
        "is_checkpoint_format",
    ]
    assert callable(CPUModelRunner.get_model) and callable(GPUModelRunner.get_model)
    for name in (
        "reload_weights",
        "start_weight_update",
        "update_weights",
        "finish_weight_update",
        "init_weight_transfer_engine",
        "get_model",
    ):
        assert callable(getattr(Worker, name)), name
    # vLLM asserts the extension adds no attribute the worker already has
    ours = [a for a in dir(LayercastWorkerExtension) if not a.startswith("__")]
    assert ours and not [a for a in ours if hasattr(Worker, a)]


def test_cpu_kernel_switches() -> None:
    import vllm._custom_ops as ops
    from vllm.model_executor.layers import utils
    from vllm.model_executor.layers.fused_moe import cpu_fused_moe

    assert isinstance(ops._supports_onednn, bool)
    assert _params(utils.dispatch_cpu_unquantized_gemm) == ["layer", "remove_weight"]
    src = inspect.getsource(utils.dispatch_cpu_unquantized_gemm)
    assert "ops._supports_onednn" in src and "layer.cpu_linear" in src
    assert {"forward_torch", "forward_grouped_gemm"} <= set(vars(cpu_fused_moe.CPUFusedMOE))


def test_entrypoints_api() -> None:
    from vllm.entrypoints.llm import LLM
    from vllm.entrypoints.openai import api_server
    from vllm.entrypoints.serve.dev.cache import api_router as cache
    from vllm.entrypoints.serve.dev.rlhf import api_router as rlhf
    from vllm.entrypoints.serve.dev.rpc import api_router as rpc
    from vllm.entrypoints.serve.dev.sleep import api_router as sleep
    from vllm.plugins import ENDPOINT_PLUGINS_GROUP
    from vllm.v1.engine.async_llm import AsyncLLM

    routes = set()
    for mod in (rlhf, rpc, cache, sleep):
        for r in mod.router.routes:
            routes |= {(m, r.path) for m in r.methods}
    missing = [r for r in vllm_compat.DEV_ROUTES if r not in routes]
    assert not missing, missing
    assert ENDPOINT_PLUGINS_GROUP == "vllm.endpoint_plugins"
    for fn in (
        api_server.build_app,
        api_server.init_app_state,
        api_server.build_async_engine_client,
        api_server.run_server,
        api_server.build_and_serve,
    ):
        assert callable(fn)
    assert "VLLM_SERVER_DEV_MODE" in inspect.getsource(api_server.build_app)
    assert _params(AsyncLLM.collective_rpc) == ["self", "method", "timeout", "args", "kwargs"]
    assert _params(LLM.collective_rpc)[:5] == ["self", "method", "timeout", "args", "kwargs"]


# --- live engine (Qwen3-MoE, default CPU kernels) ------------------------------------------------


@pytest.fixture(scope="module")
def moe(tiny_models: dict[str, TinyModel]) -> Iterator[tuple[Any, TinyModel, Any]]:
    tm = tiny_models["qwen3_moe"]
    llm = start_llm(tm.dir_b)
    try:
        yield llm, tm, greedy(llm)
    finally:
        stop_llm(llm)


@pytest.mark.slow
def test_live_worker(moe: tuple[Any, TinyModel, Any]) -> None:
    llm = moe[0]
    info = llm.collective_rpc("layercast_describe")[0]
    assert info["model_cls"] == "Qwen3MoeForCausalLM"
    assert info["layerwise_metadata"] and not info["layerwise_in_progress"]
    assert info["device"] == "cpu" and info["model_config_cls"] == "ModelConfig" and info["kv_caches"] >= 1
    # default CPU kernels: linear weights live in oneDNN handles -> checkpoint/kernel refused
    assert any(n.endswith("qkv_proj") for n in info["opaque_modules"]), info["opaque_modules"]
    assert info["checkpoint_refusal"] and info["auto_path"][0] == "layerwise"


@pytest.mark.slow
def test_moe_layerwise_and_refusals(moe: tuple[Any, TinyModel, Any]) -> None:
    llm, tm, ref = moe
    before = llm.collective_rpc("layercast_weights_checksum")[0]
    for path in ("checkpoint", "kernel"):
        res = llm.collective_rpc("layercast_load", kwargs={"path": path, "tensors": str(tm.file_a)})[0]
        assert not res["ok"] and "opaque" in res["error"], res
    assert llm.collective_rpc("layercast_weights_checksum")[0] == before
    res = llm.collective_rpc("layercast_load", kwargs={"path": "layerwise", "tensors": str(tm.file_a)})[0]
    assert res["ok"], res
    assert greedy(llm) != ref
    res = llm.collective_rpc("layercast_load", kwargs={"path": "auto", "tensors": str(tm.file_b)})[0]
    assert res["ok"] and res["path"] == "layerwise", res
    assert greedy(llm) == ref
