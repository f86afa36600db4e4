"""MoA: per-head elastic sliding windows whose span grows with the input length.

Paper: Fu, Huang, Ning, Zhang, Chen, Wu, Wang, Huang, Li, Yan, Dai, Yang, Wang, "MoA: Mixture of Sparse
Attention for Automatic Large Language Model Compression", arXiv 2024 (COLM 2025). Head h attends to
the attention-sink tokens and a causal sliding window of span

    S_h = alpha_h + beta_h * N          (N = input length)

so some heads keep a fixed local span (beta = 0) while others grow with the context. MoA's profiler
searches (alpha_h, beta_h) per head; in a plan each head's spec carries its own ``alpha`` and ``beta``.

Parameters (paper's names): ``alpha`` (base span, tokens), ``beta`` (span per input token),
``sink`` (initial tokens every head keeps, as in StreamingLLM).

Example:
    >>> moa_span({"alpha": 100.0, "beta": 0.25, "sink": 4}, kv_len=400)
    200
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lcpass import masks as M
from lcpass.methods.base import KVPolicy, Method, Param


def moa_span(params: Mapping[str, Any], *, kv_len: int) -> int:
    """S = round(alpha + beta * N), at least 1 (the query itself) and at most N."""
    span = int(round(params["alpha"] + params["beta"] * kv_len))
    return max(1, min(span, max(kv_len, 1)))


def moa_mask_mod(params: Mapping[str, Any], *, head: int, n_heads: int, q_len: int, kv_len: int) -> Any:
    """causal & (kv < sink | q - kv < alpha + beta * N)."""
    return M.streaming_mask(params["sink"], moa_span(params, kv_len=kv_len))


def moa_kv(params: Mapping[str, Any], *, kv_len: int) -> KVPolicy:
    """The cache keeps the sinks and the span computed for an input of `kv_len` tokens."""
    return KVPolicy.sinks_recent(params["sink"], moa_span(params, kv_len=kv_len))


MOA = Method(
    name="moa",
    paper="MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression (arXiv 2024)",
    summary="Per head: sinks + causal window of span alpha + beta * N (N = input length).",
    params=(
        Param("alpha", "float", 1024.0, 0.0, None, "base span in tokens"),
        Param("beta", "float", 0.0, 0.0, 1.0, "extra span per input token (0 = fixed window)"),
        Param("sink", "int", 64, 0, None, "initial tokens every head keeps"),
    ),
    kind="static",
    phases=frozenset({"prefill", "decode", "kv"}),
    needs_calibration=True,
    crossover=2048,
    crossover_why=(
        "the default 64 + 1024-token span equals causal attention up to ~1088 tokens and skips only "
        "~30% of a 2048-token prefill; the elastic beta term shrinks the saving further"
    ),
    mask_mod=moa_mask_mod,
    kv_policy=moa_kv,
)
