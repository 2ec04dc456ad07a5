"""Trainer parameter names → HF checkpoint names, and which checkpoint modules the scheme quantizes.

Naming happens in two steps: wrapper components that training frameworks splice into module paths
(`torch.compile`, activation checkpointing, FSDP1, DDP) are stripped, then the caller's optional
`name_map` turns what is left into the name the parameter has in the HF transformers model (fused MoE
experts keep their fused name here; `trainer_side.layers` splits them).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from configs.quant import QuantScheme

NameMap = Callable[[str], str | None]
"""Maps a trainer parameter name to its HF name; `None` drops the parameter from the stream."""

_WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})

# Linear-shaped checkpoint modules vLLM never quantizes whatever the scheme says: the LM head is a
# vocab embedding there, and Qwen's shared-expert gate is built with quant_config=None.
_NEVER_QUANTIZED_LEAVES = frozenset({"lm_head", "shared_expert_gate"})

# The MoE router. transformers 5 stores it as a TopKRouter (not nn.Linear) but vLLM builds it as a
# quantizable ReplicatedLinear, so it is quantized unless the scheme ignores it. Public FP8 checkpoints
# (e.g. Qwen/Qwen3-30B-A3B-FP8) list every `model.layers.N.mlp.gate` in `modules_to_not_convert`,
# which the detected scheme carries in `ignore`.
_ROUTER_SUFFIX = ".mlp.gate"


def strip_wrappers(name: str) -> str:
    """Drop wrapper components (`_orig_mod`, `_checkpoint_wrapped_module`, ...) and a DDP `module.`."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def hf_name(trainer_name: str, name_map: NameMap | None) -> str | None:
    """The HF transformers name of a trainer parameter, or None when `name_map` drops it."""
    name = strip_wrappers(trainer_name)
    return name if name_map is None else name_map(name)


def _matches_target(module_name: str, owner: nn.Module | None, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module_name) is not None
    return target == "Linear" or (owner is not None and type(owner).__name__ == target)


def is_quantized(module_name: str, owner: nn.Module | None, scheme: QuantScheme, *, expert: bool) -> bool:
    """Whether the checkpoint stores `<module_name>.weight` quantized under `scheme`.

    Only Linear-like modules qualify (as in vLLM, where quantization applies to linear layers and
    experts): `owner` is the trainer module holding the weight; `expert` marks a matrix split out of
    fused MoE expert tensors (a Linear in the checkpoint, whatever holds it in the trainer).
    """
    if not scheme.quantized or module_name.rsplit(".", 1)[-1] in _NEVER_QUANTIZED_LEAVES:
        return False
    linear_like = expert or isinstance(owner, nn.Linear) or module_name.endswith(_ROUTER_SUFFIX)
    if not linear_like or scheme.is_ignored(module_name):
        return False
    return any(_matches_target(module_name, owner, t) for t in scheme.targets)
