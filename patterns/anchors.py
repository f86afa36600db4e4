"""Where each attention site's anchor call sits inside its module, for routes that meet the site at run time.

A site's anchor is the call the matcher started from: an SDPA call or a softmax. Counting, in graph order
(= execution order of the captured forward), the anchors of each kind inside a module's scope (the
module and its children) gives every anchor a position: "the 2nd softmax ``model.layers.0.attn`` runs".
The transformers door's function route (``lcpass.hf_inline``) counts the same calls while the module
runs and hands that one to the site's plan. The count is taken *before* dead-code elimination, because
the eager forward also computes attention weights nobody returns.

Example::

    >>> order = anchor_order(gm)           # before canonicalize touches the graph
    >>> order["softmax_1"]
    ('softmax', {'model.layers.0.self_attn': 0, 'model.layers.0': 0, 'model.layers': 1, 'model': 1})
"""
from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from .graphinfo import normalise_path
from .vocab import op_of

__all__ = ["anchor_order", "SDPA_KINDS"]

SDPA_KINDS = ("sdpa", "sdpa_cpu", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn")


def _scopes(node: Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        p = normalise_path(path)
        if p not in out:
            out.append(p)
    return out


def _kind(node: Node, gm: GraphModule) -> Optional[str]:
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    try:
        op = op_of(node, gm)
    except Exception:  # noqa: BLE001 - a node the vocabulary cannot read is no anchor
        return None
    if op is None:
        return None
    if op.kind in SDPA_KINDS:
        return "sdpa"
    if op.kind == "softmax":
        return "softmax"
    return None


def anchor_order(gm: GraphModule) -> dict[str, tuple[str, dict[str, int]]]:
    """node name -> (anchor kind, {module path: position among that module's anchors of that kind})."""
    counts: dict[tuple[str, str], int] = {}
    out: dict[str, tuple[str, dict[str, int]]] = {}
    for node in gm.graph.nodes:
        kind = _kind(node, gm)
        if kind is None:
            continue
        where = {}
        for scope in _scopes(node):
            n = counts.get((scope, kind), 0)
            where[scope] = n
            counts[(scope, kind)] = n + 1
        out[node.name] = (kind, where)
    return out
