"""The layer walker on plain HF models: checkpoint names and bits, quantization, name maps, memory."""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from configs.quant import QuantScheme
from trainer_side.preflight import MemoryBudgetError, preflight, require_memory_budget
from trainer_side.walker import (
    POST_LAYERS,
    PRE_LAYERS,
    LayerChunk,
    TensorSpec,
    iter_layer_chunks,
    plan_stream,
)

NONE = QuantScheme()
FP8_BLOCK = QuantScheme(
    kind="fp8_block",
    block_size=(32, 32),
    source="fp8",
    weight_scale_name="weight_scale_inv",
    scale_shape="2d",
)
QUANTIZED_LINEAR = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight"
)


def tiny(arch: str, tied: bool = False, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A 2-layer model (layer 1 of the MoE is dense) with random norms, so every tensor is distinct."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config, Qwen3MoeConfig

    common: dict[str, Any] = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "qwen3": lambda: Qwen3Config(head_dim=16, **common),
        "qwen3_moe": lambda: Qwen3MoeConfig(
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            **common,
        ),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[arch](), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1.5, 1.5)
    return model


def quantizer() -> Any:
    return pytest.importorskip("trainer_side.quantize")


def walk(model: nn.Module, scheme: QuantScheme, **kw: Any) -> tuple[list[TensorSpec], list[LayerChunk]]:
    return plan_stream(model, scheme, **kw), list(iter_layer_chunks(model, scheme, **kw))


def assert_plan_matches(plan: list[TensorSpec], chunks: list[LayerChunk]) -> None:
    yielded = [(c.label, n, t.dtype, tuple(t.shape)) for c in chunks for n, t in c.tensors]
    assert yielded == [(s.chunk, s.name, s.dtype, s.shape) for s in plan]


def saved_checkpoint(model: nn.Module, tmp_path: Path) -> dict[str, torch.Tensor]:
    model.save_pretrained(tmp_path, safe_serialization=True)
    return load_file(tmp_path / "model.safetensors")


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen3", True), ("qwen3_moe", False)])
def test_unquantized_walk_is_the_saved_checkpoint(arch: str, tied: bool, tmp_path: Path) -> None:
    model = tiny(arch, tied)
    plan, chunks = walk(model, NONE)
    assert_plan_matches(plan, chunks)
    assert [c.label for c in chunks] == [PRE_LAYERS, "model.layers.0", "model.layers.1", POST_LAYERS]
    for c in chunks[1:3]:
        assert all(n.startswith(c.label + ".") for n, _ in c.tensors)
    assert [n for n, _ in chunks[0].tensors] == ["model.embed_tokens.weight"]
    assert [n for n, _ in chunks[-1].tensors] == ["model.norm.weight"] + ([] if tied else ["lm_head.weight"])

    yielded = {n: t for c in chunks for n, t in c.tensors}
    assert len(yielded) == len(plan)  # no name twice
    saved = saved_checkpoint(model, tmp_path)
    assert set(yielded) == set(saved)
    for name, ref in saved.items():
        assert yielded[name].dtype == ref.dtype and torch.equal(yielded[name], ref), name
    if arch == "qwen3_moe":
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in yielded
        assert yielded["model.layers.0.mlp.experts.3.down_proj.weight"].shape == (64, 32)


def test_tied_config_never_sends_lm_head() -> None:
    model = tiny("qwen3", tied=True)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # tie broken in the trainer
    names = [s.name for s in plan_stream(model, NONE)]
    assert "lm_head.weight" not in names  # vLLM ties lm_head to embed_tokens and skips lm_head.weight
    assert names[0] == "model.embed_tokens.weight"


def test_transposed_fused_experts_split_like_the_standard_layout() -> None:
    model = tiny("qwen3_moe")
    expected = [(n, t.clone()) for c in iter_layer_chunks(model, NONE) for n, t in c.tensors]
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():  # the [E, in, out] storage of `is_transposed` experts
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.transpose(1, 2).contiguous())
        experts.down_proj = nn.Parameter(experts.down_proj.transpose(1, 2).contiguous())
    experts.is_transposed = True
    got = [(n, t) for c in iter_layer_chunks(model, NONE) for n, t in c.tensors]
    assert [n for n, _ in got] == [n for n, _ in expected]
    for (name, a), (_, b) in zip(got, expected, strict=True):
        assert torch.equal(a, b), name


def qwen3_fp8_scheme(model: nn.Module) -> QuantScheme:
    """The scheme of a config like Qwen/Qwen3-30B-A3B-FP8's: routers, norms and lm_head not converted."""
    from trainer_side.detect import detect_quant_scheme

    layers = range(len(model.model.layers))
    keep = ["lm_head", *(f"model.layers.{i}.{m}" for i in layers for m in ("mlp.gate", "input_layernorm"))]
    qcfg = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [32, 32],
        "modules_to_not_convert": keep,
    }
    return detect_quant_scheme({"quantization_config": qcfg})


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_fp8_block_walk_quantizes_exactly_the_checkpoint_linears(arch: str, tmp_path: Path) -> None:
    q = quantizer()
    model = tiny(arch)
    scheme = qwen3_fp8_scheme(model) if arch == "qwen3_moe" else FP8_BLOCK
    plan, chunks = walk(model, scheme)
    assert_plan_matches(plan, chunks)
    yielded = {n: t for c in chunks for n, t in c.tensors}
    saved = saved_checkpoint(model, tmp_path)
    scale = scheme.weight_scale_name
    expected_names = set()
    for name, ref in saved.items():
        if QUANTIZED_LINEAR.fullmatch(name):
            ref_q = q.quantize_weight(ref, scheme)
            scale_name = f"{name.removesuffix('.weight')}.{scale}"
            assert yielded[name].dtype == torch.float8_e4m3fn
            assert torch.equal(yielded[name].view(torch.uint8), ref_q["weight"].view(torch.uint8)), name
            assert torch.equal(yielded[scale_name], ref_q[scale]), name
            expected_names |= {name, scale_name}
        else:  # embeddings, norms, lm_head, the (ignored) MoE router
            assert torch.equal(yielded[name], ref), name
            expected_names.add(name)
    assert set(yielded) == expected_names
    if arch == "qwen3_moe":
        assert yielded["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
        assert "model.layers.0.mlp.experts.2.gate_proj.weight_scale_inv" in yielded


def test_router_follows_the_ignore_list_like_vllm() -> None:
    quantizer()
    model = tiny("qwen3_moe")
    names = {s.name for s in plan_stream(model, FP8_BLOCK)}
    # vLLM builds the router as a quantizable ReplicatedLinear: only `ignore` keeps it in BF16.
    assert "model.layers.0.mlp.gate.weight_scale_inv" in names
    names = {s.name for s in plan_stream(model, qwen3_fp8_scheme(model))}
    assert "model.layers.0.mlp.gate.weight_scale_inv" not in names
    assert "model.layers.0.mlp.gate.weight" in names
    # lm_head is never quantized, even when the ignore list forgets it.
    assert "lm_head.weight_scale_inv" not in {s.name for s in plan_stream(model, FP8_BLOCK)}


class RenamedTrainer(nn.Module):
    """A trainer whose module names are not HF's, with an extra value head that must not be sent."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.tok = hf.model.embed_tokens
        self.blocks = hf.model.layers
        self.final_norm = hf.model.norm
        self.head = hf.lm_head
        self.value_head = nn.Linear(64, 1, dtype=torch.bfloat16)


def to_hf(name: str) -> str | None:
    if name.startswith("value_head."):
        return None
    for old, new in (
        ("tok.", "model.embed_tokens."),
        ("blocks.", "model.layers."),
        ("final_norm.", "model.norm."),
        ("head.", "lm_head."),
    ):
        if name.startswith(old):
            return new + name.removeprefix(old)
    raise KeyError(name)


def test_name_map_renames_and_drops() -> None:
    hf = tiny("llama")
    _, expected = walk(hf, NONE)
    trainer = RenamedTrainer(hf)
    plan, chunks = walk(trainer, NONE, name_map=to_hf)
    assert_plan_matches(plan, chunks)
    got = [(n, t) for c in chunks for n, t in c.tensors]
    want = [(n, t) for c in expected for n, t in c.tensors]
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))
    assert [c.label for c in chunks][1:3] == ["blocks.0", "blocks.1"]  # labels are trainer module paths

    with pytest.raises(ValueError, match="same checkpoint name"):
        plan_stream(trainer, NONE, name_map=lambda n: "x" if n.startswith(("tok.", "head.")) else n)


def test_wrapper_prefixes_are_stripped() -> None:
    hf = tiny("qwen3", tied=True)
    compiled = torch.compile(hf)  # `_orig_mod.` prefix; nothing runs, so nothing compiles
    names = [s.name for s in plan_stream(compiled, NONE)]
    assert names == [s.name for s in plan_stream(hf, NONE)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_dtype_casts_before_quantizing() -> None:
    model = tiny("llama", dtype=torch.float32)
    plan, chunks = walk(model, NONE, dtype=torch.bfloat16)
    assert_plan_matches(plan, chunks)
    ref = dict(model.named_parameters())
    for c in chunks:
        for n, t in c.tensors:
            assert t.dtype == torch.bfloat16 and torch.equal(t, ref[n].detach().to(torch.bfloat16)), n


def test_earlier_chunks_are_freed_once_the_consumer_drops_them() -> None:
    model = tiny("qwen3_moe", dtype=torch.float32)
    pre = preflight(model, NONE, dtype=torch.bfloat16)
    plan = plan_stream(model, NONE, dtype=torch.bfloat16)
    alive: list[weakref.ref[torch.Tensor]] = []
    seen = 0
    for chunk in iter_layer_chunks(model, NONE, dtype=torch.bfloat16):  # the cast makes fresh tensors
        assert not [r for r in alive if r() is not None], "the walk still holds an earlier chunk"
        specs = [s for s in plan if s.chunk == chunk.label]
        assert chunk.nbytes == sum(s.nbytes for s in specs) <= pre.largest_chunk_bytes
        alive = [weakref.ref(t) for _, t in chunk.tensors]
        seen += len(chunk.tensors)
        del chunk
    assert seen == len(plan)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages torch ops allocate while active, freed ones subtracted.

    Storage Python objects live exactly as long as the storage (torch preserves them), so a finalizer
    on one fires when its memory goes, views included.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.tracked = {p.untyped_storage().data_ptr() for p in model.parameters()}  # not allocations

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.tracked:
                    self.tracked.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.live -= nbytes


@pytest.mark.parametrize(("scheme", "dtype"), [(NONE, torch.float32), (FP8_BLOCK, torch.bfloat16)])
def test_peak_memory_of_the_walk_is_about_one_chunk(scheme: QuantScheme, dtype: torch.dtype) -> None:
    if scheme.quantized:
        quantizer()
    model = tiny("qwen3_moe")  # BF16: with dtype=float32 every yielded tensor is a fresh allocation
    pre = preflight(model, scheme, dtype=dtype)
    with LiveBytes(model) as dropping:
        for chunk in iter_layer_chunks(model, scheme, dtype=dtype):
            del chunk
    with LiveBytes(model) as keeping:
        kept = list(iter_layer_chunks(model, scheme, dtype=dtype))
    assert pre.largest_chunk_bytes <= dropping.peak <= pre.walk_peak_bytes
    # The tracker does see a consumer that hoards chunks (unquantized: every yielded byte is fresh).
    assert dropping.peak < keeping.peak
    if not scheme.quantized:
        assert keeping.peak == sum(c.nbytes for c in kept) > pre.walk_peak_bytes


def test_preflight_matches_the_walk() -> None:
    model = tiny("qwen3_moe")
    _, plain = walk(model, NONE)
    for scheme in (NONE, FP8_BLOCK) if _has_quantizer() else (NONE,):
        pre = preflight(model, scheme)
        chunks = list(iter_layer_chunks(model, scheme))
        sizes = {c.label: c.nbytes for c in chunks}
        assert pre.num_chunks == len(chunks) == 4
        assert pre.num_tensors == sum(len(c.tensors) for c in chunks)
        assert pre.total_bytes == sum(sizes.values())
        assert pre.largest_chunk_bytes == sizes[pre.largest_chunk] == max(sizes.values())
        assert pre.total_source_bytes == sum(c.nbytes for c in plain)
        assert pre.largest_chunk_source_bytes == max(c.nbytes for c in plain)
        assert pre.largest_param_bytes == max(p.numel() * p.element_size() for p in model.parameters())
        if scheme.quantized:
            assert pre.total_bytes < pre.total_source_bytes
            assert pre.largest_chunk == "model.layers.0"  # the MoE layer, not the dense one

    pre = preflight(model, NONE)
    require_memory_budget(pre, pre.walk_peak_bytes + 4096, bucket_bytes=4096)
    with pytest.raises(MemoryBudgetError, match=rf"{pre.largest_chunk_bytes} bytes\) as sent") as err:
        require_memory_budget(pre, pre.walk_peak_bytes + 4095, bucket_bytes=4096)
    assert f"({pre.walk_peak_bytes + 4096} bytes) needed" in str(err.value)


def _has_quantizer() -> bool:
    try:
        import trainer_side.quantize  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("bad_layer", [0, 1])
def test_a_non_finite_weight_stops_the_walk_naming_it(bad_layer: int) -> None:
    model = tiny("qwen3")
    with torch.no_grad():
        model.model.layers[bad_layer].mlp.down_proj.weight[3, 5] = float("nan")
    names: list[str] = []
    bad = rf"layers\.{bad_layer}\.mlp\.down_proj\.weight_scale_inv.*inf or NaN"
    with pytest.raises(ValueError, match=bad):
        for chunk in iter_layer_chunks(model, FP8_BLOCK):
            names += [n for n, _ in chunk.tensors]
    # Checked one chunk late (no host sync per tensor): at most the next chunk was produced.
    assert not any(f"layers.{bad_layer + 2}." in n for n in names)
