"""Detect the inference model's weight quantization scheme from its HF `config.json`.

Reads the `quantization_config` the way vLLM 0.26 does (`Fp8Config`, `FBGEMMFp8Config`,
`CompressedTensorsConfig`) and turns it into one `QuantScheme`; anything this service cannot
reproduce bit for bit raises `UnsupportedQuantization` instead of guessing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from configs.quant import ActivationMode, QuantKind, QuantScheme

SUPPORTED = (
    "no quantization_config (unquantized); "
    "quant_method 'fp8' (with weight_block_size -> fp8_block, without -> fp8 per-tensor); "
    "quant_method 'fbgemm_fp8' (fp8 per-channel); "
    "quant_method 'compressed-tensors' with format float-quantized/naive-quantized and 8-bit float "
    "weights of strategy block/channel/tensor"
)
_CT_FORMATS = ("float-quantized", "naive-quantized")
_CT_STRATEGY_KIND: dict[str, QuantKind] = {
    "block": "fp8_block",
    "channel": "fp8_channel",
    "tensor": "fp8_tensor",
}


class UnsupportedQuantization(ValueError):
    """The checkpoint's quantization is one this service cannot produce."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}. Supported: {SUPPORTED}")


def load_hf_config(config: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed `config.json`, given the dict itself, the file's path, or the model directory."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no HF config at {path}")
    with path.open() as f:
        parsed = json.load(f)
    if not isinstance(parsed, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return parsed


def _quantization_config(config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    # vLLM falls back to the legacy `compression_config` key, and multimodal configs may nest it.
    for key in ("quantization_config", "compression_config"):
        if config.get(key):
            return config[key]
    text_config = config.get("text_config")
    if isinstance(text_config, Mapping):
        return _quantization_config(text_config)
    return None


def detect_quant_scheme(config: Mapping[str, Any] | str | os.PathLike[str]) -> QuantScheme:
    """The `QuantScheme` of the model whose HF config (dict, file or directory) is `config`."""
    qcfg = _quantization_config(load_hf_config(config))
    if qcfg is None:
        return QuantScheme()
    if not isinstance(qcfg, Mapping):
        raise UnsupportedQuantization(f"quantization_config must be a JSON object, got {qcfg!r}")
    method = qcfg.get("quant_method")
    if method == "fp8":
        return _hf_fp8(qcfg)
    if method == "fbgemm_fp8":
        return _fbgemm_fp8(qcfg)
    if method == "compressed-tensors":
        return _compressed_tensors(qcfg)
    raise UnsupportedQuantization(f"quant_method {method!r} is not supported")


def _name_list(qcfg: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = qcfg.get(key) or ()
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise UnsupportedQuantization(f"{key} must be a list of module names, got {value!r}")
    return tuple(value)


def _hf_fp8(qcfg: Mapping[str, Any]) -> QuantScheme:
    activation = qcfg.get("activation_scheme", "dynamic")
    if activation not in ("dynamic", "static"):
        raise UnsupportedQuantization(f"fp8 activation_scheme {activation!r} (want dynamic or static)")
    fmt = qcfg.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedQuantization(f"fp8 fmt {fmt!r} (only e4m3 weights)")
    # vLLM: ignored_layers wins; modules_to_not_convert is the fallback when it is empty.
    ignore = _name_list(qcfg, "ignored_layers") or _name_list(qcfg, "modules_to_not_convert")
    block = qcfg.get("weight_block_size")
    if block is None:
        return QuantScheme(
            kind="fp8_tensor",
            activation=activation,
            source="fp8",
            weight_scale_name="weight_scale",
            scale_shape="scalar",
            ignore=ignore,
            has_input_scale=activation == "static",
        )
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        raise UnsupportedQuantization(f"fp8 weight_block_size must be two integers, got {block!r}")
    if activation != "dynamic":
        raise UnsupportedQuantization(
            f"fp8 weight_block_size with activation_scheme {activation!r} (vLLM needs dynamic)"
        )
    scale_fmt = qcfg.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise UnsupportedQuantization(f"fp8 scale_fmt {scale_fmt!r} (only ue8m0 or absent)")
    return QuantScheme(
        kind="fp8_block",
        block_size=(block[0], block[1]),
        activation="dynamic",
        source="fp8",
        weight_scale_name="weight_scale_inv",
        scale_shape="2d",
        ue8m0_scale=scale_fmt == "ue8m0",
        ignore=ignore,
    )


def _fbgemm_fp8(qcfg: Mapping[str, Any]) -> QuantScheme:
    ub = qcfg.get("activation_scale_ub")
    return QuantScheme(
        kind="fp8_channel",
        activation="dynamic",
        source="fbgemm_fp8",
        weight_scale_name="weight_scale",
        scale_shape="column",
        ignore=_name_list(qcfg, "modules_to_not_convert"),
        activation_scale_ub=None if ub is None else float(ub),
    )


def _ct_group(name: str, group: Mapping[str, Any], default_format: str | None) -> dict[str, Any]:
    """The parts of one compressed-tensors config group that a `QuantScheme` holds."""
    where = f"compressed-tensors config_groups[{name!r}]"
    weights = group.get("weights")
    if not isinstance(weights, Mapping):
        raise UnsupportedQuantization(f"{where} has no weights quantization")
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise UnsupportedQuantization(
            f"{where}.weights type={weights.get('type')!r} num_bits={weights.get('num_bits')!r} "
            "(only type 'float' with num_bits 8)"
        )
    strategy = weights.get("strategy")
    if strategy not in _CT_STRATEGY_KIND:
        raise UnsupportedQuantization(
            f"{where}.weights.strategy {strategy!r} (want one of {sorted(_CT_STRATEGY_KIND)})"
        )
    if weights.get("symmetric", True) is not True or weights.get("dynamic", False) is not False:
        raise UnsupportedQuantization(f"{where}.weights must be symmetric and static")
    # A set scale_dtype rounds the scales themselves (nvfp4-style); actorder permutes groups.
    if weights.get("actorder") or weights.get("scale_dtype"):
        raise UnsupportedQuantization(f"{where}.weights sets actorder or scale_dtype")
    kind = _CT_STRATEGY_KIND[strategy]
    block: tuple[int, int] | None = None
    if kind == "fp8_block":
        structure = weights.get("block_structure")
        if not (isinstance(structure, list | tuple) and len(structure) == 2):
            raise UnsupportedQuantization(
                f"{where}.weights.block_structure {structure!r} (want [rows, cols])"
            )
        block = (int(structure[0]), int(structure[1]))
    fmt = group.get("format") or default_format
    if fmt not in _CT_FORMATS:
        raise UnsupportedQuantization(f"{where} format {fmt!r} (want one of {list(_CT_FORMATS)})")
    if group.get("output_activations"):
        raise UnsupportedQuantization(f"{where}.output_activations is set")
    inputs = group.get("input_activations")
    activation: ActivationMode = "none"
    if inputs:
        if inputs.get("type") != "float" or inputs.get("num_bits") != 8:
            raise UnsupportedQuantization(f"{where}.input_activations must be 8-bit float")
        dynamic = inputs.get("dynamic")
        if dynamic not in (True, False):
            raise UnsupportedQuantization(f"{where}.input_activations.dynamic {dynamic!r} (want true/false)")
        activation = "dynamic" if dynamic else "static"
    targets = group.get("targets") or ()
    return {
        "kind": kind,
        "block_size": block,
        "activation": activation,
        "format": fmt,
        "targets": tuple(targets),
    }


def _compressed_tensors(qcfg: Mapping[str, Any]) -> QuantScheme:
    sparsity = qcfg.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise UnsupportedQuantization(f"compressed-tensors sparsity format {sparsity.get('format')!r}")
    groups = qcfg.get("config_groups") or {}
    if not groups:
        raise UnsupportedQuantization("compressed-tensors config without config_groups")
    default_format = qcfg.get("format")
    parsed = {name: _ct_group(name, group, default_format) for name, group in groups.items()}
    first_name, first = next(iter(parsed.items()))
    targets: list[str] = []
    for name, part in parsed.items():
        differing = [k for k in ("kind", "block_size", "activation") if part[k] != first[k]]
        if differing:
            detail = ", ".join(f"{k}: {first[k]!r} vs {part[k]!r}" for k in differing)
            raise UnsupportedQuantization(
                f"compressed-tensors config_groups {first_name!r} and {name!r} quantize differently "
                f"({detail}); one model must use a single weight scheme"
            )
        targets += [t for t in part["targets"] if t not in targets]
    kind: QuantKind = first["kind"]
    kv = qcfg.get("kv_cache_scheme")
    return QuantScheme(
        kind=kind,
        block_size=first["block_size"],
        activation=first["activation"],
        source="compressed-tensors",
        format=first["format"],
        weight_scale_name="weight_scale",
        scale_shape={"fp8_block": "2d", "fp8_channel": "column", "fp8_tensor": "one"}[kind],
        ignore=_name_list(qcfg, "ignore"),
        targets=tuple(targets) or ("Linear",),
        has_input_scale=first["activation"] == "static",
        kv_cache_scheme=dict(kv) if kv else None,
    )
