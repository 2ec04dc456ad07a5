"""Writes a sync's buckets straight from an unsharded trainer model, each tensor made in its place.

The generic stream (`walker.iter_layer_chunks` → `kernel_layout.fuse_tensors` → the sender packing
each tensor) makes every quantized tensor, fuses q/k/v and gate/up with `cat`, then copies the result
into a bucket: three passes over the bytes and about ten tensor ops per weight, which leaves a GPU
trainer host-bound. `BucketWriter` plans once per manifest where each checkpoint tensor's bytes lie
in the stream, and each bucket fill quantizes the weights landing in it into views of the bucket (the
Triton FP8 block kernel writes there directly, small weights of a bucket sharing one launch: see
`quantize.quantize_many_into`). A fused runtime tensor is its parts' bytes back to back (`cat` on
dim 0 and `stack` of contiguous parts both concatenate bytes), so the kernel layout needs no fusion
step. The bytes equal the generic stream's (tests/test_bucket_writer.py).

A tensor whose bytes lie in one bucket piece is written in place; one spread over several pieces (only
tensors larger than a bucket, e.g. embeddings) is made once, or viewed when it needs no cast, and its
bytes copied piece by piece, so memory stays at the sender's buckets plus at most that one tensor.

NVFP4's global scale spans a fused group (q/k/v, gate/up, an expert's gate/up, as vLLM keeps one per
fused module): each fill takes the group's max |x| from its members' parameters (on the device, once
per group per sync), as the walker does.

FSDP2 (DTensor) models: the writer runs the walker's own per-chunk gathers (`layers.ChunkGathers`: the
same collectives in the same order, so the other ranks just walk), one chunk ahead. A weight whose
shards were quantized before the gather arrives made and is copied in; one gathered whole is quantized
into the bucket like an unsharded one. A writer stopped early (`close`) drains the remaining gathers.
Inf/NaN weights set a device flag (no host sync); `finish()` reads it once, after the last bucket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from broadcaster.framing import dtype_from_name
from configs.quant import QuantScheme
from configs.wire import SyncHeader
from trainer_side.kernel_layout import plan_targets
from trainer_side.layers import (
    ChunkGathers,
    ChunkPlan,
    PendingChunk,
    PreparedSource,
    Source,
    fused_group,
    output_tensor,
    plan_chunks,
    specs_by_output,
)
from trainer_side.mx_quantize import tensor_amax
from trainer_side.names import NameMap
from trainer_side.quantize import GROUP_MAX_NUMEL, quantize_into, quantize_many_into

Shape = tuple[int, ...]


@dataclass(frozen=True)
class _Segment:
    """Bytes [offset, offset + nbytes) of a made tensor go to `bucket` at `bucket_offset`."""

    bucket: int
    bucket_offset: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class _Out:
    """One checkpoint tensor a write makes: its suffix key, dtype, shape and where its bytes go."""

    name: str
    key: str
    dtype: torch.dtype
    shape: Shape
    segments: tuple[_Segment, ...]


@dataclass(frozen=True)
class _Write:
    """Output `index` of `source`: one quantizer call (a weight and its scales) or one plain tensor.

    It runs when bucket `first` (the first bucket any of its bytes go to) is filled. An output lying in
    one piece of that bucket is written in place; any other is made in a tensor of its own whose bytes
    are copied into each bucket as it is filled (scales that start the next bucket, split tensors)."""

    source: Source
    index: int
    quantize: bool
    outs: tuple[_Out, ...]

    @cached_property  # read for every output at every fill: computed once
    def first(self) -> int:
        return min(s.bucket for o in self.outs for s in o.segments)

    def in_place(self, o: _Out) -> bool:
        return len(o.segments) == 1 and o.segments[0].bucket == self.first


def _entry_ranges(
    specs: Sequence[tuple[str, torch.dtype, Shape]], header: SyncHeader, rename: Mapping[str, str]
) -> dict[str, tuple[int, int]]:
    """Checkpoint tensor name -> (manifest entry index, byte offset in that entry).

    Checkpoint layout: one entry per tensor. Kernel layout: a runtime entry is its parts, in
    `plan_targets` order, back to back; `rename` maps fused names to the worker's (routed experts)."""
    index = {e.name: i for i, e in enumerate(header.entries)}
    if header.layout != "kernel":
        return {name: (i, 0) for name, i in index.items()}
    nbytes = {n: torch.Size(s).numel() * d.itemsize for n, d, s in specs}
    ranges: dict[str, tuple[int, int]] = {}
    for target in plan_targets([n for n, _, _ in specs]):
        entry = index.get(rename.get(target.name, target.name))
        if entry is None:
            raise LookupError(f"the manifest has no runtime tensor {target.name}")
        offset = 0
        for part in target.parts:
            ranges[part] = (entry, offset)
            offset += nbytes[part]
    return ranges


def _segments(header: SyncHeader, entry: int, offset: int, nbytes: int) -> tuple[_Segment, ...]:
    out: list[_Segment] = []
    end = offset + nbytes
    for p in header.entries[entry].pieces:
        lo, hi = max(offset, p.tensor_offset), min(end, p.tensor_offset + p.nbytes)
        if lo < hi:
            out.append(_Segment(p.bucket, p.bucket_offset + lo - p.tensor_offset, lo - offset, hi - lo))
    return tuple(out)


def _view(buf: Tensor, seg: _Segment, dtype: torch.dtype, shape: Shape) -> Tensor:
    return buf[seg.bucket_offset : seg.bucket_offset + seg.nbytes].view(dtype).view(shape)


def _as_bytes(t: Tensor) -> Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


class BucketWriter:
    """Fills the buckets of one manifest from `model`'s parameters (read at each fill, so the trainer
    may update them in place between pushes). Use: `fill(k, buf)` for k = 0..n-1 in order, then
    `finish()`; `build` says whether the model and scheme allow it."""

    def __init__(
        self,
        writes: list[_Write],
        header: SyncHeader,
        scheme: QuantScheme,
        dtype: torch.dtype | None,
        sharded: tuple[list[ChunkPlan], dict[int, tuple[int, int]]] | None = None,
    ) -> None:
        self.scheme, self.dtype = scheme, dtype
        # FSDP2: the chunk plans, and each source's (chunk, index in chunk); this sync's gathers
        self._plans, self._chunk_of = sharded or ([], {})
        self._gathers: ChunkGathers | None = None
        self._given: ChunkGathers | None = None
        self._current: PendingChunk | None = None
        self._made: dict[int, dict[str, Tensor]] = {}  # sources quantized before the gather, by id
        # Weights up to this many elements share one quantizer launch per bucket; 0: one per weight.
        self.group_max_numel = GROUP_MAX_NUMEL
        n = len(header.bucket_sizes)
        self._starts: list[list[_Write]] = [[] for _ in range(n)]
        self._copies: list[list[tuple[_Write, int, _Segment]]] = [[] for _ in range(n)]
        self._ends: list[list[_Write]] = [[] for _ in range(n)]
        for w in writes:
            self._starts[w.first].append(w)
            later = [(j, seg) for j, o in enumerate(w.outs) if not w.in_place(o) for seg in o.segments]
            for j, seg in later:
                self._copies[seg.bucket].append((w, j, seg))
            if later:
                self._ends[max(seg.bucket for _, seg in later)].append(w)
        self._writes = writes
        self._pending: dict[int, dict[int, Tensor]] = {}
        self._flag: Tensor | None = None
        # NVFP4: each quantized write's global-scale group, the group's members, and this sync's amaxes
        self._group_of: dict[int, str] = {}
        self._members: dict[str, list[_Write]] = {}
        if scheme.quantized and scheme.kind == "nvfp4":
            for w in writes:
                if w.quantize:
                    key = fused_group(w.source.outputs[w.index].module)
                    self._group_of[id(w)] = key
                    self._members.setdefault(key, []).append(w)
        self._amaxes: dict[str, Tensor] = {}

    @classmethod
    def build(
        cls,
        model: nn.Module,
        scheme: QuantScheme,
        header: SyncHeader,
        *,
        name_map: NameMap | None = None,
        dtype: torch.dtype | None = None,
        rename: Mapping[str, str] | None = None,
    ) -> BucketWriter | str:
        """The writer for `header` (planned by the walker from the same model, scheme, name map and
        dtype; kernel layout: fused, `rename` = fused name -> the worker's), or why it cannot be used."""
        plans = plan_chunks(model, scheme, name_map)
        sources = [s for chunk in plans for s in chunk.sources]
        chunk_of = {id(s): (c, i) for c, chunk in enumerate(plans) for i, s in enumerate(chunk.sources)}
        sharded = any(isinstance(s.param, DTensor) for s in sources)
        specs_of = [specs_by_output(s, scheme, dtype) for s in sources]
        try:
            ranges = _entry_ranges([t for by in specs_of for o in by for t in o], header, rename or {})
        except LookupError as e:
            return str(e)
        writes: list[_Write] = []
        covered = [0] * len(header.entries)
        for src, by_output in zip(sources, specs_of, strict=True):
            for j, (o, specs) in enumerate(zip(src.outputs, by_output, strict=True)):
                outs = []
                for name, dt, shape in specs:
                    if name not in ranges:
                        return f"the manifest has no tensor {name}"
                    entry, offset = ranges[name]
                    e = header.entries[entry]
                    nbytes = torch.Size(shape).numel() * dt.itemsize
                    if header.layout != "kernel" and (dtype_from_name(e.dtype), e.shape) != (dt, shape):
                        return f"{name}: the manifest has {e.dtype} {list(e.shape)}, the model {dt} {shape}"
                    if offset + nbytes > e.nbytes:
                        return f"{name} does not fit in manifest entry {e.name}"
                    covered[entry] += nbytes
                    if nbytes:
                        key = name.rsplit(".", 1)[-1]
                        outs.append(_Out(name, key, dt, shape, _segments(header, entry, offset, nbytes)))
                if outs:
                    writes.append(_Write(src, j, o.quantize, tuple(outs)))
        short = [e.name for e, c in zip(header.entries, covered, strict=True) if c != e.nbytes]
        if short:
            return f"the model's tensors do not cover manifest entries {short[:3]} exactly"
        if not sharded:
            return cls(writes, header, scheme, dtype)
        # The gathers run forward only: the writes must reach the chunks in stream order.
        order = [chunk_of[id(w.source)][0] for w in sorted(writes, key=lambda w: w.first)]
        if order != sorted(order):
            return "the manifest does not list the sharded model's chunks in stream order"
        return cls(writes, header, scheme, dtype, (plans, chunk_of))

    # ------------------------------------------------------------------ per sync

    def use_gathers(self, gathers: ChunkGathers) -> None:
        """FSDP2: run the next sync's gathers from `gathers` (made by the caller from the same model, so
        that the caller can drain them if the sync never reaches the first fill)."""
        self._given = gathers

    def _prepared(self, w: _Write) -> PreparedSource:
        """FSDP2: `w`'s source, its chunk's gather done (gathering up to that chunk, in order)."""
        assert self._gathers is not None
        chunk, index = self._chunk_of[id(w.source)]
        while self._gathers.index < chunk:
            self._current = self._gathers.advance()
            self._made.clear()
        if self._gathers.index != chunk or self._current is None:
            raise RuntimeError(f"{w.outs[0].name} of chunk {chunk} came after chunk {self._gathers.index}")
        return self._current.prepared[index]

    def _input(self, w: _Write) -> Tensor:
        if self._gathers is None:
            x = output_tensor(w.source, w.source.param.detach(), w.index)
        else:
            raw = self._prepared(w).raw
            assert raw is not None and self._current is not None
            x = output_tensor(w.source, raw(self._current.full), w.index)
        return x if self.dtype is None else x.to(self.dtype)

    def _copy_made(self, w: _Write, buf: Tensor) -> bool:
        """FSDP2: when `w`'s source was quantized shard by shard and gathered made, copy its outputs
        into `buf` (or keep them for later buckets) and return True."""
        if self._gathers is None:
            return False
        prepared = self._prepared(w)
        if prepared.raw is not None:
            return False
        assert self._current is not None and self._flag is not None
        made = self._made.get(id(w.source))
        if made is None:
            made = self._made[id(w.source)] = dict(prepared.finish(self._current.full))
        later: dict[int, Tensor] = {}
        for j, o in enumerate(w.outs):
            t = made[o.name]
            if t.is_floating_point() and t.element_size() >= 2:  # a scale: inf/NaN weights make it so
                self._flag |= (~torch.isfinite(t).all()).to(torch.int32)
            if w.in_place(o):
                _view(buf, o.segments[0], o.dtype, o.shape).copy_(t)
            else:
                later[j] = _as_bytes(t)
        if later:
            self._pending[id(w)] = later
        return True

    def _write(self, w: _Write, buf: Tensor) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Run `w` into views of `buf` and, for outputs that lie elsewhere, tensors of their own (kept
        as flat bytes in `_pending` until every bucket they reach is filled). A quantized write is
        returned as (input, outputs) for the caller to quantize with the bucket's others."""
        if self._copy_made(w, buf):
            return None
        x = self._input(w)
        if not w.quantize:
            (o,) = w.outs
            if w.in_place(o):
                _view(buf, o.segments[0], o.dtype, o.shape).copy_(x)
            else:
                self._pending[id(w)] = {0: _as_bytes(x)}  # a view when no cast was needed
            return None
        outs: dict[str, Tensor] = {}
        later: dict[int, Tensor] = {}
        for j, o in enumerate(w.outs):
            if w.in_place(o):
                outs[o.key] = _view(buf, o.segments[0], o.dtype, o.shape)
            else:
                outs[o.key] = torch.empty(o.shape, dtype=o.dtype, device=buf.device)
                later[j] = outs[o.key].reshape(-1).view(torch.uint8)
        if later:
            self._pending[id(w)] = later
        return x, outs

    @torch.no_grad()
    def fill(self, k: int, buf: Tensor) -> None:
        """Write bucket `k`'s bytes into `buf` (the bucket's buffer, `bucket_sizes[k]` bytes)."""
        if k == 0:
            self.close()
            self._flag = torch.zeros(1, dtype=torch.int32, device=buf.device)
            if self._plans:
                given, self._given = self._given, None
                self._gathers = given or ChunkGathers(self._plans, self.scheme, self.dtype)
        if self._group_of:
            for w in self._starts[k]:
                if (item := self._write(w, buf)) is not None:
                    x, outs = item
                    quantize_into(x, self.scheme, outs, flag=self._flag, global_amax=self._group_amax(w))
        else:
            quantized = [item for w in self._starts[k] if (item := self._write(w, buf)) is not None]
            quantize_many_into(quantized, self.scheme, flag=self._flag, group_max_numel=self.group_max_numel)
        for w, j, seg in self._copies[k]:
            data = self._pending[id(w)][j][seg.offset : seg.offset + seg.nbytes]
            buf[seg.bucket_offset : seg.bucket_offset + seg.nbytes].copy_(data)
        for w in self._ends[k]:
            del self._pending[id(w)]

    def _group_amax(self, w: _Write) -> Tensor:
        """max |x| over `w`'s NVFP4 global-scale group (float32 scalar on the device; no host sync)."""
        key = self._group_of[id(w)]
        if self._gathers is not None:  # the chunk's all-reduced amaxes, as the walker quantizes with
            self._prepared(w)
            assert self._current is not None
            return self._current.amax_of[w.source.outputs[w.index].module]
        if key not in self._amaxes:
            amaxes = [tensor_amax(self._input(m)) for m in self._members[key]]
            self._amaxes[key] = torch.stack(amaxes).amax() if len(amaxes) > 1 else amaxes[0]
        return self._amaxes[key]

    def close(self) -> None:
        """The sync ended early (a failure or a refusal): drop the tensors held for later buckets, and
        run the remaining FSDP2 gathers, which the other ranks of the mesh run in their walk."""
        self._pending.clear()
        self._amaxes.clear()
        self._made.clear()
        self._current = None
        gathers, self._gathers = self._gathers, None
        if gathers is not None and not gathers.done:
            gathers.drain()

    def finish(self) -> str | None:
        """After the last fill: why the stream is bad (inf/NaN weights), or None. One host sync."""
        self.close()
        if self._flag is None or not int(self._flag.item()):
            return None
        if self._plans:
            return "weights of the sharded model hold inf or NaN; refusing to quantize them"
        bad = [
            w.outs[0].name
            for w in self._writes
            if w.quantize and not bool(torch.isfinite(self._input(w)).all())
        ]
        fmt = "FP8" if self.scheme.kind.startswith("fp8") else self.scheme.kind.upper()
        return f"weights behind {', '.join(bad[:5])} hold inf or NaN; refusing to quantize them to {fmt}"
