"""Issue 16's benchmark: trainer and vLLM on ONE GPU, layercast's `ipc` backend vs vLLM's own `ipc` engine.

Per model size, in one process run on one GPU:
  1. `layercast serve` (FP8 blockwise 128x128, `--load-format dummy`) on the GPU, and the trainer's BF16
     Qwen3-shaped model on the same GPU; per load path (kernel, layerwise): `bench/sync_bench.run_path`
     with `backend="ipc"`: init, one warm-up push, `--syncs` timed pushes (new weights each), then the
     same pushed into servers armed ahead (the orchestrator's mode); after them, outside the timing, the
     server's runtime weights digest is compared with the digest of what the trainer sent (bit-exact),
     and greedy tokens + logprobs must be equal across paths and differ from the dummy weights';
  2. the floors, same GPU, same run: the quantize-only time (every weight through layercast's FP8 kernel
     into preallocated outputs: `producer_bench.quantize_floor`), and a device-to-device copy of the bytes
     a sync carries;
  3. for `--sleep-sizes` (server started with `--enable-sleep-mode`): vLLM's `/sleep?level=1`, the GPU
     memory it freed (device free memory before/after), a push into the sleeping server (must be refused),
     `/wake_up?tags=weights`, a push (runtime digest must equal what was sent), `/wake_up?tags=kv_cache`
     and generation;
  4. the peer, after our server stopped: `bench/peer_ipc.py` (vLLM 0.26's `ipc` engine, packed 2 GiB,
     BF16 -> `fp8_per_block` online quantization, layerwise reload), trainer and vLLM on the same GPU.

    python bench/colocated_bench.py --sizes 8b --syncs 5 --out-dir $OUT      # one GPU
    python bench/colocated_bench.py --cpu-smoke                              # CPU, /dev/shm, tiny fp32
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

import bench.producer_bench as producer_bench
from bench.common import (
    FP8_BLOCK,
    build_model,
    digest_diff,
    generate,
    median,
    plugin_env,
    reseed_,
    rpc,
    sent_digest,
    stamp,
    sync_cuda,
    write_inference_dir,
)
from bench.sync_bench import run_path, say, verify
from configs.trainer import BroadcasterConfig
from rpc.tools.launch import ServerProcess, free_port
from trainer_side.broadcast import PushError, WeightBroadcaster


def timed(fn: Any, n: int) -> list[float]:
    fn()
    out = []
    for _ in range(n):
        sync_cuda()
        t = time.perf_counter()
        fn()
        sync_cuda()
        out.append(time.perf_counter() - t)
    return out


def floors(model: torch.nn.Module, nbytes: int, n: int) -> dict[str, float]:
    producer_bench.DEV = next(model.parameters()).device
    quant = median(timed(producer_bench.quantize_floor(model), n))
    src = torch.empty(nbytes, dtype=torch.uint8, device=producer_bench.DEV)
    dst = torch.empty_like(src)
    copy = median(timed(lambda: dst.copy_(src), n))
    return {"quantize_floor_s": quant, "d2d_copy_s": copy}


def sleep_check(model: torch.nn.Module, url: str, cfg_dir: Path) -> dict[str, Any]:
    """vLLM sleep mode around colocated syncs (see module doc, step 3)."""
    out: dict[str, Any] = {}
    bc = WeightBroadcaster(
        BroadcasterConfig(
            servers=[url],
            inference_config=str(cfg_dir),
            master_port=free_port(),
            backend="ipc",
            load_path="kernel",
            bucket_bytes=512 << 20,
            step_timeout_s=60,
            http_timeout_s=120,
        )
    )
    try:
        bc.init()
        reseed_(model, 9001)
        bc.push(model, version=9001)
        sync_cuda()
        free_before = torch.cuda.mem_get_info()[0]
        httpx.post(f"{url}/sleep", params={"level": "1"}, timeout=300).raise_for_status()
        time.sleep(1.0)
        out["freed_bytes"] = torch.cuda.mem_get_info()[0] - free_before
        reseed_(model, 9002)
        t = time.perf_counter()
        try:
            bc.push(model, version=9002)
            out["asleep_push"] = "ACCEPTED (wrong)"
        except PushError as exc:
            out["asleep_push"] = f"refused: {exc}"[:400]
        out["asleep_push_s"] = time.perf_counter() - t
        httpx.post(f"{url}/wake_up", params={"tags": "weights"}, timeout=300).raise_for_status()
        reseed_(model, 9003)
        t = time.perf_counter()
        bc.push(model, version=9003)
        out["push_after_weights_woke_s"] = time.perf_counter() - t
        out["digest_mismatches"] = digest_diff(
            rpc(url, "layercast_weights_digest")[0], sent_digest(bc.tensors(model, layout="kernel"))
        )[:20]
        httpx.post(f"{url}/wake_up", params={"tags": "kv_cache"}, timeout=300).raise_for_status()
        out["generated"] = generate(url, model.config.vocab_size)
        out["ok"] = out["asleep_push"].startswith("refused") and not out["digest_mismatches"]
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        out["ok"] = False
    finally:
        bc.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8b")
    ap.add_argument("--syncs", type=int, default=5)
    ap.add_argument("--paths", default="kernel,layerwise")
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--sleep-sizes", default="", help="sizes whose server runs --enable-sleep-mode; step 3")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/layercast-colocated-bench"))
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--ready-timeout", type=float, default=400.0)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 model, trainer and server on CPU")
    args = ap.parse_args()
    args.profile = False
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("needs a GPU (or --cpu-smoke)")
    name = "cpu" if smoke else torch.cuda.get_device_name(0)
    slug = name.lower().replace(" ", "-")
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    lines: list[str] = []
    result: dict[str, Any] = {
        "device": f"1x {name}",
        "date": args.date,
        "command": command,
        "torch": torch.__version__,
        "mode": "colocated",
        "rows": [],
        "models": {},
    }
    say(lines, f"colocated_bench: {name}; {command}; {args.date}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{args.date}-{slug}-colocated-bench"

    def save() -> None:
        stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    env = plugin_env(args.work)
    dev = torch.device("cpu") if smoke else torch.device("cuda", 0)
    dtype = torch.float32 if smoke else torch.bfloat16
    ok = True
    for size in ["tiny"] if smoke else [s for s in args.sizes.split(",") if s]:
        rec: dict[str, Any] = {"paths": []}
        result["models"][size] = rec
        work = args.work / size
        cfg_dir = write_inference_dir(work / "inference", size, dtype, None if smoke else FP8_BLOCK)
        serve_args = [
            "--load-format",
            "dummy",
            "--enforce-eager",
            "--max-model-len",
            "1024",
            "--max-num-seqs",
            "8",
            "--served-model-name",
            "toy",
            "--gpu-memory-utilization",
            str(args.gpu_memory_utilization),
        ]
        if smoke:
            serve_args[-2:] = ["--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20)]
        sleep_mode = size in args.sleep_sizes.split(",")
        if sleep_mode:
            serve_args.append("--enable-sleep-mode")
        t0 = time.perf_counter()
        server = ServerProcess(
            cfg_dir,
            extra_args=serve_args,
            env={**env, "LAYERCAST_CPU_PLAIN_LINEAR": "1"} if smoke else {**env, "CUDA_VISIBLE_DEVICES": "0"},
            log_path=work / "server.log",
        )
        try:
            model = build_model(size, dtype, dev, seed=0)
            rec["params"] = sum(p.numel() for p in model.parameters())
            server.wait_ready(args.ready_timeout)
            rec["server_ready_s"] = time.perf_counter() - t0
            say(
                lines,
                f"[{stamp()}] {size}: {rec['params'] / 1e9:.2f}B params; server (same GPU) ready in "
                f"{rec['server_ready_s']:.0f} s",
            )
            rec["generated_before"] = generate(server.url, model.config.vocab_size)
            for i, path in enumerate([p for p in args.paths.split(",") if p]):
                # one server for every path: versions (= seeds) only move forward
                r = run_path(
                    path,
                    args.bucket_mb,
                    model,
                    server.url,
                    cfg_dir,
                    args,
                    "ipc",
                    seed0=1000,
                    version0=1000 * (i + 1),
                )
                rec["paths"].append(r)
                say(
                    lines,
                    f"[{stamp()}] {size} {path}: "
                    + json.dumps(
                        {k: v for k, v in r.items() if k not in ("syncs", "generated")}, default=str
                    ),
                )
                save()
            nbytes = max((r.get("bytes_sent", 0) for r in rec["paths"]), default=0)
            if nbytes and not smoke:
                rec |= floors(model, nbytes, args.syncs)
                say(
                    lines,
                    f"[{stamp()}] {size} floors: quantize {rec['quantize_floor_s'] * 1e3:.2f} ms, "
                    f"D2D copy of {nbytes / 1e9:.2f} GB {rec['d2d_copy_s'] * 1e3:.2f} ms",
                )
            verify(rec, lines, size)
            ok = ok and rec.get("verified", False)
            if sleep_mode:
                rec["sleep"] = sleep_check(model, server.url, cfg_dir)
                say(
                    lines,
                    f"[{stamp()}] {size} sleep mode: "
                    + json.dumps({k: v for k, v in rec["sleep"].items() if k != "generated"}, default=str),
                )
                ok = ok and rec["sleep"]["ok"]
            del model
            if not smoke:
                torch.cuda.empty_cache()
        except Exception as exc:
            ok = False
            rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            say(lines, f"{size} error: {rec['error']}\n{traceback.format_exc()}")
        finally:
            rec["server_log_tail"] = server.tail(30)
            server.stop()
            save()
        if not args.no_peer and not smoke:
            out = work / "peer.json"
            cmd = [
                sys.executable,
                str(Path(__file__).with_name("peer_ipc.py")),
                "--shape",
                size,
                "--syncs",
                str(args.syncs),
                "--gpu-memory-utilization",
                str(args.gpu_memory_utilization),
                "--out",
                str(out),
            ]
            with open(work / "peer.log", "wb") as log, contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.ready_timeout + 300)
            if out.exists():
                rec["peer"] = json.loads(out.read_text())
            else:
                rec["peer_error"] = (work / "peer.log").read_text(errors="replace")[-3000:]
            say(
                lines,
                f"[{stamp()}] {size} peer: "
                + (f"{rec['peer']['peer_s'] * 1e3:.1f} ms" if "peer" in rec else rec["peer_error"][-1500:]),
            )
        for r in rec["paths"]:
            if "sync_s" not in r:
                continue
            peer = rec.get("peer", {}).get("peer_s")
            floor = rec.get("quantize_floor_s")
            row = {
                "mode": "colocated",
                "size": size,
                "path": r["path"],
                "params": rec.get("params"),
                "bytes_sent": r.get("bytes_sent"),
                "sync_s": r["sync_s"],
                "sync_s_prearmed": r.get("sync_s_prearmed"),
                "peer_s": peer,
                "speedup_vs_peer": peer / r["sync_s"] if peer else None,
                "speedup_prearmed_vs_peer": peer / r["sync_s_prearmed"]
                if peer and r.get("sync_s_prearmed")
                else None,
                "floor_s": floor,
                "ratio_vs_floor": r["sync_s"] / floor if floor else None,
                "d2d_copy_s": rec.get("d2d_copy_s"),
                "trainer_peak_extra_bytes": r.get("trainer_peak_extra_bytes"),
                "inference_peak_extra_bytes": r.get("inference_peak_extra_bytes"),
                "peer_trainer_peak_extra_bytes": rec.get("peer", {}).get("trainer_peak_extra_bytes"),
                "peer_inference_peak_extra_bytes": rec.get("peer", {}).get("inference_peak_extra_bytes"),
                "verified": bool(r.get("digest_ok") and r.get("vs_first_path", {}).get("tokens_equal")),
                "verified_how": "runtime weights digest == sent bytes; tokens+logprobs equal across paths",
            }
            result["rows"].append(row)
        save()
    say(lines, "")
    say(
        lines,
        f"{'size':<6}{'path':<11}{'GB':>7}{'sync ms':>9}{'armed ms':>9}{'peer ms':>9}{'x peer':>8}"
        f"{'floor ms':>9}{'x floor':>8}{'copy ms':>8}{'trn+GB':>8}{'inf+GB':>8}  verified",
    )

    def f(x: Any, scale: float = 1.0, fmt: str = ".1f") -> str:
        return "-" if x is None else format(x * scale, fmt)

    for row in result["rows"]:
        say(
            lines,
            f"{row['size']:<6}{row['path']:<11}{f(row['bytes_sent'], 1e-9, '.2f'):>7}"
            f"{f(row['sync_s'], 1e3):>9}{f(row['sync_s_prearmed'], 1e3):>9}{f(row['peer_s'], 1e3):>9}"
            f"{f(row['speedup_vs_peer'], 1, '.2f'):>8}{f(row['floor_s'], 1e3):>9}"
            f"{f(row['ratio_vs_floor'], 1, '.2f'):>8}{f(row['d2d_copy_s'], 1e3):>8}"
            f"{f(row['trainer_peak_extra_bytes'], 1e-9, '.2f'):>8}"
            f"{f(row['inference_peak_extra_bytes'], 1e-9, '.2f'):>8}  {row['verified']}",
        )
    save()
    print(f"wrote {stem}.txt/.json", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
