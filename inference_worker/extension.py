"""vLLM worker extension (``worker_extension_cls``) exposing layercast's load paths via ``collective_rpc``.

Mixed into vLLM's worker class, so ``self`` is the worker. ``_load_stream(path, iterator, manifest)`` is
the single entry point that consumes ``(name, tensor)`` pairs; the network receive
(``sync_worker.BroadcastReceiverMixin``: ``layercast_init`` / ``layercast_receive``) feeds it. The
``layercast_*`` methods are what ``collective_rpc`` calls (arguments must be msgpack-able when the
engine runs in its own process: pass safetensors paths, not tensors).

Importing this module with ``LAYERCAST_CPU_PLAIN_LINEAR=1`` on a CPU build makes vLLM keep linear
weights in place (see ``vllm_compat.use_plain_cpu_linear``); vLLM imports it before loading the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from broadcaster.checksum import weights_digest
from inference_worker import load_paths, vllm_compat
from inference_worker.check_worker import ManifestCheckMixin
from inference_worker.sync_worker import BroadcastReceiverMixin

vllm_compat.maybe_use_plain_cpu_linear()

MAX_KEPT_STATS = 64


class LayercastWorkerExtension(BroadcastReceiverMixin, ManifestCheckMixin):
    """Methods added to the vLLM worker; all names start with ``layercast_`` / ``_layercast`` / ``_load``."""

    # --- helpers ------------------------------------------------------------------------------
    def _layercast_model(self) -> torch.nn.Module:
        return vllm_compat.worker_model(self)

    def _layercast_stats(self) -> list[dict[str, Any]]:
        stats: list[dict[str, Any]] | None = getattr(self, "_layercast_stats_list", None)
        if stats is None:
            stats = []
            self._layercast_stats_list = stats
        return stats

    def _load_stream(
        self,
        path: str,
        weights: Iterable[tuple[str, torch.Tensor]],
        manifest: Sequence[Sequence[Any]] | None = None,
        *,
        manifest_checked: bool = False,
    ) -> dict[str, Any]:
        """Consume one sync's ``(name, tensor)`` stream through ``path`` (``auto`` needs ``manifest``
        for the kernel path). Kernel loads require ``manifest`` and check it before copying, unless the
        caller checked it against this model already (``manifest_checked``: the sync's header vote).
        Returns the load stats (also kept for :meth:`layercast_load_stats`)."""
        model = self._layercast_model()
        # A concrete path is checked by its loader itself (kernel: the whole manifest before any copy),
        # so only `auto` needs the choice, which would otherwise run the same checks a second time.
        if path == "auto":
            chosen, reason = load_paths.choose_load_path(model, path, manifest)
        elif path in load_paths.LOAD_PATHS:
            chosen, reason = path, "requested"
        else:
            raise load_paths.LoadPathError(
                f"unknown load path {path!r}; expected auto or one of {load_paths.LOAD_PATHS}"
            )
        if chosen == "kernel":
            if manifest is None:
                raise load_paths.LoadPathError("kernel path needs the stream's manifest up front")
            stats = load_paths.load_kernel(model, weights, manifest, checked=manifest_checked)
        elif chosen == "layerwise":
            stats = load_paths.load_layerwise(model, weights, vllm_compat.worker_model_config(self))
        else:
            stats = load_paths.load_checkpoint(
                model, weights, vllm_compat.worker_model_config(self), vllm_compat.worker_device(self)
            )
        self._layercast_after_load()
        out = stats.as_dict() | {"reason": reason}
        kept = self._layercast_stats()
        kept.append(out)
        del kept[:-MAX_KEPT_STATS]
        return out

    def _layercast_after_load(self) -> None:
        """What vLLM's own reload_weights does after loading (encoder/multimodal caches).

        The KV prefix cache lives in the scheduler: callers reset it (``/pause`` with clear_cache,
        ``LLM.reset_prefix_cache``) before serving with new weights.
        """
        runner = self.model_runner  # type: ignore[attr-defined]
        for name in ("reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(runner, name, None)
            if callable(fn):
                fn()

    # --- collective_rpc methods ------------------------------------------------------------------
    def layercast_runtime_manifest(self) -> list[list[Any]]:
        """The runtime layout ``[[name, dtype, shape], ...]`` the trainer must produce for the kernel path."""
        return [[n, d, list(s)] for n, d, s in load_paths.runtime_manifest(self._layercast_model())]

    def layercast_choose_path(
        self, requested: str = "auto", manifest: list[list[Any]] | None = None
    ) -> list[str]:
        """``[path, reason]`` that :meth:`_load_stream` would use."""
        chosen, reason = load_paths.choose_load_path(self._layercast_model(), requested, manifest)
        return [chosen, reason]

    def layercast_load(
        self,
        path: str,
        tensors: str | dict[str, torch.Tensor] | list[tuple[str, torch.Tensor]],
        manifest: list[list[Any]] | None = None,
    ) -> dict[str, Any]:
        """Load ``tensors`` (a safetensors file path, or in-process a dict/list) through ``path``.

        Refusals (manifest mismatch, unusable path) come back as ``{"ok": False, "error": ...}`` with
        nothing copied; success as the load stats with ``"ok": True``.
        """
        device = vllm_compat.worker_device(self)
        if isinstance(tensors, str):
            from safetensors.torch import load_file

            pairs = list(load_file(tensors, device="cpu").items())
        elif isinstance(tensors, dict):
            pairs = list(tensors.items())
        else:
            pairs = [(str(n), t) for n, t in tensors]
        pairs = [(n, t.to(device)) for n, t in pairs]
        if manifest is None and path in ("kernel", "auto"):
            manifest = [list(e) for e in load_paths.manifest_of(pairs)]
        try:
            stats = self._load_stream(path, iter(pairs), manifest)
        except load_paths.LoadPathError as e:
            return {"ok": False, "error": str(e)}
        return stats | {"ok": True}

    def layercast_zero_kv_cache(self) -> int:
        """Zero the KV cache tensors; returns how many. For bit-reproducible tests: vLLM's CPU attention
        lets stale entries of partly filled blocks change softmax rounding (~1e-7). Not needed for
        correctness (reset the prefix cache after a load)."""
        caches = vllm_compat.worker_kv_caches(self)
        for t in caches:
            t.zero_()
        return len(caches)

    def layercast_describe(self) -> dict[str, Any]:
        """What the worker looks like to layercast (model class, load-path facts); for logs and tests."""
        model = self._layercast_model()
        chosen, reason = load_paths.choose_load_path(model, "auto")
        return {
            "vllm_version": vllm_compat.vllm_version(),
            "model_cls": type(model).__name__,
            "device": str(vllm_compat.worker_device(self)),
            "model_config_cls": type(vllm_compat.worker_model_config(self)).__name__,
            "kv_caches": len(vllm_compat.worker_kv_caches(self)),
            "layerwise_metadata": vllm_compat.layerwise_metadata_recorded(model),
            "layerwise_in_progress": vllm_compat.layerwise_reload_in_progress(model),
            "opaque_modules": vllm_compat.opaque_runtime_modules(model),
            "checkpoint_refusal": load_paths.checkpoint_path_safe(model),
            "auto_path": [chosen, reason],
        }

    def layercast_load_stats(self) -> list[dict[str, Any]]:
        """Stats of the recent loads, oldest first."""
        return list(self._layercast_stats())

    def layercast_weights_digest(self) -> dict[str, list[int]]:
        """Per runtime tensor, the wire checksum of its bytes, computed on the device (fast: a
        trainer compares it with `broadcaster.checksum.weights_digest` of what it sent)."""
        return weights_digest(load_paths.runtime_tensors(self._layercast_model()))

    def layercast_memory_stats(self, reset: str = "") -> dict[str, int] | None:
        """This worker's CUDA memory: allocated now and the peak since the last reset (`reset` is a
        string because vLLM's dev `/collective_rpc` route passes strings); None on CPU."""
        device = vllm_compat.worker_device(self)
        if device.type != "cuda":
            return None
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return {
            "allocated": torch.cuda.memory_allocated(device),
            "peak": torch.cuda.max_memory_allocated(device),
        }

    def layercast_weights_checksum(self) -> str:
        """sha256 over the names and bytes of all runtime tensors (sorted by name)."""
        h = hashlib.sha256()
        for name, t in sorted(load_paths.runtime_tensors(self._layercast_model()).items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
