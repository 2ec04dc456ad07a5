"""The inference half of layercast: a vLLM 0.26 worker extension that joins the broadcast group,
receives syncs and loads them by the kernel-quantized, checkpoint or layerwise-reload path, plus the
endpoint plugin and `layercast serve` launcher that put layercast's routes on vLLM's own server."""
