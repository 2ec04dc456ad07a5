"""Every load path end to end: trainer → Gloo → `layercast serve` → generation equal to the reference.

One server for the module (CPU build with vLLM's plain `F.linear` fallback, so runtime weights stay
plain tensors as on GPU and the checkpoint and kernel paths are valid); each test re-inits with its path.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch

from configs.trainer import BroadcasterConfig
from rpc.launch import ServerProcess, free_port
from tests.test_serve_e2e import _assert_serves
from trainer_side.broadcast import WeightBroadcaster
from trainer_side.kernel_layout import KernelLayoutError, fuse_specs
from trainer_side.toy_models import perturb_, save_toy, toy_config, toy_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return toy_model(toy_config("qwen3", torch.float32), seed=1)


@pytest.fixture(scope="module")
def server(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("paths")
    proc = ServerProcess(
        save_toy(model, work / "model"),
        extra_args=[
            "--dtype",
            "float32",
            "--max-model-len",
            "256",
            "--max-num-seqs",
            "4",
            "--enforce-eager",
            "--served-model-name",
            "toy",
            "--kv-cache-memory-bytes",
            str(64 * 2**20),
        ],
        env={"LAYERCAST_CPU_PLAIN_LINEAR": "1"},
        log_path=work / "server.log",
    )
    try:
        proc.wait_ready(300)
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("path", ["kernel", "checkpoint", "layerwise"])
def test_path_syncs_and_serves_the_new_weights(
    server: ServerProcess, model: torch.nn.Module, path: str
) -> None:
    bc = WeightBroadcaster(
        BroadcasterConfig(
            servers=[server.url],
            inference_config=str(server.log_path.parent / "model"),
            master_port=free_port(),
            load_path=path,
            bucket_bytes=128 * 1024,
        )
    )
    try:
        assert bc.init()[server.url].load_path == path
        assert bc.layout == ("kernel" if path == "kernel" else "checkpoint")
        for step in (1, 2):
            perturb_(model, 100 * len(path) + step)
            report = bc.push(model, step)
            assert report.servers[server.url].load_path == path
            _assert_serves(server.url, model)
        assert httpx.get(server.url + "/weights").json()["load_path"] == path
    finally:
        bc.close()


def test_fusion_of_moe_and_attention_specs() -> None:
    f32 = torch.float32
    specs = [
        ("l.self_attn.q_proj.weight", f32, (256, 64)),
        ("l.self_attn.k_proj.weight", f32, (128, 64)),
        ("l.self_attn.v_proj.weight", f32, (128, 64)),
        *[
            (f"l.mlp.experts.{e}.{p}.weight", f32, (32, 64) if p != "down_proj" else (64, 32))
            for e in range(3)
            for p in ("gate_proj", "up_proj", "down_proj")
        ],
        ("l.mlp.gate.weight", f32, (3, 64)),
    ]
    assert fuse_specs(specs) == [
        ("l.self_attn.qkv_proj.weight", f32, (512, 64)),
        ("l.mlp.experts.w13_weight", f32, (3, 64, 64)),
        ("l.mlp.experts.w2_weight", f32, (3, 64, 32)),
        ("l.mlp.gate.weight", f32, (3, 64)),
    ]
    with pytest.raises(KernelLayoutError, match="per-tensor"):
        fuse_specs([("a.q_proj.weight_scale", f32, ()), ("a.k_proj.weight_scale", f32, ())])
