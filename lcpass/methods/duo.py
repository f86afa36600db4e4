"""DuoAttention: retrieval heads keep full attention, streaming heads keep sinks + recent tokens.

Paper: Xiao, Tang, Zuo, Guo, Yang, Tang, Fu, Han, "DuoAttention: Efficient Long-Context LLM Inference
with Retrieval and Streaming Heads", ICLR 2025. An optimisation on synthetic passkey data learns a gate
per head; heads above the threshold are *retrieval heads* (full causal attention and full KV cache), the
others are *streaming heads* (``sink`` attention sinks + ``recent`` tokens, bounded KV cache).

Which heads are retrieval heads is plan data: the per-head ``retrieval`` flag, normally written by
``Plan.duo(sites, retrieval={site: [heads]}, ...)`` from a calibration or a published head pattern.

Parameters: ``sink`` (paper: sink tokens, 64 in its setting), ``recent`` (recent tokens, 256),
``retrieval`` (this head is a retrieval head).

Example:
    >>> from lcpass.methods import validate_params
    >>> validate_params("duo", {"retrieval": True})
    {'sink': 64, 'recent': 256, 'retrieval': True}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lcpass import masks as M
from lcpass.methods.base import KVPolicy, Method, Param


def duo_mask_mod(params: Mapping[str, Any], *, head: int, n_heads: int, q_len: int, kv_len: int) -> Any:
    """Retrieval head: causal. Streaming head: causal & (sink | recent window)."""
    if params["retrieval"]:
        return M.causal_mask()
    return M.streaming_mask(params["sink"], params["recent"])


def duo_kv(params: Mapping[str, Any], *, kv_len: int) -> KVPolicy:
    """Retrieval heads keep everything; streaming heads keep sinks + recent."""
    if params["retrieval"]:
        return KVPolicy.all()
    return KVPolicy.sinks_recent(params["sink"], params["recent"])


DUO = Method(
    name="duo",
    paper=(
        "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads "
        "(ICLR 2025)"
    ),
    summary="Per head: retrieval heads full causal + full KV; streaming heads sink + recent tokens only.",
    params=(
        Param("sink", "int", 64, 0, None, "attention-sink tokens a streaming head keeps"),
        Param("recent", "int", 256, 1, None, "recent tokens a streaming head keeps, itself included"),
        Param("retrieval", "bool", False, None, None, "this head is a retrieval head (full attention)"),
    ),
    kind="static",
    phases=frozenset({"prefill", "decode", "kv"}),
    needs_calibration=True,
    crossover=2048,
    crossover_why=(
        "streaming heads save (N - 320) / N of their keys; with a typical 25-50% retrieval share the "
        "whole site skips under ~35% of its blocks below 2048 tokens, not worth the sparse path"
    ),
    mask_mod=duo_mask_mod,
    kv_policy=duo_kv,
)
