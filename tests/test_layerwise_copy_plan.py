"""Which received views the layerwise path must copy: only those whose decoder layer is still incomplete
when the receiver re-uses their buffer (a view of bucket b lives until bucket b+2 is asked for)."""

from __future__ import annotations

import torch

from broadcaster.framing import make_header
from inference_worker.sync_worker import layerwise_copy_plan

KB = 1024


def spec(name: str, kib: int) -> tuple[str, torch.dtype, tuple[int, ...]]:
    return (name, torch.uint8, (kib * KB,))


def test_layers_within_two_buckets_are_not_copied_longer_ones_are() -> None:
    specs = [
        spec("model.embed_tokens.weight", 10),  # bigger than a bucket: staging, owned
        spec("model.layers.0.self_attn.qkv_proj.weight", 3),  # layer 0: buckets 3-4
        spec("model.layers.0.mlp.down_proj.weight", 3),
        spec("model.layers.1.mlp.experts.0.gate_proj.weight", 3),  # layer 1: buckets 5-7
        spec("model.layers.1.mlp.experts.1.gate_proj.weight", 3),
        spec("model.layers.1.mlp.experts.2.gate_proj.weight", 3),
        spec("model.layers.1.self_attn.attn.k_scale", 1),  # held to finalize: always copied
        spec("lm_head.weight", 3),
    ]
    header = make_header(specs, sync_id="s", weights_version=0, bucket_size=4 * KB)
    buckets = [e.pieces[-1].bucket for e in header.entries]
    assert buckets == [2, 3, 4, 5, 6, 7, 7, 8]  # the plan's own layout, as the test assumes
    copy = dict(zip([s[0] for s in specs], layerwise_copy_plan(header), strict=True))
    assert copy == {
        "model.embed_tokens.weight": False,
        "model.layers.0.self_attn.qkv_proj.weight": False,
        "model.layers.0.mlp.down_proj.weight": False,
        "model.layers.1.mlp.experts.0.gate_proj.weight": True,  # bucket 5, layer ends in 7
        "model.layers.1.mlp.experts.1.gate_proj.weight": False,
        "model.layers.1.mlp.experts.2.gate_proj.weight": False,
        "model.layers.1.self_attn.attn.k_scale": True,
        "lm_head.weight": False,
    }
