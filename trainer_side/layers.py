"""Splits a trainer model into stream chunks and turns each parameter into HF checkpoint tensors.

A chunk is the parameters before the decoder layers, one decoder layer, or the parameters after
them. Each parameter is a `Source`: where it comes from in the trainer, and which checkpoint tensors
it becomes (a fused MoE expert tensor becomes one matrix per expert, a quantized Linear weight becomes
the quantizer's weight and scale). `materialize` makes those tensors, gathering FSDP2 (DTensor)
shards one parameter at a time, and quantizing shards before the gather when that is bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from configs.quant import QuantScheme
from trainer_side.names import NameMap, hf_name, is_quantized, strip_wrappers

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


def output_specs(
    src: Source, scheme: QuantScheme, dtype: torch.dtype | None
) -> list[tuple[str, torch.dtype, Shape]]:
    """(name, dtype, shape) of every tensor `materialize` yields for `src`, without touching data."""
    out_dtype = dtype or src.param.dtype
    specs: list[tuple[str, torch.dtype, Shape]] = []
    for o in src.outputs:
        if o.quantize:
            for suffix, (dt, shape) in _quantizer().quantized_specs(o.shape, out_dtype, scheme).items():
                specs.append((f"{o.module}.{suffix}", dt, tuple(shape)))
        else:
            specs.append((f"{o.module}.{o.suffix}", out_dtype, o.shape))
    return specs


def _matrix(t: Tensor, e: int, part: _ExpertPart, transposed: bool) -> Tensor:
    m = t[e].t() if transposed else t[e]
    return m[part.start : part.stop]


def _pieces(src: Source, full: Tensor) -> Iterator[Tensor]:
    if not src.parts:
        yield full
        return
    for e in range(full.shape[0]):
        for part in src.parts:
            yield _matrix(full, e, part, src.transposed)


def _quantize(t: Tensor, o: _Output, scheme: QuantScheme) -> Named:
    q = _quantizer()
    specs = q.quantized_specs(tuple(t.shape), t.dtype, scheme)
    # Inf/NaN is checked per chunk by the walker (one host sync per layer, not per tensor).
    out = q.quantize_weight(t.contiguous(), scheme, check_finite=False)
    if set(out) != set(specs):
        raise RuntimeError(f"quantizer returned {sorted(out)} for {o.module}, its specs say {sorted(specs)}")
    return [(f"{o.module}.{suffix}", out[suffix]) for suffix in specs]


def _convert(src: Source, full: Tensor, scheme: QuantScheme, dtype: torch.dtype | None) -> Named:
    named: Named = []
    for o, t in zip(src.outputs, _pieces(src, full), strict=True):
        t = t if dtype is None else t.to(dtype)
        if o.quantize:
            named += _quantize(t, o, scheme)
        else:
            named.append((f"{o.module}.{o.suffix}", t.contiguous()))
    return named


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
    shard boundary: whole experts (any per-matrix scheme), rows (fp8_channel), or row blocks
    (fp8_block, when the shard length is a multiple of the block's rows).
    """
    shard = _dim0_shard(p)
    if shard is None or not all(o.quantize for o in src.outputs):
        return False
    count = shard[1]
    rows = math.ceil(p.shape[0] / count)
    if rows * (count - 1) >= p.shape[0]:
        return False  # some rank holds an empty shard
    if src.parts:
        return True
    if scheme.kind == "fp8_channel":
        return True
    return scheme.kind == "fp8_block" and scheme.block_size is not None and rows % scheme.block_size[0] == 0


def _gather_dim0(local: Tensor, like: DTensor, full_shape: Shape) -> Tensor:
    """All-gather `local` (this rank's dim-0 part, sharded like `like`) into the full tensor."""
    as_bytes = local.element_size() == 1 and local.dtype not in (torch.uint8, torch.int8)
    wire = local.contiguous().view(torch.uint8) if as_bytes else local.contiguous()  # fp8 goes as bytes
    stride = tuple(math.prod(full_shape[i + 1 :]) for i in range(len(full_shape)))
    dt = DTensor.from_local(
        wire, like.device_mesh, like.placements, run_check=False, shape=torch.Size(full_shape), stride=stride
    )
    full = dt.full_tensor()
    return full.view(local.dtype) if as_bytes else full


def _quantize_then_gather(src: Source, p: DTensor, scheme: QuantScheme, dtype: torch.dtype | None) -> Named:
    local = p.to_local()
    local = local if dtype is None else local.to(dtype)
    if not src.parts:
        (o,) = src.outputs
        quantized = _quantize(local, o, scheme)
        full_specs = output_specs(src, scheme, dtype)
        return [(n, _gather_dim0(t, p, spec[2])) for (n, t), spec in zip(quantized, full_specs, strict=True)]
    # Experts: quantize each local expert's matrices, stack per (part, suffix), gather the stacks.
    stacks: list[dict[str, list[Tensor]]] = [{} for _ in src.parts]
    for e in range(local.shape[0]):
        for j, part in enumerate(src.parts):
            for name, t in _quantize(_matrix(local, e, part, src.transposed), src.outputs[j], scheme):
                stacks[j].setdefault(name.rsplit(".", 1)[-1], []).append(t)
    n = p.shape[0]
    full = [{k: _gather_dim0(torch.stack(v), p, (n, *v[0].shape)) for k, v in s.items()} for s in stacks]
    del stacks
    named: Named = []
    for e in range(n):
        for j in range(len(src.parts)):
            o = src.outputs[e * len(src.parts) + j]
            named += [(f"{o.module}.{k}", t[e]) for k, t in full[j].items()]
    return named


def materialize(src: Source, scheme: QuantScheme, dtype: torch.dtype | None) -> tuple[Named, int]:
    """The checkpoint tensors of `src`, and how many bytes this rank received gathering them.

    For a DTensor parameter this runs collectives: every rank of its mesh must call it in the same order.
    """
    p = src.param.detach()
    if not isinstance(p, DTensor):
        return _convert(src, p, scheme, dtype), 0
    if quantize_before_gather_ok(src, p, scheme):
        named = _quantize_then_gather(src, p, scheme, dtype)
        return named, sum(t.numel() * t.element_size() for _, t in named)
    if dtype is not None:
        p = p.to(dtype)  # cast the shard, not the gathered tensor: same bits, fewer bytes on the wire
    full = p.full_tensor()
    sharded = any(isinstance(pl, Shard) for pl in p.placements)
    gathered = full.numel() * full.element_size() if sharded else 0
    return _convert(src, full, scheme, dtype), gathered
