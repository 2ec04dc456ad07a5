"""Load a stream of ``(name, tensor)`` pairs into a live vLLM model by one of three paths.

* ``checkpoint``: HF-checkpoint names -> ``model.load_weights`` -> vLLM's ``process_weights_after_loading``.
  Valid only while the runtime tensors are still in model format (see :func:`checkpoint_path_safe`).
* ``layerwise``: HF-checkpoint names -> vLLM 0.26 layerwise reload (one initialize/finalize pair per
  sync); each module is processed as soon as all its tensors arrived. Works for processed/quantized
  models; needs the metadata vLLM records at model init.
* ``kernel``: vLLM runtime names/layouts (``named_parameters()`` + persistent buffers after processing)
  copied straight into the live tensors, after the whole manifest was checked.

"Valid" kernel layout: the trainer's manifest equals :func:`runtime_manifest` entry for entry (names,
dtype, shape) and no module keeps its weights in an opaque kernel handle (CPU oneDNN/prepacked MoE).
For unquantized models on GPU the runtime layout is the fused model format (``qkv_proj`` = [q; k; v],
``gate_up_proj`` = [gate; up], MoE ``w13_weight`` [E, 2I, H] / ``w2_weight`` [E, H, I], TP-sharded); a
trainer that fuses like that may use the kernel path, otherwise it sends checkpoint names.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from configs.api import LoadPath
from configs.check import ManifestRow
from inference_worker import vllm_compat

LOAD_PATHS: tuple[str, ...] = ("checkpoint", "layerwise", "kernel")


class LoadPathError(ValueError):
    """A requested path cannot be used, or the stream does not fit the model (nothing was copied)."""


@dataclass
class LoadStats:
    """Timings and sizes of one load."""

    path: str
    n_tensors: int = 0
    n_bytes: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "n_tensors": self.n_tensors,
            "n_bytes": self.n_bytes,
            "seconds": self.seconds,
            "phases": dict(self.phases),
        }


def dtype_str(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _counting(
    weights: Iterable[tuple[str, torch.Tensor]], stats: LoadStats
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        stats.n_tensors += 1
        stats.n_bytes += tensor.numel() * tensor.element_size()
        yield name, tensor


# --- kernel layout --------------------------------------------------------------------------------


def runtime_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The live runtime tensors a kernel-format stream fills, by name (receive directly into these).

    Parameters only (tied ones once), as vLLM's own ``reload_weights(is_checkpoint_format=False)``.
    Buffers are derived state and stay as they are: rotary caches and the attention KV-cache scales
    ``_k_scale``/``_v_scale``/``_q_scale`` (1.0 unless the KV cache is FP8; an FP8 KV cache's scales
    are re-derived only by the checkpoint/layerwise paths).
    """
    return dict(model.named_parameters())


def runtime_manifest(model: torch.nn.Module) -> list[ManifestRow]:
    """``[(name, dtype_str, shape)]`` of every runtime tensor, sorted by name (reported at init)."""
    return sorted((n, dtype_str(t.dtype), tuple(t.shape)) for n, t in runtime_tensors(model).items())


def check_kernel_manifest(model: torch.nn.Module, entries: Sequence[Sequence[Any]]) -> str | None:
    """``None`` when ``entries`` is exactly the model's runtime layout, else a message saying why not."""
    opaque = vllm_compat.opaque_runtime_modules(model)
    if opaque:
        return (
            f"kernel layout not copyable: {len(opaque)} module(s) keep weights in an opaque kernel "
            f"handle/prepacked layout (e.g. {opaque[0]}); use the layerwise path"
        )
    live = runtime_tensors(model)
    problems: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        name, dt, shape = str(entry[0]), str(entry[1]), tuple(int(s) for s in entry[2])
        if name in seen:
            problems.append(f"duplicate {name}")
            continue
        seen.add(name)
        t = live.get(name)
        if t is None:
            problems.append(f"unknown {name}")
        elif dt != dtype_str(t.dtype):
            problems.append(f"{name}: dtype {dt} != runtime {dtype_str(t.dtype)}")
        elif shape != tuple(t.shape):
            problems.append(f"{name}: shape {list(shape)} != runtime {list(t.shape)}")
    missing = sorted(set(live) - seen)
    if missing:
        more = " ..." if len(missing) > 5 else ""
        problems.append(f"missing {len(missing)}: {', '.join(missing[:5])}{more}")
    if not problems:
        return None
    head = "; ".join(problems[:8])
    more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
    return f"kernel manifest does not match the runtime layout: {head}{more}"


def manifest_of(weights: Iterable[tuple[str, torch.Tensor]]) -> list[ManifestRow]:
    """The manifest a materialised list of tensors would announce."""
    return [(n, dtype_str(t.dtype), tuple(t.shape)) for n, t in weights]


def load_kernel(
    model: torch.nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    manifest: Sequence[Sequence[Any]],
    *,
    checked: bool = False,
) -> LoadStats:
    """Copy runtime-format tensors into the live tensors; ``manifest`` is checked before any copy
    (``checked=True``: the caller already ran :func:`check_kernel_manifest` on this model). Every
    streamed tensor is still matched against ``manifest``."""
    stats = LoadStats("kernel")
    t0 = time.perf_counter()
    problem = None if checked else check_kernel_manifest(model, manifest)
    if problem:
        raise LoadPathError(problem)
    expected = {str(e[0]): (str(e[1]), tuple(int(s) for s in e[2])) for e in manifest}
    live = runtime_tensors(model)
    stats.phases["check_s"] = time.perf_counter() - t0
    done: set[str] = set()
    with torch.no_grad():
        for name, tensor in _counting(weights, stats):
            if expected.get(name) != (dtype_str(tensor.dtype), tuple(tensor.shape)) or name in done:
                raise LoadPathError(
                    f"stream tensor {name} {dtype_str(tensor.dtype)} {list(tensor.shape)} "
                    "was not announced in the manifest (or came twice)"
                )
            dst = live[name]
            if dst.data_ptr() != tensor.data_ptr():
                dst.data.copy_(tensor)
            done.add(name)
    if len(done) != len(expected):
        raise LoadPathError(f"stream ended after {len(done)} of {len(expected)} announced tensors")
    stats.seconds = time.perf_counter() - t0
    return stats


# --- checkpoint and layerwise paths ---------------------------------------------------------------


def checkpoint_path_safe(model: torch.nn.Module) -> str | None:
    """``None`` when load_weights + processing can run again on the live model, else why not."""
    opaque = vllm_compat.opaque_runtime_modules(model)
    if opaque:
        return f"runtime weights of {opaque[0]} (and {len(opaque) - 1} more) are in an opaque kernel layout"
    recorded = vllm_compat.model_format_entries(model)
    if not recorded:
        return "no model-format metadata recorded for this model"
    recorded_params = vllm_compat.model_format_params(model)
    for name, param in model.named_parameters():
        rec = recorded.get(name)
        if rec is None:
            return f"{name} was created by processing (not in model format)"
        meta = recorded_params.get(name)
        if meta is not None and type(meta) is not type(param):
            # e.g. FP8 processing re-wraps ModelWeightParameter as a plain Parameter: same shape and
            # dtype, but its weight loader is gone (vllm#28425); load_weights would fail half-way.
            return (
                f"{name} was re-wrapped by processing ({type(meta).__name__} -> {type(param).__name__}); "
                "its weight loader is gone"
            )
        if rec != (param.dtype, tuple(param.shape)):
            return (
                f"{name} was transformed by processing ({dtype_str(rec[0])} {list(rec[1])} -> "
                f"{dtype_str(param.dtype)} {list(param.shape)}); load+process again is not idempotent"
            )
    return None


def layerwise_supported(model: torch.nn.Module) -> str | None:
    """``None`` when vLLM's layerwise reload can be used on ``model``, else why not."""
    if not vllm_compat.layerwise_metadata_recorded(model):
        return "model has no layerwise-reload metadata (not built by vLLM's initialize_model)"
    if vllm_compat.layerwise_reload_in_progress(model):
        return "a layerwise reload is already in progress (initialize without finalize)"
    return None


def load_checkpoint(
    model: torch.nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    model_config: Any,
    device: torch.device,
) -> LoadStats:
    """``model.load_weights`` then vLLM's ``process_weights_after_loading`` (refused if unsafe)."""
    problem = checkpoint_path_safe(model)
    if problem:
        raise LoadPathError(f"checkpoint path refused: {problem}")
    stats = LoadStats("checkpoint")
    t0 = time.perf_counter()
    with torch.no_grad():
        vllm_compat.load_weights(model, _counting(weights, stats))
        t1 = time.perf_counter()
        vllm_compat.process_weights_after_loading(model, model_config, device)
    t2 = time.perf_counter()
    stats.phases.update(load_s=t1 - t0, process_s=t2 - t1)
    stats.seconds = t2 - t0
    return stats


def load_layerwise(
    model: torch.nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    model_config: Any,
) -> LoadStats:
    """One vLLM layerwise reload: initialize, ``load_weights`` (modules processed as they complete), finalize.

    Tensors are buffered by reference until their module is complete: do not overwrite them earlier.
    Finalize runs even when the stream fails, so the model is never left with meta tensors.
    """
    problem = layerwise_supported(model)
    if problem:
        raise LoadPathError(f"layerwise path refused: {problem}")
    stats = LoadStats("layerwise")
    t0 = time.perf_counter()
    with torch.no_grad():
        vllm_compat.initialize_layerwise_reload(model)
        t1 = time.perf_counter()
        try:
            vllm_compat.load_weights(model, _counting(weights, stats))
        finally:
            t2 = time.perf_counter()
            vllm_compat.finalize_layerwise_reload(model, model_config)
    t3 = time.perf_counter()
    stats.phases.update(init_s=t1 - t0, load_s=t2 - t1, finalize_s=t3 - t2)
    stats.seconds = t3 - t0
    return stats


# --- choice ---------------------------------------------------------------------------------------


def choose_load_path(
    model: torch.nn.Module,
    requested: str,
    trainer_manifest: Sequence[Sequence[Any]] | None = None,
) -> tuple[LoadPath, str]:
    """Pick the path: ``requested`` is ``auto`` or one of :data:`LOAD_PATHS`.

    ``auto``: ``kernel`` when the trainer announced a manifest equal to the runtime layout (and it is
    copyable), else ``layerwise`` when vLLM's metadata is there, else ``checkpoint`` when the live
    tensors are still in model format. An explicit request that cannot work raises :class:`LoadPathError`.
    """
    if requested == "kernel":
        if trainer_manifest is None:
            problem = vllm_compat.opaque_runtime_modules(model)
            if problem:
                raise LoadPathError(f"kernel path refused: {problem[0]} has an opaque runtime layout")
            return "kernel", "requested; manifest checked per load"
        mismatch = check_kernel_manifest(model, trainer_manifest)
        if mismatch:
            raise LoadPathError(mismatch)
        return "kernel", "requested; trainer manifest matches the runtime layout"
    if requested == "layerwise":
        problem = layerwise_supported(model)
        if problem:
            raise LoadPathError(f"layerwise path refused: {problem}")
        return "layerwise", "requested"
    if requested == "checkpoint":
        problem = checkpoint_path_safe(model)
        if problem:
            raise LoadPathError(f"checkpoint path refused: {problem}")
        return "checkpoint", "requested; live tensors are in model format"
    if requested != "auto":
        raise LoadPathError(f"unknown load path {requested!r}; expected auto or one of {LOAD_PATHS}")

    reasons: list[str] = []
    if trainer_manifest is not None:
        mismatch = check_kernel_manifest(model, trainer_manifest)
        if mismatch is None:
            return "kernel", "trainer produces the runtime layout"
        reasons.append(mismatch)
    else:
        reasons.append("trainer announced no runtime-layout manifest")
    problem = layerwise_supported(model)
    if problem is None:
        return "layerwise", "; ".join([*reasons, "vLLM layerwise reload available"])
    reasons.append(problem)
    problem = checkpoint_path_safe(model)
    if problem is None:
        return "checkpoint", "; ".join([*reasons, "live tensors are in model format"])
    reasons.append(problem)
    raise LoadPathError("no load path fits: " + "; ".join(reasons))
