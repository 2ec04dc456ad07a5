"""The trainer half of layercast: detect the inference model's scheme, walk the trainer model one
decoder layer at a time, quantize each layer into exactly the tensors an HF checkpoint holds, and hand
them to the broadcaster. Never imports vLLM."""

from trainer_side.broadcast import PushError, PushReport, WeightBroadcaster
from trainer_side.detect import UnsupportedQuantization, detect_quant_scheme, load_hf_config
from trainer_side.preflight import MemoryBudgetError, Preflight, preflight, require_memory_budget
from trainer_side.quantize import quantize_weight, quantized_specs
from trainer_side.walker import LayerChunk, TensorSpec, iter_layer_chunks, plan_stream

__all__ = [
    "LayerChunk",
    "MemoryBudgetError",
    "Preflight",
    "PushError",
    "PushReport",
    "TensorSpec",
    "UnsupportedQuantization",
    "WeightBroadcaster",
    "detect_quant_scheme",
    "iter_layer_chunks",
    "load_hf_config",
    "plan_stream",
    "preflight",
    "quantize_weight",
    "quantized_specs",
    "require_memory_budget",
]
