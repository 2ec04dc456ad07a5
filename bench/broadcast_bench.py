"""Time the broadcaster (header, votes, double-buffered buckets, commit) against raw NCCL, GPU0 -> GPU1.

Rank 0 sends a Qwen3-8B-shaped FP8 checkpoint stream (per layer: fp8 q/k/v/o/gate/up/down weights, their
float32 128x128 `weight_scale_inv`, bf16 norms; bf16 embeddings and lm_head: about 9.4 GB) through
`Sender`; rank 1 receives it through `Receiver` and consumes every tensor by copying it into its own
preallocated destination tensor (a stand-in for loading it into the model). In the same run and group,
raw NCCL broadcasts the same total bytes as one tensor and as back-to-back chunks of each bucket size
(no packing, no copies, no control messages). Times are medians of `--syncs` syncs after `--warmup`,
taken on rank 0 from a common start (an all_reduce barrier) to the end of the commit vote (raw: to the
end of a one-element all_reduce after the last broadcast, so both ranks have all bytes). Peak extra
GPU memory is `max_memory_allocated` minus what was allocated before the syncs (sources, destinations
and raw buffers are preallocated and not counted). Writes `<date>-<device>-broadcast.{txt,json}`.

    python bench/broadcast_bench.py --out-dir bench/results       # needs 2 GPUs
    python bench/broadcast_bench.py --cpu-smoke --out-dir /tmp/bb  # Gloo on CPU, tiny model
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broadcaster import Group, Receiver, Sender, Timeouts, make_header
from broadcaster.checksum import bucket_checksum

Spec = tuple[str, torch.dtype, tuple[int, ...]]
FP8 = torch.float8_e4m3fn
MiB = 1 << 20


def model_specs(
    hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int, vocab: int
) -> list[Spec]:
    """HF checkpoint tensors of a Qwen3-style model with FP8 128x128 linears (embeddings kept bf16)."""

    def blocks(n: int) -> int:
        return -(-n // 128)

    specs: list[Spec] = [("model.embed_tokens.weight", torch.bfloat16, (vocab, hidden))]
    linears = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv * head_dim, hidden),
        "self_attn.v_proj": (kv * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        specs.append((p + "input_layernorm.weight", torch.bfloat16, (hidden,)))
        for name, (r, c) in linears.items():
            specs.append((p + name + ".weight", FP8, (r, c)))
            specs.append((p + name + ".weight_scale_inv", torch.float32, (blocks(r), blocks(c))))
            if name == "self_attn.v_proj":
                specs.append((p + "self_attn.q_norm.weight", torch.bfloat16, (head_dim,)))
                specs.append((p + "self_attn.k_norm.weight", torch.bfloat16, (head_dim,)))
        specs.append((p + "post_attention_layernorm.weight", torch.bfloat16, (hidden,)))
    specs.append(("model.norm.weight", torch.bfloat16, (hidden,)))
    specs.append(("lm_head.weight", torch.bfloat16, (vocab, hidden)))
    return specs


def nbytes(spec: Spec) -> int:
    n = 1
    for s in spec[2]:
        n *= s
    return n * spec[1].itemsize


def checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One `bucket_checksum` per tensor (bytes zero-padded to 8), stacked: (n, 3) int64."""
    out = []
    for t in tensors:
        b = t.reshape(-1).view(torch.uint8)
        out.append(bucket_checksum(F.pad(b, (0, -b.numel() % 8)) if b.numel() % 8 else b))
    return torch.stack(out)


def worker(rank: int, args: argparse.Namespace, port: int, queue: Any) -> None:
    for k, v in (
        ("NCCL_NVLS_ENABLE", "0"),
        ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
        ("NVSHMEM_DISABLE_NVLS", "1"),
    ):
        os.environ.setdefault(k, v)
    cpu = args.cpu_smoke
    if not cpu:
        torch.cuda.set_device(rank)
    dev = torch.device("cpu") if cpu else torch.device("cuda", rank)
    specs: list[Spec] = args.specs
    to = Timeouts(header_s=600.0, vote_s=120.0, bucket_s=120.0, commit_s=120.0)
    g = Group(
        "127.0.0.1",
        port,
        2,
        rank,
        backend="gloo" if cpu else "nccl",
        device=dev,
        timeout_s=300.0,
        op_timeout_s=900.0,
    )

    def sync_dev() -> None:
        if not cpu:
            torch.cuda.synchronize(dev)

    def barrier() -> None:
        sync_dev()
        g.wait(g.all_reduce(torch.zeros(1, device=dev), dist.ReduceOp.SUM), 300.0, "barrier")

    gen = torch.Generator(device=dev).manual_seed(7)
    tensors: list[torch.Tensor] = []
    for _name, dtype, shape in specs:
        raw = torch.empty(nbytes((_name, dtype, shape)), dtype=torch.uint8, device=dev)
        if rank == 0:
            raw.random_(0, 256, generator=gen)
        tensors.append(raw.view(dtype).view(shape))
    total = sum(nbytes(s) for s in specs)
    raw_buf = torch.empty(total, dtype=torch.uint8, device=dev)
    sync_dev()
    out: dict[str, Any] = {"rank": rank, "layercast": {}, "raw": {}}
    sender = Sender(g, timeouts=to) if rank == 0 else None
    receiver = Receiver(g, timeouts=to) if rank == 1 else None
    seq = 0
    for bs in args.bucket_sizes:
        times: list[float] = []
        reports: list[dict[str, float]] = []
        if not cpu:
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        for i in range(args.warmup + args.syncs):
            seq += 1
            header = make_header(specs, sync_id=f"bench-{bs}-{i}", weights_version=seq, bucket_size=bs)
            barrier()
            t0 = time.perf_counter()
            if sender is not None:
                rep = sender.send(header, ((s[0], t) for s, t in zip(specs, tensors, strict=True)))
            else:
                assert receiver is not None
                incoming = receiver.begin()
                for (name, dst), (got_name, got) in zip(
                    zip((s[0] for s in specs), tensors, strict=True), incoming, strict=True
                ):
                    assert name == got_name, (name, got_name)
                    dst.copy_(got)  # the "load": copy into a preallocated destination
                got = dst = None  # hold no view past the sync (a staged tensor would stay allocated)
                rep = incoming.finish()
            sync_dev()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
                reports.append(
                    {
                        k: getattr(rep, k)
                        for k in (
                            "header_s",
                            "vote_s",
                            "transfer_s",
                            "work_s",
                            "wait_s",
                            "commit_s",
                            "total_s",
                        )
                    }
                )
        peak = torch.cuda.max_memory_allocated(dev) - base if not cpu else None
        # bit-exact check of the last sync: per-tensor checksums, rank 0's broadcast to rank 1
        sums = checksums(tensors)
        g.wait(g.broadcast(sums), 300.0, "checksums")  # rank 1's copy is overwritten by rank 0's
        mine = checksums(tensors)
        bad = torch.tensor([int((mine != sums).any(1).sum())], device=dev)
        g.wait(g.all_reduce(bad, dist.ReduceOp.MAX), 60.0, "verdict")
        out["layercast"][bs] = {
            "times_s": times,
            "median_s": statistics.median(times),
            "peak_extra_bytes": peak,
            "buckets": len(header.bucket_sizes),
            "wire_bytes": header.total_bytes,
            "payload_bytes": header.payload_bytes,
            "mismatched_tensors": int(bad.item()),
            "report_median": {k: statistics.median(r[k] for r in reports) for k in reports[0]},
            "peak_buffer_bytes_reported": rep.peak_buffer_bytes,
        }
    # raw NCCL: the same total bytes, one tensor, then chunks of each bucket size
    for mode in ["one tensor", *args.bucket_sizes]:
        chunk = total if mode == "one tensor" else int(mode)
        times = []
        for i in range(args.warmup + args.syncs):
            barrier()
            t0 = time.perf_counter()
            works = [g.broadcast(raw_buf[o : o + chunk]) for o in range(0, total, chunk)]
            for w in works:
                g.wait(w, 300.0, "raw broadcast")
            g.wait(g.all_reduce(torch.zeros(1, device=dev), dist.ReduceOp.SUM), 60.0, "raw end")
            sync_dev()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        out["raw"][str(mode)] = {
            "times_s": times,
            "median_s": statistics.median(times),
            "chunks": -(-total // chunk),
        }
    out["payload_bytes"] = total
    queue.put(out)
    barrier()
    g.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--cpu-smoke", action="store_true", help="Gloo on CPU, a tiny model and tiny buckets")
    ap.add_argument("--syncs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.cpu_smoke:
        args.specs = model_specs(256, 512, 2, 4, 2, 64, 1000)
        args.bucket_sizes = [64 << 10, 256 << 10, 512 << 10, 1 << 20]
        device, slug = "cpu (gloo smoke)", "cpu-smoke"
        args.syncs, args.warmup = min(args.syncs, 3), 1
    else:
        if torch.cuda.device_count() < 2:
            sys.exit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
        args.specs = model_specs(4096, 12288, args.layers, 32, 8, 128, 151936)
        args.bucket_sizes = [64 * MiB, 256 * MiB, 512 * MiB, 1024 * MiB]
        device = f"2x {torch.cuda.get_device_name(0)}"
        slug = "2x" + torch.cuda.get_device_name(0).lower().replace(" ", "-")
    lines: list[str] = []

    def say(line: str = "") -> None:
        lines.append(line)
        print(line, flush=True)

    total = sum(nbytes(s) for s in args.specs)
    say(f"broadcast_bench: {device}; torch {torch.__version__}; date {args.date}")
    say(f"command: {command}")
    say(
        f"stream: {len(args.specs)} tensors, {total / 1e9:.3f} GB ({2 if args.cpu_smoke else args.layers} "
        f"layers; fp8 linears + fp32 128x128 scales + bf16 norms, bf16 embed_tokens and lm_head)"
    )
    say(
        "receiver consumes each tensor by copy_ into a preallocated destination (simulated load); "
        f"median of {args.syncs} syncs after {args.warmup} warm-up, timed on rank 0"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    t0 = time.time()
    procs = mp.start_processes(worker, args=(args, port, queue), nprocs=2, join=False, start_method="spawn")
    got = []
    while len(got) < 2:
        if not queue.empty():
            got.append(queue.get())
        elif procs.join(timeout=0.5):
            break
    while not procs.join():
        pass
    got += [queue.get() for _ in range(2 - len(got))]
    res = {r["rank"]: r for r in got}
    s0, s1 = res[0], res[1]
    raw_one = s0["raw"]["one tensor"]["median_s"]
    say(
        f"\nraw NCCL broadcast, one {total / 1e9:.2f} GB tensor: {raw_one * 1e3:.2f} ms "
        f"({total / raw_one / 1e9:.1f} GB/s)"
    )
    hdr = (
        f"{'MiB':>8s} {'n':>4s} {'layercast_ms':>12s} {'raw_same_buckets_ms':>19s} {'ratio_vs_raw':>12s} "
        f"{'ratio_vs_raw_chunks':>19s} {'GB/s':>7s} {'send_peak_MiB':>13s} {'recv_peak_MiB':>13s} {'ok':>3s}"
    )
    say(hdr)
    rows = []
    for bs in args.bucket_sizes:
        a, b = s0["layercast"][bs], s1["layercast"][bs]
        raw_c = s0["raw"][str(bs)]["median_s"]
        lc = a["median_s"]
        row = {
            "bucket_bytes": bs,
            "buckets": a["buckets"],
            "layercast_s": lc,
            "raw_nccl_s": raw_one,
            "raw_nccl_same_buckets_s": raw_c,
            "ratio_vs_raw": lc / raw_one,
            "ratio_vs_raw_same_buckets": lc / raw_c,
            "gbyte_s": total / lc / 1e9,
            "sender_peak_extra_bytes": a["peak_extra_bytes"],
            "receiver_peak_extra_bytes": b["peak_extra_bytes"],
            "mismatched_tensors": max(a["mismatched_tensors"], b["mismatched_tensors"]),
            "sender_report_median": a["report_median"],
            "receiver_report_median": b["report_median"],
            "layercast_times_s": a["times_s"],
            "receiver_times_s": b["times_s"],
            "raw_same_buckets_times_s": s0["raw"][str(bs)]["times_s"],
        }
        rows.append(row)

        def mib(x: int | None) -> str:
            return "n/a" if x is None else f"{x / MiB:.0f}"

        say(
            f"{bs / MiB:>8g} {a['buckets']:>4d} {lc * 1e3:>12.2f} {raw_c * 1e3:>19.2f} "
            f"{lc / raw_one:>12.2f} {lc / raw_c:>19.2f} {total / lc / 1e9:>7.1f} "
            f"{mib(a['peak_extra_bytes']):>13s} {mib(b['peak_extra_bytes']):>13s} "
            f"{'yes' if row['mismatched_tensors'] == 0 else 'NO':>3s}"
        )
    say("\nper-phase medians (s): sender header/vote/transfer[work,wait]/commit | receiver the same")
    for r in rows:
        a, b = r["sender_report_median"], r["receiver_report_median"]
        say(
            f"{r['bucket_bytes'] / MiB:>8g} "
            + " ".join(
                f"{a[k]:.4f}" for k in ("header_s", "vote_s", "transfer_s", "work_s", "wait_s", "commit_s")
            )
            + " | "
            + " ".join(
                f"{b[k]:.4f}" for k in ("header_s", "vote_s", "transfer_s", "work_s", "wait_s", "commit_s")
            )
        )
    say(f"\nwall {time.time() - t0:.1f} s")
    result = {
        "device": device,
        "date": args.date,
        "command": command,
        "torch": torch.__version__,
        "payload_bytes": total,
        "tensors": len(args.specs),
        "receiver_consumer": "copy_ into preallocated destination tensors",
        "timing": "rank 0 wall time from an all_reduce barrier (after cuda sync) to the end of the sync",
        "raw_nccl_one_tensor_s": raw_one,
        "raw_nccl_one_tensor_times_s": s0["raw"]["one tensor"]["times_s"],
        "rows": rows,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.date}-{slug}-broadcast"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.{{txt,json}}")


if __name__ == "__main__":
    main()
