"""`dense` and `causal`: the two methods that skip nothing (baselines and "leave this layer alone").

* ``dense`` — the site's own attention, unchanged. Its mask_mod is ``full_mask()``: the method adds no
  restriction, and the lowering keeps the site's own ``is_causal`` / padding mask. Use it to exclude
  layers from sparsification (``Plan.dense_layers``).
* ``causal`` — plain causal attention (Vaswani et al., "Attention Is All You Need", NeurIPS 2017,
  with the autoregressive mask); the oracle every windowed method reduces to when its window covers
  the whole context.

Example:
    >>> from lcpass.methods import get_method
    >>> get_method("causal").mask_mod({}, head=0, n_heads=8, q_len=16, kv_len=16).__name__
    'causal'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lcpass import masks as M
from lcpass.methods.base import KVPolicy, Method


def dense_mask_mod(params: Mapping[str, Any], *, head: int, n_heads: int, q_len: int, kv_len: int) -> Any:
    """No restriction: every query may see every key (the site's own mask still applies)."""
    return M.full_mask()


def causal_mask_mod(params: Mapping[str, Any], *, head: int, n_heads: int, q_len: int, kv_len: int) -> Any:
    """Key position <= query position (positions absolute)."""
    return M.causal_mask()


def all_kv(params: Mapping[str, Any], *, kv_len: int) -> KVPolicy:
    """Keep the whole KV cache."""
    return KVPolicy.all()


DENSE = Method(
    name="dense",
    paper="none: the site's original attention, unchanged",
    summary="Leave the site as captured (its own causal/padding mask applies); excludes a layer or head.",
    params=(),
    kind="dense",
    phases=frozenset({"prefill", "decode"}),
    needs_calibration=False,
    crossover=0,
    crossover_why="nothing is skipped, so there is nothing to fall back from",
    mask_mod=dense_mask_mod,
    kv_policy=all_kv,
)

CAUSAL = Method(
    name="causal",
    paper="Attention Is All You Need (NeurIPS 2017), autoregressive mask",
    summary="Full causal attention: query i sees keys 0..i. The baseline windowed methods reduce to.",
    params=(),
    kind="dense",
    phases=frozenset({"prefill", "decode"}),
    needs_calibration=False,
    crossover=0,
    crossover_why="nothing is skipped beyond the causal triangle the dense kernel skips anyway",
    mask_mod=causal_mask_mod,
    kv_policy=all_kv,
)
