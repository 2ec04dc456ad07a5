"""layercast's HTTP surface: the routes every server exposes, the client an orchestrator uses, the CLI."""
