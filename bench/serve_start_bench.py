"""How long a CPU `layercast serve` of the built-in tiny model takes to answer `/health`, with and without
`rpc.tools.launch.TINY_MODEL_SERVE_ENV` (vLLM's defaults vs fully eager and unpinned; results before
2026-12-08 measured its first form, eager only), alternating in one run.

Run: `python bench/serve_start_bench.py --repeats 2` (CPU; prints a table, `--out FILE` writes it too).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rpc.tools.launch import TINY_MODEL_SERVE_ENV, ServerProcess, tiny_model_serve_args
from trainer_side.toy_models import save_toy, toy_config, toy_model


def start_s(model_dir: Path, env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with ServerProcess(model_dir, extra_args=tiny_model_serve_args(), env=env, log_path=log) as proc:
        proc.wait_ready(300)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-start-"))
    model_dir = save_toy(toy_model(toy_config("qwen3", torch.float32), seed=0), work / "model")
    cases = {"vLLM default (sampler compiled)": {}, "TINY_MODEL_SERVE_ENV (eager)": TINY_MODEL_SERVE_ENV}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(args.repeats):
        for name, env in cases.items():
            times[name].append(start_s(model_dir, dict(env), work / f"serve-{i}-{len(times[name])}.log"))
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    base = statistics.median(times["vLLM default (sampler compiled)"])
    lines = [
        f"CPU layercast serve start-up (tiny Qwen3, fp32) to /health 200, {datetime.date.today()}, "
        f"{platform.node()} ({torch.get_num_threads()} torch threads), command: "
        f"python bench/serve_start_bench.py {' '.join(sys.argv[1:])}",
        f"{'case':34} {'runs (s)':>22} {'median s':>9} {'vs default':>10}",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"{name:34} {', '.join(f'{t:.1f}' for t in ts):>22} {med:9.1f} {med / base:9.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
