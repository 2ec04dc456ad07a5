"""Fuse HF-checkpoint tensors into vLLM's runtime layout, for the kernel-quantized load path.

vLLM serves Llama/Qwen-family layers with fused parameters: `q/k/v_proj` → `qkv_proj`, `gate/up_proj` →
`gate_up_proj` (rows concatenated in that order), MoE experts → `experts.w13_<suffix>` [E, gate+up rows,
...] and `experts.w2_<suffix>` [E, ...]. For the layouts whose processing keeps that form (unquantized on
GPU, FP8 blockwise 128x128 without DeepGEMM, per-channel FP8 with row-wise scales), the runtime
tensors are these fusions of the checkpoint tensors, so the trainer can send exactly what the worker
copies into its live parameters. Fusion is by name only and works on specs (for the manifest) and on
tensors (for the data) alike; the trainer checks its result against the runtime manifest the worker
reported at init, so any layout this module does not know is refused before data moves.

Limits: tensor parallelism 1 (a broadcast carries one stream for every rank), and block scales fuse
only when each part's rows are a multiple of the block rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

_PACKED: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
)
_EXPERT = re.compile(
    r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<suffix>\w+)$"
)
_PACKED_RE = re.compile(
    r"^(?P<prefix>.*)\.(?P<part>q_proj|k_proj|v_proj|gate_proj|up_proj)\.(?P<suffix>\w+)$"
)


class KernelLayoutError(ValueError):
    """The trainer's tensors cannot be fused into the runtime layout the worker reported."""


@dataclass(frozen=True)
class _Target:
    """One runtime tensor: its name and the checkpoint names it is built from, in order."""

    name: str
    parts: tuple[str, ...]
    stacked_experts: tuple[tuple[str, ...], ...] = ()


def _target_of(name: str) -> tuple[str, str, int]:
    """(runtime name, fusion kind, order key) of a checkpoint tensor name."""
    m = _EXPERT.match(name)
    if m:
        w = "w2" if m["proj"] == "down_proj" else "w13"
        return f"{m['prefix']}.{w}_{m['suffix']}", "expert", int(m["e"])
    m = _PACKED_RE.match(name)
    if m:
        for _, fused, parts in _PACKED:
            if m["part"] in parts:
                return f"{m['prefix']}.{fused}.{m['suffix']}", "packed", parts.index(m["part"])
    return name, "plain", 0


def plan_targets(names: Sequence[str]) -> list[_Target]:
    """Group checkpoint names into runtime tensors, in first-appearance order."""
    groups: dict[str, list[tuple[int, int, str]]] = {}
    kinds: dict[str, str] = {}
    for name in names:
        target, kind, key = _target_of(name)
        groups.setdefault(target, []).append(
            (key, 0 if "gate_proj" in name or "down_proj" in name else 1, name)
        )
        kinds[target] = kind
    out: list[_Target] = []
    for target, members in groups.items():
        if kinds[target] == "expert":
            experts: dict[int, list[tuple[int, str]]] = {}
            for e, order, name in members:
                experts.setdefault(e, []).append((order, name))
            if sorted(experts) != list(range(len(experts))):
                raise KernelLayoutError(f"{target}: expert indices are not 0..{len(experts) - 1}")
            stacked = tuple(tuple(n for _, n in sorted(experts[e])) for e in range(len(experts)))
            out.append(_Target(target, tuple(n for grp in stacked for n in grp), stacked))
        else:
            out.append(_Target(target, tuple(n for _, _, n in sorted(members))))
    return out


def _fuse_shapes(target: _Target, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    def cat(names: Sequence[str]) -> tuple[int, ...]:
        first = shapes[names[0]]
        if any(shapes[n][1:] != first[1:] for n in names):
            raise KernelLayoutError(f"{target.name}: parts {list(names)} differ beyond dim 0")
        return (sum(shapes[n][0] for n in names), *first[1:]) if first else first

    if target.stacked_experts:
        per = [cat(g) for g in target.stacked_experts]
        if any(p != per[0] for p in per):
            raise KernelLayoutError(f"{target.name}: experts have different shapes")
        return (len(per), *per[0])
    if len(target.parts) == 1:
        return shapes[target.parts[0]]
    if not shapes[target.parts[0]]:
        raise KernelLayoutError(f"{target.name}: per-tensor scales cannot be fused without requantizing")
    return cat(target.parts)


def fuse_specs(
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The runtime (name, dtype, shape) list for a checkpoint spec list (same order of first appearance)."""
    specs = list(specs)
    shapes = {n: tuple(s) for n, _, s in specs}
    dtypes = {n: d for n, d, _ in specs}
    out = []
    for t in plan_targets([n for n, _, _ in specs]):
        kinds = {dtypes[p] for p in t.parts}
        if len(kinds) != 1:
            raise KernelLayoutError(f"{t.name}: parts have different dtypes {sorted(map(str, kinds))}")
        out.append((t.name, dtypes[t.parts[0]], _fuse_shapes(t, shapes)))
    return out


def fuse_tensors(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Fuse one chunk's checkpoint tensors (a whole decoder layer) into runtime tensors."""
    by_name = dict(named)
    out: list[tuple[str, torch.Tensor]] = []
    for t in plan_targets([n for n, _ in named]):
        if t.stacked_experts:
            out.append((t.name, torch.stack([torch.cat([by_name[n] for n in g]) for g in t.stacked_experts])))
        elif len(t.parts) == 1:
            out.append((t.name, by_name[t.parts[0]]))
        else:
            out.append((t.name, torch.cat([by_name[n] for n in t.parts])))
    return out


def check_against_runtime(
    fused: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    runtime: Sequence[tuple[str, str, Sequence[int]]],
) -> str | None:
    """None when the fused specs are exactly the worker's runtime manifest, else the differences."""
    mine = {n: (str(d).removeprefix("torch."), tuple(s)) for n, d, s in fused}
    theirs = {n: (d, tuple(int(x) for x in s)) for n, d, s in runtime}
    problems = [
        f"{n}: trainer {mine[n]} vs runtime {theirs[n]}" for n in mine if n in theirs and mine[n] != theirs[n]
    ]
    problems += [f"runtime lacks {n}" for n in sorted(set(mine) - set(theirs))]
    problems += [f"trainer does not produce {n}" for n in sorted(set(theirs) - set(mine))]
    if not problems:
        return None
    more = f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""
    return "kernel layout mismatch: " + "; ".join(problems[:6]) + more
