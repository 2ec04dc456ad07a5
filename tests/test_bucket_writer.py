"""`BucketWriter` fills every bucket with exactly the bytes the generic stream (walker, fusion, the
sender's packing) puts there, for every layout, scheme, dtype cast and bucket split; refuses what it
cannot write; flags inf/NaN weights; and goes through a real Gloo sync end to end."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from broadcaster.framing import make_header, pieces_by_bucket
from broadcaster.group import Group
from broadcaster.receiver import Receiver
from broadcaster.sender import Sender, TensorPacker
from configs.quant import QuantScheme
from configs.wire import SyncHeader
from tests.test_broadcaster import free_port
from tests.test_fp8_kernels import needs_gpu
from tests.test_mx_walker import CT_NVFP4 as NVFP4
from tests.test_walker import FP8_BLOCK, NONE, tiny
from trainer_side.bucket_writer import BucketWriter
from trainer_side.kernel_layout import fuse_specs, fuse_tensors
from trainer_side.walker import iter_layer_chunks, plan_stream

FP8_CHANNEL = QuantScheme(kind="fp8_channel", source="compressed-tensors", scale_shape="column")
FP8_TENSOR = QuantScheme(kind="fp8_tensor", source="fp8", scale_shape="scalar")
MXFP8 = QuantScheme(kind="mxfp8", group_size=32, source="modelopt")
MO_NVFP4 = QuantScheme(kind="nvfp4", group_size=16, source="modelopt")


def spread_amaxes(model: nn.Module) -> None:
    """Give the members of each NVFP4 global-scale group different max |x| (the toys clamp all to one):
    k_proj x3, the up halves x2, so a writer using a member's own amax would make different bytes."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "k_proj" in name:
                p.mul_(3)
            elif "up_proj" in name and "gate" not in name:
                p.mul_(2)
            elif name.endswith("gate_up_proj") and p.dim() == 3:
                p[:, p.shape[1] // 2 :] *= 2


def header_for(
    model: nn.Module, scheme: QuantScheme, layout: str, bucket: int, dtype: torch.dtype | None = None
) -> SyncHeader:
    specs = [(s.name, s.dtype, s.shape) for s in plan_stream(model, scheme, dtype=dtype)]
    if layout == "kernel":
        specs = fuse_specs(specs)
    return make_header(
        specs, sync_id="s", weights_version=1, scheme=scheme, layout=layout, bucket_size=bucket
    )


def generic_stream(
    model: nn.Module, scheme: QuantScheme, layout: str, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    for chunk in iter_layer_chunks(model, scheme, dtype=dtype):
        yield from fuse_tensors(chunk.tensors) if layout == "kernel" else chunk.tensors


def buckets_of(header: SyncHeader, source: object) -> list[torch.Tensor]:
    out = []
    for k, size in enumerate(header.bucket_sizes):
        buf = torch.zeros(size, dtype=torch.uint8)
        source.fill(k, buf)  # type: ignore[attr-defined]
        out.append(buf)
    assert source.finish() is None  # type: ignore[attr-defined]
    return out


CASES = [
    ("qwen3", FP8_BLOCK, "kernel", None),
    ("qwen3", FP8_BLOCK, "checkpoint", None),
    ("qwen3_moe", FP8_BLOCK, "kernel", None),
    ("llama", NONE, "kernel", None),
    ("qwen3_moe", NONE, "checkpoint", torch.bfloat16),
    ("qwen3", FP8_CHANNEL, "kernel", None),
    ("qwen3_moe", FP8_CHANNEL, "checkpoint", torch.bfloat16),
    ("llama", FP8_TENSOR, "checkpoint", None),
    ("qwen3_moe", MXFP8, "checkpoint", None),
    ("qwen3_moe", NVFP4, "checkpoint", None),
    ("qwen3", NVFP4, "kernel", torch.bfloat16),
    ("llama", MO_NVFP4, "checkpoint", None),
]


@pytest.mark.parametrize("bucket", [2048, 1 << 20])
@pytest.mark.parametrize(("arch", "scheme", "layout", "dtype"), CASES)
def test_buckets_equal_the_generic_stream(
    arch: str, scheme: QuantScheme, layout: str, dtype: torch.dtype | None, bucket: int
) -> None:
    # A float32 trainer model sent as bf16 (`dtype`) exercises the cast before quantization and copy.
    model = tiny(arch, tied=arch == "qwen3", dtype=torch.float32 if dtype else torch.bfloat16)
    if scheme.kind == "nvfp4":
        spread_amaxes(model)
    header = header_for(model, scheme, layout, bucket, dtype)
    if bucket == 2048:
        assert any(len(e.pieces) > 1 for e in header.entries)  # tensors split over buckets
    writer = BucketWriter.build(model, scheme, header, dtype=dtype)
    assert isinstance(writer, BucketWriter), writer
    packer = TensorPacker(generic_stream(model, scheme, layout, dtype), header, pieces_by_bucket(header))
    expected = buckets_of(header, packer)
    got = buckets_of(header, writer)
    for k, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), f"bucket {k} of {len(expected)} differs"
    # A second sync reads the parameters again: the trainer updated them in place.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    packer = TensorPacker(generic_stream(model, scheme, layout, dtype), header, pieces_by_bucket(header))
    again = zip(buckets_of(header, writer), buckets_of(header, packer), strict=True)
    assert all(torch.equal(a, b) for a, b in again)


def test_refuses_what_it_cannot_write() -> None:
    model = tiny("qwen3")
    other = header_for(tiny("llama"), NONE, "checkpoint", 1 << 20)
    reason = BucketWriter.build(model, NONE, other)
    assert isinstance(reason, str) and "manifest has no tensor" in reason
    cast = header_for(model, NONE, "checkpoint", 1 << 20, torch.float32)
    reason = BucketWriter.build(model, NONE, cast)
    assert isinstance(reason, str) and "float32" in reason and "bfloat16" in reason


@pytest.mark.parametrize(
    ("scheme", "fmt"), [(FP8_BLOCK, "FP8"), (MXFP8, "MXFP8")], ids=["fp8_block", "mxfp8"]
)
def test_inf_or_nan_weights_are_named_at_finish(scheme: QuantScheme, fmt: str) -> None:
    model = tiny("qwen3")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("inf")
    header = header_for(model, scheme, "kernel", 2048)
    writer = BucketWriter.build(model, scheme, header)
    assert isinstance(writer, BucketWriter)
    for k, size in enumerate(header.bucket_sizes):
        writer.fill(k, torch.zeros(size, dtype=torch.uint8))
    reason = writer.finish()
    assert reason is not None
    assert "model.layers.0.self_attn.k_proj.weight" in reason
    assert "model.layers.1.mlp.down_proj.weight" in reason
    assert f"inf or NaN; refusing to quantize them to {fmt}" in reason


@pytest.mark.parametrize("scheme", [FP8_BLOCK, NVFP4], ids=["fp8_block", "nvfp4"])
def test_a_gloo_sync_of_the_writer_arrives_as_the_generic_stream(scheme: QuantScheme) -> None:
    model = tiny("qwen3_moe")
    spread_amaxes(model)
    header = header_for(model, scheme, "kernel", 4096)
    writer = BucketWriter.build(model, scheme, header)
    assert isinstance(writer, BucketWriter)
    expected = dict(generic_stream(model, scheme, "kernel", None))
    port = free_port()
    got: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            with Group("127.0.0.1", port, 2, 1, timeout_s=30) as g, Receiver(g).begin() as sync:
                got.update((n, t.clone()) for n, t in sync)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=receive)
    t.start()
    with Group("127.0.0.1", port, 2, 0, timeout_s=30) as g:
        report = Sender(g).send(header, writer)
    t.join(60)
    assert not errors, errors
    assert report.payload_bytes == header.payload_bytes
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("scheme", [FP8_BLOCK, MXFP8, NVFP4], ids=["fp8_block", "mxfp8", "nvfp4"])
@pytest.mark.parametrize("layout", ["kernel", "checkpoint"])
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_triton_in_place_buckets_equal_the_generic_stream_on_cuda(
    arch: str, layout: str, scheme: QuantScheme
) -> None:
    # On CUDA the writer's FP8 block / MXFP8 / NVFP4 weights go through the Triton kernels straight into
    # the buckets (the generic stream runs the same kernels into tensors of their own).
    model = tiny(arch).cuda()
    spread_amaxes(model)
    header = header_for(model, scheme, layout, 4096)
    writer = BucketWriter.build(model, scheme, header)
    assert isinstance(writer, BucketWriter)
    packer = TensorPacker(generic_stream(model, scheme, layout, None), header, pieces_by_bucket(header))
    for k, size in enumerate(header.bucket_sizes):
        a = torch.zeros(size, dtype=torch.uint8, device="cuda")
        b = torch.zeros(size, dtype=torch.uint8, device="cuda")
        writer.fill(k, a)
        packer.fill(k, b)
        assert torch.equal(a, b), f"bucket {k} differs"
    assert writer.finish() is None
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[2, 7] = float("nan")
    for k, size in enumerate(header.bucket_sizes):
        writer.fill(k, torch.zeros(size, dtype=torch.uint8, device="cuda"))
    reason = writer.finish()
    assert reason is not None and "model.layers.1.self_attn.o_proj.weight" in reason


def test_a_replaced_parameter_object_is_read_by_the_next_push() -> None:
    # `load_state_dict(assign=True)` and friends swap Parameter objects: the push must not keep reading
    # the ones it planned with.
    from configs.trainer import BroadcasterConfig
    from trainer_side.broadcast import WeightBroadcaster

    model = tiny("qwen3")
    config = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "weight_block_size": [32, 32]}}  # fmt: skip
    bc = WeightBroadcaster(BroadcasterConfig(servers=["http://127.0.0.1:9"], inference_config=config))
    first = bc._header(model, "a", 1)
    with torch.no_grad():
        fresh = torch.nn.Parameter(model.model.layers[1].mlp.up_proj.weight.detach() * -2.0)
    model.model.layers[1].mlp.up_proj.weight = fresh
    header = bc._header(model, "b", 2)
    assert header.entries == first.entries  # same manifest, planned again
    writer = bc._writer
    assert isinstance(writer, BucketWriter)
    stream = generic_stream(model, bc.scheme, "checkpoint", None)
    expected = buckets_of(header, TensorPacker(stream, header, pieces_by_bucket(header)))
    assert all(torch.equal(a, b) for a, b in zip(buckets_of(header, writer), expected, strict=True))
