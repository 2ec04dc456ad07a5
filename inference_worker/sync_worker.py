"""The network half of the worker extension: join the broadcast group, receive a sync, load it.

`layercast_init` and `layercast_receive` run on every worker of a server through `collective_rpc`.
They never raise through the RPC: each returns a typed result (`worker_results`: `ok`, `kind`, `error`,
`torn`, ...) that `engine_backend` turns into an HTTP answer. Invariants:
- nothing is loaded before every rank accepted the header (names, shapes, dtypes, scheme, ids checked);
- a worker whose load started and did not finish reports `torn=True` (the server then refuses to serve);
- after a timeout or a lost peer the group is aborted; the next `/init_broadcaster` makes a fresh one
  in the same processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from broadcaster.control import announcement
from broadcaster.errors import TAKEN_OVER, BroadcastError, BroadcastTimeout, SyncFailed, SyncRefused
from broadcaster.group import Group
from broadcaster.receiver import Receiver, view_bucket
from broadcaster.timeouts import Timeouts
from configs.api import InitBroadcasterRequest, SyncTimings
from configs.quant import QuantScheme
from configs.wire import SyncHeader
from inference_worker import load_paths, vllm_compat
from inference_worker.manifest_check import check_checkpoint_manifest
from inference_worker.worker_results import (
    InitResult,
    PollResult,
    ReceiveResult,
    WorkerResult,
    failure,
    runtime_layout,
)
from inference_worker.worker_rpc import tagged

# Above every deadline we apply (header waits can be long between RL steps): our own deadline polling
# decides, never NCCL's watchdog.
RECEIVER_OP_TIMEOUT_S = 24 * 3600.0
MAX_BUCKET_ENV = "LAYERCAST_MAX_BUCKET_BYTES"
DEFAULT_MAX_BUCKET_BYTES = 4 * 2**30


class _SyncState:
    """What one worker remembers between RPCs."""

    def __init__(
        self,
        req: InitBroadcasterRequest,
        group: Group,
        rank: int,
        path: str,
        server_ranks: range,
        max_bucket: int,
    ):
        self.req = req
        self.max_bucket = max_bucket
        self.group = group
        self.rank = rank
        self.path = path
        self.server_ranks = server_ranks
        # The manifest of the last accepted sync (the same objects while the trainer's manifest does not
        # change: `broadcaster.control.HeaderCache`), so per-step checks run once per manifest.
        self.accepted: tuple[Any, ...] | None = None
        self._copy_plan: tuple[tuple[Any, ...], list[bool]] | None = None

    def copy_plan(self, header: SyncHeader) -> list[bool]:
        cached = self._copy_plan
        if cached is None or cached[0] is not header.entries:
            cached = self._copy_plan = (header.entries, layerwise_copy_plan(header))
        return cached[1]


# Tensors vLLM's layerwise reload holds until finalize (attention/KV-cache scales), not until their module
# completes.
_HELD_TO_FINALIZE = ("k_scale", "v_scale", "q_scale", "prob_scale")


def _holding_group(name: str) -> str:
    """A unit that contains every tensor of the module `name` belongs to: the decoder layer
    (`model.layers.7`) for numbered blocks, else the parent module (`lm_head`)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def layerwise_copy_plan(header: SyncHeader) -> list[bool]:
    """Per entry: must the layerwise path copy the received tensor before handing it to vLLM?

    Layerwise reload keeps a module's tensors (by reference) until the module is complete, and a view of
    bucket b is valid until the receiver is asked for bucket b+2 (`broadcaster.receiver`). So a view needs
    no copy when everything its module needs has arrived by bucket b+1 — checked conservatively per
    decoder layer. Staging tensors (entries split over buckets) are owned already.
    """
    buckets = view_bucket(header)
    last: dict[str, int] = {}
    for entry in header.entries:
        group = _holding_group(entry.name)
        last[group] = max(last.get(group, -1), entry.pieces[-1].bucket)
    return [
        b is not None and (last[_holding_group(e.name)] > b + 1 or e.name.endswith(_HELD_TO_FINALIZE))
        for e, b in zip(header.entries, buckets, strict=True)
    ]


def _where(req: InitBroadcasterRequest) -> str:
    return f"rendezvous {req.master_address}:{req.master_port}"


def max_bucket_bytes() -> int:
    """The largest bucket this server accepts from a trainer (`LAYERCAST_MAX_BUCKET_BYTES`, default
    `DEFAULT_MAX_BUCKET_BYTES`): a header announcing larger buckets is refused before any allocation."""
    raw = os.environ.get(MAX_BUCKET_ENV, "")
    try:
        value = int(raw) if raw else DEFAULT_MAX_BUCKET_BYTES
    except ValueError:
        raise ValueError(f"{MAX_BUCKET_ENV}={raw!r} is not an integer number of bytes") from None
    if value < 1024:
        raise ValueError(f"{MAX_BUCKET_ENV}={value} is below the smallest bucket (1024 bytes)")
    return value


def _within(
    stream: Iterator[tuple[str, torch.Tensor]], group: Group, deadline: float, sync_id: str, timeout_s: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """`stream`, aborting the group (the trainer learns it at once) when the sync's deadline passes."""
    for item in stream:
        if time.monotonic() > deadline:
            reason = f"sync {sync_id!r} passed its {timeout_s:.0f} s deadline while loading"
            group.abort(reason)
            raise BroadcastTimeout(f"rank {group.rank}: {reason}; group aborted")
        yield item


def _owned_where_needed(
    stream: Iterator[tuple[str, torch.Tensor]], copy: list[bool], stats: dict[str, int]
) -> Iterator[tuple[str, torch.Tensor]]:
    for (name, t), must in zip(stream, copy, strict=False):
        if must:
            stats["copied_bytes"] += t.numel() * t.element_size()
            t = t.clone()
        yield name, t


class BroadcastReceiverMixin:
    """Mixed into the vLLM worker (with `LayercastWorkerExtension`)."""

    _layercast_sync: _SyncState | None = None

    @tagged
    def layercast_init(self, request: dict[str, Any]) -> WorkerResult:
        try:
            req = InitBroadcasterRequest.model_validate(request)
        except ValueError as exc:
            return failure("bad_request", f"invalid init request: {exc}")
        index, server_size = vllm_compat.worker_index(self)
        rank = req.rank_offset + index
        last = req.rank_offset + server_size - 1
        if last >= req.world_size:
            return failure(
                "bad_request",
                f"this server has {server_size} workers needing ranks {req.rank_offset}..{last}, "
                f"but world_size={req.world_size} only has ranks up to {req.world_size - 1}",
            )
        model = vllm_compat.worker_model(self)
        try:
            path, reason = load_paths.choose_load_path(model, req.load_path, None)
            max_bucket = max_bucket_bytes()
        except (load_paths.LoadPathError, ValueError) as exc:
            return failure("bad_request", str(exc))
        owner = self._layercast_owner(req)
        if owner is not None:
            return failure("refused", owner)
        device = vllm_compat.worker_device(self)
        old = self._layercast_sync
        if old is not None:
            if req.takeover and old.group.broken is None:
                old.group.abort(f"{TAKEN_OVER} {req.trainer_id or '(unnamed)'} of {_where(req)}")
            old.group.close()
            self._layercast_sync = None
        try:
            group = Group(
                req.master_address,
                req.master_port,
                req.world_size,
                rank,
                backend=req.backend,
                who=f"inference server ranks {req.rank_offset}..{last}, worker {index}",
                op_timeout_s=RECEIVER_OP_TIMEOUT_S,
                timeout_s=req.rendezvous_timeout_s,
                device=device,
                secret=req.group_secret,
            )
        except BroadcastError as exc:
            return failure("timeout" if isinstance(exc, BroadcastTimeout) else "bad_request", str(exc))
        self._layercast_sync = _SyncState(
            req, group, rank, path, range(req.rank_offset, last + 1), max_bucket
        )
        # The runtime layout is answered for the kernel path, and under `auto` wherever the kernel path could
        # load it (the trainer then moves the group to the kernel path if it produces exactly this layout).
        kernel_possible = req.load_path == "auto" and not vllm_compat.opaque_runtime_modules(model)
        manifest = (
            runtime_layout(load_paths.runtime_manifest(model))
            if path == "kernel" or kernel_possible
            else None
        )
        return InitResult(
            ok=True, rank=rank, load_path=path, load_path_reason=reason, runtime_manifest=manifest
        )

    def _layercast_owner(self, req: InitBroadcasterRequest) -> str | None:
        """Why `req` may not replace this worker's group: another trainer's group is alive (its store
        answers and nobody aborted it). None when the group is gone, is the same trainer's, or the
        request takes over explicitly."""
        old = self._layercast_sync
        if old is None or req.takeover or old.req.trainer_id == req.trainer_id:
            return None
        try:
            old.group.check_health()
        except BroadcastError:
            return None  # that trainer is gone (or frozen past the store's bound): its group is dead
        return (
            f"this server is in the live broadcast group of trainer {old.req.trainer_id or '(unnamed)'} "
            f"({_where(old.req)}); a second trainer ({req.trainer_id or '(unnamed)'}, {_where(req)}) may "
            "take it over only with takeover=true, which fails the first trainer's next call"
        )

    @tagged
    def layercast_poll(self, sync_id: str) -> WorkerResult:
        """Has the trainer started sync `sync_id`? Store reads only: no collective is posted, so the
        engine keeps generating between polls. `announced` is True once it has; a cancellation by the
        trainer, or an aborted or lost group, is a failed result."""
        state = self._layercast_sync
        if state is None:
            return failure("not_ready", "not joined to a broadcast group: call /init_broadcaster first")
        try:
            said = announcement(state.group)
        except BroadcastError as exc:
            return failure("failed", f"{exc}; re-run /init_broadcaster")
        if said is None or (said.sync_id != sync_id and said.cancelled is not None):
            return PollResult(ok=True, announced=False)
        if said.cancelled is not None:
            return failure("refused", f"the trainer cancelled sync {sync_id!r}: {said.cancelled}")
        return PollResult(ok=True, announced=True)

    def _layercast_check(
        self, header: SyncHeader, sync_id: str, version: int, scheme: QuantScheme
    ) -> str | None:
        if header.sync_id != sync_id:
            return f"trainer sent sync {header.sync_id!r} but this server was asked to receive {sync_id!r}"
        if header.weights_version != version:
            return (
                f"trainer sent weights_version {header.weights_version}, this server was asked for {version}"
            )
        if header.scheme != scheme:
            return (
                f"trainer sends scheme {header.scheme.kind} ({header.scheme.source}) but this server was "
                f"initialised for {scheme.kind} ({scheme.source})"
            )
        state = self._layercast_sync
        assert state is not None
        want = "kernel" if state.path == "kernel" else "checkpoint"
        if header.layout != want:
            return f"trainer sends the {header.layout} layout but this server loads by the {state.path} path"
        if state.accepted is header.entries:
            return None
        model = vllm_compat.worker_model(self)
        entries = [(e.name, e.dtype, e.shape) for e in header.entries]
        if state.path == "kernel":
            problem = load_paths.check_kernel_manifest(model, entries)
        else:
            problem = check_checkpoint_manifest(model, entries)
        if problem is None:
            state.accepted = header.entries
        return problem

    @tagged
    def layercast_receive(
        self, sync_id: str, weights_version: int, timeout_s: float, refuse: str = ""
    ) -> WorkerResult:
        """Receive and load sync `sync_id`, which the trainer has announced (`layercast_poll`). Every wait
        is bounded by the init's step deadline, and the whole sync by `timeout_s`: past it the group is
        aborted (the trainer learns it at once) and the result is a timeout. A non-empty `refuse` (the
        server cannot load now, e.g. its weights are asleep) is this rank's accept vote: every rank
        refuses with it, nothing is loaded, the group stays usable."""
        state = self._layercast_sync
        if state is None:
            return failure("not_ready", "not joined to a broadcast group: call /init_broadcaster first")
        broken = state.group.broken
        if broken:
            return failure(
                "not_ready", f"the broadcast group was aborted ({broken}); re-run /init_broadcaster"
            )
        step = min(state.req.step_timeout_s, timeout_s)
        receiver = Receiver(
            state.group,
            timeouts=Timeouts(header_s=step, vote_s=step, bucket_s=step, commit_s=step),
            max_bucket_size=state.max_bucket,
        )
        started = time.perf_counter()
        try:
            incoming = receiver.begin(
                lambda h: refuse or self._layercast_check(h, sync_id, weights_version, state.req.scheme)
            )
        except SyncRefused as exc:
            return failure("refused", str(exc))
        except BroadcastError as exc:
            kind = "timeout" if isinstance(exc, BroadcastTimeout) else "failed"
            return failure(kind, f"{exc}; re-run /init_broadcaster")
        wait_s = time.perf_counter() - started
        stream: Iterator[tuple[str, torch.Tensor]] = _within(
            iter(incoming), state.group, time.monotonic() + timeout_s - wait_s, sync_id, timeout_s
        )
        copies = {"copied_bytes": 0}
        if state.path == "layerwise":
            stream = _owned_where_needed(stream, state.copy_plan(incoming.header), copies)
        manifest = [(e.name, e.dtype, e.shape) for e in incoming.header.entries]
        load_error = ""
        stats: dict[str, Any] = {}
        t_load = time.perf_counter()
        try:
            stats = self._load_stream(state.path, stream, manifest, manifest_checked=True)  # type: ignore[attr-defined]
            if state.path == "layerwise":
                stats["copied_bytes"] = copies["copied_bytes"]
        except BroadcastError as exc:  # the wire failed mid-stream: the group is gone
            kind = "timeout" if isinstance(exc, BroadcastTimeout) else "failed"
            return failure(kind, f"{exc}; re-run /init_broadcaster", torn=True)
        except Exception as exc:
            load_error = f"loading failed on rank {state.rank}: {type(exc).__name__}: {exc}"
        load_s = time.perf_counter() - t_load
        try:
            report = incoming.finish(ok=not load_error, reason=load_error)
        except SyncFailed as exc:
            ours = [r for r in exc.reasons if r in state.server_ranks or r == 0]
            if ours or load_error:
                return failure("failed", str(exc), torn=True)
            # Only other servers failed: every tensor of ours arrived and loaded, so this server is
            # complete at the new version; the orchestrator learns of the others from them.
            return ReceiveResult(
                ok=True,
                load_path=state.path,
                bytes_received=incoming.header.total_bytes,
                num_tensors=len(incoming.header.entries),
                timings=SyncTimings(wait_s=wait_s, load_s=load_s, total_s=time.perf_counter() - started),
                peer_error=str(exc),
            )
        except BroadcastError as exc:
            kind = "timeout" if isinstance(exc, BroadcastTimeout) else "failed"
            return failure(kind, f"{exc}; re-run /init_broadcaster", torn=True)
        timings = SyncTimings(
            wait_s=wait_s,
            receive_s=report.wait_s,
            load_s=load_s - report.wait_s,
            commit_s=report.commit_s,
            total_s=time.perf_counter() - started,
        )
        return ReceiveResult(
            ok=True,
            load_path=state.path,
            bytes_received=report.payload_bytes,
            num_tensors=report.tensors,
            timings=timings,
            load_stats=stats,
        )
