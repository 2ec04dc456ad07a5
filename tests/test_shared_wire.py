"""The `ipc` backend's handles and guards (`broadcaster.shared_wire`), in one process: what a receiver
refuses to open, and that a handle is a typed model with nothing pickled in it. The multi-process protocol
scenarios on `ipc` are in test_broadcaster.py, the vLLM load paths over it in test_load_paths_e2e.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from broadcaster.shared_wire import SHM_DIR, SHM_PREFIX, SharedWireError, device_identity, open_buffer
from configs.wire import SharedBufferHandle

CPU = torch.device("cpu")


@pytest.fixture
def shm_file() -> Iterator[Path]:
    path = SHM_DIR / f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    path.write_bytes(bytes(range(256)) * 4)
    yield path
    path.unlink(missing_ok=True)


def test_a_handle_of_this_device_opens_and_shares_bytes(shm_file: Path) -> None:
    me = device_identity(CPU)
    h = SharedBufferHandle(kind="cpu_shm", device_id=me, nbytes=1024, path=str(shm_file))
    a, b = open_buffer(h, CPU, me), open_buffer(h, CPU, me)
    assert torch.equal(a[:256], torch.arange(256, dtype=torch.uint8))
    a[0] = 77  # both mappings are the same memory
    assert int(b[0]) == 77


def test_a_handle_of_another_device_is_refused(shm_file: Path) -> None:
    h = SharedBufferHandle(kind="cpu_shm", device_id="cuda:GPU-someone-else", nbytes=16, path=str(shm_file))
    with pytest.raises(SharedWireError, match=r"cannot be opened on cpu:.*every rank on the trainer"):
        open_buffer(h, CPU, device_identity(CPU))


@pytest.mark.parametrize("path", ["/etc/passwd", "/dev/shm/not-ours", "/dev/shm/../etc/passwd"])
def test_a_path_outside_layercast_shm_files_is_refused(path: str) -> None:
    me = device_identity(CPU)
    h = SharedBufferHandle(kind="cpu_shm", device_id=me, nbytes=16, path=path)
    with pytest.raises(SharedWireError, match="refusing a shared buffer outside"):
        open_buffer(h, CPU, me)


def test_a_handle_larger_than_its_file_is_refused(shm_file: Path) -> None:
    me = device_identity(CPU)
    h = SharedBufferHandle(kind="cpu_shm", device_id=me, nbytes=4096, path=str(shm_file))
    with pytest.raises(SharedWireError, match="holds 1024 bytes, the handle says 4096"):
        open_buffer(h, CPU, me)


def test_handles_are_typed_fields_only() -> None:
    with pytest.raises(ValidationError, match="kind"):
        SharedBufferHandle(kind="pickle", device_id="cpu:x", nbytes=1)
    with pytest.raises(ValidationError, match="extra"):
        SharedBufferHandle.model_validate(
            {"kind": "cpu_shm", "device_id": "x", "nbytes": 1, "obj": "cos\nsystem"}
        )
    with pytest.raises(ValidationError, match="nbytes"):
        SharedBufferHandle(kind="cpu_shm", device_id="x", nbytes=0)


def test_device_identity_names_the_host_memory() -> None:
    me = device_identity(CPU)
    assert me.startswith("cpu:") and me == device_identity(CPU)
