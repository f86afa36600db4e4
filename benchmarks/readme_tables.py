"""Print the README's benchmark tables (markdown) from the JSON the benchmark scripts wrote.

    python benchmarks/readme_tables.py            # after benchmarks/engine_density.py etc.

Only numbers present in benchmarks/results/*.json are printed; a missing file prints nothing for it.
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def engine_density() -> str:
    path = RESULTS / "engine_density.json"
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    m = d["meta"]
    lines = [f"CPU, {m['nproc']} cores, torch {m['torch']}, B={m['B']}, Hq={m['Hq']}, Hkv={m['Hkv']}, D={m['D']}, "
             f"{m['dtype']}, causal, sinks + sliding window sized to the density; medians "
             "(`python benchmarks/engine_density.py`):", "",
             "| N | density of causal tiles | SDPA causal (s) | flex_attention compiled, same layout (s) "
             "| lcpass engine (s) | vs SDPA | vs flex |", "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['n']} | {r['density'] * 100:.0f}% | {r['sdpa_causal_s']:.3f} | {r['flex_s']:.3f} | "
                     f"{r['engine_s']:.3f} | {r['speedup_vs_sdpa']:.2f}x | {r['speedup_vs_flex']:.2f}x |")
    return "\n".join(lines)


def gpu_kernels() -> str:
    path = RESULTS / "gpu_kernels.json"
    if not path.exists():
        return ""
    g = json.loads(path.read_text())
    s = g["shape"]
    lines = [f"{g['device']}, torch {g['torch']}, B={s['B']}, Hq={s['Hq']}, Hkv={s['Hkv']}, D={s['D']}, "
             f"{s['dtype'].replace('torch.', '')}, causal (`python benchmarks/gpu_kernels.py`):", "",
             "| N | kernel | target density | ms | TFLOP/s computed | vs dense generated | vs SDPA flash | vs flex |",
             "|---|---|---|---|---|---|---|---|"]
    for r in g["prefill"]:
        if r["N"] != g["summary"]["N"] or r.get("target_density", 1.0) not in (1.0, 0.1):
            continue

        def ratio(key: str) -> str:
            return f"{r[key]:.2f}x" if key in r else "-"

        lines.append(f"| {r['N']} | {r['kernel']} | {r.get('target_density', 1.0):.0%} | {r['ms']:.2f} | "
                     f"{r['tflops_computed']:.0f} | {ratio('vs_dense')} | {ratio('vs_sdpa')} | {ratio('vs_flex')} |")
    return "\n".join(lines)


def dynamic_methods() -> str:
    path = RESULTS / "dynamic_methods.json"
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    c = d["config"]
    bar = ("quest", "seer", "tokenselect")
    lines = [f"CPU, {c['threads']} thread, torch {c['torch']}, B={c['B']}, Hq={c['Hq']}, Hkv={c['Hkv']}, D={c['D']}, "
             f"{c['dtype']}, causal prefill, budget ~{c['budget']:.0%} of the context; selection, attention and SDPA "
             "timed interleaved, medians (`python benchmarks/dynamic_methods.py --threads 1`). Issue #5's bar, in "
             "bold: Quest, SeerAttention-style and TokenSelect selection below 25% of the attention it saves:", "",
             "| N | method | select (ms) | attention (ms) | SDPA causal (ms) | select / saved | vs SDPA |",
             "|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        if r.get("phase", "prefill") != "prefill":
            continue
        sel = r.get("select_s")
        frac = r.get("select_fraction_of_saved")
        fr = "-" if frac is None else (f"**{frac:.3f}**" if r["method"] in bar else f"{frac:.3f}")
        lines.append(f"| {r['N']} | {r['method']} | {'-' if sel is None else f'{sel * 1e3:.1f}'} | "
                     f"{r['attention_s'] * 1e3:.1f} | {r['sdpa_causal_s'] * 1e3:.1f} | {fr} | {r['speedup_vs_sdpa']:.2f}x |")
    return "\n".join(lines)


def decode() -> str:
    path = RESULTS / "decode.json"
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    rows = [r for r in d["rows"] if r["part"] == "llama-stack"]
    ns = sorted({r["n"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"CPU, torch {d['machine']['torch']}, {d['machine']['threads']} thread, decode attention of a "
             f"{d['layers']}-layer Llama-shaped stack (Hq=32, Hkv=8, D=128, fp32, B=1), ~10% budget; ms per "
             "token (speed-up vs dense) and cache bytes vs the plan's prediction (`python benchmarks/decode.py`):",
             "", "| method | " + " | ".join(f"N={n}" for n in ns) + " | cache / prediction at "
             f"{ns[-1]} |", "|---|" + "---|" * (len(ns) + 1)]
    for m in methods:
        cells = []
        for n in ns:
            r = next(x for x in rows if x["n"] == n and x["method"] == m)
            cells.append(f"{r['s_per_token'] * 1e3:.1f} ({r['speedup_vs_dense']:.2f}x)")
        last = next(x for x in rows if x["n"] == ns[-1] and x["method"] == m)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {last['cache_bytes'] / last['predicted_bytes']:.3f} |")
    hits = d["summary"].get("tokenselect_hit_rate", {})
    if hits:
        lines += ["", "TokenSelect selection-cache hit rate (per KV head and step): " + ", ".join(
            f"{k} {v:.0%}" for k, v in hits.items() if v is not None) + " (llama-stack: synthetic queries with "
            "consecutive cosine ~0.95; smollm2: real decode queries)."]
    return "\n".join(lines)


def calibration() -> str:
    path = RESULTS / "calibration.json"
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    sm = d["summary"]
    lines = [f"{d['model']}, DuoAttention at {sm['ratio']:.0%} retrieval KV heads (others sink {sm['sink']} + recent "
             f"{sm['recent']}), every length sparse; passkey over lengths {', '.join(map(str, d['lengths']))} x "
             f"depths {', '.join(map(str, d['depths']))} (`python benchmarks/calibration.py`):", "",
             "| heads chosen by | passkey accuracy | cases answered as dense | " +
             " | ".join(f"{n} tokens" for n in d["lengths"]) + " | perplexity @2k | vs dense |",
             "|---|---|---|" + "---|" * len(d["lengths"]) + "---|---|"]
    for r in d["rows"]:
        by = " | ".join(f"{r['by_length'][str(n)]:.2f}" for n in d["lengths"])
        lines.append(f"| {r['plan']} | {r['passkey_accuracy']:.2f} | {r['matches_dense']}/{sm['cases']} | {by} | "
                     f"{r['perplexity_2k']:.2f} | {r['perplexity_delta_pct']:+.1f}% |")
    return "\n".join(lines)


def quality() -> str:
    path = RESULTS / "quality.md"
    return path.read_text().strip() if path.exists() else ""


if __name__ == "__main__":
    for table in (engine_density(), dynamic_methods(), gpu_kernels(), decode(), calibration(), quality()):
        if table:
            print(table, end="\n\n")
