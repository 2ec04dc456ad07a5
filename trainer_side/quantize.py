"""Quantize one linear weight into exactly the tensors an FP8 checkpoint of a `QuantScheme` stores.

Each (kind, source) pair reproduces, bit for bit, the installed reference that writes (or, in vLLM,
online-quantizes) that checkpoint format:

- `fp8_block`, HF `fp8`: `vllm.utils.deep_gemm.per_block_cast_to_fp8` (what vLLM's online block
  quantizer calls): zero-pad to whole blocks, amax in fp32 clamped to >= 1e-4, `sf = amax / 448`
  (optionally rounded up to a power of two for `ue8m0_scale`), `q = (x * (1 / sf)).to(fp8)` with no
  clamp; `weight_scale_inv` is `sf` (the dequant multiplier, despite the name), float32.
- compressed-tensors (`block`, `channel`, `tensor`): `calculate_qparams` + `quantize` as the
  float-quantized compressor calls them: `s = amax / 448`, `s == 0 -> finfo(float32).eps`,
  `q = clamp(x / s + zero_point, -448, 448).to(fp8)`. Statistics are taken in float32, so `s` is
  float32; llm-compressor observes in the weight dtype and would store bf16 scales for a bf16 model.
- `fp8_channel`, `fbgemm_fp8` and `fp8_tensor`, HF `fp8`: vLLM's `scaled_fp8_quant` (dynamic
  per-token / per-tensor, as `QuantFP8.forward_native` spells it in torch): `s = max(amax / 448,
  1 / (448 * 512))`, `q = clamp(x.float() * s.reciprocal(), -448, 448).to(fp8)`.

Weights holding inf or NaN raise `ValueError` instead of producing a garbage checkpoint.

`mxfp8` and `nvfp4` go to `trainer_side.mx_quantize` (bit for bit vLLM 0.26's references); the tensor
names follow the checkpoint format (`mx_tensor_names`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import cache, partial

import torch
import torch.nn.functional as F

from configs.quant import QuantScheme
from trainer_side import mx_quantize
from trainer_side.detect import UnsupportedQuantization

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
SCALE_DTYPE = torch.float32
_BLOCK_AMAX_FLOOR = 1e-4  # per_block_cast_to_fp8's clamp
_VLLM_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # input_quant_fp8._FP8_MIN_SCALING_FACTOR
_CT_ZERO_SCALE = torch.finfo(SCALE_DTYPE).eps  # compressed_tensors _get_dtype_eps(float32)
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

Core = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Weights up to this size share one Triton launch in `quantize_many_into` (a 4096x4096 matrix: about
# 15 us of H200 time, less than launching its own kernel costs the host); larger ones get their own.
GROUP_MAX_NUMEL = 1 << 24


def _pad_to_blocks(x: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    rows, cols = x.shape
    pad_rows, pad_cols = -rows % b0, -cols % b1
    return F.pad(x, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else x.contiguous()


def _vllm_block(x: torch.Tensor, b0: int, b1: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    padded = _pad_to_blocks(x, b0, b1)
    blocks = padded.view(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1)
    amax = blocks.abs().float().amax(dim=(1, 3), keepdim=True).clamp(_BLOCK_AMAX_FLOOR)
    sf = amax / FP8_MAX
    if ue8m0:
        sf = torch.pow(2.0, torch.ceil(torch.log2(sf.abs())))
    q = (blocks * (1.0 / sf)).to(FP8_DTYPE)
    return q.view_as(padded)[:rows, :cols].contiguous(), sf.view(blocks.shape[0], blocks.shape[2])


def _ct_cast(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = amax / FP8_MAX
    scale = torch.where(scale == 0, torch.full_like(scale, _CT_ZERO_SCALE), scale)
    scaled = x / scale
    # compressed-tensors adds its all-zero zero_point: -0.0 becomes +0.0, nothing else changes.
    scaled = torch.where(scaled == 0, torch.zeros_like(scaled), scaled)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _ct_block(x: torch.Tensor, b0: int, b1: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    padded = _pad_to_blocks(x, b0, b1)
    blocks = padded.view(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1)
    q, scale = _ct_cast(blocks, blocks.abs().float().amax(dim=(1, 3), keepdim=True))
    return q.view_as(padded)[:rows, :cols].contiguous(), scale.view(blocks.shape[0], blocks.shape[2])


def _ct_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _ct_cast(x, x.abs().float().amax(dim=1, keepdim=True))


def _ct_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = _ct_cast(x, x.abs().float().amax().reshape(1, 1))
    return q, scale.reshape(1)


def _vllm_cast(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (amax / FP8_MAX).clamp(min=_VLLM_MIN_SCALE)
    q = (x.to(torch.float32) * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _vllm_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _vllm_cast(x, x.abs().amax(dim=1, keepdim=True).to(torch.float32))


def _vllm_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = _vllm_cast(x, x.abs().max().reshape(1, 1).to(torch.float32))
    return q, scale.reshape(())


def _core(scheme: QuantScheme) -> Core:
    if scheme.kind == "fp8_block":
        assert scheme.block_size is not None
        b0, b1 = scheme.block_size
        if scheme.source == "compressed-tensors":
            return partial(_ct_block, b0=b0, b1=b1)
        return partial(_vllm_block, b0=b0, b1=b1, ue8m0=scheme.ue8m0_scale)
    if scheme.kind == "fp8_channel":
        return _ct_channel if scheme.source == "compressed-tensors" else _vllm_per_token
    if scheme.kind == "fp8_tensor":
        if scheme.source == "compressed-tensors":
            return _ct_tensor
        return _vllm_per_tensor
    raise UnsupportedQuantization(f"quantizing weights to {scheme.kind!r} is not implemented")


@cache
def _compiled_vllm_block() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    # Compiled as vLLM compiles per_block_cast_to_fp8 (dynamic=True). NOT always the eager bits: on an
    # H200 (bench/results/2026-11-22-nvidia-h200-quant.txt) it differed from eager in 2 of 16.8M and 1
    # of 4.2M fp8 bytes (scales equal); see docs/numerics.md. One function object, one recompile budget.
    return torch.compile(_vllm_block, dynamic=True)


def _compiled(core: Core) -> Core:
    if isinstance(core, partial) and core.func is _vllm_block:
        return partial(_compiled_vllm_block(), **core.keywords)
    # Measured on H100: inductor gains nothing on the other cores, and for float32 input it changes
    # bits of vLLM's own per-token/per-tensor op relative to eager; so they always run eager.
    return core


def _fused_block(weight: torch.Tensor, scheme: QuantScheme) -> Core | None:
    """HF-fp8 blocks (not ue8m0) of a CUDA weight go to the fused Triton kernel when it can run there:
    same bits as `_vllm_block` on CUDA (tests/test_fp8_kernels.py), one read and one write."""
    if not weight.is_cuda or scheme.kind != "fp8_block" or scheme.source == "compressed-tensors":
        return None
    if scheme.ue8m0_scale or scheme.block_size is None:
        return None
    from trainer_side import fp8_kernels

    if not fp8_kernels.supports(weight, scheme.block_size):
        return None
    return partial(fp8_kernels.fp8_block_quant, block_size=scheme.block_size)


def _scale_shape(rows: int, cols: int, scheme: QuantScheme) -> tuple[int, ...]:
    if scheme.kind == "fp8_block":
        assert scheme.block_size is not None
        return (math.ceil(rows / scheme.block_size[0]), math.ceil(cols / scheme.block_size[1]))
    if scheme.kind == "fp8_channel":
        return (rows, 1)
    if scheme.kind == "fp8_tensor":
        return () if scheme.scale_shape == "scalar" else (1,)
    raise UnsupportedQuantization(f"quantizing weights to {scheme.kind!r} is not implemented")


def _check_input(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"a linear weight must be a non-empty 2-D tensor, got shape {tuple(shape)}")
    if dtype not in _INPUT_DTYPES:
        raise ValueError(f"can only quantize {[str(d) for d in _INPUT_DTYPES]} weights, got {dtype}")


def mx_tensor_names(scheme: QuantScheme) -> tuple[str, ...]:
    """Checkpoint suffixes of one MXFP8 / NVFP4 linear weight, in stream order.

    MXFP8 (compressed-tensors and ModelOpt): `weight` (e4m3), `weight_scale` (E8M0 as uint8).
    NVFP4, compressed-tensors: `weight_packed`, `weight_scale` (e4m3), `weight_global_scale` (g, (1,));
    ModelOpt: `weight`, `weight_scale`, `weight_scale_2` (1/g, shape ()).
    """
    if scheme.kind == "mxfp8":
        return ("weight", "weight_scale")
    if scheme.source == "compressed-tensors":
        return ("weight_packed", "weight_scale", "weight_global_scale")
    return ("weight", "weight_scale", "weight_scale_2")


def _mx_specs(rows: int, cols: int, scheme: QuantScheme) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    if scheme.kind == "nvfp4" and scheme.has_input_scale:
        # vLLM's W4A4 loaders need the calibrated input global scale of every linear; without it the
        # layerwise reload would process the layer with an uninitialised one.
        raise UnsupportedQuantization(
            f"NVFP4 with static input activations ({scheme.source} {scheme.format}) needs calibrated input "
            "global scales, which the trainer cannot compute; serve the weight-only form (compressed-tensors "
            "NVFP4A16 or ModelOpt W4A16_NVFP4)"
        )
    group = scheme.group_size or 0
    if cols % group:
        raise ValueError(
            f"{scheme.kind} needs the input dim to be a multiple of {group}, got shape {(rows, cols)} "
            "(vLLM refuses such a layer too)"
        )
    if scheme.kind == "mxfp8":
        dtypes_shapes = [(FP8_DTYPE, (rows, cols)), (mx_quantize.E8M0_DTYPE, (rows, cols // group))]
    else:
        global_shape = (1,) if scheme.source == "compressed-tensors" else ()
        dtypes_shapes = [
            (mx_quantize.NVFP4_PACKED_DTYPE, (rows, cols // 2)),
            (FP8_DTYPE, (rows, cols // group)),
            (SCALE_DTYPE, global_shape),
        ]
    return dict(zip(mx_tensor_names(scheme), dtypes_shapes, strict=True))


def _mx_kernel_ok(weight: torch.Tensor, scheme: QuantScheme) -> bool:
    """Whether the fused MXFP8 / NVFP4 Triton kernels of `mx_kernels` take this weight (same bits)."""
    if not weight.is_cuda:
        return False
    from trainer_side import mx_kernels

    return mx_kernels.supports(weight, scheme.group_size or 0)


def _nvfp4_global(weight: torch.Tensor, global_amax: torch.Tensor | None, check_finite: bool) -> torch.Tensor:
    """g for the NVFP4 kernel; with `check_finite`, refusing what `mx_quantize.quantize_nvfp4` refuses (one
    host sync). The weight's own amax is only read when needed: no global one given, or checking."""
    own = mx_quantize.tensor_amax(weight) if global_amax is None or check_finite else None
    amax = own if global_amax is None else global_amax.to(torch.float32).reshape(())
    assert amax is not None
    if check_finite:
        assert own is not None
        mx_quantize._refuse_non_finite(own, weight, "NVFP4")
        mx_quantize._refuse_non_finite(amax, weight, "NVFP4")
        if global_amax is not None and bool(own > amax):
            raise ValueError(f"global_amax {float(amax)} is below max |x| of this weight")
    return mx_quantize.nvfp4_global_scale(amax)


def _stored_global(g: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """What the checkpoint stores for NVFP4 global scale g: compressed-tensors g as (1,), ModelOpt 1/g."""
    return g.reshape(1) if scheme.source == "compressed-tensors" else (1.0 / g).to(SCALE_DTYPE)


def _in_place_ok(weight: torch.Tensor, *outs: torch.Tensor) -> bool:
    """Whether a kernel reading `weight` can write `outs` directly: contiguous, on the weight's device."""
    return all(t.device == weight.device and t.is_contiguous() for t in outs)


def _flag_non_finite(flag: torch.Tensor, t: torch.Tensor) -> None:
    """Set `flag` when `t` holds inf or NaN (no host sync)."""
    flag.bitwise_or_((~torch.isfinite(t)).any().to(flag.device, flag.dtype))


def _quantize_mx(
    weight: torch.Tensor, scheme: QuantScheme, global_amax: torch.Tensor | None, check_finite: bool
) -> dict[str, torch.Tensor]:
    names = mx_tensor_names(scheme)
    kernel = _mx_kernel_ok(weight, scheme)
    if scheme.kind == "mxfp8":
        if not kernel:
            return dict(
                zip(names, mx_quantize.quantize_mxfp8(weight, check_finite=check_finite), strict=True)
            )
        from trainer_side import mx_kernels

        flag = torch.zeros(1, dtype=torch.int32, device=weight.device) if check_finite else None
        q, s = mx_kernels.mxfp8_quant(weight, flag=flag)
        if flag is not None and int(flag):
            raise mx_quantize.non_finite_error(weight, "MXFP8")
        return dict(zip(names, (q, s), strict=True))
    if kernel:
        from trainer_side import mx_kernels

        g = _nvfp4_global(weight, global_amax, check_finite)
        packed, scale = mx_kernels.nvfp4_quant(weight, g)
    else:
        packed, scale, g = mx_quantize.quantize_nvfp4(weight, global_amax, check_finite=check_finite)
    return dict(zip(names, (packed, scale, _stored_global(g, scheme)), strict=True))


def quantized_specs(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, scheme: QuantScheme
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Suffix -> (dtype, shape) of what `quantize_weight` returns for such a weight; reads no data."""
    shape = tuple(shape)
    if not scheme.quantized:
        return {"weight": (dtype, shape)}
    _check_input(shape, dtype)
    if scheme.kind in ("mxfp8", "nvfp4"):
        return _mx_specs(shape[0], shape[1], scheme)
    return {
        "weight": (FP8_DTYPE, shape),
        scheme.weight_scale_name: (SCALE_DTYPE, _scale_shape(shape[0], shape[1], scheme)),
    }


def quantize_weight(
    weight: torch.Tensor,
    scheme: QuantScheme,
    *,
    compiled: bool = False,
    check_finite: bool = True,
    global_amax: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one linear weight (out, in) under `scheme`, keyed by suffix.

    `{"weight": fp8 (out, in), scheme.weight_scale_name: float32 scale}`; an unquantized scheme
    returns the weight itself. `compiled=True` runs the HF-fp8 block math through `torch.compile`
    (off by default: on H100 it measured no faster than eager; on CUDA it may differ from eager in a
    few bytes per ten million, docs/numerics.md). On CUDA,
    HF-fp8 blocks (not ue8m0) run the fused Triton kernel of `fp8_kernels`, same bits. Bits follow the
    reference run on the same device: CUDA computes `t / 448.0` as `t * (1 / 448.0)`, CPU divides.
    `check_finite` raises `ValueError` on inf/NaN weights (seen in the scales, which any non-finite
    value poisons; costs one host sync).

    MXFP8 / NVFP4 return the tensors of `mx_tensor_names`. `global_amax` (NVFP4 only) is max |x| over
    every tensor sharing this weight's global scale (the shards of one fused vLLM module, all of an
    FSDP-sharded weight); None uses this weight alone.
    """
    if not scheme.quantized:
        return {"weight": weight}
    _check_input(tuple(weight.shape), weight.dtype)
    if scheme.kind in ("mxfp8", "nvfp4"):
        return _quantize_mx(weight, scheme, global_amax, check_finite)
    if global_amax is not None:
        raise ValueError(f"global_amax is only meaningful for nvfp4, not {scheme.kind}")
    core = _fused_block(weight, scheme) or _core(scheme)
    if compiled:
        core = _compiled(core)
    q, scale = core(weight)
    if check_finite and not bool(torch.isfinite(scale).all()):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} holds inf or NaN; refusing to quantize it to FP8"
        )
    return {"weight": q, scheme.weight_scale_name: scale}


def _kernel_outputs(
    weight: torch.Tensor, scheme: QuantScheme, out: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`out`'s (fp8 weight, scale) when the fused Triton kernel can write them in place (HF-fp8 blocks of
    a CUDA weight into contiguous tensors on its device), else None."""
    if _fused_block(weight, scheme) is None or set(out) != {"weight", scheme.weight_scale_name}:
        return None
    q, sf = out["weight"], out[scheme.weight_scale_name]
    return (q, sf) if _in_place_ok(weight, q, sf) else None


def _nvfp4_into(
    weight: torch.Tensor,
    scheme: QuantScheme,
    out: Mapping[str, torch.Tensor],
    flag: torch.Tensor | None,
    global_amax: torch.Tensor | None,
) -> None:
    packed_name, scale_name, global_name = mx_tensor_names(scheme)
    g = _nvfp4_global(weight, global_amax, check_finite=False)
    packed, scale = out[packed_name], out[scale_name]
    if _mx_kernel_ok(weight, scheme) and _in_place_ok(weight, packed, scale):
        from trainer_side import mx_kernels

        mx_kernels.nvfp4_quant_into(weight, g.reshape(1), packed, scale, flag=flag)
    else:
        made_packed, made_scale, _ = mx_quantize.quantize_nvfp4(weight, global_amax, check_finite=False)
        packed.copy_(made_packed)
        scale.copy_(made_scale)
        if flag is not None:
            _flag_non_finite(flag, weight)
    out[global_name].copy_(_stored_global(g, scheme).reshape(out[global_name].shape))


def quantize_into(
    weight: torch.Tensor,
    scheme: QuantScheme,
    out: Mapping[str, torch.Tensor],
    *,
    flag: torch.Tensor | None = None,
    global_amax: torch.Tensor | None = None,
) -> None:
    """`quantize_weight(weight, scheme)` written into the preallocated tensors `out` (the keys, dtypes
    and shapes of `quantized_specs`), e.g. views of a broadcast bucket; same bits.

    HF-fp8 blocks on CUDA (into CUDA tensors) run the fused Triton kernel straight into `out`; every
    other quantizer computes its result, then copies it. `flag` (int32, one element) is set to a
    nonzero value when the weight holds inf or NaN, without a host sync. `global_amax`: NVFP4 only, as
    for `quantize_weight` (the max |x| of the fused group sharing the global scale; it is not checked
    here); MXFP8 and NVFP4 run the fused kernels of `mx_kernels` on CUDA.
    """
    if scheme.quantized and scheme.kind == "nvfp4":
        _nvfp4_into(weight, scheme, out, flag, global_amax)
        return
    if global_amax is not None:
        raise ValueError(f"global_amax is only meaningful for nvfp4, not {scheme.kind}")
    if scheme.quantized and scheme.kind == "mxfp8" and _mx_kernel_ok(weight, scheme):
        q, s = out["weight"], out["weight_scale"]
        if _in_place_ok(weight, q, s):
            from trainer_side import mx_kernels

            mx_kernels.mxfp8_quant_into(weight, q, s, flag=flag)
            return
    kernel_out = _kernel_outputs(weight, scheme, out)
    if kernel_out is not None:
        from trainer_side import fp8_kernels

        assert scheme.block_size is not None
        fp8_kernels.fp8_block_quant_into(weight, *kernel_out, scheme.block_size, flag=flag)
        return
    made = quantize_weight(weight, scheme, check_finite=False)
    for suffix, t in made.items():
        out[suffix].copy_(t)
    if flag is not None and scheme.quantized:
        # the scales show a non-finite weight, except MXFP8's E8M0 bytes: it is checked on the input
        poisoned = weight if scheme.kind == "mxfp8" else next(t for k, t in made.items() if k != "weight")
        _flag_non_finite(flag, poisoned)


def quantize_many_into(
    items: Sequence[tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
    scheme: QuantScheme,
    *,
    flag: torch.Tensor | None = None,
    group_max_numel: int = GROUP_MAX_NUMEL,
) -> None:
    """`quantize_into(weight, scheme, out, flag=flag)` for every `(weight, out)`; HF-fp8 blocks of
    row-major CUDA weights of at most `group_max_numel` elements go to the Triton kernel in one launch
    per input dtype (same bits): a launch costs more host time than such a weight costs the GPU."""
    from trainer_side import fp8_kernels

    groups: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for weight, out in items:
        kernel_out = _kernel_outputs(weight, scheme, out) if weight.numel() <= group_max_numel else None
        if kernel_out is not None and fp8_kernels.groupable(weight, kernel_out[0]):
            groups.setdefault(weight.dtype, []).append((weight, *kernel_out))
        else:
            quantize_into(weight, scheme, out, flag=flag)
    for tasks in groups.values():
        assert scheme.block_size is not None
        fp8_kernels.fp8_block_quant_many(tasks, scheme.block_size, flag=flag)
