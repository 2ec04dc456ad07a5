"""The colocated peer: vLLM 0.26's own `ipc` weight-transfer engine, trainer and vLLM on ONE GPU.

A trainer process holds the BF16 Qwen3-shaped model on the GPU and calls
`IPCWeightTransferEngine.trainer_send_weights(..., packed=True)` (its packed buffer, 2 GiB here as in the
2026-12-01 measurement); each chunk's update info (IPC handles pickled and base64-encoded, as vLLM's HTTP
transport sends them; `VLLM_ALLOW_INSECURE_SERIALIZATION=1`) goes to this process, which hands it to
`LLM.update_weights` between `start_weight_update` and `finish_weight_update`; vLLM quantizes online
(`quantization="fp8_per_block"`, layerwise reload). One warm-up, then `--syncs` timed syncs: the time of
start + every chunk + finish, measured here. vLLM's `ipc_engine` imports `ray` at module level: put an
empty `ray` package on PYTHONPATH where ray is not installed.

    python bench/peer_ipc.py --shape 8b --syncs 5 --out /tmp/peer-ipc-8b.json
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PACKED_BYTES = 2 << 30


def trainer(shape: str, k: int, chunks: Any, acks: Any, ready: Any) -> None:
    import torch
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerSendWeightsArgs, IPCWeightTransferEngine

    from bench.common import build_model

    m = build_model(shape, torch.bfloat16, torch.device("cuda"), seed=0)
    params = list(m.named_parameters())
    ready.put({"params": sum(p.numel() for _, p in params), "bytes": sum(p.nbytes for _, p in params)})

    def send(info: Any) -> None:
        fields = {
            "names": info.names, "dtype_names": info.dtype_names, "shapes": info.shapes,
            "packed": info.packed, "tensor_sizes": info.tensor_sizes,
            "ipc_handles_pickled": base64.b64encode(pickle.dumps(info.ipc_handles)).decode(),
        }  # fmt: skip
        chunks.put(fields)
        acks.get()  # the engine loaded this chunk: the packed buffer may be reused

    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(k + 1):
        acks.get()  # go
        IPCWeightTransferEngine.trainer_send_weights(
            iter(params),
            IPCTrainerSendWeightsArgs(send_mode=send, packed=True, packed_buffer_size_bytes=PACKED_BYTES),
        )
        chunks.put(None)
    ready.put({"trainer_peak_extra_bytes": torch.cuda.max_memory_allocated() - base})


def mem(self: Any, reset: bool = False) -> tuple[int, int]:
    # A copy of peer_native.mem on purpose: defined in the script run as __main__, vLLM's collective_rpc
    # pickles it by value, so the engine process need not import `bench`.
    import torch

    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--syncs", type=int, default=5)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    ctx = mp.get_context("spawn")
    chunks, acks, ready = ctx.Queue(), ctx.Queue(), ctx.Queue()
    tp = ctx.Process(target=trainer, args=(args.shape, args.syncs, chunks, acks, ready))
    tp.start()
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
        model=d, load_format="dummy", quantization="fp8_per_block", weight_transfer_config={"backend": "ipc"},
        enforce_eager=True, gpu_memory_utilization=args.gpu_memory_utilization, skip_tokenizer_init=True,
        max_model_len=1024,
    )  # fmt: skip
    print(f"peer_ipc: engine up in {time.time() - t:.0f}s", flush=True)
    meta = ready.get(timeout=600)
    llm.init_weight_transfer_engine({"init_info": {}})
    base, _ = llm.collective_rpc(mem, kwargs={"reset": True})[0]
    syncs, n_chunks = [], 0
    for _ in range(args.syncs + 1):
        t0 = time.perf_counter()
        acks.put("go")
        llm.start_weight_update()
        n_chunks = 0
        while (fields := chunks.get(timeout=600)) is not None:
            llm.update_weights({"update_info": fields})
            acks.put("ok")
            n_chunks += 1
        llm.finish_weight_update()
        syncs.append(time.perf_counter() - t0)
    _, peak = llm.collective_rpc(mem)[0]
    trainer_mem = ready.get(timeout=60)
    tp.join(60)
    out = llm.generate(
        [TokensPrompt(prompt_token_ids=[5, 6, 7, 8])], SamplingParams(max_tokens=8, temperature=0)
    )
    row: dict[str, Any] = {
        "probe": "vllm-ipc-engine-colocated-bf16-to-fp8_per_block", "shape": args.shape,
        "params": meta["params"], "bytes_sent": meta["bytes"], "packed_buffer_bytes": PACKED_BYTES,
        "chunks": n_chunks, "peer_sync_s_all": syncs[1:], "peer_s": median(syncs[1:]),
        "trainer_peak_extra_bytes": trainer_mem["trainer_peak_extra_bytes"],
        "inference_peak_extra_bytes": peak - base, "generated": list(out[0].outputs[0].token_ids),
    }  # fmt: skip
    print("peer_ipc: " + json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
