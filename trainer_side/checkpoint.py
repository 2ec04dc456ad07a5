"""Write a trainer model as the HF checkpoint the inference model is served from (e.g. an HF FP8 one).

`write_hf_checkpoint` walks the model with `iter_layer_chunks` (so the tensors are exactly what a sync
sends: same names, dtypes, shapes and quantized bytes) and writes them with safetensors next to the
inference model's `config.json`. Used to start a server from the trainer's current weights, and as the
reference a sync is compared against. Holds at most one shard (plus one chunk) in host memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from configs.quant import QuantScheme
from trainer_side.detect import detect_quant_scheme
from trainer_side.names import NameMap
from trainer_side.walker import iter_layer_chunks

DEFAULT_SHARD_BYTES = 5 * 1024**3


def write_hf_checkpoint(
    model: nn.Module,
    scheme: QuantScheme,
    out_dir: str | os.PathLike[str],
    base_config: Mapping[str, Any],
    *,
    name_map: NameMap | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write `model` quantized as `scheme` into `out_dir`: `config.json` (= `base_config`, which must
    describe `scheme`, i.e. hold its `quantization_config`; `architectures`, if missing, names the
    model's class) and `model.safetensors`, or numbered shards
    plus `model.safetensors.index.json` when the tensors exceed `max_shard_bytes`. Returns `out_dir`.

    Tokenizer and generation config are not written: copy them from the trainer's model directory.
    On an FSDP trainer every rank calls it (the layer gathers are collectives); only rank 0 writes.
    """
    detected = detect_quant_scheme(base_config)
    if detected != scheme:
        raise ValueError(
            f"base_config describes {detected!r}, not the scheme to write ({scheme!r}): "
            "add the matching quantization_config"
        )
    out = Path(out_dir)
    if dist.is_initialized() and dist.get_rank() != 0:
        for _ in iter_layer_chunks(model, scheme, name_map, dtype=dtype):
            pass
        return out
    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0
    written: list[tuple[Path, list[str]]] = []  # temporary shard file, names in it

    def flush() -> None:
        nonlocal shard, shard_bytes
        tmp = out / f".shard-{len(written):05d}.safetensors.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard, shard_bytes = {}, 0

    for chunk in iter_layer_chunks(model, scheme, name_map, dtype=dtype):
        for name, tensor in chunk.tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + nbytes > max_shard_bytes:
                flush()
            # A host copy: unquantized tensors are views of the parameters (maybe on a GPU).
            shard[name] = tensor.detach().to("cpu", copy=True).contiguous()
            shard_bytes += nbytes
            total_bytes += nbytes
    flush()

    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(written) == 1:
        written[0][0].rename(out / "model.safetensors")
    else:
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(written):
            final_name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            weight_map.update(dict.fromkeys(names, final_name))
            tmp.rename(out / final_name)
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = dict(base_config)
    if not config.get("architectures"):
        # as `save_pretrained` does: without it vLLM cannot tell a causal LM from a pooling model
        # (FSDP2 subclasses the model's class, hence the first transformers class of its MRO)
        classes = type(model).__mro__
        arch = next((c for c in classes if c.__module__.startswith("transformers.")), type(model))
        config["architectures"] = [arch.__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
