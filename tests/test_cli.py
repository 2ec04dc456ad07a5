"""The `layercast` CLI: help of every subcommand, settings (TOML < env < flags) for serve/demo/check,
`check` against a real `layercast serve` started from a settings file, the demo end to end with a
fresh-engine reference, and FP8 demos failing fast on CPU.

One server for the `check` tests (module scope); the demo starts its own server and reference engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors import safe_open

from configs.settings import DemoSettings
from rpc.tools.check import main as check_main
from rpc.tools.cli import main as cli_main
from rpc.tools.demo import DemoSetup, parse_settings
from rpc.tools.demo import main as demo_main
from rpc.tools.launch import TINY_MODEL_SERVE_ENV, ServerProcess, tiny_model_serve_args
from rpc.tools.serve_settings import resolve
from tests.conftest import ENGINE_ENV
from tests.toy_server import generate
from trainer_side.detect import detect_quant_scheme
from trainer_side.toy_models import save_toy, toy_config, toy_model

REPO = Path(__file__).resolve().parents[1]
TOKEN = "cli-test-token-abcdef"


def layercast(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERCAST_")}
    full_env |= {"PYTHONPATH": str(REPO), "COLUMNS": "250"}  # rich: no wrapping inside asserted text
    return subprocess.run(
        [sys.executable, "-m", "rpc.tools.cli", *args], cwd=REPO, env=full_env | (env or {}),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("LAYERCAST_"):
            monkeypatch.delenv(key)


# --------------------------------------------------------------------------- help and fast failures


def test_help_of_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    top = layercast("--help")
    assert top.returncode == 0
    for name in ("serve", "demo", "bench", "check"):
        assert name in top.stdout
    assert layercast("nope").returncode == 2

    def help_of(name: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            cli_main([name, "--help"])
        assert exit_.value.code == 0
        return capsys.readouterr().out

    demo = help_of("demo")
    assert "--scheme {none,fp8_block,fp8_channel,fp8_tensor}" in demo and "--config" in demo
    check = help_of("check")
    for flag in ("--config", "--trainer-model", "--toy", "--servers", "--load-path", "--memory-budget-gib"):
        assert flag in check
    assert cli_main(["bench", "--help"]) == 0
    bench = capsys.readouterr().out
    assert "broadcast" in bench and "quant" in bench and "fp8-e2e" in bench


@pytest.mark.slow
def test_serve_help_shows_ours_and_vllms() -> None:
    out = layercast("serve", "--help", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--config FILE" in out.stdout and "LAYERCAST_ADMIN_TOKEN" in out.stdout
    assert "max-model-len" in out.stdout  # vLLM's own help follows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_demo_fails_fast_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    out = layercast("demo", "--scheme", "fp8_block", "--workdir", str(tmp_path / "w"))
    assert out.returncode == 2
    text = " ".join(out.stdout.split())
    assert "--scheme fp8_block needs a GPU" in text and "cannot serve FP8" in text
    assert time.monotonic() - started < 60
    for scheme in ("fp8_channel", "fp8_tensor"):
        assert demo_main(["--scheme", scheme, "--workdir", str(tmp_path / "w")]) == 2
        assert f"--scheme {scheme} needs a GPU" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "w").exists(), "nothing may start before the check"


def test_bench_runs_the_broadcast_smoke_on_cpu(tmp_path: Path) -> None:
    if torch.cuda.device_count() >= 2:
        pytest.skip("with 2 GPUs the bench runs the full NCCL comparison")
    out = layercast("bench", "broadcast", "--syncs", "1", "--warmup", "0", "--layers", "1",
                    "--out-dir", str(tmp_path), timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "--cpu-smoke" in out.stdout and "bench broadcast done" in out.stdout
    assert list(tmp_path.glob("*-broadcast.json"))


# --------------------------------------------------------------------------- settings


def test_demo_settings_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "demo.toml"
    f.write_text('[demo]\narch = "llama"\nsteps = 2\nlayers = 3\nscheme = "fp8_tensor"\n')
    monkeypatch.setenv("LAYERCAST_DEMO_LAYERS", "4")
    s = parse_settings(["--config", str(f), "--steps", "5", "--json", "out.json"])
    assert (s.arch, s.steps, s.layers, s.scheme, s.results_json) == ("llama", 5, 4, "fp8_tensor", "out.json")
    with pytest.raises(SystemExit):  # argparse names the bad choice
        parse_settings(["--scheme", "fp4"])


def test_serve_settings_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "s.toml"
    f.write_text(
        '[server]\nmodel = "/file/model"\nport = 1\nserved_model_name = "file-name"\n'
        'vllm_args = ["--max-model-len", "256"]\n'
    )
    monkeypatch.setenv("LAYERCAST_SERVER_SERVED_MODEL_NAME", "env-name")
    argv, env = resolve(["/flag/model", "--config", str(f), "--port=1234", "--layercast-token", "t0k",
                         "--max-model-len", "128"])  # fmt: skip
    assert argv == ["/flag/model", "--host", "127.0.0.1", "--port", "1234", "--served-model-name", "env-name",
                    "--max-model-len", "256", "--max-model-len", "128"]  # fmt: skip
    assert env["LAYERCAST_ADMIN_TOKEN"] == "t0k" and "t0k" not in argv
    argv, _ = resolve(["--config", str(f)])
    assert argv[:5] == ["/file/model", "--host", "127.0.0.1", "--port", "1"]


# --------------------------------------------------------------------------- serve: admin token, exposure


@pytest.fixture
def serve_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[list[str], str | None]]]:
    """`layercast serve` up to vLLM: each (argv, LAYERCAST_ADMIN_TOKEN) it would start vLLM with."""
    calls: list[tuple[list[str], str | None]] = []
    monkeypatch.setattr(
        "inference_worker.serve.main",
        lambda argv: calls.append((list(argv), os.environ.get("LAYERCAST_ADMIN_TOKEN"))),
    )
    saved = dict(os.environ)
    yield calls
    os.environ.clear()
    os.environ.update(saved)


def test_serve_refuses_an_exposed_host_without_a_token_before_vllm_starts(tmp_path: Path) -> None:
    started = time.monotonic()
    out = layercast("serve", str(tmp_path / "no-model"), "--host", "0.0.0.0")
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()  # one line, and nothing from vLLM
    assert line.startswith("layercast serve: refusing to serve on --host 0.0.0.0 (not a loopback address)")
    for hint in ("--layercast-token-file PATH", "LAYERCAST_ADMIN_TOKEN", "--insecure"):
        assert hint in line
    assert time.monotonic() - started < 60
    f = tmp_path / "s.toml"
    f.write_text('[server]\nmodel = "/m"\nhost = "0.0.0.0"\n')
    out = layercast("serve", "--config", str(f))
    assert out.returncode == 2 and "refusing to serve on --host 0.0.0.0" in out.stderr, out.stderr[-2000:]


def test_serve_exposure_in_process(serve_spy: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    for host in ("0.0.0.0", "::", "[::]", "10.0.0.2", "node1.example", "::ffff:10.0.0.2"):
        assert cli_main(["serve", "/m", "--host", host]) == 2, host
        assert f"--host {host} (not a loopback address)" in capsys.readouterr().err
    assert cli_main(["serve", "/m", "--host", "0.0.0.0", "--host", "127.0.0.1"]) == 0  # the last wins
    for host in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"):
        assert cli_main(["serve", "/m", "--host", host]) == 0, host
    assert cli_main(["serve", "/m"]) == 0  # binds 127.0.0.1
    assert cli_main(["serve", "/m", "--host", "0.0.0.0", "--uds", "/tmp/s.sock"]) == 0  # a Unix socket
    assert capsys.readouterr().err == ""
    assert len(serve_spy) == 8 and all(token is None for _, token in serve_spy)


def test_serve_insecure_warns_loudly_at_every_start(
    serve_spy: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(2):
        assert cli_main(["serve", "/m", "--host", "0.0.0.0", "--insecure"]) == 0
        err = capsys.readouterr().err
        assert "WARNING: INSECURE (--insecure): no admin token" in err and "0.0.0.0" in err
        assert "/update_weights" in err and "reachable from other machines" in err
    assert [argv for argv, _ in serve_spy] == [["/m", "--host", "0.0.0.0"]] * 2  # vLLM never sees it


def test_serve_admin_token_from_a_file_the_settings_the_env_or_the_flag(
    serve_spy: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tf = tmp_path / "token"
    tf.write_text("file-token-123\n")
    tf.chmod(0o600)
    exposed = ["serve", "/m", "--host", "0.0.0.0"]
    assert cli_main([*exposed, "--layercast-token-file", str(tf)]) == 0
    argv, token = serve_spy[-1]
    assert token == "file-token-123" and argv == ["/m", "--host", "0.0.0.0"]
    f = tmp_path / "s.toml"
    f.write_text(f'[server]\nmodel = "/m"\nhost = "0.0.0.0"\ntoken_file = "{tf}"\n')
    assert cli_main(["serve", "--config", str(f)]) == 0
    argv, token = serve_spy[-1]
    assert token == "file-token-123" and argv[:3] == ["/m", "--host", "0.0.0.0"]
    assert "--layercast-token-file" not in argv
    assert capsys.readouterr().err == ""  # neither needs a warning
    os.environ["LAYERCAST_ADMIN_TOKEN"] = "env-token"  # serve_spy restores the environment
    assert cli_main(exposed) == 0 and serve_spy[-1][1] == "env-token"
    assert (
        cli_main([*exposed, "--layercast-token-file", str(tf)]) == 0 and serve_spy[-1][1] == "file-token-123"
    )
    assert capsys.readouterr().err == ""
    # On the command line: works, but warns that `ps` shows it (without printing it).
    del os.environ["LAYERCAST_ADMIN_TOKEN"]
    assert cli_main([*exposed, "--layercast-token", "flag-token"]) == 0
    argv, token = serve_spy[-1]
    assert token == "flag-token" and "flag-token" not in argv
    err = capsys.readouterr().err
    assert "WARNING: --layercast-token" in err and "`ps`" in err and "flag-token" not in err
    calls = len(serve_spy)
    # Refused (exit 2, vLLM not started): both sources, an empty or missing file.
    assert cli_main([*exposed, "--layercast-token", "t", "--layercast-token-file", str(tf)]) == 2
    assert "not both" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert cli_main([*exposed, "--layercast-token-file", str(empty)]) == 2
    assert f"the admin token file {empty} is empty" in capsys.readouterr().err
    assert cli_main([*exposed, "--layercast-token-file", str(tmp_path / "nope")]) == 2
    assert f"cannot read the admin token file {tmp_path / 'nope'}" in capsys.readouterr().err
    assert len(serve_spy) == calls
    tf.chmod(0o644)  # readable by others: served, with a warning
    assert cli_main([*exposed, "--layercast-token-file", str(tf)]) == 0
    assert "readable by other users" in capsys.readouterr().err


def test_demo_setup_for_fp8_on_gpus(tmp_path: Path) -> None:
    s = DemoSettings(scheme="fp8_block", servers=2, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="needs a GPU"):
        DemoSetup.of(s, cuda_devices=0)
    with pytest.raises(ValueError, match="multiple of 128"):
        DemoSetup.of(s.model_copy(update={"hidden_size": 192}), cuda_devices=3)
    setup = DemoSetup.of(s, cuda_devices=3)
    assert setup.reference == "engine" and setup.dtype == torch.bfloat16
    assert setup.trainer_device == torch.device("cuda", 0)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in setup.server_envs] == ["1", "2"]
    assert setup.backend == "nccl"
    assert setup.reference_env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert "--dtype" in setup.serve_args and "bfloat16" in setup.serve_args
    # Engines small enough to share a GPU: a fixed KV cache, no share of the GPU's memory to profile.
    assert "--kv-cache-memory-bytes" in setup.serve_args


@pytest.mark.parametrize(
    ("servers", "cuda_devices", "server_gpus", "backend"),
    [
        (1, 2, ["1"], "nccl"),  # a GPU per rank: NCCL
        (2, 3, ["1", "2"], "nccl"),
        (3, 8, ["1", "2", "3"], "nccl"),
        (1, 1, ["0"], "gloo"),  # one GPU: trainer and server share it, so Gloo
        (2, 1, ["0", "0"], "gloo"),
        (2, 2, ["0", "1"], "gloo"),  # fewer GPUs than ranks: round-robin from GPU 0
        (3, 2, ["0", "1", "0"], "gloo"),
    ],
)
def test_demo_fp8_with_fewer_gpus_than_ranks_shares_gpus_over_gloo(
    tmp_path: Path, servers: int, cuda_devices: int, server_gpus: list[str], backend: str
) -> None:
    s = DemoSettings(scheme="fp8_block", servers=servers, workdir=str(tmp_path))
    setup = DemoSetup.of(s, cuda_devices=cuda_devices)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in setup.server_envs] == server_gpus
    assert setup.backend == backend
    assert setup.trainer_device == torch.device("cuda", 0)
    assert setup.reference_env == {"CUDA_VISIBLE_DEVICES": "0"}


def test_demo_without_quantization_keeps_the_cpu_setup(tmp_path: Path) -> None:
    setup = DemoSetup.of(DemoSettings(servers=2, workdir=str(tmp_path)), cuda_devices=1)
    assert setup.trainer_device == torch.device("cpu") and setup.backend == "auto"
    assert setup.server_envs == [TINY_MODEL_SERVE_ENV, TINY_MODEL_SERVE_ENV]  # no GPU placement


@pytest.mark.parametrize("scheme", ["fp8_block", "fp8_channel", "fp8_tensor"])
def test_demo_writes_the_fp8_model_it_serves(scheme: str, tmp_path: Path) -> None:
    # What the GPU demo serves, written here on CPU (the quantizers run on CPU): its config declares
    # the scheme, its linear weights are FP8, and every merged projection part fits 128x128 blocks.
    setup = DemoSetup.of(DemoSettings(scheme=scheme, workdir=str(tmp_path)), cuda_devices=2)
    setup.trainer_device = torch.device("cpu")
    cfg = setup.model_config()
    assert cfg.head_dim * cfg.num_key_value_heads % 128 == 0 and cfg.intermediate_size % 128 == 0
    out = setup.write_served_model(toy_model(cfg, seed=0), tmp_path / "model")
    assert detect_quant_scheme(out).kind == scheme
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert (out / "tokenizer.json").exists()


# --------------------------------------------------------------------------- check against a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("cli")
    model_dir = save_toy(toy_model(toy_config("qwen3", torch.float32), seed=0), work / "model")
    settings = work / "serve.toml"
    args = tiny_model_serve_args()
    del args[args.index("--served-model-name") : args.index("--served-model-name") + 2]
    settings.write_text(
        '[server]\nmodel = "/no/such/model"\nport = 1\nserved_model_name = "file-name"\n'
        f"vllm_args = {json.dumps(args)}\n"
    )
    # The flags (MODEL, --port from ServerProcess) beat the file; the environment beats the file too.
    env = ENGINE_ENV | {"LAYERCAST_SERVER_SERVED_MODEL_NAME": "toy"}
    proc = ServerProcess(model_dir, extra_args=["--config", str(settings)], token=TOKEN, env=env,
                         log_path=work / "server.log")  # fmt: skip
    try:
        proc.wait_ready(300)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def trainer_toml(server: ServerProcess) -> Path:
    path = server.log_path.parent / "trainer.toml"
    model = server.log_path.parent / "model"
    path.write_text(
        f'[trainer]\nservers = ["{server.url}"]\ninference_config = "{model}"\nload_path = "checkpoint"\n'
    )
    return path


@pytest.fixture
def check_json(
    trainer_toml: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, dict[str, Any]]]:
    """`layercast check --config trainer.toml --json ARGS` in this process (a real server, real HTTP)."""
    monkeypatch.setenv("LAYERCAST_TRAINER_TOKEN", TOKEN)

    def run(*args: str) -> tuple[int, dict[str, Any]]:
        rc = check_main(["--config", str(trainer_toml), "--json", *args])
        out = capsys.readouterr().out
        assert TOKEN not in out
        return rc, json.loads(out)

    return run


@pytest.mark.slow
def test_server_started_from_settings(server: ServerProcess) -> None:
    tokens, _ = generate(server.url)  # served as "toy": the environment beat the file's name
    assert len(tokens) > 0
    assert httpx.post(server.url + "/check", json={}).status_code == 401  # admin route


@pytest.mark.slow
def test_check_passes_for_the_served_model(
    server: ServerProcess, trainer_toml: Path, check_json: Any
) -> None:
    out = layercast("check", "--config", str(trainer_toml), "--load-path", "auto", "--dtype", "float32",
                    env={"LAYERCAST_TRAINER_TOKEN": TOKEN})  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    text = " ".join(out.stdout.split())
    assert "scheme none" in text and "load path layerwise" in text
    assert "checkpoint names (what the chosen path loads): fit" in text
    assert "check passed" in text and TOKEN not in out.stdout + out.stderr
    rc, report = check_json("--load-path", "auto", "--dtype", "float32")
    assert rc == 0 and report["ok"] and report["scheme"] == "none"
    (s,) = report["servers"]
    assert s["load_path"] == "layerwise" and s["checkpoint_problem"] is None and s["state"] == "uninitialized"
    # vLLM's CPU kernels keep linear weights in oneDNN: the runtime layout differs, which check shows.
    assert s["kernel_problem"] and "opaque" in s["kernel_problem"]
    status = httpx.get(server.url + "/weights").json()
    assert status["state"] == "uninitialized" and status["weights_version"] is None  # nothing was sent


@pytest.mark.slow
def test_check_reports_manifest_differences(server: ServerProcess, check_json: Any) -> None:
    rc, report = check_json("--load-path", "auto", "--toy", "qwen3", "--layers", "3",
                            "--dtype", "float32")  # fmt: skip
    assert rc == 1 and not report["ok"]
    (s,) = report["servers"]
    assert "model.layers.2.self_attn.q_proj.weight: unknown tensor" in s["checkpoint_problem"]
    diff = s["kernel_diff"]
    assert "model.layers.2.self_attn.qkv_proj.weight" in diff["extra"] and not diff["missing"]
    rc, report = check_json("--load-path", "auto", "--toy", "qwen3", "--vocab-size", "640",
                            "--dtype", "float32")  # fmt: skip
    (s,) = report["servers"]
    assert rc == 1 and "embed_tokens.weight: 640 vocab rows, the model has 512" in s["checkpoint_problem"]
    assert any(m.startswith("model.embed_tokens.weight: shape [640, 128] != server [512, 128]")
               for m in s["kernel_diff"]["mismatched"])  # fmt: skip


@pytest.mark.slow
def test_check_refused_path_and_memory_budget(server: ServerProcess, check_json: Any) -> None:
    rc, report = check_json("--dtype", "float32")  # the file asks for the checkpoint path
    (s,) = report["servers"]
    assert rc == 1 and s["load_path"] is None and "checkpoint path refused" in s["load_path_reason"]
    rc, report = check_json("--load-path", "auto", "--dtype", "float32",
                            "--bucket-bytes", "1048576", "--memory-budget-gib", "0.001")  # fmt: skip
    m = report["memory"]
    assert rc == 1 and m["fits"] is False and m["send_buckets_bytes"] == 2 * 2**20
    assert m["peak_extra_bytes"] == (m["largest_chunk_bytes"] + m["largest_param_bytes"]
                                     + m["quantize_workspace_bytes"] + m["send_buckets_bytes"])  # fmt: skip


@pytest.mark.slow
def test_check_names_an_unreachable_server(check_json: Any) -> None:
    rc, report = check_json("--servers", "http://127.0.0.1:9", "--http-timeout-s", "2")
    assert rc == 2 and "ConnectError" in report["servers"][0]["error"]


# --------------------------------------------------------------------------- the demo


@pytest.mark.slow
def test_demo_from_settings_verified_against_a_fresh_engine(tmp_path: Path) -> None:
    cfg = tmp_path / "demo.toml"
    cfg.write_text('[demo]\nsteps = 3\nreference = "engine"\nlayers = 1\n')
    results = tmp_path / "results.json"
    out = layercast("demo", "--config", str(cfg), "--steps", "1", "--workdir", str(tmp_path / "work"),
                    "--json", str(results), env={"LAYERCAST_DEMO_MAX_TOKENS": "4"}, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "all steps verified" in out.stdout and "per-step sync timings" in out.stdout
    (step,) = json.loads(results.read_text())  # one step (flag beat the file), one server
    assert step["step"] == 1 and step["tokens"] == step["reference"] and len(step["tokens"]) == 4
    assert step["max_logprob_diff"] < 1e-3
    assert (tmp_path / "work" / "reference-step1.log").exists()
    assert "1 layers" in out.stdout and "reference engine" in out.stdout
