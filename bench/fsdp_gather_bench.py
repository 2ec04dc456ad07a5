"""Issue 9's gather measurement: a 2-rank FSDP2 trainer walks its model for BF16, FP8 block, MXFP8 and NVFP4.

Each rank holds a BF16 Qwen3-shaped model sharded with `fully_shard` per layer. Per scheme, every rank
walks all layer chunks (`walker.iter_layer_chunks`: for MXFP8/NVFP4 each shard is quantized where the
groups allow it and the 8/4-bit bytes and scales are gathered, else the BF16 shards), and the bench
records per walk: the bytes this rank received through gathers (`bytes_gathered`), the walk's wall
time (median of `--walks` after a warm-up, synchronized), and the same for an unquantized BF16 walk
(the plain gather) side by side in the same run. That the gathered MX bytes equal quantizing the
gathered tensor is `tests/test_mx_walker_fsdp.py`'s job. Writes `<date>-<device>-fsdp-gather.{txt,json}`.

    python bench/fsdp_gather_bench.py --shape 8b --out-dir bench/results     # 2 GPUs, NCCL
    python bench/fsdp_gather_bench.py --cpu-smoke --out-dir /tmp/fg           # CPU, Gloo, tiny
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import FP8_BLOCK, build_model, median
from configs.quant import QuantScheme
from trainer_side.detect import detect_quant_scheme
from trainer_side.walker import iter_layer_chunks

SCHEMES: dict[str, QuantScheme] = {
    "bf16": QuantScheme(),
    "fp8_block": detect_quant_scheme({"quantization_config": FP8_BLOCK}),
    "mxfp8": QuantScheme(
        kind="mxfp8", group_size=32, source="compressed-tensors", scale_shape="2d", ignore=("lm_head",)
    ),
    "nvfp4": QuantScheme(
        kind="nvfp4", group_size=16, source="compressed-tensors", scale_shape="2d", ignore=("lm_head",)
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def walk(model: torch.nn.Module, scheme: QuantScheme, cuda: bool) -> tuple[float, int, int]:
    """(seconds, bytes gathered by this rank, bytes of the stream) of one full walk."""
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    gathered = streamed = 0
    for chunk in iter_layer_chunks(model, scheme, dtype=torch.bfloat16):
        gathered += chunk.bytes_gathered
        streamed += sum(t.numel() * t.element_size() for _, t in chunk.tensors)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, gathered, streamed


def rank_main(rank: int, port: int, a: argparse.Namespace, out: Any) -> None:
    cuda = not a.cpu_smoke
    if cuda:
        torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    try:
        dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
        model = build_model(a.shape, torch.bfloat16, dev, seed=0)
        mesh = init_device_mesh("cuda" if cuda else "cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        res: dict[str, Any] = {}
        for name in a.schemes.split(","):
            scheme = SCHEMES[name]
            walk(model, scheme, cuda)  # warm-up (kernel compiles, NCCL buffers)
            runs = [walk(model, scheme, cuda) for _ in range(a.walks)]
            res[name] = {
                "walk_s": median([r[0] for r in runs]),
                "walk_s_all": [r[0] for r in runs],
                "bytes_gathered": runs[0][1],
                "bytes_streamed": runs[0][2],
            }
            if cuda:
                res[name]["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
        out[rank] = res
    finally:
        dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--schemes", default="bf16,fp8_block,mxfp8,nvfp4")
    ap.add_argument("--walks", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, Gloo, the tiny shape")
    a = ap.parse_args()
    cuda = not a.cpu_smoke
    if a.cpu_smoke:
        a.shape = "tiny"
    elif torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 GPUs, found {torch.cuda.device_count()} (or --cpu-smoke)")
    device = f"2x {torch.cuda.get_device_name(0)}" if cuda else "cpu (Gloo)"
    slug = "2x" + torch.cuda.get_device_name(0).lower().replace(" ", "-") if cuda else "cpu"
    command = " ".join(shlex.quote(x) for x in [Path(sys.executable).name, *sys.argv])
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=rank_main, args=(r, port, a, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs) or len(out) != 2:
            print(f"a rank failed: exit codes {[p.exitcode for p in procs]}", file=sys.stderr)
            return 1
        ranks = {r: dict(out[r]) for r in range(2)}
    lines = [f"fsdp_gather_bench: {device}; shape {a.shape}; {command}; {a.date}"]
    plain = ranks[0].get("bf16")
    lines.append(
        f"{'scheme':10} {'walk ms':>9} {'vs bf16':>8} {'gathered MB':>12} {'vs bf16':>8} {'stream MB':>10}"
    )
    for name, r in ranks[0].items():
        t_ratio = r["walk_s"] / plain["walk_s"] if plain else float("nan")
        b_ratio = (
            r["bytes_gathered"] / plain["bytes_gathered"]
            if plain and plain["bytes_gathered"]
            else float("nan")
        )
        r["walk_vs_bf16"], r["gathered_vs_bf16"] = t_ratio, b_ratio
        lines.append(
            f"{name:10} {r['walk_s'] * 1e3:9.1f} {t_ratio:8.2f} {r['bytes_gathered'] / 1e6:12.1f} "
            f"{b_ratio:8.3f} {r['bytes_streamed'] / 1e6:10.1f}"
        )
    print("\n".join(lines))
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stem = a.out_dir / f"{a.date}-{slug}-fsdp-gather"
    result = {"device": device, "date": a.date, "command": command, "shape": a.shape, "ranks": ranks}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.{{txt,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
