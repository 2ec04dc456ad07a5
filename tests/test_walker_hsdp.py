"""The layer walker on 4-rank FSDP2 meshes (Gloo, CPU): HSDP (2 replicas x 2 shards) and 4 uneven shards.

Each walk must equal the unsharded walk bit for bit (checked on a rank of each replica), and gather each
chunk with one collective: `DTensor.full_tensor` (one collective per parameter) is never called. A walk
closed early on one rank keeps the ranks in lockstep.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from configs.quant import QuantScheme
from tests.test_walker_fsdp import (
    FP8_BLOCK,
    FP8_CHANNEL,
    NONE,
    check_walk,
    free_port,
    join_gloo,
    leave_gloo,
    moe_model,
    shard,
)
from trainer_side.walker import iter_layer_chunks

WORLD = 4
MXFP8 = QuantScheme(kind="mxfp8", group_size=32, source="compressed-tensors", ignore=("lm_head",))


def worker(rank: int, port: int, layout: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    join_gloo(rank, port, WORLD)
    try:
        model = moe_model()
        # one rank per replica compares with the unsharded walk (ranks 0 and 3: other replicas under HSDP)
        reference = copy.deepcopy(model) if rank in (0, 3) else None
        if layout == "hsdp":
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (WORLD,))  # 3 experts over 4 ranks: one holds none
        shard(model, mesh)

        calls = {"gather": 0, "full_tensor": 0}
        real_gather, real_full = dist.all_gather_into_tensor, DTensor.full_tensor

        def counted_gather(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls["gather"] += 1
            return real_gather(*args, **kwargs)

        def counted_full(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls["full_tensor"] += 1
            return real_full(self, *args, **kwargs)

        dist.all_gather_into_tensor = counted_gather  # type: ignore[assignment]
        DTensor.full_tensor = counted_full  # type: ignore[method-assign]
        try:
            for scheme, dtype in [(NONE, None), (NONE, torch.bfloat16), (FP8_BLOCK, torch.bfloat16),
                                  (FP8_CHANNEL, torch.bfloat16), (MXFP8, torch.bfloat16)]:  # fmt: skip
                before = dict(calls)
                check_walk(model, reference, scheme, dtype, quantized_gather=layout == "hsdp")
                chunks = 4  # embeddings, two layers, norm + lm_head
                assert calls["gather"] - before["gather"] == chunks, (scheme.kind, calls, before)
                assert calls["full_tensor"] == before["full_tensor"], (scheme.kind, calls)
            # k_proj (32 rows) splits into 8-row shards: not on FP8's 32-row blocks, so gathered first
            notes = {
                n: r for c in iter_layer_chunks(model, FP8_BLOCK, dtype=torch.bfloat16)
                for n, r in c.gathered_before_quantizing.items()
            }  # fmt: skip
            # A rank that stops walking early (the sender after a refused sync) drains the gathers: the
            # other ranks finish their walk, and the next walk is in lockstep again (bit-exact, no hang).
            walk = iter_layer_chunks(model, FP8_BLOCK, dtype=torch.bfloat16)
            if rank == 0:
                next(walk)
                walk.close()
            else:
                assert len(list(walk)) == 4
            check_walk(model, reference, FP8_BLOCK, torch.bfloat16, quantized_gather=layout == "hsdp")
            if layout == "uneven":
                assert any("k_proj" in n for n in notes), notes
                assert all("quantization groups" in r or "holds none" in r for r in notes.values()), notes
        finally:
            dist.all_gather_into_tensor, DTensor.full_tensor = real_gather, real_full  # type: ignore[method-assign]
    finally:
        leave_gloo()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hsdp", "uneven"])
def test_four_rank_walks_equal_the_unsharded_walk_with_one_gather_per_chunk(layout: str) -> None:
    mp.spawn(worker, args=(free_port(), layout), nprocs=WORLD, join=True)
