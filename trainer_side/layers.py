"""Splits a trainer model into stream chunks and turns each parameter into HF checkpoint tensors.

A chunk is the parameters before the decoder layers, one decoder layer, or the parameters after
them. Each parameter is a `Source`: where it comes from in the trainer, and which checkpoint tensors
it becomes (a fused MoE expert tensor becomes one matrix per expert, a quantized Linear weight becomes
the quantizer's weight and scale). `prepare` makes those tensors in two phases around one chunk-wide
gather of FSDP2 (DTensor) shards (`shard_gather.ShardGather`), quantizing shards before the gather
when that is bit-exact.

NVFP4 weights share a global scale: all of one weight, and all shards of one fused vLLM module
(q/k/v -> qkv_proj, gate/up -> gate_up_proj, per expert too), since vLLM keeps one per fused module.
`chunk_global_amaxes` finds max |x| for each such group before a chunk is quantized; for FSDP2 it
takes each shard's amax and all-reduces them (MAX) over the shard group, so quantizing shards gives
the bits of quantizing the gathered tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from configs.quant import DEFAULT_FUSED_MAPPING, QuantScheme
from trainer_side.names import NameMap, hf_name, is_quantized, strip_wrappers
from trainer_side.shard_gather import ShardGather

Shape = tuple[int, ...]
Named = list[tuple[str, Tensor]]

PRE_LAYERS = "non_layer.pre"
_FUSED_EXPERT_LEAVES = ("gate_up_proj", "down_proj", "up_proj")
POST_LAYERS = "non_layer.post"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the stream, known before any data moves: its checkpoint name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: Shape
    chunk: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class _Output:
    """One checkpoint tensor a source yields, before quantization (`module.suffix`, e.g. `x.weight`)."""

    module: str
    suffix: str
    shape: Shape
    quantize: bool


@dataclass(frozen=True)
class _ExpertPart:
    """Rows [start, stop) of one expert's [out, in] matrix in a fused tensor are checkpoint `proj`."""

    proj: str
    start: int
    stop: int


@dataclass(frozen=True)
class Source:
    """One trainer parameter and the checkpoint tensors it becomes, in stream order."""

    trainer_name: str
    param: Tensor
    outputs: tuple[_Output, ...]
    parts: tuple[_ExpertPart, ...] = ()
    transposed: bool = False

    @property
    def source_bytes(self) -> int:
        return self.param.numel() * self.param.element_size()


@dataclass(frozen=True)
class ChunkPlan:
    label: str
    sources: tuple[Source, ...]


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` holding the most parameters: the decoder stack (HF: `model.layers`)."""
    candidates = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0
    ]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder layers")
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def _lm_head_tied(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def _expert_parts(name: str, param: Tensor, owner: nn.Module) -> tuple[tuple[_ExpertPart, ...], bool]:
    """How a fused 3D expert tensor splits into per-expert checkpoint matrices; () if not fused.

    transformers 5 stores Qwen3-MoE experts as `gate_up_proj` [E, 2I, H] (gate rows first, then up:
    `is_concatenated`) and `down_proj` [E, H, I]; `is_transposed` models store [E, in, out] instead.
    The checkpoint holds `experts.{e}.{gate,up,down}_proj.weight`, each [out, in].
    """
    if hasattr(owner, "is_concatenated") and getattr(owner, "has_bias", False):
        raise NotImplementedError(f"{name}: fused experts with biases (e.g. gpt-oss) are not supported")
    leaf = name.rsplit(".", 1)[-1]
    if param.ndim != 3 or ".experts." not in f".{name}" or leaf not in _FUSED_EXPERT_LEAVES:
        return (), False
    transposed = bool(getattr(owner, "is_transposed", False))
    out_dim = param.shape[2] if transposed else param.shape[1]
    if leaf != "gate_up_proj":
        return (_ExpertPart(leaf, 0, out_dim),), transposed
    if not getattr(owner, "is_concatenated", True):
        raise NotImplementedError(f"{name}: interleaved gate/up expert layout is not supported")
    half = out_dim // 2
    return (_ExpertPart("gate_proj", 0, half), _ExpertPart("up_proj", half, out_dim)), transposed


def _source(
    trainer_name: str, param: Tensor, model: nn.Module, scheme: QuantScheme, name_map: NameMap | None
) -> Source | None:
    name = hf_name(trainer_name, name_map)
    if name is None:
        return None
    owner_path, _, _ = trainer_name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    parts, transposed = _expert_parts(name, param, owner)
    if parts:
        prefix = name.rsplit(".", 1)[0]
        in_dim = param.shape[1] if transposed else param.shape[2]
        outputs = tuple(
            _Output(m, "weight", (p.stop - p.start, in_dim), is_quantized(m, owner, scheme, expert=True))
            for e in range(param.shape[0])
            for p in parts
            for m in (f"{prefix}.{e}.{p.proj}",)
        )
        return Source(trainer_name, param, outputs, parts, transposed)
    module, _, suffix = name.rpartition(".")
    quantize = suffix == "weight" and param.ndim == 2 and is_quantized(module, owner, scheme, expert=False)
    return Source(trainer_name, param, (_Output(module, suffix, tuple(param.shape), quantize),))


def plan_chunks(model: nn.Module, scheme: QuantScheme, name_map: NameMap | None = None) -> list[ChunkPlan]:
    """The stream's chunks in order: pre-layer params, each decoder layer, post-layer params.

    Parameters outside the layers go before or after them by where the model registers them (HF:
    embeddings before; final norm and lm_head after). Splitting them keeps every chunk at most one
    vocab-sized matrix, and the order follows the forward pass. Empty chunks are left out.
    """
    layers_path, layers = find_decoder_layers(model)
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    drop_lm_head = _lm_head_tied(model)
    pre: list[Source] = []
    post: list[Source] = []
    per_layer: list[list[Source]] = [[] for _ in layers]
    seen_layer = False
    for trainer_name, param in model.named_parameters():
        src = _source(trainer_name, param, model, scheme, name_map)
        index = layer_of.get(id(param))
        seen_layer = seen_layer or index is not None
        if src is None or (index is None and drop_lm_head and src.outputs[0].module == "lm_head"):
            continue
        if index is not None:
            per_layer[index].append(src)
        else:
            (post if seen_layer else pre).append(src)
    label = strip_wrappers(layers_path)
    chunks = [ChunkPlan(PRE_LAYERS, tuple(pre))]
    chunks += [ChunkPlan(f"{label}.{i}", tuple(s)) for i, s in enumerate(per_layer)]
    chunks.append(ChunkPlan(POST_LAYERS, tuple(post)))
    return [c for c in chunks if c.sources]


def _quantizer() -> ModuleType:
    from trainer_side import quantize  # imported late: a 'none' walk never needs it

    return quantize


def specs_by_output(
    src: Source, scheme: QuantScheme, dtype: torch.dtype | None
) -> list[list[tuple[str, torch.dtype, Shape]]]:
    """For each output of `src`: (name, dtype, shape) of the tensors it becomes (a quantized weight:
    the quantizer's tensors), without touching data."""
    out_dtype = dtype or src.param.dtype
    by_output: list[list[tuple[str, torch.dtype, Shape]]] = []
    for o in src.outputs:
        if o.quantize:
            by_output.append([
                (f"{o.module}.{suffix}", dt, tuple(shape))
                for suffix, (dt, shape) in _quantizer().quantized_specs(o.shape, out_dtype, scheme).items()
            ])  # fmt: skip
        else:
            by_output.append([(f"{o.module}.{o.suffix}", out_dtype, o.shape)])
    return by_output


def output_specs(
    src: Source, scheme: QuantScheme, dtype: torch.dtype | None
) -> list[tuple[str, torch.dtype, Shape]]:
    """(name, dtype, shape) of every tensor `prepare` makes for `src`, without touching data."""
    return [spec for specs in specs_by_output(src, scheme, dtype) for spec in specs]


def _matrix(t: Tensor, e: int, part: _ExpertPart, transposed: bool) -> Tensor:
    m = t[e].t() if transposed else t[e]
    return m[part.start : part.stop]


def output_tensor(src: Source, full: Tensor, j: int) -> Tensor:
    """The part of `full` (the whole parameter) that output `j` of `src` is made from (a view)."""
    if not src.parts:
        return full
    e, i = divmod(j, len(src.parts))
    return _matrix(full, e, src.parts[i], src.transposed)


def _pieces(src: Source, full: Tensor) -> Iterator[Tensor]:
    for j in range(len(src.outputs)):
        yield output_tensor(src, full, j)


def _quantize(
    t: Tensor, o: _Output, scheme: QuantScheme, amax_of: Mapping[str, Tensor] | None = None
) -> Named:
    q = _quantizer()
    specs = q.quantized_specs(tuple(t.shape), t.dtype, scheme)
    global_amax = amax_of.get(o.module) if amax_of is not None else None
    # Inf/NaN in FP8 scales is checked per chunk by the walker (one cheap sync per layer, not per tensor).
    out = q.quantize_weight(t.contiguous(), scheme, check_finite=False, global_amax=global_amax)
    if set(out) != set(specs):
        raise RuntimeError(f"quantizer returned {sorted(out)} for {o.module}, its specs say {sorted(specs)}")
    return [(f"{o.module}.{suffix}", out[suffix]) for suffix in specs]


def _convert(
    src: Source,
    full: Tensor,
    scheme: QuantScheme,
    dtype: torch.dtype | None,
    amax_of: Mapping[str, Tensor] | None,
) -> Named:
    named: Named = []
    for o, t in zip(src.outputs, _pieces(src, full), strict=True):
        t = t if dtype is None else t.to(dtype)
        if o.quantize:
            named += _quantize(t, o, scheme, amax_of)
        else:
            named.append((f"{o.module}.{o.suffix}", t.contiguous()))
    return named


# ---- NVFP4 global scales ---------------------------------------------------------------------------


def fused_group(module: str, fused_mapping: Mapping[str, tuple[str, ...]] = DEFAULT_FUSED_MAPPING) -> str:
    """The vLLM module a checkpoint module is loaded into: `...q_proj` -> `...qkv_proj`, else itself."""
    leaf = module.rsplit(".", 1)[-1]
    for fused, shards in fused_mapping.items():
        if leaf in shards:
            return module[: len(module) - len(leaf)] + fused
    return module


def _local_output_amaxes(src: Source, local: Tensor, offset: int) -> Tensor:
    """max |x| of each output of `src` (float32, one per output) over `local`, which holds dim-0 rows
    [offset, offset + len) of the parameter; outputs it holds nothing of get 0 (the identity of max)."""
    amax = torch.zeros(len(src.outputs), dtype=torch.float32, device=local.device)
    if not src.parts:
        if local.numel():
            amax[0] = local.abs().amax().to(torch.float32)
        return amax
    for e in range(local.shape[0]):
        for j, part in enumerate(src.parts):
            amax[(offset + e) * len(src.parts) + j] = _matrix(local, e, part, src.transposed).abs().amax()
    return amax


def _shard_dims(p: DTensor) -> tuple[int, ...]:
    return tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard))


def chunk_global_amaxes(
    sources: tuple[Source, ...], scheme: QuantScheme, dtype: torch.dtype | None
) -> dict[str, Tensor]:
    """For NVFP4: checkpoint module -> max |x| over its global-scale group (float32 scalar); {} otherwise.

    Collective for DTensor parameters (one all-reduce per mesh and sharding in the chunk): every rank of
    the mesh must call it with the same sources. The amax of a cast tensor is the cast of the amax
    (rounding is monotonic), so `dtype` is applied to the amaxes, not to the weights.
    """
    if scheme.kind != "nvfp4" or not scheme.quantized:
        return {}
    per_source: list[tuple[Source, Tensor]] = []
    pending: dict[tuple[object, tuple[int, ...]], list[int]] = {}  # (mesh, shard dims) -> sources
    for src in sources:
        if not any(o.quantize for o in src.outputs):
            continue
        p = src.param.detach()
        if not isinstance(p, DTensor):
            per_source.append((src, _local_output_amaxes(src, p, 0)))
            continue
        dims = _shard_dims(p)
        if src.parts and dims and _dim0_shard(p) is None:
            # experts split along a matrix dim: take the amaxes from the gathered tensor (rare layouts)
            per_source.append((src, _local_output_amaxes(src, p.full_tensor(), 0)))
            continue
        local = p.to_local()
        offset = 0
        if src.parts and dims:
            rows = math.ceil(p.shape[0] / p.device_mesh.size(dims[0]))
            offset = min(rows * p.device_mesh.get_local_rank(dims[0]), p.shape[0])
        per_source.append((src, _local_output_amaxes(src, local, offset)))
        if dims:
            pending.setdefault((p.device_mesh, dims), []).append(len(per_source) - 1)
    for (mesh, dims), indices in pending.items():
        flat = torch.cat([per_source[i][1] for i in indices])
        for d in dims:
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=mesh.get_group(d))  # type: ignore[attr-defined]
        for i, part in zip(
            indices, flat.split([len(per_source[i][0].outputs) for i in indices]), strict=True
        ):
            per_source[i] = (per_source[i][0], part)
    grouped: dict[str, Tensor] = {}
    module_group: dict[str, str] = {}
    for src, amaxes in per_source:
        for o, amax in zip(src.outputs, amaxes, strict=True):
            if not o.quantize:
                continue
            amax = amax if dtype is None else amax.to(dtype).to(torch.float32)
            key = module_group[o.module] = fused_group(o.module)
            grouped[key] = amax if key not in grouped else torch.maximum(grouped[key], amax)
    return {module: grouped[key] for module, key in module_group.items()}


# ---- FSDP2 / DTensor -------------------------------------------------------------------------------


def _dim0_shard(p: DTensor) -> tuple[int, int] | None:
    """(mesh dim, shard count) when `p` is sharded on dim 0 over exactly one mesh dim, else None."""
    shards = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if len(shards) != 1 or p.placements[shards[0]] != Shard(0):
        return None
    if not all(isinstance(pl, Replicate) for i, pl in enumerate(p.placements) if i != shards[0]):
        return None
    return shards[0], p.device_mesh.size(shards[0])


def quantize_before_gather_ok(src: Source, p: DTensor, scheme: QuantScheme) -> bool:
    """Whether quantizing each shard and gathering the results equals quantizing the gathered tensor.

    True when every rank holds at least one dim-0 row and the quantizer's groups never straddle a
    shard boundary: whole experts (any per-matrix scheme), rows (fp8_channel; mxfp8 and nvfp4, whose
    groups run along a row, nvfp4's global scale coming from `chunk_global_amaxes`), or row blocks
    (fp8_block, when the shard length is a multiple of the block's rows).
    """
    shard = _dim0_shard(p)
    if shard is None or shard[1] == 1 or not all(o.quantize for o in src.outputs):
        return False  # (a mesh of one: nothing to save, and the whole tensor quantizes in one call)
    count = shard[1]
    rows = math.ceil(p.shape[0] / count)
    if rows * (count - 1) >= p.shape[0]:
        return False  # some rank holds an empty shard
    if src.parts:
        return True
    if scheme.kind in ("fp8_channel", "mxfp8", "nvfp4"):
        return True
    return scheme.kind == "fp8_block" and scheme.block_size is not None and rows % scheme.block_size[0] == 0


def _shard_group(p: DTensor, mesh_dim: int) -> tuple[dist.ProcessGroup, int, int]:
    mesh = p.device_mesh
    return mesh.get_group(mesh_dim), mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)  # type: ignore[return-value]


Finish = Callable[[Mapping[int, Tensor]], Named]


def _prepare_quantized(
    src: Source,
    p: DTensor,
    mesh_dim: int,
    scheme: QuantScheme,
    dtype: torch.dtype | None,
    amax_of: Mapping[str, Tensor] | None,
    gather: ShardGather,
) -> Finish:
    """Quantize this rank's rows of `src` now, queue the codes and scales on `gather`; the returned
    function assembles the checkpoint tensors from the gathered ones."""
    group = _shard_group(p, mesh_dim)
    local = p.to_local()
    local = local if dtype is None else local.to(dtype)
    if not src.parts:
        (o,) = src.outputs
        full_specs = output_specs(src, scheme, dtype)
        # a per-tensor scale (NVFP4's global one) comes from the all-reduced amax: equal on every rank
        held = [
            (name, t if len(spec[2]) < 2 else gather.add(t, spec[2], *group))
            for (name, t), spec in zip(_quantize(local, o, scheme, amax_of), full_specs, strict=True)
        ]
        return lambda full: [(n, full[t] if isinstance(t, int) else t) for n, t in held]
    # Experts: quantize each local expert's matrices, stack per (part, suffix), gather the stacks.
    n = p.shape[0]
    first = math.ceil(n / group[1]) * group[2]
    stacks: list[dict[str, list[Tensor]]] = [{} for _ in src.parts]
    for e in range(local.shape[0]):
        for j, part in enumerate(src.parts):
            o = src.outputs[(first + e) * len(src.parts) + j]
            for name, t in _quantize(_matrix(local, e, part, src.transposed), o, scheme, amax_of):
                stacks[j].setdefault(name.rsplit(".", 1)[-1], []).append(t)
    keys = [{k: gather.add(torch.stack(v), (n, *v[0].shape), *group) for k, v in s.items()} for s in stacks]
    del stacks

    def finish(full: Mapping[int, Tensor]) -> Named:
        named: Named = []
        for e in range(n):
            for j in range(len(src.parts)):
                o = src.outputs[e * len(src.parts) + j]
                named += [(f"{o.module}.{k}", full[key][e]) for k, key in keys[j].items()]
        return named

    return finish


@dataclass(frozen=True)
class PreparedSource:
    """Phase one of one source. Once its chunk's gather is done (`full`: the gathered tensors by key),
    `finish(full)` makes its checkpoint tensors and `raw(full)` is the whole parameter (cast to the
    walk's dtype) for a writer that quantizes it itself; `raw` is None when this rank gathered the
    quantized codes instead. `reason`: why its shards were gathered before quantizing, or alone."""

    finish: Finish
    raw: Callable[[Mapping[int, Tensor]], Tensor] | None
    reason: str | None = None


def prepare(
    src: Source,
    scheme: QuantScheme,
    dtype: torch.dtype | None,
    amax_of: Mapping[str, Tensor] | None,
    gather: ShardGather,
) -> PreparedSource:
    """Queue on `gather` what `src` needs gathered: its shards, or their quantized codes where that
    is bit-exact (`quantize_before_gather_ok`). Quantizing happens here for the latter.

    `amax_of` is `chunk_global_amaxes` of the chunk (NVFP4). Collective for DTensor parameters sharded
    other than on dim 0 (they are gathered here, alone): every rank of the mesh calls it in one order.
    """
    p = src.param.detach()
    if not isinstance(p, DTensor):
        return PreparedSource(lambda _: _convert(src, p, scheme, dtype, amax_of), lambda _: p)
    shard = _dim0_shard(p)
    if shard is not None and quantize_before_gather_ok(src, p, scheme):
        return PreparedSource(_prepare_quantized(src, p, shard[0], scheme, dtype, amax_of, gather), None)
    if dtype is not None:
        p = p.to(dtype)  # cast the shard, not the gathered tensor: same bits, fewer bytes on the wire
    if not _shard_dims(p):  # replicated: every rank holds all of it
        local = p.to_local()
        return PreparedSource(lambda _: _convert(src, local, scheme, dtype, amax_of), lambda _: local)
    if shard is None:
        full = p.full_tensor()
        reason = f"placements {tuple(p.placements)}: gathered alone, then quantized"
        return PreparedSource(lambda _: _convert(src, full, scheme, dtype, amax_of), lambda _: full, reason)
    key = gather.add(p.to_local(), tuple(p.shape), *_shard_group(p, shard[0]))
    reason = None
    if any(o.quantize for o in src.outputs) and shard[1] > 1:
        reason = "gathered, then quantized: its shards split quantization groups, or a rank holds none"
    return PreparedSource(
        lambda full: _convert(src, full[key], scheme, dtype, amax_of), lambda full: full[key], reason
    )


class PendingChunk:
    """One chunk between phases: built, it has quantized what goes quantized, queued and started its
    gather; `wait()` ends the gather, then `tensors()` makes the checkpoint tensors."""

    @torch.no_grad()
    def __init__(self, chunk: ChunkPlan, scheme: QuantScheme, dtype: torch.dtype | None) -> None:
        self.label = chunk.label
        self.gather = ShardGather()
        self.amax_of = chunk_global_amaxes(chunk.sources, scheme, dtype)  # NVFP4 global scales; {} otherwise
        self.prepared = [prepare(src, scheme, dtype, self.amax_of, self.gather) for src in chunk.sources]
        self.notes = {
            src.trainer_name: pr.reason
            for src, pr in zip(chunk.sources, self.prepared, strict=True)
            if pr.reason is not None
        }
        self.gather.start()
        self.full: Mapping[int, Tensor] = {}

    def wait(self) -> None:
        self.full = self.gather.wait()

    @torch.no_grad()
    def tensors(self) -> Named:
        return [t for pr in self.prepared for t in pr.finish(self.full)]


class ChunkGathers:
    """Runs the chunks' gathers in stream order, one chunk ahead, issuing the same collectives in the
    same order for every consumer (the walker, the bucket writer), so ranks that walk stay in lockstep
    with a rank that writes. `advance()` gives the next chunk with its gather done; `drain()` runs the
    rest without making anything: a consumer that stops early must drain, or the other ranks hang."""

    def __init__(self, plans: list[ChunkPlan], scheme: QuantScheme, dtype: torch.dtype | None) -> None:
        self.plans, self.scheme, self.dtype = plans, scheme, dtype
        self.sharded = any(isinstance(s.param, DTensor) for c in plans for s in c.sources)
        self.index = -1  # of the chunk `advance` gave last
        # every sharded parameter gathered before quantizing (or alone) so far, with the reason
        self.notes: dict[str, str] = {}
        self._upcoming = PendingChunk(plans[0], scheme, dtype) if plans else None

    @property
    def done(self) -> bool:
        return self._upcoming is None

    def advance(self) -> PendingChunk:
        current = self._upcoming
        if current is None:
            raise IndexError("every chunk was given")
        current.wait()
        self.notes.update(current.notes)
        self.index += 1
        following = self.index + 1
        has_next = following < len(self.plans)
        self._upcoming = PendingChunk(self.plans[following], self.scheme, self.dtype) if has_next else None
        return current

    def drain(self) -> None:
        """Run the remaining chunks' collectives (sharded models only; nothing to run otherwise)."""
        if not self.sharded:
            self._upcoming = None
        while not self.done:
            self.advance()
