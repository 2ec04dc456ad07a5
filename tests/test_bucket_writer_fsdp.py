"""`BucketWriter` on a real FSDP2 model of 2 and 4 ranks (Gloo, CPU; with 4, one rank holds no expert,
so those are gathered before quantizing): rank 0 writes the buckets while the others only walk (as
non-sending FSDP ranks do in `push`), and every bucket equals the unsharded writer's, for the kernel
and checkpoint layouts, quantized and not, with buckets that split tensors. A writer closed after one
bucket (a refused sync) leaves the ranks in lockstep: the next sync is bit-exact again."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp

from configs.quant import QuantScheme
from tests.test_bucket_writer import buckets_of, header_for, spread_amaxes
from tests.test_walker_fsdp import FP8_BLOCK, NONE, free_port, join_gloo, leave_gloo, moe_model, shard
from trainer_side.bucket_writer import BucketWriter
from trainer_side.walker import iter_layer_chunks

NVFP4 = QuantScheme(
    kind="nvfp4", group_size=16, source="compressed-tensors", scale_shape="2d", ignore=("lm_head",)
)
CASES = [(FP8_BLOCK, "kernel"), (FP8_BLOCK, "checkpoint"), (NONE, "checkpoint"), (NVFP4, "checkpoint")]


def worker(rank: int, port: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    join_gloo(rank, port, world)
    try:
        model = moe_model()
        spread_amaxes(model)
        reference = copy.deepcopy(model)
        shard(model, init_device_mesh("cpu", (world,)))
        dtype = torch.bfloat16
        for scheme, layout in CASES:
            for bucket in (4096, 1 << 20):
                if rank != 0:
                    for _ in range(2):  # the full sync, then the one the writer stops after a bucket
                        for _ in iter_layer_chunks(model, scheme, dtype=dtype):
                            pass
                    continue
                header = header_for(reference, scheme, layout, bucket, dtype)
                writer = BucketWriter.build(model, scheme, header, dtype=dtype)
                assert isinstance(writer, BucketWriter), writer
                unsharded = BucketWriter.build(reference, scheme, header, dtype=dtype)
                assert isinstance(unsharded, BucketWriter), unsharded
                expected = buckets_of(header, unsharded)
                got = buckets_of(header, writer)
                for k, (a, b) in enumerate(zip(got, expected, strict=True)):
                    assert torch.equal(a, b), f"{scheme.kind} {layout} {bucket}: bucket {k} differs"
                writer.fill(0, torch.zeros(header.bucket_sizes[0], dtype=torch.uint8))
                writer.close()  # refused after bucket 0: the remaining gathers are drained
        # in lockstep after the early stop: one more full sync is bit-exact
        if rank == 0:
            header = header_for(reference, FP8_BLOCK, "kernel", 4096, dtype)
            writer = BucketWriter.build(model, FP8_BLOCK, header, dtype=dtype)
            assert isinstance(writer, BucketWriter)
            expected = buckets_of(header, BucketWriter.build(reference, FP8_BLOCK, header, dtype=dtype))
            assert all(torch.equal(a, b) for a, b in zip(buckets_of(header, writer), expected, strict=True))
        else:
            for _ in iter_layer_chunks(model, FP8_BLOCK, dtype=dtype):
                pass
    finally:
        leave_gloo()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_the_writer_on_a_sharded_model_fills_the_unsharded_buckets(world: int) -> None:
    mp.spawn(worker, args=(free_port(), world), nprocs=world, join=True)


def push_worker(rank: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from configs.trainer import BroadcasterConfig
    from tests.test_walker_fsdp import check_walk
    from trainer_side.broadcast import PushError, WeightBroadcaster

    join_gloo(rank, port, 2)
    try:
        model = moe_model()
        reference = copy.deepcopy(model) if rank == 0 else None
        shard(model, init_device_mesh("cpu", (2,)))
        config = BroadcasterConfig(
            servers=[f"http://127.0.0.1:{free_port()}"],  # nobody listens: the sync never starts
            inference_config={"model_type": "qwen3_moe"},
            rendezvous_timeout_s=20,
            http_timeout_s=5,
        )
        bc = WeightBroadcaster(config)
        if rank == 0:
            with pytest.raises(PushError, match="cannot reach inference server"):
                bc.push(model, 1)
        else:
            bc.push(model, 1)  # a non-sending rank runs the gathers and returns
        # Both ranks ran the same gathers: the next walk is in lockstep and bit-exact.
        check_walk(model, reference, NONE, torch.bfloat16)
    finally:
        leave_gloo()


@pytest.mark.slow
def test_a_push_failing_before_its_stream_leaves_the_fsdp_ranks_in_lockstep() -> None:
    mp.spawn(push_worker, args=(free_port(),), nprocs=2, join=True)
