"""Tests for `trainer_side.fp8_kernels`: the fused Triton FP8 block quantizer is bit-identical to the torch
reference (`quantize._vllm_block`, i.e. vLLM's `per_block_cast_to_fp8`) run on the same GPU.

GPU tests skip without a CUDA device of sm_89+ (and Triton). On CPU the kernel's arithmetic still runs
under Triton's interpreter, checked against the reference spelled with CUDA's `/ 448.0` semantics.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from configs.quant import QuantScheme
from trainer_side import fp8_kernels
from trainer_side.quantize import _fused_block, _vllm_block, quantize_weight

ROOT = Path(__file__).resolve().parents[1]
HF_BLOCK = QuantScheme(
    kind="fp8_block",
    block_size=(128, 128),
    source="fp8",
    weight_scale_name="weight_scale_inv",
    scale_shape="2d",
)
needs_gpu = pytest.mark.skipif(
    not fp8_kernels.available(), reason="needs a CUDA GPU with FP8 conversions (sm_89+) and Triton"
)
SHAPES = [(1, 1), (7, 4096), (129, 257), (300, 130), (128, 128), (1000, 3000), (4097, 1025)]


def _inputs(shape: tuple[int, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
    x = torch.randn(shape, generator=g)
    big = x.clone()
    big[::128, ::128] = 1e4  # one outlier per block: most values land on fp8 subnormals
    return {
        "randn": x.to(dtype),
        "zeros": torch.zeros(shape, dtype=dtype),
        "tiny (amax < 1e-4)": (x * 1e-5).to(dtype),
        "huge": (x * 1e37).to(dtype),
        "outliers": big.to(dtype),
    }


def _same_bits(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    (q, s), (rq, rs) = got, ref
    assert q.dtype == rq.dtype == torch.float8_e4m3fn and s.dtype == rs.dtype == torch.float32
    assert q.shape == rq.shape and s.shape == rs.shape
    assert int((q.view(torch.uint8) != rq.view(torch.uint8)).sum()) == 0, "fp8 bytes differ"
    assert int((s.view(torch.int32) != rs.view(torch.int32)).sum()) == 0, "scale words differ"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bit_identical_to_torch_on_cuda(shape: tuple[int, int], dtype: torch.dtype) -> None:
    for name, x in _inputs(shape, dtype).items():
        x = x.cuda()
        ref = _vllm_block(x, 128, 128, False)
        for soft in (True, False):
            try:
                _same_bits(fp8_kernels.fp8_block_quant(x, (128, 128), soft_cast=soft), ref)
            except AssertionError as e:
                raise AssertionError(f"{name}, soft_cast={soft}: {e}") from e


@pytest.mark.gpu
@needs_gpu
def test_strided_input_and_other_blocks() -> None:
    x = torch.randn(300, 130, device="cuda", dtype=torch.bfloat16)
    _same_bits(fp8_kernels.fp8_block_quant(x.t()), _vllm_block(x.t(), 128, 128, False))
    _same_bits(fp8_kernels.fp8_block_quant(x, (64, 32)), _vllm_block(x, 64, 32, False))


@pytest.mark.gpu
@needs_gpu
def test_quantize_weight_dispatches_to_the_kernel() -> None:
    x = torch.randn(4097, 1025, device="cuda", dtype=torch.bfloat16)
    assert _fused_block(x, HF_BLOCK) is not None
    assert _fused_block(x, HF_BLOCK.model_copy(update={"ue8m0_scale": True})) is None
    out = quantize_weight(x, HF_BLOCK)
    _same_bits((out["weight"], out["weight_scale_inv"]), _vllm_block(x, 128, 128, False))
    bad = x.clone()
    bad[5, 5] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_weight(bad, HF_BLOCK)


def test_cpu_weights_keep_the_eager_path() -> None:
    x = torch.randn(129, 257, dtype=torch.bfloat16)
    assert _fused_block(x, HF_BLOCK) is None
    assert not fp8_kernels.supports(x, (128, 128))
    with pytest.raises(ValueError, match="CUDA tensor"):
        fp8_kernels.fp8_block_quant(x)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_launch_equals_one_launch_per_weight(dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(3)
    shapes = [(1, 16), (7, 4096), (129, 256), (300, 144), (128, 128), (1000, 3008), (4097, 1024)]
    xs = [torch.randn(r, c, generator=g, device="cuda").to(dtype) for r, c in shapes]
    xs.append(torch.randn(640, 912, generator=g, device="cuda").to(dtype)[:, 112:704])  # strided rows
    xs[2][100, 200] = float("inf")
    scales = [torch.empty(-(-x.shape[0] // 128), -(-x.shape[1] // 128), device="cuda") for x in xs]
    tasks = [(x, torch.empty_like(x, dtype=torch.float8_e4m3fn), s) for x, s in zip(xs, scales, strict=True)]
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    fp8_kernels.fp8_block_quant_many(tasks, (128, 128), flag=flag)
    for x, q, sf in tasks:
        rq, rs = fp8_kernels.fp8_block_quant(x)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), tuple(x.shape)
        assert torch.equal(sf.view(torch.int32), rs.view(torch.int32)), tuple(x.shape)
    assert int(flag) == 1


_INTERPRETED = textwrap.dedent(
    """
    import torch
    from trainer_side import fp8_kernels
    from trainer_side.quantize import _pad_to_blocks

    def cuda_ref(x):  # _vllm_block with CUDA's `/ 448.0`: a multiply by float32(1 / 448)
        rows, cols = x.shape
        padded = _pad_to_blocks(x, 128, 128)
        blocks = padded.view(padded.shape[0] // 128, 128, padded.shape[1] // 128, 128)
        amax = blocks.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
        sf = amax * torch.tensor(fp8_kernels._INV_FP8_MAX, dtype=torch.float32)
        q = (blocks * (1.0 / sf)).to(torch.float8_e4m3fn)
        return q.view_as(padded)[:rows, :cols], sf.view(blocks.shape[0], blocks.shape[2])

    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = torch.where(torch.isfinite(every), every, torch.zeros_like(every)).view(256, 256)
    g = torch.Generator().manual_seed(0)
    cases = {
        "randn bf16 129x257": torch.randn(129, 257, generator=g).bfloat16(),
        "randn fp32 300x130": torch.randn(300, 130, generator=g),
        "1x1": torch.randn(1, 1, generator=g),
        "zeros": torch.zeros(129, 257),
        "tiny": torch.randn(130, 130, generator=g) * 1e-40,
        "every finite bf16": every,
    }
    for name, x in cases.items():
        q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
        sf = torch.empty(-(-x.shape[0] // 128), -(-x.shape[1] // 128))
        fp8_kernels._launch(x, q, sf, (128, 128), soft_cast=True, num_warps=8)
        rq, rs = cuda_ref(x)
        dq = int((q.view(torch.uint8) != rq.view(torch.uint8)).sum())
        ds = int((sf.view(torch.int32) != rs.view(torch.int32)).sum())
        assert dq == ds == 0, f"{name}: {dq} fp8 bytes, {ds} scale words differ"

    # Row-major weights of one dtype (rows a multiple of 16 long, as `groupable` needs) in one grouped
    # launch, written into views of one buffer; row counts that are not whole blocks exercise the masks.
    nan = torch.randn(40, 144, generator=g)
    nan[5, 7] = float("nan")
    wide = torch.randn(300, 144, generator=g)
    group = [wide, wide[:, :112], torch.randn(1, 16, generator=g), torch.zeros(129, 272),
             torch.randn(130, 160, generator=g) * 1e-40, nan]  # fmt: skip
    sizes = [(x.numel(), -(-x.shape[0] // 128) * -(-x.shape[1] // 128)) for x in group]
    qbuf = torch.zeros(sum(-(-n // 16) * 16 for n, _ in sizes), dtype=torch.float8_e4m3fn)
    sbuf = torch.zeros(sum(m for _, m in sizes))
    tasks, qo, so = [], 0, 0
    for x, (n, m) in zip(group, sizes):
        tasks.append((x, qbuf[qo : qo + n].view(x.shape), sbuf[so : so + m].view(-1, -(-x.shape[1] // 128))))
        qo, so = qo + -(-n // 16) * 16, so + m
    flag = torch.zeros(1, dtype=torch.int32)
    fp8_kernels.fp8_block_quant_many(tasks, (128, 128), flag=flag, soft_cast=True)
    for i, (x, q, sf) in enumerate(tasks[:-1]):  # the NaN task's bytes are NaN codes: only its flag counts
        rq, rs = cuda_ref(x)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), f"grouped task {i}: fp8 bytes differ"
        assert torch.equal(sf.view(torch.int32), rs.view(torch.int32)), f"grouped task {i}: scales differ"
    assert int(flag) == 1, "the NaN weight did not set the flag"
    print("ok")
    """
)


def run_under_triton_interpreter(script: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh Python with `TRITON_INTERPRET=1` (it must be set before triton is imported)
    and the repository on the path; skips when Triton is not installed."""
    if fp8_kernels.triton is None:
        pytest.skip("triton is not installed")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )


def test_kernel_arithmetic_under_the_triton_interpreter() -> None:
    """The kernel's op sequence (bit-pattern amax, clamp, reciprocal, software fp8 cast) on CPU."""
    proc = run_under_triton_interpreter(_INTERPRETED, 300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
