"""Bit-check and time the HF-fp8 128x128 block quantizer: eager torch vs torch.compile vs the Triton kernel.

The reference is `trainer_side.quantize._vllm_block` (vLLM's `per_block_cast_to_fp8`, use_ue8m0=False)
run by torch on the same device, plus a literal copy of vLLM's function. Every case compares fp8 bytes
and float32 scale words, so NaN payloads and signed zeros count. Timings are medians of
`triton.testing.do_bench` (L2 flushed between runs). Writes `<date>-<device>-quant.{txt,json}`.

    python bench/quant_bench.py --out-dir bench/results            # on a GPU
    python bench/quant_bench.py --cpu-smoke --out-dir /tmp/qb      # CPU: Triton interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton.jit runs

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_side import fp8_kernels
from trainer_side.quantize import _compiled_vllm_block, _vllm_block

Quant = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
B = 128


class Tee:
    """Print to stdout and keep every line for the .txt result."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, *parts: object) -> None:
        line = " ".join(str(p) for p in parts)
        self.lines.append(line)
        print(line, flush=True)


def vllm_per_block_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Literal copy of vllm 0.26 `vllm.utils.deep_gemm.per_block_cast_to_fp8(x, [128, 128], False)`."""
    m, n = x.shape
    x_padded = torch.zeros((-(-m // B) * B, -(-n // B) * B), dtype=x.dtype, device=x.device)
    x_padded[:m, :n] = x
    x_view = x_padded.view(-1, B, x_padded.size(1) // B, B)
    x_amax = x_view.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
    sf = x_amax / 448.0
    x_scaled = (x_view * (1.0 / sf)).to(torch.float8_e4m3fn)
    return x_scaled.view_as(x_padded)[:m, :n].contiguous(), sf.view(x_view.size(0), x_view.size(2))


def cuda_semantics_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """On CPU: the reference with CUDA's `/ 448.0` (multiply by float32 1/448), what the kernel matches."""
    from trainer_side.quantize import _pad_to_blocks

    rows, cols = x.shape
    padded = _pad_to_blocks(x, B, B)
    blocks = padded.view(padded.shape[0] // B, B, padded.shape[1] // B, B)
    amax = blocks.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
    sf = amax * torch.tensor(fp8_kernels._INV_FP8_MAX, dtype=torch.float32)
    q = (blocks * (1.0 / sf)).to(torch.float8_e4m3fn)
    return q.view_as(padded)[:rows, :cols].contiguous(), sf.view(blocks.shape[0], blocks.shape[2])


def triton_cpu(soft: bool) -> Quant:
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
        sf = torch.empty(-(-x.shape[0] // B), -(-x.shape[1] // B), dtype=torch.float32)
        fp8_kernels._launch(x, q, sf, (B, B), soft_cast=soft, num_warps=8)
        return q, sf

    return run


def triton_gpu(soft: bool, num_warps: int = fp8_kernels.DEFAULT_NUM_WARPS) -> Quant:
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fp8_kernels.fp8_block_quant(x, (B, B), soft_cast=soft, num_warps=num_warps)

    return run


# ------------------------------------------------------------------ inputs


def bits_of(dtype: torch.dtype, shape: tuple[int, int], gen: torch.Generator, finite: bool) -> torch.Tensor:
    """Uniformly random bit patterns of `dtype` (non-finite ones zeroed if `finite`)."""
    idt = torch.int16 if dtype.itemsize == 2 else torch.int32
    info = torch.iinfo(idt)
    x = torch.randint(info.min, info.max, shape, dtype=idt, generator=gen).view(dtype)
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x)) if finite else x


def cases(dtype: torch.dtype, small: bool) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, input on CPU, finite?) for one dtype."""
    g = torch.Generator().manual_seed(1234 + dtype.itemsize)
    shapes = [(129, 257), (1, 1), (300, 130), (7, 4096), (128, 128), (256, 384)]
    if not small:
        shapes += [(4096, 4096), (1000, 3000), (4097, 1025)]
    out: list[tuple[str, torch.Tensor, bool]] = []
    for s in shapes:
        out.append((f"randn {s[0]}x{s[1]}", torch.randn(s, generator=g).to(dtype), True))
    s = (300, 130)
    rnd = torch.randn(s, generator=g)
    out += [
        ("zeros 129x257", torch.zeros(129, 257, dtype=dtype), True),
        ("neg zeros 129x257", torch.full((129, 257), -0.0, dtype=dtype), True),
        ("randn*1e3 300x130", (rnd * 1e3).to(dtype), True),
        ("randn*1e-5 (amax<1e-4 clamp) 300x130", (rnd * 1e-5).to(dtype), True),
        ("randn*1e-30 300x130", (rnd * 1e-30).to(dtype), True),
        ("randn*1e-40 (fp32 subnormal) 300x130", (rnd * 1e-40).to(dtype), True),
        ("randn*1e37 300x130", (rnd * 1e37).to(dtype), True),
        ("max-magnitude 300x130", torch.sign(rnd).to(dtype) * torch.finfo(dtype).max, True),
        ("one outlier 1e4 per block 300x130", _outliers(rnd, 1e4).to(dtype), True),
        ("one outlier 1e30 per block 300x130", _outliers(rnd, 1e30).to(dtype), True),
        ("random finite bit patterns 300x130", bits_of(dtype, s, g, True), True),
    ]
    if dtype == torch.bfloat16:
        every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        fin = torch.where(torch.isfinite(every), every, torch.zeros_like(every))
        out.append(("every finite bf16 bit pattern 256x256", fin.view(256, 256), True))
        out.append(("every bf16 bit pattern (inf, NaN) 256x256", every.view(256, 256).clone(), False))
    else:
        out.append(("random fp32 bit patterns (inf, NaN) 300x130", bits_of(dtype, s, g, False), False))
    inf = (rnd.clone()).to(dtype)
    inf[5, 7], inf[200, 129] = float("inf"), float("-inf")
    out.append(("+-inf in two blocks 300x130", inf, False))
    nan = (rnd.clone()).to(dtype)
    nan[3, 3], nan[299, 129] = float("nan"), -float("nan")
    out.append(("NaN in two blocks 300x130", nan, False))
    return out


def _outliers(x: torch.Tensor, big: float) -> torch.Tensor:
    y = x.clone()
    y[::B, ::B] = big
    return y


# ------------------------------------------------------------------ checks


Pair = tuple[torch.Tensor, torch.Tensor]


def mismatches(got: Pair, ref: Pair) -> tuple[int, int]:
    q, s = got
    rq, rs = ref
    assert q.shape == rq.shape and s.shape == rs.shape, (q.shape, rq.shape, s.shape, rs.shape)
    assert q.dtype == rq.dtype == torch.float8_e4m3fn and s.dtype == rs.dtype == torch.float32
    dq = int((q.contiguous().view(torch.uint8) != rq.view(torch.uint8)).sum())
    ds = int((s.contiguous().view(torch.int32) != rs.contiguous().view(torch.int32)).sum())
    return dq, ds


def check(
    say: Tee, impls: dict[str, Quant], ref: Quant, device: str, label: str, small: bool
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    say(f"\n== bit-exactness vs the torch reference on {label} (mismatching fp8 bytes / scale words) ==")
    say(f"{'case':52s} {'dtype':9s} " + " ".join(f"{k:>18s}" for k in impls))
    for dtype in (torch.bfloat16, torch.float32):
        for name, x_cpu, finite in cases(dtype, small):
            x = x_cpu.to(device)
            variants = [(name, x)]
            if name.startswith("randn 300x130"):
                variants.append(("transposed view of randn 130x300", x.t()))
            for vname, xv in variants:
                r = ref(xv)
                res = {k: mismatches(f(xv), r) for k, f in impls.items()}
                cells = " ".join(f"{a:>9d}/{b:<8d}" for a, b in res.values())
                say(f"{vname:52s} {str(dtype)[6:]:9s} {cells}")
                rows.append(
                    {
                        "case": vname,
                        "dtype": str(dtype),
                        "shape": list(xv.shape),
                        "finite": finite,
                        "mismatch": {k: {"fp8_bytes": a, "scale_words": b} for k, (a, b) in res.items()},
                        "elements": xv.numel(),
                    }
                )
    return rows


# ------------------------------------------------------------------ timing


def bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def perf(say: Tee, impls: dict[str, Quant]) -> list[dict[str, Any]]:
    shapes = [
        ((4096, 4096), torch.bfloat16),
        ((4096, 12288), torch.bfloat16),
        ((12288, 4096), torch.bfloat16),
        ((6144, 4096), torch.bfloat16),
        ((8192, 8192), torch.bfloat16),
        ((16384, 16384), torch.bfloat16),
        ((8192, 32768), torch.bfloat16),
        ((151936, 4096), torch.bfloat16),
        ((8192, 8192), torch.float32),
        ((16384, 16384), torch.float32),
    ]
    rows: list[dict[str, Any]] = []
    say("\n== throughput: Gparam/s (median ms), L2 flushed between runs ==")
    say(f"{'shape':>14s} {'dtype':9s} " + " ".join(f"{k:>22s}" for k in impls))
    for (r, c), dtype in shapes:
        x = torch.randn(r, c, device="cuda", dtype=dtype)
        n = x.numel()
        res: dict[str, dict[str, float]] = {}
        for k, f in impls.items():
            ms = bench_ms(partial(f, x))
            moved = n * (x.element_size() + 1) + 4 * (-(-r // B)) * (-(-c // B))
            res[k] = {"ms": ms, "gparam_s": n / ms / 1e6, "gbyte_s": moved / ms / 1e6}
        say(
            f"{r:>6d}x{c:<7d} {str(dtype)[6:]:9s} "
            + " ".join(f"{v['gparam_s']:>9.1f} ({v['ms']:8.3f} ms)" for v in res.values())
        )
        rows.append({"shape": [r, c], "dtype": str(dtype), "params": n, "results": res})
        del x
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU only: interpreter, tiny shapes, no timing")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves compile time)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args()
    say = Tee()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    gpu = torch.cuda.is_available() and not args.cpu_smoke
    device_name = torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu"
    slug = device_name.lower().replace(" ", "-") if gpu else "cpu-smoke"
    import triton

    say(
        f"quant_bench: {device_name}; torch {torch.__version__}; triton {triton.__version__}; "
        f"numpy {np.__version__}; date {args.date}"
    )
    say(f"command: {command}")
    result: dict[str, Any] = {
        "device": device_name,
        "date": args.date,
        "command": command,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "block": [B, B],
    }
    t0 = time.time()
    if gpu:
        impls: dict[str, Quant] = {
            "vllm_literal_eager": vllm_per_block_cast_to_fp8,
            "triton_soft": triton_gpu(True),
            "triton_hw": triton_gpu(False),
        }
        if not args.no_compile:
            compiled = _compiled_vllm_block()
            impls["torch_compile"] = lambda x: compiled(x, b0=B, b1=B, ue8m0=False)
        ref: Quant = lambda x: _vllm_block(x, B, B, False)  # noqa: E731
        result["correctness"] = check(say, impls, ref, "cuda", "cuda", small=False)
        timed: dict[str, Quant] = {"eager": ref}
        if not args.no_compile:
            timed["torch_compile"] = impls["torch_compile"]
        for nw in (4, 8, 16):
            timed[f"triton_soft_w{nw}"] = triton_gpu(True, nw)
        for nw in (4, 8, 16):
            timed[f"triton_hw_w{nw}"] = triton_gpu(False, nw)
        result["perf"] = perf(say, timed)
        x = torch.randn(16384, 16384, device="cuda", dtype=torch.bfloat16)
        say("\n== peak extra GPU memory for one 16384x16384 bf16 call (bytes beyond input) ==")
        result["peak_extra_bytes_16384x16384_bf16"] = {}
        for k, f in timed.items():
            b = peak_extra_bytes(partial(f, x))
            result["peak_extra_bytes_16384x16384_bf16"][k] = b
            say(f"{k:22s} {b / 2**20:10.1f} MiB")
        from configs.quant import QuantScheme
        from trainer_side.quantize import quantize_weight

        scheme = QuantScheme(
            kind="fp8_block",
            block_size=(B, B),
            source="fp8",
            weight_scale_name="weight_scale_inv",
            scale_shape="2d",
        )
        got = quantize_weight(x, scheme)
        same = mismatches((got["weight"], got["weight_scale_inv"]), ref(x))
        e2e = {
            "quantize_weight_ms": bench_ms(lambda: quantize_weight(x, scheme)),
            "quantize_weight_no_check_ms": bench_ms(lambda: quantize_weight(x, scheme, check_finite=False)),
            "mismatch_vs_eager": list(same),
        }
        result["quantize_weight_16384x16384_bf16"] = e2e
        say(
            f"\nquantize_weight (dispatches to Triton on CUDA), 16384x16384 bf16: "
            f"{e2e['quantize_weight_ms']:.3f} ms with the isfinite check, "
            f"{e2e['quantize_weight_no_check_ms']:.3f} ms without; mismatches vs eager {same}"
        )
    else:
        impls = {"triton_soft": triton_cpu(True)}
        result["correctness"] = check(say, impls, cuda_semantics_ref, "cpu", "cpu (interpreter)", small=True)
        result["note"] = "CPU smoke: Triton interpreter vs the CUDA-semantics reference on CPU; no timing"
    bad = [
        (r["case"], r["dtype"], k)
        for r in result["correctness"]
        if r["finite"]
        for k, m in r["mismatch"].items()
        if k in ("triton_soft", "triton_hw") and (m["fp8_bytes"] or m["scale_words"])
    ]
    result["finite_mismatch_cases_triton"] = bad
    say(f"\nfinite-input cases with any Triton mismatch: {len(bad)} {bad[:10]}")
    say(f"wall {time.time() - t0:.1f} s")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.date}-{slug}-quant"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.txt").write_text("\n".join(say.lines) + "\n")
    print(f"wrote {out / stem}.{{txt,json}}")


if __name__ == "__main__":
    main()
