"""Tests for `trainer_side.detect` and `QuantScheme.is_ignored`, against vLLM 0.26's own parsers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from configs.quant import DEFAULT_FUSED_MAPPING, QuantScheme
from trainer_side.detect import UnsupportedQuantization, detect_quant_scheme

CONFIGS = Path(__file__).parent / "data" / "configs"
FUSED = {k: list(v) for k, v in DEFAULT_FUSED_MAPPING.items()}


def _load(name: str) -> dict[str, Any]:
    return json.loads((CONFIGS / name).read_text())


QWEN3_MOE_IGNORE = ("lm_head", *(f"model.layers.{i}.mlp.gate" for i in range(48)))
KV_SCHEME = {
    "actorder": None,
    "block_structure": None,
    "dynamic": False,
    "group_size": None,
    "num_bits": 8,
    "observer": "minmax",
    "observer_kwargs": {},
    "strategy": "tensor",
    "symmetric": True,
    "type": "float",
}

EXPECTED: dict[str, QuantScheme] = {
    "no_quantization_qwen3_8b.json": QuantScheme(),
    "hf_fp8_block_qwen3_8b.json": QuantScheme(
        kind="fp8_block",
        block_size=(128, 128),
        activation="dynamic",
        source="fp8",
        weight_scale_name="weight_scale_inv",
        scale_shape="2d",
    ),
    "hf_fp8_block_deepseek_v3.json": QuantScheme(
        kind="fp8_block",
        block_size=(128, 128),
        activation="dynamic",
        source="fp8",
        weight_scale_name="weight_scale_inv",
        scale_shape="2d",
    ),
    "hf_fp8_block_ue8m0_deepseek_v31.json": QuantScheme(
        kind="fp8_block",
        block_size=(128, 128),
        activation="dynamic",
        source="fp8",
        weight_scale_name="weight_scale_inv",
        scale_shape="2d",
        ue8m0_scale=True,
    ),
    "hf_fp8_block_moe_qwen3_30b_a3b.json": QuantScheme(
        kind="fp8_block",
        block_size=(128, 128),
        activation="dynamic",
        source="fp8",
        weight_scale_name="weight_scale_inv",
        scale_shape="2d",
        ignore=QWEN3_MOE_IGNORE,
    ),
    "hf_fp8_tensor_static_llama3.json": QuantScheme(
        kind="fp8_tensor",
        activation="static",
        source="fp8",
        weight_scale_name="weight_scale",
        scale_shape="scalar",
        ignore=("lm_head",),
        has_input_scale=True,
    ),
    "hf_fp8_tensor_dynamic.json": QuantScheme(
        kind="fp8_tensor",
        activation="dynamic",
        source="fp8",
        weight_scale_name="weight_scale",
        scale_shape="scalar",
        ignore=(
            "lm_head",
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj",
        ),
    ),
    "fbgemm_fp8_llama31_405b.json": QuantScheme(
        kind="fp8_channel",
        activation="dynamic",
        source="fbgemm_fp8",
        weight_scale_name="weight_scale",
        scale_shape="column",
        ignore=(
            "model.layers.0.mlp.down_proj",
            "model.layers.0.mlp.gate_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.125.mlp.down_proj",
            "model.layers.125.mlp.gate_proj",
            "model.layers.125.mlp.up_proj",
            "lm_head",
        ),
        activation_scale_ub=1200.0,
    ),
    "ct_fp8_dynamic_channel_llama31.json": QuantScheme(
        kind="fp8_channel",
        activation="dynamic",
        source="compressed-tensors",
        format="float-quantized",
        weight_scale_name="weight_scale",
        scale_shape="column",
        ignore=("lm_head",),
    ),
    "ct_fp8_static_tensor_kv_llama31.json": QuantScheme(
        kind="fp8_tensor",
        activation="static",
        source="compressed-tensors",
        format="float-quantized",
        weight_scale_name="weight_scale",
        scale_shape="one",
        ignore=("lm_head",),
        has_input_scale=True,
        kv_cache_scheme=KV_SCHEME,
    ),
    "ct_fp8_block_qwen3_moe.json": QuantScheme(
        kind="fp8_block",
        block_size=(128, 128),
        activation="dynamic",
        source="compressed-tensors",
        format="float-quantized",
        weight_scale_name="weight_scale",
        scale_shape="2d",
        ignore=("lm_head", "re:.*mlp.gate$"),
    ),
    "ct_fp8_channel_multi_group.json": QuantScheme(
        kind="fp8_channel",
        activation="dynamic",
        source="compressed-tensors",
        format="float-quantized",
        weight_scale_name="weight_scale",
        scale_shape="column",
        ignore=("lm_head", "re:model\\.layers\\.(0|35)\\.mlp\\.", "model.layers.1.self_attn.o_proj"),
        targets=("re:.*self_attn\\.(q|k|v|o)_proj$", "re:.*mlp\\.(gate|up|down)_proj$"),
    ),
    # --- MXFP8 / NVFP4 (issue 9) ---
    "ct_mxfp8_qwen3_8b.json": QuantScheme(
        kind="mxfp8",
        group_size=32,
        activation="dynamic",
        source="compressed-tensors",
        format="mxfp8-quantized",
        scale_shape="2d",
        ignore=("lm_head",),
    ),
    "ct_nvfp4_w4a4_qwen3_8b.json": QuantScheme(
        kind="nvfp4",
        group_size=16,
        activation="static",
        source="compressed-tensors",
        format="nvfp4-pack-quantized",
        scale_shape="2d",
        ignore=("lm_head",),
        has_input_scale=True,
    ),
    "ct_nvfp4a16_llama31.json": QuantScheme(
        kind="nvfp4",
        group_size=16,
        source="compressed-tensors",
        format="nvfp4-pack-quantized",
        scale_shape="2d",
        ignore=("lm_head", "re:.*mlp.down_proj$"),
    ),
    "modelopt_nvfp4_flat_llama31.json": QuantScheme(
        kind="nvfp4",
        group_size=16,
        activation="static",
        source="modelopt",
        format="NVFP4",
        ignore=("lm_head", "model.layers.0.self_attn*"),
        has_input_scale=True,
    ),
    "modelopt_nvfp4_hf_quant_config_llama31.json": QuantScheme(
        kind="nvfp4",
        group_size=16,
        activation="static",
        source="modelopt",
        format="NVFP4",
        ignore=("lm_head",),
        has_input_scale=True,
    ),
    "modelopt_w4a16_nvfp4_qwen3_8b.json": QuantScheme(
        kind="nvfp4",
        group_size=16,
        source="modelopt",
        format="W4A16_NVFP4",
        ignore=("lm_head", "*mlp.gate"),
    ),
    "modelopt_mxfp8_qwen3_8b.json": QuantScheme(
        kind="mxfp8",
        group_size=32,
        activation="dynamic",
        source="modelopt",
        format="MXFP8",
        ignore=("lm_head",),
    ),
    "mxfp8_minimax_style_qwen3_8b.json": QuantScheme(
        kind="mxfp8",
        group_size=32,
        activation="dynamic",
        source="modelopt",
        format="MXFP8",
        ignore=("lm_head", "model.layers.0.mlp.down_proj"),
    ),
    "modelopt_fp8_hf_quant_config_llama31.json": QuantScheme(
        kind="fp8_tensor",
        activation="static",
        source="modelopt",
        format="FP8",
        scale_shape="scalar",
        ignore=("lm_head",),
        has_input_scale=True,
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_detects_every_supported_config(name: str) -> None:
    scheme = detect_quant_scheme(_load(name))
    expected = EXPECTED[name]
    for field in QuantScheme.model_fields:
        assert getattr(scheme, field) == getattr(expected, field), field


def test_fixture_list_is_complete() -> None:
    on_disk = {p.name for p in CONFIGS.glob("*.json")}
    assert on_disk == set(EXPECTED) | set(BAD)


def test_accepts_file_path_and_model_directory(tmp_path: Path) -> None:
    src = CONFIGS / "hf_fp8_block_qwen3_8b.json"
    expected = EXPECTED[src.name]
    assert detect_quant_scheme(src) == expected
    assert detect_quant_scheme(str(src)) == expected
    shutil.copy(src, tmp_path / "config.json")
    assert detect_quant_scheme(tmp_path) == expected
    with pytest.raises(FileNotFoundError, match="no HF config"):
        detect_quant_scheme(tmp_path / "missing")


def test_reads_nested_text_config_and_legacy_compression_config() -> None:
    qcfg = _load("ct_fp8_dynamic_channel_llama31.json")["quantization_config"]
    expected = EXPECTED["ct_fp8_dynamic_channel_llama31.json"]
    assert detect_quant_scheme({"text_config": {"quantization_config": qcfg}}) == expected
    assert detect_quant_scheme({"compression_config": qcfg}) == expected


def test_scheme_survives_the_wire_as_json() -> None:
    for scheme in EXPECTED.values():
        assert QuantScheme.model_validate_json(scheme.model_dump_json()) == scheme


BAD: dict[str, str] = {
    "bad_awq.json": "quant_method 'awq' is not supported",
    "bad_gptq.json": "quant_method 'gptq' is not supported",
    "bad_ct_w4a16_int4.json": "type='int' num_bits=4",
    "bad_ct_unknown_strategy.json": "weights.strategy 'token'",
    "bad_ct_mixed_groups.json": (
        "'attention' and 'mlp' quantize differently (kind: 'fp8_channel' vs 'fp8_block'"
    ),
    "bad_ct_mxfp4_qwen3_8b.json": "type='float' num_bits=4",
    "bad_modelopt_mxfp8_producer_llama31.json": "quant_algo 'MXFP8'",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_unsupported_configs_raise_with_a_clear_message(name: str) -> None:
    with pytest.raises(UnsupportedQuantization) as info:
        detect_quant_scheme(_load(name))
    message = str(info.value)
    assert BAD[name] in message
    assert "Supported:" in message and "compressed-tensors" in message and "fbgemm_fp8" in message
    assert isinstance(info.value, ValueError)


def _with_qcfg(name: str, **changes: Any) -> dict[str, Any]:
    config = _load(name)
    config["quantization_config"].update(changes)
    return config


def _with_ct_group(name: str, **changes: Any) -> dict[str, Any]:
    config = _load(name)
    config["quantization_config"]["config_groups"]["group_0"].update(changes)
    return config


def _with_ct_weights(**changes: Any) -> dict[str, Any]:
    config = _load("ct_fp8_dynamic_channel_llama31.json")
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(changes)
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_with_qcfg("hf_fp8_block_qwen3_8b.json", activation_scheme="static"), "activation_scheme 'static'"),
        (_with_qcfg("hf_fp8_block_qwen3_8b.json", weight_block_size=[128]), "weight_block_size"),
        (_with_qcfg("hf_fp8_block_deepseek_v3.json", fmt="e5m2"), "fmt 'e5m2'"),
        (_with_qcfg("hf_fp8_tensor_dynamic.json", activation_scheme="weird"), "activation_scheme 'weird'"),
        (_with_ct_weights(type="int"), "type='int' num_bits=8"),
        (_with_ct_weights(num_bits=4), "type='float' num_bits=4"),
        (_with_ct_weights(strategy="tensor_group"), "strategy 'tensor_group'"),
        (_with_ct_weights(strategy="block", block_structure=None), "block_structure None"),
        (_with_ct_weights(symmetric=False), "symmetric and static"),
        (_with_qcfg("ct_fp8_static_tensor_kv_llama31.json", format="nvfp4-pack-quantized"), "format"),
        (_with_qcfg("ct_fp8_dynamic_channel_llama31.json", config_groups={}), "without config_groups"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "'bitsandbytes'"),
        ({"quantization_config": {"quant_method": "mxfp4"}}, "'mxfp4'"),
        (_with_ct_weights(type="float", num_bits=8, strategy="group", group_size=32), "strategy 'group'"),
        (_with_ct_weights(num_bits=4, strategy="tensor_group", group_size=32), "num_bits=4"),
        (_with_ct_group("ct_nvfp4a16_llama31.json", format="float-quantized"), "need nvfp4-pack-quantized"),
        (_with_ct_group("ct_mxfp8_qwen3_8b.json", format="pack-quantized"), "need mxfp8-quantized"),
        (
            _with_ct_group("ct_nvfp4a16_llama31.json", output_activations={"num_bits": 4}),
            "output_activations",
        ),
        (_with_qcfg("modelopt_w4a16_nvfp4_qwen3_8b.json", group_size=32), "group_size 32"),
        (_with_qcfg("modelopt_w4a16_nvfp4_qwen3_8b.json", quant_algo="MXFP4"), "'MXFP4'"),
        (_with_qcfg("modelopt_w4a16_nvfp4_qwen3_8b.json", quant_algo="FP8_PB_WO"), "'FP8_PB_WO'"),
        (_with_qcfg("modelopt_w4a16_nvfp4_qwen3_8b.json", quant_algo=None), "without quant_algo"),
    ],
)
def test_unsupported_fields_name_the_field(config: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedQuantization, match="Supported:") as info:
        detect_quant_scheme(config)
    assert message in str(info.value)


def test_hf_fp8_prefers_ignored_layers_over_modules_to_not_convert() -> None:
    config = _with_qcfg("hf_fp8_tensor_dynamic.json", ignored_layers=["model.layers.3.mlp.down_proj"])
    assert detect_quant_scheme(config).ignore == ("model.layers.3.mlp.down_proj",)


# --- the fixtures are real: vLLM's own config classes parse every supported one -------------------


@pytest.mark.parametrize(
    "name",
    sorted(n for n, s in EXPECTED.items() if s.quantized and s.source != "modelopt" and not s.group_size),
)
def test_vllm_parses_the_supported_fixtures(name: str) -> None:
    from vllm.model_executor.layers.quantization import get_quantization_config

    qcfg = _load(name)["quantization_config"]
    parsed = get_quantization_config(qcfg["quant_method"]).from_config(qcfg)
    scheme = EXPECTED[name]
    if scheme.source == "fp8":
        assert parsed.weight_block_size == (list(scheme.block_size) if scheme.block_size else None)
        assert parsed.activation_scheme == scheme.activation
        assert tuple(parsed.ignored_layers) == scheme.ignore
    elif scheme.source == "fbgemm_fp8":
        assert tuple(parsed.ignore_list) == scheme.ignore
    else:
        assert tuple(parsed.ignore) == scheme.ignore
        assert parsed.kv_cache_scheme == scheme.kv_cache_scheme


# --- is_ignored agrees with vLLM's is_layer_skipped / should_ignore_layer -------------------------

LAYER_NAMES = [
    f"model.layers.{i}.{m}"
    for i in (0, 1, 3, 35, 125)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "mlp.gate",
    )
] + ["lm_head", "model.layers.1.mlp.gate_proj_extra"]


def _vllm_name(hf_name: str) -> str:
    leaf = hf_name.rsplit(".", 1)[-1]
    for fused, shards in FUSED.items():
        if leaf in shards:
            return hf_name[: -len(leaf)] + fused
    return hf_name


def _vllm_decision(scheme: QuantScheme, vllm_name: str) -> bool:
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

    if scheme.source == "compressed-tensors":
        return should_ignore_layer(vllm_name, ignore=list(scheme.ignore), fused_mapping=FUSED)
    if scheme.source == "modelopt":
        return _modelopt_vllm_excluded(scheme, vllm_name)
    return is_layer_skipped(vllm_name, list(scheme.ignore), FUSED)


@pytest.mark.parametrize("name", sorted(n for n, s in EXPECTED.items() if s.ignore))
def test_is_ignored_matches_vllm_for_every_layer(name: str) -> None:
    scheme = EXPECTED[name]
    for hf_name in LAYER_NAMES:
        expected = _vllm_decision(scheme, _vllm_name(hf_name))
        assert scheme.is_ignored(hf_name) == expected, hf_name
        assert scheme.is_ignored(_vllm_name(hf_name)) == expected, hf_name


def test_is_ignored_follows_the_fused_module() -> None:
    hf = QuantScheme(kind="fp8_tensor", source="fp8", ignore=("model.layers.2.self_attn.qkv_proj", "lm_head"))
    assert hf.is_ignored("model.layers.2.self_attn.k_proj")
    assert not hf.is_ignored("model.layers.2.self_attn.o_proj")
    assert not hf.is_ignored("model.layers.20.self_attn.k_proj")
    # no substring/suffix matching: vLLM's is_layer_skipped compares whole names
    assert not QuantScheme(kind="fp8_tensor", source="fp8", ignore=("self_attn",)).is_ignored(
        "model.layers.0.self_attn.o_proj"
    )
    ct = QuantScheme(kind="fp8_channel", source="compressed-tensors", ignore=("re:.*\\.q_proj$",))
    with pytest.raises(ValueError, match="only some shards of fused module"):
        ct.is_ignored("model.layers.0.self_attn.k_proj")
    # compressed-tensors regexes are re.match: anchored at the start, not at the end
    assert QuantScheme(
        kind="fp8_channel", source="compressed-tensors", ignore=("re:model.layers.1.",)
    ).is_ignored("model.layers.1.self_attn.o_proj")


def test_is_ignored_routed_experts_follow_the_moe_layer() -> None:
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

    scheme = QuantScheme(
        kind="fp8_block",
        block_size=(128, 128),
        source="fp8",
        ignore=("model.layers.1.mlp.experts.0.down_proj", "model.layers.2.mlp.shared_experts.down_proj"),
    )
    for layer, expected_moe in ((1, True), (2, False), (3, False)):
        moe_prefix = f"model.layers.{layer}.mlp.experts"
        assert is_layer_skipped(moe_prefix, list(scheme.ignore), FUSED) is expected_moe
        for expert in (0, 7):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert scheme.is_ignored(f"{moe_prefix}.{expert}.{proj}") is expected_moe
    shared = "model.layers.2.mlp.shared_experts.down_proj"
    assert scheme.is_ignored(shared) is is_layer_skipped(shared, list(scheme.ignore), FUSED) is True


# --- MXFP8 / NVFP4: vLLM 0.26 resolves each fixture to the same format ------------------------------

_MX_FIXTURES = sorted(
    n for n, s in EXPECTED.items() if s.kind in ("mxfp8", "nvfp4") or s.source == "modelopt"
)


def _vllm_config(qcfg: dict[str, Any]) -> Any:
    """The `QuantizationConfig` vLLM 0.26 builds: normalize `quant_method`, apply overrides, parse."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase

    qcfg = json.loads(json.dumps(qcfg))
    qcfg = ModelArchConfigConvertorBase._normalize_quantization_config(
        None, SimpleNamespace(quantization_config=qcfg)
    )  # type: ignore[arg-type]
    method = qcfg["quant_method"]
    for override in ("modelopt", "modelopt_fp4", "modelopt_mxfp8"):
        if get_quantization_config(override).override_quantization_method(qcfg, None):
            method = get_quantization_config(override).override_quantization_method(qcfg, None)
            break
    return get_quantization_config(method).from_config(qcfg)


@pytest.mark.parametrize("name", _MX_FIXTURES)
def test_vllm_resolves_mx_fixtures_to_the_detected_format(name: str) -> None:
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    scheme = EXPECTED[name]
    parsed = _vllm_config(_load(name)["quantization_config"])
    if scheme.source == "compressed-tensors":
        args = parsed.target_scheme_map["Linear"]
        is_kind = {
            "mxfp8": CompressedTensorsConfig._is_mxfp8,
            "nvfp4": CompressedTensorsConfig._is_nvfp4_format,
        }
        assert is_kind[scheme.kind](args["weights"])
        assert (args["input_activations"] is not None) == (scheme.activation != "none")
        assert tuple(parsed.ignore) == scheme.ignore
        return
    assert tuple(parsed.exclude_modules) == scheme.ignore
    expected_name = {"mxfp8": "modelopt_mxfp8", "nvfp4": "modelopt_fp4", "fp8_tensor": "modelopt"}[
        scheme.kind
    ]
    assert parsed.get_name() == expected_name
    if scheme.kind == "nvfp4":
        assert parsed.group_size == scheme.group_size
        assert parsed.quant_method == scheme.format


@pytest.mark.parametrize("name", ["bad_modelopt_mxfp8_producer_llama31.json"])
def test_vllm_refuses_what_detection_refuses(name: str) -> None:
    with pytest.raises(ValueError, match="Unknown ModelOpt quant algo"):
        _vllm_config(_load(name)["quantization_config"])


def test_reads_hf_quant_config_json_next_to_config(tmp_path: Path) -> None:
    config = _load("modelopt_nvfp4_hf_quant_config_llama31.json")
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert detect_quant_scheme(tmp_path) == EXPECTED["modelopt_nvfp4_hf_quant_config_llama31.json"]


def test_online_shorthands_stream_the_unquantized_checkpoint() -> None:
    plain = _load("no_quantization_qwen3_8b.json")
    mx = detect_quant_scheme(plain, quantization="mxfp8")
    assert (mx.kind, mx.group_size, mx.source, mx.quantized) == ("mxfp8", 32, "online", False)
    nv = detect_quant_scheme(plain, quantization="nvfp4_per_token")
    assert (nv.kind, nv.group_size, nv.source, nv.quantized) == ("nvfp4", 16, "online", False)
    with pytest.raises(UnsupportedQuantization, match="'fp8_per_tensor' on an unquantized checkpoint"):
        detect_quant_scheme(plain, quantization="fp8_per_tensor")
    with pytest.raises(UnsupportedQuantization, match="--quantization 'mxfp8' on a checkpoint quantized"):
        detect_quant_scheme(_load("ct_nvfp4a16_llama31.json"), quantization="mxfp8")
    # a checkpoint tagged quant_method "mxfp8" is the ModelOpt MXFP8 format, as in vLLM
    assert detect_quant_scheme(_load("mxfp8_minimax_style_qwen3_8b.json"), quantization="mxfp8").quantized


def _modelopt_vllm_excluded(scheme: QuantScheme, vllm_name: str) -> bool:
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config

    config = ModelOptNvFp4Config("NVFP4", True, None, list(scheme.ignore), 16)
    config.packed_modules_mapping = FUSED
    return config.is_layer_excluded(vllm_name)


@pytest.mark.parametrize(
    "ignore",
    [
        ("lm_head", "model.layers.0.self_attn*"),
        ("*mlp.gate", "model.layers.1*"),
        ("self_attn", "model.layers.3.mlp.down_proj"),
        ("model.layers.1.mlp.experts*",),
    ],
)
def test_modelopt_exclusion_matches_vllm(ignore: tuple[str, ...]) -> None:
    scheme = QuantScheme(kind="nvfp4", group_size=16, source="modelopt", ignore=ignore)
    names = [
        *LAYER_NAMES,
        *(
            f"model.layers.{i}.mlp.experts.{e}.{p}"
            for i in (1, 10)
            for e in (0, 5)
            for p in ("gate_proj", "down_proj")
        ),
    ]
    for hf_name in names:
        expert = hf_name.split(".experts.")[0] + ".experts" if ".experts." in hf_name else None
        expected = _modelopt_vllm_excluded(scheme, expert or _vllm_name(hf_name))
        assert scheme.is_ignored(hf_name) == expected, hf_name
