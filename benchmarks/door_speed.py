"""Speed through the public doors: a plain SDPA module, ``lcpass.optimize``d and ``torch.compile``d with
``backend="lcpass"``, against the same module run dense and against the CPU engine called directly.

The module is ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` (B=1, Hq=8,
Hkv=2, D=64, fp32). Both doors plan StreamingLLM (4 sink tokens + a sliding window sized by bisection to
~12% of the causal tiles at block 128, as in ``engine_density.py``). Capture runs on a 256-token example,
so the optimized module is the one a user gets (a symbolic sequence length), then timed at N. Every
variant gets the same tensors; the optimized outputs are checked against the engine's on them first.
Timing: ``blocked_autorange`` after a warm-up, interleaved rounds, medians; all ratios from one run.
Writes ``benchmarks/results/door_speed.json`` and ``.png``. Not a test.

    python benchmarks/door_speed.py                 # N in {4096, 8192}
    python benchmarks/door_speed.py --quick         # N=2048, short timing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_density import paired_medians, window_for  # noqa: E402

import lcpass  # noqa: E402
from lcpass.engine import sparse_attention  # noqa: E402
from lcpass.layout import build_layout  # noqa: E402
from lcpass.masks import streaming_mask  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class CausalSDPA(torch.nn.Module):
    """The issue's plain module: causal GQA attention through SDPA."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=2048 and short timing (smoke run)")
    ap.add_argument("--density", type=float, default=0.12, help="target density of causal tiles")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS / "door_speed"), help="output path stem")
    args = ap.parse_args()
    sizes = [2048] if args.quick else [4096, 8192]
    mrt, rounds = (0.2, 1) if args.quick else (1.0, 3)
    B, Hq, Hkv, D = 1, 8, 2, 64
    module = CausalSDPA().eval()
    rows = []
    torch.manual_seed(0)
    for n in sizes:
        window = window_for(args.density, n, args.sink, Hq)
        lay = build_layout(streaming_mask(args.sink, window), Hq, n, n)
        small = tuple(torch.randn(B, h, 256, D) for h in (Hq, Hkv, Hkv))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = lcpass.optimize(module, method="streaming", sink=args.sink, window=window, example_inputs=small)
        torch._dynamo.reset()
        comp = torch.compile(module, backend="lcpass", dynamic=False,
                             options={"method": "streaming", "sink": args.sink, "window": window, "inner": "eager"})
        q, k, v = torch.randn(B, Hq, n, D), torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
        with torch.no_grad():
            ref = sparse_attention(q, k, v, lay, scale=D ** -0.5)
            err = {name: float((f(q, k, v) - ref).abs().max()) for name, f in (("optimize", opt), ("compile", comp))}
        fns = {
            "sdpa_module_s": lambda: module(q, k, v),
            "optimize_s": lambda: opt(q, k, v),
            "compile_lcpass_s": lambda: comp(q, k, v),
            "engine_s": lambda: sparse_attention(q, k, v, lay, scale=D ** -0.5),
        }
        with torch.no_grad():
            t = paired_medians(fns, mrt, rounds)
        row = dict(n=n, density=lay.density("causal"), sink=args.sink, window=window, max_abs_err_vs_engine=err,
                   **t, optimize_vs_sdpa=t["sdpa_module_s"] / t["optimize_s"],
                   compile_vs_sdpa=t["sdpa_module_s"] / t["compile_lcpass_s"],
                   engine_vs_sdpa=t["sdpa_module_s"] / t["engine_s"],
                   optimize_vs_engine=t["engine_s"] / t["optimize_s"])
        rows.append(row)
        print(json.dumps({k2: (round(x, 4) if isinstance(x, float) else x) for k2, x in row.items()}), flush=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor(),
                machine=platform.machine(), nproc=os.cpu_count(), B=B, Hq=Hq, Hkv=Hkv, D=D, dtype="float32",
                block_size=128, quick=args.quick, rounds=rounds, example_len=256, load_avg_at_end=os.getloadavg(),
                note="optimize_s: lcpass.optimize(module, method='streaming', ...) captured at 256 tokens; "
                     "compile_lcpass_s: torch.compile(module, backend='lcpass', options={..., 'inner': 'eager'}); "
                     "engine_s: lcpass.engine.sparse_attention on the same layout")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"N={r['n']}\n{100 * r['density']:.0f}% tiles" for r in rows]
    x = range(len(rows))
    for i, (key, name) in enumerate((("optimize_vs_sdpa", "lcpass.optimize"),
                                     ("compile_vs_sdpa", "torch.compile(backend='lcpass')"),
                                     ("engine_vs_sdpa", "engine called directly"))):
        ax.bar([j + 0.27 * (i - 1) for j in x], [r[key] for r in rows], width=0.27, label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("speed-up vs the SDPA module")
    ax.set_title("streaming through the public doors (B=1, 8/2 heads, D=64, fp32)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
