"""`write_hf_checkpoint`: the written HF checkpoint is exactly the sync stream (names, dtypes, shapes,
bytes), its config round-trips through `detect_quant_scheme`, and sharding writes a valid index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from trainer_side.checkpoint import write_hf_checkpoint
from trainer_side.detect import detect_quant_scheme
from trainer_side.toy_models import toy_config, toy_model
from trainer_side.walker import iter_layer_chunks, plan_stream

FP8_BLOCK = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "weight_block_size": [128, 128],
}


def read_all(out: Path) -> dict[str, torch.Tensor]:
    files = sorted(out.glob("model*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 - safe_open is not a Mapping
                assert key not in tensors
                tensors[key] = sf.get_tensor(key)
    return tensors


def setup(quant: dict[str, Any] | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg = toy_config(
        "qwen3", torch.bfloat16, hidden_size=256, intermediate_size=384, head_dim=64, vocab_size=512
    )
    model = toy_model(cfg, seed=3)
    base = cfg.to_dict()
    if quant is not None:
        base["quantization_config"] = quant
    return model, base


@pytest.mark.parametrize("quant", [FP8_BLOCK, None], ids=["fp8_block", "unquantized"])
def test_written_checkpoint_is_the_stream(quant: dict[str, Any] | None, tmp_path: Path) -> None:
    model, base = setup(quant)
    scheme = detect_quant_scheme(base)
    out = write_hf_checkpoint(model, scheme, tmp_path / "ckpt", base)

    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert detect_quant_scheme(out) == scheme
    config = base | {"architectures": [type(model).__name__]}  # filled in: the config had none
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(config))
    written = read_all(out)
    plan = plan_stream(model, scheme)
    assert sorted(written) == sorted(s.name for s in plan)
    for s in plan:
        t = written[s.name]
        assert (t.dtype, tuple(t.shape)) == (s.dtype, s.shape), s.name
    streamed = {n: t for c in iter_layer_chunks(model, scheme) for n, t in c.tensors}
    for name, t in streamed.items():
        assert torch.equal(written[name].view(torch.uint8), t.cpu().view(torch.uint8)), name
    if quant is not None:
        assert written["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
        assert written["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)
        assert written["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_sharded_checkpoint_has_an_index(tmp_path: Path) -> None:
    model, base = setup(FP8_BLOCK)
    scheme = detect_quant_scheme(base)
    out = write_hf_checkpoint(model, scheme, tmp_path / "ckpt", base, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(files)
    written = read_all(out)
    assert set(index["weight_map"]) == set(written) == {s.name for s in plan_stream(model, scheme)}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    assert not list(out.glob(".shard-*"))


def test_rewrite_replaces_old_shards(tmp_path: Path) -> None:
    model, base = setup(FP8_BLOCK)
    scheme = detect_quant_scheme(base)
    write_hf_checkpoint(model, scheme, tmp_path, base, max_shard_bytes=200_000)
    write_hf_checkpoint(model, scheme, tmp_path, base)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_config_must_describe_the_scheme(tmp_path: Path) -> None:
    model, base = setup(None)
    fp8 = detect_quant_scheme({"quantization_config": FP8_BLOCK})
    with pytest.raises(ValueError, match="quantization_config"):
        write_hf_checkpoint(model, fp8, tmp_path, base)


def test_config_without_architectures_names_the_model_class(tmp_path: Path) -> None:
    # A config built in code has `architectures` None; vLLM then serves the model as a pooling
    # (embedding) model, without generation routes (seen with `layercast demo --scheme fp8_block`).
    model, base = setup(FP8_BLOCK)
    assert not base.get("architectures")
    write_hf_checkpoint(model, detect_quant_scheme(base), tmp_path / "a", base)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["architectures"] == [type(model).__name__]
    given = base | {"architectures": ["SomethingElse"]}
    write_hf_checkpoint(model, detect_quant_scheme(given), tmp_path / "b", given)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["architectures"] == ["SomethingElse"]
