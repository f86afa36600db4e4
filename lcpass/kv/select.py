"""Decode-time KV selection: each generated token reads only the KV blocks / tokens it selects.

A selector is a dynamic method of :mod:`lcpass.methods.dynamic` whose record holds a ``decode``
(:class:`~lcpass.methods.dynamic.common.DecodeSelector`: the parameters it reads, its algorithm, its
budget); names, defaults, ranges and the algorithm come from that record, nowhere else (the algorithms
and their primitives are in :mod:`lcpass.methods.dynamic.decode`). The registry ships four:

* ``quest`` (Quest, ICML 2024) — per page of ``page_size`` slots the element-wise min and max key,
  kept incrementally in the cache; the page bound ``sum_d max(q_d kmin_d, q_d kmax_d)`` (max over the
  G query heads of a KV head) picks the top pages within ``token_budget``, plus ``sink_pages`` and the
  unfinished last page. Reads 2/page_size of the keys for scoring, then only the chosen pages.
* ``tokenselect`` (TokenSelect, 2024) — per-head ``q.k`` criticality, softmax per head, summed over the
  group (soft vote), top ``k`` tokens plus ``n_sink`` first and ``n_local`` last; the *selection
  cache* is kept per KV head: a head reuses its selection (plus the tokens added since) while each of
  its query heads has cosine similarity >= ``cache_threshold`` with its previous query, and keeps
  the selected K/V rows gathered (working memory of ``k + n_sink + n_local + 1`` slots per KV head,
  counted by ``cache.nbytes()``), so a reuse reads ~``k`` rows instead of the whole cache.
* ``recycled`` (Recycled Attention, 2024) — full attention every ``S`` steps, recording the ``K`` most
  attended tokens; the steps in between attend those plus the tokens generated since.
* ``tidal`` (TidalDecode, 2024) — layers before ``selection_layer`` and the two selection layers attend
  fully; a selection layer picks the ``k`` most attended positions (all heads), reused by every later
  layer until the next selection layer.

All work on one :class:`~lcpass.kv.group.KVGroup` at decode (one query per row); shapes::

    q    : [B, h, G, D]   the G query heads of each of the group's h KV heads, as G query rows
    keys : [B, h, L, D],  pos : [B, L] (-1 = empty slot)
    idx  : [B, h, K] slot indices (-1 = unused)  ->  attention over K gathered slots only

Example::

    >>> sel = Selector("quest", {"token_budget": 1638, "page_size": 64})
    >>> sorted(decode_selectors())
    ['quest', 'recycled', 'tidal', 'tokenselect']
    >>> cache = lcpass.kv.CompressedCache(select=sel)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from torch import Tensor

from lcpass.methods import get_method, list_methods, resolve_params, spec_parts
from lcpass.methods.dynamic.decode import dense_group_attend, gather_attend

__all__ = ["Selector", "decode_selectors", "selector_from_spec", "select_attend", "gather_attend",
           "dense_group_attend"]


def decode_selectors() -> dict[str, dict[str, Any]]:
    """Every registered method with a decode selector -> its selector parameters' defaults (read from
    the method's record: ``decode_params``), in table order."""
    out: dict[str, dict[str, Any]] = {}
    for m in list_methods():
        names = getattr(m, "decode_params", ())
        if names:
            out[m.name] = {n: m.param(n).default for n in names}
    return out


@dataclass(frozen=True)
class Selector:
    """A decode-time selector: a method of :func:`decode_selectors` and its parameters (the record's
    defaults filled, the record's ranges checked).

    >>> Selector("quest", {"token_budget": 256}).params["page_size"]
    128
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = decode_selectors().get(self.name)
        if known is None:
            raise ValueError(f"Selector: unknown decode selector {self.name!r}; use one of {sorted(decode_selectors())}")
        bad = sorted(set(self.params) - set(known))
        if bad:
            raise ValueError(f"Selector({self.name!r}): unknown parameter(s) {bad}; allowed: {sorted(known)}")
        try:
            full = resolve_params(get_method(self.name), dict(self.params))
        except ValueError as exc:
            raise ValueError(f"Selector({self.name!r}): {exc}") from None
        object.__setattr__(self, "params", {k: full[k] for k in known})

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(dict(self.params), sort_keys=True)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Selector) and self.name == other.name and dict(self.params) == dict(other.params)

    def budget(self) -> int:
        """Tokens one decode step attends (besides the sinks/local extras)."""
        return int(get_method(self.name).decode.budget(self.params))

    def working_slots(self) -> int:
        """KV slots per KV head the selector keeps beside the cache (TokenSelect's gathered selection)."""
        return int(get_method(self.name).decode.working_slots(self.params))


def selector_from_spec(spec: Any) -> Optional[Selector]:
    """The decode selector of a plan head spec whose method is a dynamic selector (else None).

    The spec's selector parameters are kept (the others are the method's prefill parameters); the
    record's defaults fill the rest.

    >>> selector_from_spec(("quest", {"token_budget": 512})).params["token_budget"]
    512
    """
    name, params = spec_parts(spec)
    known = decode_selectors().get(name)
    if known is None:
        return None
    return Selector(name, {k: v for k, v in dict(params).items() if k in known})


def select_attend(sel: Selector, q: Tensor, group, scale: float, *, layer_idx: int, n_layers: int,
                  shared: dict) -> Tensor:
    """Decode attention of ``group`` under ``sel``: q [B, h, G, D] -> [B, h, G, D], by the selector its
    method's record holds."""
    return get_method(sel.name).decode.attend(q, group, sel.params, scale, layer_idx=layer_idx, n_layers=n_layers,
                                              shared=shared)
