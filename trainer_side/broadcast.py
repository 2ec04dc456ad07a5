"""`WeightBroadcaster`: what an RL trainer calls after each step to push its weights to vLLM servers.

detect (once) → join the group with every server (`init`) → per step: plan the stream from metadata,
arm `/update_weights` on every server, walk the model one layer at a time, quantize, hand the tensors to
the broadcaster's sender, collect every server's answer → `PushReport`. On an FSDP trainer every rank
calls `push` (the layer gathers are collectives); global rank 0 sends, or, with `senders="every_rank"`,
every rank sends to its own servers in its own group (one local server per GPU, nothing broadcast
between trainer ranks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from broadcaster.control import cancel
from broadcaster.errors import TAKEN_OVER, BroadcastError
from broadcaster.framing import make_header
from broadcaster.group import Group
from broadcaster.report import SyncReport
from broadcaster.sender import Sender
from broadcaster.timeouts import Timeouts
from configs.api import (
    InitBroadcasterRequest,
    InitBroadcasterResponse,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    WeightsStatus,
)
from configs.quant import QuantScheme
from configs.trainer import BroadcasterConfig
from configs.wire import SyncHeader
from rpc.client.http_client import AsyncServerClient
from trainer_side.bucket_writer import BucketWriter
from trainer_side.detect import detect_quant_scheme
from trainer_side.finite import describe_nonfinite, nonfinite_tensors
from trainer_side.kernel_layout import KernelLayoutError, check_against_runtime, fuse_specs, fuse_tensors
from trainer_side.layers import ChunkGathers, plan_chunks
from trainer_side.names import NameMap
from trainer_side.walker import iter_layer_chunks, plan_stream

T = TypeVar("T")
LOGGER_NAME = "layercast.trainer"
# Server states that mean the server holds no membership in our group (it must be re-initialised).
_NOT_IN_GROUP = ("uninitialized", "failed")


@dataclass
class PushReport:
    """One push, as the trainer saw it. Seconds per phase; `servers` are the servers' own answers."""

    sync_id: str
    weights_version: int
    tensors: int = 0
    bytes_sent: int = 0
    group_check_s: float = 0.0  # the group's health and every server's status, before the sync
    plan_s: float = 0.0
    finite_check_s: float = 0.0
    quantize_s: float = 0.0
    send_s: float = 0.0
    commit_s: float = 0.0
    answer_s: float = 0.0  # from the trainer's commit to every server's HTTP answer
    layout_reason: str = ""  # why this layout (kernel or checkpoint) was sent
    # FSDP2: each parameter whose shards were gathered before quantizing (or alone), and why
    gathered_before_quantizing: dict[str, str] = field(default_factory=dict)
    total_s: float = 0.0
    wire: SyncReport | None = None
    servers: dict[str, UpdateWeightsResponse] = field(default_factory=dict)

    @property
    def gbytes_per_s(self) -> float:
        return self.bytes_sent / self.total_s / 1e9 if self.total_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"sync {self.sync_id} v{self.weights_version}: {self.tensors} tensors, "
            f"{self.bytes_sent / 1e6:.1f} MB in {self.total_s * 1e3:.0f} ms "
            f"(plan {self.plan_s * 1e3:.0f}, quantize {self.quantize_s * 1e3:.0f}, "
            f"send {self.send_s * 1e3:.0f}, commit {self.commit_s * 1e3:.0f} ms; "
            f"{self.gbytes_per_s:.2f} GB/s)"
        )

    def log_line(self) -> str:
        """`summary()` plus each phase the servers reported (max over servers): one log line per sync."""
        line = self.summary()
        if self.servers:
            t = [r.timings for r in self.servers.values()]
            line += (
                f"; servers ({len(t)}) wait {max(x.wait_s for x in t) * 1e3:.0f}, receive "
                f"{max(x.receive_s for x in t) * 1e3:.0f}, load {max(x.load_s for x in t) * 1e3:.0f}, "
                f"verify {max(x.commit_s for x in t) * 1e3:.0f} ms"
            )
        return line


class PushError(RuntimeError):
    """A push failed; `server_errors` maps each failing server URL to its reason."""

    def __init__(self, message: str, server_errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.server_errors = server_errors or {}


def _run_async(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]


class _Background:
    """Runs a coroutine factory in a thread (HTTP fan-out while this thread drives the collective)."""

    def __init__(self, fn: Callable[[], Awaitable[Any]]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Awaitable[Any]]) -> None:
        try:
            self.result = _run_async(fn)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout_s: float) -> Any:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"servers did not answer within {timeout_s:.0f} s")
        if self.error is not None:
            raise self.error
        return self.result


def _reason(exc: BaseException) -> str:
    """An exception as a reason that is never empty (httpx's timeouts have no message)."""
    text = str(exc)
    if text and not isinstance(exc, httpx.HTTPError):
        return text
    return f"{type(exc).__name__}: {text or 'no detail'}"


def _finite_verdict(model: nn.Module) -> str | None:
    """Why `model` must not be sent (non-finite weights on this rank, or on another trainer rank: the
    flag is all-reduced, so every rank of an FSDP trainer gets the same verdict), or None."""
    bad = nonfinite_tensors(model)
    if dist.is_initialized() and dist.get_world_size() > 1:
        on_gpu = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        flag = torch.tensor([1 if bad else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) and not bad:
            return "another trainer rank found non-finite values (NaN or inf) in its weight shards"
    return describe_nonfinite(bad) if bad else None


class WeightBroadcaster:
    """Construct from a `BroadcasterConfig`, `init()` once, `push(model, version)` per step, `close()`.

    Each push on the sending rank logs one line to `logger` (default `layercast.trainer`): INFO with the
    report, WARNING with the reason when it failed. Pass the trainer's own logger to see them there."""

    def __init__(
        self, config: BroadcasterConfig, name_map: NameMap | None = None, logger: logging.Logger | None = None
    ) -> None:
        self.config = config
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.scheme: QuantScheme = detect_quant_scheme(config.inference_config)
        self.name_map = name_map
        self.group: Group | None = None
        # Names this trainer to the servers: a server in another trainer's live group refuses to join ours.
        self.trainer_id = f"trainer-{uuid.uuid4().hex[:12]}"
        self.init_responses: dict[str, InitBroadcasterResponse] = {}
        self._dtype = getattr(torch, config.send_dtype) if config.send_dtype else None
        self._kernel_rename: dict[str, str] = {}
        # The last push's header (manifest planned once while the model's parameters and the servers'
        # layout stay the same; each push only swaps the ids) and its bucket writer, or why there is
        # none. Cleared by `init()`.
        self._template: tuple[tuple[Any, ...], SyncHeader] | None = None
        self._writer: BucketWriter | str = "not planned"
        # `load_path="auto"`: whether this group was moved to the kernel path, or why not (None: not tried
        # yet for this group; reset by a plain `init()`).
        self.layout_reason: str | None = None

    # ------------------------------------------------------------------ init

    def _clients(self) -> list[AsyncServerClient]:
        c = self.config
        return [AsyncServerClient(url, c.token, c.http_timeout_s) for url in c.servers]

    async def _statuses(self) -> list[WeightsStatus]:
        clients = self._clients()
        try:
            statuses = await asyncio.gather(*(cl.weights() for cl in clients), return_exceptions=True)
        finally:
            await asyncio.gather(*(cl.aclose() for cl in clients))
        errors = {
            cl.base_url: s for cl, s in zip(clients, statuses, strict=True) if isinstance(s, BaseException)
        }
        if errors:
            detail = "; ".join(f"{u}: {type(e).__name__}: {e}" for u, e in errors.items())
            raise PushError(
                f"cannot reach inference server(s) for GET /weights: {detail}",
                {u: str(e) for u, e in errors.items()},
            )
        return statuses  # type: ignore[return-value]

    async def _workers_per_server(self) -> list[int]:
        return [s.num_workers or 1 for s in await self._statuses()]

    def init(self, load_path: str | None = None) -> dict[str, InitBroadcasterResponse]:
        """Join every server to a fresh group (a rendezvous: all servers are called concurrently).
        `load_path` overrides the config's for this group (the kernel upgrade of `auto`)."""
        if not self._sends():
            return {}
        self.close()
        self._template = None
        if load_path is None:
            self.layout_reason = None
        c = self.config
        sizes = _run_async(self._workers_per_server)
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        world = 1 + sum(sizes)
        group_secret = secrets.token_hex(32)  # this generation's: only its ranks are admitted; never logged
        requests = [
            InitBroadcasterRequest(
                master_address=c.master_address,
                master_port=c.master_port,
                world_size=world,
                rank_offset=off,
                scheme=self.scheme,
                load_path=load_path or c.load_path,
                backend=c.backend,
                rendezvous_timeout_s=c.rendezvous_timeout_s,
                step_timeout_s=c.step_timeout_s,
                checksum=c.checksum,
                trainer_id=self.trainer_id,
                takeover=c.takeover,
                group_secret=group_secret,
            )
            for off in offsets
        ]

        async def init_one(client: AsyncServerClient, req: InitBroadcasterRequest) -> InitBroadcasterResponse:
            try:
                return await client.init_broadcaster(req)
            except Exception as exc:
                # A server that refused will never join: end the rendezvous now for every rank. The group's
                # own rendezvous loop (this process, another thread) publishes it through its store client:
                # a second store client opened here, racing the group's, once left the rendezvous hung.
                refusals.append(f"{client.base_url} refused to join: {exc}")
                raise

        async def call_all() -> list[InitBroadcasterResponse | BaseException]:
            clients = self._clients()
            try:
                return await asyncio.gather(
                    *(init_one(cl, r) for cl, r in zip(clients, requests, strict=True)),
                    return_exceptions=True,
                )
            finally:
                await asyncio.gather(*(cl.aclose() for cl in clients))

        refusals: list[str] = []
        http = _Background(call_all)
        group_error: BaseException | None = None
        try:
            self.group = Group(
                c.master_address,
                c.master_port,
                world,
                0,
                backend=c.backend,  # `auto` is decided at the rendezvous, from every rank's device
                who="trainer",
                timeout_s=c.rendezvous_timeout_s,
                secret=group_secret,
                cancelled=lambda: refusals[0] if refusals else None,
            )
        except BroadcastError as exc:
            group_error = exc
        results = http.join(c.rendezvous_timeout_s + c.http_timeout_s + 60)
        errors = {
            url: str(r) for url, r in zip(c.servers, results, strict=True) if isinstance(r, BaseException)
        }
        if errors or group_error:
            self.close()
            detail = "; ".join(f"{u}: {e}" for u, e in errors.items())
            raise PushError(f"init failed: {group_error or ''} {detail}".strip(), errors)
        self.init_responses = dict(zip(c.servers, results, strict=True))  # type: ignore[arg-type]
        paths = {r.load_path for r in self.init_responses.values()}
        if "kernel" in paths and len(paths) > 1:
            self.close()
            raise PushError(
                f"servers chose different load paths {sorted(paths)}: the kernel layout needs all kernel"
            )
        return self.init_responses

    def _kernel_upgrade(self, model: nn.Module) -> str:
        """`load_path="auto"` picks the fastest path proven for the served model: servers that can load the
        runtime layout answered it at init; when this trainer produces exactly that layout for every
        server (TP 1), the group is re-formed once on the kernel path. Returns what was decided and why."""
        resps = list(self.init_responses.values())
        if not resps or self.layout == "kernel":
            return f"layout {self.layout}"
        if any(r.tensor_parallel_size != 1 for r in resps):
            return "checkpoint layout: a server has tensor parallelism > 1 (the kernel path serves TP 1)"
        if any(r.runtime_manifest is None for r in resps):
            return "checkpoint layout: a server cannot load its runtime layout (opaque kernel weights)"
        specs = [
            (s.name, s.dtype, s.shape)
            for s in plan_stream(model, self.scheme, self.name_map, dtype=self._dtype)
        ]
        try:
            self._kernel_specs(specs)
        except KernelLayoutError as exc:
            return f"checkpoint layout: this trainer does not produce the servers' runtime layout ({exc})"
        try:
            self.init(load_path="kernel")
        except PushError as exc:
            self.init()  # back on the servers' own choice
            return f"checkpoint layout: the kernel path was refused at init ({exc})"
        return "kernel layout: this trainer produces every server's runtime layout (auto moved to kernel)"

    @property
    def layout(self) -> str:
        """`kernel` when the servers load runtime tensors (the trainer fuses), else `checkpoint`."""
        paths = {r.load_path for r in self.init_responses.values()}
        return "kernel" if paths == {"kernel"} else "checkpoint"

    def _kernel_specs(
        self, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        # vLLM 0.26 nests routed experts one level deeper (`experts.routed_experts.w13_weight`) for
        # some MoE layers: follow the names the worker reported.
        runtime_names = {t.name for r in self.init_responses.values() for t in r.runtime_manifest or []}
        self._kernel_rename = {
            n.replace(".routed_experts.", "."): n for n in runtime_names if ".routed_experts." in n
        }
        fused = [(self._kernel_rename.get(n, n), d, s) for n, d, s in fuse_specs(specs)]
        for url, resp in self.init_responses.items():
            runtime = [(t.name, t.dtype, t.shape) for t in resp.runtime_manifest or []]
            problem = check_against_runtime(fused, runtime)
            if problem:
                raise KernelLayoutError(f"{url}: {problem}")
        return fused

    # ------------------------------------------------------------------ push

    def _timed_stream(
        self, model: nn.Module, report: PushReport, kernel: bool, gathers: ChunkGathers | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        chunks = iter_layer_chunks(model, self.scheme, self.name_map, dtype=self._dtype, gathers=gathers)
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            if chunk is None:
                report.quantize_s += time.perf_counter() - t0
                return
            tensors = chunk.tensors
            if kernel:
                tensors = [(self._kernel_rename.get(n, n), t) for n, t in fuse_tensors(chunk.tensors)]
            report.quantize_s += time.perf_counter() - t0
            yield from tensors

    def tensors(self, model: nn.Module, layout: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Exactly the `(name, tensor)` pairs `push` would send now, or in `layout` (`kernel`: vLLM's
        runtime names, fused; `checkpoint`: HF names) — for checks and dry runs. On an FSDP trainer every
        rank must iterate it (the gathers are collectives)."""
        return self._timed_stream(model, PushReport("", 0), (layout or self.layout) == "kernel")

    def push(
        self, model: nn.Module, version: int, sync_id: str | None = None, *, arm: bool = True
    ) -> PushReport:
        """Send `model`'s weights as `version` to every server; returns when all servers answered.

        With `arm=False` the servers' `/update_weights` is started by someone else (the orchestrator,
        `rpc.client.orchestrator.SyncOrchestrator`): this only sends, and `report.servers` stays empty."""
        started = time.perf_counter()
        sync_id = sync_id or f"v{version}-{uuid.uuid4().hex[:8]}"
        report = PushReport(sync_id=sync_id, weights_version=version)
        # First on every rank (an all-reduce on FSDP trainers): the verdict on non-finite weights.
        problem = _finite_verdict(model)
        report.finite_check_s = time.perf_counter() - started
        if not self._sends():
            if problem is not None:
                raise PushError(f"sync {sync_id} not started: {problem}")
            # The sending rank gathers each chunk with this rank (collectives): run them, make nothing.
            if (peer_gathers := self._gathers(model)) is not None:
                peer_gathers.drain()
            return report
        if problem is not None:
            with contextlib.suppress(BroadcastError, PushError):
                self._ensure_group()
                assert self.group is not None
                # Servers armed for this sync (by an orchestrator) answer at once, not at their deadline.
                cancel(self.group, sync_id, problem)
            message = f"sync {sync_id} not started: {problem}; no server was touched"
            self.logger.warning("%s (v%d)", message, version)
            raise PushError(message)
        gathers = self._gathers(model)
        try:
            return self._send(model, version, sync_id, arm, report, started, gathers)
        finally:
            if gathers is not None:
                if not gathers.done:  # the sync failed before its stream ran them: the other ranks wait
                    gathers.drain()
                report.gathered_before_quantizing = dict(gathers.notes)

    def _sends(self) -> bool:
        """Whether this trainer rank sends (see `BroadcasterConfig.senders`)."""
        return self.config.senders == "every_rank" or not dist.is_initialized() or dist.get_rank() == 0

    def _gathers(self, model: nn.Module) -> ChunkGathers | None:
        """This push's FSDP gathers, issued in the same order on every rank; None for an unsharded model
        (no collectives to keep in step, so no chunk planning on its push)."""
        if not any(isinstance(p, DTensor) for p in model.parameters()):
            return None
        return ChunkGathers(plan_chunks(model, self.scheme, self.name_map), self.scheme, self._dtype)

    def _send(
        self,
        model: nn.Module,
        version: int,
        sync_id: str,
        arm: bool,
        report: PushReport,
        started: float,
        gathers: ChunkGathers | None,
    ) -> PushReport:
        group_started = time.perf_counter()
        self._ensure_group()
        c = self.config
        if c.load_path == "auto" and self.layout_reason is None:
            reason = self._kernel_upgrade(model)
            self.layout_reason = reason
            self.logger.debug("load path auto: %s", reason)  # also in every PushReport.layout_reason
        assert self.group is not None
        report.layout_reason = self.layout_reason or f"load_path={c.load_path}"
        t0 = time.perf_counter()
        report.group_check_s = t0 - group_started
        header = self._header(model, sync_id, version)
        report.plan_s = time.perf_counter() - t0
        req = UpdateWeightsRequest(sync_id=sync_id, weights_version=version, timeout_s=c.sync_timeout_s)

        # Once the trainer's side of the sync is over (`wire_ended`), every server answers within about
        # a step: one that does not (a dead engine core, a hung API process) is named, never waited for
        # until the sync's own deadline.
        wire_ended: list[float] = []
        answer_grace_s = c.step_timeout_s + 10.0

        async def arm_one(cl: AsyncServerClient) -> UpdateWeightsResponse:
            task = asyncio.ensure_future(cl.update_weights(req))
            while not task.done():
                if wire_ended and time.monotonic() - wire_ended[0] > answer_grace_s:
                    task.cancel()
                    raise TimeoutError(
                        f"no answer to POST /update_weights {answer_grace_s:.0f} s after the trainer's side "
                        "of the sync ended: the server's engine may be dead (check its /health)"
                    )
                await asyncio.wait([task], timeout=0.05)
            try:
                return task.result()
            except Exception as exc:
                if not wire_ended and self.group is not None:
                    # This server will not take part in the sync (refused before joining it, e.g. 409 for
                    # an old version): stop the sender's wait for it now, not at its step deadline.
                    self.group.request_abort(f"{cl.base_url} did not join sync {sync_id}: {_reason(exc)}")
                raise

        async def arm_all() -> list[UpdateWeightsResponse | BaseException]:
            clients = self._clients()
            try:
                return await asyncio.gather(*(arm_one(cl) for cl in clients), return_exceptions=True)
            finally:
                await asyncio.gather(*(cl.aclose() for cl in clients))

        http = _Background(arm_all) if arm else None
        sender = Sender(
            self.group,
            timeouts=Timeouts(
                header_s=c.step_timeout_s,
                vote_s=c.step_timeout_s,
                bucket_s=c.step_timeout_s,
                commit_s=c.step_timeout_s,
            ),
        )
        wire_error: BaseException | None = None
        writer = self._writer if isinstance(self._writer, BucketWriter) else None
        if writer is not None and gathers is not None:
            writer.use_gathers(gathers)
        stream = writer or self._timed_stream(model, report, header.layout == "kernel", gathers)
        try:
            report.wire = sender.send(header, stream)
        except BroadcastError as exc:
            wire_error = exc
        wire_ended.append(time.monotonic())
        answer_start = time.perf_counter()
        results = http.join(answer_grace_s + 30) if http is not None else [None] * len(c.servers)
        report.answer_s = time.perf_counter() - answer_start
        errors = {
            url: _reason(r) for url, r in zip(c.servers, results, strict=True) if isinstance(r, BaseException)
        }
        report.servers = {
            url: r for url, r in zip(c.servers, results, strict=True) if isinstance(r, UpdateWeightsResponse)
        }
        report.total_s = time.perf_counter() - started
        if wire_error or errors:
            detail = "; ".join(f"{u}: {e}" for u, e in errors.items())
            message = f"sync {sync_id} failed: {wire_error or ''} {detail}".strip()
            self.logger.warning("%s (v%d, after %.2f s)", message, version, report.total_s)
            raise PushError(message, errors)
        wire = report.wire
        assert wire is not None
        report.tensors, report.bytes_sent = wire.tensors, wire.payload_bytes
        if writer is not None:
            report.quantize_s = wire.work_s  # quantized in place while filling the buckets
        report.send_s, report.commit_s = wire.transfer_s - report.quantize_s, wire.commit_s
        self.logger.info("%s", report.log_line())
        return report

    def _header(self, model: nn.Module, sync_id: str, version: int) -> SyncHeader:
        """This push's header; the manifest (and the bucket writer) is re-planned only when the model's
        parameters (names, dtypes, shapes, or the parameter objects themselves: the writer reads the
        ones it planned with) or the servers' layout changed since the last push."""
        c = self.config
        key = (
            id(model),
            tuple((n, id(p), p.dtype, tuple(p.shape)) for n, p in model.named_parameters()),
            self.layout,
        )
        if self._template is None or self._template[0] != key:
            specs = [
                (s.name, s.dtype, s.shape)
                for s in plan_stream(model, self.scheme, self.name_map, dtype=self._dtype)
            ]
            if self.layout == "kernel":
                specs = self._kernel_specs(specs)
            template = make_header(
                specs,
                layout=self.layout,
                sync_id=sync_id,
                weights_version=version,
                scheme=self.scheme,
                bucket_size=c.bucket_bytes,
                checksum=c.checksum,
            )
            self._template = (key, template)
            self._writer = self._plan_writer(model, template)
        return self._template[1].model_copy(update={"sync_id": sync_id, "weights_version": version})

    def _plan_writer(self, model: nn.Module, header: SyncHeader) -> BucketWriter | str:
        if not self.config.direct_write:
            return "direct_write is off"
        writer = BucketWriter.build(
            model, self.scheme, header, name_map=self.name_map, dtype=self._dtype, rename=self._kernel_rename
        )
        if isinstance(writer, str):
            self.logger.debug("streaming through the layer walker: %s", writer)
        return writer

    def _ensure_group(self) -> None:
        """Re-init (a fresh group with every server) when the group was aborted by a failed sync, here
        or on any server, or when a server is not in it any more: restarted (`uninitialized`) or left
        without a group by a failed `/init_broadcaster` (`failed`)."""
        if self.group is not None:
            try:
                self.group.check_health()
                statuses = _run_async(self._statuses)
                # A server in another trainer's group (restarted, taken over) needs an init: it refuses
                # with 409 while that group lives, unless this trainer takes over.
                if not any(s.state in _NOT_IN_GROUP or s.trainer_id != self.trainer_id for s in statuses):
                    return
            except BroadcastError as exc:
                if TAKEN_OVER in str(exc):
                    self.close()
                    raise PushError(
                        f"another trainer took the servers over (takeover=true): {exc}; this trainer's "
                        "group is closed (init() again with takeover=True to take them back)"
                    ) from exc
        self.init()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
