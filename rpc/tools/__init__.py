"""The tools on top of layercast: the `layercast` command (`serve`, `demo`, `bench`, `check`), the demo,
the dry-run check, the benchmark runner and the local server launcher.

The top layer: may import every other layercast package; nothing in `configs`, `broadcaster`, `rpc`'s
other parts, `trainer_side` or `inference_worker` may import it. Imports nothing here.
"""
