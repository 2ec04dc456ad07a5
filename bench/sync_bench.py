"""Issue 6's benchmark: one weight sync, trainer (GPU0, BF16 Qwen3) -> `layercast serve` (GPU1, FP8
blockwise 128x128, `--load-format dummy`), per load path, against raw NCCL and the peer, in one run.

Per model size, measured in this one process run:
  1. layercast, per load path (kernel, layerwise, checkpoint): `WeightBroadcaster.init()`, one warm-up
     push, then `--syncs` timed pushes (each with new weights); `sync_s` = median wall time of
     `push()` = plan + walk + quantize + send + every server loaded and answered over HTTP;
  2. raw NCCL: a broadcast of exactly the bytes layercast sent, GPU0 -> GPU1, between two processes;
  3. the peer (`bench/peer_native.py`): vLLM's native NCCL weight transfer of the BF16 weights to a vLLM
     quantizing online (`fp8_per_block`, layerwise reload). With 4 GPUs its engine starts on GPUs 2-3
     while ours is measured and its timed syncs run after ours (never at the same time).
After the timed syncs of a path, outside the timing: the server's runtime weights digest must equal the
digest of the tensors the trainer sent (bit-exact), and greedy tokens + logprobs are recorded and must be
equal across paths (same final weights) and differ from the server's output before the first sync.

    python bench/sync_bench.py --sizes 0.6b,8b --syncs 5 --out-dir bench/results   # >= 2 GPUs
    python bench/sync_bench.py --cpu-smoke                                          # CPU, Gloo, tiny fp32
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    FP8_BLOCK,
    build_model,
    compare,
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
from broadcaster.group import Group
from configs.api import UpdateWeightsRequest
from configs.trainer import BroadcasterConfig
from rpc.client.http_client import AsyncServerClient
from rpc.tools.launch import ServerProcess, free_port
from trainer_side.broadcast import WeightBroadcaster


def say(lines: list[str], line: str = "") -> None:
    print(line, flush=True)
    lines.append(line)


def _raw_receiver(port: int, nbytes: int, k: int, gpu: str, backend: str) -> None:
    if backend == "nccl":
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    dev = torch.device("cuda", 0) if backend == "nccl" else None
    g = Group("127.0.0.1", port, 2, 1, backend=backend, who="raw receiver", timeout_s=120, device=dev)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=g.device)
    for _ in range(k + 1):
        g.wait(g.broadcast(buf), 120, "raw broadcast")
    sync_cuda()
    g.close()


def raw_broadcast(nbytes: int, k: int, gpu: str, backend: str, device: torch.device) -> list[float]:
    """Seconds per broadcast of `nbytes` from this process (rank 0) to a fresh process on `gpu`: one
    warm-up, then `k` timed (each synchronised on both ends of the timing)."""
    port = free_port()
    proc = mp.get_context("spawn").Process(target=_raw_receiver, args=(port, nbytes, k, gpu, backend))
    proc.start()
    g = Group("127.0.0.1", port, 2, 0, backend=backend, who="raw sender", timeout_s=120, device=device)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=g.device)
    times = []
    for _ in range(k + 1):
        sync_cuda()
        t = time.perf_counter()
        g.wait(g.broadcast(buf), 120, "raw broadcast")
        sync_cuda()
        times.append(time.perf_counter() - t)
    proc.join(60)
    g.close()
    del buf
    return times[1:]


def _arm(url: str, sync_id: str, version: int) -> None:
    async def go() -> None:
        async with AsyncServerClient(url, timeout_s=300) as c:
            await c.update_weights(
                UpdateWeightsRequest(sync_id=sync_id, weights_version=version, timeout_s=120)
            )

    asyncio.run(go())


def _profile(bc: WeightBroadcaster, model: torch.nn.Module, url: str, seed: int, version: int) -> str:
    """torch.profiler of one push (trainer side): where the host and the GPU spend the sync."""
    from torch.profiler import ProfilerActivity, profile

    reseed_(model, seed)
    sync_cuda()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bc.push(model, version=version)
        sync_cuda()
    by_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    by_cuda = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
    return by_cpu + "\n" + by_cuda


def run_path(
    path: str, bucket_mb: int, model: torch.nn.Module, url: str, cfg_dir: Path, args: argparse.Namespace,
    backend: str, seed0: int, version0: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    rec: dict[str, Any] = {"path": path, "bucket_mb": bucket_mb}
    # Every path ends on the same seeds (same final weights, so generations compare across paths), but a
    # server's versions only move forward: each path's versions start at its own `version0`.
    v0 = seed0 if version0 is None else version0
    bc = WeightBroadcaster(
        BroadcasterConfig(
            servers=[url], inference_config=str(cfg_dir), master_port=free_port(), backend=backend,
            load_path=path, bucket_bytes=bucket_mb << 20, rendezvous_timeout_s=120, step_timeout_s=120,
            sync_timeout_s=300, http_timeout_s=120,
        )
    )  # fmt: skip
    try:
        t = time.perf_counter()
        try:
            resp = bc.init()[url]
        except Exception as exc:
            rec["init_error"] = f"{type(exc).__name__}: {exc}"[:600]
            return rec
        rec["init_s"] = time.perf_counter() - t
        rec["load_path"], rec["load_path_reason"] = resp.load_path, resp.load_path_reason
        dev = next(model.parameters()).device
        if dev.type == "cuda":
            mem0 = rpc(url, "layercast_memory_stats", "reset")[0]
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        syncs: list[dict[str, Any]] = []
        for i in range(args.syncs + 1):
            reseed_(model, seed0 + i)
            sync_cuda()
            rep = bc.push(model, version=v0 + i)
            srv = rep.servers[url]
            syncs.append({
                "total_s": rep.total_s, "plan_s": rep.plan_s, "quantize_s": rep.quantize_s,
                "group_check_s": rep.group_check_s, "finite_check_s": rep.finite_check_s,
                "answer_s": rep.answer_s,
                "send_s": rep.send_s, "commit_s": rep.commit_s, "bytes": rep.bytes_sent,
                "tensors": rep.tensors, "server": srv.timings.model_dump(),
                "wire": {k: getattr(rep.wire, k) for k in ("header_s", "vote_s", "transfer_s", "work_s",
                                                           "wait_s", "commit_s")},
            })  # fmt: skip
        timed = syncs[1:]
        rec["syncs"] = timed
        # The orchestrator's mode: servers armed ahead (their HTTP call and vLLM RPC dispatch done, the
        # workers waiting at the header), then the trainer sends: `push(arm=False)` wall time.
        armed = []
        for i in range(args.syncs):
            reseed_(model, seed0 + args.syncs + 1 + i)
            sync_cuda()
            version = v0 + args.syncs + 1 + i
            sid = f"armed-{version}"
            th = threading.Thread(target=_arm, args=(url, sid, version), daemon=True)
            th.start()
            time.sleep(0.3)
            t = time.perf_counter()
            bc.push(model, version=version, sync_id=sid, arm=False)
            armed.append(time.perf_counter() - t)
            th.join(120)
        rec["sync_s_prearmed_all"] = armed
        rec["sync_s_prearmed"] = median(armed)
        if args.profile and dev.type == "cuda":
            rec["profile"] = _profile(bc, model, url, seed0 + 2 * args.syncs + 2, v0 + 2 * args.syncs + 2)
        rec["warmup_s"] = syncs[0]["total_s"]
        rec["sync_s"] = median([s["total_s"] for s in timed])
        rec["bytes_sent"] = timed[-1]["bytes"]
        rec["tensors"] = timed[-1]["tensors"]
        if dev.type == "cuda":
            rec["trainer_peak_extra_bytes"] = torch.cuda.max_memory_allocated(dev) - base
            mem1 = rpc(url, "layercast_memory_stats")[0]
            rec["inference_peak_extra_bytes"] = mem1["peak"] - mem0["allocated"]
        # Verification, outside the timing: the runtime weights are exactly what was sent.
        t = time.perf_counter()
        sent = sent_digest(bc.tensors(model, layout="kernel"))
        server = rpc(url, "layercast_weights_digest")[0]
        rec["digest_mismatches"] = digest_diff(server, sent)[:20]
        rec["digest_tensors"] = len(sent)
        rec["generated"] = generate(url, model.config.vocab_size)
        rec["verify_s"] = time.perf_counter() - t
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc()
    finally:
        bc.close()
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.6b,8b")
    ap.add_argument("--syncs", type=int, default=5)
    ap.add_argument("--paths", default="kernel,layerwise,checkpoint")
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--kernel-bucket-mb", default="1024", help="extra kernel-path runs at these bucket sizes")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of one extra push per path")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/layercast-sync-bench"))
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 model on CPU over Gloo, no peer")
    args = ap.parse_args()

    smoke = args.cpu_smoke
    cuda = torch.cuda.is_available() and not smoke
    if not cuda and not smoke:
        sys.exit("needs >= 2 GPUs (or --cpu-smoke)")
    n_gpu = torch.cuda.device_count() if cuda else 0
    if cuda and n_gpu < 2:
        sys.exit(f"needs >= 2 GPUs, found {n_gpu}")
    device = f"{n_gpu}x {torch.cuda.get_device_name(0)}" if cuda else "cpu"
    slug = f"{n_gpu}x" + torch.cuda.get_device_name(0).lower().replace(" ", "-") if cuda else "cpu"
    sizes = ["tiny"] if smoke else [s for s in args.sizes.split(",") if s]
    peer = cuda and not args.no_peer
    peer_parallel = peer and n_gpu >= 4
    backend = "nccl" if cuda else "gloo"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    lines: list[str] = []
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    result: dict[str, Any] = {
        "device": device, "date": args.date, "command": command, "torch": torch.__version__,
        "trainer_gpu": 0, "server_gpu": 1, "peer_gpus": "2,3" if peer_parallel else "0,1 (after ours)",
        "models": {},
    }  # fmt: skip
    say(lines, f"sync_bench: {device}; {command}; {args.date}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{args.date}-{slug}-sync-bench"

    def save() -> None:
        stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    env = plugin_env(args.work)
    ok = True
    for size in sizes:
        rec: dict[str, Any] = {"paths": []}
        result["models"][size] = rec
        work = args.work / size
        quant = None if smoke else FP8_BLOCK

        cfg_dir = write_inference_dir(work / "inference", size, dtype, quant)
        serve_args = ["--load-format", "dummy", "--enforce-eager", "--max-model-len", "1024",
                      "--max-num-seqs", "8", "--served-model-name", "toy"]  # fmt: skip
        senv = {**env}
        if cuda:
            serve_args += ["--gpu-memory-utilization", "0.55"]
            senv["CUDA_VISIBLE_DEVICES"] = "1"
        else:
            serve_args += ["--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20)]
            senv["LAYERCAST_CPU_PLAIN_LINEAR"] = "1"
        t0 = time.perf_counter()
        server = ServerProcess(cfg_dir, extra_args=serve_args, env=senv, log_path=work / "server.log")
        peer_proc, peer_out, go = None, work / "peer.json", work / "peer.go"
        if peer_parallel:
            peer_proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("peer_native.py")), "--shape", size,
                 "--syncs", str(args.syncs), "--gpus", "2,3", "--port", str(free_port()),
                 "--go-file", str(go), "--out", str(peer_out)],
                stdout=open(work / "peer.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            )  # fmt: skip
        try:
            model = build_model(size, dtype, dev, seed=0)
            rec["params"] = sum(p.numel() for p in model.parameters())
            rec["trainer_model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
            server.wait_ready(args.ready_timeout)
            rec["server_ready_s"] = time.perf_counter() - t0
            say(lines, f"[{stamp()}] {size}: {rec['params'] / 1e9:.2f}B params; server ready in "
                       f"{rec['server_ready_s']:.0f} s")  # fmt: skip
            rec["generated_before"] = generate(server.url, model.config.vocab_size)
            runs = [(p, args.bucket_mb) for p in args.paths.split(",") if p]
            if "kernel" in args.paths:
                runs += [("kernel", int(b)) for b in args.kernel_bucket_mb.split(",") if b]
            for path, bmb in runs:
                r = run_path(
                    path, bmb, model, server.url, cfg_dir, args, backend, seed0=1000,
                    version0=1000 * (len(rec["paths"]) + 1),
                )  # fmt: skip
                rec["paths"].append(r)
                say(lines, f"[{stamp()}] {size} {path} @{bmb} MiB: " + json.dumps(
                    {k: v for k, v in r.items() if k not in ("syncs", "generated")}, default=str
                ))  # fmt: skip
                save()
            nbytes = max((r.get("bytes_sent", 0) for r in rec["paths"]), default=0)
            if nbytes:
                raws = raw_broadcast(nbytes, args.syncs, "1", backend, dev)
                rec["raw_nccl_s_all"], rec["raw_nccl_s"], rec["raw_bytes"] = raws, median(raws), nbytes
                say(
                    lines,
                    f"[{stamp()}] {size} raw {backend}: {median(raws) * 1e3:.2f} ms, {nbytes / 1e9:.3f} GB",
                )
            verify(rec, lines, size)
            ok = ok and rec.get("verified", False)
            del model
            if cuda:
                torch.cuda.empty_cache()
        except Exception as exc:
            ok = False
            rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            say(lines, f"{size} error: {rec['error']}\n{traceback.format_exc()}")
        finally:
            rec["server_log_tail"] = server.tail(30)
            server.stop()
            save()
        if peer:
            go.touch()
            if peer_proc is None:
                peer_proc = subprocess.Popen(
                    [sys.executable, str(Path(__file__).with_name("peer_native.py")), "--shape", size,
                     "--syncs", str(args.syncs), "--gpus", "0,1", "--port", str(free_port()),
                     "--out", str(peer_out)],
                    stdout=open(work / "peer.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                )  # fmt: skip
            try:
                peer_proc.wait(args.ready_timeout + 300)
            except subprocess.TimeoutExpired:
                peer_proc.kill()
            if peer_out.exists():
                rec["peer"] = json.loads(peer_out.read_text())
            else:
                rec["peer_error"] = (work / "peer.log").read_text(errors="replace")[-3000:]
            say(lines, f"[{stamp()}] {size} peer: " + (
                f"{rec['peer']['peer_s'] * 1e3:.1f} ms" if "peer" in rec else rec["peer_error"][-600:]
            ))  # fmt: skip
        fill_ratios(rec)
        save()
    table(lines, result)
    save()
    print(f"wrote {stem}.txt/.json", flush=True)
    return 0 if ok else 1


def verify(rec: dict[str, Any], lines: list[str], size: str) -> None:
    """Every path that ran: runtime weights == sent bytes; generations equal across paths, and not equal
    to the dummy weights' output."""
    ran = [r for r in rec["paths"] if "generated" in r]
    first = ran[0]["generated"] if ran else None
    for r in ran:
        r["digest_ok"] = not r["digest_mismatches"]
        r["vs_first_path"] = compare(r["generated"], first)
        r["vs_before"] = compare(r["generated"], rec["generated_before"])
    rec["verified"] = (
        bool(ran)
        and all(
            r["digest_ok"]
            and r["vs_first_path"]["tokens_equal"]
            and r["vs_first_path"]["max_logprob_diff"] == 0.0
            for r in ran
        )
        and all("error" not in r for r in rec["paths"])
    )
    say(lines, f"{size} verified: {rec['verified']} " + json.dumps(
        [{"path": r["path"], "bucket_mb": r["bucket_mb"], "digest_ok": r["digest_ok"],
          "vs_first_path": r["vs_first_path"], "changed_vs_dummy": not r["vs_before"]["tokens_equal"]}
         for r in ran]))  # fmt: skip


def fill_ratios(rec: dict[str, Any]) -> None:
    raw = rec.get("raw_nccl_s")
    peer = rec.get("peer", {}).get("peer_s")
    for r in rec["paths"]:
        if "sync_s" not in r:
            continue
        r["raw_nccl_s"] = raw
        r["ratio_vs_raw"] = r["sync_s"] / raw if raw else None
        armed = r.get("sync_s_prearmed")
        r["ratio_prearmed_vs_raw"] = armed / raw if raw and armed else None
        r["peer_s"] = peer
        r["speedup_vs_peer"] = peer / r["sync_s"] if peer else None
        r["params"] = rec.get("params")


def table(lines: list[str], result: dict[str, Any]) -> None:
    say(lines)
    say(lines, f"{'model':<6}{'path':<11}{'bucket':>7}{'GB sent':>9}{'sync ms':>9}{'armed ms':>9}"
               f"{'raw ms':>8}{'armed/raw':>10}"
               f"{'peer ms':>9}{'x peer':>8}{'trainer+GB':>11}{'infer+GB':>9}  verified")  # fmt: skip
    for size, rec in result["models"].items():
        for r in rec["paths"]:
            if "sync_s" not in r:
                why = r.get("init_error") or r.get("error") or "?"
                say(lines, f"{size:<6}{r['path']:<11}{r['bucket_mb']:>7}  refused/failed: {why[:160]}")
                continue

            def f(x: Any, scale: float = 1.0, fmt: str = ".1f") -> str:
                return "-" if x is None else format(x * scale, fmt)

            say(lines, f"{size:<6}{r['path']:<11}{r['bucket_mb']:>7}{r['bytes_sent'] / 1e9:>9.3f}"
                       f"{f(r['sync_s'], 1e3):>9}{f(r.get('sync_s_prearmed'), 1e3):>9}"
                       f"{f(r.get('raw_nccl_s'), 1e3):>8}"
                       f"{f(r.get('ratio_prearmed_vs_raw'), 1, '.2f'):>10}"
                       f"{f(r.get('peer_s'), 1e3):>9}{f(r.get('speedup_vs_peer'), 1, '.2f'):>8}"
                       f"{f(r.get('trainer_peak_extra_bytes'), 1e-9, '.2f'):>11}"
                       f"{f(r.get('inference_peak_extra_bytes'), 1e-9, '.2f'):>9}  "
                       f"{r.get('digest_ok')}/{r.get('vs_first_path', {}).get('tokens_equal')}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
