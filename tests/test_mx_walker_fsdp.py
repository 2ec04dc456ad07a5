"""MXFP8 / NVFP4 walks of a real 2-rank FSDP2 model (Gloo, CPU): quantize-before-gather is bit-exact.

Rank 0 compares every chunk with the walk of an unsharded copy (which quantizes the whole tensors),
and both ranks measure what the gathers moved against gathering bf16.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from configs.quant import QuantScheme
from tests.test_walker_fsdp import WORLD, check_walk, free_port, moe_model
from trainer_side.walker import iter_layer_chunks

SCHEMES = [
    QuantScheme(
        kind="mxfp8", group_size=32, source="compressed-tensors", scale_shape="2d", ignore=("lm_head",)
    ),
    QuantScheme(
        kind="nvfp4", group_size=16, source="compressed-tensors", scale_shape="2d", ignore=("lm_head",)
    ),
    QuantScheme(kind="nvfp4", group_size=16, source="modelopt", ignore=("lm_head",)),
]


def worker(rank: int, port: int, out: dict[str, tuple[int, int]]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = moe_model()
        with torch.no_grad():  # k_proj and the up halves of the experts hold the largest values
            model.model.layers[0].self_attn.k_proj.weight *= 3
            experts = model.model.layers[0].mlp.experts
            experts.gate_up_proj[:, experts.gate_up_proj.shape[1] // 2 :] *= 2
        reference = copy.deepcopy(model) if rank == 0 else None
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for scheme in SCHEMES:
            check_walk(model, reference, scheme, torch.bfloat16)
        check_walk(model, reference, SCHEMES[1], None)  # fp32 master weights quantized as they are
        plain = sum(c.bytes_gathered for c in iter_layer_chunks(model, QuantScheme(), dtype=torch.bfloat16))
        for scheme in SCHEMES:
            quantized = sum(c.bytes_gathered for c in iter_layer_chunks(model, scheme, dtype=torch.bfloat16))
            if rank == 0:
                out[f"{scheme.source}-{scheme.kind}"] = (quantized, plain)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_mx_walks_equal_the_unsharded_walk() -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(free_port(), out), nprocs=WORLD, join=True)
        gathered = dict(out)
    # embeddings and lm_head stay bf16 either way; the linears and experts move as 8 or 4 bits
    for name, (quantized, plain) in gathered.items():
        assert quantized < plain * (0.8 if "mxfp8" in name else 0.6), (name, quantized, plain)
    print({k: f"{q / p:.3f} of bf16 gather bytes" for k, (q, p) in gathered.items()})
