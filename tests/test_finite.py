"""Non-finite weights are found (and named) before a sync starts, on every rank of a sharded trainer."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rpc.tools.launch import free_port
from trainer_side.broadcast import _finite_verdict
from trainer_side.finite import describe_nonfinite, nonfinite_tensors


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8).to(torch.float16)
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_dtype_and_kind_is_named(value: float, index: int) -> None:
    model = _model()
    assert nonfinite_tensors(model) == []
    with torch.no_grad():
        model[index].weight[2, 3] = value
    assert nonfinite_tensors(model) == [f"{index}.weight"]


def test_buffers_are_not_checked_and_names_are_listed() -> None:
    model = _model()
    model.register_buffer("scratch", torch.full((4,), float("nan")), persistent=False)
    assert nonfinite_tensors(model) == []  # never sent: a garbage buffer must not block a push
    with torch.no_grad():
        for i in range(3):
            model[i].bias[0] = float("nan")
    names = nonfinite_tensors(model)
    assert names == ["0.bias", "1.bias", "2.bias"]
    assert describe_nonfinite(names, limit=2) == (
        "non-finite values (NaN or inf) in 3 weight tensor(s): 0.bias, 1.bias and 1 more"
    )


def _rank(rank: int, port: int, poisoned_rank: int, out: dict[int, str | None]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model()
        if rank == poisoned_rank:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        out[rank] = _finite_verdict(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("poisoned_rank", [0, 1])
def test_every_rank_of_a_sharded_trainer_gets_the_verdict(poisoned_rank: int) -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(free_port(), poisoned_rank, out), nprocs=2, join=True)
        verdicts = dict(out)
    assert verdicts[poisoned_rank] is not None and "0.weight" in verdicts[poisoned_rank]
    other = verdicts[1 - poisoned_rank]
    assert other is not None and "another trainer rank" in other
