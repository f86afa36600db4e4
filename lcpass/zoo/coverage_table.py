"""The coverage table of the architecture sweep (:mod:`lcpass.zoo.sweep`): which implementations each
architecture is swept with, and the markdown that ``scripts/coverage.py`` writes to ``docs/COVERAGE.md``."""
from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Sequence

from lcpass.zoo.auto import Arch
from lcpass.zoo.sweep import STATUSES

__all__ = ["impls_for", "markdown", "totals"]


def impls_for(arch: Arch) -> list[Optional[str]]:
    """The attention implementations to sweep: transformers' default, and ``eager`` where that differs."""
    import transformers

    cls = getattr(transformers, arch.class_name, None)
    return [None, "eager"] if getattr(cls, "_supports_sdpa", False) else [None]


def totals(rows: Sequence[Any]) -> Counter:
    return Counter(r.status for r in rows)


def markdown(rows: Sequence[Any], meta: dict[str, Any]) -> str:
    """docs/COVERAGE.md: totals, then one line per architecture x implementation."""
    count = totals(rows)
    lines = [
        "# Architecture coverage",
        "",
        "Printed by `python scripts/coverage.py` (never edited by hand) from the sweep of every architecture "
        f"transformers {meta.get('transformers', '?')} builds from a tiny config (torch {meta.get('torch', '?')}, "
        f"{meta.get('seconds', '?')} s). See `lcpass/zoo/sweep.py` for the checks and `lcpass/zoo/auto.py` for how "
        "the architectures are enumerated and shrunk."
        + (f" Rows of {', '.join(meta['rerun'])} re-run since (`scripts/coverage.py --merge`)." if meta.get("rerun") else ""),
        "",
        "| status | rows | meaning |",
        "|---|---|---|",
    ]
    meaning = {
        "exact": "every check passed: sites = the eager oracle's attentions, graph and dense plan exact, the sparse "
                 "plan equals its written-out reference, generate() works",
        "no-attention": "the eager forward computes no attention (SSM, convnet): optimize leaves the model alone",
        "already-sparse": "the model computes its attention sparsely itself (Longformer's bands, BigBird's blocks): "
                          "found, named, left as the model computes it; optimize keeps the output exactly",
        "refused": "lcpass.optimize raises UnsupportedModelError with the reason shown",
        "wrong": "a check found a wrong result (a bug: the sweep test fails on it)",
        "error": "a check raised (a bug: the sweep test fails on it)",
        "not-built": "the sweep could not build a tiny model (transformers' reason shown)",
    }
    for status in STATUSES:
        lines.append(f"| {status} | {count.get(status, 0)} | {meaning[status]} |")
    lines += ["", "| model_type | task | class | attention | status | sites | routes | reason |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sites = ", ".join(f"{n}x {m}" for m, n in Counter(r.sites).items())
        routes = ", ".join(f"{n}x {m}" for m, n in Counter(r.routes).items())
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.model_type} | {r.task} | {r.class_name} | {r.attn_impl} | {r.status} | {sites} | "
                     f"{routes} | {reason} |")
    return "\n".join(lines) + "\n"
