"""Detect the inference model's weight quantization scheme from its HF `config.json`.

Reads the `quantization_config` the way vLLM 0.26 does (`Fp8Config`, `FBGEMMFp8Config`,
`CompressedTensorsConfig`, the ModelOpt configs, ModelOpt's legacy `hf_quant_config.json`, and the
online `--quantization` shorthands) and turns it into one `QuantScheme`; anything this service
cannot reproduce bit for bit raises `UnsupportedQuantization` instead of guessing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from configs.quant import MX_GROUP_SIZES, ActivationMode, QuantKind, QuantScheme

SUPPORTED = (
    "no quantization_config (unquantized); "
    "quant_method 'fp8' (with weight_block_size -> fp8_block, without -> fp8 per-tensor); "
    "quant_method 'fbgemm_fp8' (fp8 per-channel); "
    "quant_method 'compressed-tensors' with format float-quantized/naive-quantized and 8-bit float "
    "weights of strategy block/channel/tensor, MXFP8 (8-bit float, strategy group, group_size 32, "
    "scale_dtype uint8) and NVFP4 (format nvfp4-pack-quantized: 4-bit float, strategy tensor_group, "
    "group_size 16; NVFP4A16 or with NVFP4 input activations); "
    "ModelOpt (quant_method 'modelopt*' in config.json or hf_quant_config.json) with quant_algo "
    "FP8, NVFP4, W4A16_NVFP4 or MXFP8; quant_method 'mxfp8' (ModelOpt MXFP8 format); "
    "the online --quantization shorthands 'mxfp8' and 'nvfp4_per_token' on an unquantized checkpoint"
)
_CT_FORMATS = ("float-quantized", "naive-quantized")
_MODELOPT_FP4_ALGOS = ("NVFP4", "W4A16_NVFP4")
# vLLM's `--quantization` shorthands that quantize an unquantized checkpoint while loading it.
ONLINE_KINDS: dict[str, QuantKind] = {"mxfp8": "mxfp8", "nvfp4_per_token": "nvfp4"}
_CT_STRATEGY_KIND: dict[str, QuantKind] = {
    "block": "fp8_block",
    "channel": "fp8_channel",
    "tensor": "fp8_tensor",
}


class UnsupportedQuantization(ValueError):
    """The checkpoint's quantization is one this service cannot produce."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}. Supported: {SUPPORTED}")


def _read_json(path: Path) -> dict[str, Any]:
    with path.open() as f:
        parsed = json.load(f)
    if not isinstance(parsed, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return parsed


def load_hf_config(config: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed `config.json`, given the dict itself, the file's path, or the model directory.

    As vLLM does, a `config.json` without `quantization_config` takes it from an
    `hf_quant_config.json` next to it (ModelOpt <= 0.29 writes it there).
    """
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no HF config at {path}")
    parsed = _read_json(path)
    side_file = path.parent / "hf_quant_config.json"
    if parsed.get("quantization_config") is None and side_file.is_file():
        parsed["quantization_config"] = _read_json(side_file)
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


def _quant_method(qcfg: Mapping[str, Any]) -> str:
    """`quant_method` as vLLM settles it (`_normalize_quantization_config`, overrides)."""
    producer = qcfg.get("producer")
    inner = qcfg.get("quantization")
    legacy = isinstance(inner, Mapping) and "modelopt_quant_config" in inner
    if (isinstance(producer, Mapping) and producer.get("name") == "modelopt") or legacy:
        algo = inner.get("quant_algo") if isinstance(inner, Mapping) else None
        if algo is not None:
            upper = str(algo).upper()
            if upper in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO"):
                return "modelopt"
            if upper != "NVFP4":  # vLLM: "Unknown ModelOpt quant algo"
                raise UnsupportedQuantization(
                    f"ModelOpt producer config with quant_algo {algo!r} (vLLM 0.26 reads only FP8* and "
                    "NVFP4 from a producer-tagged config)"
                )
            return "modelopt_fp4"
    method = str(qcfg.get("quant_method", "")).lower().replace("compressed_tensors", "compressed-tensors")
    return method


def detect_quant_scheme(
    config: Mapping[str, Any] | str | os.PathLike[str], *, quantization: str | None = None
) -> QuantScheme:
    """The `QuantScheme` of the model whose HF config (dict, file or directory) is `config`.

    `quantization` is the server's `--quantization` argument, if any. An online shorthand
    (`mxfp8`, `nvfp4_per_token`) on an unquantized checkpoint gives a scheme with `source`
    'online': the server quantizes while loading, so the stream carries the unquantized weights.
    """
    qcfg = _quantization_config(load_hf_config(config))
    if qcfg is None:
        return _online(quantization) if quantization is not None else QuantScheme()
    if not isinstance(qcfg, Mapping):
        raise UnsupportedQuantization(f"quantization_config must be a JSON object, got {qcfg!r}")
    method = _quant_method(qcfg)
    if quantization is not None and quantization != method:
        raise UnsupportedQuantization(
            f"--quantization {quantization!r} on a checkpoint quantized with quant_method {method!r}"
        )
    if method == "fp8":
        return _hf_fp8(qcfg)
    if method == "fbgemm_fp8":
        return _fbgemm_fp8(qcfg)
    if method == "compressed-tensors":
        return _compressed_tensors(qcfg)
    if method.startswith("modelopt") or method == "mxfp8":
        return _modelopt(qcfg, method)
    raise UnsupportedQuantization(f"quant_method {method!r} is not supported")


def _online(quantization: str) -> QuantScheme:
    kind = ONLINE_KINDS.get(quantization)
    if kind is None:
        raise UnsupportedQuantization(
            f"--quantization {quantization!r} on an unquantized checkpoint (online shorthands: "
            f"{sorted(ONLINE_KINDS)})"
        )
    return QuantScheme(kind=kind, group_size=MX_GROUP_SIZES[kind], activation="dynamic", source="online")


def _modelopt(qcfg: Mapping[str, Any], method: str) -> QuantScheme:
    """ModelOpt FP8 / NVFP4 / MXFP8, parsed as `ModelOptQuantConfigBase.from_config` parses them."""
    if method == "mxfp8" and "quantization" not in qcfg and not qcfg.get("quant_algo"):
        # MiniMax-style `quant_method: "mxfp8"`: vLLM rewrites it into the ModelOpt MXFP8 form.
        qcfg = {
            "quant_method": "modelopt",
            "quantization": {
                "quant_algo": "MXFP8",
                "kv_cache_quant_algo": qcfg.get("kv_cache_quant_algo"),
                "exclude_modules": qcfg.get("ignored_layers", []) or [],
            },
        }
    inner = qcfg.get("quantization")
    if inner is not None:
        if not isinstance(inner, Mapping):
            raise UnsupportedQuantization(f"ModelOpt 'quantization' must be a JSON object, got {inner!r}")
        algo, ignore_key, section, where = inner.get("quant_algo"), "exclude_modules", inner, "quantization."
    else:
        algo, ignore_key, section, where = qcfg.get("quant_algo"), "ignore", qcfg, ""
    if not algo:
        raise UnsupportedQuantization("ModelOpt config without quant_algo")
    algo = str(algo).upper()
    ignore = _name_list(section, ignore_key)
    if "MXFP8" in algo:
        if inner is not None and "kv_cache_quant_algo" not in inner:
            raise UnsupportedQuantization(f"ModelOpt MXFP8 config without {where}kv_cache_quant_algo")
        return QuantScheme(
            kind="mxfp8",
            group_size=32,
            activation="dynamic",
            source="modelopt",
            format="MXFP8",
            ignore=ignore,
        )
    if "NVFP4" in algo or "FP4" in algo:
        if algo not in _MODELOPT_FP4_ALGOS:
            raise UnsupportedQuantization(
                f"ModelOpt quant_algo {algo!r} (want one of {list(_MODELOPT_FP4_ALGOS)})"
            )
        group_size = section.get("group_size", 16)
        if inner is not None and algo == "NVFP4":
            missing = [k for k in ("group_size", "kv_cache_quant_algo", "exclude_modules") if k not in inner]
            if missing:
                raise UnsupportedQuantization(f"ModelOpt NVFP4 config without {where}{missing}")
        if group_size is not None and int(group_size) != 16:
            raise UnsupportedQuantization(f"ModelOpt NVFP4 group_size {group_size!r} (only 16)")
        static_input = algo == "NVFP4"
        return QuantScheme(
            kind="nvfp4",
            group_size=16,
            activation="static" if static_input else "none",
            source="modelopt",
            format=algo,
            ignore=ignore,
            has_input_scale=static_input,
        )
    if algo == "FP8":
        return QuantScheme(
            kind="fp8_tensor",
            activation="static",
            source="modelopt",
            format=algo,
            weight_scale_name="weight_scale",
            scale_shape="scalar",
            ignore=ignore,
            has_input_scale=True,
        )
    raise UnsupportedQuantization(f"ModelOpt quant_algo {algo!r} (want FP8, NVFP4, W4A16_NVFP4 or MXFP8)")


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


def _dtype_name(value: object) -> str | None:
    """A serialized torch dtype (`"torch.uint8"`, `"uint8"`) as its bare name; None stays None."""
    return None if value is None else str(value).removeprefix("torch.")


def _ct_mx_kind(weights: Mapping[str, Any]) -> QuantKind | None:
    """`mxfp8` / `nvfp4` when the weights args are what vLLM's `_is_mxfp8` / `_is_nvfp4_format` accept."""
    if weights.get("type") != "float" or weights.get("symmetric", True) is not True:
        return None
    bits, strategy, group = weights.get("num_bits"), weights.get("strategy"), weights.get("group_size")
    if bits == 4 and strategy == "tensor_group" and group == 16:
        return "nvfp4"
    if (
        bits == 8
        and strategy == "group"
        and group == 32
        and _dtype_name(weights.get("scale_dtype")) == "uint8"
    ):
        return "mxfp8"
    return None


def _ct_mx_group(where: str, group: Mapping[str, Any], kind: QuantKind, fmt: str | None) -> dict[str, Any]:
    weights = group["weights"]
    if weights.get("dynamic", False) is not False or weights.get("actorder"):
        raise UnsupportedQuantization(f"{where}.weights must be static, without actorder")
    if group.get("output_activations"):
        raise UnsupportedQuantization(f"{where}.output_activations is set")
    inputs = group.get("input_activations")
    activation: ActivationMode = "none"
    if kind == "nvfp4":
        if _dtype_name(weights.get("scale_dtype")) not in (None, "float8_e4m3fn"):
            raise UnsupportedQuantization(
                f"{where}.weights.scale_dtype {weights.get('scale_dtype')!r} for NVFP4"
            )
        if fmt != "nvfp4-pack-quantized":
            raise UnsupportedQuantization(f"{where} format {fmt!r} (NVFP4 weights need nvfp4-pack-quantized)")
        if inputs:
            if _ct_mx_kind(inputs) != "nvfp4":  # vLLM: NVFP4 weights need NVFP4 or no input quantization
                raise UnsupportedQuantization(
                    f"{where}.input_activations must be NVFP4 (or absent) for NVFP4"
                )
            activation = "static"  # the per-tensor input global scale is calibrated; group scales are local
    else:
        if fmt not in ("mxfp8-quantized", *_CT_FORMATS):
            raise UnsupportedQuantization(f"{where} format {fmt!r} (MXFP8 weights need mxfp8-quantized)")
        if inputs:  # vLLM quantizes MXFP8 activations dynamically whatever the config says
            activation = "dynamic"
    return {
        "kind": kind,
        "block_size": None,
        "activation": activation,
        "format": fmt,
        "targets": tuple(group.get("targets") or ()),
    }


def _ct_group(name: str, group: Mapping[str, Any], default_format: str | None) -> dict[str, Any]:
    """The parts of one compressed-tensors config group that a `QuantScheme` holds."""
    where = f"compressed-tensors config_groups[{name!r}]"
    weights = group.get("weights")
    if not isinstance(weights, Mapping):
        raise UnsupportedQuantization(f"{where} has no weights quantization")
    fmt = group.get("format") or default_format
    mx_kind = _ct_mx_kind(weights)
    if mx_kind is not None:
        return _ct_mx_group(where, group, mx_kind, fmt)
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise UnsupportedQuantization(
            f"{where}.weights type={weights.get('type')!r} num_bits={weights.get('num_bits')!r} "
            "(only type 'float' with num_bits 8, or the MXFP8 / NVFP4 forms)"
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
        group_size=MX_GROUP_SIZES.get(kind),
        activation=first["activation"],
        source="compressed-tensors",
        format=first["format"],
        weight_scale_name="weight_scale",
        scale_shape={"fp8_block": "2d", "fp8_channel": "column", "fp8_tensor": "one"}.get(kind, "2d"),
        ignore=_name_list(qcfg, "ignore"),
        targets=tuple(targets) or ("Linear",),
        has_input_scale=first["activation"] == "static",
        kv_cache_scheme=dict(kv) if kv else None,
    )
