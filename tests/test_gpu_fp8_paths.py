"""FP8 / MXFP8 / NVFP4A16 through every load path on real GPUs (the real vLLM 0.26; FP8: 2 CUDA GPUs).

Runs `bench/gpu_fp8_e2e.py`: a bf16 trainer on GPU0 syncs the FP8 checkpoint served on GPU1 over NCCL,
and each path's generation must equal, exactly, a fresh engine started from the same weights written as
an FP8 checkpoint. The checkpoint path must be refused at init for FP8 (processing re-wraps parameters).
Skips on CPU machines (CI) with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


def _vllm_has_cuda() -> bool:
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cuda())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (trainer on GPU0, vLLM on GPU1)")
@pytest.mark.skipif(
    not _vllm_has_cuda(), reason="needs the CUDA build of vLLM 0.26 (the CPU build cannot serve FP8)"
)
def test_fp8_block_paths_equal_a_fresh_engine(tmp_path: Path) -> None:
    env = {**os.environ, "VLLM_USE_DEEP_GEMM": "0"}
    proc = subprocess.run(
        [sys.executable, "bench/gpu_fp8_e2e.py", "--out-dir", str(tmp_path), "--work", str(tmp_path / "work"),
         "--paths", "kernel,layerwise,checkpoint"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (result_file,) = tmp_path.glob("*-fp8-e2e.json")
    paths = json.loads(result_file.read_text())["paths"]
    for path in ("kernel", "layerwise"):
        assert paths[path]["tokens_equal"] is True and paths[path]["max_logprob_diff"] == 0.0
    assert "re-wrapped" in str(paths["checkpoint"].get("init_error", ""))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (trainer on GPU0, vLLM on GPU1)")
@pytest.mark.skipif(
    not _vllm_has_cuda(), reason="needs the CUDA build of vLLM 0.26 (the CPU build cannot serve FP8)"
)
@pytest.mark.parametrize(
    ("quant", "kernel_refusal"),
    [("channel", "kernel layout mismatch"), ("tensor", "per-tensor scales cannot be fused")],
)
def test_fp8_channel_and_tensor_layerwise_equal_a_fresh_engine(
    tmp_path: Path, quant: str, kernel_refusal: str
) -> None:
    """Per-channel / per-tensor FP8 (run on 4xH200, 2026-11-22): layerwise equals a fresh engine; the
    trainer refuses the kernel layout with the reason (vLLM transposes / cannot fuse those weights)."""
    env = {**os.environ, "VLLM_USE_DEEP_GEMM": "0"}
    subprocess.run(
        [sys.executable, "bench/gpu_fp8_e2e.py", "--quant", quant, "--out-dir", str(tmp_path),
         "--work", str(tmp_path / "work"), "--paths", "layerwise,kernel"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    (result_file,) = tmp_path.glob(f"*-fp8-e2e-{quant}.json")
    paths = json.loads(result_file.read_text())["paths"]
    assert paths["layerwise"]["tokens_equal"] is True and paths["layerwise"]["max_logprob_diff"] == 0.0
    assert kernel_refusal in str(paths["kernel"].get("push_error", ""))


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
@pytest.mark.skipif(
    not _vllm_has_cuda(), reason="needs the CUDA build of vLLM 0.26 (the CPU build cannot serve MXFP8/NVFP4)"
)
@pytest.mark.parametrize("quant", ["mxfp8", "nvfp4a16"])
def test_mx_layerwise_equals_a_fresh_engine_on_one_gpu(tmp_path: Path, quant: str) -> None:
    """MXFP8 / NVFP4A16 (run on one H200, 2026-12-01; vLLM picks its Marlin kernels on Hopper): trainer and
    both engines on GPU 0 over Gloo; layerwise equals a fresh engine exactly, the kernel layout is refused by
    the trainer (Marlin repacks), the checkpoint path at init (processing re-wraps the parameters)."""
    env = {**os.environ, "VLLM_USE_DEEP_GEMM": "0"}
    proc = subprocess.run(
        [sys.executable, "bench/gpu_fp8_e2e.py", "--gpus", "0,0", "--quant", quant, "--enforce-eager",
         "--no-server-logs", "--out-dir", str(tmp_path), "--work", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (result_file,) = tmp_path.glob(f"*-fp8-e2e-{quant}.json")
    paths = json.loads(result_file.read_text())["paths"]
    assert paths["layerwise"]["tokens_equal"] is True and paths["layerwise"]["max_logprob_diff"] == 0.0
    assert "kernel layout mismatch" in str(paths["kernel"].get("push_error", ""))
    assert "re-wrapped" in str(paths["checkpoint"].get("init_error", ""))
