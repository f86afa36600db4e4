"""Speed of the CPU block-sparse engine against dense SDPA and compiled FlexAttention, by density.

B=1, Hq=8, Hkv=2, D=64, fp32, prefill. The mask is StreamingLLM's ``streaming_mask(sink, window)``
(``sink`` tokens + a token-level sliding window, so window edges give partial blocks) with the window
sized by bisection to reach each target density of causal tiles (computed blocks / causal blocks at
block size 128). Every variant gets the same tensors; flex gets the same layout via
``layout.to_block_mask()``. Timing: ``torch.utils.benchmark.Timer(...).blocked_autorange()`` after a
warm-up, in interleaved rounds (3; 1 with --quick), medians; all ratios from one run. Writes ``benchmarks/results/engine_density.json`` and
``.png``. Not a test.

    python benchmarks/engine_density.py            # N in {4096, 8192, 16384}, 5 densities
    python benchmarks/engine_density.py --quick    # N=2048 and 4096, 3 densities, short timing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


def paired_medians(fns: dict, min_run_time: float, rounds: int) -> dict:
    """Median seconds per variant; variants are timed in interleaved rounds (the machine is shared and
    its load drifts), each round one ``blocked_autorange`` per variant, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
            times[k].extend(m.times)
    return {k: statistics.median(v) for k, v in times.items()}


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
    rounds = 1 if args.quick else 3
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
        seen = set()
        for target in densities:
            window = n if target >= 1.0 else window_for(target, n, args.sink, Hq)
            if window in seen:  # the sink block and the diagonal already exceed this density
                print(f"N={n}: density {target} unreachable at block 128 (window {window} already run)")
                continue
            seen.add(window)
            mask = streaming_mask(args.sink, window)
            t0 = time.perf_counter()
            lay = build_layout(mask, Hq, n, n)
            t_layout = time.perf_counter() - t0
            t0 = time.perf_counter()
            plan = get_plan(lay, B, Hq, Hkv)
            t_plan = time.perf_counter() - t0
            fns = {
                "sdpa_causal_s": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                        enable_gqa=True),
                "engine_s": lambda: sparse_attention(q, k, v, lay, scale=scale),
                "engine_blocks_only_s": lambda: sparse_attention(q, k, v, lay, scale=scale, dense_below=0),
            }
            if flex is not None:
                bm = lay.to_block_mask()
                # a fresh compile per layout: each mask_mod is new code for dynamo, and past the
                # recompile limit dynamo would silently fall back to the eager (dense) flex
                torch._dynamo.reset()
                cflex = torch.compile(flex, dynamic=False, fullgraph=True)
                fns["flex_s"] = lambda: cflex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)
            t = paired_medians(fns, mrt, rounds)
            row = dict(n=n, target_density=target, density=lay.density("causal"), sink=args.sink,
                       window=window, layout_s=t_layout, plan_s=t_plan, dense_shortcut=plan.dense, **t,
                       speedup_vs_sdpa=t["sdpa_causal_s"] / t["engine_s"],
                       blocks_only_speedup_vs_sdpa=t["sdpa_causal_s"] / t["engine_blocks_only_s"])
            if flex is not None:
                row.update(speedup_vs_flex=t["flex_s"] / t["engine_s"],
                           flex_speedup_vs_sdpa=t["sdpa_causal_s"] / t["flex_s"])
            rows.append(row)
            print(json.dumps({k2: (round(x, 4) if isinstance(x, float) else x) for k2, x in row.items()}),
                  flush=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor(),
                machine=platform.machine(), nproc=os.cpu_count(), B=B, Hq=Hq, Hkv=Hkv, D=D,
                dtype="float32", block_size=128, quick=args.quick, rounds=rounds,
                load_avg_at_end=os.getloadavg(),
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
