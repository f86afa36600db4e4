"""The quality harness (``lcpass.eval``): does an attention method keep a real model's answers right?

For every method spec (see `lcpass.quality.apply`) the harness builds its plan (calibrating when the
method needs it), applies it to a fresh copy of the model with ``lcpass.optimize``, and measures:

- passkey retrieval at lengths × depths (a 5-digit key stated once in filler text, asked at the end);
- multi-needle following (linked door codes plus distractors; the answer needs following the chain);
- perplexity on a real text file (default: Debian's GPL-3) and its change vs dense;
- next-token agreement with dense on that text;
- prefill time inside the attention modules (speed ratio vs dense, re-timed back to back) and KV-cache
  bytes (from the plan's per-KV-head policies, and from the tensors the returned cache actually holds).

A method that cannot be applied (e.g. this build has no ``lcpass.optimize``) is reported with its error
and no numbers. Bad input — a missing text file, a corrupt plan file, a plan for another model — raises
FileNotFoundError / ValueError with a one-line message before any model runs.

Example:
    >>> from lcpass.zoo.pretrained import load_smollm2
    >>> model, tok = load_smollm2()
    >>> res = evaluate(model, tok, methods=["dense", "duo:ratio=0.5"], lengths=(1024,), out_dir="results")  # doctest: +SKIP
    >>> res["methods"][0]["passkey_accuracy"]                                                               # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcpass.methods import kv_head_policies
from lcpass.plan import Plan, SiteInfo
from lcpass.quality.apply import MethodSpec, apply_method, build_plan, parse_method
from lcpass.quality.prompts import Prompt, copy_prompt, multi_needle_prompt, parse_number, passkey_prompt
from lcpass.quality.report import plot_plan, to_markdown, write_results
from lcpass.quality.tasks import (
    DEFAULT_TEXT,
    load_text_ids,
    perplexity,
    prefill_measure,
    run_multi_needle,
    run_passkey,
)

__all__ = [
    "DEFAULT_TEXT",
    "MethodSpec",
    "Prompt",
    "apply_method",
    "build_plan",
    "copy_prompt",
    "evaluate",
    "kv_ratio",
    "load_text_ids",
    "multi_needle_prompt",
    "parse_method",
    "parse_number",
    "passkey_prompt",
    "perplexity",
    "plot_plan",
    "run_multi_needle",
    "run_passkey",
    "to_markdown",
    "write_results",
]


def _run_method(
    row: dict[str, Any],
    spec: MethodSpec,
    model: nn.Module,
    tokenizer: Any,
    sites: list[SiteInfo],
    plans: dict[str, Plan],
    calibration: dict[str, Any] | None,
    ppl_ids: torch.Tensor,
    dense_ref: dict[str, Any],
    lengths: Sequence[int],
    depths: Sequence[float],
    needle_trials: int,
    hops: int,
    distractors: int,
    seed: int,
    timing_repeats: int,
    dense_below: int | None,
    step: Any,
) -> None:
    """Fill `row` with every measurement of one method (see `evaluate`); `dense_ref` is filled by dense."""
    t0 = time.perf_counter()
    plan = plans.get(spec.label)
    if plan is None and spec.method != "plan":
        plan = build_plan(spec, model, sites, tokenizer, calibration, progress=False)
        if plan is not None:
            plans[spec.label] = plan
    row["calibration_s"] = round(time.perf_counter() - t0, 2)
    row["kv_ratio_policy"] = kv_ratio(plan, sites, ppl_ids.shape[1])
    if plan is not None and any(h.method in ("duo", "razor") for sp in plan.sites.values() for h in sp.heads):
        row["retrieval_heads"] = sum(
            bool(h.params.get("retrieval")) for s in sites for h in plan.resolve(s.name, s.n_heads)
        )
    evaluated = apply_method(model, plan, dense_below=dense_below)
    report = getattr(evaluated, "lcpass_report", None)
    if plan is not None and report is not None and hasattr(report, "as_dict"):
        rep = report.as_dict()
        row["optimize_report"] = {k: rep[k] for k in ("report_len", "rewritten", "attention_flops_ratio",
                                                      "kv_bytes_ratio") if k in rep}
    m = prefill_measure(evaluated, ppl_ids, [s.name for s in sites], timing_repeats)
    pred = m["logits"][0].argmax(-1)
    row["perplexity"] = perplexity(m["logits"], ppl_ids)
    row["prefill_s"] = round(m["prefill_s"], 3)
    row["attention_s"] = None if m["attention_s"] is None else round(m["attention_s"], 3)
    row["kv_bytes"] = m["kv_bytes"]
    step()
    if spec.method == "dense" and not dense_ref:
        dense_ref.update(pred=pred, **row)
    row["agreement"] = float((pred == dense_ref["pred"]).float().mean())
    row["perplexity_delta_pct"] = 100.0 * (row["perplexity"] / dense_ref["perplexity"] - 1.0)
    if spec.method != "dense" and row["attention_s"]:
        # re-time dense right after the method: a shared machine's load drifts between methods, so the
        # ratio only compares prefills measured back to back
        again = prefill_measure(model, ppl_ids, [s.name for s in sites], timing_repeats)
        row["dense_attention_s"] = None if again["attention_s"] is None else round(again["attention_s"], 3)
        if again["attention_s"]:
            row["attention_speedup"] = again["attention_s"] / row["attention_s"]
    elif spec.method == "dense":
        row["attention_speedup"] = 1.0
    if row["kv_bytes"] and dense_ref.get("kv_bytes"):
        row["kv_ratio_measured"] = row["kv_bytes"] / dense_ref["kv_bytes"]
    row["passkey"] = run_passkey(evaluated, tokenizer, lengths, depths, seed, on_case=step)
    row["passkey_accuracy"] = _accuracy(row["passkey"])
    if spec.method == "dense":
        dense_ref["passkey"] = row["passkey"]
    row["passkey_matches_dense"] = sum(
        a["correct"] == b["correct"] for a, b in zip(row["passkey"], dense_ref["passkey"])
    )
    row["multi_needle"] = run_multi_needle(
        evaluated, tokenizer, lengths, needle_trials, hops, distractors, seed, on_case=step
    )
    row["multi_needle_accuracy"] = _accuracy(row["multi_needle"])


def kv_ratio(plan: Plan | None, sites: Sequence[SiteInfo], length: int) -> float:
    """KV-cache bytes under `plan` / dense bytes for a `length`-token context (per-KV-head policies).

    Example:
        >>> sites = [SiteInfo("l0", 4, 2, 8)]
        >>> kv_ratio(Plan.duo(sites, {"l0": [0]}, sink=4, recent=60, by_kv_head=True), sites, 1024)
        0.53125
    """
    if plan is None:
        return 1.0
    kept = total = 0
    for s in sites:
        pols = kv_head_policies(plan.resolve(s.name, s.n_heads), s.n_heads, s.n_kv_heads, length)
        kept += sum(p.kept(length) for p in pols) * s.head_dim
        total += s.n_kv_heads * length * s.head_dim
    return kept / total


def _accuracy(rows: list[dict[str, Any]]) -> float | None:
    return sum(r["correct"] for r in rows) / len(rows) if rows else None


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    methods: Sequence[str] = ("dense",),
    *,
    lengths: Sequence[int] = (1024, 2048),
    depths: Sequence[float] = (0.1, 0.4, 0.7, 0.95),
    needle_trials: int = 2,
    hops: int = 1,
    distractors: int = 1,
    text: str | Path = DEFAULT_TEXT,
    ppl_tokens: int = 2048,
    calibration: dict[str, Any] | None = None,
    seed: int = 0,
    timing_repeats: int = 1,
    dense_below: int | None = None,
    progress: bool = True,
    out_dir: str | Path | None = None,
    name: str = "",
) -> dict[str, Any]:
    """Evaluate `methods` on `model` (see the module doc); return the results dict (and write it, its
    markdown table and plots to `out_dir` when given).

    Args:
        methods: method specs ("dense", "streaming:window=256", "duo:ratio=0.5", "plan.json", ...);
            dense is always measured first as the reference.
        lengths, depths: passkey grid; multi-needle uses `lengths` with `needle_trials` questions each.
        text, ppl_tokens: the perplexity / agreement text file and how many of its tokens to use.
        calibration: keyword arguments for `lcpass.calibrate` of calibrated methods (e.g. lengths).
        timing_repeats: prefill runs per method; the fastest is reported (perplexity is identical).
        dense_below: handed to ``lcpass.optimize``: None = each method's own crossover (sites run dense
            on shorter inputs, as deployed); 0 = always run the method (measures its effect on short
            prompts too).

    A method that fails to calibrate, to be applied or to run is recorded with its error (and the
    numbers measured before the failure); it never aborts the other methods.

    Raises:
        FileNotFoundError: `text` or a plan file does not exist.
        ValueError: a bad method spec, a corrupt plan file, or a plan made for another model.
    """
    from lcpass.calibration import model_sites  # lazy: lcpass.calibration imports lcpass.quality.prompts (this package)
    from lcpass.calibration.progress import progress_bar  # lazy: as above, lcpass.calibration loads first

    specs = [parse_method(m) for m in methods]
    if not any(s.method == "dense" for s in specs):
        specs.insert(0, MethodSpec("dense"))
    specs.sort(key=lambda s: s.method != "dense")
    ppl_ids = load_text_ids(tokenizer, text, ppl_tokens)  # missing file -> FileNotFoundError now
    sites = model_sites(model)
    plans: dict[str, Plan] = {}
    for spec in specs:  # plan files first: corrupt / foreign plans fail before any long run
        if spec.method == "plan":
            plans[spec.label] = build_plan(spec, model, sites)  # type: ignore[assignment]
    model.eval()
    settings = {
        "lengths": list(lengths), "depths": list(depths), "needle_trials": needle_trials, "hops": hops,
        "distractors": distractors, "text": str(text), "ppl_tokens": ppl_tokens, "seed": seed,
        "calibration": {k: list(v) if isinstance(v, tuple) else v for k, v in (calibration or {}).items()},
        "timing_repeats": timing_repeats, "dense_below": dense_below, "torch": torch.__version__,
    }
    label = name or str(getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__))
    n_cases = len(lengths) * len(depths) + len(lengths) * needle_trials + 1
    rows: list[dict[str, Any]] = []
    dense_ref: dict[str, Any] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("quality", total=n_cases * len(specs), info="")
        for spec in specs:
            bar.update(task, info=spec.label)
            row: dict[str, Any] = {"method": spec.label, "error": None}
            t0 = time.perf_counter()
            try:
                _run_method(
                    row, spec, model, tokenizer, sites, plans, calibration, ppl_ids, dense_ref, lengths,
                    depths, needle_trials, hops, distractors, seed, timing_repeats, dense_below,
                    lambda: bar.advance(task),
                )
            except Exception as e:  # noqa: BLE001 - recorded in the results, never turned into numbers
                if spec.method == "dense":
                    raise
                row["error"] = f"{type(e).__name__}: " + " ".join(str(e).split())[:300]
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            bar.update(task, completed=n_cases * (len(rows) + 1))
            rows.append(row)
            if out_dir is not None:  # partial results survive an interrupted long run
                out = Path(out_dir)
                out.mkdir(parents=True, exist_ok=True)
                partial = {"model": label, "settings": settings, "methods": rows, "partial": True}
                (out / "results.partial.json").write_text(json.dumps(partial, indent=2) + "\n")
    results = {"model": label, "settings": settings, "methods": rows}
    if out_dir is not None:
        results["files"] = {k: str(v) for k, v in write_results(results, out_dir, plans).items()}
    return results
