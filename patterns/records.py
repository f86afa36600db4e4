"""The matcher's records: what it finds and why it leaves a softmax alone.

A :class:`Match` is one attention site as *named captures* (``q``, ``k``, ``v``, ``scale``, ``softcap``,
``bias``, ``keep`` ...), never node positions; q, k and v are :class:`Operand` captures. Anything
unexpected raises :class:`Reject` with a human-readable reason, recorded as a :class:`Rejection` against
the softmax that was examined.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch.fx import Node

from .graphinfo import shape_of

__all__ = ["Match", "Operand", "Reject", "Rejection", "operand_shape"]


class Reject(Exception):
    """A softmax (or SDPA call) that is not rewritten, with the reason why."""


@dataclass(frozen=True)
class Rejection:
    """A softmax lcpass examined and left alone."""

    node: str
    site: str
    reason: str


@dataclass
class Operand:
    """A q/k/v capture: the node, the kv-head grouping folded away, and whether a transpose is owed."""

    node: Node
    group: int = 1  # repeat_kv factor folded away (k, v only)
    transpose: bool = False  # einsum spellings that hold kᵀ
    perm: Optional[tuple[int, ...]] = None  # einsum spellings in another layout ([B, S, H, D] ...): to [B, H, S, D]


@dataclass
class Match:
    """One attention site, as named captures."""

    anchor: Node
    end: Node
    q: Operand
    k: Operand
    v: Operand
    scale: float
    softcap: float = 0.0
    bias: list[tuple[Node, float]] = field(default_factory=list)  # additive terms, coefficient
    keep: list[tuple[Node, bool]] = field(default_factory=list)  # bool masks, negate?
    mask_is_sdpa: bool = False
    is_causal: bool = False
    dropout_p: float = 0.0
    source: str = ""
    site: str = ""
    scores_rank: int = 4
    chain: list[Node] = field(default_factory=list)
    # a bias / mask term added before reshapes of the scores: the (input shape, output shape) of each
    # reshape between the term and the softmax, innermost first, to bring the term to the softmax's layout
    term_views: dict[Node, list[tuple[tuple[int, ...], tuple[int, ...]]]] = field(default_factory=dict)
    # tensor factors of the scores that are constant along the keys ([.., Sq | 1, 1]: a learned per-head
    # logit scale, Swin-v2's cosine scale): folded into q, which is exact (q·k is linear in q)
    q_scales: list[Node] = field(default_factory=list)
    out_perm: Optional[tuple[int, ...]] = None  # the value einsum's output layout, from [B, H, Sq, Dv]
    # learned attention sinks (gpt-oss): a logit column [B|1, H|1, Sq|1, 1] (or [B*H|1, Sq|1, 1] on merged
    # scores) concatenated after the masked scores, its probability dropped before the value product
    sink: Optional[Node] = None
    sink_dropped: bool = False
    sink_lse: bool = False  # the sink applied after the value product: out * sigmoid(logsumexp(s) - sink)


def operand_shape(o: Operand) -> Optional[tuple]:
    """An operand's shape in the canonical layout (its einsum permutation and kᵀ undone)."""
    s = shape_of(o.node)
    if s is None:
        return None
    if o.perm is not None:
        s = tuple(s[p] for p in o.perm)
    return (*s[:-2], s[-1], s[-2]) if o.transpose else s
