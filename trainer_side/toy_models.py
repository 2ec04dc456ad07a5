"""Small random HF models of real architectures (Llama, Qwen3, Qwen3-MoE), for the demo and the tests.

`toy_config` builds a transformers config of the architecture at a given (tiny by default) shape, with a
fixed seed, so the trainer side, the vLLM side and the references all start from the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3MoeConfig,
)

Arch = Literal["llama", "qwen3", "qwen3_moe"]

DEFAULT_SHAPE: dict[str, int] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
}


def toy_config(arch: Arch = "qwen3", dtype: torch.dtype = torch.float32, **shape: Any) -> PretrainedConfig:
    """A config of `arch` with the tiny default shape, overridden by `shape` (e.g. hidden_size=4096)."""
    kw: dict[str, Any] = {**DEFAULT_SHAPE, **shape}
    kw.setdefault("tie_word_embeddings", False)
    kw["dtype"] = str(dtype).removeprefix("torch.")
    if arch == "llama":
        kw.pop("head_dim", None)
        return LlamaConfig(**kw)
    if arch == "qwen3":
        return Qwen3Config(**kw)
    if arch == "qwen3_moe":
        kw.setdefault("num_experts", 4)
        kw.setdefault("num_experts_per_tok", 2)
        kw.setdefault("moe_intermediate_size", kw["intermediate_size"] // 2)
        kw.setdefault("decoder_sparse_step", 1)
        kw.setdefault("mlp_only_layers", [])
        return Qwen3MoeConfig(**kw)
    raise ValueError(f"unknown toy architecture {arch!r}; known: llama, qwen3, qwen3_moe")


def toy_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model for `config` (deterministic in `seed`), in the config's dtype."""
    torch.manual_seed(seed)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def perturb_(model: torch.nn.Module, step: int, scale: float = 0.05) -> None:
    """An RL-like update: every floating weight moves by seeded noise (stands in for an optimizer step)."""
    gen = torch.Generator().manual_seed(10_000 + step)
    with torch.no_grad():
        for p in model.parameters():
            noise = (torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale).to(p.device)
            p.add_(noise.to(p.dtype) * p.detach().float().std().clamp_min(1e-3).to(p.dtype))


def toy_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ids 0-2 are `<unk> <s> </s>`, id i >= 3 is the word `t<i>`, so servers
    take and return text without any download."""
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)} | {
        f"t{i}": i for i in range(len(specials), vocab_size)
    }
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def save_toy(model: torch.nn.Module, path: str | Path) -> Path:
    """Write `model` as an HF checkpoint directory (config.json + safetensors + tokenizer)."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    toy_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path
