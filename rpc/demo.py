"""`layercast demo`: the main job. A small built-in model served by vLLM, a trainer, RL-like steps.

Each step changes the trainer's weights (seeded noise standing in for an optimizer step), pushes them to
every server through layercast, then verifies each server's greedy generation and logprobs against a
reference computed from the trainer's new weights, and prints a table of per-step timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from configs.trainer import BroadcasterConfig
from rpc.client import AsyncServerClient
from rpc.launch import ServerProcess, free_port, tiny_model_serve_args
from trainer_side.broadcast import WeightBroadcaster
from trainer_side.toy_models import perturb_, save_toy, toy_config, toy_model

PROMPT = [5, 17, 42, 99, 7, 256]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="layercast demo", description=__doc__)
    p.add_argument("--arch", default="qwen3", choices=["llama", "qwen3", "qwen3_moe"])
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--load-path", default="auto", choices=["auto", "kernel", "checkpoint", "layerwise"])
    p.add_argument("--bucket-mib", type=float, default=64.0)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--workdir", default=None, help="where the model and server logs go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the per-step results to this JSON file")
    return p.parse_args(argv)


@torch.no_grad()
def reference_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from the trainer's own model (HF transformers, fp32)."""
    ids = torch.tensor([prompt])
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(n):
        logits = model(ids).logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        tok = int(torch.argmax(lp))
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return tokens, logprobs


async def _generate(url: str, model_name: str, n: int) -> tuple[list[int], list[float]]:
    async with AsyncServerClient(url, timeout_s=120.0) as client:
        out = await client.complete_tokens(model_name, PROMPT, n, logprobs=1)
    choice = out["choices"][0]
    return list(choice["token_ids"]), [float(x) for x in choice["logprobs"]["token_logprobs"]]


def main(argv: list[str]) -> int:
    args = _parse(argv)
    console = Console()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="layercast-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = toy_config(
        args.arch,
        torch.float32,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab_size,
        intermediate_size=args.hidden_size * 2,
    )
    trainer_model = toy_model(cfg, seed=0)
    model_dir = save_toy(trainer_model, work / "model")
    params = sum(p.numel() for p in trainer_model.parameters())
    console.print(
        f"[bold]layercast demo[/]: {args.arch}, {params / 1e6:.2f}M params, {args.layers} layers, "
        f"{args.servers} server(s), load path {args.load_path}; work dir {work}"
    )

    servers = [
        ServerProcess(
            model_dir,
            extra_args=tiny_model_serve_args(),
            log_path=work / f"server{i}.log",
        )
        for i in range(args.servers)
    ]
    results: list[dict[str, Any]] = []
    ok_all = True
    try:
        t0 = time.perf_counter()
        with console.status("starting vLLM server(s) (about 30 s on CPU)..."):
            for s in servers:
                s.wait_ready()
        console.print(
            f"server(s) ready in {time.perf_counter() - t0:.1f} s: {', '.join(s.url for s in servers)}"
        )
        bc = WeightBroadcaster(
            BroadcasterConfig(
                servers=[s.url for s in servers],
                inference_config=str(model_dir),
                master_port=free_port(),
                load_path=args.load_path,
                bucket_bytes=int(args.bucket_mib * 2**20),
            )
        )
        inits = bc.init()
        for url, r in inits.items():
            console.print(f"{url}: ranks {r.ranks}, load path [bold]{r.load_path}[/] ({r.load_path_reason})")
        table = Table(title="per-step sync timings")
        for col in ("step", "bytes", "quantize ms", "send ms", "load ms", "total ms", "MB/s", "verified"):
            table.add_column(col, justify="right")
        for step in range(1, args.steps + 1):
            perturb_(trainer_model, step)
            report = bc.push(trainer_model, version=step)
            ref_tokens, ref_lps = reference_greedy(trainer_model, PROMPT, args.max_tokens)
            verdicts = []
            for s in servers:
                tokens, lps = asyncio.run(_generate(s.url, "toy", args.max_tokens))
                max_diff = max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True))
                verdicts.append(tokens == ref_tokens and max_diff < 1e-3)
                results.append(
                    {
                        "step": step,
                        "server": s.url,
                        "tokens": tokens,
                        "reference": ref_tokens,
                        "max_logprob_diff": max_diff,
                    }
                )
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
        console.print(table)
        bc.close()
    finally:
        for s in servers:
            s.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    console.print("[bold green]all steps verified[/]" if ok_all else "[bold red]verification FAILED[/]")
    return 0 if ok_all else 1
