"""Tests for `trainer_side.quantize`: bit-exact against the installed vLLM / compressed-tensors code."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator

import pytest
import torch

from configs.quant import QuantScheme
from trainer_side.quantize import quantize_weight, quantized_specs

Ref = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

HF_BLOCK = QuantScheme(
    kind="fp8_block",
    block_size=(128, 128),
    source="fp8",
    weight_scale_name="weight_scale_inv",
    scale_shape="2d",
)
HF_BLOCK_UE8M0 = HF_BLOCK.model_copy(update={"ue8m0_scale": True})
HF_BLOCK_ODD = HF_BLOCK.model_copy(update={"block_size": (64, 32)})
HF_TENSOR = QuantScheme(kind="fp8_tensor", source="fp8", scale_shape="scalar", activation="static")
FBGEMM = QuantScheme(kind="fp8_channel", source="fbgemm_fp8", scale_shape="column")
CT_BLOCK = QuantScheme(kind="fp8_block", block_size=(128, 128), source="compressed-tensors", scale_shape="2d")
CT_CHANNEL = QuantScheme(kind="fp8_channel", source="compressed-tensors", scale_shape="column")
CT_TENSOR = QuantScheme(kind="fp8_tensor", source="compressed-tensors", scale_shape="one")
SCHEMES = {
    "hf_block": HF_BLOCK,
    "hf_block_ue8m0": HF_BLOCK_UE8M0,
    "hf_block_64x32": HF_BLOCK_ODD,
    "hf_tensor": HF_TENSOR,
    "fbgemm_channel": FBGEMM,
    "ct_block": CT_BLOCK,
    "ct_channel": CT_CHANNEL,
    "ct_tensor": CT_TENSOR,
}

SHAPES = [(1, 1), (129, 257), (300, 130), (128, 128), (7, 4096)]
DTYPES = [torch.bfloat16, torch.float32]
BF16_MAX = torch.finfo(torch.bfloat16).max


# --- references: the installed functions that write / online-quantize each format -----------------


def _vllm_block_ref(scheme: QuantScheme, compiled: bool = False) -> Ref:
    from vllm.utils.deep_gemm import per_block_cast_to_fp8

    fn = per_block_cast_to_fp8 if compiled else per_block_cast_to_fp8._torchdynamo_orig_callable
    assert scheme.block_size is not None
    return lambda x: fn(x, list(scheme.block_size), use_ue8m0=scheme.ue8m0_scale)


def _vllm_quant_fp8_ref(per_token: bool) -> Ref:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    with set_current_vllm_config(VllmConfig()):
        op = QuantFP8(static=False, group_shape=GroupShape.PER_TOKEN if per_token else GroupShape.PER_TENSOR)
    return lambda x: op.forward_native(x)


def _ct_ref(scheme: QuantScheme) -> Ref:
    """llm-compressor's flow: min/max observed in float32, calculate_qparams, the float compressor."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    strategy = {"fp8_block": "block", "fp8_channel": "channel", "fp8_tensor": "tensor"}[scheme.kind]
    block = list(scheme.block_size) if scheme.block_size else None
    args = QuantizationArgs(
        num_bits=8, type="float", strategy=strategy, symmetric=True, block_structure=block
    )
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=args)

    def observe(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        if strategy == "channel":
            return x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        if strategy == "tensor":
            return x.amin(), x.amax()
        b0, b1 = args.block_structure
        padded = torch.nn.functional.pad(x, (0, -x.shape[1] % b1, 0, -x.shape[0] % b0))
        blocks = padded.view(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1)
        return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero_point = calculate_qparams(*observe(x), args)
        state = {"weight": x, "weight_scale": scale, "weight_zero_point": zero_point}
        return FloatQuantizationCompressor.compress(state, ct_scheme)["weight"], scale

    return run


def reference(scheme: QuantScheme) -> Ref:
    if scheme.source == "compressed-tensors":
        return _ct_ref(scheme)
    if scheme.kind == "fp8_block":
        return _vllm_block_ref(scheme)
    return _vllm_quant_fp8_ref(per_token=scheme.kind == "fp8_channel")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int32)


def assert_bit_identical(
    ours: dict[str, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor], scheme: QuantScheme
) -> None:
    q_ref, s_ref = ref
    q, s = ours["weight"], ours[scheme.weight_scale_name]
    assert q.dtype == q_ref.dtype == torch.float8_e4m3fn
    assert q.shape == q_ref.shape
    assert torch.equal(_bits(q), _bits(q_ref)), f"{int((_bits(q) != _bits(q_ref)).sum())} fp8 codes differ"
    assert s.dtype == torch.float32
    # vLLM's per-tensor op returns (1,); the HF checkpoint stores shape () - same value, same bits
    assert torch.equal(_bits(s.reshape(-1)), _bits(s_ref.to(torch.float32).reshape(-1)))


# --- inputs -----------------------------------------------------------------------------------------


def _inputs(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    normal = torch.randn(shape, generator=gen) * 0.02
    yield "random", normal.to(dtype)
    yield "zeros", torch.zeros(shape, dtype=dtype)
    signed_zeros = torch.zeros(shape, dtype=dtype)
    signed_zeros[::2] = -0.0
    yield (
        "signed_zeros_and_tiny",
        torch.where(torch.rand(shape, generator=gen) < 0.5, signed_zeros, (normal * 1e-36).to(dtype)),
    )
    yield "near_bf16_max", ((torch.rand(shape, generator=gen) * 2 - 1) * BF16_MAX).to(dtype)
    yield "denormal_ish", (torch.randn(shape, generator=gen) * 1e-39).to(dtype)
    # mixed per block: each row/column band alternates huge and tiny magnitudes
    row_mag = torch.where(torch.arange(rows) % 3 == 0, 1e30, 1e-20).unsqueeze(1)
    col_mag = torch.where(torch.arange(cols) % 5 == 0, 1.0, 1e-8).unsqueeze(0)
    yield "mixed_huge_small", (torch.randn(shape, generator=gen) * row_mag * col_mag).to(dtype)
    # values that land exactly on fp8 rounding ties once scaled
    ties = torch.randint(-448, 449, shape, generator=gen).float() * 0.5
    ties.view(-1)[0] = 448.0
    yield "ties", ties.to(dtype)


CASES = [(scheme_name, shape, dtype) for scheme_name in SCHEMES for shape in SHAPES for dtype in DTYPES]


@pytest.mark.parametrize(("scheme_name", "shape", "dtype"), CASES, ids=lambda v: str(v).replace(" ", ""))
def test_bit_identical_to_installed_reference(
    scheme_name: str, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    scheme = SCHEMES[scheme_name]
    ref = reference(scheme)
    for kind, x in _inputs(shape, dtype, seed=zlib.crc32(f"{scheme_name}{shape}".encode())):
        assert torch.isfinite(x).all(), kind
        ours = quantize_weight(x, scheme, compiled=False)
        try:
            assert_bit_identical(ours, ref(x), scheme)
        except AssertionError as err:
            raise AssertionError(f"{scheme_name} {shape} {dtype} input={kind}: {err}") from err


@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_specs_match_outputs(scheme_name: str, dtype: torch.dtype) -> None:
    scheme = SCHEMES[scheme_name]
    for shape in SHAPES:
        out = quantize_weight(torch.randn(shape).to(dtype), scheme, compiled=False)
        specs = quantized_specs(torch.Size(shape), dtype, scheme)
        assert specs == {k: (v.dtype, tuple(v.shape)) for k, v in out.items()}


def test_specs_and_shapes_per_format() -> None:
    shape, dtype = (300, 130), torch.bfloat16
    f8, f32 = torch.float8_e4m3fn, torch.float32
    assert quantized_specs(shape, dtype, HF_BLOCK) == {
        "weight": (f8, shape),
        "weight_scale_inv": (f32, (3, 2)),
    }
    assert quantized_specs(shape, dtype, HF_BLOCK_ODD) == {
        "weight": (f8, shape),
        "weight_scale_inv": (f32, (5, 5)),
    }
    assert quantized_specs(shape, dtype, CT_BLOCK) == {"weight": (f8, shape), "weight_scale": (f32, (3, 2))}
    assert quantized_specs(shape, dtype, FBGEMM) == {"weight": (f8, shape), "weight_scale": (f32, (300, 1))}
    assert quantized_specs(shape, dtype, CT_CHANNEL) == {
        "weight": (f8, shape),
        "weight_scale": (f32, (300, 1)),
    }
    assert quantized_specs(shape, dtype, HF_TENSOR) == {"weight": (f8, shape), "weight_scale": (f32, ())}
    assert quantized_specs(shape, dtype, CT_TENSOR) == {"weight": (f8, shape), "weight_scale": (f32, (1,))}
    assert quantized_specs(shape, dtype, QuantScheme()) == {"weight": (dtype, shape)}


def test_per_tensor_is_never_per_channel() -> None:
    # rows of very different magnitude: a per-channel scale would differ per row
    x = torch.randn(64, 96) * torch.logspace(-3, 3, 64).unsqueeze(1)
    for scheme in (HF_TENSOR, CT_TENSOR):
        scale = quantize_weight(x.bfloat16(), scheme)["weight_scale"]
        assert scale.numel() == 1
        assert scale.item() == pytest.approx(x.bfloat16().float().abs().max().item() / 448.0, rel=1e-6)


def test_dequantized_weight_is_close() -> None:
    x = torch.randn(300, 130) * 0.05
    for name, scheme in SCHEMES.items():
        out = quantize_weight(x, scheme)
        q, s = out["weight"].float(), out[scheme.weight_scale_name]
        if scheme.kind == "fp8_block":
            assert scheme.block_size is not None
            s = s.repeat_interleave(scheme.block_size[0], 0).repeat_interleave(scheme.block_size[1], 1)
            s = s[: x.shape[0], : x.shape[1]]
        err = (q * s - x).abs().max().item()
        bound = x.abs().max().item() / 8 if scheme.ue8m0_scale else x.abs().max().item() / 16
        assert err <= bound, name


@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_weights_raise(scheme_name: str, bad: float) -> None:
    x = torch.randn(129, 257, dtype=torch.bfloat16)
    x[100, 200] = bad
    with pytest.raises(ValueError, match="holds inf or NaN"):
        quantize_weight(x, SCHEMES[scheme_name])
    # the reference would silently write NaN scales or NaN codes
    q_ref, s_ref = reference(SCHEMES[scheme_name])(x)
    assert not torch.isfinite(s_ref).all() or torch.isnan(q_ref.float()).any()


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="non-empty 2-D"):
        quantize_weight(torch.zeros(4, 4, 4), HF_BLOCK)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        quantized_specs((0, 128), torch.bfloat16, HF_BLOCK)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        quantize_weight(torch.zeros(4, 4, dtype=torch.float8_e4m3fn), CT_CHANNEL)
    with pytest.raises(ValueError, match="nvfp4 needs group_size 16"):
        QuantScheme(kind="nvfp4")
    with pytest.raises(ValueError, match="global_amax is only meaningful for nvfp4"):
        quantize_weight(torch.zeros(4, 4), HF_BLOCK, global_amax=torch.tensor(1.0))


def test_unquantized_scheme_passes_weight_through() -> None:
    x = torch.randn(3, 5, dtype=torch.bfloat16)
    assert quantize_weight(x, QuantScheme())["weight"] is x


def test_non_contiguous_input() -> None:
    x = torch.randn(257, 129, dtype=torch.bfloat16).t()
    for scheme in SCHEMES.values():
        assert_bit_identical(quantize_weight(x, scheme), reference(scheme)(x.contiguous()), scheme)


def test_compiled_path_matches_vllm_compiled_reference() -> None:
    # One CPU inductor compile each (~10-20 s): the fused graph must keep the eager bits.
    import torch._dynamo

    assert not torch._dynamo.config.disable, "torch.compile is off here: this would compare eager to eager"
    x = torch.randn(129, 257, dtype=torch.bfloat16) * 0.02
    ours = quantize_weight(x, HF_BLOCK, compiled=True)
    assert_bit_identical(ours, _vllm_block_ref(HF_BLOCK, compiled=True)(x), HF_BLOCK)
    assert_bit_identical(ours, _vllm_block_ref(HF_BLOCK)(x), HF_BLOCK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme_name", list(SCHEMES))
def test_cuda_bit_identical_to_reference_run_on_cuda(scheme_name: str) -> None:
    # CUDA divides by a Python float as a multiply by its reciprocal, so bits are per device.
    scheme = SCHEMES[scheme_name]
    refs = [reference(scheme)]
    if scheme.source == "fp8" and scheme.kind == "fp8_block":
        refs.append(_vllm_block_ref(scheme, compiled=True))
    for shape in SHAPES:
        for dtype in DTYPES:
            for kind, x in _inputs(shape, dtype, seed=zlib.crc32(f"{scheme_name}{shape}".encode())):
                xc = x.cuda()
                for compiled in (False, True):
                    ours = quantize_weight(xc, scheme, compiled=compiled)
                    for ref in refs:
                        try:
                            assert_bit_identical(ours, ref(xc), scheme)
                        except AssertionError as err:
                            raise AssertionError(
                                f"{shape} {dtype} {kind} compiled={compiled}: {err}"
                            ) from err
