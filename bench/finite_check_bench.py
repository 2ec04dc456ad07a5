"""What refusing non-finite weights costs a sync: `trainer_side.finite.nonfinite_tensors` over a whole
Qwen3-shaped BF16 model, side by side with a copy of the same bytes (the memory-bound floor: the check
reads every byte once, a copy reads and writes them) in the same run.

    python bench/finite_check_bench.py --shapes 0.6b,8b --device cuda --out-dir OUT

Writes `finite-check.json` (one row per shape: params, bytes, check_s, copy_s, ratio_vs_copy) and prints a
table. The check runs once per push before the sync is announced, so `check_s` adds to every sync.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
# Runs on a bare GPU image (torch and transformers, none of layercast's own dependencies): the module under
# test imports torch only, so it is loaded from its file rather than through `trainer_side/__init__`.
_spec = importlib.util.spec_from_file_location("layercast_finite", _ROOT / "trainer_side" / "finite.py")
assert _spec is not None and _spec.loader is not None
_finite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_finite)
nonfinite_tensors = _finite.nonfinite_tensors

# Qwen3 shapes (as bench/common.py's SHAPES, which imports the HTTP client and so needs pydantic).
_SHAPES = {
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}  # fmt: skip


def build_model(shape: str, device: torch.device) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**_SHAPES[shape], tie_word_embeddings=False))
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def sync_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync_cuda()
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        sync_cuda()
        times.append(time.perf_counter() - t0)
    return median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.6b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for shape in args.shapes.split(","):
        model = build_model(shape, device)
        params = [p for p in model.parameters()]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        dst = [torch.empty_like(p) for p in params]
        clean = nonfinite_tensors(model)
        assert clean == [], clean
        check_s = _timed(lambda m=model: nonfinite_tensors(m), args.repeats)
        copy_s = _timed(lambda d=dst, s=params: torch._foreach_copy_(d, s), args.repeats)
        with torch.no_grad():
            params[len(params) // 2].view(-1)[7] = float("nan")
        found = nonfinite_tensors(model)
        assert len(found) == 1, found
        rows.append(
            dict(
                shape=shape,
                params=sum(p.numel() for p in params),
                bytes=nbytes,
                check_s=check_s,
                copy_s=copy_s,
                ratio_vs_copy=check_s / copy_s,
                found=found,
            )
        )
        del model, params, dst
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"device: {name}; {time.strftime('%Y-%m-%d')}; command: {' '.join(sys.argv)}")
    print(f"{'shape':>6} {'params':>14} {'GB':>7} {'check ms':>9} {'copy ms':>8} {'check/copy':>10}")
    for r in rows:
        print(
            f"{r['shape']:>6} {r['params']:>14,} {r['bytes'] / 1e9:>7.2f} {r['check_s'] * 1e3:>9.2f} "
            f"{r['copy_s'] * 1e3:>8.2f} {r['ratio_vs_copy']:>10.2f}"
        )
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = {"device": name, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": rows}
        (args.out_dir / "finite-check.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
