"""StreamingLLM: attention sinks + a sliding window of recent tokens.

Paper: Xiao, Tian, Chen, Han, Lewis, "Efficient Streaming Language Models with Attention Sinks",
ICLR 2024. Every query keeps the first ``sink`` tokens (the "attention sinks" that absorb otherwise
unallocated attention mass) and the ``window`` most recent tokens (itself included). The KV cache holds
exactly those ``sink + window`` tokens, so it is bounded whatever the stream length.

Parameters (paper's names): ``sink`` — number of initial tokens kept (the paper finds 4 suffice);
``window`` — recent tokens kept (default 1020, so the cache holds 1024 tokens).

Example:
    >>> from lcpass.methods import site_mask_mod
    >>> m = site_mask_mod([("streaming", {"sink": 4, "window": 60})], n_heads=8, q_len=128, kv_len=128)
    >>> m.__name__.startswith("streaming")
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lcpass import masks as M
from lcpass.methods.base import KVPolicy, Method, Param


def streaming_mask_mod(params: Mapping[str, Any], *, head: int, n_heads: int, q_len: int, kv_len: int) -> Any:
    """causal & (kv < sink | q - kv < window)."""
    return M.streaming_mask(params["sink"], params["window"])


def streaming_kv(params: Mapping[str, Any], *, kv_len: int) -> KVPolicy:
    """The cache keeps the sinks and the recent window."""
    return KVPolicy.sinks_recent(params["sink"], params["window"])


STREAMING = Method(
    name="streaming",
    paper="Efficient Streaming Language Models with Attention Sinks (StreamingLLM, ICLR 2024)",
    summary="Every head keeps `sink` initial tokens plus a sliding window of `window` recent tokens.",
    params=(
        Param("sink", "int", 4, 0, None, "initial tokens kept as attention sinks"),
        Param("window", "int", 1020, 1, None, "recent tokens each query sees, itself included"),
    ),
    kind="static",
    phases=frozenset({"prefill", "decode", "kv"}),
    needs_calibration=False,
    crossover=2048,
    crossover_why=(
        "with the default 4+1020 cache, a 2048-token causal prefill can skip only ~25% of its blocks, "
        "too little to pay for block-sparse bookkeeping; below the cache size the method equals causal"
    ),
    mask_mod=streaming_mask_mod,
    kv_policy=streaming_kv,
)
