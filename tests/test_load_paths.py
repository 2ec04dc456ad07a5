"""The three load paths on a real CPU vLLM engine (tiny random Llama, fp32).

One engine per module, started from checkpoint B with the CPU linear weights kept in place
(``LAYERCAST_CPU_PLAIN_LINEAR=1``) so the checkpoint and kernel paths apply. Reference = the greedy
tokens and logprobs of that fresh engine on B. Each test first loads random weights A (outputs must
change), then loads B through the path under test: tokens and logprobs must equal the reference exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TinyModel, greedy, start_llm, stop_llm

pytestmark = pytest.mark.slow


def hf_to_runtime_llama(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a trainer does for vLLM's unquantized runtime layout: fuse q/k/v and gate/up."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name or ".mlp.up_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            k, v = (sd[name.replace("q_proj", x)] for x in ("k_proj", "v_proj"))
            out[name.replace("q_proj", "qkv_proj")] = torch.cat([t, k, v]).contiguous()
        elif ".mlp.gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat(
                [t, sd[name.replace("gate_proj", "up_proj")]]
            ).contiguous()
        else:
            out[name] = t
    return out


class Engine:
    def __init__(self, llm: Any, model: TinyModel, workdir: Path) -> None:
        self.llm, self.model, self.workdir = llm, model, workdir
        self.ref = greedy(llm)

    def rpc(self, method: str, **kwargs: Any) -> Any:
        return self.llm.collective_rpc(method, kwargs=kwargs)[0]

    def load(self, path: str, file: Path, manifest: list[list[Any]] | None = None) -> dict[str, Any]:
        res = self.rpc("layercast_load", path=path, tensors=str(file), manifest=manifest)
        assert res["ok"], res
        return res

    def load_a(self) -> None:
        """Put weights A in (layerwise) and check the outputs moved away from the reference."""
        self.load("layerwise", self.model.file_a)
        assert greedy(self.llm) != self.ref


@pytest.fixture(scope="module")
def engine(
    tiny_models: dict[str, TinyModel], plain_cpu_linear: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    llm = start_llm(tiny_models["llama"].dir_b)
    try:
        yield Engine(llm, tiny_models["llama"], tmp_path_factory.mktemp("load_paths"))
    finally:
        stop_llm(llm)


def test_checkpoint_path(engine: Engine) -> None:
    engine.load("checkpoint", engine.model.file_a)
    assert greedy(engine.llm) != engine.ref
    res = engine.load("checkpoint", engine.model.file_b)
    assert res["path"] == "checkpoint" and res["n_tensors"] == len(load_file(engine.model.file_b))
    assert greedy(engine.llm) == engine.ref


def test_layerwise_path(engine: Engine) -> None:
    engine.load_a()
    res = engine.load("layerwise", engine.model.file_b)
    assert res["path"] == "layerwise" and set(res["phases"]) == {"init_s", "load_s", "finalize_s"}
    assert greedy(engine.llm) == engine.ref


def test_layerwise_partial_then_rest(engine: Engine) -> None:
    """Two syncs: one carrying only layer 0, then the rest; untouched modules keep their weights."""
    engine.load_a()
    sd = load_file(engine.model.file_b)
    first = {k: v for k, v in sd.items() if ".layers.0." in k}
    rest = {k: v for k, v in sd.items() if k not in first}
    f1, f2 = engine.workdir / "part1.safetensors", engine.workdir / "part2.safetensors"
    save_file(first, f1)
    save_file(rest, f2)
    engine.load("layerwise", f1)
    assert greedy(engine.llm) != engine.ref
    engine.load("layerwise", f2)
    assert greedy(engine.llm) == engine.ref


def test_kernel_path(engine: Engine) -> None:
    runtime = hf_to_runtime_llama(load_file(engine.model.file_b))
    manifest = engine.rpc("layercast_runtime_manifest")
    announced = sorted([n, str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in runtime.items())
    assert announced == manifest
    f = engine.workdir / "runtime_b.safetensors"
    save_file(runtime, f)
    assert engine.rpc("layercast_choose_path", requested="auto", manifest=manifest)[0] == "kernel"
    engine.load_a()
    res = engine.load("kernel", f, manifest)
    assert res["path"] == "kernel" and res["n_tensors"] == len(manifest)
    assert greedy(engine.llm) == engine.ref


def test_auto_without_manifest_is_layerwise(engine: Engine) -> None:
    path, reason = engine.rpc("layercast_choose_path", requested="auto")
    assert path == "layerwise", reason


@pytest.mark.parametrize("defect", ["wrong_shape", "wrong_dtype", "unknown_name", "missing_name"])
def test_kernel_manifest_mismatch_refused(engine: Engine, defect: str) -> None:
    runtime = hf_to_runtime_llama(load_file(engine.model.file_a))
    victim = "model.layers.1.self_attn.qkv_proj.weight"
    if defect == "wrong_shape":
        runtime[victim] = runtime[victim][:-1].contiguous()
    elif defect == "wrong_dtype":
        runtime[victim] = runtime[victim].to(torch.bfloat16)
    elif defect == "unknown_name":
        runtime["model.layers.1.self_attn.q_proj.weight"] = runtime.pop(victim)
    else:
        del runtime[victim]
    f = engine.workdir / f"bad_{defect}.safetensors"
    save_file(runtime, f)
    before = engine.rpc("layercast_weights_checksum")
    res = engine.rpc("layercast_load", path="kernel", tensors=str(f))
    assert not res["ok"] and "kernel manifest does not match" in res["error"], res
    assert victim.split(".self_attn")[0] in res["error"]
    assert engine.rpc("layercast_weights_checksum") == before


def test_load_stats_recorded(engine: Engine) -> None:
    stats = engine.rpc("layercast_load_stats")
    assert stats and all(s["seconds"] > 0 and s["n_bytes"] > 0 for s in stats)
