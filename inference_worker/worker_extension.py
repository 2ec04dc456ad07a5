"""The class `layercast serve` passes as vLLM's `--worker-extension-cls`: load paths + network receive."""

from __future__ import annotations

from inference_worker.extension import LayercastWorkerExtension
from inference_worker.sync_worker import BroadcastReceiverMixin


class LayercastWorker(BroadcastReceiverMixin, LayercastWorkerExtension):
    """Every `layercast_*` method a server's workers answer through `collective_rpc`."""
