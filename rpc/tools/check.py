"""`layercast check`: a dry run of a trainer's sync against live inference servers; no weights move.

From the trainer's model (an HF model directory or config.json, or a built-in toy shape; built on the
meta device, so nothing is allocated or read) and the trainer settings (`[trainer]` of a TOML file,
`LAYERCAST_TRAINER_*`, flags), it reports per server: the quantization scheme detected from the
inference config, the load path `/init_broadcaster` would choose (`auto` or the one asked for) and why,
the manifest differences (names missing/extra, dtype/shape mismatches against the server's runtime
layout, and the server's verdict on the checkpoint-named stream), and the trainer's memory estimate.
Exit status: 0 when every server would accept the sync and the memory budget (if given) holds, 1 when
not, 2 when a server cannot be asked.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from rich.console import Console

from configs.api import RuntimeTensor
from configs.check import CheckRequest, CheckResponse
from configs.quant import QuantScheme
from configs.settings import SettingsError, TrainerSettings, cli_parser, load_settings
from rpc.client.http_client import tls_context
from trainer_side.detect import detect_quant_scheme
from trainer_side.kernel_layout import KernelLayoutError, fuse_specs
from trainer_side.preflight import Preflight, preflight
from trainer_side.walker import plan_stream

MAX_LISTED = 5
SENDER_BUCKETS = 2  # the sender double-buffers its buckets


@dataclass
class ManifestDiff:
    """The trainer's fused (runtime-layout) stream against a server's runtime manifest."""

    missing: list[str] = field(default_factory=list)  # the server has them, the trainer sends none
    extra: list[str] = field(default_factory=list)  # the trainer sends them, the server has none
    mismatched: list[str] = field(default_factory=list)  # "name: dtype/shape trainer != server"

    @property
    def empty(self) -> bool:
        return not (self.missing or self.extra or self.mismatched)


@dataclass
class ServerCheck:
    url: str
    ok: bool
    load_path: str | None = None
    load_path_reason: str = ""
    num_workers: int = 0
    state: str = ""
    weights_version: int | None = None
    checkpoint_problem: str | None = None
    kernel_problem: str | None = None
    kernel_diff: ManifestDiff | None = None
    error: str | None = None


@dataclass
class CheckReport:
    scheme: str
    scheme_source: str
    trainer_model: str
    num_tensors: int
    stream_bytes: int
    memory: dict[str, Any]
    servers: list[ServerCheck]
    kernel_layout_error: str | None = None

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.servers) and self.memory.get("fits", True)


# ----------------------------------------------------------------------------- the trainer's model


def _config_dict(source: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return dict(source)
    p = Path(source)
    p = p / "config.json" if p.is_dir() else p
    try:
        return json.loads(p.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read the model config {p}: {exc}") from exc


def meta_model(config: str | dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """The HF model of `config` (dir, config.json or dict) on the meta device: shapes only, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = _config_dict(config)
    data.pop("quantization_config", None)  # the trainer holds the unquantized model
    model_type = data.pop("model_type", None)
    if not model_type:
        raise SettingsError("the model config has no model_type")
    cfg = AutoConfig.for_model(model_type, **data)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def toy_meta_model(
    arch: str, dtype: torch.dtype, hidden_size: int, layers: int, vocab: int
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from trainer_side.toy_models import toy_config

    cfg = toy_config(
        arch,  # type: ignore[arg-type]
        dtype,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        vocab_size=vocab,
        intermediate_size=hidden_size * 2,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


# ----------------------------------------------------------------------------- the check


def kernel_diff(
    fused: list[tuple[str, torch.dtype, tuple[int, ...]]], runtime: list[RuntimeTensor]
) -> ManifestDiff:
    mine = {n: (str(d).removeprefix("torch."), tuple(s)) for n, d, s in fused}
    theirs = {t.name: (t.dtype, tuple(t.shape)) for t in runtime}
    diff = ManifestDiff(missing=sorted(set(theirs) - set(mine)), extra=sorted(set(mine) - set(theirs)))
    for name in sorted(set(mine) & set(theirs)):
        (md, ms), (td, ts) = mine[name], theirs[name]
        if md != td:
            diff.mismatched.append(f"{name}: dtype {md} != server {td}")
        elif ms != ts:
            diff.mismatched.append(f"{name}: shape {list(ms)} != server {list(ts)}")
    return diff


def _post_check(client: httpx.Client, req: CheckRequest) -> CheckResponse:
    resp = client.post("/check", json=req.model_dump(mode="json"))
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        raise RuntimeError(f"POST /check answered {resp.status_code}: {detail}")
    return CheckResponse.model_validate(resp.json())


def check_server(
    url: str,
    settings: TrainerSettings,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
) -> tuple[ServerCheck, str | None]:
    """Ask one server; returns its verdict and, if the stream cannot be fused, why."""
    token = settings.token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    entries = [(n, str(d).removeprefix("torch."), tuple(s)) for n, d, s in specs]
    out = ServerCheck(url=url, ok=False)
    fuse_error = None
    try:
        with httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=settings.http_timeout_s, verify=tls_context()
        ) as c:
            first = _post_check(c, CheckRequest(load_path=settings.load_path, checkpoint_manifest=entries))
            # vLLM 0.26 nests some routed experts one level deeper: follow the server's names (as push).
            rename = {
                t.name.replace(".routed_experts.", "."): t.name
                for t in first.runtime_manifest
                if ".routed_experts." in t.name
            }
            try:
                fused = [(rename.get(n, n), d, s) for n, d, s in fuse_specs(specs)]
            except KernelLayoutError as exc:
                fused, fuse_error = None, str(exc)
            answer = first
            if fused is not None:
                kernel = [(n, str(d).removeprefix("torch."), tuple(s)) for n, d, s in fused]
                answer = _post_check(c, CheckRequest(load_path=settings.load_path, kernel_manifest=kernel))
                out.kernel_problem = answer.kernel_problem
                out.kernel_diff = kernel_diff(fused, answer.runtime_manifest)
    except (httpx.HTTPError, RuntimeError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out, fuse_error
    out.load_path, out.load_path_reason = answer.load_path, answer.load_path_reason
    out.num_workers, out.state, out.weights_version = answer.num_workers, answer.state, answer.weights_version
    out.checkpoint_problem = first.checkpoint_problem
    if out.load_path == "kernel":
        out.ok = fused is not None and out.kernel_problem is None
    else:
        out.ok = out.load_path is not None and out.checkpoint_problem is None
    return out, fuse_error


def memory_estimate(pre: Preflight, bucket_bytes: int, budget_bytes: int | None) -> dict[str, Any]:
    buckets = SENDER_BUCKETS * bucket_bytes
    need = pre.walk_peak_bytes + buckets
    out: dict[str, Any] = {
        "largest_chunk": pre.largest_chunk,
        "largest_chunk_bytes": pre.largest_chunk_bytes,
        "largest_param_bytes": pre.largest_param_bytes,
        "quantize_workspace_bytes": pre.quantize_workspace_bytes,
        "send_buckets_bytes": buckets,
        "peak_extra_bytes": need,
    }
    if budget_bytes is not None:
        out["budget_bytes"] = budget_bytes
        out["fits"] = need <= budget_bytes
    return out


def run_check(
    settings: TrainerSettings, model: torch.nn.Module, model_label: str, budget_bytes: int | None = None
) -> CheckReport:
    scheme: QuantScheme = detect_quant_scheme(settings.inference_config)
    dtype = getattr(torch, settings.send_dtype) if settings.send_dtype else None
    specs = [(s.name, s.dtype, s.shape) for s in plan_stream(model, scheme, dtype=dtype)]
    pre = preflight(model, scheme, dtype=dtype)
    servers: list[ServerCheck] = []
    fuse_error = None
    for url in settings.servers:
        result, fuse_error = check_server(url, settings, specs)
        servers.append(result)
    return CheckReport(
        scheme=scheme.kind,
        scheme_source=scheme.source,
        trainer_model=model_label,
        num_tensors=len(specs),
        stream_bytes=pre.total_bytes,
        memory=memory_estimate(pre, settings.bucket_bytes, budget_bytes),
        servers=servers,
        kernel_layout_error=fuse_error,
    )


# ----------------------------------------------------------------------------- output and CLI


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_report(report: CheckReport, console: Console) -> None:
    console.print(
        f"trainer model {report.trainer_model}: {report.num_tensors} tensors, "
        f"{_mib(report.stream_bytes)} per sync; scheme [bold]{report.scheme}[/] ({report.scheme_source})"
    )
    m = report.memory
    line = (
        f"trainer memory during a push: peak extra {_mib(m['peak_extra_bytes'])} = largest chunk "
        f"{m['largest_chunk']!r} {_mib(m['largest_chunk_bytes'])} + largest parameter "
        f"{_mib(m['largest_param_bytes'])} + quantizer workspace {_mib(m['quantize_workspace_bytes'])} "
        f"+ send buckets {_mib(m['send_buckets_bytes'])}"
    )
    if "fits" in m:
        verdict = "[green]fits[/]" if m["fits"] else "[red]does NOT fit[/]"
        line += f"; budget {_mib(m['budget_bytes'])}: {verdict}"
    console.print(line)
    if report.kernel_layout_error:
        console.print(f"kernel layout: the trainer cannot fuse this stream: {report.kernel_layout_error}")
    for s in report.servers:
        verdict = "[green]ok[/]" if s.ok else "[red]NOT ok[/]"
        if s.error:
            console.print(f"{s.url}: {verdict}: cannot ask it: {s.error}")
            continue
        version = f" v{s.weights_version}" if s.weights_version is not None else ""
        path = f"[bold]{s.load_path}[/]" if s.load_path else "[red]refused[/]"
        console.print(f"{s.url}: {verdict}: {s.state}{version}, {s.num_workers} worker(s); load path {path}")
        console.print(f"  why: {s.load_path_reason}", markup=False)
        where = " (what the chosen path loads)" if s.load_path != "kernel" else ""
        console.print(f"  checkpoint names{where}: {s.checkpoint_problem or 'fit'}", markup=False)
        if s.kernel_diff is None:
            continue
        d = s.kernel_diff
        where = " (what the chosen path loads)" if s.load_path == "kernel" else ""
        if d.empty and s.kernel_problem is None:
            console.print(f"  runtime layout{where}: equal", markup=False)
            continue
        console.print(
            f"  runtime layout{where}: {len(d.missing)} missing, {len(d.extra)} extra, "
            f"{len(d.mismatched)} mismatched",
            markup=False,
        )
        for label, items in (("missing", d.missing), ("extra", d.extra), ("mismatched", d.mismatched)):
            if items:
                console.print(f"    {label}: {_listed(items)}", markup=False)
        if s.kernel_problem and s.kernel_problem.startswith("kernel layout not copyable"):
            console.print(f"    {s.kernel_problem}", markup=False)
    console.print("[bold green]check passed[/]" if report.ok else "[bold red]check FAILED[/]")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="layercast check",
        description="Dry run of a sync against live servers: scheme, load path, manifest, memory. "
        "Trainer settings come from --config's [trainer] table, LAYERCAST_TRAINER_* and these flags "
        "(flags win). The token: LAYERCAST_TRAINER_TOKEN (or --token).",
    )
    p.add_argument("--config", default=None, help="TOML settings file (its [trainer] table)")
    g = p.add_argument_group("the trainer's model (default: the inference model's config, unquantized)")
    g.add_argument("--trainer-model", default=None, help="HF model directory or config.json")
    g.add_argument("--toy", default=None, choices=["llama", "qwen3", "qwen3_moe"], help="a toy shape")
    g.add_argument("--hidden-size", type=int, default=128, help="toy hidden size")
    g.add_argument("--layers", type=int, default=2, help="toy decoder layers")
    g.add_argument("--vocab-size", type=int, default=512, help="toy vocabulary")
    g.add_argument("--dtype", default="bfloat16", help="the trainer's parameter dtype")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="fail if a push needs more")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    cli_parser(TrainerSettings, p.add_argument_group("trainer settings"))  # type: ignore[arg-type]
    return p


def main(argv: list[str]) -> int:
    args = vars(parser().parse_args(argv))
    console = Console()
    try:
        settings = load_settings(TrainerSettings, args.pop("config"), args)
    except (SettingsError, ValueError) as exc:
        console.print(f"[red]settings:[/] {exc}")
        return 2
    dtype = getattr(torch, args["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        console.print(f"[red]--dtype {args['dtype']!r} is not a torch dtype[/]")
        return 2
    if args["toy"]:
        model = toy_meta_model(args["toy"], dtype, args["hidden_size"], args["layers"], args["vocab_size"])
        label = f"toy {args['toy']} (hidden {args['hidden_size']}, {args['layers']} layers)"
    else:
        source = args["trainer_model"] or settings.inference_config
        model = meta_model(source, dtype)
        label = str(source) if isinstance(source, str) else "(inline config)"
    budget = int(args["memory_budget_gib"] * 2**30) if args["memory_budget_gib"] else None
    report = run_check(settings, model, label, budget)
    if args["json"]:
        print(json.dumps(asdict(report) | {"ok": report.ok}, indent=2))
    else:
        print_report(report, console)
    if any(s.error for s in report.servers):
        return 2
    return 0 if report.ok else 1
