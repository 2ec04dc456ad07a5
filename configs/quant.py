"""The quantization scheme of the inference model, as detected from its HF `config.json`.

One `QuantScheme` travels from detection (trainer side) through the wire header to the inference
worker, so both sides agree on exactly which tensors a quantized linear layer is made of, and which
linear layers vLLM leaves unquantized.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatch
from types import MappingProxyType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

QuantKind = Literal["none", "fp8_block", "fp8_channel", "fp8_tensor", "mxfp8", "nvfp4"]
ActivationMode = Literal["dynamic", "static", "none"]
# Checkpoint layout of one weight's scale: "2d" (ceil(R/b0), ceil(C/b1)); "column" (R, 1);
# "scalar" shape () as AutoFP8 / HF `fp8` per-tensor checkpoints store it; "one" shape (1,) as
# compressed-tensors stores a per-tensor scale. vLLM's loader accepts both per-tensor layouts.
ScaleShape = Literal["2d", "column", "scalar", "one"]

# vLLM's `packed_modules_mapping` for Llama/Qwen-style models: the fused vLLM module -> the HF
# checkpoint modules it is made of. Model-specific mappings can be passed to `is_ignored`.
DEFAULT_FUSED_MAPPING: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
)

_ROUTED_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.[^.]+$")

# Elements sharing one scale along a weight's input dimension, fixed by the format.
MX_GROUP_SIZES: Mapping[str, int] = MappingProxyType({"mxfp8": 32, "nvfp4": 16})


class QuantScheme(BaseModel):
    """How each quantized linear weight is stored in the inference model's checkpoint.

    `kind` says the weight format; `weight_scale_name` says the checkpoint key suffix of its scale
    (`weight_scale_inv` for HF `fp8` blockwise, `weight_scale` otherwise); `scale_shape` its layout;
    `ignore` lists modules left unquantized, matched the way vLLM matches them for `source` (see
    `is_ignored`); `targets` lists what is quantized (compressed-tensors `targets`; default: every
    `Linear`). `ue8m0_scale` means block scales are powers of two (DeepSeek `scale_fmt: ue8m0`).
    `group_size` is the number of input elements sharing one scale for `mxfp8` (32) and `nvfp4` (16).

    `source == "online"` means the checkpoint holds unquantized weights and vLLM quantizes them while
    loading (`--quantization mxfp8`): the stream then carries the unquantized tensors (`quantized` is
    False) and `kind` only records what the server runs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: QuantKind = "none"
    block_size: tuple[int, int] | None = None
    group_size: int | None = None
    activation: ActivationMode = "none"
    source: str = "none"
    format: str | None = None
    weight_scale_name: str = "weight_scale"
    scale_shape: ScaleShape | None = None
    ue8m0_scale: bool = False
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] = ("Linear",)
    has_input_scale: bool = False
    activation_scale_ub: float | None = None
    kv_cache_scheme: dict[str, object] | None = Field(default=None)

    @model_validator(mode="after")
    def _check(self) -> QuantScheme:
        if self.kind == "fp8_block" and self.block_size is None:
            raise ValueError("fp8_block needs block_size, e.g. [128, 128]")
        if self.kind != "fp8_block" and self.block_size is not None:
            raise ValueError(f"block_size is only meaningful for fp8_block, not {self.kind}")
        if self.block_size is not None and min(self.block_size) <= 0:
            raise ValueError(f"block_size must be positive, got {list(self.block_size)}")
        if self.ue8m0_scale and self.kind != "fp8_block":
            raise ValueError(f"ue8m0_scale is only meaningful for fp8_block, not {self.kind}")
        if self.kind in MX_GROUP_SIZES and self.group_size != MX_GROUP_SIZES[self.kind]:
            raise ValueError(
                f"{self.kind} needs group_size {MX_GROUP_SIZES[self.kind]}, got {self.group_size}"
            )
        if self.kind not in MX_GROUP_SIZES and self.group_size is not None:
            raise ValueError(f"group_size is only meaningful for mxfp8/nvfp4, not {self.kind}")
        return self

    @property
    def quantized(self) -> bool:
        """Whether the checkpoint, and so the stream, holds quantized linear weights."""
        return self.kind != "none" and self.source != "online"

    def is_ignored(
        self, module_name: str, fused_mapping: Mapping[str, Sequence[str]] = DEFAULT_FUSED_MAPPING
    ) -> bool:
        """True when vLLM 0.26 loads `module_name` unquantized because of the `ignore` list.

        `module_name` is an HF checkpoint name (`model.layers.0.self_attn.q_proj`) or a fused vLLM
        name (`...self_attn.qkv_proj`). A checkpoint shard of a fused module follows the fused
        module's decision, as in vLLM: ignored when the fused name is listed or when all its shards
        are; a list naming only some shards raises `ValueError` (vLLM refuses such a model too).

        Matching follows `source`: compressed-tensors (`should_ignore_layer`) takes exact names and
        `re:` regexes (`re.match`, anchored at the start only); HF `fp8` / `fbgemm_fp8`
        (`is_layer_skipped`) take exact names only, and a routed expert
        (`...mlp.experts.3.gate_proj`) is skipped when some entry containing "experts" contains
        its MoE prefix (`...mlp.experts`): vLLM decides for the whole fused-MoE layer.
        ModelOpt (`is_layer_excluded`) adds, on that same vLLM prefix, substring matches (an entry
        contained in the name) and `fnmatch` wildcards (`model.layers.0*`).
        """
        if not self.ignore:
            return False
        leaf = module_name.rsplit(".", 1)[-1]
        if leaf not in fused_mapping:
            for fused, shards in fused_mapping.items():
                if leaf in shards and not _ROUTED_EXPERT.match(module_name):
                    module_name = module_name[: len(module_name) - len(leaf)] + fused
                    leaf = fused
                    break
        if self.source in ("compressed-tensors", "online"):
            return self._ct_ignored(module_name, leaf, fused_mapping)
        if self.source == "modelopt":
            return self._modelopt_excluded(module_name, leaf, fused_mapping)
        return self._vllm_skipped(module_name, leaf, fused_mapping)

    def _modelopt_excluded(self, name: str, leaf: str, fused_mapping: Mapping[str, Sequence[str]]) -> bool:
        if self._vllm_skipped(name, leaf, fused_mapping):
            return True
        expert = _ROUTED_EXPERT.match(name)
        prefix = expert.group(1) if expert else name  # vLLM asks once for the whole fused-MoE layer
        return any((e != prefix and e in prefix) or fnmatch(prefix, e) for e in self.ignore)

    def _ct_ignored(self, name: str, leaf: str, fused_mapping: Mapping[str, Sequence[str]]) -> bool:
        def match(layer: str) -> bool:
            return any(
                re.match(p[3:], layer) is not None if p.startswith("re:") else p == layer for p in self.ignore
            )

        if leaf in fused_mapping and name not in self.ignore:
            return _all_or_none(name, leaf, fused_mapping[leaf], match)
        return match(name)

    def _vllm_skipped(self, name: str, leaf: str, fused_mapping: Mapping[str, Sequence[str]]) -> bool:
        if leaf in fused_mapping:
            if name in self.ignore:
                return True
            return _all_or_none(name, leaf, fused_mapping[leaf], lambda shard: shard in self.ignore)
        expert = _ROUTED_EXPERT.match(name)
        prefix = expert.group(1) if expert else name
        if "experts" in prefix:
            return any(prefix in entry for entry in self.ignore if "experts" in entry)
        return name in self.ignore


def _all_or_none(name: str, leaf: str, shards: Sequence[str], match: Callable[[str], bool]) -> bool:
    decisions = {shard: bool(match(name[: len(name) - len(leaf)] + shard)) for shard in shards}
    if len(set(decisions.values())) > 1:
        raise ValueError(
            f"ignore list covers only some shards of fused module {name}: {decisions}; vLLM requires "
            "all shards of a fused layer to share one precision"
        )
    return next(iter(decisions.values()))
