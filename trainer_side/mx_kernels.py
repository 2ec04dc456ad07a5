"""Fused Triton kernels for MXFP8 and NVFP4 weights, bit-identical to `mx_quantize` run by torch on CUDA.

`mx_quantize.quantize_mxfp8` / `quantize_nvfp4` (themselves bit for bit vLLM 0.26's references) take
five to a dozen elementwise passes over a weight; these kernels read it once and write the stored bytes
once. Each program owns a `BLOCK_M x BLOCK_K` tile (whole 32- or 16-element groups of a row) and repeats
the reference's float32 operations one for one, with no FMA contraction (`enable_fp_fusion=False`):

- group amax: a max of sign-cleared bit patterns (integer order is float order for non-negative floats,
  and NaN sorts above inf, as torch's max propagates it), then the reference's clamps;
- MXFP8: `floor(log2(amax))` with a selectable log2 (`LOG2_*`: Triton's `tl.log2`, libdevice's
  `log2f`, or the exponent field). Which one equals torch's CUDA `log2` was measured, not read:
  `bench/mx_quant_bench.py` runs every positive float32 as a group max through the kernel against
  torch on the GPU. On an H200 `tl.log2` and libdevice both matched all 2**31; the exponent field
  differed on 7360 values just below powers of two, where log2 rounds up to the integer (so vLLM's
  rule is not "the exponent of amax"). `exp2(e - 127)` is built from its bits (exact); `x / 2**e` is an
  IEEE division (`div_rn`);
- NVFP4: `g * (bmax * float32(1/6))`, clamp, cast to e4m3 and back, the reference's
  `1 / (x + (x == 0) * 1e8)` twice as IEEE divisions, one multiply, clamp to +-6, E2M1 codes by the
  thresholds of `cast_to_fp4`, two codes per byte (even element in the low nibble);
- e4m3 casts: the hardware `cvt.rn.satfinite` (every value cast here is within +-448 up to rounding, where
  it equals c10's software conversion torch uses) or, with `SOFT_CAST`, c10's algorithm in integer ops
  (`fp8_kernels.soft_cast_e4m3`; Triton's interpreter, which the CPU tests use, casts fp8 wrongly).

Non-finite weights set `flag` (no host sync); their outputs are unspecified (the callers refuse them).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from trainer_side.fp8_kernels import available, tl, triton

MXFP8_GROUP = 32
NVFP4_GROUP = 16
LOG2_TRITON = 0  # tl.log2
LOG2_LIBDEVICE = 1  # libdevice log2f (the CUDA math library's)
LOG2_EXPONENT = 2  # the exponent field: the exact floor(log2) of a normal float
LOG2_NAMES = {LOG2_TRITON: "tl.log2", LOG2_LIBDEVICE: "libdevice.log2", LOG2_EXPONENT: "exponent field"}
# Equal to torch's CUDA floor(log2) for every positive float32 on an H200 (bench/mx_quant_bench.py); it
# also runs under Triton's interpreter (numpy's log2), which libdevice does not.
DEFAULT_LOG2 = LOG2_TRITON
_INV_E2M1_MAX = float(np.float32(1.0 / 6.0))  # the reference's `* (1 / 6.0)` on a float32 tensor
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Tiles (rows, columns per program): the fastest on an H200 (bench/results/*-nvidia-h200-mx-quant.txt)
MXFP8_BLOCK = (8, 512)
NVFP4_BLOCK = (16, 256)
_NUM_WARPS = 4


def supports(x: torch.Tensor, group: int) -> bool:
    """Whether the kernels take `x` (a non-empty 2-D CUDA weight whose rows are whole groups)."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.dtype in _INPUT_DTYPES
        and min(x.shape) > 0
        and x.shape[1] % group == 0
        and available(x.device)
    )


if triton is not None:
    from triton.language.extra import libdevice

    from trainer_side.fp8_kernels import soft_cast_e4m3

    @triton.jit
    def _group_amax(x, BLOCK_M: tl.constexpr, N_GROUPS: tl.constexpr, GROUP: tl.constexpr):
        """(groups [BLOCK_M, N_GROUPS, GROUP] float32, max |x| per group as int32 bit patterns)."""
        xg = tl.reshape(x, (BLOCK_M, N_GROUPS, GROUP))
        bits = xg.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        return xg, tl.max(bits, axis=2)

    @triton.jit
    def _floor_log2(amax, LOG2: tl.constexpr):
        if LOG2 == 0:
            e = tl.floor(tl.log2(amax))
        elif LOG2 == 1:
            e = tl.floor(libdevice.log2(amax))
        else:
            e = (((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127).to(tl.float32)
        return e

    @triton.jit
    def _set_flag(flag_ptr, bad):
        any_bad = tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0)
        tl.store(flag_ptr, any_bad, mask=any_bad > 0)

    @triton.jit
    def _mxfp8_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        flag_ptr,
        rows_total,
        cols_total,
        stride_xr,
        stride_xc,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        LOG2: tl.constexpr,
        SOFT_CAST: tl.constexpr,
        CHECK_FINITE: tl.constexpr,
    ):
        N_GROUPS: tl.constexpr = BLOCK_K // 32
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < rows_total) & (cols[None, :] < cols_total)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
        xg, amax_bits = _group_amax(x.to(tl.float32), BLOCK_M, N_GROUPS, 32)
        # clamp(min=finfo(float32).tiny); NaN bit patterns stay above it
        amax = tl.maximum(amax_bits, 0x00800000).to(tl.float32, bitcast=True)
        biased = tl.minimum(tl.maximum(_floor_log2(amax, LOG2) + 127.0, 0.0), 254.0)
        descale = (biased.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # exp2(biased - 127), exact
        y = tl.reshape(tl.math.div_rn(xg, descale[:, :, None]), (BLOCK_M, BLOCK_K))
        q = soft_cast_e4m3(y) if SOFT_CAST else y.to(tl.float8e4nv)
        tl.store(q_ptr + rows[:, None] * cols_total + cols[None, :], q, mask=mask)
        n_groups_total = cols_total // 32
        gcols = tl.program_id(1).to(tl.int64) * N_GROUPS + tl.arange(0, N_GROUPS)
        gmask = (rows[:, None] < rows_total) & (gcols[None, :] < n_groups_total)
        tl.store(s_ptr + rows[:, None] * n_groups_total + gcols[None, :], biased.to(tl.uint8), mask=gmask)
        if CHECK_FINITE:
            _set_flag(flag_ptr, amax_bits >= 0x7F800000)

    @triton.jit
    def _nvfp4_kernel(
        x_ptr,
        g_ptr,
        p_ptr,
        s_ptr,
        flag_ptr,
        rows_total,
        cols_total,
        stride_xr,
        stride_xc,
        INV_E2M1_MAX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SOFT_CAST: tl.constexpr,
        CHECK_FINITE: tl.constexpr,
    ):
        N_GROUPS: tl.constexpr = BLOCK_K // 16
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < rows_total) & (cols[None, :] < cols_total)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
        xg, bmax_bits = _group_amax(x.to(tl.float32), BLOCK_M, N_GROUPS, 16)
        bmax = bmax_bits.to(tl.float32, bitcast=True)
        g = tl.load(g_ptr)
        s = g * (bmax * INV_E2M1_MAX)
        s = tl.minimum(
            tl.maximum(s, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0, propagate_nan=tl.PropagateNan.ALL
        )
        s8 = soft_cast_e4m3(s) if SOFT_CAST else s.to(tl.float8e4nv)
        sf = s8.to(tl.float32)
        g_safe = g + (g == 0).to(tl.float32) * 1e8
        prod = sf * tl.math.div_rn(1.0, g_safe)
        out_scale = tl.math.div_rn(1.0, prod + (prod == 0).to(tl.float32) * 1e8)
        v = xg * out_scale[:, :, None]
        v = tl.minimum(
            tl.maximum(v, -6.0, propagate_nan=tl.PropagateNan.ALL), 6.0, propagate_nan=tl.PropagateNan.ALL
        )
        a = tl.abs(v)
        mag = (
            (a > 0.25).to(tl.int32)
            + (a >= 0.75).to(tl.int32)
            + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32)
            + (a > 2.5).to(tl.int32)
            + (a >= 3.5).to(tl.int32)
            + (a > 5.0).to(tl.int32)
        )
        codes = tl.reshape(mag | ((v < 0).to(tl.int32) << 3), (BLOCK_M, BLOCK_K // 2, 2))
        lo, hi = tl.split(codes)
        packed = (lo | (hi << 4)).to(tl.uint8)
        half = cols_total // 2
        pcols = tl.program_id(1).to(tl.int64) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        pmask = (rows[:, None] < rows_total) & (pcols[None, :] < half)
        tl.store(p_ptr + rows[:, None] * half + pcols[None, :], packed, mask=pmask)
        n_groups_total = cols_total // 16
        gcols = tl.program_id(1).to(tl.int64) * N_GROUPS + tl.arange(0, N_GROUPS)
        gmask = (rows[:, None] < rows_total) & (gcols[None, :] < n_groups_total)
        tl.store(s_ptr + rows[:, None] * n_groups_total + gcols[None, :], s8, mask=gmask)
        if CHECK_FINITE:
            _set_flag(flag_ptr, bmax_bits >= 0x7F800000)


def _grid(x: torch.Tensor, block_m: int, block_k: int) -> tuple[int, int]:
    return (-(-x.shape[0] // block_m), -(-x.shape[1] // block_k))


def _device(x: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def mxfp8_quant_into(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    *,
    flag: torch.Tensor | None = None,
    log2: int = DEFAULT_LOG2,
    soft_cast: bool = False,
    block: tuple[int, int] = MXFP8_BLOCK,
    num_warps: int = _NUM_WARPS,
) -> None:
    """`quantize_mxfp8(x)` written into contiguous `q` (float8_e4m3fn, `x.shape`) and `scale` (uint8,
    `(rows, cols / 32)`), e.g. views of a bucket. `flag` (int32, one element): set nonzero when a group
    holds inf/NaN. The caller checks `supports(x, 32)` (CPU tensors work under `TRITON_INTERPRET=1`)."""
    assert triton is not None
    block_m, block_k = block
    with _device(x):
        _mxfp8_kernel[_grid(x, block_m, block_k)](
            x,
            q,
            scale,
            scale if flag is None else flag,  # never written without CHECK_FINITE
            x.shape[0],
            x.shape[1],
            x.stride(0),
            x.stride(1),
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            LOG2=log2,
            SOFT_CAST=soft_cast,
            CHECK_FINITE=flag is not None,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )


def nvfp4_quant_into(
    x: torch.Tensor,
    g: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    *,
    flag: torch.Tensor | None = None,
    soft_cast: bool = False,
    block: tuple[int, int] = NVFP4_BLOCK,
    num_warps: int = _NUM_WARPS,
) -> None:
    """The packed E2M1 bytes and e4m3 block scales of `quantize_nvfp4(x)` for global scale `g` (float32,
    one element, on `x`'s device) written into contiguous `packed` (uint8, `(rows, cols / 2)`) and
    `scale` (float8_e4m3fn, `(rows, cols / 16)`). `flag` as for `mxfp8_quant_into`. `block` (rows,
    columns per program; powers of two, columns a multiple of 32) and `num_warps` only change speed."""
    assert triton is not None
    block_m, block_k = block
    with _device(x):
        _nvfp4_kernel[_grid(x, block_m, block_k)](
            x,
            g,
            packed,
            scale,
            packed if flag is None else flag,
            x.shape[0],
            x.shape[1],
            x.stride(0),
            x.stride(1),
            INV_E2M1_MAX=_INV_E2M1_MAX,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            SOFT_CAST=soft_cast,
            CHECK_FINITE=flag is not None,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )


def mxfp8_quant(x: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values, uint8 E8M0 scales) of `x`: `quantize_mxfp8(x)`'s bits in one pass."""
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, cols // MXFP8_GROUP), dtype=torch.uint8, device=x.device)
    mxfp8_quant_into(x, q, scale, **kwargs)  # type: ignore[arg-type]
    return q, scale


def nvfp4_quant(x: torch.Tensor, g: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 E2M1, float8_e4m3fn block scales) of `x` under global scale `g`, in one pass."""
    rows, cols = x.shape
    packed = torch.empty((rows, cols // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((rows, cols // NVFP4_GROUP), dtype=torch.float8_e4m3fn, device=x.device)
    nvfp4_quant_into(x, g.reshape(1), packed, scale, **kwargs)  # type: ignore[arg-type]
    return packed, scale
