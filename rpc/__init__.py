"""layercast's HTTP surface, split by where it runs; the subpackages never import one another upward.

- `rpc.errors` (this root, the lowest rpc layer): the errors a sync backend raises to the HTTP layer;
  imports only `configs`. Shared by `rpc.server` and `inference_worker`.
- `rpc.server`: the routes, middlewares and gates every inference server installs (inside vLLM, through
  `inference_worker.http_plugin`).
- `rpc.client`: the HTTP client and `SyncOrchestrator` a trainer or RL loop uses; never imports FastAPI,
  uvicorn or vLLM.
- `rpc.tools`: the `layercast` command, the demo, `check`, `bench` and the server launcher; may import
  everything.

`tests/test_layering.py` holds the allowed-dependency table. Package `__init__` files import nothing, so
importing one half never imports the other.
"""
