"""Quality results as JSON, a markdown table and PNG plots; the per-head plan heat map.

Example:
    >>> paths = write_results(results, "results/")                 # doctest: +SKIP
    >>> sorted(paths)                                               # doctest: +SKIP
    ['accuracy_vs_length', 'json', 'markdown', 'passkey_heatmaps']
    >>> plot_plan(plan, "plan.png")                                 # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lcpass.methods import site_mask_mod
from lcpass.plan import Plan

__all__ = ["to_markdown", "write_results", "plot_accuracy", "plot_passkey_heatmaps", "plot_plan", "plan_density"]

COLUMNS = (
    ("method", "method"),
    ("passkey_accuracy", "passkey acc"),
    ("passkey_matches_dense", "passkey = dense"),
    ("multi_needle_accuracy", "multi-needle acc"),
    ("perplexity", "ppl"),
    ("perplexity_delta_pct", "ppl Δ %"),
    ("agreement", "next-token agreement"),
    ("attention_speedup", "prefill attn speed ×"),
    ("kv_ratio_policy", "KV bytes ratio (plan)"),
    ("kv_ratio_measured", "KV bytes ratio (cache)"),
)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def to_markdown(results: dict[str, Any]) -> str:
    """One row per method; failed methods show their error instead of numbers (never a made-up value)."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    errors = []
    for r in results["methods"]:
        if r.get("error"):
            lines.append("| " + " | ".join([r["method"]] + ["—"] * (len(COLUMNS) - 1)) + " |")
            errors.append(f"- `{r['method']}`: {r['error']}")
            continue
        lines.append("| " + " | ".join(_fmt(r.get(key)) for key, _ in COLUMNS) + " |")
    s = results.get("settings", {})
    note = (
        f"\nModel `{results.get('model', '?')}`; passkey lengths {s.get('lengths')} × depths {s.get('depths')}; "
        f"multi-needle {s.get('needle_trials')} per length (hops {s.get('hops')}, distractors "
        f"{s.get('distractors')}); perplexity on `{s.get('text')}` at {s.get('ppl_tokens')} tokens. "
        "Speed = dense attention-module prefill time / the method's, dense re-timed right after each "
        "method; KV ratio (plan) from the plan's per-KV-head policies at the perplexity length, (cache) "
        "from the bytes the returned cache holds."
    )
    out = "\n".join(lines) + "\n" + note + "\n"
    if errors:
        out += "\nNot measured:\n" + "\n".join(errors) + "\n"
    return out


def _plt() -> Any:
    import matplotlib  # lazy: matplotlib is optional (dev extra); only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    return plt


def plot_accuracy(results: dict[str, Any], path: str | Path) -> Path:
    """Passkey accuracy vs context length, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results["methods"]:
        rows = r.get("passkey") or []
        if r.get("error") or not rows:
            continue
        lengths = sorted({x["length"] for x in rows})
        acc = [sum(x["correct"] for x in rows if x["length"] == n) / sum(1 for x in rows if x["length"] == n)
               for n in lengths]
        ax.plot(lengths, acc, marker="o", label=r["method"])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"Passkey retrieval — {results.get('model', '')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_passkey_heatmaps(results: dict[str, Any], path: str | Path) -> Path:
    """One depth × length heat map of passkey correctness per method (green = retrieved)."""
    plt = _plt()
    ok = [r for r in results["methods"] if not r.get("error") and r.get("passkey")]
    n = max(len(ok), 1)
    cols = min(n, 4)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, ok):
        lengths = sorted({x["length"] for x in r["passkey"]})
        depths = sorted({x["depth"] for x in r["passkey"]})
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for x in r["passkey"]:
            grid[depths.index(x["depth"]), lengths.index(x["length"])] = float(x["correct"])
        ax.axis("on")
        ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(v) for v in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_xlabel("length", fontsize=7)
        ax.set_ylabel("depth", fontsize=7)
        ax.set_title(r["method"], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plan_density(plan: Plan, length: int = 1024, rows: int = 128) -> tuple[list[str], torch.Tensor]:
    """(site names, [sites, heads] fraction of causal keys each head attends at `length`), sampled on
    `rows` query rows; dense / causal heads give 1.0. Needs a plan with a fingerprint (head counts)."""
    if plan.fingerprint is None:
        raise ValueError("plot_plan: the plan has no fingerprint, so its head counts are unknown; "
                         "make it with Plan.uniform/Plan.duo or lcpass.calibrate")
    sites = plan.fingerprint.sites
    width = max(s.n_heads for s in sites)
    out = torch.full((len(sites), width), float("nan"))
    q = torch.linspace(0, length - 1, rows).round().long()[:, None]
    kv = torch.arange(length)[None, :]
    causal = (kv <= q).sum().float()
    b = torch.zeros((), dtype=torch.long)
    for i, s in enumerate(sites):
        specs = plan.resolve(s.name, s.n_heads)
        mask = site_mask_mod(specs, s.n_heads, length, length)
        h = torch.arange(s.n_heads)[:, None, None]
        allowed = mask(b, h, q[None], kv[None]) & (kv <= q)[None]
        out[i, : s.n_heads] = allowed.expand(s.n_heads, rows, length).sum((1, 2)).float() / causal
    return [s.name for s in sites], out


def plot_plan(plan: Plan, path: str | Path, length: int = 1024, title: str | None = None) -> Path:
    """Per-head plan heat map: sites (rows) × heads (columns), colour = fraction of causal keys each head
    attends at `length` tokens (1 = full attention: a retrieval / dense head). Method names in the title.

    Example:
        >>> plot_plan(Plan.duo(sites, {"model.layers.3.self_attn": [0]}), "plan.png")  # doctest: +SKIP
    """
    plt = _plt()
    names, dens = plan_density(plan, length)
    methods = sorted({h.method for sp in plan.sites.values() for h in sp.heads})
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * dens.shape[1] + 2), max(3, 0.22 * len(names) + 1.2)))
    im = ax.imshow(dens.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("site")
    short = [n.replace(".self_attn", "").replace("model.layers.", "L") for n in names]
    ax.set_yticks(range(len(names)), short, fontsize=6)
    ax.set_xticks(range(dens.shape[1]))
    fig.colorbar(im, ax=ax, label=f"keys attended at {length} tokens (fraction of causal)")
    ax.set_title(title or f"plan: {', '.join(methods)}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(results: dict[str, Any], out_dir: str | Path, plans: dict[str, Plan] | None = None) -> dict[str, Path]:
    """Write results.json, results.md, accuracy_vs_length.png, passkey_heatmaps.png and one plan heat map
    (and plan JSON) per planned method into `out_dir`; return the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["json"] = out / "results.json"
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"] = out / "results.md"
    paths["markdown"].write_text(to_markdown(results))
    paths["accuracy_vs_length"] = plot_accuracy(results, out / "accuracy_vs_length.png")
    paths["passkey_heatmaps"] = plot_passkey_heatmaps(results, out / "passkey_heatmaps.png")
    for label, plan in (plans or {}).items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        plan.save(out / f"plan_{safe}.json")
        paths[f"plan:{label}"] = plot_plan(plan, out / f"plan_{safe}.png", title=f"{label}")
    return paths
