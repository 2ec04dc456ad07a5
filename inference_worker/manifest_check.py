"""Checks that a checkpoint-format manifest fits the served model before any data moves.

:func:`check_checkpoint_manifest` resolves every HF-checkpoint name the trainer announces to the model
parameter vLLM's ``load_weights`` would put it in, the way vLLM 0.26 does it:

* names containing an unused rotary tensor name (``rotary_emb.inv_freq``...) are dropped (as
  ``AutoWeightsLoader``), names the model's ``hf_to_vllm_mapper`` (+ the quant config's cache-scale
  mapper) maps to None are dropped; both are accepted and cover nothing;
* the mapper renames and stacks (``q_proj`` -> ``qkv_proj`` shard ``q``); without a stacking mapper the
  model's ``packed_modules_mapping`` is used (a path component that is a part name is replaced by the
  packed name, the part index is the shard);
* routed experts: ``<layer>.<e>.<gate|up|down>_proj.<suffix>`` (and the fused ``experts.gate_up_proj``
  form) through the experts module's own ``get_expert_mapping`` -> ``<module>.w13_<suffix>`` /
  ``w2_<suffix>``, shard = (logical expert, w1|w2|w3);
* a name that reaches a tied alias (``lm_head.weight`` when embeddings are tied), a pipeline placeholder
  layer or a persistent buffer is accepted and covers nothing (vLLM skips it / loads it outside the
  parameter set).

Then, per entry: the dtype must be loadable into the recorded (model-format) dtype: plain floating
types (fp16/bf16/fp32/fp64) convert into each other (the loaders ``copy_``), anything else (fp8, int,
packed fp4 in uint8) must match exactly. Shapes, when the dtypes agree exactly or are both plain
floats: same rank; dims vLLM does not shard equal the recorded dims; the sharded dim (column/vocab:
``output_dim``, row: ``input_dim``, experts: intermediate) equals recorded x TP size for ``weight``/
``bias`` and is within rounding of it for other suffixes (block scales); vocab rows equal
``org_vocab_size``; each part of a packed ``weight``/``bias`` has the part's full row count (q/k/v from
the head counts, gate/up from ``output_sizes``). Finally coverage: every recorded parameter must be
covered, every shard of a packed or expert parameter exactly once. Attention KV-cache scale parameters
(``q_scale``/``k_scale``/``v_scale``/``prob_scale``, only present with an FP8 KV cache, and the
``q/k/v_zero_point`` compressed-tensors creates on every attention layer) are optional: checkpoints
often lack them and vLLM then keeps its defaults.

Not checked: values; per-tensor scale shapes of packed params (one scalar per part, stored as () or
(1,)); shapes under a dtype change other than between plain floats (packed int4/fp4 layouts);
expert-parallel placement (every logical expert is required, whichever rank holds it); names a model's
hand-written ``load_weights`` handles specially beyond the mapper/packing/expert conventions above
(they are reported as unknown). Unexpected biases that vLLM would silently ignore are refused here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from inference_worker import vllm_compat

MAX_LISTED = 8
OPTIONAL_LEAVES = frozenset(
    {"q_scale", "k_scale", "v_scale", "prob_scale", "q_zero_point", "k_zero_point", "v_zero_point"}
)
PLAIN_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value).removeprefix("torch."), None)
    return dt if isinstance(dt, torch.dtype) else None


@dataclass
class _Target:
    """Where one entry goes: parameter name, shard key (None = whole), part index of a packed param."""

    param: str
    shard: Any = None
    part: int | None = None
    expert_shard: str | None = None


@dataclass
class _Model:
    """Everything the check needs from the live model, gathered once per call."""

    params: dict[str, torch.Tensor]
    aliases: set[str]
    buffers: set[str]
    modules: dict[str, torch.nn.Module]
    packed: dict[str, list[str]]
    part_of: dict[str, str]
    map_name: Any
    skip_substrs: tuple[str, ...]
    experts: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    fused_experts: list[tuple[str, str, str]] = field(default_factory=list)
    expert_slots: dict[str, set[str]] = field(default_factory=dict)
    expert_tp: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, model: torch.nn.Module) -> _Model:
        params = vllm_compat.model_format_params(model)
        canonical = {n for n, _ in model.named_parameters()}
        everything = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        aliases = {n for n in everything - canonical}
        params = {n: p for n, p in params.items() if n not in aliases}
        buffers = set(model.state_dict(keep_vars=True)) - everything
        packed = {k: list(v) for k, v in (getattr(model, "packed_modules_mapping", None) or {}).items()}
        part_of = {part: name for name, parts in packed.items() for part in parts}
        self = cls(
            params,
            aliases,
            buffers,
            dict(model.named_modules()),
            packed,
            part_of,
            vllm_compat.checkpoint_name_mapper(model),
            vllm_compat.skipped_checkpoint_substrings(),
        )
        for layer_name, mod_name, mapping, tp in vllm_compat.expert_checkpoint_mappings(model):
            for param_prefix, weight_name, _expert_id, shard_id in mapping:
                # vLLM: param = f"{layer_name}.{rest}" with weight_name replaced by param_prefix, minus
                # layer_name; the experts module's own tensors are named f"{mod_name}.{local}"
                stem = weight_name.removeprefix("experts.") if layer_name.endswith("experts") else weight_name
                ckpt = f"{layer_name}.{stem}"
                param = f"{mod_name}.{param_prefix.removeprefix('experts.')}"
                if weight_name.endswith("."):
                    slot = f"{weight_name}|{shard_id}"
                    self.experts[ckpt] = (param, slot, shard_id)
                    self.expert_slots.setdefault(param, set()).add(slot)
                else:
                    self.fused_experts.append((ckpt, param, shard_id))
            self.expert_tp[mod_name] = tp
        return self

    def resolve(self, name: str) -> _Target | str | None:
        """The target of ``name``, None when vLLM drops/skips it, or a reason string when unknown."""
        if any(s in name for s in self.skip_substrs):
            return None
        mapped = self.map_name(name)
        if mapped is None:
            return None
        vname, shard = mapped
        if vname in self.params:
            return self._packed_target(name, vname, shard)
        if vname in self.aliases or vname in self.buffers:
            return None
        hit = self._expert_target(vname)
        if hit is not None:
            return hit
        parts = vname.split(".")
        for i, comp in enumerate(parts[:-1]):  # packing without a stacking mapper
            if comp in self.part_of:
                fused = ".".join([*parts[:i], self.part_of[comp], *parts[i + 1 :]])
                if fused in self.params:
                    return self._packed_target(name, fused, None)
        for i in range(1, len(parts)):
            mod = self.modules.get(".".join(parts[:i]))
            if mod is not None and vllm_compat.is_pipeline_placeholder(mod):
                return None
        return (
            f"maps to {vname!r}, which is no parameter of the model"
            if vname != name
            else "no parameter of the model has this name"
        )

    def _packed_target(self, name: str, vname: str, shard: Any) -> _Target:
        parts_of = self.packed.get(vname.split(".")[-2] if "." in vname else "", None)
        if parts_of is None:
            return _Target(vname)
        comps = name.split(".")
        for idx, part in enumerate(parts_of):
            if part in comps:
                return _Target(vname, idx, idx)
        return _Target(vname, shard)  # already fused in the checkpoint: covers every part

    def _expert_target(self, vname: str) -> _Target | None:
        if not self.experts and not self.fused_experts:
            return None
        parts = vname.split(".")
        for k in range(len(parts) - 1, 0, -1):
            hit = self.experts.get(".".join(parts[:k]) + ".")
            if hit is not None:
                param_prefix, slot, shard_id = hit
                return _Target(param_prefix + ".".join(parts[k:]), slot, None, shard_id)
        for ckpt, param_prefix, shard_id in self.fused_experts:
            if vname == ckpt or vname.startswith(ckpt + "."):
                rest = vname[len(ckpt) :].lstrip(".") or "weight"
                return _Target(param_prefix + rest, ("fused",), None, shard_id)
        return None


def _dtype_problem(name: str, got: Any, want: torch.dtype) -> str | None:
    dt = _dtype(got)
    if dt is None:
        return f"{name}: unknown dtype {got!r}"
    if dt == want or (dt in PLAIN_FLOATS and want in PLAIN_FLOATS):
        return None
    return (
        f"{name}: dtype {str(dt).removeprefix('torch.')} cannot load into "
        f"{str(want).removeprefix('torch.')} (model parameter)"
    )


def _shape_problem(name: str, shape: tuple[int, ...], target: _Target, m: _Model) -> str | None:
    meta = m.params[target.param]
    want = tuple(meta.shape)
    mod_name, _, leaf = target.param.rpartition(".")
    exact = leaf in ("weight", "bias") or leaf.endswith(("_weight", "_bias"))
    if target.expert_shard is not None:
        if isinstance(target.shard, tuple):  # fused experts checkpoint tensor: rank only
            ok = len(shape) == len(want)
            return None if ok else f"{name}: shape {list(shape)} does not fit {target.param} {list(want)}"
        tp = m.expert_tp.get(mod_name, 1)
        if len(want) <= 2 and len(shape) <= 1 and not exact:
            return None  # per-tensor scales: one scalar per expert (and shard)
        if len(shape) != len(want) - 1:
            return (
                f"{name}: rank {len(shape)}, expert parameter {target.param} {list(want)} needs "
                f"{len(want) - 1}"
            )
        local = list(want[1:])
        sdim = 0 if target.expert_shard in ("w1", "w3") else len(local) - 1
        if target.expert_shard in ("w1", "w3") and local:
            local[0] = local[0] // 2 if leaf.startswith("w13_") else local[0]
        return _dims_problem(name, shape, local, sdim if len(local) > 1 else None, tp, exact, target.param)
    kind, tp, part_rows, vocab = vllm_compat.module_tp_layout(m.modules.get(mod_name, torch.nn.Module()))
    out_dim, in_dim = getattr(meta, "output_dim", None), getattr(meta, "input_dim", None)
    sdim = {"column": out_dim, "vocab": out_dim, "row": in_dim}.get(kind)
    local = list(want)
    scalar_slot = math.prod(want) == 1 or (target.part is not None and len(want) == 1)
    if not exact and scalar_slot and len(shape) <= 1 and math.prod(shape) == 1:
        # a per-tensor / per-part scalar scale, stored as () or (1,) (compressed-tensors' NVFP4 global
        # scales): a packed parameter keeps one per part
        return None
    if len(shape) != len(want):
        if len(want) <= 1 and len(shape) <= 1 and not exact:
            return None  # per-tensor/per-part scalar scales
        return f"{name}: rank {len(shape)} ({list(shape)}), {target.param} has rank {len(want)} {list(want)}"
    if part_rows is not None and target.part is not None:
        if exact and out_dim is not None:
            if shape[out_dim] != part_rows[target.part]:
                return (
                    f"{name}: {shape[out_dim]} rows, part {target.part} of {target.param} takes "
                    f"{part_rows[target.part]}"
                )
            return _dims_problem(name, shape, local, out_dim, tp, True, target.param, skip=out_dim)
        return _dims_problem(name, shape, local, out_dim, tp, False, target.param, skip=out_dim)
    if kind == "vocab" and sdim is not None and vocab is not None and exact:
        if shape[sdim] != vocab:
            return f"{name}: {shape[sdim]} vocab rows, the model has {vocab}"
        return _dims_problem(name, shape, local, sdim, tp, True, target.param, skip=sdim)
    return _dims_problem(name, shape, local, sdim, tp, exact, target.param)


def _dims_problem(
    name: str,
    shape: tuple[int, ...],
    local: list[int],
    sdim: int | None,
    tp: int,
    exact: bool,
    param: str,
    skip: int | None = None,
) -> str | None:
    if len(shape) != len(local):
        return f"{name}: shape {list(shape)} does not fit {param} (local {local})"
    for d, (got, have) in enumerate(zip(shape, local, strict=True)):
        if d == skip:
            continue
        if d == sdim and tp > 1:
            ok = got == have * tp if exact else tp * (have - 1) < got <= tp * have
        else:
            ok = got == have
        if not ok:
            full = [x * tp if i == sdim else x for i, x in enumerate(local)]
            return f"{name}: shape {list(shape)}, {param} needs {full}" + (
                f" (tp={tp}, dim {sdim} sharded)" if sdim is not None and tp > 1 else ""
            )
    return None


def check_checkpoint_manifest(model: torch.nn.Module, entries: Sequence[Sequence[Any]]) -> str | None:
    """None when every ``(name, dtype, shape)`` of a checkpoint-format stream fits ``model`` and the
    stream covers every parameter, else a message naming the first problems and their total count."""
    m = _Model.of(model)
    problems: list[str] = []
    covered: dict[str, dict[Any, str]] = {}
    for entry in entries:
        name, dtype, shape = str(entry[0]), entry[1], tuple(int(x) for x in entry[2])
        target = m.resolve(name)
        if target is None:
            continue
        if isinstance(target, str):
            problems.append(f"{name}: unknown tensor ({target})")
            continue
        if target.param not in m.params:
            problems.append(f"{name}: unknown tensor (maps to {target.param!r}, which the model lacks)")
            continue
        slots = covered.setdefault(target.param, {})
        if target.shard in slots or None in slots or (target.shard is None and slots):
            other = slots.get(target.shard) or next(iter(slots.values()))
            problems.append(f"{name}: duplicates {other} (both load {target.param})")
            continue
        slots[target.shard] = name
        want = m.params[target.param].dtype
        problem = _dtype_problem(name, dtype, want)
        if problem is None:
            problem = _shape_problem(name, shape, target, m)
        if problem:
            problems.append(problem)
    for pname in m.params:
        if pname.rpartition(".")[2] in OPTIONAL_LEAVES:
            continue
        got = covered.get(pname, {})
        if None in got or any(isinstance(s, tuple) for s in got):
            continue
        missing = _missing_shards(pname, got, m)
        if missing:
            problems.append(f"{pname}: no entry covers {missing}")
    if not problems:
        return None
    head = "; ".join(problems[:MAX_LISTED])
    more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"checkpoint manifest does not fit the served model ({len(problems)} problems): {head}{more}"


def _missing_shards(pname: str, got: dict[Any, str], m: _Model) -> str:
    slots = next((v for k, v in m.expert_slots.items() if pname.startswith(k)), None)
    if slots is not None:
        have = {s for s in got if isinstance(s, str)}
        lacking = sorted(slots - have)
        if not lacking:
            return ""
        shown = ", ".join(s.replace("|", " ") for s in lacking[:4])
        return f"{len(lacking)} expert shards ({shown}{', ...' if len(lacking) > 4 else ''})"
    parts = m.packed.get(pname.split(".")[-2] if "." in pname else "")
    if parts is not None and got:
        lacking_parts = [p for i, p in enumerate(parts) if i not in got]
        return "" if not lacking_parts else f"its part(s) {', '.join(lacking_parts)}"
    return "" if got else "it (no tensor for this parameter)"
