"""Plot a `sync_bench.py` results JSON: sync time against model size for layercast's paths, raw NCCL
of the same bytes, and the peer (vLLM's native NCCL weight transfer). Needs matplotlib (not a
dependency of layercast: `pip install matplotlib` wherever you plot).

    python bench/plot_sync.py bench/results/2026-11-22-4xnvidia-h200-sync-bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def series(result: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """{label: [(params in billions, seconds)]} for every line of the plot."""
    out: dict[str, list[tuple[float, float]]] = {}
    for rec in result["models"].values():
        params = rec.get("params")
        if not params:
            continue
        b = params / 1e9
        for r in rec["paths"]:
            if "sync_s" in r:
                out.setdefault(f"layercast {r['path']} ({r['bucket_mb']} MiB buckets)", []).append(
                    (b, r["sync_s"])
                )
        if rec.get("raw_nccl_s"):
            out.setdefault("raw NCCL broadcast of layercast's bytes", []).append((b, rec["raw_nccl_s"]))
        if rec.get("peer", {}).get("peer_s"):
            out.setdefault("peer: vLLM native NCCL, BF16 -> fp8_per_block", []).append(
                (b, rec["peer"]["peer_s"])
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: the JSON's path with .png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(args.results.read_text())
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in series(result).items():
        xs, ys = zip(*sorted(points), strict=True)
        style = "--" if label.startswith("raw") else (":" if label.startswith("peer") else "-")
        ax.plot(xs, [y * 1e3 for y in ys], style, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model parameters (billions, Qwen3 shapes)")
    ax.set_ylabel("one weight sync (ms, median)")
    ax.set_title(f"trainer BF16 -> vLLM FP8 block 128x128, {result['device']}, {result['date']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = args.out or args.results.with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
