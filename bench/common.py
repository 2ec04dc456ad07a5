"""What the GPU benchmarks share: Qwen3 shapes, inference model directories, fast model init on a GPU,
server launch with our plugin, and the checks run after the timed syncs (weights digest, generations)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from broadcaster.checksum import tensor_checksum
from rpc.client.http_client import AsyncServerClient
from trainer_side.toy_models import toy_tokenizer

# Qwen3 shapes (public configs of Qwen3-0.6B / 8B / 32B; 0.6B and 8B untied here so every size has an
# lm_head) and a tiny one for the CPU smoke runs.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "32b": dict(vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128),
}  # fmt: skip
COMMON = dict(max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
              hidden_act="silu")  # fmt: skip
FP8_BLOCK = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "weight_block_size": [128, 128],
}
PLUGIN_EP = "layercast = inference_worker.http_plugin:LayercastEndpointPlugin"
PROMPTS = [list(range(10, 42)), [7, 300, 1200, 55, 400, 248, 99, 150, 3, 77, 250, 64]]


def qwen3_config(shape: str, dtype: torch.dtype) -> Qwen3Config:
    return Qwen3Config(**SHAPES[shape], **COMMON, dtype=str(dtype).removeprefix("torch."))


def write_inference_dir(path: Path, shape: str, dtype: torch.dtype, quant: dict[str, Any] | None) -> Path:
    """An HF model directory without weights (servers use `--load-format dummy`): config, tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = qwen3_config(shape, dtype).to_dict()
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    if quant:
        cfg["quantization_config"] = dict(quant)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    toy_tokenizer(cfg["vocab_size"]).save_pretrained(path)
    return path


def build_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A Qwen3 model of `shape` made directly on `device` (no CPU copy), weights from `reseed_`."""
    with torch.device("meta"):
        model = Qwen3ForCausalLM(qwen3_config(shape, dtype))
    model = model.to_empty(device=device).to(dtype).eval()
    reseed_(model, seed)
    return model


@torch.no_grad()
def reseed_(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights for `seed` on the model's own device: N(0, 0.02) matrices, norms near 1.
    Each sync of a benchmark uses its own seed, so every sync carries new values."""
    for i, (_, p) in enumerate(model.named_parameters()):
        gen = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
        if p.dim() == 1:
            p.normal_(1.0, 0.02, generator=gen)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def plugin_env(work: Path) -> dict[str, str]:
    """Env for servers: the repo on PYTHONPATH, and our endpoint plugin registered (a minimal dist-info)
    when `layercast` is not pip-installed where the servers run."""
    repo = str(Path(__file__).resolve().parents[1])
    paths = [repo, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    eps = importlib.metadata.entry_points(group="vllm.endpoint_plugins")
    if not any(ep.name == "layercast" for ep in eps):
        info = work / "plugin-site" / "layercast-0.0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: layercast\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text(f"[vllm.endpoint_plugins]\n{PLUGIN_EP}\n")
        paths.insert(0, str(work / "plugin-site"))
    return {"PYTHONPATH": os.pathsep.join(paths), "VLLM_SERVER_DEV_MODE": "1"}


def rpc(url: str, method: str, *args: str, timeout_s: float = 600.0) -> list[Any]:
    """vLLM's dev `/collective_rpc` (servers run with VLLM_SERVER_DEV_MODE=1): one result per worker."""
    r = httpx.post(f"{url}/collective_rpc", json={"method": method, "args": list(args)}, timeout=timeout_s)
    r.raise_for_status()
    return list(r.json()["results"])


def sent_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list[int]]:
    """`broadcaster.checksum.weights_digest` of a stream, computed tensor by tensor as it is produced."""
    sums: dict[str, torch.Tensor] = {n: tensor_checksum(t) for n, t in tensors}
    names = sorted(sums)
    values = torch.stack([sums[n] for n in names]).cpu().tolist() if names else []
    return dict(zip(names, values, strict=True))


def digest_diff(server: dict[str, list[int]], sent: dict[str, list[int]]) -> list[str]:
    """Names whose runtime bytes differ from what was sent (or are on one side only)."""
    return sorted(n for n in set(server) | set(sent) if server.get(n) != sent.get(n))


async def _complete(url: str, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    async with AsyncServerClient(url, timeout_s=300.0) as c:
        out = await c.complete_tokens("toy", prompt, n, logprobs=1)
    choice = out["choices"][0]
    return list(choice["token_ids"]), [float(x) for x in choice["logprobs"]["token_logprobs"]]


def generate(url: str, vocab: int, n: int = 12) -> list[tuple[list[int], list[float]]]:
    return [asyncio.run(_complete(url, [3 + (i - 3) % (vocab - 3) for i in p], n)) for p in PROMPTS]


def compare(a: list[tuple[list[int], list[float]]], b: list[tuple[list[int], list[float]]]) -> dict[str, Any]:
    tokens_equal = all(ta == tb for (ta, _), (tb, _) in zip(a, b, strict=True))
    diffs = [abs(x - y) for (_, la), (_, lb) in zip(a, b, strict=True) for x, y in zip(la, lb, strict=False)]
    return {"tokens_equal": tokens_equal, "max_logprob_diff": max(diffs) if diffs else None}


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def sync_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stamp() -> str:
    return time.strftime("%H:%M:%S")
