"""The fused MXFP8 / NVFP4 Triton kernels (`trainer_side.mx_kernels`): the same bits as the torch
references of `mx_quantize` (themselves bit for bit vLLM 0.26's), on CPU under Triton's interpreter and,
on a CUDA machine, against torch and vLLM's own functions on the GPU; flags for non-finite weights; the
dispatch from `quantize_weight` / `quantize_into`."""

from __future__ import annotations

import textwrap

import pytest
import torch

from configs.quant import QuantScheme
from tests.test_fp8_kernels import run_under_triton_interpreter
from trainer_side import fp8_kernels, mx_kernels
from trainer_side.mx_quantize import nvfp4_global_scale, quantize_mxfp8, quantize_nvfp4, tensor_amax
from trainer_side.quantize import quantize_into, quantize_weight, quantized_specs

CUDA = mx_kernels.triton is not None and fp8_kernels.available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with FP8 conversions (sm_89+) and Triton")
MO_MXFP8 = QuantScheme(kind="mxfp8", group_size=32, source="modelopt")
CT_NVFP4 = QuantScheme(kind="nvfp4", group_size=16, source="compressed-tensors", scale_shape="2d")
MO_NVFP4 = QuantScheme(kind="nvfp4", group_size=16, source="modelopt")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int32)


def near_powers_of_two(rows: int = 64) -> torch.Tensor:
    """Rows whose one 32-group max sits 1-4 ulps below a power of two, 2**-126 .. 2**127: where a
    correctly rounded log2 rounds up to the integer, so floor(log2) is not the exponent field."""
    ks = torch.linspace(-126, 127, rows).round()
    below = torch.exp2(ks) * (1 - torch.arange(1, 5).repeat(rows // 4 + 1)[:rows] * 2.0**-24)
    x = torch.zeros(rows, 64)
    x[:, 0], x[:, 33] = below, below / 3
    return x


# --- CPU: the kernels' arithmetic under Triton's interpreter ------------------------------------------

_INTERPRETED = textwrap.dedent(
    """
    import torch
    from tests.test_mx_kernels import near_powers_of_two
    from tests.test_mx_quantize import SHAPES, DTYPES, _inputs, _bits
    from trainer_side import mx_kernels as K
    from trainer_side.mx_quantize import quantize_mxfp8, quantize_nvfp4, nvfp4_global_scale, tensor_amax

    def widened(x):
        # the interpreter garbles bf16 subnormals when widening them (the GPU does not; the CUDA tests
        # feed them as bf16): give it the float32 values, which the kernels widen to anyway
        return x.float() if x.dtype == torch.bfloat16 else x

    def mx(x, **kw):
        q, s = K.mxfp8_quant(widened(x), soft_cast=True, **kw)
        rq, rs = quantize_mxfp8(x, check_finite=False)
        return int((_bits(q) != _bits(rq)).sum()), int((s != rs).sum())

    def nv(x, amax=None, **kw):
        g = nvfp4_global_scale(tensor_amax(x) if amax is None else amax)
        p, s = K.nvfp4_quant(widened(x), g, soft_cast=True, **kw)
        rp, rs, rg = quantize_nvfp4(x, amax, check_finite=False)
        assert torch.equal(_bits(g), _bits(rg))
        return int((p != rp).sum()), int((_bits(s) != _bits(rs)).sum())

    cases = 0
    for shape in SHAPES:
        for dtype in DTYPES:
            for label, x in _inputs(shape, dtype, seed=shape[0] * 7 + shape[1]):
                assert mx(x) == (0, 0), (shape, dtype, label, "mxfp8", mx(x))
                assert nv(x) == (0, 0), (shape, dtype, label, "nvfp4", nv(x))
                cases += 1
    x = torch.randn(70, 192) * 0.03
    for block in [(8, 64), (32, 128), (1, 512)]:  # 512 > 192: a tile wider than the weight
        assert mx(x, block=block) == (0, 0) and nv(x, block=block) == (0, 0), block
    assert mx(x.t().contiguous().t()) == (0, 0) and nv(x.t().contiguous().t()) == (0, 0)  # strided
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    row = torch.tensor([*ties, *(-t for t in ties)] + [-0.0, 0.0, -1e-9, 1e-9, 0.5, 3.0, 4.0, 6.0] * 2)
    t = torch.cat([row, torch.full((16,), 2688.0)]).reshape(1, -1)
    assert nv(t) == (0, 0) and nv(t.to(torch.bfloat16)) == (0, 0)
    shared = torch.tensor(50.0)
    assert nv(x, shared) == (0, 0)
    # group maxima just below a power of two: tl.log2 (numpy here) rounds as torch's log2 does; the
    # exponent field does not, and differs in most of those scales
    edge = near_powers_of_two()
    assert mx(edge, log2=K.LOG2_TRITON) == (0, 0)
    _, wrong = mx(edge, log2=K.LOG2_EXPONENT)
    assert wrong > 32, wrong
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[69, 191] = bad
        for f in (lambda y, fl: K.mxfp8_quant(y, soft_cast=True, flag=fl),
                  lambda y, fl: K.nvfp4_quant(y, torch.tensor(1.0), soft_cast=True, flag=fl)):
            fl = torch.zeros(1, dtype=torch.int32)
            f(y, fl)
            assert int(fl) == 1, bad
    fl = torch.zeros(1, dtype=torch.int32)
    K.mxfp8_quant(x, soft_cast=True, flag=fl)
    K.nvfp4_quant(x, torch.tensor(1.0), soft_cast=True, flag=fl)
    assert int(fl) == 0
    print("ok", cases)
    """
)


def test_kernels_match_the_references_under_the_triton_interpreter() -> None:
    proc = run_under_triton_interpreter(_INTERPRETED, 600)
    assert proc.returncode == 0 and "ok 60" in proc.stdout, proc.stdout + proc.stderr


def test_cpu_weights_keep_the_torch_reference() -> None:
    x = torch.randn(8, 64)
    assert not mx_kernels.supports(x, 32)
    out = quantize_weight(x, MO_MXFP8)
    q, s = quantize_mxfp8(x)
    assert torch.equal(_bits(out["weight"]), _bits(q)) and torch.equal(out["weight_scale"], s)


# --- CUDA: the kernels against torch and vLLM on the GPU ------------------------------------------------


def _cuda_cases() -> list[tuple[str, torch.Tensor]]:
    from tests.test_mx_quantize import DTYPES, _inputs

    out = []
    for shape in [(1, 32), (7, 64), (129, 96), (3, 4096), (256, 160), (4097, 1024), (1000, 3072)]:
        for dtype in (*DTYPES, torch.float16):
            for label, x in _inputs(shape, dtype, seed=shape[0] * 13 + shape[1]):
                if torch.isfinite(x).all():  # fp16 overflows on the wide inputs: those are refused
                    out.append((f"{label} {shape} {dtype}", x))
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    out.append(("every finite bf16 bit pattern", torch.where(torch.isfinite(every), every, 0).view(2048, 32)))
    out.append(("group maxima just below powers of two", near_powers_of_two(256)))
    return out


@needs_cuda
def test_mxfp8_kernel_matches_torch_and_vllm_on_cuda() -> None:
    try:
        from vllm.model_executor.layers.quantization.utils.mxfp8_utils import (
            _mxfp8_e4m3_quantize_torch,
            mxfp8_e4m3_quantize,
        )
    except ImportError:
        _mxfp8_e4m3_quantize_torch = mxfp8_e4m3_quantize = None
    for label, x_cpu in _cuda_cases():
        x = x_cpu.cuda()
        for soft in (False, True):
            q, s = mx_kernels.mxfp8_quant(x, soft_cast=soft)
            rq, rs = quantize_mxfp8(x)
            assert torch.equal(_bits(q), _bits(rq)) and torch.equal(s, rs), f"{label} soft={soft}"
        if _mxfp8_e4m3_quantize_torch is not None and mxfp8_e4m3_quantize is not None:
            vq, vs = _mxfp8_e4m3_quantize_torch(x)
            assert torch.equal(_bits(q), _bits(vq)) and torch.equal(s, vs), f"{label}: vs vLLM"
            oq, os_ = mxfp8_e4m3_quantize(x)  # the op vLLM's online MXFP8 method calls (torch on Hopper)
            assert torch.equal(_bits(q), _bits(oq)) and torch.equal(s, os_), f"{label}: vs vLLM's op"
        t = x.t().contiguous().t()  # strided rows
        assert torch.equal(_bits(mx_kernels.mxfp8_quant(t)[0]), _bits(rq)), label


@needs_cuda
def test_nvfp4_kernel_matches_torch_and_vllm_on_cuda() -> None:
    try:
        from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
            break_fp4_bytes,
            ref_nvfp4_quant,
        )
    except ImportError:
        ref_nvfp4_quant = None
    for label, x_cpu in _cuda_cases():
        x = x_cpu.cuda()
        g = nvfp4_global_scale(tensor_amax(x))
        rp, rs, _rg = quantize_nvfp4(x)
        for soft in (False, True):
            p, s = mx_kernels.nvfp4_quant(x, g, soft_cast=soft)
            assert torch.equal(p, rp) and torch.equal(_bits(s), _bits(rs)), f"{label} soft={soft}"
        if ref_nvfp4_quant is not None:
            values, scale = ref_nvfp4_quant(x, g.reshape(1), 16)
            assert torch.equal(_bits(s.float()), _bits(scale)), f"{label}: scales vs vLLM"
            # break_fp4_bytes indexes a CPU lookup table: unpack on the CPU
            unpacked = break_fp4_bytes(p.cpu(), torch.float32)
            assert torch.equal(_bits(unpacked), _bits(values.cpu())), f"{label}: vs vLLM"


@needs_cuda
def test_the_default_log2_is_torchs_for_every_positive_float32() -> None:
    """floor(log2(amax)) is the only step whose bits depend on a library: every positive finite float32
    (and +0) as a group max must give torch's CUDA scale byte. 2**31 values in chunks of 2**24."""
    chunk = 1 << 24
    x = torch.zeros(chunk, 32, device="cuda")
    q = torch.empty(chunk, 32, dtype=torch.float8_e4m3fn, device="cuda")
    s = torch.empty(chunk, 1, dtype=torch.uint8, device="cuda")
    tiny = torch.finfo(torch.float32).tiny
    last = 0x7F7FFFFF
    for start in range(0, last + 1, chunk):
        bits = torch.arange(start, min(start + chunk, last + 1), dtype=torch.int32, device="cuda")
        a = bits.view(torch.float32)
        n = a.numel()
        x[:n, 0] = a
        mx_kernels.mxfp8_quant_into(x[:n], q[:n], s[:n])
        ref = (torch.floor(torch.log2(a.clamp(min=tiny))) + 127.0).clamp(0, 254).to(torch.uint8)
        bad = (s[:n, 0] != ref).nonzero()
        assert bad.numel() == 0, (
            f"{bad.numel()} scales differ from {hex(start)}: e.g. {a[bad[:3, 0]].tolist()}"
        )


@needs_cuda
@pytest.mark.parametrize("scheme", [MO_MXFP8, CT_NVFP4, MO_NVFP4], ids=["mxfp8", "ct-nvfp4", "mo-nvfp4"])
def test_quantize_weight_dispatches_to_the_kernels_on_cuda(scheme: QuantScheme) -> None:
    x = torch.randn(640, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
    got = quantize_weight(x, scheme)
    ref = quantize_weight(x.cpu(), scheme)
    for k in ref:
        assert torch.equal(_bits(got[k].cpu()), _bits(ref[k])), k
    out = {
        k: torch.empty(sh, dtype=dt, device="cuda")
        for k, (dt, sh) in quantized_specs(x.shape, x.dtype, scheme).items()
    }
    if scheme.kind == "mxfp8":
        flag = torch.zeros(1, dtype=torch.int32, device="cuda")
        quantize_into(x, scheme, out, flag=flag)
        assert int(flag) == 0 and all(torch.equal(_bits(out[k].cpu()), _bits(ref[k])) for k in ref)
    y = x.clone()
    y[5, 7] = float("nan")
    with pytest.raises(ValueError, match="holds inf or NaN"):
        quantize_weight(y, scheme)
    if scheme.kind == "nvfp4":
        with pytest.raises(ValueError, match=r"global_amax .* is below max"):
            quantize_weight(x, scheme, global_amax=torch.tensor(1e-3))
