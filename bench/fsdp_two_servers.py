"""A 2-rank FSDP2 trainer (GPUs 0-1, BF16 Qwen3) -> `layercast serve` vLLM servers (by default two, on
GPUs 2 and 3; `--servers-on 1`: one, sharing GPU1 with trainer rank 1; FP8 blockwise 128x128,
`--load-format dummy`), driven by the orchestrator client. Below, "both servers" means every server.

  1. the two servers start while the trainer ranks build and shard the model (`fully_shard` per layer);
  2. rank 0 `init()`s the broadcaster with both servers; per step the weights change (every rank
     updates its own shards, deterministically), `SyncOrchestrator.sync_step` arms both servers and
     runs the push (every FSDP rank calls `push`; rank 0 sends), then both servers generate (outside the
     timing); per-sync times, trainer phases and peak extra memory on every rank are recorded;
  3. raw NCCL: rank 0 broadcasts exactly the bytes of one sync to two fresh processes on GPUs 2 and 3;
  4. the final weights are written as an HF FP8 checkpoint (`trainer_side.checkpoint`, every rank takes
     part in the gathers), the trainer exits, and a fresh server loads that checkpoint on GPU0: both
     servers' greedy tokens and logprobs must equal the fresh server's exactly.

    python bench/fsdp_two_servers.py --shape 8b --steps 5 --out-dir bench/results     # 4 GPUs
    python bench/fsdp_two_servers.py --shape 8b --steps 5 --servers-on 1 --out-dir bench/results
        # 2 GPUs: the trainer on GPUs 0-1, one server sharing GPU1 with trainer rank 1
    python bench/fsdp_two_servers.py --shape 8b --steps 5 --every-rank --out-dir bench/results
        # 2 GPUs: server i shares GPU i with trainer rank i; every rank syncs its own server (ipc,
        # `senders="every_rank"`): no broadcast between ranks, so no raw-NCCL row
    python bench/fsdp_two_servers.py --cpu-smoke [--servers-on 1 | --every-rank]      # CPU, Gloo, tiny
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    FP8_BLOCK,
    SHAPES,
    build_model,
    compare,
    generate,
    median,
    plugin_env,
    rpc,
    stamp,
    sync_cuda,
    write_inference_dir,
)
from broadcaster.group import Group
from configs.trainer import BroadcasterConfig
from rpc.client.orchestrator import SyncOrchestrator
from rpc.tools.launch import ServerProcess, free_port
from trainer_side.broadcast import WeightBroadcaster
from trainer_side.checkpoint import write_hf_checkpoint
from trainer_side.detect import detect_quant_scheme


@torch.no_grad()
def step_update_(model: torch.nn.Module, step: int) -> None:
    """An RL-like update every rank applies to its own shards: the full tensors change the same way
    whatever the sharding (elementwise, no randomness)."""
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        local.mul_(1.0 + 0.01 * ((step % 3) - 1)).add_(0.001 * step)


def trainer_rank(rank: int, a: argparse.Namespace, urls: list[str], cfg_dir: str, out: Any) -> None:
    cuda = not a.cpu_smoke
    if cuda:
        torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.fsdp_port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    res: dict[str, Any] = {"rank": rank}
    try:
        dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        model = build_model(a.shape, dtype, dev, seed=0)
        mesh = init_device_mesh("cuda" if cuda else "cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        res["params"] = sum(p.numel() for p in model.parameters())  # DTensor: the global count
        sync_cuda()
        if cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(dev)
            res["model_shard_bytes"] = base
            torch.cuda.reset_peak_memory_stats(dev)
        if a.every_rank:  # this rank's own server, on its own device
            urls = [urls[rank]]
        bc = WeightBroadcaster(
            BroadcasterConfig(
                servers=urls, inference_config=cfg_dir, master_port=a.group_ports[rank],
                backend="ipc" if a.every_rank else "nccl" if cuda else "gloo", load_path=a.load_path,
                senders="every_rank" if a.every_rank else "rank0", rendezvous_timeout_s=120,
                step_timeout_s=120, sync_timeout_s=300, http_timeout_s=120,
            )
        )  # fmt: skip
        orch = SyncOrchestrator(urls, timeout_s=300)
        sends = rank == 0 or a.every_rank
        if sends:
            t = time.perf_counter()
            res["init"] = {u: r.model_dump() for u, r in bc.init().items()}
            res["init_s"] = time.perf_counter() - t
        dist.barrier()
        syncs: list[dict[str, Any]] = []
        for step in range(1, a.steps + 2):  # step 1 is the warm-up
            step_update_(model, step)
            sync_cuda()
            dist.barrier()
            sid = f"fsdp-step-{step}"
            if sends:
                push_box: dict[str, Any] = {}

                def push(sid: str = sid, step: int = step, box: dict[str, Any] = push_box) -> Any:
                    box["report"] = bc.push(model, step, sync_id=sid, arm=False)
                    return box["report"]

                rep = orch.sync_step(push, sid, step)
                pr = push_box["report"]
                row = {
                    "step": step, "sync_s": rep.total_s, "arm_s": rep.arm_s, "trainer_s": rep.trainer_s,
                    "wait_s": rep.wait_s, "push_total_s": pr.total_s, "plan_s": pr.plan_s,
                    "quantize_gather_s": pr.quantize_s, "send_s": pr.send_s, "commit_s": pr.commit_s,
                    "bytes": pr.bytes_sent, "tensors": pr.tensors,
                    "servers": {u: r.model_dump() if hasattr(r, "model_dump") else str(r)
                                for u, r in rep.servers.items()},
                }  # fmt: skip
                t = time.perf_counter()
                row["generated"] = {u: generate(u, model.config.vocab_size) for u in urls}
                row["generate_s"] = time.perf_counter() - t
                syncs.append(row)
                print(f"[{stamp()}] step {step}: sync {rep.total_s * 1e3:.1f} ms "
                      f"(push {pr.total_s * 1e3:.1f}), {pr.bytes_sent / 1e9:.3f} GB", flush=True)  # fmt: skip
            else:
                bc.push(model, step, sync_id=sid, arm=False)
            dist.barrier()
        res["syncs"] = syncs
        if cuda:
            res["peak_extra_bytes"] = torch.cuda.max_memory_allocated(dev) - base
        bc.close()
        # Raw NCCL of one sync's bytes, rank 0 -> the two receivers on the servers' GPUs.
        if rank == 0 and syncs and not a.every_rank:
            res["raw_s_all"] = raw_to_servers(syncs[-1]["bytes"], a, dev)
        dist.barrier()
        t = time.perf_counter()
        base_cfg = json.loads((Path(cfg_dir) / "config.json").read_text())
        write_hf_checkpoint(model, detect_quant_scheme(base_cfg), a.work / "fresh", base_cfg)
        res["checkpoint_write_s"] = time.perf_counter() - t
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        traceback.print_exc()
    finally:
        out.put(res)
        dist.destroy_process_group()


def _raw_recv(port: int, rank: int, world: int, nbytes: int, k: int, gpu: str, cuda: bool) -> None:
    if cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    dev = torch.device("cuda", 0) if cuda else None
    g = Group("127.0.0.1", port, world, rank, backend="nccl" if cuda else "gloo", who=f"raw {rank}",
              timeout_s=120, device=dev)  # fmt: skip
    buf = torch.empty(nbytes, dtype=torch.uint8, device=g.device)
    for _ in range(k + 1):
        g.wait(g.broadcast(buf), 120, "raw broadcast")
    sync_cuda()
    g.close()


def raw_to_servers(nbytes: int, a: argparse.Namespace, dev: torch.device) -> list[float]:
    cuda = dev.type == "cuda"
    port = free_port()
    ctx = mp.get_context("spawn")
    world = 1 + len(a.server_gpus)
    procs = [ctx.Process(target=_raw_recv, args=(port, r, world, nbytes, a.steps, gpu, cuda))
             for r, gpu in enumerate(a.server_gpus, start=1)]  # fmt: skip
    for p in procs:
        p.start()
    g = Group("127.0.0.1", port, world, 0, backend="nccl" if cuda else "gloo", who="raw sender",
              timeout_s=120, device=dev if cuda else None)  # fmt: skip
    buf = torch.empty(nbytes, dtype=torch.uint8, device=g.device)
    times = []
    for _ in range(a.steps + 1):
        sync_cuda()
        t = time.perf_counter()
        g.wait(g.broadcast(buf), 120, "raw broadcast")
        sync_cuda()
        times.append(time.perf_counter() - t)
    for p in procs:
        p.join(60)
    g.close()
    return times[1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--load-path", default="kernel")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/layercast-fsdp2"))
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--servers-on", default="2,3", help="GPUs of the servers, one server each")
    ap.add_argument("--every-rank", action="store_true",
                    help="server i on GPU i beside trainer rank i; every rank syncs its own server (ipc)")
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args()
    if a.every_rank:
        a.servers_on = "0,1"
    a.server_gpus = a.servers_on.split(",")
    cuda = not a.cpu_smoke
    n_servers = len(a.server_gpus)
    need = max(2, *(int(g) + 1 for g in a.server_gpus))
    if a.cpu_smoke:
        a.shape = "tiny"
    elif torch.cuda.device_count() < need:
        sys.exit(
            f"needs {need} GPUs (trainer on 0-1, servers on {a.servers_on}), "
            f"found {torch.cuda.device_count()}"
        )
    n_gpu = torch.cuda.device_count() if cuda else 0
    device = f"{n_gpu}x {torch.cuda.get_device_name(0)}" if cuda else "cpu"
    slug = f"{n_gpu}x" + torch.cuda.get_device_name(0).lower().replace(" ", "-") if cuda else "cpu"
    command = " ".join(shlex.quote(x) for x in [Path(sys.executable).name, *sys.argv])
    lines: list[str] = []
    result: dict[str, Any] = {"device": device, "date": a.date, "command": command, "shape": a.shape,
                              "load_path": a.load_path}  # fmt: skip

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    a.out_dir.mkdir(parents=True, exist_ok=True)
    kind = "every-rank" if a.every_rank else "two-servers" if n_servers == 2 else f"{n_servers}-server"
    stem = a.out_dir / f"{a.date}-{slug}-fsdp2-{kind}"

    def save() -> None:
        stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")

    say(f"fsdp_two_servers: {device}; {command}; {a.date}")
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg_dir = write_inference_dir(a.work / "inference", a.shape, dtype, FP8_BLOCK if cuda else None)
    env = plugin_env(a.work)
    common = [
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        "8",
        "--served-model-name",
        "toy",
    ]
    if cuda:
        common += ["--gpu-memory-utilization", "0.5"]
        envs = [{"CUDA_VISIBLE_DEVICES": g} for g in [*a.server_gpus, "0"]]  # the last: the fresh server
    else:
        common += ["--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20)]
        envs = [{"LAYERCAST_CPU_PLAIN_LINEAR": "1"}] * (n_servers + 1)
    t0 = time.perf_counter()
    servers = [
        ServerProcess(cfg_dir, extra_args=["--load-format", "dummy", *common], env={**env, **envs[i]},
                      log_path=a.work / f"server-{i}.log")
        for i in range(n_servers)
    ]  # fmt: skip
    a.fsdp_port, a.group_ports = free_port(), [free_port(), free_port()]
    ok = False
    try:
        for s in servers:
            s.wait_ready(a.ready_timeout)
        result["servers_ready_s"] = time.perf_counter() - t0
        say(
            f"[{stamp()}] {n_servers} server(s) on GPU(s) {a.servers_on} ready in "
            f"{result['servers_ready_s']:.0f} s"
        )
        urls = [s.url for s in servers]
        for i, s in enumerate(servers):
            if cuda:
                rpc(s.url, "layercast_memory_stats", "reset")
            result[f"server{i}_memory_before"] = rpc(s.url, "layercast_memory_stats")[0]
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        ranks = [ctx.Process(target=trainer_rank, args=(r, a, urls, str(cfg_dir), q)) for r in range(2)]
        for p in ranks:
            p.start()
        outs = sorted((q.get(timeout=1800) for _ in ranks), key=lambda r: r["rank"])
        for p in ranks:
            p.join(120)
        result["trainer"] = outs
        for i, s in enumerate(servers):
            after = rpc(s.url, "layercast_memory_stats")[0]
            before = result[f"server{i}_memory_before"]
            result[f"server{i}_peak_extra_bytes"] = after["peak"] - before["allocated"] if after else None
        errors = [o["error"] for o in outs if "error" in o]
        if errors:
            raise RuntimeError("trainer failed: " + " | ".join(errors))
        syncs = outs[0]["syncs"]
        if a.every_rank:  # a step is done when every rank's own sync is: the slowest rank's time
            for r, other in zip(syncs, outs[1]["syncs"], strict=True):
                r["generated"] |= other["generated"]
                for k in ("sync_s", "push_total_s"):
                    r[k] = max(r[k], other[k])
        timed = syncs[1:]
        result["sync_s"] = median([r["sync_s"] for r in timed])
        result["push_s"] = median([r["push_total_s"] for r in timed])
        result["raw_nccl_s"] = median(outs[0]["raw_s_all"]) if "raw_s_all" in outs[0] else None
        result["ratio_vs_raw"] = result["sync_s"] / result["raw_nccl_s"] if result["raw_nccl_s"] else None
        result["bytes_per_sync"] = timed[-1]["bytes"]
        last = syncs[-1]["generated"]
        for s in servers:
            s.stop()
        say(f"[{stamp()}] syncs done; starting a fresh server from the written FP8 checkpoint")
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        ):
            if (cfg_dir / name).exists():
                shutil.copy(cfg_dir / name, a.work / "fresh" / name)
        t1 = time.perf_counter()
        with ServerProcess(a.work / "fresh", extra_args=common, env={**env, **envs[-1]},
                           log_path=a.work / "server-fresh.log") as fresh:  # fmt: skip
            fresh.wait_ready(a.ready_timeout)
            result["fresh_ready_s"] = time.perf_counter() - t1
            ref = generate(fresh.url, SHAPES[a.shape]["vocab_size"])
        result["vs_fresh"] = {u: compare(g, ref) for u, g in last.items()}
        first, final = syncs[0]["generated"][urls[0]], syncs[-1]["generated"][urls[0]]
        result["generations_changed_over_steps"] = not compare(first, final)["tokens_equal"]
        ok = all(v["tokens_equal"] and v["max_logprob_diff"] == 0.0 for v in result["vs_fresh"].values())
        result["verified"] = ok
        result["row"] = {  # the fields every sync benchmark row carries
            "mode": "fsdp2-every-rank" if a.every_rank else "fsdp2", "path": a.load_path,
            "params": outs[0].get("params"),
            "trainer_ranks": 2, "servers": n_servers, "sync_s": result["sync_s"],
            "raw_nccl_s": result["raw_nccl_s"], "ratio_vs_raw": result["ratio_vs_raw"],
            "trainer_peak_extra_bytes": max(o.get("peak_extra_bytes", 0) for o in outs),
            "inference_peak_extra_bytes": max(
                result.get(f"server{i}_peak_extra_bytes") or 0 for i in range(n_servers)
            ),
            "verified": ok,
        }  # fmt: skip
        raw = (
            f"raw NCCL to the server(s) {result['raw_nccl_s'] * 1e3:.1f} ms ({result['ratio_vs_raw']:.2f}x)"
            if result["raw_nccl_s"] else "every rank syncs its own server: nothing broadcast, no raw row"
        )  # fmt: skip
        say(
            f"sync (orchestrated, {n_servers} server(s)) median {result['sync_s'] * 1e3:.1f} ms; push median "
            f"{result['push_s'] * 1e3:.1f} ms; {raw}; {result['bytes_per_sync'] / 1e9:.3f} GB per sync"
        )
        for o in outs:
            say(f"trainer rank {o['rank']}: peak extra {o.get('peak_extra_bytes', 0) / 1e9:.2f} GB "
                f"(shard {o.get('model_shard_bytes', 0) / 1e9:.2f} GB)")  # fmt: skip
        for i in range(n_servers):
            say(f"server {i}: peak extra {(result.get(f'server{i}_peak_extra_bytes') or 0) / 1e9:.2f} GB")
        say(f"server(s) vs a fresh load of the final FP8 checkpoint: {result['vs_fresh']}")
        for r in syncs:
            warm = " (warm-up)" if r is syncs[0] else ""
            say(f"  step {r['step']}{warm}: sync {r['sync_s'] * 1e3:.1f} ms, "
                f"push {r['push_total_s'] * 1e3:.1f} (gather+quantize {r['quantize_gather_s'] * 1e3:.1f}, "
                f"send {r['send_s'] * 1e3:.1f}, commit {r['commit_s'] * 1e3:.1f})")  # fmt: skip
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        say(f"error: {result['error']}\n{traceback.format_exc()}")
    finally:
        for i, s in enumerate(servers):
            result[f"server{i}_log_tail"] = s.tail(20)
            s.stop()
        save()
    print(f"wrote {stem}.txt/.json", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
