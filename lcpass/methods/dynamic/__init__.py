"""Dynamic (content-based) sparse attention methods and score modifications.

Every method is a :class:`DynamicMethod` record in the one method registry (``kind="dynamic"``) with
two plain functions of fixed signature:

    select(q, k, *, params, state, mask_mod) -> Selection        # what each query (block) attends
    attend(q, k, v, *, params, state, mask_mod, scale) -> Tensor  # attention under that selection

``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]`` (Hkv | Hq; queries at absolute positions ``Sk - Sq + i``);
``params`` is the complete dict of :func:`lcpass.methods.validate_params`; ``state`` is a per-site dict
(or None) the method may read and update (selection caches, centroids, offline indexes, shared
cross-layer positions); ``mask_mod`` is the envelope the selection stays inside (dynamic methods accept
only the causal mask, or None for it). A ``Selection`` is either a :class:`lcpass.layout.BlockLayout`
(block granularity; run by :func:`lcpass.engine.sparse_attention`) or a :class:`TokenSelection` (token
granularity; run by :func:`token_attention`, which gathers the selected tokens into one compact block per
query block). ``attend`` of a pure selection method is ``run_selection(q, k, v, select(...))``; methods
that are not a pure selection (HyperAttention's sampled columns, Routing's per-query clusters, CCA's core
tokens, the score_mods) have ``select=None`` and their own ``attend``.

Block: ``quest``, ``seer`` (+ :func:`load_seer_gate`), ``landmark``, ``longheads``. Token: ``tokenselect``,
``hip``, ``squeezed`` (+ :func:`build_squeezed_index`), ``recycled``, ``tidal`` (+ :class:`TidalState`).
Cluster/hash: ``routing``, ``hyper``, ``cca``. Score mods: ``selective``, ``tempscale``, ``entropy_abf``
(+ :func:`entropy_abf_rope`; :mod:`lcpass.rope` rewrites the RoPE base in ``lcpass.optimize``), ``pasta``.
Also :func:`retrieval_head_scores`.

>>> import torch
>>> from lcpass.methods import validate_params
>>> q = torch.randn(1, 8, 2048, 64); k = v = torch.randn(1, 2, 2048, 64)
>>> p = validate_params("quest", {"token_budget": 512})
>>> out = dynamic_attention("quest", q, k, v, p, scale=64 ** -0.5)       # [1, 8, 2048, 64]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lcpass.masks import MaskMod
from lcpass.methods.base import resolve_params
from lcpass.methods.dynamic.block import (LANDMARK, LONGHEADS, QUEST, SEER, SeerGate, landmark_select,
                                          load_seer_gate, longheads_select, quest_bounds, quest_select,
                                          seer_select)
from lcpass.methods.dynamic.cca import CCA, cca_attend, cca_core_tokens, cca_mask
from lcpass.methods.dynamic.cluster import (HYPER, ROUTING, SQUEEZED, SqueezedIndex, build_squeezed_index,
                                            hyper_attention, kmeans, routing_assign, routing_attend,
                                            squeezed_select)
from lcpass.methods.dynamic.common import (DynamicMethod, Selection, TokenSelection, run_selection,
                                           selection_mask, token_attention)
from lcpass.methods.dynamic.retrieval_heads import needle_prompts, retrieval_head_scores
from lcpass.methods.dynamic.score_mods import (ENTROPY_ABF, PASTA, SELECTIVE, TEMPSCALE, entropy_abf_rope,
                                               entropy_abf_score_mod, pasta_score_mod,
                                               selective_query_temperature, selective_score_mod,
                                               tempscale_score_mod)
from lcpass.methods.dynamic.token import (HIP, RECYCLED, TIDAL, TOKENSELECT, TidalState, hip_select,
                                          recycled_select, tidal_select, tokenselect_select)

__all__ = [
    "DYNAMIC_METHODS", "DynamicMethod", "Selection", "TokenSelection", "SeerGate", "SqueezedIndex",
    "TidalState", "build_squeezed_index", "cca_attend", "cca_core_tokens", "cca_mask",
    "dynamic_attention", "dynamic_select", "entropy_abf_rope", "entropy_abf_score_mod", "hip_select",
    "hyper_attention", "kmeans", "landmark_select", "load_seer_gate", "longheads_select", "needle_prompts",
    "pasta_score_mod", "quest_bounds", "quest_select", "recycled_select", "retrieval_head_scores",
    "routing_assign", "routing_attend", "run_selection", "seer_select", "selection_mask",
    "selective_query_temperature", "selective_score_mod", "squeezed_select", "tempscale_score_mod",
    "tidal_select", "token_attention", "tokenselect_select",
]

# Registry order of the dynamic methods (lcpass.methods registers them after the static ones).
DYNAMIC_METHODS: tuple[DynamicMethod, ...] = (
    QUEST, SEER, TOKENSELECT, HIP, SQUEEZED, ROUTING, HYPER, LONGHEADS, LANDMARK, CCA, RECYCLED, TIDAL,
    SELECTIVE, TEMPSCALE, ENTROPY_ABF, PASTA,
)


def _method(name: str) -> DynamicMethod:
    from lcpass.methods import get_method  # lazy: lcpass.methods imports this package before it defines get_method

    m = get_method(name)
    if not isinstance(m, DynamicMethod):
        raise ValueError(f"{name!r} is a {m.kind} method, not a dynamic one; dynamic methods: "
                         f"{', '.join(d.name for d in DYNAMIC_METHODS)}")
    return m


def dynamic_select(name: str, q: Tensor, k: Tensor, params: Mapping[str, Any] | None = None, *,
                   state: dict | None = None, mask_mod: MaskMod | None = None) -> Selection:
    """Validate ``params`` and run method ``name``'s selector (ValueError if it has none)."""
    m = _method(name)
    if m.select is None:
        raise ValueError(f"{name}: has no pure selection (granularity {m.granularity!r}); call "
                         f"dynamic_attention({name!r}, q, k, v, ...)")
    return m.select(q, k, params=resolve_params(m, params), state=state, mask_mod=mask_mod)


def dynamic_attention(name: str, q: Tensor, k: Tensor, v: Tensor, params: Mapping[str, Any] | None = None,
                      *, scale: float, state: dict | None = None, mask_mod: MaskMod | None = None) -> Tensor:
    """Validate ``params`` and run method ``name``: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> like q."""
    m = _method(name)
    return m.attend(q, k, v, params=resolve_params(m, params), state=state, mask_mod=mask_mod, scale=scale)
