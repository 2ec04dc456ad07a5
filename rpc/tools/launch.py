"""Start a `layercast serve` process on this machine and wait until it answers (demo, tests, bench)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def tiny_model_serve_args(served_name: str = "toy", kv_cache_bytes: int = 64 * 2**20) -> list[str]:
    """`vllm serve` arguments for the built-in tiny models on CPU (fp32, short context, small KV cache)."""
    return [
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager",
        "--served-model-name", served_name, "--kv-cache-memory-bytes", str(kv_cache_bytes),
    ]  # fmt: skip


TINY_MODEL_SERVE_ENV: dict[str, str] = {
    "TORCH_COMPILE_DISABLE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"
}  # fmt: skip
"""Environment of a `layercast serve` of a built-in tiny model on CPU: fully eager, threads unpinned.
``--enforce-eager`` runs the model eagerly; ``TORCH_COMPILE_DISABLE`` also covers vLLM's sampler
(``compiled_random_sample``, built during the engine's warm-up), whose CPU inductor build probes the vector
ISAs by spawning a Python per ISA: about 16 s of each engine start on a 2-core machine
(bench/results/2026-12-07-cpu-serve-start.txt), for a toy whose sampling takes microseconds.
``nobind`` and one OpenMP thread: vLLM's CPU default (``auto``) pins every engine's worker to the first core
of its NUMA node and reserves the others, so the demo's two servers and reference engine (and tests running
side by side) all share core 0; unpinned, the OS spreads them. One thread is what ``auto`` gives a worker on
a small machine, and all a toy's matmuls need (more only spin in OpenMP barriers)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One inference server: `layercast serve MODEL --port PORT ...`, its log in `log_path`."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        token: str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/layercast-serve-{self.port}.log")
        args = [
            sys.executable,
            "-m",
            "rpc.tools.cli",
            "serve",
            str(model_dir),
            "--host",
            host,
            "--port",
            str(self.port),
        ]
        args += extra_args or []
        full_env = {**os.environ, **(env or {})}
        if token:
            full_env["LAYERCAST_ADMIN_TOKEN"] = token
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server on port {self.port} exited with {self.proc.returncode}; last log lines:\n"
                    + self.tail()
                )
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server on port {self.port} not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout_s)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
