"""`layercast bench NAME [ARGS...]`: run one of the repository's benchmarks (`bench/*.py`), thinly.

Names: `broadcast` (`bench/broadcast_bench.py`: the broadcaster vs raw NCCL; without 2 GPUs it runs
its Gloo-on-CPU smoke mode unless told otherwise), `quant` (`bench/quant_bench.py`), `fp8-e2e`
(`bench/gpu_fp8_e2e.py`), `producer` (`bench/producer_bench.py`), `mx-quant`
(`bench/mx_quant_bench.py`), `fsdp-gather` (`bench/fsdp_gather_bench.py`). ARGS pass through
unchanged; the benchmark's output streams under a progress spinner. The benchmarks live in a source
checkout (they are not part of the installed package).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
BENCHES: dict[str, tuple[str, str]] = {
    "broadcast": ("broadcast_bench.py", "broadcaster vs raw NCCL broadcast (CPU/Gloo smoke without 2 GPUs)"),
    "quant": ("quant_bench.py", "FP8 quantizer throughput"),
    "fp8-e2e": ("gpu_fp8_e2e.py", "FP8/MXFP8/NVFP4 end to end through vLLM vs a fresh engine (1+ GPUs)"),
    "producer": ("producer_bench.py", "trainer producer: walker stream vs in-place bucket writer (1 GPU)"),
    "mx-quant": ("mx_quant_bench.py", "MXFP8/NVFP4 Triton kernels vs the torch references (1 GPU)"),
    "fsdp-gather": ("fsdp_gather_bench.py", "FSDP2 gathers per scheme vs bf16: bytes and time (2 GPUs)"),
}


def _usage() -> str:
    lines = ["usage: layercast bench NAME [ARGS...]  (ARGS go to the benchmark; NAME --help: its own)", ""]
    lines += [f"  {name:12} {what}" for name, (_, what) in BENCHES.items()]
    return "\n".join(lines)


def command(name: str, args: list[str], cuda_devices: int) -> list[str]:
    """The benchmark's command line. `broadcast` with fewer than 2 GPUs gets `--cpu-smoke` and, unless
    given, a temporary `--out-dir` (smoke numbers do not belong in bench/results)."""
    script, _ = BENCHES[name]
    args = list(args)
    if name == "broadcast" and cuda_devices < 2 and "--cpu-smoke" not in args and "-h" not in args:
        args.append("--cpu-smoke")
        if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in args):
            args += ["--out-dir", tempfile.mkdtemp(prefix="layercast-bench-")]
    return [sys.executable, str(BENCH_DIR / script), *args]


def main(argv: list[str]) -> int:
    console = Console()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, args = argv[0], argv[1:]
    if name not in BENCHES:
        console.print(f"[red]unknown benchmark {name!r}[/]\n{_usage()}")
        return 2
    if not (BENCH_DIR / BENCHES[name][0]).exists():
        console.print(f"[red]layercast bench needs a source checkout: {BENCH_DIR} not found[/]")
        return 2
    import torch

    cmd = command(name, args, torch.cuda.device_count())
    if any(a in ("-h", "--help") for a in args):
        return subprocess.call(cmd)
    console.print(f"[bold]layercast bench {name}[/]: {' '.join(cmd[1:])}")
    started = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        progress.add_task(f"bench {name} running", total=None)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            progress.console.print(line.rstrip("\n"), markup=False, highlight=False)
        rc = proc.wait()
    verdict = "[green]done[/]" if rc == 0 else f"[red]failed (exit {rc})[/]"
    console.print(f"bench {name} {verdict} in {time.perf_counter() - started:.1f} s")
    return rc
