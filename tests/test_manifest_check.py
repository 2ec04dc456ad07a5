"""``check_checkpoint_manifest`` against a live CPU vLLM engine (tiny random Llama and Qwen3-MoE, fp32).

One engine at a time (module fixture parametrised over the two models), vLLM's default CPU kernels. The
manifest is read from the safetensors header of the checkpoint the engine was started from; the check
runs inside the worker through ``LLM.apply_model`` (needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to
pickle the callable). The real manifest is accepted; each defect is refused naming the tensor.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from inference_worker.manifest_check import check_checkpoint_manifest
from tests.conftest import TinyModel, environ, start_llm, stop_llm

pytestmark = pytest.mark.slow

Entry = tuple[str, str, tuple[int, ...]]
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def header_manifest(path: Path) -> list[Entry]:
    """``(name, torch dtype name, shape)`` of every tensor in a safetensors file, from its header only."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return [(k, SAFETENSORS_DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in sorted(header.items())]


class Engine:
    def __init__(self, llm: Any, model: TinyModel) -> None:
        self.llm, self.model = llm, model
        self.manifest = header_manifest(model.file_b)

    def check(self, entries: list[Entry]) -> str | None:
        return self.llm.apply_model(partial(check_checkpoint_manifest, entries=entries))[0]  # type: ignore[no-any-return]

    def refused(self, entries: list[Entry], *needles: str) -> str:
        msg = self.check(entries)
        assert msg is not None and msg.startswith("checkpoint manifest does not fit"), msg
        for needle in needles:
            assert needle in msg, (needle, msg)
        return msg


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def engine(request: pytest.FixtureRequest, tiny_models: dict[str, TinyModel]) -> Iterator[Engine]:
    with environ({"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}):
        llm = start_llm(tiny_models[request.param].dir_b)
        try:
            yield Engine(llm, tiny_models[request.param])
        finally:
            stop_llm(llm)


def _replace(entries: list[Entry], target: str, **change: Any) -> list[Entry]:
    assert any(e[0] == target for e in entries), target
    out = []
    for e in entries:
        if e[0] == target:
            e = (change.get("name", e[0]), change.get("dtype", e[1]), change.get("shape", e[2]))
        out.append(e)
    return out


def test_real_checkpoint_accepted(engine: Engine) -> None:
    assert engine.check(engine.manifest) is None
    # order does not matter, and vLLM-dropped names (unused rotary tensors) are accepted
    extra = [("model.layers.0.self_attn.rotary_emb.inv_freq", "float32", (32,))]
    assert engine.check(list(reversed(engine.manifest)) + extra) is None


def test_renamed_tensor_refused(engine: Engine) -> None:
    name = "model.layers.1.self_attn.q_proj.weight"
    bad = _replace(engine.manifest, name, name="model.layers.1.self_attn.query_proj.weight")
    engine.refused(
        bad,
        "model.layers.1.self_attn.query_proj.weight: unknown tensor",
        "(2 problems)",
        "model.layers.1.self_attn.qkv_proj.weight: no entry covers its part(s) q_proj",
    )


def test_missing_layer_refused(engine: Engine) -> None:
    bad = [e for e in engine.manifest if not e[0].startswith("model.layers.1.")]
    msg = engine.refused(
        bad,
        "model.layers.1.self_attn.qkv_proj.weight: no entry covers it",
        "model.layers.1.input_layernorm.weight",
    )
    assert "model.layers.0." not in msg


def test_extra_unknown_tensor_refused(engine: Engine) -> None:
    bad = [*engine.manifest, ("model.layers.0.mlp.extra_proj.weight", "float32", (8, 128))]
    engine.refused(bad, "model.layers.0.mlp.extra_proj.weight: unknown tensor", "(1 problems)")


def test_wrong_dtype_refused(engine: Engine) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = _replace(engine.manifest, name, dtype="float8_e4m3fn")
    engine.refused(bad, f"{name}: dtype float8_e4m3fn cannot load into float32")
    # plain floats convert on load: a bf16 stream into the fp32 model is fine
    assert engine.check(_replace(engine.manifest, name, dtype="bfloat16")) is None


def test_wrong_shape_refused(engine: Engine) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"  # [kv_heads * head_dim, hidden] = [64, 128]
    engine.refused(_replace(engine.manifest, name, shape=(128, 128)), f"{name}: 128 rows, part 1")
    engine.refused(_replace(engine.manifest, name, shape=(64, 127)), f"{name}: shape [64, 127]")
    norm = "model.layers.1.post_attention_layernorm.weight"
    engine.refused(_replace(engine.manifest, norm, shape=(64,)), f"{norm}: shape [64]")
    short_vocab = _replace(engine.manifest, "lm_head.weight", shape=(500, 128))
    engine.refused(short_vocab, "lm_head.weight: 500 vocab rows")


def test_duplicate_refused(engine: Engine) -> None:
    dup = next(e for e in engine.manifest if e[0].endswith("v_proj.weight"))
    engine.refused([*engine.manifest, dup], f"{dup[0]}: duplicates {dup[0]}")


def test_moe_experts(engine: Engine) -> None:
    if engine.model.kind != "qwen3_moe":
        pytest.skip("MoE only")
    down = "model.layers.1.mlp.experts.3.down_proj.weight"  # [hidden, moe_intermediate] = [128, 64]
    engine.refused(_replace(engine.manifest, down, shape=(128, 32)), f"{down}: shape [128, 32]")
    engine.refused(
        _replace(engine.manifest, down, name="model.layers.1.mlp.experts.4.down_proj.weight"),
        "model.layers.1.mlp.experts.4.down_proj.weight: unknown tensor",
        "model.layers.1.mlp.experts.routed_experts.w2_weight: no entry covers 1 expert shards "
        "(experts.3.down_proj. w2)",
    )
    gate = "model.layers.0.mlp.experts.0.gate_proj.weight"
    engine.refused(_replace(engine.manifest, gate, dtype="float8_e4m3fn"), f"{gate}: dtype float8_e4m3fn")
