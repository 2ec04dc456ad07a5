"""Trainer-side producer benchmark on one GPU: the generic stream vs the in-place `BucketWriter`.

What issue 6's profile showed host-bound: making the stream (walk, quantize, fuse, pack into buckets).
Here the real `Sender` runs on a one-rank NCCL group (its broadcasts carry nothing anywhere, so the
wire costs nothing) over the same FP8-blockwise (128x128) manifest of a BF16 Qwen3-shaped model, in
the same run, for both producers; `sync` is `Sender.send` from the header to the commit, with every
bucket's GPU work done. The writer runs three ways: small weights grouped into one quantizer launch
per bucket and large ones launched alone (the default), one launch per weight, one launch per bucket.
Also in the same run: a device copy of the same bytes in bucket-sized pieces (what packing alone costs
at memory speed) and the Triton quantization of every weight into one preallocated buffer (the compute
floor). Before timing, every bucket the writer fills is compared
byte for byte with the generic stream's on this GPU.

Run (one GPU): `python3 bench/producer_bench.py --sizes 0.6b,8b,32b --out-dir $OUT`; `--scheme mxfp8` or
`nvfp4` (compressed-tensors, lm_head kept bf16) runs the same comparison for those formats. `--dtensor`
then turns the model into FSDP2 DTensors on a one-rank mesh and times the walker and the writer on it
against the unsharded writer (kernel layout, the largest bucket size), buckets checked against it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import FP8_BLOCK, build_model, median, reseed_
from broadcaster.framing import make_header, pieces_by_bucket
from broadcaster.group import Group
from broadcaster.sender import Sender, TensorPacker
from configs.quant import QuantScheme
from configs.wire import SyncHeader
from trainer_side.bucket_writer import BucketWriter
from trainer_side.detect import detect_quant_scheme
from trainer_side.kernel_layout import fuse_specs, fuse_tensors
from trainer_side.quantize import GROUP_MAX_NUMEL, quantize_into, quantized_specs
from trainer_side.walker import iter_layer_chunks, plan_stream

SCHEMES = {
    "fp8_block": detect_quant_scheme({"quantization_config": FP8_BLOCK}),
    "mxfp8": QuantScheme(
        kind="mxfp8", group_size=32, source="compressed-tensors", scale_shape="2d", ignore=("lm_head",)
    ),
    "nvfp4": QuantScheme(
        kind="nvfp4", group_size=16, source="compressed-tensors", scale_shape="2d", ignore=("lm_head",)
    ),
}
SCHEME = SCHEMES["fp8_block"]  # --scheme replaces it
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run of the script


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def header_for(model: torch.nn.Module, layout: str, bucket: int) -> SyncHeader:
    specs = [(s.name, s.dtype, s.shape) for s in plan_stream(model, SCHEME)]
    if layout == "kernel":
        specs = fuse_specs(specs)
    return make_header(
        specs, sync_id="b", weights_version=0, scheme=SCHEME, layout=layout, bucket_size=bucket
    )


def generic(model: torch.nn.Module, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    for chunk in iter_layer_chunks(model, SCHEME):
        yield from fuse_tensors(chunk.tensors) if layout == "kernel" else chunk.tensors


def timed(fn: Callable[[], object], n: int, warmup: int = 1) -> list[float]:
    out = []
    for i in range(warmup + n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def check_equal(model: torch.nn.Module, header: SyncHeader, writer: BucketWriter) -> int:
    """Fill every bucket both ways on the GPU; returns the number of buckets that differ."""
    packer = TensorPacker(generic(model, header.layout), header, pieces_by_bucket(header))
    bad = 0
    for k, size in enumerate(header.bucket_sizes):
        a = torch.zeros(size, dtype=torch.uint8, device=DEV)
        b = torch.zeros(size, dtype=torch.uint8, device=DEV)
        writer.fill(k, a)
        packer.fill(k, b)
        bad += int(not torch.equal(a, b))
    assert writer.finish() is None and packer.finish() is None
    return bad


def quantize_floor(model: torch.nn.Module) -> Callable[[], None]:
    """Every quantized weight through the fused kernel into outputs allocated once: no packing, no
    Python around it beyond one call per weight (NVFP4: each weight's own global scale)."""
    weights = [m.weight.detach() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and "lm_head" not in name]  # fmt: skip
    outs = [
        {
            k: torch.empty(sh, dtype=dt, device=DEV)
            for k, (dt, sh) in quantized_specs(w.shape, w.dtype, SCHEME).items()
        }
        for w in weights
    ]

    def run() -> None:
        for w, out in zip(weights, outs, strict=True):
            quantize_into(w, SCHEME, out)

    return run


def copy_floor(header: SyncHeader) -> Callable[[], None]:
    src = torch.empty(header.max_bucket_size, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)

    def run() -> None:
        for size in header.bucket_sizes:
            dst[:size].copy_(src[:size])

    return run


def peak_extra(
    sender: Sender, header: SyncHeader, source: Callable[[], Any], n: int
) -> tuple[list[float], int]:
    """Times of `n` syncs of `source()` and the GPU memory they allocated at the peak beyond what was
    allocated before."""
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if DEV.type == "cuda" else 0
    times = timed(lambda: sender.send(header, source()), n)
    return times, (torch.cuda.max_memory_allocated() - base if DEV.type == "cuda" else 0)


def bench_size(shape: str, args: argparse.Namespace, g: Group, say: Callable[[str], None]) -> dict[str, Any]:
    model = build_model(shape, torch.bfloat16, DEV)
    params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"params": params, "rows": []}
    say(f"[{shape}] {params / 1e9:.2f}B params")
    quant_s = median(timed(quantize_floor(model), args.syncs))
    out["quantize_floor_s"] = quant_s
    for layout in args.layouts.split(","):
        for mib in (int(x) for x in args.bucket_mib.split(",")):
            header = header_for(model, layout, mib << 20)
            writer = BucketWriter.build(model, SCHEME, header)
            assert isinstance(writer, BucketWriter), writer
            mismatched = check_equal(model, header, writer) if args.check else None
            sender = Sender(g)
            reseed_(model, 1)
            old, old_peak = peak_extra(
                sender, header, lambda m=model, lay=layout: generic(m, lay), args.syncs
            )
            writer.group_max_numel = 0
            per_weight, _ = peak_extra(sender, header, lambda w=writer: w, args.syncs)
            writer.group_max_numel = 1 << 62
            group_all, _ = peak_extra(sender, header, lambda w=writer: w, args.syncs)
            writer.group_max_numel = GROUP_MAX_NUMEL
            new, new_peak = peak_extra(sender, header, lambda w=writer: w, args.syncs)
            copy_s = median(timed(copy_floor(header), args.syncs))
            row = {
                "layout": layout, "bucket_mib": mib, "bytes": header.payload_bytes,
                "tensors": len(header.entries), "buckets": len(header.bucket_sizes),
                "generic_s": median(old), "generic_s_all": old, "writer_s": median(new), "writer_s_all": new,
                "writer_per_weight_s": median(per_weight), "writer_per_weight_s_all": per_weight,
                "writer_group_all_s": median(group_all), "writer_group_all_s_all": group_all,
                "speedup": median(old) / median(new), "copy_floor_s": copy_s,
                "wire_s_at_370GBps": header.total_bytes / 370e9,
                "generic_peak_extra_bytes": old_peak, "writer_peak_extra_bytes": new_peak,
                "buckets_differing": mismatched,
            }  # fmt: skip
            out["rows"].append(row)
            say(
                f"[{shape}] {layout:<10} {mib:>5} MiB  {header.payload_bytes / 1e9:6.2f} GB  generic "
                f"{row['generic_s'] * 1e3:7.1f} ms  writer {row['writer_s'] * 1e3:7.1f} ms  (launch per "
                f"weight {row['writer_per_weight_s'] * 1e3:.1f}, one per bucket "
                f"{row['writer_group_all_s'] * 1e3:.1f})  "
                f"({row['speedup']:.1f}x)  copy floor {copy_s * 1e3:5.1f} ms  quantize floor "
                f"{quant_s * 1e3:5.1f} ms  wire@370GB/s {row['wire_s_at_370GBps'] * 1e3:5.1f} ms  "
                f"peak extra {old_peak / 2**20:.0f} / {new_peak / 2**20:.0f} MiB  "
                f"buckets differing: {mismatched}"
            )
    if args.dtensor:
        out["dtensor"] = bench_dtensor(model, args, g, say, shape)
    return out


def bench_dtensor(
    model: torch.nn.Module, args: argparse.Namespace, g: Group, say: Callable[[str], None], shape: str
) -> dict[str, Any]:
    """The same model as an FSDP2 model on a one-rank mesh (`fully_shard` per layer, every parameter a
    DTensor): what the DTensor path costs on top of the unsharded one, with no gather to hide it. The
    writer's buckets are checked against the unsharded writer's (checksums of every bucket)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from broadcaster.checksum import bucket_checksum

    layout, mib = "kernel", max(int(x) for x in args.bucket_mib.split(","))
    header = header_for(model, layout, mib << 20)
    plain = BucketWriter.build(model, SCHEME, header)
    assert isinstance(plain, BucketWriter), plain

    def sums(writer: BucketWriter) -> list[list[int]]:
        out = []
        for k, size in enumerate(header.bucket_sizes):
            buf = torch.zeros(size, dtype=torch.uint8, device=DEV)
            writer.fill(k, buf)
            out.append(bucket_checksum(buf).tolist())
        assert writer.finish() is None
        return out

    expected = sums(plain)
    sender = Sender(g)
    plain_s, plain_peak = peak_extra(sender, header, lambda w=plain: w, args.syncs)
    del plain
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if DEV.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    mesh = init_device_mesh(DEV.type, (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    writer = BucketWriter.build(model, SCHEME, header)
    assert isinstance(writer, BucketWriter), writer
    differing = sum(a != b for a, b in zip(sums(writer), expected, strict=True))
    walker_s, walker_peak = peak_extra(sender, header, lambda: generic(model, layout), args.syncs)
    writer_s, writer_peak = peak_extra(sender, header, lambda: writer, args.syncs)
    row = {
        "layout": layout, "bucket_mib": mib, "bytes": header.payload_bytes,
        "unsharded_writer_s": median(plain_s), "unsharded_writer_s_all": plain_s,
        "dtensor_walker_s": median(walker_s), "dtensor_walker_s_all": walker_s,
        "dtensor_writer_s": median(writer_s), "dtensor_writer_s_all": writer_s,
        "dtensor_writer_vs_unsharded": median(writer_s) / median(plain_s),
        "unsharded_peak_extra_bytes": plain_peak, "dtensor_walker_peak_extra_bytes": walker_peak,
        "dtensor_writer_peak_extra_bytes": writer_peak, "buckets_differing_from_unsharded": differing,
    }  # fmt: skip
    say(
        f"[{shape}] DTensor (1-rank FSDP2 mesh) {layout} {mib} MiB: unsharded writer "
        f"{row['unsharded_writer_s'] * 1e3:.1f} ms, DTensor walker {row['dtensor_walker_s'] * 1e3:.1f} ms, "
        f"DTensor writer {row['dtensor_writer_s'] * 1e3:.1f} ms ({row['dtensor_writer_vs_unsharded']:.2f}x "
        f"the unsharded writer); peak extra {plain_peak / 2**20:.0f} / {walker_peak / 2**20:.0f} / "
        f"{writer_peak / 2**20:.0f} MiB; buckets differing from the unsharded writer: {differing}"
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.6b,8b,32b")
    ap.add_argument("--scheme", default="fp8_block", choices=sorted(SCHEMES))
    ap.add_argument("--layouts", default="kernel,checkpoint")
    ap.add_argument("--bucket-mib", default="256,1024")
    ap.add_argument("--syncs", type=int, default=5)
    ap.add_argument("--no-check", dest="check", action="store_false")
    ap.add_argument("--dtensor", action="store_true", help="also the model as FSDP2 DTensors (1-rank mesh)")
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args()
    global SCHEME
    SCHEME = SCHEMES[args.scheme]
    dev = torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu"
    tag = f"{args.date}-{dev.replace('NVIDIA ', '').replace(' ', '-').lower()}-producer"
    tag += "" if args.scheme == "fp8_block" else f"-{args.scheme}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"producer_bench: {dev}; python3 bench/producer_bench.py {' '.join(sys.argv[1:])}; {args.date}")
    result: dict[str, Any] = {"device": dev, "date": args.date, "command": " ".join(sys.argv),
                              "torch": torch.__version__, "scheme": args.scheme, "sizes": {}}  # fmt: skip
    backend = "nccl" if DEV.type == "cuda" else "gloo"
    with Group("127.0.0.1", free_port(), 1, 0, backend=backend, timeout_s=120) as g:
        for shape in args.sizes.split(","):
            result["sizes"][shape] = bench_size(shape, args, g, say)
            (out_dir / f"{tag}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{tag}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
