"""The server half of layercast's HTTP surface: routes, auth, middlewares, the weights gate, /health and
the per-sync events, engine-independent; `inference_worker.http_plugin` installs them on vLLM's server.

May import `configs`, `broadcaster`, the rpc root (`rpc.errors`) and itself; never `rpc.client`,
`rpc.tools`, `trainer_side` or `inference_worker`. Imports nothing here, so importing a module of this
package loads only what that module needs.
"""
