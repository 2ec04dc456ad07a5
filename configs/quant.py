"""The quantization scheme of the inference model, as detected from its HF `config.json`.

One `QuantScheme` travels from detection (trainer side) through the wire header to the inference
worker, so both sides agree on exactly which tensors a quantized linear layer is made of.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

QuantKind = Literal["none", "fp8_block", "fp8_channel", "fp8_tensor", "mxfp8", "nvfp4"]
ActivationMode = Literal["dynamic", "static", "none"]


class QuantScheme(BaseModel):
    """How each quantized linear weight is stored in the inference model's checkpoint.

    `kind` says the weight format; `weight_scale_name` says the checkpoint key suffix of its scale
    (`weight_scale_inv` for HF `fp8` blockwise, `weight_scale` otherwise); `ignore` lists module
    patterns left unquantized (plain names, prefixes, or `re:<regex>` entries as in compressed-tensors);
    `targets` lists what is quantized (compressed-tensors `targets`; default: every `Linear`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: QuantKind = "none"
    block_size: tuple[int, int] | None = None
    group_size: int | None = None
    activation: ActivationMode = "none"
    source: str = "none"
    format: str | None = None
    weight_scale_name: str = "weight_scale"
    scale_shape: Literal["2d", "column", "scalar"] | None = None
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] = ("Linear",)
    has_input_scale: bool = False
    kv_cache_scheme: dict[str, object] | None = Field(default=None)

    @model_validator(mode="after")
    def _check(self) -> QuantScheme:
        if self.kind == "fp8_block" and self.block_size is None:
            raise ValueError("fp8_block needs block_size, e.g. [128, 128]")
        if self.kind != "fp8_block" and self.block_size is not None:
            raise ValueError(f"block_size is only meaningful for fp8_block, not {self.kind}")
        if self.block_size is not None and min(self.block_size) <= 0:
            raise ValueError(f"block_size must be positive, got {list(self.block_size)}")
        return self

    @property
    def quantized(self) -> bool:
        return self.kind != "none"

    def is_ignored(self, module_name: str) -> bool:
        """True when `module_name` (e.g. `model.layers.0.mlp.gate`) matches an ignore entry."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], module_name) or re.match(pattern[3:], module_name):
                    return True
            elif (
                module_name == pattern
                or module_name.endswith("." + pattern)
                or module_name.startswith(pattern + ".")
                or ("." + pattern + ".") in ("." + module_name + ".")
            ):
                return True
        return False
