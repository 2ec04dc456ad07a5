"""Decide the MXFP8 kernel's log2 and time the fused MXFP8 / NVFP4 kernels against the torch references.

1. For each `mx_kernels.LOG2_*` choice: every positive finite float32 (and +0) as a 32-group's max,
   through the real kernel, against torch's CUDA `floor(log2(clamp(amax, tiny))) + 127` (what vLLM 0.26's
   `_mxfp8_e4m3_quantize_torch` computes on Hopper); the count of differing scale bytes per choice.
2. Throughput on Qwen3-8B/32B-shaped bf16 weights: `mx_quantize` (the torch references, run on the GPU)
   vs the kernels (a few tile shapes), with a byte comparison of every timed output; and
   `quantize_weight` end to end (NVFP4: tensor amax, global scale, kernel). Medians of
   `triton.testing.do_bench` (L2 flushed).

    python bench/mx_quant_bench.py --out-dir bench/results     # on a CUDA GPU (sm_89+)

Writes `<date>-<device>-mx-quant.{txt,json}`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.quant import QuantScheme
from trainer_side import mx_kernels
from trainer_side.mx_quantize import nvfp4_global_scale, quantize_mxfp8, quantize_nvfp4, tensor_amax
from trainer_side.quantize import quantize_weight

SHAPES = [(4096, 4096), (6144, 4096), (24576, 4096), (4096, 12288), (5120, 25600), (151936, 4096)]
BLOCKS = [(16, 256), (32, 128), (8, 512), (64, 64), (32, 256)]


def say(lines: list[str], *parts: object) -> None:
    line = " ".join(str(p) for p in parts)
    lines.append(line)
    print(line, flush=True)


def bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"))


def log2_choices(lines: list[str]) -> dict[str, Any]:
    chunk = 1 << 24
    last = 0x7F7FFFFF
    x = torch.zeros(chunk, 32, device="cuda")
    q = torch.empty(chunk, 32, dtype=torch.float8_e4m3fn, device="cuda")
    s = torch.empty(chunk, 1, dtype=torch.uint8, device="cuda")
    tiny = torch.finfo(torch.float32).tiny
    out: dict[str, Any] = {}
    say(lines, "\n== floor(log2(amax)): scale bytes differing from torch's CUDA reference, all 2**31 amax ==")
    for mode, name in mx_kernels.LOG2_NAMES.items():
        t0 = time.time()
        wrong, examples = 0, []
        for start in range(0, last + 1, chunk):
            bits = torch.arange(start, min(start + chunk, last + 1), dtype=torch.int32, device="cuda")
            a = bits.view(torch.float32)
            n = a.numel()
            x[:n, 0] = a
            mx_kernels.mxfp8_quant_into(x[:n], q[:n], s[:n], log2=mode)
            ref = (torch.floor(torch.log2(a.clamp(min=tiny))) + 127.0).clamp(0, 254).to(torch.uint8)
            bad = (s[:n, 0] != ref).nonzero()[:, 0]
            wrong += int(bad.numel())
            if bad.numel() and len(examples) < 5:
                examples += [
                    (float(a[i]), int(s[i, 0]), int(ref[i])) for i in bad[: 5 - len(examples)].tolist()
                ]
        out[name] = {"mismatches": wrong, "examples (amax, kernel, torch)": examples}
        say(lines, f"{name:16s} {wrong:>12d} differ  ({time.time() - t0:.1f} s)  e.g. {examples[:3]}")
    return out


def same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(
        torch.equal(x.cpu().reshape(-1).view(torch.uint8), y.cpu().reshape(-1).view(torch.uint8))
        for x, y in zip(a, b, strict=True)
    )


def throughput(lines: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    say(
        lines,
        "\n== throughput, bf16 weights: Gparam/s (median ms); 'same' = every output byte equal to torch ==",
    )
    for fmt in ("mxfp8", "nvfp4"):
        say(lines, f"-- {fmt}: torch reference vs kernel tiles (BLOCK_M x BLOCK_K)")
        for r, c in SHAPES:
            x = torch.randn(r, c, device="cuda", dtype=torch.bfloat16) * 0.02
            n = x.numel()
            if fmt == "mxfp8":
                ref_fn: Callable[[], tuple[torch.Tensor, ...]] = partial(
                    quantize_mxfp8, x, check_finite=False
                )
                ref = ref_fn()
                impls = {
                    f"k{bm}x{bk}": partial(mx_kernels.mxfp8_quant, x, block=(bm, bk)) for bm, bk in BLOCKS
                }
            else:
                g = nvfp4_global_scale(tensor_amax(x))
                ref_fn = partial(quantize_nvfp4, x, check_finite=False)
                ref = ref_fn()[:2]
                impls = {
                    f"k{bm}x{bk}": partial(mx_kernels.nvfp4_quant, x, g, block=(bm, bk)) for bm, bk in BLOCKS
                }
            res: dict[str, Any] = {"torch": {"ms": bench_ms(ref_fn)}}
            for k, f in impls.items():
                res[k] = {"ms": bench_ms(f), "same": same(f(), ref)}
            for v in res.values():
                v["gparam_s"] = n / v["ms"] / 1e6
            best = min((k for k in impls), key=lambda k: res[k]["ms"])
            cells = " ".join(
                f"{k}={v['gparam_s']:.0f}({v['ms']:.3f}){'' if v.get('same', True) else ' DIFF'}"
                for k, v in res.items()
            )
            say(
                lines,
                f"{r:>6d}x{c:<6d} {cells}  best {best}: {res['torch']['ms'] / res[best]['ms']:.1f}x torch",
            )
            rows.append({"format": fmt, "shape": [r, c], "params": n, "results": res, "best": best})
            del x
            torch.cuda.empty_cache()
    return rows


def end_to_end(lines: list[str]) -> dict[str, Any]:
    schemes = {
        "mxfp8": QuantScheme(kind="mxfp8", group_size=32, source="modelopt"),
        "nvfp4": QuantScheme(kind="nvfp4", group_size=16, source="modelopt"),
    }
    x = torch.randn(24576, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    out: dict[str, Any] = {}
    say(lines, "\n== quantize_weight on a 24576x4096 bf16 weight (checks included), ms ==")
    for name, scheme in schemes.items():
        kernel_ms = bench_ms(lambda scheme=scheme: quantize_weight(x, scheme))
        fn = quantize_mxfp8 if name == "mxfp8" else quantize_nvfp4
        torch_ms = bench_ms(lambda fn=fn: fn(x))
        ok = same(
            tuple(quantize_weight(x, scheme).values()), tuple(quantize_weight(x.cpu(), scheme).values())
        )
        out[name] = {"quantize_weight_ms": kernel_ms, "torch_reference_ms": torch_ms, "same_as_cpu": ok}
        say(
            lines,
            f"{name}: quantize_weight {kernel_ms:.3f} ms, torch reference {torch_ms:.3f} ms "
            f"({torch_ms / kernel_ms:.1f}x); bytes equal to the CPU reference: {ok}",
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--no-log2", action="store_true", help="skip the exhaustive log2 comparison")
    args = ap.parse_args()
    if not mx_kernels.supports(
        torch.zeros(1, 32, device="cuda") if torch.cuda.is_available() else torch.zeros(1), 32
    ):
        sys.exit("mx_quant_bench needs a CUDA GPU with FP8 conversions (sm_89+) and Triton")
    import triton

    lines: list[str] = []
    dev = torch.cuda.get_device_name(0)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    say(
        lines,
        f"mx_quant_bench: {dev}; torch {torch.__version__}; triton {triton.__version__}; date {args.date}",
    )
    say(lines, f"command: {command}; default log2: {mx_kernels.LOG2_NAMES[mx_kernels.DEFAULT_LOG2]}")
    result: dict[str, Any] = {
        "device": dev,
        "date": args.date,
        "command": command,
        "torch": torch.__version__,
    }
    t0 = time.time()
    if not args.no_log2:
        result["log2"] = log2_choices(lines)
    result["throughput"] = throughput(lines)
    result["quantize_weight"] = end_to_end(lines)
    say(lines, f"wall {time.time() - t0:.1f} s")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.date}-{dev.lower().replace(' ', '-')}-mx-quant"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.{{txt,json}}")


if __name__ == "__main__":
    main()
