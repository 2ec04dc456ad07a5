"""MXFP8 / NVFP4 quantizers: bit-exact against vLLM 0.26's own reference functions, run on CPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from configs.quant import QuantScheme
from trainer_side.mx_quantize import nvfp4_global_scale, quantize_mxfp8, quantize_nvfp4
from trainer_side.quantize import quantize_weight, quantized_specs

SHAPES = [(1, 32), (7, 64), (129, 96), (3, 4096), (256, 160)]
DTYPES = [torch.bfloat16, torch.float32]
F32 = torch.finfo(torch.float32)
BF16 = torch.finfo(torch.bfloat16)


def _inputs(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=gen)
    yield "random", (normal * 0.02).to(dtype)
    yield "zeros", torch.zeros(shape, dtype=dtype)
    signed = torch.zeros(shape, dtype=dtype)
    signed[:, ::3] = -0.0
    tiny = (normal * (1e-40 if dtype == torch.float32 else 1e-38)).to(dtype)  # subnormals
    yield "signed_zeros_and_subnormals", torch.where(torch.rand(shape, generator=gen) < 0.5, signed, tiny)
    top = BF16.max if dtype == torch.bfloat16 else F32.max
    yield "near_max", ((torch.rand(shape, generator=gen) * 2 - 1) * top).to(dtype)
    # each row spans 60 binades: blocks whose elements differ by far more than the format holds
    wide = normal * torch.exp2(torch.randint(-30, 30, shape, generator=gen).float())
    yield "wide_range", wide.to(dtype)
    yield "one_outlier", torch.where(torch.rand(shape, generator=gen) < 0.01, normal * 1e4, normal).to(dtype)


def _cases() -> list[tuple[tuple[int, int], torch.dtype]]:
    return [(s, d) for s in SHAPES for d in DTYPES]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int32)


# --- MXFP8 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "dtype"), _cases())
def test_mxfp8_is_bit_identical_to_vllm(shape: tuple[int, int], dtype: torch.dtype) -> None:
    from vllm.model_executor.layers.quantization.utils.mxfp8_utils import (
        _mxfp8_e4m3_quantize_torch,
        mxfp8_e4m3_quantize,
    )

    for label, x in _inputs(shape, dtype, seed=shape[0] * 7 + shape[1]):
        q, s = quantize_mxfp8(x)
        q_ref, s_ref = _mxfp8_e4m3_quantize_torch(x)
        assert q.dtype == q_ref.dtype == torch.float8_e4m3fn and s.dtype == s_ref.dtype == torch.uint8, label
        assert q.shape == shape and s.shape == (shape[0], shape[1] // 32), label
        assert torch.equal(_bits(q), _bits(q_ref)), f"{label}: {int((_bits(q) != _bits(q_ref)).sum())} differ"
        assert torch.equal(s, s_ref), label
        # the registered op vLLM's online MXFP8 method calls takes the same path on this platform (the
        # CUDA build of vLLM registers it for CUDA only: there the GPU tests compare on the GPU)
        if torch._C._dispatch_has_kernel_for_dispatch_key("vllm::mxfp8_quantize", "CPU"):
            q_op, s_op = mxfp8_e4m3_quantize(x)
            assert torch.equal(_bits(q), _bits(q_op)) and torch.equal(s, s_op), label


def test_mxfp8_dequantizes_through_vllm() -> None:
    from vllm.model_executor.layers.quantization.utils.mxfp8_utils import dequant_mxfp8_to_bf16

    x = torch.randn(64, 256) * 0.05
    q, s = quantize_mxfp8(x)
    back = dequant_mxfp8_to_bf16(q, s).float()
    assert torch.allclose(back, x, rtol=0.07, atol=1e-3)  # e4m3 has 3 mantissa bits (vLLM's rule: [1, 2))


# --- NVFP4 -----------------------------------------------------------------------------------------


def _vllm_online_global_scale(weight: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """`weight_scale_2` (= 1/g) as vLLM's online NVFP4 method computes it.

    Its block quantizer `scaled_fp4_quant` is a CUDA op; it is swapped for a stub that returns empty
    tensors of the right shapes, so only vLLM's own global-scale code runs here.
    """
    from vllm.model_executor.layers.quantization.online import nvfp4 as online

    def cuda_only_block_quant(
        x: torch.Tensor, g: torch.Tensor, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m, k = x.shape
        return torch.empty(m, k // 2, dtype=torch.uint8), torch.empty(m, k // 16, dtype=torch.float8_e4m3fn)

    monkeypatch.setattr(online, "scaled_fp4_quant", cuda_only_block_quant)
    return online._quantize_moe_weight_to_nvfp4(weight.unsqueeze(0))[2][0]


def _check_nvfp4(x: torch.Tensor, label: str, global_amax: torch.Tensor | None = None) -> None:
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
        break_fp4_bytes,
        ref_nvfp4_quant,
    )

    packed, scale, g = quantize_nvfp4(x, global_amax)
    rows, cols = x.shape
    assert packed.dtype == torch.uint8 and packed.shape == (rows, cols // 2), label
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (rows, cols // 16), label
    assert g.dtype == torch.float32 and g.shape == (), label
    values_ref, scale_ref = ref_nvfp4_quant(x, g.reshape(1), 16)
    assert torch.equal(_bits(scale.to(torch.float32)), _bits(scale_ref)), label
    # vLLM's unpacker gives back the reference's E2M1 values, signs of zeros included
    unpacked = break_fp4_bytes(packed, torch.float32)
    assert torch.equal(_bits(unpacked), _bits(values_ref)), (
        f"{label}: {int((unpacked != values_ref).sum())} differ"
    )
    # and compressed-tensors' packer writes the same bytes for them
    assert torch.equal(packed, pack_fp4_to_uint8(values_ref)), label


@pytest.mark.parametrize(("shape", "dtype"), _cases())
def test_nvfp4_is_bit_identical_to_vllm(
    shape: tuple[int, int], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    for label, x in _inputs(shape, dtype, seed=shape[0] * 11 + shape[1]):
        _check_nvfp4(x, label)
        g = quantize_nvfp4(x)[2]
        assert torch.equal(_bits(1.0 / g), _bits(_vllm_online_global_scale(x, monkeypatch))), label


def test_nvfp4_rounding_ties_match_vllm() -> None:
    # One block holds 2688 = 6 * 448, so g = 1, and a block with max 6 gets scale 1: its values reach
    # the E2M1 rounding unchanged, ties and signed zeros included.
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    row = torch.tensor([*ties, *(-t for t in ties)] + [-0.0, 0.0, -1e-9, 1e-9, 0.5, 3.0, 4.0, 6.0] * 2)
    x = torch.cat([row, torch.full((16,), 2688.0)]).reshape(1, -1)
    assert float(nvfp4_global_scale(x.abs().amax())) == 1.0
    _check_nvfp4(x, "ties")
    _check_nvfp4(x.to(torch.bfloat16), "ties_bf16")


def test_nvfp4_shared_global_amax() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(64, 128, generator=gen), torch.randn(16, 128, generator=gen) * 4
    shared = torch.maximum(q.abs().amax(), k.abs().amax())
    _check_nvfp4(q, "q", shared)
    assert torch.equal(quantize_nvfp4(q, shared)[2], quantize_nvfp4(k)[2])
    with pytest.raises(ValueError, match=r"global_amax .* is below max"):
        quantize_nvfp4(k, q.abs().amax())


# --- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_weights_are_refused(bad: float) -> None:
    x = torch.randn(4, 64)
    x[2, 17] = bad
    with pytest.raises(ValueError, match="holds inf or NaN; refusing to quantize it to MXFP8"):
        quantize_mxfp8(x)
    with pytest.raises(ValueError, match="holds inf or NaN; refusing to quantize it to NVFP4"):
        quantize_nvfp4(x)


def test_input_dims_off_the_group_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp8(torch.randn(4, 48))
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4(torch.randn(4, 40))
    with pytest.raises(ValueError, match="2-D"):
        quantize_mxfp8(torch.randn(64))


# --- dispatch through quantize_weight / quantized_specs ---------------------------------------------

CT_MXFP8 = QuantScheme(kind="mxfp8", group_size=32, source="compressed-tensors", scale_shape="2d")
MO_MXFP8 = QuantScheme(kind="mxfp8", group_size=32, source="modelopt")
CT_NVFP4 = QuantScheme(kind="nvfp4", group_size=16, source="compressed-tensors", scale_shape="2d")
MO_NVFP4 = QuantScheme(kind="nvfp4", group_size=16, source="modelopt")


@pytest.mark.parametrize(
    "scheme", [CT_MXFP8, MO_MXFP8, CT_NVFP4, MO_NVFP4], ids=lambda s: f"{s.source}-{s.kind}"
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_weight_yields_the_checkpoint_tensors(scheme: QuantScheme, dtype: torch.dtype) -> None:
    x = (torch.randn(48, 96) * 0.1).to(dtype)
    out = quantize_weight(x, scheme)
    specs = quantized_specs(x.shape, x.dtype, scheme)
    assert list(out) == list(specs)
    for name, t in out.items():
        assert (t.dtype, tuple(t.shape)) == specs[name], name
    if scheme.kind == "mxfp8":
        q, s = quantize_mxfp8(x)
        assert torch.equal(_bits(out["weight"]), _bits(q)) and torch.equal(out["weight_scale"], s)
        return
    packed, scale, g = quantize_nvfp4(x)
    packed_name = "weight_packed" if scheme.source == "compressed-tensors" else "weight"
    assert torch.equal(out[packed_name], packed)
    assert torch.equal(_bits(out["weight_scale"]), _bits(scale))
    if scheme.source == "compressed-tensors":  # CT stores g (vLLM inverts it), shape (1,)
        assert torch.equal(_bits(out["weight_global_scale"]), _bits(g.reshape(1)))
    else:  # ModelOpt stores the dequant multiplier 1/g, shape ()
        assert torch.equal(_bits(out["weight_scale_2"]), _bits(1.0 / g))
    # a NVFP4 stream carries a quarter of the bf16 bytes, plus 1/16 for the block scales
    if dtype == torch.bfloat16:
        payload = sum(t.numel() * t.element_size() for t in out.values())
        assert payload - 4 == x.numel() * 2 // 4 + x.numel() // 16


def test_quantized_specs_refuse_odd_input_dims() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantized_specs((64, 100), torch.bfloat16, MO_MXFP8)
    with pytest.raises(ValueError, match="multiple of 16"):
        quantized_specs((64, 100), torch.bfloat16, CT_NVFP4)


def test_w4a4_nvfp4_is_refused_for_its_input_scales() -> None:
    from trainer_side.detect import UnsupportedQuantization

    w4a4 = MO_NVFP4.model_copy(update={"has_input_scale": True, "activation": "static", "format": "NVFP4"})
    with pytest.raises(UnsupportedQuantization, match="needs calibrated input global scales"):
        quantized_specs((64, 64), torch.bfloat16, w4a4)


def test_online_schemes_stream_unquantized() -> None:
    online = QuantScheme(kind="mxfp8", group_size=32, source="online")
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    assert quantize_weight(x, online)["weight"] is x
    assert quantized_specs(x.shape, x.dtype, online) == {"weight": (torch.bfloat16, (8, 32))}
