"""The quality tasks: passkey retrieval, multi-needle following, perplexity on a text file, next-token
agreement with dense, plus the prefill measurements (wall time, attention-module time, KV-cache bytes).

Every task takes a model and a tokenizer and returns plain JSON-friendly data; none knows which method
the model runs (that is `lcpass.quality.apply`'s job).

Example:
    >>> rows = run_passkey(model, tok, lengths=(1024,), depths=(0.2, 0.8))   # doctest: +SKIP
    >>> [r["correct"] for r in rows]                                         # doctest: +SKIP
    [True, True]
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcpass.hf import cache_kwarg, new_cache
from lcpass.quality.prompts import multi_needle_prompt, parse_number, passkey_prompt

__all__ = [
    "DEFAULT_TEXT",
    "generate_answer",
    "run_passkey",
    "run_multi_needle",
    "load_text_ids",
    "prefill_measure",
    "cache_bytes",
    "perplexity",
]

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def generate_answer(model: nn.Module, tokenizer: Any, ids: torch.Tensor, max_new_tokens: int = 8) -> str:
    """Greedy continuation of `ids` ([1, S]) decoded to text."""
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad,
        )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_passkey(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int] = (1024, 2048),
    depths: Sequence[float] = (0.1, 0.4, 0.7, 0.95),
    seed: int = 0,
    on_case: Any = None,
) -> list[dict[str, Any]]:
    """One passkey question per (length, depth); each row: length, depth, expected, answer, correct.

    The key of case i is drawn with seed `seed + i`, so every method sees the same cases.
    """
    rows = []
    for i, (length, depth) in enumerate((n, d) for n in lengths for d in depths):
        p = passkey_prompt(tokenizer, int(length), float(depth), seed=seed + i)
        text = generate_answer(model, tokenizer, p.ids)
        got = parse_number(text)
        rows.append({
            "length": int(length), "depth": float(depth), "expected": p.answer, "answer": text.strip(),
            "parsed": got, "correct": got == p.answer,
        })
        if on_case is not None:
            on_case()
    return rows


def run_multi_needle(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int] = (1024, 2048),
    trials: int = 2,
    hops: int = 1,
    distractors: int = 1,
    seed: int = 0,
    on_case: Any = None,
) -> list[dict[str, Any]]:
    """`trials` chain-following questions per length; each row: length, chain, expected, answer, correct,
    and whether the model answered a distractor's code instead."""
    rows = []
    k = 0
    for length in lengths:
        for _ in range(trials):
            p = multi_needle_prompt(tokenizer, int(length), hops=hops, distractors=distractors, seed=seed + k)
            k += 1
            text = generate_answer(model, tokenizer, p.ids)
            got = parse_number(text)
            rows.append({
                "length": int(length), "chain": p.meta["chain"], "expected": p.answer, "answer": text.strip(),
                "parsed": got, "correct": got == p.answer, "distractor": got in p.meta["wrong_codes"],
            })
            if on_case is not None:
                on_case()
    return rows


def load_text_ids(tokenizer: Any, path: str | Path = DEFAULT_TEXT, n_tokens: int = 2048) -> torch.Tensor:
    """The first `n_tokens` tokens of the text file at `path`, as [1, n_tokens] ids.

    Raises:
        FileNotFoundError: the file does not exist (message names it and the fix).
        ValueError: the file is not text, or has fewer than `n_tokens` tokens.
    """
    p = Path(path)
    if not p.is_file():
        hint = " (Debian ships it in the base-files package)" if str(p) == DEFAULT_TEXT else ""
        raise FileNotFoundError(
            f"perplexity text file '{p}' does not exist{hint}; pass an existing text file with --text"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"perplexity text file '{p}' is not UTF-8 text ({e.reason}); pass a text file") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(
            f"perplexity text file '{p}' has {len(ids)} tokens, fewer than the {n_tokens} asked for; "
            f"pass a longer file or fewer tokens (--ppl-tokens {len(ids)})"
        )
    return torch.tensor([ids[:n_tokens]])


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of `logits` [1, S, V] against `ids` [1, S]."""
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return float(math.exp(float(loss)))


def cache_bytes(cache: Any) -> int | None:
    """Bytes of every distinct tensor reachable from a KV cache object (DynamicCache, a custom cache,
    or nested tuples); None when no tensor is found."""
    seen: set[int] = set()
    total = 0
    stack = [(cache, 0)]
    visited: set[int] = set()
    while stack:
        obj, depth = stack.pop()
        if obj is None or depth > 6 or id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            key = obj.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, (list, tuple)):
            stack.extend((o, depth + 1) for o in obj)
        elif isinstance(obj, dict):
            stack.extend((o, depth + 1) for o in obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
            stack.extend((o, depth + 1) for o in vars(obj).values())
    return total or None


def prefill_measure(
    model: nn.Module, ids: torch.Tensor, site_names: Sequence[str] = (), repeats: int = 1
) -> dict[str, Any]:
    """Prefill forwards of `ids` with a KV cache: logits, wall time, time inside the attention modules
    named `site_names` (forward hooks; None if none is found), and the cache's bytes.

    A 32-token forward warms the model up first; with `repeats` > 1 the fastest run's times are kept
    (the first full-length call may also build layouts that later calls reuse).
    """
    if repeats < 1:
        raise ValueError(f"prefill_measure: repeats={repeats} must be >= 1")
    with torch.no_grad():
        model(input_ids=ids[:, :32], attention_mask=torch.ones_like(ids[:, :32]))
    best: dict[str, Any] | None = None
    for _ in range(repeats):
        m = _prefill_once(model, ids, site_names)
        if best is None or m["prefill_s"] < best["prefill_s"]:
            best = m
    assert best is not None
    return best


def _cache_kwargs(model: nn.Module) -> dict[str, Any]:
    cache = new_cache(model)
    return {} if cache is None else {cache_kwarg(model): cache}


def _prefill_once(model: nn.Module, ids: torch.Tensor, site_names: Sequence[str]) -> dict[str, Any]:
    spent = [0.0]
    starts: dict[int, float] = {}
    handles = []
    for name in site_names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue

        def pre(m: nn.Module, args: Any, kwargs: Any = None) -> None:
            starts[id(m)] = time.perf_counter()

        def post(m: nn.Module, args: Any, out: Any, kwargs: Any = None) -> None:
            spent[0] += time.perf_counter() - starts.pop(id(m), time.perf_counter())

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            # an optimized model's own cache (CompressedCache: evicted KV is freed), as generate() uses
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **_cache_kwargs(model))
        wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    cache = out["cache"] if "cache" in out else getattr(out, "past_key_values", None)  # name after / before the rename
    return {
        "logits": out.logits,
        "prefill_s": wall,
        "attention_s": spent[0] if handles else None,
        "kv_bytes": cache_bytes(cache),
    }
