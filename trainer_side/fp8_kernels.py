"""One fused Triton kernel: HF-fp8 block quantization, bit-identical to torch-on-CUDA's reference.

The reference is vLLM's `per_block_cast_to_fp8(x, block_size, use_ue8m0=False)` (mirrored by
`trainer_side.quantize._vllm_block`) as torch computes it on a CUDA tensor. Each program owns one
`BLOCK_M x BLOCK_N` tile: it reads the tile once, writes its FP8 values once and its one float32 scale.
Every step reproduces torch's CUDA bits, op for op:

- out-of-range elements of an edge tile load as 0, exactly like the reference's zero padding;
- `amax = |x|.float().amax()` propagates NaN (taken on sign-cleared bit patterns: for non-negative
  floats integer order is float order, and every NaN sorts above +inf), then `clamp(min=1e-4)` in
  float32, which keeps NaN;
- `sf = amax / 448.0`: torch on CUDA divides by a CPU scalar as a multiply by the float32 reciprocal
  `1.0f / 448.0f` (`div_true_kernel_cuda`), so the kernel multiplies by that same constant;
- `1.0 / sf` is `sf.reciprocal() * 1.0`: an IEEE round-to-nearest division (`div_rn`), not Triton's
  default approximate `/`;
- `q = x_fp32 * (1 / sf)` is one float32 multiply (no FMA can form: nothing is added to it);
- the cast to `float8_e4m3fn`: torch uses c10's software conversion (`fp8e4m3fn_from_fp32_value`:
  round to nearest even, no saturation, `|v| >= 480` and NaN become `0x7f | sign`); the kernel uses
  the hardware `cvt.rn.satfinite` by default, which could differ only for `464 < |v| < 480` (never
  reached: `|q| <= 448` up to rounding for any finite `amax`, and `amax = inf` gives `q = 0` or NaN)
  and in NaN signs (GPU arithmetic makes canonical +NaN, so both give `0x7f`). `soft_cast=True`
  runs c10's algorithm itself in integer ops instead (about 17% slower). On H200 both matched torch
  bit for bit on every case of `bench/quant_bench.py`, inf and NaN included
  (bench/results/2026-11-22-nvidia-h200-quant.txt).

Needs a CUDA device with FP8 conversions (sm_89+) and Triton; `available()` says whether it can run.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    tl = None

FP8_DTYPE = torch.float8_e4m3fn
_INV_FP8_MAX = float(np.float32(1.0) / np.float32(448.0))  # what CUDA torch multiplies by for `/ 448.0`
_AMAX_FLOOR = float(np.float32(1e-4))  # `clamp(1e-4)` compares against float32(1e-4)
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_NUM_WARPS = 8


def available(device: torch.device | str | None = None) -> bool:
    """Whether the kernel can run on `device` (default: the current CUDA device)."""
    if triton is None or not torch.cuda.is_available():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False
    return torch.cuda.get_device_capability(dev) >= (8, 9)


def supports(x: torch.Tensor, block_size: tuple[int, int]) -> bool:
    """Whether `fp8_block_quant` handles this input (else use the eager reference)."""
    b0, b1 = block_size
    return (
        x.is_cuda
        and x.dim() == 2
        and x.dtype in _INPUT_DTYPES
        and min(x.shape) > 0
        and all(b > 0 and b & (b - 1) == 0 and b <= 256 for b in (b0, b1))
        and available(x.device)
    )


if triton is not None:

    @triton.jit
    def soft_cast_e4m3(y):
        """float32 -> float8_e4m3fn by c10's software conversion (round to nearest even, no saturation,
        |y| >= 480 and NaN -> 0x7f | sign), in integer ops."""
        bits = y.to(tl.uint32, bitcast=True)
        sign = bits & 0x80000000
        mag = bits ^ sign
        # normal fp8 range: rebias the exponent and round the mantissa to 3 bits, ties to even
        mant_odd = (mag >> 20) & 1
        normal = (mag - (120 << 23) + 0x7FFFF + mant_odd) >> 20
        # below 2**-6: let a float32 add of 2**14 round to the fp8 subnormal grid
        magic = tl.full(mag.shape, 141 << 23, tl.uint32)
        shifted = mag.to(tl.float32, bitcast=True) + magic.to(tl.float32, bitcast=True)
        sub = shifted.to(tl.uint32, bitcast=True) - (141 << 23)
        small = mag < (121 << 23)
        code = tl.where(mag >= (1087 << 20), 0x7F, tl.where(small, sub, normal))
        code = code | (sign >> 24)
        return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def _quantize_tile(x, SOFT_CAST: tl.constexpr, INV_FP8_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr):
        """(fp8 tile, float32 scale) of one float32 tile: the reference's bits (module docstring)."""
        abs_bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        amax = tl.max(tl.max(abs_bits, axis=1), axis=0).to(tl.float32, bitcast=True)
        amax = tl.maximum(amax, AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        sf = amax * INV_FP8_MAX
        inv = tl.math.div_rn(1.0, sf)
        y = x * inv

        q = soft_cast_e4m3(y) if SOFT_CAST else y.to(tl.float8e4nv)

        return q, sf

    @triton.jit
    def _fp8_block_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        flag_ptr,
        rows_total,
        cols_total,
        stride_xr,
        stride_xc,
        n_col_blocks,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SOFT_CAST: tl.constexpr,
        INV_FP8_MAX: tl.constexpr,
        AMAX_FLOOR: tl.constexpr,
        CHECK_FINITE: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_c.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < rows_total) & (cols[None, :] < cols_total)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0).to(
            tl.float32
        )

        q, sf = _quantize_tile(x, SOFT_CAST, INV_FP8_MAX, AMAX_FLOOR)
        tl.store(q_ptr + rows[:, None] * cols_total + cols[None, :], q, mask=mask)
        tl.store(s_ptr + pid_r * n_col_blocks + pid_c, sf)
        if CHECK_FINITE:
            # sf >= 1e-4 / 448 unless inf or NaN (NaN fails every comparison)
            bad = (sf != sf) | (sf > 3.0e38)
            tl.store(flag_ptr, bad.to(tl.int32), mask=bad)

    @triton.jit
    def _fp8_block_group_kernel(
        tab_ptr,
        starts_ptr,
        n_tasks,
        flag_ptr,
        X_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SOFT_CAST: tl.constexpr,
        INV_FP8_MAX: tl.constexpr,
        AMAX_FLOOR: tl.constexpr,
        CHECK_FINITE: tl.constexpr,
    ):
        # One launch for many row-major weights: program `pid` is tile `pid - starts[t]` of task t, the
        # last task whose first tile is <= pid. A task row: x, q, s addresses, rows, cols, row stride.
        pid = tl.program_id(0)
        t = 0
        for i in range(1, n_tasks):
            t += (tl.load(starts_ptr + i) <= pid).to(tl.int32)
        row = tab_ptr + t.to(tl.int64) * 6
        # `groupable` guarantees 16-byte aligned x and q and rows of a multiple of 16 elements: telling
        # the compiler lets it vectorize the loads and stores as it does for the one-weight kernel.
        x_ptr = tl.multiple_of(tl.load(row), 16).to(tl.pointer_type(X_DTYPE))
        q_ptr = tl.multiple_of(tl.load(row + 1), 16).to(tl.pointer_type(tl.float8e4nv))
        s_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        rows_total = tl.load(row + 3)
        cols_total = tl.multiple_of(tl.load(row + 4), 16)
        stride_xr = tl.multiple_of(tl.load(row + 5), 16)
        n_col_blocks = (cols_total + BLOCK_N - 1) // BLOCK_N
        local = pid - tl.load(starts_ptr + t)
        pid_r = local // n_col_blocks
        pid_c = local % n_col_blocks
        rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < rows_total) & (cols[None, :] < cols_total)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)

        q, sf = _quantize_tile(x, SOFT_CAST, INV_FP8_MAX, AMAX_FLOOR)
        tl.store(q_ptr + rows[:, None] * cols_total + cols[None, :], q, mask=mask)
        tl.store(s_ptr + pid_r * n_col_blocks + pid_c, sf)
        if CHECK_FINITE:
            bad = (sf != sf) | (sf > 3.0e38)
            tl.store(flag_ptr, bad.to(tl.int32), mask=bad)


def fp8_block_quant(
    x: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    *,
    soft_cast: bool = False,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q, sf)` of a 2-D CUDA weight: fp8 `x.shape` and float32 `(ceil(R/b0), ceil(C/b1))`.

    Bit-identical to `per_block_cast_to_fp8(x, block_size, use_ue8m0=False)` run by torch on CUDA;
    `x` may be strided (the output is contiguous). Raises `ValueError` if `supports` says no.
    """
    if not supports(x, block_size):
        raise ValueError(
            f"fp8_block_quant needs a non-empty 2-D {[str(d) for d in _INPUT_DTYPES]} CUDA tensor on "
            f"sm_89+ with Triton and power-of-two blocks <= 256; got {x.dtype} {tuple(x.shape)} on "
            f"{x.device}, block {tuple(block_size)}"
        )
    b0, b1 = block_size
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=x.device)
    sf = torch.empty((math.ceil(rows / b0), math.ceil(cols / b1)), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _launch(x, q, sf, block_size, soft_cast=soft_cast, num_warps=num_warps)
    return q, sf


def fp8_block_quant_into(
    x: torch.Tensor,
    q: torch.Tensor,
    sf: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    *,
    flag: torch.Tensor | None = None,
) -> None:
    """`fp8_block_quant(x)` written into `q` (fp8, `x.shape`, contiguous) and `sf` (float32, contiguous),
    e.g. views of a broadcast bucket. `flag` (int32, one element, same device): set to 1 when a scale
    is inf/NaN (a non-finite weight), without a host sync. The caller checks `supports(x, block_size)`."""
    with torch.cuda.device(x.device):
        _launch(x, q, sf, block_size, soft_cast=False, num_warps=DEFAULT_NUM_WARPS, flag=flag)


def _launch(
    x: torch.Tensor,
    q: torch.Tensor,
    sf: torch.Tensor,
    block_size: tuple[int, int],
    *,
    soft_cast: bool,
    num_warps: int,
    flag: torch.Tensor | None = None,
) -> None:
    """Run the kernel into preallocated `q` and `sf` (no checks; CPU tensors work under
    `TRITON_INTERPRET=1`, which the CPU tests use)."""
    assert triton is not None
    nr, nc = sf.shape
    _fp8_block_kernel[(nr, nc)](
        x,
        q,
        sf,
        sf if flag is None else flag,  # never written without CHECK_FINITE
        x.shape[0],
        x.shape[1],
        x.stride(0),
        x.stride(1),
        nc,
        BLOCK_M=block_size[0],
        BLOCK_N=block_size[1],
        SOFT_CAST=soft_cast,
        INV_FP8_MAX=_INV_FP8_MAX,
        AMAX_FLOOR=_AMAX_FLOOR,
        CHECK_FINITE=flag is not None,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )


_TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def groupable(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether `fp8_block_quant_many` takes weight `x` into `q`: rows contiguous, a multiple of 16
    elements long and apart, both tensors 16-byte aligned (every real model's linear weights)."""
    return (
        x.dim() == 2
        and x.stride(1) == 1
        and x.shape[1] % 16 == 0
        and x.stride(0) % 16 == 0
        and x.data_ptr() % 16 == 0
        and q.data_ptr() % 16 == 0
    )


def fp8_block_quant_many(
    tasks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    block_size: tuple[int, int] = (128, 128),
    *,
    flag: torch.Tensor | None = None,
    soft_cast: bool = False,
) -> None:
    """`fp8_block_quant_into(x, q, sf)` for every `(x, q, sf)` of `tasks` in one kernel launch: same bits,
    one launch instead of one per weight (the launches, not the GPU, bound a layer's worth of small
    weights). Every `x` has one dtype, is `groupable` and on one CUDA device with its `q`, `sf` (CPU
    tensors work under `TRITON_INTERPRET=1`)."""
    if not tasks:
        return
    x0 = tasks[0][0]
    b0, b1 = block_size
    table: list[int] = []
    starts: list[int] = []
    tiles = 0
    for x, q, sf in tasks:
        if x.dtype != x0.dtype or not groupable(x, q):
            raise ValueError(f"fp8_block_quant_many: {x.dtype} {tuple(x.stride())} differs from the group")
        starts.append(tiles)
        tiles += sf.numel()
        table += [x.data_ptr(), q.data_ptr(), sf.data_ptr(), x.shape[0], x.shape[1], x.stride(0)]
    dev = x0.device
    tab = torch.tensor(table, dtype=torch.int64).to(dev, non_blocking=True)
    first = torch.tensor(starts, dtype=torch.int64).to(dev, non_blocking=True)
    assert triton is not None
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _fp8_block_group_kernel[(tiles,)](
            tab,
            first,
            len(tasks),
            first if flag is None else flag,
            X_DTYPE=getattr(tl, _TL_DTYPES[x0.dtype]),
            BLOCK_M=b0,
            BLOCK_N=b1,
            SOFT_CAST=soft_cast,
            INV_FP8_MAX=_INV_FP8_MAX,
            AMAX_FLOOR=_AMAX_FLOOR,
            CHECK_FINITE=flag is not None,
            num_warps=DEFAULT_NUM_WARPS,
            enable_fp_fusion=False,
        )
