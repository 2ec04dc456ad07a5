"""Every load path end to end: trainer → Gloo or the colocated `ipc` backend (shared memory) → `layercast
serve` → generation equal to the reference.

One server for the module (CPU build with vLLM's plain `F.linear` fallback, so runtime weights stay
plain tensors as on GPU and the checkpoint and kernel paths are valid); each test re-inits with its path.
"""

from __future__ import annotations

import itertools

import httpx
import pytest
import torch

from configs.trainer import BroadcasterConfig
from rpc.client.orchestrator import SyncOrchestrator
from rpc.tools.demo import PROMPT
from rpc.tools.launch import ServerProcess, free_port
from tests.toy_server import assert_serves, model_dir, send_dying_sync
from trainer_side.broadcast import WeightBroadcaster
from trainer_side.kernel_layout import KernelLayoutError, fuse_specs
from trainer_side.toy_models import perturb_

pytestmark = pytest.mark.slow
TRAINER_SEED = 1
SERVER_ENV = {"LAYERCAST_CPU_PLAIN_LINEAR": "1", "VLLM_SERVER_DEV_MODE": "1"}
# One server for every case: versions only move forward (an older one is refused, 409).
_VERSIONS = itertools.count(1)


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
@pytest.mark.parametrize("path", ["kernel", "checkpoint", "layerwise"])
def test_path_syncs_and_serves_the_new_weights(
    server: ServerProcess, trainer_model: torch.nn.Module, path: str, backend: str
) -> None:
    bc = WeightBroadcaster(
        BroadcasterConfig(
            servers=[server.url],
            inference_config=model_dir(server),
            master_port=free_port(),
            load_path=path,
            backend=backend,
            bucket_bytes=128 * 1024,
        )
    )
    try:
        assert bc.init()[server.url].load_path == path
        # the server's ranks joined a group of this backend (a disagreement fails the rendezvous)
        assert bc.group is not None and bc.group.backend == backend
        assert bc.layout == ("kernel" if path == "kernel" else "checkpoint")
        for step in (1, 2):
            perturb_(trainer_model, 100 * len(path) + 10 * len(backend) + step)
            report = bc.push(trainer_model, next(_VERSIONS))
            assert report.servers[server.url].load_path == path
            assert_serves(server.url, trainer_model)
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


def test_pause_and_resume_around_a_sync_with_vllm_dev_routes(
    server: ServerProcess, trainer_model: torch.nn.Module
) -> None:
    """With VLLM_SERVER_DEV_MODE=1 vLLM has its own POST /update_weights; ours must still answer it."""
    bc = WeightBroadcaster(
        BroadcasterConfig(
            servers=[server.url],
            inference_config=model_dir(server),
            master_port=free_port(),
            load_path="layerwise",
        )
    )
    try:
        bc.init()
        perturb_(trainer_model, 4242)
        orch = SyncOrchestrator([server.url])
        report = orch.sync_step(
            lambda: bc.push(trainer_model, 42, sync_id="paused-42", arm=False), "paused-42", 42, pause="keep"
        )
        assert report.servers[server.url].response.weights_version == 42
        assert httpx.get(server.url + "/is_paused").json()["is_paused"] is False
        assert_serves(server.url, trainer_model)
    finally:
        bc.close()


def test_ipc_trainer_failing_mid_write_leaves_the_server_torn_until_a_full_sync(
    server: ServerProcess, trainer_model: torch.nn.Module
) -> None:
    """Colocated (`ipc`): the trainer's producer dies after half the tensors went through shared memory;
    the server must refuse generation (torn), name the cause, and heal with the next complete sync."""
    bc = WeightBroadcaster(
        BroadcasterConfig(
            servers=[server.url],
            inference_config=model_dir(server),
            master_port=free_port(),
            load_path="layerwise",
            backend="ipc",
            bucket_bytes=64 * 1024,
        )
    )
    try:
        bc.init()
        assert bc.group is not None and bc.group.backend == "ipc"
        version = next(_VERSIONS) + 100
        answer = send_dying_sync(server.url, bc, trainer_model, "doomed-ipc", version)
        assert answer.status_code == 502 and "trainer crashed" in answer.text
        assert httpx.get(server.url + "/weights").json()["state"] == "torn"
        r = httpx.post(
            server.url + "/v1/completions", json={"model": "toy", "prompt": PROMPT, "max_tokens": 2}
        )
        assert r.status_code == 503 and "torn" in r.text
        perturb_(trainer_model, 777)
        bc.push(trainer_model, version + 1)
        assert httpx.get(server.url + "/weights").json()["state"] == "ready"
        assert_serves(server.url, trainer_model)
    finally:
        bc.close()


def test_auto_moves_to_the_kernel_path_when_the_trainer_produces_the_runtime_layout(
    server: ServerProcess, trainer_model: torch.nn.Module
) -> None:
    """`load_path="auto"`: the server (plain tensors here, as on GPU) answers its runtime layout at init;
    the trainer produces exactly that layout, so its first push re-forms the group on the kernel path."""
    bc = WeightBroadcaster(
        BroadcasterConfig(servers=[server.url], inference_config=model_dir(server), master_port=free_port())
    )
    try:
        init = bc.init()[server.url]
        assert init.load_path == "layerwise" and init.runtime_manifest is not None
        for step in (1, 2):
            perturb_(trainer_model, 900 + step)
            report = bc.push(trainer_model, 500 + step)
            assert report.servers[server.url].load_path == "kernel"
            assert report.layout_reason.startswith("kernel layout"), report.layout_reason
            assert_serves(server.url, trainer_model)
        assert httpx.get(server.url + "/weights").json()["load_path"] == "kernel"
    finally:
        bc.close()
