"""The FP8 128x128 block quantizer's numerics contract, measured byte for byte on large matrices.

For each input (bf16, shapes a multiple of 128; normal, Student-t df=1/2/3, lognormal-scaled, amax below the
1e-4 clamp, and two constructed ones: exact e4m3 rounding ties at power-of-two scales, subnormal ones
included, and blocks full of +-amax) it compares, counting differing fp8 BYTES and float32 scale WORDS:

  (a) layercast's Triton kernel (`fp8_kernels.fp8_block_quant`, the hardware-cast path `quantize.py`
      dispatches CUDA bf16 weights to; also its software-cast and grouped launches) against vLLM 0.26's
      own `vllm.utils.deep_gemm.per_block_cast_to_fp8` imported from the installed vllm: the function
      vLLM's online `fp8_per_block` quantization calls (`online/fp8.py`, `process_weights_after_loading`),
      which vLLM wraps in `torch.compile(dynamic=True)` (inductor on CUDA), and the same function's
      uncompiled body (`_torchdynamo_orig_callable`) run eagerly by torch on CUDA;
  (b) torch's CPU cast against torch's CUDA cast of the same scaled float32 values y = x * (1 / sf)
      (y computed once on the GPU, as eager torch computes it; the CPU gets a copy);
  (c) layercast's CPU torch reference (`quantize._vllm_block` on a CPU copy) against the CUDA kernel.

Every differing byte is classified against the exact round-to-nearest-even e4m3 value of the eager y
(computed exactly: y / ulp is exact, `torch.round` is half-to-even): is y an exact tie (a midpoint of two
e4m3 values), how many float32 ulps from a midpoint, in the e4m3 subnormal range (|y| < 2**-6), which side
rounded to even / away from zero, and whether the two codes are adjacent. Writes
`<date>-<device>-fp8-contract.{json,txt}` under --out-dir (and the inductor code vLLM's compiled function
ran, `...-inductor.py`).

    python bench/fp8_contract_bench.py --out-dir bench/results          # CUDA, vLLM installed
    python bench/fp8_contract_bench.py --quick --out-dir /tmp/fc        # smaller matrices
    python bench/fp8_contract_bench.py --cpu --size 8192x8192 --out-dir bench/results   # CPU only
    python bench/fp8_contract_bench.py --out-dir $OUT --vllm-source DIR  # GPU image without vLLM

On CPU there is no (b) and no kernel: it compares vLLM's function (compiled by inductor for the CPU, and
uncompiled) with layercast's CPU reference and the exact RNE, and predicts (c) with `cuda_arithmetic`.
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
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_side import fp8_kernels
from trainer_side.quantize import _vllm_block

B = 128
FP8 = torch.float8_e4m3fn
SUB = 2.0**-6  # smallest normal e4m3 magnitude: below it the grid is 2**-9 (subnormals)
SAMPLES = 16  # differing positions listed per comparison
Pair = tuple[torch.Tensor, torch.Tensor]


class Tee:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, *parts: object) -> None:
        line = " ".join(str(p) for p in parts)
        self.lines.append(line)
        print(line, flush=True)


# --- inputs -----------------------------------------------------------------------------------------


def student_t(shape: tuple[int, int], df: float, g: torch.Generator, dev: str) -> torch.Tensor:
    z = torch.randn(shape, generator=g, device=dev)
    chi2 = 2.0 * torch._standard_gamma(torch.full(shape, df / 2.0, device=dev), generator=g)
    return z / torch.sqrt(chi2 / df)


def constructed_ties(shape: tuple[int, int], g: torch.Generator, dev: str) -> torch.Tensor:
    """Per block amax = 448 * 2**k (so sf = 2**k and 1 / sf exactly, on CPU and CUDA alike) and every
    other element an exact e4m3 midpoint times 2**k: half subnormal ties (m + 0.5) * 2**-9, m = 0..7
    (y = 2**-10 rounds to +-0), a quarter in the lowest normal binade (m = 8..15), a quarter at normal
    ties (1 + (j + 0.5) / 8) * 2**e, e in [-5, 7]; random signs."""
    r, c = shape
    nb = (r // B, c // B)
    k = torch.randint(-20, 6, nb, generator=g, device=dev).float()
    scale = torch.exp2(k).repeat_interleave(B, 0).repeat_interleave(B, 1)
    m = torch.randint(0, 16, shape, generator=g, device=dev).float()
    sub = (m + 0.5) * 2.0**-9
    j = torch.randint(0, 8, shape, generator=g, device=dev).float()
    e = torch.randint(-5, 8, shape, generator=g, device=dev).float()
    normal = (1 + (j + 0.5) / 8) * torch.exp2(e)
    pick = torch.rand(shape, generator=g, device=dev)
    y = torch.where(pick < 0.75, sub, normal)
    sign = torch.where(torch.rand(shape, generator=g, device=dev) < 0.5, -1.0, 1.0)
    x = y * sign * scale
    x.view(nb[0], B, nb[1], B)[:, 0, :, 0] = 448.0 * torch.exp2(k)  # the block's amax
    return x.bfloat16()


def constructed_at_amax(shape: tuple[int, int], g: torch.Generator, dev: str) -> torch.Tensor:
    """Per block a random amax (lognormal, any bf16 mantissa); a quarter of its elements exactly +-amax,
    the rest uniform in (-amax, amax) rounded to bf16 (so also clipped near amax)."""
    r, c = shape
    nb = (r // B, c // B)
    amax = torch.exp(3 * torch.randn(nb, generator=g, device=dev)).bfloat16().float()
    amax = amax.repeat_interleave(B, 0).repeat_interleave(B, 1)
    u = (torch.rand(shape, generator=g, device=dev) * 2 - 1) * amax
    sign = torch.where(torch.rand(shape, generator=g, device=dev) < 0.5, -1.0, 1.0)
    at = torch.rand(shape, generator=g, device=dev) < 0.25
    x = torch.where(at, sign * amax, u).bfloat16()
    return torch.maximum(torch.minimum(x, amax.bfloat16()), -amax.bfloat16())


def make_input(kind: str, shape: tuple[int, int], seed: int, dev: str) -> torch.Tensor:
    g = torch.Generator(device=dev).manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g, device=dev).bfloat16()
    if kind == "normal*0.02":
        return (0.02 * torch.randn(shape, generator=g, device=dev)).bfloat16()
    if kind.startswith("student_t"):  # "student_t3" or "student_t2*0.02"
        spec = kind.removeprefix("student_t")
        df, _, mul = spec.partition("*")
        return (student_t(shape, float(df), g, dev) * float(mul or 1)).bfloat16()
    if kind == "lognormal_scaled":  # normal * exp(2 * normal): heavy tails, huge dynamic range
        z = torch.randn(shape, generator=g, device=dev)
        return (z * torch.exp(2.0 * torch.randn(shape, generator=g, device=dev))).bfloat16()
    if kind == "clamped (randn*1e-5)":  # every block amax < 1e-4: sf from the clamp, y mostly subnormal
        return (1e-5 * torch.randn(shape, generator=g, device=dev)).bfloat16()
    if kind == "constructed ties (pow2 scale)":
        return constructed_ties(shape, g, dev)
    if kind == "constructed +-amax":
        return constructed_at_amax(shape, g, dev)
    raise ValueError(kind)


# --- exact e4m3 analysis ----------------------------------------------------------------------------


def e4m3_grid(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, ulp, fulp): |y| = t * ulp exactly, ulp the e4m3 spacing at |y| (2**-9 below 2**-6),
    fulp = float32 spacing at |y| (2**-149 floor). All exact (powers of two)."""
    a = y.abs()
    _, ex = torch.frexp(a)  # a = m * 2**ex, m in [0.5, 1)
    ulp = pow2(torch.clamp(ex - 1, min=-6) - 3)
    fulp = pow2(torch.clamp(ex - 24, min=-149))
    return a / ulp, ulp, fulp


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2.0**e as float32 for integer e in [-149, 127], built from its bits (exact, no library pow)."""
    e = e.to(torch.int32)
    bits = torch.where(e >= -126, (e + 127) << 23, 1 << (e + 149).clamp(min=0, max=22))
    return bits.view(torch.float32)


def exact_rne(y: torch.Tensor) -> torch.Tensor:
    """The exact round-to-nearest-even e4m3 byte of float32 y (finite, |y| < 464), as uint8."""
    t, ulp, _ = e4m3_grid(y)
    return torch.copysign(torch.round(t) * ulp, y).to(FP8).view(torch.uint8)


def tie_stats(y: torch.Tensor, chunk: int = 1 << 25) -> dict[str, int]:
    """Whole-tensor counts: exact ties, subnormal ties, values within 4 float32 ulps of a midpoint."""
    out = {"elements": y.numel(), "ties": 0, "subnormal_ties": 0, "subnormal": 0, "within_4ulp_of_tie": 0}
    flat = y.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        v = flat[i : i + chunk]
        t, ulp, fulp = e4m3_grid(v)
        dist = (t - t.floor() - 0.5).abs() * ulp / fulp  # float32 ulps from the midpoint
        tie = dist == 0
        sub = v.abs() < SUB
        out["ties"] += int(tie.sum())
        out["subnormal_ties"] += int((tie & sub).sum())
        out["subnormal"] += int(sub.sum())
        out["within_4ulp_of_tie"] += int((dist <= 4).sum())
    return out


def code_value(c: int) -> float:
    return float(torch.tensor([c], dtype=torch.uint8).view(FP8).float())


def compare(a: Pair, b: Pair, y: torch.Tensor | None, x: torch.Tensor) -> dict[str, Any]:
    """Differing fp8 bytes and scale words of two (q, sf) results (same device), each differing byte
    classified against the exact RNE of the eager y."""
    (qa, sa), (qb, sb) = a, b
    ua, ub = qa.view(torch.uint8), qb.view(torch.uint8)
    dq = ua != ub
    ds = sa.view(torch.int32) != sb.view(torch.int32)
    n = int(dq.sum())
    res: dict[str, Any] = {"bytes": n, "scale_words": int(ds.sum()), "blocks": ds.numel()}
    if ds.any():
        res["scale_samples"] = [
            {"block": list(map(int, p)), "a": float(sa[tuple(p)]), "b": float(sb[tuple(p)])}
            for p in ds.nonzero()[:4].tolist()
        ]
    if n == 0:
        return res
    idx = dq.nonzero()
    if idx.shape[0] > 1_000_000:
        idx = idx[:1_000_000]
        res["classified"] = "first 1,000,000 differing bytes"
    r, c = idx[:, 0], idx[:, 1]
    ca, cb = ua[r, c].long(), ub[r, c].long()
    in_scale_diff = ds[r // B, c // B]
    same_sign = (ca & 0x80) == (cb & 0x80)
    adjacent = same_sign & ((ca & 0x7F) - (cb & 0x7F)).abs().eq(1)
    res.update(
        in_blocks_with_differing_scale=int(in_scale_diff.sum()),
        adjacent_codes=int(adjacent.sum()),
        a_positive=int((ca < 0x80).sum()),
    )
    if y is not None:
        yv = y[r, c].cpu() if y.device != idx.device else y[r, c]
        yv = yv.to(idx.device)
        t, ulp, fulp = e4m3_grid(yv)
        dist = ((t - t.floor() - 0.5).abs() * ulp / fulp).double()
        tie = dist == 0
        sub = yv.abs() < SUB
        rne = exact_rne(yv).long()
        res.update(
            at_exact_tie=int(tie.sum()),
            subnormal=int(sub.sum()),
            subnormal_at_tie=int((tie & sub).sum()),
            max_ulps_from_tie=float(dist.max()),
            a_is_rne=int((ca == rne).sum()),
            b_is_rne=int((cb == rne).sum()),
            # at a tie the other code is the odd neighbour: is it the one away from zero?
            a_away_at_tie=int((tie & (ca != rne) & ((ca & 0x7F) > (rne & 0x7F))).sum()),
            b_away_at_tie=int((tie & (cb != rne) & ((cb & 0x7F) > (rne & 0x7F))).sum()),
            # positions in the rows-major order a CPU cast walks: any pattern by column within a block?
            col_mod_16=torch.bincount((c % 16).cpu(), minlength=16).tolist(),
        )
        samples = []
        for i in range(min(SAMPLES, idx.shape[0])):
            yi = float(yv[i])
            samples.append(
                {
                    "row": int(r[i]),
                    "col": int(c[i]),
                    "x": float(x[r[i], c[i]].float()),
                    "y": yi,
                    "y_hex": f"{torch.tensor([yi]).view(torch.int32).item() & 0xFFFFFFFF:08x}",
                    "y/2^-9": yi / 2.0**-9,
                    "ulps_from_tie": float(dist[i]),
                    "a": f"0x{int(ca[i]):02x}={code_value(int(ca[i]))!r}",
                    "b": f"0x{int(cb[i]):02x}={code_value(int(cb[i]))!r}",
                    "rne": f"0x{int(rne[i]):02x}",
                }
            )
        res["samples"] = samples
    return res


# --- the implementations ----------------------------------------------------------------------------


def vllm_functions(source: Path | None = None) -> tuple[Callable[..., Pair], Callable[..., Pair], str]:
    """vLLM 0.26's own per_block_cast_to_fp8 (compiled, as vLLM calls it) and its uncompiled body, from
    the installed vllm; where vllm is not installed and `source` is given, from its source file instead
    (`vllm_function_from_source`)."""
    try:
        from vllm.utils import deep_gemm
    except ImportError:
        if source is None:
            raise
        fn, where = vllm_function_from_source(source)
    else:
        fn = deep_gemm.per_block_cast_to_fp8
        where = (
            f"{deep_gemm.__file__}:{fn._torchdynamo_orig_callable.__code__.co_firstlineno} (installed vllm)"
        )
    eager = fn._torchdynamo_orig_callable
    return (
        lambda x: fn(x, [B, B], use_ue8m0=False),
        lambda x: eager(x, [B, B], use_ue8m0=False),
        where,
    )


class _CudaPlatformParts:
    """What `per_block_cast_to_fp8` and `get_fp8_min_max` read from vLLM's CUDA platform (vllm 0.26
    `platforms/interface.py` defaults, which `CudaPlatform` does not override)."""

    simple_compile_backend = "inductor"

    @staticmethod
    def fp8_dtype() -> torch.dtype:
        return torch.float8_e4m3fn

    @staticmethod
    def is_fp8_fnuz() -> bool:
        return False


def vllm_function_from_source(src: Path) -> tuple[Any, str]:
    """`per_block_cast_to_fp8` executed from vLLM's own source files, copied unchanged from the vllm 0.26.0
    CUDA wheel into `src` (`deep_gemm.py`, `quant_utils.py`): the definitions it needs (`_align`,
    `_ceil_to_ue8m0`, `DEFAULT_BLOCK_SIZE`, `get_fp8_min_max`, itself with its `torch.compile(dynamic=True,
    backend=current_platform.simple_compile_backend)` decorator) are taken from the files' syntax trees
    and run as written, with the CUDA platform's values. For a machine without vLLM (the GPU image)."""
    import ast
    import hashlib

    ns: dict[str, Any] = {
        "__name__": "vllm_source_per_block_cast",
        "torch": torch,
        "current_platform": _CudaPlatformParts,
        "cdiv": lambda a, b: -(a // -b),  # vllm.utils.math_utils.cdiv
    }
    digests = []
    for fname, names in (
        ("quant_utils.py", {"get_fp8_min_max"}),
        ("deep_gemm.py", {"_ceil_to_ue8m0", "_align", "DEFAULT_BLOCK_SIZE", "per_block_cast_to_fp8"}),
    ):
        path = src / fname
        text = path.read_text()
        digests.append(f"{fname} sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")
        nodes = []
        for n in ast.parse(text).body:
            name = n.name if isinstance(n, ast.FunctionDef) else None
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name):
                name = n.targets[0].id
            if name in names:
                nodes.append(n)
        found = {n.name if isinstance(n, ast.FunctionDef) else n.targets[0].id for n in nodes}  # type: ignore[attr-defined]
        assert found == names, f"{path}: found {found}, expected {names}"
        exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), ns)
    return ns[
        "per_block_cast_to_fp8"
    ], f"{src}/deep_gemm.py (vllm not installed: source run as written; {', '.join(digests)})"


def triton_default_recip(sf: torch.Tensor) -> torch.Tensor:
    """`1.0 / sf` as Triton's default float32 `/` computes it (what inductor's generated code would use)."""
    import triton
    import triton.language as tl

    @triton.jit
    def k(s_ptr, o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        s = tl.load(s_ptr + offs, mask=offs < n, other=1.0)
        tl.store(o_ptr + offs, 1.0 / s, mask=offs < n)

    s = sf.contiguous().reshape(-1)
    o = torch.empty_like(s)
    k[(triton.cdiv(s.numel(), 1024),)](s, o, s.numel(), BLOCK=1024)
    return o.view_as(sf)


def scaled(x: torch.Tensor, sf: torch.Tensor, inv: torch.Tensor | None = None) -> torch.Tensor:
    """y = x * (1 / sf) per block, float32, as eager torch computes `x_view * (1.0 / sf)`."""
    r, c = x.shape
    inv = 1.0 / sf if inv is None else inv
    xv = x.view(r // B, B, c // B, B)
    return (xv.float() * inv.view(r // B, 1, c // B, 1)).view(r, c)


def cuda_arithmetic(x: torch.Tensor) -> Pair:
    """The eager reference with CUDA torch's arithmetic, emulated on CPU: CUDA computes `amax / 448.0` as
    `amax * float32(1 / 448)` (a CPU division by a scalar is a true division), the rest is the same
    (`1.0 / sf` correctly rounded, one float32 multiply, an RNE cast). A prediction, not a GPU run."""
    r, c = x.shape
    blocks = x.view(r // B, B, c // B, B)
    amax = blocks.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
    sf = amax * torch.tensor(fp8_kernels._INV_FP8_MAX, dtype=torch.float32)
    q = (blocks * (1.0 / sf)).to(FP8)
    return q.view(r, c), sf.view(r // B, c // B)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_case(kind: str, shape: tuple[int, int], seed: int, dev: str, fns: dict[str, Any], log: Tee) -> dict:
    t0 = time.perf_counter()
    x = make_input(kind, shape, seed, dev)
    out: dict[str, Any] = {"input": kind, "shape": list(shape), "seed": seed, "dtype": "bfloat16"}
    res: dict[str, Pair] = {}
    cuda = dev == "cuda"
    if cuda:
        res["layercast"] = fp8_kernels.fp8_block_quant(x)
        if fns.get("extra_kernels"):
            res["layercast_soft"] = fp8_kernels.fp8_block_quant(x, soft_cast=True)
            q = torch.empty_like(x, dtype=FP8)
            s = torch.empty(shape[0] // B, shape[1] // B, device=dev)
            fp8_kernels.fp8_block_quant_many([(x, q, s)])
            res["layercast_grouped"] = (q, s)
    if fns.get("vllm"):
        res["vllm_compiled"] = fns["vllm"](x)
        res["vllm_eager"] = fns["vllm_eager"](x)
    if not cuda:
        res["layercast_cpu_ref"] = _vllm_block(x, B, B, False)
        res["cuda_arithmetic_emulated_on_cpu"] = cuda_arithmetic(x)
    sync()
    base = "vllm_eager" if "vllm_eager" in res else ("layercast" if cuda else "layercast_cpu_ref")
    sf = res[base][1]
    y = scaled(x, sf)  # the eager scaled values, on dev
    out["eager_y"] = tie_stats(y)
    cmp: dict[str, Any] = {}
    # (a) the kernel against vLLM's functions (and the kernel's own variants)
    for a, b in [
        ("layercast", "vllm_compiled"),
        ("layercast", "vllm_eager"),
        ("vllm_eager", "vllm_compiled"),
        ("layercast_soft", "vllm_eager"),
        ("layercast_grouped", "layercast"),
        ("layercast_cpu_ref", "vllm_compiled"),
        ("layercast_cpu_ref", "vllm_eager"),
        ("layercast_cpu_ref", "cuda_arithmetic_emulated_on_cpu"),
    ]:
        if a in res and b in res:
            cmp[f"{a} vs {b}"] = compare(res[a], res[b], y, x)
    # sanity: the eager y, cast by torch on this device, is the eager result
    cmp[f"{dev} cast of eager y vs {base}"] = compare((y.to(FP8), sf), res[base], y, x)
    cmp[f"exact RNE of eager y vs {base}"] = compare((exact_rne(y).view(FP8), sf), res[base], y, x)
    # model: the compiled code's 1/sf is Triton's default (approximate) divide
    if "vllm_compiled" in res and cuda:
        inv_t = triton_default_recip(sf)
        inv_rn = 1.0 / sf
        nd = int((inv_t.view(torch.int32) != inv_rn.view(torch.int32)).sum())
        out["triton_default_recip_differs_in_blocks"] = nd
        y_t = scaled(x, sf, inv_t)
        cmp["model: cast of x * triton(1/sf) vs vllm_compiled"] = compare(
            (y_t.to(FP8), sf), res["vllm_compiled"], y, x
        )
        cmp["model: exact RNE of x * triton(1/sf) vs vllm_compiled"] = compare(
            (exact_rne(y_t).view(FP8), sf), res["vllm_compiled"], y, x
        )
        del y_t
    sync()
    if cuda:
        # (b) torch's CPU cast vs torch's CUDA cast of the same float32 values (eager y)
        y_cpu = y.cpu()
        t_cast = time.perf_counter()
        q_cpu = y_cpu.to(FP8)
        t_cast = time.perf_counter() - t_cast
        q_gpu = y.to(FP8)
        cmp["torch cpu cast vs torch cuda cast (same eager y)"] = compare(
            (q_cpu.to(dev), sf), (q_gpu, sf), y, x
        )
        cmp["torch cpu cast vs exact RNE"] = compare((q_cpu.to(dev), sf), (exact_rne(y).view(FP8), sf), y, x)
        del y_cpu, q_cpu, q_gpu
        # (c) layercast's CPU torch reference vs its CUDA kernel
        t_ref = time.perf_counter()
        qr, sr = _vllm_block(x.cpu(), B, B, False)
        t_ref = time.perf_counter() - t_ref
        res["layercast_cpu_ref"] = (qr.to(dev), sr.to(dev))
        cmp["layercast_cpu_ref vs layercast"] = compare(res["layercast_cpu_ref"], res["layercast"], y, x)
        if "vllm_eager" in res:
            ref = res["layercast_cpu_ref"]
            cmp["layercast_cpu_ref vs vllm_eager"] = compare(ref, res["vllm_eager"], y, x)
        out["cpu_seconds"] = {"cast": round(t_cast, 2), "reference": round(t_ref, 2)}
    out["compare"] = cmp
    out["seconds"] = round(time.perf_counter() - t0, 2)
    del res, y, x
    if cuda:
        torch.cuda.empty_cache()
    line = "  ".join(f"{k}: {v['bytes']}/{v['scale_words']}" for k, v in cmp.items())
    log(f"[{out['seconds']:6.1f}s] {kind} {shape[0]}x{shape[1]}  {line}")
    return out


def capture_inductor_code(fn: Callable[..., Pair], dev: str) -> list[str]:
    """The code inductor generates for vLLM's compiled function (its first call compiles it)."""
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(256, 384, device=dev).bfloat16()
    _, code = run_and_get_code(fn, x)
    return code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="2048x4096 instead of 8192x8192, no embedding size")
    ap.add_argument("--cpu", action="store_true", help="CPU only: layercast CPU reference vs vLLM on CPU")
    ap.add_argument("--no-embedding", action="store_true", help="skip the 151936x4096 matrices")
    ap.add_argument("--size", help="RxC of the non-embedding matrices (multiples of 128)")
    ap.add_argument(
        "--vllm-source",
        type=Path,
        help="where vllm is not installed: a folder with vllm 0.26.0's deep_gemm.py and quant_utils.py",
    )
    args = ap.parse_args()
    dev = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    log = Tee()
    date = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"
    slug = name.lower().replace(" ", "-") if dev == "cuda" else "cpu"
    cmd = "python " + shlex.join(sys.argv)
    tv = getattr(fp8_kernels.triton, "__version__", None)
    log(f"fp8_contract_bench: {name}; torch {torch.__version__}; triton {tv}; date {date}")
    log(f"command: {cmd}")
    log(f"host cpu: {_cpu_model()}; torch threads {torch.get_num_threads()}")
    fns: dict[str, Any] = {"extra_kernels": True}
    meta: dict[str, Any] = {"device": name, "date": date, "command": cmd, "torch": torch.__version__}
    meta["triton"] = tv
    meta["host_cpu"] = _cpu_model()
    try:
        try:
            import vllm

            version = vllm.__version__
        except ImportError:
            version = "0.26.0 (source files, --vllm-source)" if args.vllm_source else None
        compiled, eager, where = vllm_functions(args.vllm_source)
        fns.update(vllm=compiled, vllm_eager=eager)
        meta["vllm"] = version
        meta["vllm_function"] = where
        log(f"vllm {version}: per_block_cast_to_fp8 at {where}")
        t = time.perf_counter()
        code = capture_inductor_code(compiled, dev)
        meta["inductor_compile_seconds"] = round(time.perf_counter() - t, 1)
        ipath = args.out_dir / f"{date}-{slug}-fp8-contract-inductor.py"
        args.out_dir.mkdir(parents=True, exist_ok=True)
        ipath.write_text("\n\n# ----\n\n".join(code))
        meta["inductor_code"] = ipath.name
        keys = ("float8", "1.0 /", "/ ", "reciprocal", "div_rn", "0.002232", "448", "libdevice")
        meta["inductor_key_lines"] = sorted(
            {ln.strip() for c in code for ln in c.splitlines() if any(k in ln for k in keys) and "tl." in ln}
        )[:40]
        log("inductor lines: " + " | ".join(meta["inductor_key_lines"]))
    except ImportError as e:
        log(f"vLLM not importable ({e}): only layercast's own paths are compared")
        meta["vllm"] = None
    big = (2048, 4096) if args.quick or (dev == "cpu" and not args.size) else (8192, 8192)
    if args.size:
        big = tuple(int(v) for v in args.size.split("x"))
    emb = (151936, 4096)
    cases = [
        ("normal", big),
        ("student_t1", big),
        ("student_t2", big),
        ("student_t3", big),
        ("lognormal_scaled", big),
        ("clamped (randn*1e-5)", big),
        ("constructed ties (pow2 scale)", big),
        ("constructed +-amax", big),
    ]
    if dev == "cuda" and not (args.quick or args.no_embedding):
        cases += [("student_t2*0.02", emb)]
    results: list[dict] = []
    meta["cases"] = results
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{date}-{slug}-fp8-contract"
    for i, (kind, shape) in enumerate(cases):
        results.append(run_case(kind, shape, 1000 + i, dev, fns, log))
        stem.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")  # kept if cut short
    report(results, log)
    stem.with_suffix(".txt").write_text("\n".join(log.lines) + "\n")
    print(f"wrote {stem}.json and .txt")


def _cpu_model() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor()


def report(results: list[dict], log: Tee) -> None:
    log("")
    log("== differing fp8 bytes / scale words (a vs b), per input ==")
    keys: list[str] = []
    for r in results:
        keys += [k for k in r["compare"] if k not in keys]
    for k in keys:
        log(f"-- {k}")
        log(f"   {'input':34} {'shape':>12} {'bytes':>9} {'words':>6} {'tie':>6} {'sub':>6} {'subtie':>6} "
            f"{'adj':>6} {'a=RNE':>6} {'b=RNE':>6} {'maxulp':>7}")  # fmt: skip
        for r in results:
            v = r["compare"].get(k)
            if v is None:
                continue
            shape = "x".join(map(str, r["shape"]))
            mu = v.get("max_ulps_from_tie")
            log(
                f"   {r['input']:34} {shape:>12} {v['bytes']:>9} {v['scale_words']:>6} "
                f"{v.get('at_exact_tie', '-'):>6} {v.get('subnormal', '-'):>6} "
                f"{v.get('subnormal_at_tie', '-'):>6} "
                f"{v.get('adjacent_codes', '-'):>6} {v.get('a_is_rne', '-'):>6} {v.get('b_is_rne', '-'):>6} "
                f"{'-' if mu is None else f'{mu:g}':>7}"
            )
    log("")
    log("== eager y = x * (1/sf): exact e4m3 ties (whole tensor) ==")
    for r in results:
        e = r["eager_y"]
        shape = "x".join(map(str, r["shape"]))
        nd = r.get("triton_default_recip_differs_in_blocks")
        log(
            f"   {r['input']:34} {shape:>12} elements {e['elements']:>10} ties {e['ties']:>9} "
            f"subnormal ties {e['subnormal_ties']:>9} within 4 ulp {e['within_4ulp_of_tie']:>9}"
            + ("" if nd is None else f"  triton 1/sf differs in {nd} blocks")
        )
    log("")
    log("== samples of differing bytes (first per comparison with any) ==")
    for r in results:
        for k, v in r["compare"].items():
            for s in v.get("samples", [])[:3]:
                log(f"   {r['input']} | {k}: {s}")


if __name__ == "__main__":
    main()
