"""The client half of layercast's HTTP surface: the HTTP client of one inference server and the
`SyncOrchestrator` an RL loop uses; what the trainer side imports, so it never needs FastAPI or vLLM.

May import `configs`, `broadcaster`, the rpc root (`rpc.errors`) and itself; never `rpc.server`,
`rpc.tools`, `trainer_side` or `inference_worker`. Imports nothing here.
"""
