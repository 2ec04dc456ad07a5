"""`layercast demo`: the main job. A small built-in model served by vLLM, a trainer, RL-like steps.

Each step changes the trainer's weights (seeded noise standing in for an optimizer step), pushes them to
every server through layercast, then verifies each server's greedy generation and logprobs against a
reference of the trainer's new weights, and prints a table of per-step timings. References: `hf`, the
trainer's own model through HF transformers (unquantized models); `engine`, a fresh vLLM engine started
from the trainer's new weights written as the served checkpoint (the FP8 schemes, on GPU; as
`bench/gpu_fp8_e2e.py`). Options come from `--config`'s `[demo]` table, `LAYERCAST_DEMO_*` and flags.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from configs.api import Backend
from configs.settings import DemoSettings, SettingsError, cli_parser, load_settings
from configs.trainer import BroadcasterConfig
from rpc.client.http_client import AsyncServerClient
from rpc.tools.demo_fp8 import fp8_shape, gpu_placement, quantization_config, scheme_problem
from rpc.tools.launch import TINY_MODEL_SERVE_ENV, ServerProcess, free_port, tiny_model_serve_args
from trainer_side.broadcast import WeightBroadcaster
from trainer_side.checkpoint import write_hf_checkpoint
from trainer_side.detect import detect_quant_scheme
from trainer_side.toy_models import perturb_, save_toy, toy_config, toy_model, toy_tokenizer

PROMPT = [5, 17, 42, 99, 7, 256]
MAX_LOGPROB_DIFF = 1e-3
Generation = tuple[list[int], list[float]]


def parse_settings(argv: list[str]) -> DemoSettings:
    """`[demo]` of `--config` < `LAYERCAST_DEMO_*` < flags."""
    p = cli_parser(DemoSettings, argparse.ArgumentParser(prog="layercast demo", description=__doc__))
    p.add_argument("--config", default=None, help="TOML settings file (its [demo] table)")
    p.add_argument("--json", dest="results_json", default=None, help="same as --results-json")
    values = vars(p.parse_args(argv))
    return load_settings(DemoSettings, values.pop("config"), values)


@torch.no_grad()
def reference_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> Generation:
    """Greedy tokens and their logprobs from the trainer's own model (HF transformers, fp32)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(n):
        logits = model(ids).logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        tok = int(torch.argmax(lp))
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        ids = torch.cat([ids, torch.tensor([[tok]], device=device)], dim=1)
    return tokens, logprobs


async def _generate(url: str, model_name: str, n: int) -> Generation:
    async with AsyncServerClient(url, timeout_s=120.0) as client:
        out = await client.complete_tokens(model_name, PROMPT, n, logprobs=1)
    choice = out["choices"][0]
    return list(choice["token_ids"]), [float(x) for x in choice["logprobs"]["token_logprobs"]]


def generate(url: str, n: int) -> Generation:
    return asyncio.run(_generate(url, "toy", n))


@dataclass
class DemoSetup:
    """Where things run and how the served model is written, decided before anything starts."""

    settings: DemoSettings
    work: Path
    gpu: bool
    dtype: torch.dtype
    trainer_device: torch.device
    quant: dict[str, Any] | None
    reference: str
    serve_args: list[str]
    server_envs: list[dict[str, str]]
    reference_env: dict[str, str] = field(default_factory=dict)
    backend: Backend = "auto"

    @classmethod
    def of(cls, s: DemoSettings, cuda_devices: int) -> DemoSetup:
        """Raises `ValueError` (with the reason) when the demo cannot run here as asked."""
        problem = scheme_problem(s.scheme, s.hidden_size, cuda_devices)
        if problem:
            raise ValueError(problem)
        fp8 = s.scheme != "none"
        reference = s.reference if s.reference != "auto" else ("engine" if fp8 else "hf")
        work = Path(s.workdir or tempfile.mkdtemp(prefix="layercast-demo-"))
        if not fp8:
            return cls(s, work, False, torch.float32, torch.device("cpu"), None, reference,
                       tiny_model_serve_args(), [dict(TINY_MODEL_SERVE_ENV) for _ in range(s.servers)],
                       dict(TINY_MODEL_SERVE_ENV), backend="ipc" if s.colocate else "auto")  # fmt: skip
        # FP8 on GPU: bf16 trainer on GPU 0 (with the reference engines), servers placed by
        # `gpu_placement` (their own GPUs and NCCL, or sharing GPUs over Gloo). The small fixed KV cache
        # keeps every engine small enough to share a GPU.
        serve_args = [
            "--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager",
            "--served-model-name", "toy", "--kv-cache-memory-bytes", str(64 * 2**20),
            "--gpu-memory-utilization", "0.2",
        ]  # fmt: skip
        gpus, backend = gpu_placement(s.servers, cuda_devices)
        if s.colocate:  # every server on the trainer's GPU, buckets through CUDA IPC
            gpus, backend = [0] * s.servers, "ipc"
        envs = [{"CUDA_VISIBLE_DEVICES": str(g)} for g in gpus]
        return cls(s, work, True, torch.bfloat16, torch.device("cuda", 0), quantization_config(s.scheme),
                   reference, serve_args, envs, {"CUDA_VISIBLE_DEVICES": "0"}, backend)  # fmt: skip

    def model_config(self) -> Any:
        s = self.settings
        shape: dict[str, Any] = {
            "hidden_size": s.hidden_size, "num_hidden_layers": s.layers, "vocab_size": s.vocab_size,
            "intermediate_size": s.hidden_size * 2,
        }  # fmt: skip
        if self.quant is not None:
            shape |= fp8_shape(s.hidden_size)
        return toy_config(s.arch, self.dtype, **shape)

    def write_served_model(self, model: torch.nn.Module, out: Path) -> Path:
        """The checkpoint a server starts from: the toy as is, or quantized with its FP8 config."""
        if self.quant is None:
            return save_toy(model, out)
        base = model.config.to_dict() | {"quantization_config": self.quant}
        write_hf_checkpoint(model, detect_quant_scheme(base), out, base)
        toy_tokenizer(model.config.vocab_size).save_pretrained(out)
        return out


def start_engine_reference(setup: DemoSetup, model: torch.nn.Module, step: int) -> ServerProcess:
    """Start (without waiting) a fresh vLLM engine from `model` written as the served checkpoint."""
    ref_dir = setup.write_served_model(model, setup.work / f"reference-step{step}")
    return ServerProcess(ref_dir, extra_args=setup.serve_args, env=setup.reference_env,
                         log_path=setup.work / f"reference-step{step}.log")  # fmt: skip


def engine_reference(setup: DemoSetup, ref: ServerProcess) -> Generation:
    """Greedy generation of the fresh engine `ref`, which is stopped afterwards."""
    try:
        ref.wait_ready()
        return generate(ref.url, setup.settings.max_tokens)
    finally:
        ref.stop()


class EngineReferences:
    """Step `step`'s fresh reference engine; step 1's is started with the servers (its weights are
    known then: `perturb_` is seeded by the step) and used only if they equal what step 1 pushed."""

    def __init__(self, setup: DemoSetup, trainer_model: torch.nn.Module) -> None:
        self.setup, self.model = setup, trainer_model
        self.first: torch.nn.Module | None = copy.deepcopy(trainer_model)
        perturb_(self.first, 1)
        self.ahead: ServerProcess | None = start_engine_reference(setup, self.first, 1)

    def __call__(self, step: int) -> Generation:
        ref, self.ahead = self.ahead, None
        if ref is not None and (step != 1 or not _same_weights(self.first, self.model)):
            ref.stop()
            ref = None
        self.first = None
        return engine_reference(self.setup, ref or start_engine_reference(self.setup, self.model, step))

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.stop()


def _same_weights(a: torch.nn.Module | None, b: torch.nn.Module) -> bool:
    if a is None:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main(argv: list[str]) -> int:
    console = Console()
    try:
        settings = parse_settings(argv)
        setup = DemoSetup.of(settings, torch.cuda.device_count())
    except (SettingsError, ValueError) as exc:  # before anything started
        console.print(f"[bold red]layercast demo:[/] {exc}")
        return 2
    return run(setup, console)


def run(setup: DemoSetup, console: Console) -> int:
    s = setup.settings
    setup.work.mkdir(parents=True, exist_ok=True)
    trainer_model = toy_model(setup.model_config(), seed=0).to(setup.trainer_device)
    model_dir = setup.write_served_model(trainer_model, setup.work / "model")
    params = sum(p.numel() for p in trainer_model.parameters())
    console.print(
        f"[bold]layercast demo[/]: {s.arch}, {params / 1e6:.2f}M params, {s.layers} layers, "
        f"scheme {s.scheme}, {s.servers} server(s), load path {s.load_path}, "
        f"reference {setup.reference}; work dir {setup.work}"
    )
    servers = [
        ServerProcess(model_dir, extra_args=setup.serve_args, env=env, log_path=setup.work / f"server{i}.log")
        for i, env in enumerate(setup.server_envs)
    ]
    reference: Callable[[int], Generation]
    engines: EngineReferences | None = None
    results: list[dict[str, Any]] = []
    ok_all = True
    try:
        if setup.reference == "engine":  # step 1's engine starts beside the servers
            reference = engines = EngineReferences(setup, trainer_model)
        else:
            reference = lambda step: reference_greedy(trainer_model, PROMPT, s.max_tokens)  # noqa: E731
        t0 = time.perf_counter()
        with console.status("starting vLLM server(s) (about 30 s on CPU)..."):
            for server in servers:
                server.wait_ready()
        urls = ", ".join(x.url for x in servers)
        console.print(f"server(s) ready in {time.perf_counter() - t0:.1f} s: {urls}")
        bc = WeightBroadcaster(
            BroadcasterConfig(
                servers=[x.url for x in servers],
                inference_config=str(model_dir),
                master_port=free_port(),
                backend=setup.backend,
                load_path=s.load_path,
                bucket_bytes=int(s.bucket_mib * 2**20),
            )
        )
        inits = bc.init()
        assert bc.group is not None
        console.print(f"broadcast group: backend [bold]{bc.group.backend}[/], {bc.group.world_size} ranks")
        for url, r in inits.items():
            console.print(f"{url}: ranks {r.ranks}, load path [bold]{r.load_path}[/] ({r.load_path_reason})")
        table = Table(title=f"per-step sync timings (scheme {s.scheme})")
        for col in ("step", "bytes", "quantize ms", "send ms", "load ms", "total ms", "MB/s", "verified"):
            table.add_column(col, justify="right")
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())  # fmt: skip
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("steps", total=s.steps)
            for step in range(1, s.steps + 1):
                progress.update(task, description=f"step {step}: change weights, push")
                perturb_(trainer_model, step)
                report = bc.push(trainer_model, version=step)
                progress.update(task, description=f"step {step}: verify ({setup.reference} reference)")
                ref_tokens, ref_lps = reference(step)
                verdicts = []
                for server in servers:
                    tokens, lps = generate(server.url, s.max_tokens)
                    max_diff = max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True))
                    verdicts.append(tokens == ref_tokens and max_diff < MAX_LOGPROB_DIFF)
                    results.append({"step": step, "server": server.url, "tokens": tokens,
                                    "reference": ref_tokens, "max_logprob_diff": max_diff})  # fmt: skip
                load_s = max(r.timings.load_s for r in report.servers.values())
                verified = all(verdicts)
                ok_all &= verified
                table.add_row(
                    str(step),
                    f"{report.bytes_sent:,}",
                    f"{report.quantize_s * 1e3:.1f}",
                    f"{report.send_s * 1e3:.1f}",
                    f"{load_s * 1e3:.1f}",
                    f"{report.total_s * 1e3:.1f}",
                    f"{report.bytes_sent / report.total_s / 1e6:.1f}",
                    "[green]yes[/]" if verified else "[red]NO[/]",
                )
                results[-1]["report"] = report.summary()
                progress.advance(task)
            progress.update(task, description="steps done")
        console.print(table)
        bc.close()
    finally:
        for server in servers:
            server.stop()
        if engines is not None:
            engines.close()
    if s.results_json:
        Path(s.results_json).write_text(json.dumps(results, indent=2))
    console.print("[bold green]all steps verified[/]" if ok_all else "[bold red]verification FAILED[/]")
    return 0 if ok_all else 1
