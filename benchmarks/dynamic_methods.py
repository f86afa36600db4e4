"""Dynamic (content-based) methods: selection time and attention time vs SDPA-causal, prefill.

B=1, Hq=8, Hkv=2, D=64, fp32, random q/k/v (same tensors for every variant), budget ~10% of the
context per method (token budget N/10, or the method's equivalent). For each method: the selector's
time (``select``; methods without a pure selection report their whole ``attend`` as attention), the
attention time on that selection (the engine plan rebuilt every call, as at run time), and SDPA with
``is_causal=True``. For Quest, Seer and TokenSelect it reports whether selection costs less than 25% of
the attention it saves (``t_select < 0.25 * (t_sdpa - t_attention)``). Decode-only methods (Recycled,
TidalDecode) are timed on one decode step (Sq=1) against SDPA decode. Score mods change results, not
cost, and are not timed.

Timing is interleaved: the shared machine's load drifts by 2-5x within minutes, so a method's select,
its attention and SDPA are timed side by side, in rounds of one call each (order rotated every round)
after a warm-up call, and each reports the median over rounds (at least 5 rounds, more while the
per-method time budget lasts). ``select_fraction_of_saved`` uses those medians;
``select_fraction_of_saved_paired`` is the median over rounds of ``select / (sdpa - attention)``
measured within one round. Writes ``benchmarks/results/dynamic_methods.json`` and ``.png``. Not a test.

Threads: the committed run uses ``--threads 1``. On the shared 2-core development machine (load average
3-5) every 2-thread OpenMP region waits for a scheduler time slice, ~5 ms whatever its size (measured
at N=4096: ``block_pool`` of the keys 0.19 ms on 1 thread, 17 ms on 2), so 2-thread timings count
parallel regions, not work: SDPA (one region) gains from the second core, the selectors and the block
engine (tens of small regions) lose 10x. One thread measures the work of each side.

    python benchmarks/dynamic_methods.py            # N in {4096, 16384}
    python benchmarks/dynamic_methods.py --quick    # N = 4096 only, short timing
    python benchmarks/dynamic_methods.py --methods quest,seer,tokenselect --out /tmp/dm
    python benchmarks/dynamic_methods.py --threads 1    # the committed run (shared 2-core machine)
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

from lcpass.layout import BlockLayout
from lcpass.methods import get_method, resolve_params
from lcpass.methods.dynamic import TidalState, build_squeezed_index, run_selection

RESULTS = Path(__file__).resolve().parent / "results"
CRITERION = ("quest", "seer", "tokenselect")


def params_for(name: str, n: int) -> dict:
    """Parameters giving a ~10% token budget at context length n."""
    b = n // 10
    return {
        "quest": {"token_budget": b},
        "seer": {"topk": max(1, b // 128)},
        "tokenselect": {"k": b},
        "hip": {"k": b, "block_size_k": 64},
        "squeezed": {"budget": 0.1, "n_clusters": 256, "n_coarse": 16},
        "routing": {"n_clusters": 10, "window": 128},
        "hyper": {"block_size": b, "sample_size": 256, "min_seq_len": 1024},
        "longheads": {"trained_length": b},
        "landmark": {"topk": max(1, b // 128)},
        "cca": {"group_size": 16, "local_window": b - n // 16 // 2},
        "recycled": {"K": b, "S": 1 << 30},
        "tidal": {"k": b},
    }[name]


def interleaved(fns: dict, budget_s: float, min_rounds: int = 5, max_rounds: int = 60) -> dict:
    """Per-call seconds of each function, timed side by side: one warm-up call each, then rounds of
    one call of every function (order rotated each round) until ``min_rounds`` are done and
    ``budget_s`` is spent (at most ``max_rounds``). Returns {name: [seconds, one per round]}."""
    for f in fns.values():
        f()
    names = list(fns)
    times: dict = {n: [] for n in names}
    t_end = time.perf_counter() + budget_s
    r = 0
    while r < min_rounds or (time.perf_counter() < t_end and r < max_rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
        r += 1
    return times


def fresh(sel):
    """The selection with its engine-plan cache cleared (plans are rebuilt per call at run time)."""
    if isinstance(sel, BlockLayout):
        sel._cache.clear()
    return sel


def bench_prefill(name: str, q, k, v, scale: float, budget: float) -> dict:
    m = get_method(name)
    n = q.shape[2]
    p = resolve_params(m, params_for(name, n))
    state: dict = {}
    if name == "squeezed":
        state["squeezed_index"] = build_squeezed_index(k, n_clusters=p["n_clusters"], n_coarse=p["n_coarse"])
    rec = {"method": name, "N": n, "params": p, "phase": "prefill"}

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    if m.select is None:
        t = interleaved({"sdpa": sdpa, "attention": lambda: m.attend(q, k, v, params=p, state=dict(state),
                                                                     mask_mod=None, scale=scale)}, budget)
        rec["select_s"] = None
    else:
        sel = m.select(q, k, params=p, state=state, mask_mod=None)
        t = interleaved({"sdpa": sdpa, "select": lambda: m.select(q, k, params=p, state=state, mask_mod=None),
                         "attention": lambda: run_selection(q, k, v, fresh(sel), scale=scale)}, budget)
        rec["select_s"] = statistics.median(t["select"])
        paired = [s / (d - a) if d > a else float("inf") for s, d, a in zip(t["select"], t["sdpa"], t["attention"])]
        rec["select_fraction_of_saved_paired"] = statistics.median(paired)
        if isinstance(sel, BlockLayout):
            rec["density_causal"] = sel.density("causal")
        else:
            kept = (sel.indices >= 0).sum().item() / sel.indices[..., 0].numel() + sel.block_q / 2
            rec["density_causal"] = kept / (n / 2)
    rec["attention_s"] = statistics.median(t["attention"])
    rec["sdpa_causal_s"] = statistics.median(t["sdpa"])
    rec["rounds"] = len(t["sdpa"])
    return rec


def bench_decode(name: str, q, k, v, scale: float, budget: float) -> dict:
    m = get_method(name)
    n = k.shape[2]
    p = resolve_params(m, params_for(name, n))
    q1 = q[:, :, -1:]
    if name == "recycled":
        state: dict = {}
        m.select(q, k, params=p, state=state, mask_mod=None)  # prefill: full step, records top-K
        state["recycled"]["full_len"] = n - 8  # 8 tokens generated since the full step
        state["recycled"]["since"] = 0
    else:
        state = {"tidal": TidalState(), "layer": 2, "n_layers": 30}
        m.select(q1, k, params=p, state=state, mask_mod=None)  # selection layer of this step
        state = {"tidal": state["tidal"], "layer": 5, "n_layers": 30}

    def sel_fn():
        if name == "recycled":
            state["recycled"]["since"] = 0
        return m.select(q1, k, params=p, state=state, mask_mod=None)
    sel = sel_fn()
    t = interleaved({"select": sel_fn, "attention": lambda: run_selection(q1, k, v, sel, scale=scale),
                     "sdpa": lambda: F.scaled_dot_product_attention(q1, k, v, scale=scale, enable_gqa=True)},
                    budget / 4, min_rounds=50, max_rounds=5000)
    rec = {"method": name, "N": n, "params": p, "phase": "decode"}
    rec["select_s"] = statistics.median(t["select"])
    rec["attention_s"] = statistics.median(t["attention"])
    rec["sdpa_decode_s"] = statistics.median(t["sdpa"])
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=4096 only and short timing")
    ap.add_argument("--methods", default="", help="comma-separated subset (default: all timed methods)")
    ap.add_argument("--sizes", default="", help="comma-separated N (default: 4096,16384; --quick: 4096)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of interleaved rounds per method and N (default 4; --quick 1)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (default: torch's). On a shared, oversubscribed machine "
                         "1 thread avoids OpenMP barrier stalls that hit many-op code far more than SDPA")
    ap.add_argument("--out", default=str(RESULTS / "dynamic_methods"), help="output path stem")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([4096] if args.quick else [4096, 16384])
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 4.0)
    prefill = ["quest", "seer", "tokenselect", "hip", "squeezed", "routing", "hyper", "longheads",
               "landmark", "cca"]
    decode = ["recycled", "tidal"]
    if args.methods:
        keep = set(args.methods.split(","))
        prefill, decode = [m for m in prefill if m in keep], [m for m in decode if m in keep]
    torch.manual_seed(0)
    B, Hq, Hkv, D = 1, 8, 2, 64
    scale = D ** -0.5
    out = {"config": {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": "float32", "budget": 0.1,
                      "timing": f"interleaved rounds (select, attention, SDPA side by side), medians; "
                                f"{budget:g} s per method and N, >= 5 rounds",
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "load_average_at_start": list(os.getloadavg()), "cpus": os.cpu_count(),
                      "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")},
           "results": []}
    for n in sizes:
        q = torch.randn(B, Hq, n, D)
        k, v = torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
        print(f"N={n}", flush=True)
        for name in prefill:
            r = bench_prefill(name, q, k, v, scale, budget)
            t_sdpa = r["sdpa_causal_s"]
            saved = t_sdpa - r["attention_s"]
            if r["select_s"] is not None:
                r["select_fraction_of_saved"] = r["select_s"] / saved if saved > 0 else float("inf")
                if name in CRITERION:
                    r["select_lt_25pct_of_saved"] = bool(saved > 0 and r["select_s"] < 0.25 * saved)
            tot = (r["select_s"] or 0.0) + r["attention_s"]
            r["speedup_vs_sdpa"] = t_sdpa / tot
            out["results"].append(r)
            sel = "-" if r["select_s"] is None else f"{r['select_s'] * 1e3:.1f}"
            frac = r.get("select_fraction_of_saved")
            print(f"  {name:12s} select {sel:>8s} ms  attention {r['attention_s'] * 1e3:8.1f} ms  "
                  f"sdpa {t_sdpa * 1e3:8.1f} ms  x{r['speedup_vs_sdpa']:.2f}  "
                  f"select/saved {'-' if frac is None else f'{frac:.3f}'} "
                  f"(paired {r.get('select_fraction_of_saved_paired', float('nan')):.3f}, {r['rounds']} rounds) "
                  f"{r.get('select_lt_25pct_of_saved', '')}", flush=True)
        for name in decode:
            r = bench_decode(name, q, k, v, scale, budget)
            out["results"].append(r)
            print(f"  {name:12s} decode: select {r['select_s'] * 1e3:.2f} ms attention "
                  f"{r['attention_s'] * 1e3:.2f} ms sdpa {r['sdpa_decode_s'] * 1e3:.2f} ms", flush=True)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2, default=float))
    plot(out, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')} and .png")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in out["results"] if r["phase"] == "prefill"]
    sizes = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        rs = [r for r in rows if r["N"] == n]
        names = [r["method"] for r in rs]
        sel = [r["select_s"] or 0.0 for r in rs]
        att = [r["attention_s"] for r in rs]
        ax.bar(names, sel, label="selection")
        ax.bar(names, att, bottom=sel, label="attention")
        ax.plot(names, [r["sdpa_causal_s"] for r in rs], "k_", ms=20, mew=2, ls="", label="SDPA causal")
        ax.set_title(f"N={n}, B=1, Hq=8, Hkv=2, D=64, ~10% budget")
        ax.set_ylabel("seconds (median)")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
