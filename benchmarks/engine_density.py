"""Speed of the CPU block-sparse engine against dense SDPA and compiled FlexAttention, by density.

B=1, Hq=8, Hkv=2, D=64, fp32, prefill. The mask is StreamingLLM's ``streaming_mask(sink, window)``
(``sink`` tokens + a token-level sliding window, so window edges give partial blocks) with the window
sized by bisection to reach each target density of causal tiles (computed blocks / causal blocks at
block size 128). Every variant gets the same tensors; flex gets the same layout via
``layout.to_block_mask()``. Timing: ``torch.utils.benchmark.Timer(...).blocked_autorange()`` after a
warm-up, medians, all ratios from one run. Writes ``benchmarks/results/engine_density.json`` and
``.png``. Not a test.

    python benchmarks/engine_density.py            # N in {4096, 8192, 16384}, 5 densities
    python benchmarks/engine_density.py --quick    # N=2048 and 4096, 3 densities, short timing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from lcpass.engine import sparse_attention
from lcpass.engine.sparse import get_plan
from lcpass.layout import build_layout
from lcpass.masks import streaming_mask

RESULTS = Path(__file__).resolve().parent / "results"


def window_for(target: float, n: int, sink: int, heads: int) -> int:
    """Smallest window whose layout reaches ``target`` of the causal tiles (bisection)."""
    lo, hi = 1, n
    while lo < hi:
        w = (lo + hi) // 2
        if build_layout(streaming_mask(sink, w), heads, n, n).density("causal") < target:
            lo = w + 1
        else:
            hi = w
    return lo


def median_time(fn, min_run_time: float) -> float:
    fn()  # warm-up
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and short timing (smoke run)")
    ap.add_argument("--no-flex", action="store_true", help="skip the compiled FlexAttention baseline")
    ap.add_argument("--sink", type=int, default=4, help="sink tokens (default 4, StreamingLLM)")
    ap.add_argument("--out", default=str(RESULTS / "engine_density"), help="output path stem")
    args = ap.parse_args()
    sizes = [2048, 4096] if args.quick else [4096, 8192, 16384]
    densities = [1.0, 0.25, 0.1] if args.quick else [1.0, 0.5, 0.25, 0.1, 0.05]
    mrt = 0.2 if args.quick else 1.0
    B, Hq, Hkv, D = 1, 8, 2, 64
    scale = D ** -0.5
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex = flex_attention
    rows = []
    torch.manual_seed(0)
    for n in sizes:
        q = torch.randn(B, Hq, n, D)
        k = torch.randn(B, Hkv, n, D)
        v = torch.randn(B, Hkv, n, D)
        t_sdpa = median_time(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
            mrt)
        for target in densities:
            window = n if target >= 1.0 else window_for(target, n, args.sink, Hq)
            mask = streaming_mask(args.sink, window)
            t0 = time.perf_counter()
            lay = build_layout(mask, Hq, n, n)
            t_layout = time.perf_counter() - t0
            t0 = time.perf_counter()
            plan = get_plan(lay, B, Hq, Hkv)
            t_plan = time.perf_counter() - t0
            t_engine = median_time(lambda: sparse_attention(q, k, v, lay, scale=scale), mrt)
            t_blocks = median_time(lambda: sparse_attention(q, k, v, lay, scale=scale, dense_below=0), mrt)
            row = dict(n=n, target_density=target, density=lay.density("causal"), sink=args.sink,
                       window=window, layout_s=t_layout, plan_s=t_plan, sdpa_causal_s=t_sdpa,
                       engine_s=t_engine, engine_blocks_only_s=t_blocks, dense_shortcut=plan.dense,
                       speedup_vs_sdpa=t_sdpa / t_engine)
            if flex is not None:
                bm = lay.to_block_mask()
                # a fresh compile per layout: each mask_mod is new code for dynamo, and past the
                # recompile limit dynamo would silently fall back to the eager (dense) flex
                torch._dynamo.reset()
                cflex = torch.compile(flex, dynamic=False, fullgraph=True)
                t_flex = median_time(lambda: cflex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True),
                                     mrt)
                row.update(flex_s=t_flex, speedup_vs_flex=t_flex / t_engine,
                           flex_speedup_vs_sdpa=t_sdpa / t_flex)
            rows.append(row)
            print(json.dumps({k2: (round(x, 4) if isinstance(x, float) else x) for k2, x in row.items()}),
                  flush=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor(),
                machine=platform.machine(), nproc=os.cpu_count(), B=B, Hq=Hq, Hkv=Hkv, D=D,
                dtype="float32", block_size=128, quick=args.quick,
                note="engine_s: sparse_attention default (dense SDPA shortcut for exactly-causal "
                     "layouts); engine_blocks_only_s: dense_below=0 (block engine always)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        rs = sorted((r for r in rows if r["n"] == n), key=lambda r: r["density"])
        d = [100 * r["density"] for r in rs]
        ax.plot(d, [r["sdpa_causal_s"] / r["engine_s"] for r in rs], "o-", label="lcpass engine")
        ax.plot(d, [r["sdpa_causal_s"] / r["engine_blocks_only_s"] for r in rs], "x--",
                label="engine, blocks only")
        if "flex_s" in rs[0]:
            ax.plot(d, [r["sdpa_causal_s"] / r["flex_s"] for r in rs], "s-", label="compiled flex")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"N={n} (B=1, 8/2 heads, D=64, fp32)")
        ax.set_xlabel("density of causal tiles (%)")
        ax.set_ylabel("speed-up vs SDPA is_causal")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
