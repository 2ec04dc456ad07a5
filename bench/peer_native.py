"""The peer a user would pick instead of layercast: vLLM 0.26's native NCCL weight-transfer engine sending
the trainer's BF16 weights (packed, its default 1 GiB x 2 buffers) to a vLLM that quantizes online
(`quantization="fp8_per_block"`, layerwise reload), plus a raw NCCL broadcast of the same bytes.

Adapted from `shared/device/probes/peer_native_bf16.py` (the measurement the project's device notes
quote): trainer on one GPU, vLLM (offline `LLM`) on another; `K` timed syncs after one warm-up. With
`--go-file` the engine starts at once but the timed syncs wait for that file (so a benchmark can start
this engine while it measures something else, and measure the two one after the other).

    python bench/peer_native.py --shape 8b --syncs 5 --gpus 2,3 --out /tmp/peer-8b.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _wait_go(go_file: str | None, timeout_s: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout_s
    while go_file and not os.path.exists(go_file):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go file {go_file} after {timeout_s:.0f} s")
        time.sleep(0.2)


def trainer(shape: str, k: int, gpu: str, port: int, barrier: Any, q: Any) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLTrainerSendWeightsArgs,
        NCCLWeightTransferEngine,
    )

    from bench.common import build_model

    m = build_model(shape, torch.bfloat16, torch.device("cuda"), seed=0)
    params = list(m.named_parameters())
    nbytes = sum(p.numel() * p.element_size() for _, p in params)
    q.put({"names": [n for n, _ in params], "dtype_names": [str(p.dtype).split(".")[-1] for _, p in params],
           "shapes": [list(p.shape) for _, p in params], "params": sum(p.numel() for _, p in params),
           "bytes": nbytes})  # fmt: skip
    group = NCCLWeightTransferEngine.trainer_init(
        {"master_address": "127.0.0.1", "master_port": port, "world_size": 2}
    )
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sends = []
    for _ in range(k + 1):
        barrier.wait()
        torch.cuda.synchronize()
        t = time.perf_counter()
        NCCLWeightTransferEngine.trainer_send_weights(
            iter(params), NCCLTrainerSendWeightsArgs(group=group, packed=True)
        )
        torch.cuda.synchronize()
        sends.append(time.perf_counter() - t)
        barrier.wait()
    peak = torch.cuda.max_memory_allocated() - base
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    barrier.wait()
    raws = []
    for _ in range(k + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        group.broadcast(buf, src=0, stream=torch.cuda.current_stream())
        torch.cuda.synchronize()
        raws.append(time.perf_counter() - t)
    q.put({"trainer_send_s": sends[1:], "raw_nccl_s_all": raws[1:], "trainer_peak_extra_bytes": peak})


def raw_recv(self: Any, nbytes: int, k: int) -> bool:
    import torch

    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    g = self.weight_transfer_engine.model_update_group
    for _ in range(k + 1):
        g.broadcast(buf, src=0, stream=torch.cuda.current_stream())
    torch.cuda.synchronize()
    return True


def mem(self: Any, reset: bool = False) -> tuple[int, int]:
    import torch

    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--syncs", type=int, default=5)
    ap.add_argument("--gpus", default="0,1", help="trainer GPU, vLLM GPU")
    ap.add_argument("--port", type=int, default=29611)
    ap.add_argument("--go-file", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    k = args.syncs
    trainer_gpu, engine_gpu = args.gpus.split(",")
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    tp = ctx.Process(target=trainer, args=(args.shape, k, trainer_gpu, args.port, barrier, q))
    tp.start()
    os.environ["CUDA_VISIBLE_DEVICES"] = engine_gpu
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from bench.common import COMMON, SHAPES, median

    d = tempfile.mkdtemp()
    cfg = {**SHAPES[args.shape], **COMMON, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
           "torch_dtype": "bfloat16"}  # fmt: skip
    Path(d, "config.json").write_text(json.dumps(cfg))
    Path(d, "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t = time.time()
    llm = LLM(
        model=d, load_format="dummy", quantization="fp8_per_block",
        weight_transfer_config={"backend": "nccl"}, enforce_eager=True, gpu_memory_utilization=0.5,
        skip_tokenizer_init=True, max_model_len=1024,
    )  # fmt: skip
    print(f"peer: engine up in {time.time() - t:.0f}s", flush=True)
    meta = q.get()
    llm.init_weight_transfer_engine({"init_info": {"master_address": "127.0.0.1", "master_port": args.port,
                                                   "rank_offset": 1, "world_size": 2}})  # fmt: skip
    _wait_go(args.go_file)
    base, _ = llm.collective_rpc(mem, kwargs={"reset": True})[0]
    info = {
        "names": meta["names"],
        "dtype_names": meta["dtype_names"],
        "shapes": meta["shapes"],
        "packed": True,
    }
    syncs = []
    for _ in range(k + 1):
        barrier.wait()
        t0 = time.perf_counter()
        llm.start_weight_update()
        llm.update_weights({"update_info": info})
        llm.finish_weight_update()
        syncs.append(time.perf_counter() - t0)
        barrier.wait()
    _, peak = llm.collective_rpc(mem)[0]
    barrier.wait()
    llm.collective_rpc(raw_recv, args=(meta["bytes"], k))
    res = q.get()
    tp.join()
    out = llm.generate(
        [TokensPrompt(prompt_token_ids=[5, 6, 7, 8])], SamplingParams(max_tokens=8, temperature=0)
    )
    med = median(syncs[1:])
    raw = median(res["raw_nccl_s_all"])
    row: dict[str, Any] = {
        "probe": "vllm-native-nccl-bf16-to-fp8_per_block", "shape": args.shape, "params": meta["params"],
        "bytes_sent": meta["bytes"], "peer_sync_s_all": syncs[1:], "peer_s": med, "raw_nccl_s": raw,
        "raw_nccl_s_all": res["raw_nccl_s_all"], "peer_ratio_vs_raw": med / raw,
        "trainer_send_s": res["trainer_send_s"], "trainer_peak_extra_bytes": res["trainer_peak_extra_bytes"],
        "inference_peak_extra_bytes": peak - base, "generated": list(out[0].outputs[0].token_ids),
    }  # fmt: skip
    print("peer: " + json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
