"""The `ipc` backend's data plane: broadcasts through memory rank 0 shares with the ranks on its own device
(CUDA IPC on a GPU, a /dev/shm file on CPU), with the group's store as the only control channel.

This is how a colocated trainer (same GPU as its vLLM, where NCCL refuses two ranks) reaches its servers.
The sync protocol above it (header, accept vote, buckets, checksums, commit vote, deadlines) is unchanged:
`Group.broadcast` / `Group.all_reduce` / `Group.wait` dispatch here instead of to a process group.

Invariants:
- every rank numbers its broadcasts and all-reduces in call order; the group's lockstep makes op n the same
  op everywhere. Rank 0 publishes `wire/b/{n}` (a `SharedBroadcast`) only once the bytes are in place (on
  CUDA after a device synchronize); a receiver copies them out, synchronizes, then adds 1 to
  `wire/b/{n}/ack`. A receiver never writes into shared memory;
- buckets travel in rank 0's slots (`buffers()`, at most `SLOTS`, packed in place by the sender: no copy on
  the sending side); rank 0's work for a slot broadcast completes when every receiver acked it, and the
  sender reuses a slot only after waiting that work, so a slot is never overwritten while being read;
- anything else (headers, lengths, checksums) travels inside the store value, at most `INLINE_MAX_BYTES`;
  a larger broadcast outside the slots is refused (the protocol has none);
- a receiver opens a handle only if its `device_id` is its own device and its size covers the broadcast;
  a mismatch fails that wait, which aborts the group with the reason;
- /dev/shm files are unlinked once every receiver has mapped them (first ack of a slot broadcast), at close,
  and, for files of processes that no longer exist, when a new wire starts; nothing else is left behind.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from configs.wire import SharedBroadcast, SharedBufferHandle, SharedSlots

SLOTS = 2
INLINE_MAX_BYTES = 16 << 20
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "layercast-"


class WireStore(Protocol):
    """The bounded store of the group (`broadcaster.group._BoundedStore`)."""

    def set(self, key: str, value: str | bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def check(self, keys: list[str]) -> bool: ...
    def add(self, key: str, amount: int) -> int: ...
    def delete_key(self, key: str) -> bool: ...


class SharedWireError(RuntimeError):
    """A shared buffer cannot be used (wrong device, wrong size, cannot be mapped): the wait fails with it."""


def device_identity(device: torch.device) -> str:
    """The physical device, as ranks compare it: `cuda:<GPU UUID>` (independent of CUDA_VISIBLE_DEVICES
    numbering), or `cpu:<host>:<boot id>` for a host's memory."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{torch.cuda.get_device_properties(index).uuid}"
    if device.type == "cpu":
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = "unknown-boot"
        return f"cpu:{socket.gethostname()}:{boot}"
    raise SharedWireError(f"the ipc backend supports cuda and cpu devices, not {device}")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def _sweep_stale_shm() -> None:
    """Remove /dev/shm files of wires whose process is gone (a trainer killed before it could unlink)."""
    for path in SHM_DIR.glob(f"{SHM_PREFIX}*"):
        try:
            pid = int(path.name[len(SHM_PREFIX) :].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                path.unlink()
        except (ValueError, PermissionError):
            continue


def export_buffer(tensor: torch.Tensor, device_id: str, path: str = "") -> SharedBufferHandle:
    """The handle of `tensor` (a whole uint8 allocation made by `_new_slot`) for other processes."""
    nbytes = tensor.numel()
    if tensor.device.type == "cpu":
        return SharedBufferHandle(kind="cpu_shm", device_id=device_id, nbytes=nbytes, path=path)
    _dev, handle, size, offset, rc, rc_offset, event, event_sync = tensor.untyped_storage()._share_cuda_()
    return SharedBufferHandle(
        kind="cuda_ipc",
        device_id=device_id,
        nbytes=nbytes,
        handle_b64=_b64(handle),
        storage_bytes=size,
        offset_bytes=offset,
        ref_counter_b64=_b64(rc),
        ref_counter_offset=rc_offset,
        event_b64=_b64(event) if event else "",
        event_sync_required=bool(event_sync),
    )


def open_buffer(handle: SharedBufferHandle, device: torch.device, device_id: str) -> torch.Tensor:
    """Map another process's shared buffer on `device` (which must be the buffer's device)."""
    if handle.device_id != device_id:
        raise SharedWireError(
            f"a shared buffer of device {handle.device_id} cannot be opened on {device_id}: "
            "the ipc backend needs every rank on the trainer's device"
        )
    if handle.kind == "cpu_shm":
        if device.type != "cpu":
            raise SharedWireError(f"a /dev/shm buffer cannot be opened on {device}")
        path = Path(handle.path)
        if path.parent != SHM_DIR or not path.name.startswith(SHM_PREFIX):
            raise SharedWireError(
                f"refusing a shared buffer outside {SHM_DIR}/{SHM_PREFIX}*: {handle.path!r}"
            )
        try:
            size = path.stat().st_size
            if size < handle.nbytes:
                raise SharedWireError(f"{path} holds {size} bytes, the handle says {handle.nbytes}")
            return torch.from_file(str(path), shared=True, size=handle.nbytes, dtype=torch.uint8)
        except OSError as e:
            raise SharedWireError(f"cannot map the trainer's shared buffer {path}: {e}") from e
    if device.type != "cuda":
        raise SharedWireError(f"a CUDA IPC buffer cannot be opened on {device}")
    if handle.nbytes > handle.storage_bytes:
        raise SharedWireError(
            f"CUDA IPC handle: {handle.nbytes} bytes asked of a {handle.storage_bytes}-byte storage"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda._lazy_init()
    try:
        storage = torch.UntypedStorage._new_shared_cuda(
            index,
            _unb64(handle.handle_b64),
            handle.storage_bytes,
            handle.offset_bytes,
            _unb64(handle.ref_counter_b64),
            handle.ref_counter_offset,
            _unb64(handle.event_b64) if handle.event_b64 else b"",
            handle.event_sync_required,
        )
    except Exception as e:
        raise SharedWireError(f"cannot open the trainer's CUDA IPC buffer: {type(e).__name__}: {e}") from e
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage).reshape(-1)[: handle.nbytes]


class _Done:
    def is_completed(self) -> bool:
        return True

    def wait(self) -> bool:
        return True


class _PolledWork:
    """A wire op that completes on the poll (`Group.wait` calls `is_completed`) where `_poll()` first
    answers True; `_poll` does the op's store reads and copies, once."""

    _done = False
    _error: Exception | None = None

    def _poll(self) -> bool:
        raise NotImplementedError

    def is_completed(self) -> bool:
        if not self._done:
            self._done = self._poll()
        return self._done

    def wait(self) -> bool:
        while not self.is_completed():
            time.sleep(1e-4)
        if self._error is not None:
            raise self._error
        return True


class _Acked(_PolledWork):
    """Rank 0's work for a slot broadcast: complete once every receiver acked op `n`."""

    def __init__(self, wire: SharedWire, n: int) -> None:
        self._wire, self._n = wire, n

    def _poll(self) -> bool:
        return self._wire._acked(self._n)


class _Read(_PolledWork):
    """A receiver's work for broadcast `n`: on the poll that finds it published, copy it into `dst` (a
    `SharedWireError` is kept and raised by `wait`, where `Group.wait` turns it into an abort)."""

    def __init__(self, wire: SharedWire, n: int, dst: torch.Tensor) -> None:
        self._wire, self._n, self._dst = wire, n, dst

    def _poll(self) -> bool:
        if not self._wire._published(self._n):
            return False
        try:
            self._wire._read(self._n, self._dst)
        except SharedWireError as e:
            self._error = e
        return True


class _Reduce(_PolledWork):
    def __init__(self, wire: SharedWire, m: int, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> None:
        self._wire, self._m, self._tensor, self._op = wire, m, tensor, op

    def _poll(self) -> bool:
        if not self._wire._reduce_ready(self._m):
            return False
        self._wire._reduce(self._m, self._tensor, self._op)
        return True


class SharedWire:
    """Broadcast and all-reduce for one group whose ranks all sit on `device` (see module doc)."""

    def __init__(
        self, store: WireStore, rank: int, world_size: int, device: torch.device, device_id: str
    ) -> None:
        self._store, self.rank, self.world_size = store, rank, world_size
        self.device, self.device_id = device, device_id
        self._n = 0  # broadcasts so far
        self._m = 0  # all-reduces so far
        self._generation = -1
        self._slots: list[torch.Tensor] = []  # rank 0: its slots; receivers: the opened generation's
        self._paths: list[str] = []  # rank 0 on CPU: files still linked
        self._slot_op: list[int | None] = []  # rank 0: the broadcast that last used each slot
        self._inline_ops: list[int] = []  # rank 0: inline broadcasts whose keys are not deleted yet
        if rank == 0 and device.type == "cpu":
            _sweep_stale_shm()

    # ------------------------------------------------------------- rank 0

    def buffers(self, nbytes: int, count: int) -> list[torch.Tensor]:
        """`count` (<= SLOTS) shared buffers of at least `nbytes` for the sender to pack buckets into;
        grown (and re-published) when a sync needs more. Call between syncs only."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 sends through shared slots")
        if count > SLOTS:
            raise ValueError(f"the ipc backend has {SLOTS} slots, {count} asked for")
        self._sweep_keys()
        if not self._slots or self._slots[0].numel() < nbytes:
            busy = [n for n in self._slot_op if n is not None and not self._acked(n)]
            if busy:
                raise RuntimeError(f"cannot replace shared slots while broadcasts {busy} are unacknowledged")
            self._new_slots(max(nbytes, 1))
        return [s[:nbytes] for s in self._slots[:count]]

    def _new_slots(self, nbytes: int) -> None:
        self._unlink_all()
        self._generation += 1
        slots, handles, paths = [], [], []
        for _ in range(SLOTS):
            path = ""
            if self.device.type == "cpu":
                path = str(SHM_DIR / f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                try:
                    os.ftruncate(fd, nbytes)
                finally:
                    os.close(fd)
                slot = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            else:
                slot = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            slots.append(slot)
            paths.append(path)
            handles.append(export_buffer(slot, self.device_id, path))
        self._slots, self._paths, self._slot_op = slots, paths, [None] * SLOTS
        published = SharedSlots(generation=self._generation, slots=tuple(handles))
        self._store.set(f"wire/slots/{self._generation}", published.model_dump_json())

    def _slot_of(self, tensor: torch.Tensor) -> int | None:
        ptr = tensor.data_ptr()
        for j, slot in enumerate(self._slots):
            if slot.device == tensor.device and ptr == slot.data_ptr():
                return j
            base = slot.data_ptr()
            if slot.device == tensor.device and base < ptr < base + slot.numel():
                raise ValueError("a broadcast from inside a shared slot must start at the slot's first byte")
        return None

    def _acked(self, n: int) -> bool:
        if self._store.add(f"wire/b/{n}/ack", 0) < self.world_size - 1:
            return False
        if self._paths and n in self._slot_op:
            self._unlink_all()  # receivers map a generation's slots together: every one is mapped now
        return True

    def _sweep_keys(self) -> None:
        """Delete the keys of inline broadcasts every receiver has read (rank 0, between syncs)."""
        keep = []
        for n in self._inline_ops:
            if self._store.add(f"wire/b/{n}/ack", 0) >= self.world_size - 1:
                self._store.delete_key(f"wire/b/{n}")
                self._store.delete_key(f"wire/b/{n}/ack")
            else:
                keep.append(n)
        self._inline_ops = keep

    def broadcast(self, tensor: torch.Tensor) -> object:
        n = self._n
        self._n += 1
        if self.rank != 0:
            return _Read(self, n, tensor)
        nbytes = tensor.numel() * tensor.element_size()
        j = self._slot_of(tensor)
        if j is None:
            if nbytes > INLINE_MAX_BYTES:
                raise ValueError(
                    f"ipc backend: a {nbytes}-byte broadcast outside the shared slots (at most "
                    f"{INLINE_MAX_BYTES} bytes travel through the store)"
                )
            raw = _bytes_of(tensor.contiguous()).cpu().numpy().tobytes()
            self._store.set(
                f"wire/b/{n}", SharedBroadcast(nbytes=nbytes, inline_b64=_b64(raw)).model_dump_json()
            )
            self._inline_ops.append(n)
            return _Done()
        if nbytes > self._slots[j].numel():
            raise ValueError(
                f"a {nbytes}-byte broadcast does not fit slot {j} ({self._slots[j].numel()} bytes)"
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the packing kernels are done before a receiver reads
        self._slot_op[j] = n
        published = SharedBroadcast(nbytes=nbytes, generation=self._generation, slot=j)
        self._store.set(f"wire/b/{n}", published.model_dump_json())
        return _Acked(self, n)

    # ------------------------------------------------------------- receivers

    def _published(self, n: int) -> bool:
        return self._store.check([f"wire/b/{n}"])

    def _open_generation(self, generation: int) -> None:
        raw = self._store.get(f"wire/slots/{generation}")
        try:
            slots = SharedSlots.model_validate_json(raw)
        except ValueError as e:
            raise SharedWireError(f"malformed shared slots of generation {generation}: {e}") from e
        self._slots = []  # drop the old mappings first
        self._slots = [open_buffer(h, self.device, self.device_id) for h in slots.slots]
        self._generation = generation

    def _read(self, n: int, dst: torch.Tensor) -> None:
        try:
            msg = SharedBroadcast.model_validate_json(self._store.get(f"wire/b/{n}"))
        except ValueError as e:
            raise SharedWireError(f"malformed broadcast {n}: {e}") from e
        want = dst.numel() * dst.element_size()
        if msg.nbytes != want:
            raise SharedWireError(f"broadcast {n} carries {msg.nbytes} bytes, this rank posted {want}")
        out = _bytes_of(dst)
        if msg.inline_b64 is not None:
            raw = _unb64(msg.inline_b64)
            if len(raw) != want:
                raise SharedWireError(f"broadcast {n}: {len(raw)} inline bytes, {want} announced")
            if want:
                out.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        else:
            if msg.generation != self._generation:
                self._open_generation(msg.generation)
            if msg.slot >= len(self._slots) or self._slots[msg.slot].numel() < want:
                raise SharedWireError(f"broadcast {n}: slot {msg.slot} cannot hold {want} bytes")
            out.copy_(self._slots[msg.slot][:want])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # copied out before rank 0 may overwrite the slot
        self._store.add(f"wire/b/{n}/ack", 1)

    # ------------------------------------------------------------- all-reduce (small tensors: votes)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> object:
        m = self._m
        self._m += 1
        if tensor.numel() * tensor.element_size() > INLINE_MAX_BYTES:
            raise ValueError("ipc backend: all-reduce is for small tensors (votes, probes)")
        if m >= 2:  # every rank has read op m-2 before any rank could start op m
            self._store.delete_key(f"wire/r/{m - 2}/{self.rank}")
        raw = _bytes_of(tensor.contiguous()).cpu().numpy().tobytes()
        self._store.set(f"wire/r/{m}/{self.rank}", _b64(raw))
        return _Reduce(self, m, tensor, op)

    def _reduce_ready(self, m: int) -> bool:
        return self._store.check([f"wire/r/{m}/{r}" for r in range(self.world_size)])

    def _reduce(self, m: int, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> None:
        parts = []
        for r in range(self.world_size):
            raw = bytearray(_unb64(self._store.get(f"wire/r/{m}/{r}").decode()))
            parts.append(torch.frombuffer(raw, dtype=tensor.dtype).reshape(tensor.shape))
        stacked = torch.stack(parts)
        if op == dist.ReduceOp.SUM:
            result = stacked.sum(0, dtype=tensor.dtype)
        elif op == dist.ReduceOp.MAX:
            result = stacked.amax(0)
        elif op == dist.ReduceOp.MIN:
            result = stacked.amin(0)
        else:
            raise ValueError(f"ipc backend: unsupported reduce op {op}")
        tensor.copy_(result.to(tensor.device))
        self._store.add(f"wire/r/{m}/read", 1)

    # ------------------------------------------------------------- teardown

    def _unlink_all(self) -> None:
        for path in self._paths:
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self._paths = []

    def close(self, linger_s: float = 2.0) -> None:
        """Unlink and drop the slots. Rank 0 hosts the store: it first gives the ranks still reading the
        last all-reduce (the commit vote it has already tallied) up to `linger_s` to finish."""
        if self.rank == 0 and self._m > 0:
            give_up = time.monotonic() + linger_s
            with contextlib.suppress(Exception):
                while self._store.add(f"wire/r/{self._m - 1}/read", 0) < self.world_size:
                    if time.monotonic() > give_up:
                        break
                    time.sleep(1e-3)
        self._unlink_all()
        self._slots = []
