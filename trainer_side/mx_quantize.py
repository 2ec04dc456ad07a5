"""MXFP8 and NVFP4 weight quantizers: pure functions, bit for bit vLLM 0.26's reference quantizers.

- MXFP8 (`quantize_mxfp8`): `mxfp8_utils._mxfp8_e4m3_quantize_torch`, what vLLM runs wherever
  FlashInfer does not (Hopper, CPU; the online `--quantization mxfp8` path too). Per 32 elements of a
  row: `amax` (float32, clamped to the smallest normal float32), E8M0 exponent
  `e = clamp(floor(log2(amax)) + 127, 0, 254)` stored as uint8, values `(x / 2**(e - 127))` cast to
  float8_e4m3fn. Note the rule keeps the block's largest value in [1, 2); the OCP rule (compressed-
  tensors' `generate_mx_scales`) subtracts 8 more from the exponent, so its bits differ.
- NVFP4 (`quantize_nvfp4`): the global scale of vLLM's online NVFP4 method
  (`_quantize_moe_weight_to_nvfp4`: `g = 6 * 448 / max(amax, 1e-8)`, float32) and the block math of
  `nvfp4_emulation_utils.ref_nvfp4_quant`: per 16 elements `s = fp8(clamp(g * (bmax * (1/6)), ±448))`,
  values `clamp(x * 1/(s * 1/g), ±6)` rounded to E2M1 by `cast_to_fp4`'s thresholds, then packed two
  per byte, the even element in the low nibble (compressed-tensors' `pack_fp4_to_uint8`, vLLM's
  `break_fp4_bytes`). The online method's CUDA kernel first folds `g` into the bf16 weight, which
  rounds; this module follows the exact-arithmetic reference instead.

Both refuse inf/NaN weights and input dims that are not a multiple of the group size, as vLLM does.
"""

from __future__ import annotations

import torch

MXFP8_GROUP = 32
NVFP4_GROUP = 16
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
E2M1_MAX = 6.0
E8M0_DTYPE = torch.uint8  # vLLM's MXFP8_SCALE_DTYPE: the biased exponent as a plain byte
NVFP4_PACKED_DTYPE = torch.uint8
_NVFP4_AMAX_FLOOR = 1e-8  # the online NVFP4 method's clamp_min
_FP32_TINY = torch.finfo(torch.float32).tiny


def _check(weight: torch.Tensor, group: int, fmt: str) -> None:
    if weight.ndim != 2:
        raise ValueError(f"{fmt} quantizes 2-D weights, got shape {tuple(weight.shape)}")
    if weight.shape[1] % group:
        raise ValueError(
            f"{fmt} needs the input dim to be a multiple of {group}, got shape {tuple(weight.shape)} "
            "(vLLM refuses such a layer too)"
        )


def non_finite_error(weight: torch.Tensor, fmt: str) -> ValueError:
    """The error for a weight holding inf or NaN (raised by the quantizers and the fused kernels' callers)."""
    shape = tuple(weight.shape)
    return ValueError(f"weight of shape {shape} holds inf or NaN; refusing to quantize it to {fmt}")


def _refuse_non_finite(amax: torch.Tensor, weight: torch.Tensor, fmt: str) -> None:
    if not bool(torch.isfinite(amax).all()):
        raise non_finite_error(weight, fmt)


def quantize_mxfp8(weight: torch.Tensor, *, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values [M, K], uint8 E8M0 scales [M, K/32]) of a 2-D weight."""
    _check(weight, MXFP8_GROUP, "MXFP8")
    rows, cols = weight.shape
    blocks = weight.to(torch.float32).view(rows, cols // MXFP8_GROUP, MXFP8_GROUP)
    amax = blocks.abs().amax(dim=-1)
    if check_finite:
        _refuse_non_finite(amax, weight, "MXFP8")
    biased = (torch.floor(torch.log2(amax.clamp(min=_FP32_TINY))) + 127.0).clamp(0, 254)
    values = (blocks / torch.exp2(biased - 127.0).unsqueeze(-1)).view(rows, cols).to(FP8_DTYPE)
    return values, biased.to(E8M0_DTYPE)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The NVFP4 global scale `g` (float32; the dequant multiplier is 1/g) for a tensor of max |x| `amax`."""
    return (E2M1_MAX * FP8_MAX) / amax.to(torch.float32).clamp_min(_NVFP4_AMAX_FLOOR)


def tensor_amax(weight: torch.Tensor) -> torch.Tensor:
    """max |x| of `weight` as a float32 scalar (exact: a max of values, then a widening cast)."""
    return weight.abs().amax().to(torch.float32)


def _reciprocal(x: torch.Tensor) -> torch.Tensor:
    # nvfp4_emulation_utils.get_reciprocal: 1/x, and 1/(x + 1e8) where x == 0
    return 1.0 / (x + (x == 0) * 1e8)


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (sign << 3 | magnitude index) of values clamped to [-6, 6], rounded as
    `cast_to_fp4` rounds them (ties at 0.25, 1.75, 2.5, 5.0 go down; at 0.75, 1.25, 3.5 go up)."""
    a = x.abs()
    mag = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75).to(torch.uint8)
        + (a > 1.25).to(torch.uint8)
        + (a >= 1.75).to(torch.uint8)
        + (a > 2.5).to(torch.uint8)
        + (a >= 3.5).to(torch.uint8)
        + (a > 5.0).to(torch.uint8)
    )
    # cast_to_fp4 returns |q| * sign(x): negative x (even when |q| is 0) gives a negative result,
    # but x = -0.0 has sign(x) = +0.0 and so gives +0.0.
    return mag | ((x < 0).to(torch.uint8) << 3)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes [M, K] two per byte [M, K/2]: element 2j in the low nibble, 2j+1 in the high."""
    pairs = codes.view(codes.shape[0], codes.shape[1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def quantize_nvfp4(
    weight: torch.Tensor, global_amax: torch.Tensor | None = None, *, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed E2M1 uint8 [M, K/2], float8_e4m3fn block scales [M, K/16], float32 global scale g, shape ())
    of a 2-D weight.

    `global_amax` is max |x| over every tensor sharing the global scale (the shards of one fused vLLM
    module, or the whole of an FSDP-sharded weight); None means this weight alone. It must cover
    this weight: a block above it would be clamped, so that raises `ValueError`.
    """
    _check(weight, NVFP4_GROUP, "NVFP4")
    rows, cols = weight.shape
    blocks = weight.view(rows, cols // NVFP4_GROUP, NVFP4_GROUP)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    amax = block_amax.amax() if global_amax is None else global_amax.to(torch.float32).reshape(())
    if check_finite:
        _refuse_non_finite(amax, weight, "NVFP4")
        if global_amax is not None and bool((block_amax > amax).any()):
            raise ValueError(f"global_amax {float(amax)} is below max |x| of this weight")
    g = nvfp4_global_scale(amax)
    scale = torch.clamp(g * (block_amax * (1.0 / E2M1_MAX)), min=-FP8_MAX, max=FP8_MAX).to(FP8_DTYPE)
    scaled = blocks.to(torch.float32) * _reciprocal(scale.to(torch.float32) * _reciprocal(g))
    codes = _e2m1_codes(torch.clamp(scaled, -E2M1_MAX, E2M1_MAX).view(rows, cols))
    return pack_e2m1(codes), scale.view(rows, cols // NVFP4_GROUP), g
