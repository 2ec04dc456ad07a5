"""The layer walker for MXFP8 / NVFP4 schemes: checkpoint names, ignore lists, shared NVFP4 global scales."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from configs.quant import QuantScheme
from tests.test_walker import QUANTIZED_LINEAR, assert_plan_matches, tiny, walk
from trainer_side.layers import fused_group
from trainer_side.mx_quantize import quantize_mxfp8
from trainer_side.quantize import mx_tensor_names, quantize_weight

CT_NVFP4 = QuantScheme(
    kind="nvfp4",
    group_size=16,
    source="compressed-tensors",
    format="nvfp4-pack-quantized",
    scale_shape="2d",
    ignore=("lm_head", "re:.*mlp.down_proj$"),
)
MO_NVFP4 = QuantScheme(
    kind="nvfp4", group_size=16, source="modelopt", format="W4A16_NVFP4", ignore=("lm_head",)
)
MO_MXFP8 = QuantScheme(kind="mxfp8", group_size=32, source="modelopt", ignore=("lm_head", "*mlp.gate"))


def _checkpoint_weights(model: nn.Module) -> dict[str, Tensor]:
    """HF checkpoint matrices of the model, fused experts split into `experts.{e}.{proj}.weight`."""
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if ".experts." in name and p.ndim == 3:
            prefix, leaf = name.rsplit(".", 1)
            for e in range(p.shape[0]):
                if leaf == "gate_up_proj":
                    half = p.shape[1] // 2
                    out[f"{prefix}.{e}.gate_proj.weight"] = p[e, :half].detach()
                    out[f"{prefix}.{e}.up_proj.weight"] = p[e, half:].detach()
                else:
                    out[f"{prefix}.{e}.{leaf}.weight"] = p[e].detach()
        else:
            out[name] = p.detach()
    return out


def _group_amaxes(weights: dict[str, Tensor], quantized: set[str]) -> dict[str, Tensor]:
    groups: dict[str, Tensor] = {}
    for module in quantized:
        amax = weights[f"{module}.weight"].abs().amax().float()
        key = fused_group(module)
        groups[key] = torch.maximum(groups.get(key, amax), amax)
    return {m: groups[fused_group(m)] for m in quantized}


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("scheme", [CT_NVFP4, MO_NVFP4, MO_MXFP8], ids=lambda s: f"{s.source}-{s.kind}")
def test_walk_yields_the_checkpoint_tensors(arch: str, scheme: QuantScheme) -> None:
    model = tiny(arch)
    plan, chunks = walk(model, scheme)
    assert_plan_matches(plan, chunks)
    got = {n: t for c in chunks for n, t in c.tensors}
    weights = _checkpoint_weights(model)
    # every linear of the checkpoint (the MoE router too: vLLM builds it as a quantizable linear) that
    # the scheme's ignore list does not exclude, decided by vLLM's rules (tests/test_detect.py)
    linears = {
        n.removesuffix(".weight")
        for n in weights
        if QUANTIZED_LINEAR.fullmatch(n) or n.endswith("mlp.gate.weight")
    }
    quantized = {m for m in linears if not scheme.is_ignored(m)}
    assert quantized
    expected_names = {f"{m}.{suffix}" for m in quantized for suffix in mx_tensor_names(scheme)}
    expected_names |= {n for n in weights if n.removesuffix(".weight") not in quantized}
    assert set(got) == expected_names
    amax_of = _group_amaxes(weights, quantized)
    for module in sorted(quantized):
        w = weights[f"{module}.weight"]
        want = quantize_weight(
            w.contiguous(), scheme, global_amax=amax_of[module] if scheme.kind == "nvfp4" else None
        )
        for suffix, t in want.items():
            a = got[f"{module}.{suffix}"]
            assert a.dtype == t.dtype and a.shape == t.shape, f"{module}.{suffix}"
            assert torch.equal(a.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), (
                f"{module}.{suffix}"
            )
    if scheme.kind == "mxfp8":
        _, s = quantize_mxfp8(weights["model.layers.0.self_attn.q_proj.weight"])
        assert torch.equal(got["model.layers.0.self_attn.q_proj.weight_scale"], s)


def test_nvfp4_fused_shards_share_one_global_scale() -> None:
    model = tiny("qwen3_moe")
    with torch.no_grad():  # shards of different ranges: the largest must set the shared scale
        model.model.layers[0].self_attn.k_proj.weight *= 3
        model.model.layers[0].self_attn.o_proj.weight *= 0.5
        experts = model.model.layers[0].mlp.experts
        experts.gate_up_proj[:, experts.gate_up_proj.shape[1] // 2 :] *= torch.arange(1, 5).view(4, 1, 1)
    got = {n: t for c in walk(model, MO_NVFP4)[1] for n, t in c.tensors}
    attn = "model.layers.0.self_attn"
    qkv = [got[f"{attn}.{p}_proj.weight_scale_2"] for p in "qkv"]
    assert qkv[0].shape == () and all(torch.equal(qkv[0], g) for g in qkv)
    assert not torch.equal(qkv[0], got[f"{attn}.o_proj.weight_scale_2"])  # o_proj is its own module
    for e in range(4):
        experts = f"model.layers.0.mlp.experts.{e}"
        assert torch.equal(
            got[f"{experts}.gate_proj.weight_scale_2"], got[f"{experts}.up_proj.weight_scale_2"]
        )
    dense = "model.layers.1.mlp"
    assert torch.equal(got[f"{dense}.gate_proj.weight_scale_2"], got[f"{dense}.up_proj.weight_scale_2"])
    # and each shared scale covers the largest shard exactly: 1/g = amax / (6 * 448)
    amax = float(model.model.layers[0].self_attn.k_proj.weight.abs().max())
    assert float(qkv[0]) == pytest.approx(amax / 2688.0, rel=1e-6)


def test_online_scheme_walks_unquantized() -> None:
    model = tiny("qwen3")
    online = QuantScheme(kind="mxfp8", group_size=32, source="online")
    plan, chunks = walk(model, online)
    assert {s.dtype for s in plan} == {torch.bfloat16}
    assert all(n in dict(model.named_parameters()) for c in chunks for n, _ in c.tensors)


def test_odd_input_dims_are_refused_at_plan_time() -> None:
    model = nn.Sequential(nn.ModuleList([nn.Linear(40, 16, bias=False)]))
    with pytest.raises(ValueError, match="multiple of 16"):
        walk(model, MO_NVFP4)
