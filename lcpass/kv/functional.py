"""Functional KV caches in plain graphs: bound the ``torch.cat`` append to what the plan keeps.

A plain (non-transformers) model often carries its cache as tensors: ``forward(x, pos, past_k, past_v)``
computes ``k = cat([past_k, k_new], dim=2)``, attends, and returns ``k`` for the next call. After
lowering, :func:`bound_cache_appends` finds each planned attention whose K / V come from such a ``cat``
that also flows to the graph's outputs, and makes the *returned* tensor bounded::

    k = cat([past_k, k_new], 2)          # attention still reads the full append (this step's keys)
    k_out = lcpass.kv_bound(k, sink, recent - 1)   # what the next step needs besides its own token

so a cache returned after N tokens holds ``sink + recent - 1`` entries instead of N. Kept entries keep
their index order (sinks first, then the contiguous recent run), so index distances inside the recent
run are true distances and the method's mask on indices stays exact; positions (RoPE, learned
embeddings) must come from an explicit input, never from ``past_k.shape``.

Only sites whose KV heads all share one ``sinks+recent`` policy are bounded (one tensor cannot hold heads
of different lengths); others keep their append, with a warning naming the site.

Example::

    >>> m = lcpass.optimize(model, method="streaming", sink=4, window=64, example_inputs=(ids, pos, pk, pv),
    ...                     capture="fx")   # one graph for prefill and decode
    >>> logits, pk, pv = m(ids, pos, pk, pv)          # pk: [B, H, <= 4 + 63, D]
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch
from torch.fx import GraphModule, Node

from lcpass.lower import PLANNED_OP
from lcpass.methods import kv_head_policies

__all__ = ["kv_bound", "bound_cache_appends"]


@torch.library.custom_op("lcpass::kv_bound", mutates_args=())
def kv_bound(x: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Keep the first ``sink`` and last ``recent`` entries along dim 2: [B, H, S, D] -> [B, H, <= sink+recent, D].

    >>> kv_bound(torch.arange(10.).view(1, 1, 10, 1), 2, 3).flatten().tolist()
    [0.0, 1.0, 7.0, 8.0, 9.0]
    """
    s = x.shape[2]
    if s <= sink + recent:
        return x.clone()
    return torch.cat([x[:, :, :sink], x[:, :, s - recent:]], dim=2)


@kv_bound.register_fake
def _kv_bound_fake(x, sink, recent):
    s = x.shape[2]
    n = torch.sym_min(s, sink + recent) if isinstance(s, torch.SymInt) else min(s, sink + recent)
    return x.new_empty((x.shape[0], x.shape[1], n, x.shape[3]))


KV_BOUND = torch.ops.lcpass.kv_bound.default
_PASS_THROUGH = {"expand", "reshape", "view", "contiguous", "clone", "_unsafe_view", "unsqueeze", "to",
                 "repeat_interleave", "flatten", "getitem"}
_CATS = {torch.cat, torch.ops.aten.cat.default, torch.concat}


def _name(n: Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t)).split(".")[0]


def _source_cat(n: Node) -> Optional[Node]:
    """The cat node K or V comes from, through view-like ops (GQA expand/reshape included)."""
    for _ in range(8):
        if n.op == "call_function" and n.target in _CATS:
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            return n if dim in (2, -2) else None
        if n.op in ("call_function", "call_method") and _name(n) in _PASS_THROUGH and n.args \
                and isinstance(n.args[0], Node):
            n = n.args[0]
            continue
        return None
    return None


def _reaches_output(n: Node) -> list[Node]:
    return [u for u in n.users if u.op == "output"]


def bound_cache_appends(gm: GraphModule, sites: Sequence[Any], resolve) -> list[tuple[str, int, int]]:
    """Bound the returned KV appends of every planned site of ``gm``; returns (site, sink, recent) rewritten.

    ``resolve(site_name, n_heads) -> head specs`` (a Plan's ``resolve``). Sites keeping everything are left
    alone; mixed-policy sites are left alone with a warning.
    """
    by_node = {s.node: s for s in sites}
    done = []
    for node in list(gm.graph.nodes):
        if node.target is not PLANNED_OP:
            continue
        site = next((s for s in sites if s.name == node.args[9]), None) or by_node.get(node.name)
        if site is None:
            continue
        pols = set(kv_head_policies(resolve(site.name, site.n_heads), site.n_heads, site.n_kv_heads, 1 << 20))
        if len(pols) != 1:
            warnings.warn(f"lcpass.kv: site {site.name} mixes KV policies {sorted(p.kind for p in pols)} across heads; "
                          f"a tensor cache cannot be ragged, so its append is kept whole", stacklevel=2)
            continue
        pol = pols.pop()
        if pol.kind == "all":
            continue
        if pol.kind != "sinks+recent":
            warnings.warn(f"lcpass.kv: site {site.name} has a {pol.kind} KV policy, which a tensor cache cannot "
                          f"express; its append is kept whole", stacklevel=2)
            continue
        for arg in node.args[1:3]:
            cat = _source_cat(arg) if isinstance(arg, Node) else None
            if cat is None:
                continue
            for out in _reaches_output(cat):
                with gm.graph.inserting_after(cat):
                    b = gm.graph.call_function(KV_BOUND, (cat, pol.sink, max(pol.recent - 1, 0)))
                out.replace_input_with(cat, b)
                done.append((site.name, pol.sink, pol.recent - 1))
    gm.graph.lint()
    gm.recompile()
    return done
