"""lcpass.patterns — the attention pattern library.

``canonicalize(gm, flat_inputs)`` finds every attention subgraph of a captured graph structurally and
replaces it, in place, by one ``torch.ops.lcpass.attention`` node (see :mod:`lcpass.patterns.op` for its
named arguments). Every softmax that is not rewritten is reported with the reason.

Example::

    >>> from lcpass.capture import capture
    >>> from lcpass.patterns import canonicalize
    >>> cap = capture(model, kwargs={"input_ids": ids})
    >>> found = canonicalize(cap.gm, cap.flat_inputs, cap.param_placeholders)
    >>> [s.name for s in found.sites]
    ['model.layers.0.self_attn', 'model.layers.1.self_attn']
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional, Sequence

from torch.fx import GraphModule, Node

from .anchors import anchor_order
from .graphinfo import eliminate_dead_code
from .maskinfo import MaskInfo, analyse_masks
from .matcher import find_matches
from .op import CANONICAL_OP, CanonicalArgs, attention, canonical_args, reference
from .opaque import lower_opaque
from .records import Match, Rejection
from .rewrite import Site, rewrite_matches

__all__ = [
    "CANONICAL_OP", "CanonicalArgs", "Detection", "anchor_order", "Rejection", "Site", "attention", "canonical_args",
    "canonicalize", "canonical_nodes", "reference",
]


@dataclass
class Detection:
    """The result of canonicalisation: the rewritten graph, its sites, and what was left alone."""

    gm: GraphModule
    sites: list[Site] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def canonicalize(
    gm: GraphModule,
    flat_inputs: Optional[Sequence[Any]] = None,
    param_placeholders: Iterable[str] = (),
) -> Detection:
    """Rewrite every attention subgraph of ``gm`` into one canonical op, in place.

    Args:
        gm: a captured graph (torch-level from dynamo or ``symbolic_trace``, ATen-level from
            ``torch.export``, or core ATen after ``run_decompositions()``).
        flat_inputs: the example inputs in placeholder order; used to read what a mask means
            (causal, sliding window, padding ...). Without them every mask is kept as a tensor.
        param_placeholders: names of placeholders that hold parameters or buffers (dynamo lifts
            them), so a learned bias is not mistaken for padding.
    """
    lower_opaque(gm, flat_inputs)
    order = anchor_order(gm)  # before dead-code elimination: the eager forward runs dead softmaxes too
    eliminate_dead_code(gm)  # dead values (unreturned attention weights) must not count as users
    matches, rejected = find_matches(gm)
    infos: list[MaskInfo] = analyse_masks(gm, matches, flat_inputs, param_placeholders)
    anchors = [m.anchor.name for m in matches]
    sites = rewrite_matches(gm, matches, infos)
    placed = []
    for site, anchor in zip(sites, anchors):
        kind, where = order.get(anchor, ("", {}))
        placed.append(replace(site, anchor=kind, anchor_index=where.get(site.name.split("#", 1)[0], -1)))
    return Detection(gm, placed, rejected)


def canonical_nodes(gm: GraphModule) -> list[Node]:
    """The canonical attention nodes of a graph, in order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is CANONICAL_OP]
