"""The layer walker on a real 2-rank FSDP2 model (Gloo, CPU): rank 0 gets the unsharded model's bits."""

from __future__ import annotations

import copy
import gc
import os
import socket
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from configs.quant import QuantScheme
from trainer_side.walker import LayerChunk, iter_layer_chunks

WORLD = 2
NONE = QuantScheme()
FP8_BLOCK = QuantScheme(
    kind="fp8_block",
    block_size=(32, 32),
    source="fp8",
    weight_scale_name="weight_scale_inv",
    scale_shape="2d",
)
FP8_CHANNEL = QuantScheme(kind="fp8_channel", source="fbgemm_fp8", scale_shape="column")


def moe_model() -> nn.Module:
    """FP32 (master weights) Qwen3-MoE with uneven shards: vocab 101 rows, 3 experts over 2 ranks."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=3,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1.5, 1.5)
    return model


def same_bits(a: Tensor, b: Tensor) -> bool:
    def raw(t: Tensor) -> Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


def assert_same_chunk(chunk: LayerChunk, want: LayerChunk, kind: str) -> None:
    assert chunk.label == want.label
    assert [n for n, _ in chunk.tensors] == [n for n, _ in want.tensors]
    for (name, a), (_, b) in zip(chunk.tensors, want.tensors, strict=True):
        assert same_bits(a, b), f"{kind}: {name} differs from the unsharded walk"


def check_walk(
    model: nn.Module,
    reference: nn.Module | None,
    scheme: QuantScheme,
    dtype: torch.dtype | None,
    *,
    quantized_gather: bool = True,
) -> None:
    """Walk `model` on every rank; a rank holding `reference` checks it against the unsharded walk.
    `quantized_gather`: layer 0's shards split on quantization-group bounds (most move quantized)."""
    expected = list(iter_layer_chunks(reference, scheme, dtype=dtype)) if reference is not None else []
    alive: list[weakref.ref[Tensor]] = []
    got: list[LayerChunk] = []
    for chunk in iter_layer_chunks(model, scheme, dtype=dtype):
        assert not [r for r in alive if r() is not None], "the walk still holds an earlier chunk"
        alive = [weakref.ref(t) for _, t in chunk.tensors]
        if reference is not None:
            assert_same_chunk(chunk, expected[len(got)], scheme.kind)
        # Only the metadata is kept: holding the tensors would defeat the freed-chunk check above.
        got.append(LayerChunk(chunk.label, [], chunk.bytes_gathered))
        del chunk
    assert len(got) == len(expected) or reference is None

    layer0 = next(c for c in got if c.label == "model.layers.0")
    numel = sum(p.numel() for p in model.model.layers[0].parameters())
    if not scheme.quantized:  # cast (if asked) before the gather
        assert layer0.bytes_gathered == numel * (dtype or torch.float32).itemsize
    elif quantized_gather:  # the experts and the aligned linears travel as FP8 (quantized before the gather)
        assert layer0.bytes_gathered < numel * 2


def join_gloo(rank: int, port: int, world: int) -> None:
    """Join this spawned process to a `world`-rank Gloo default group (one CPU thread per rank)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def leave_gloo() -> None:
    """Collect garbage, then destroy the default group. Without the collect, torch's own reference cycles
    from DTensor sharding propagation (FakeTensorMode and friends) outlive the group and are freed at
    interpreter exit, where a process aborts now and then ("terminate called without an active exception")."""
    gc.collect()
    dist.destroy_process_group()


def shard(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2 as trainers apply it: `fully_shard` each decoder layer, then the model; every parameter
    becomes a DTensor."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    return model


def worker(rank: int, port: int, quantized: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    join_gloo(rank, port, WORLD)
    try:
        model = moe_model()
        reference = copy.deepcopy(model) if rank == 0 else None
        shard(model, init_device_mesh("cpu", (WORLD,)))

        check_walk(model, reference, NONE, None)
        check_walk(model, reference, NONE, torch.bfloat16)
        if quantized:
            check_walk(model, reference, FP8_BLOCK, torch.bfloat16)
            check_walk(model, reference, FP8_CHANNEL, torch.bfloat16)
    finally:
        leave_gloo()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_fsdp2_walk_equals_the_unsharded_walk() -> None:
    mp.spawn(worker, args=(free_port(), True), nprocs=WORLD, join=True)
