"""Structural attention matching.

Two anchors, one record:

* **softmax anchor** — every softmax (``torch.softmax``, ``aten._softmax``, ``_safe_softmax``, a
  ``nn.Softmax`` module, or the decomposed ``exp(x - amax(x)) / sum(exp(...))``). From it the matcher
  walks the dataflow *back* to the ``q @ kᵀ`` product (through scale, softcap, masks, biases, casts) and
  *forward* to ``@ v`` (through casts, dropout, the row-zeroing ``where`` of a safe softmax).
* **SDPA anchor** — ``F.scaled_dot_product_attention`` and its ATen variants.

Either way the result is a :class:`Match` whose fields are *named captures* (``q``, ``k``, ``v``,
``scale``, ``softcap``, ``bias``, ``keep`` ...), never node positions. Anything unexpected raises
:class:`Reject` with a human-readable reason, recorded against the softmax that was examined.

The pieces live apart: :mod:`.records` holds the records, :mod:`.operands` the operand helpers both
walks share, :mod:`.scores` the walk back to ``q @ kᵀ``, :mod:`.values` the walk forward to ``@ v``. This
module holds the two anchors, the already-sparse rejections (block-sparse, banded) and
:func:`find_matches`; it re-exports the records, so ``from lcpass.patterns.matcher import Match`` keeps
working.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from .anchors import SDPA_KINDS
from .graphinfo import dtype_of, layer_name, rank_of, shape_of, same_size
from .operands import MATMULS, einsum_qk, fold_repeat_kv, norm_dim, operand, peel, softmax_input
from .records import Match, Operand, Reject, Rejection, operand_shape
from .scores import BLOCK_SPARSE, walk_scores
from .values import walk_values
from .vocab import Op, is_assert, op_of, target_name

__all__ = ["Match", "Operand", "Rejection", "Reject", "find_matches", "operand_shape"]

_SDPA_KINDS = SDPA_KINDS


def _match_softmax(gm: GraphModule, node: Node, x: Node, dim) -> Match:
    r = rank_of(x)
    d = norm_dim(dim, r)
    if r is None:
        raise Reject("the softmax input has no known shape")
    if d != r - 1:
        raise Reject(f"softmax over dim {dim} of a rank-{r} tensor, not the key axis (last dim)")
    m = Match(anchor=node, end=node, q=None, k=None, v=None, scale=1.0, source="eager-softmax")  # type: ignore[arg-type]
    try:
        product = walk_scores(gm, m, x)
    except Reject:
        via = _rearranged_product(gm, x) if isinstance(x, Node) else None
        if via is not None:
            raise Reject(BANDED.format(via=via)) from None
        raise
    pop = op_of(product, gm)
    scale = [1.0]
    if pop.kind == "einsum":
        qn, qp, kn, kp, kt = einsum_qk(pop)
        m.q = operand(gm, qn, scale) if qp is None else Operand(peel(gm, qn, scale), perm=qp)
        m.k = operand(gm, kn, scale) if kp is None else Operand(peel(gm, kn, scale), perm=kp)
        m.k.transpose = kt
        m.source = "einsum"
    else:
        a, b = pop["a"], pop["b"]
        if pop.kind in ("baddbmm", "bmm"):
            m.source = pop.kind
        m.q = operand(gm, a, scale)
        m.k = operand(gm, b, scale, is_key=True)
    m.scale *= scale[0]
    if m.q_scales and m.q.perm is not None:
        raise Reject(f"the scores are multiplied by a tensor ({m.q_scales[0].name}) and q is in an einsum layout")
    for f in m.q_scales:
        fs, qs = shape_of(f) or (), shape_of(m.q.node) or ()
        merged = len(qs) == 4 and m.scores_rank == 3 and len(fs) <= 3 and (
            len(fs) < 3 or fs[0] == 1 or same_size(fs[0], qs[0] * qs[1]))  # [B*H, Sq|1, 1] unmerges to q's
        if rank_of(m.q.node) != m.scores_rank and not merged and any(d != 1 for d in fs):
            raise Reject(f"the scores are multiplied by a tensor of shape {tuple(fs)} ({f.name}) in a layout "
                         "other than q's (heads merged into the batch)")
    # forward: probabilities -> @ v
    walk_values(gm, m, node)
    return m


def _match_sdpa(gm: GraphModule, node: Node, op: Op) -> Match:
    q, k, v = op["q"], op["k"], op["v"]
    qs = shape_of(q)
    if qs is None:
        raise Reject("the SDPA query has no known shape")
    scale = op["scale"]
    if scale is None:
        d = qs[-1]
        if not isinstance(d, int):
            raise Reject(f"head_dim is symbolic ({d}); pass an explicit scale")
        scale = 1.0 / math.sqrt(d)
    m = Match(anchor=node, end=node, q=Operand(q), k=None, v=None, scale=float(scale),  # type: ignore[arg-type]
              is_causal=bool(op["is_causal"]), dropout_p=float(op["dropout_p"] or 0.0), source=op.kind.replace("_", "-"))
    m.k = Operand(*fold_repeat_kv(gm, k))
    m.v = Operand(*fold_repeat_kv(gm, v))
    mask = op["attn_mask"]
    if mask is not None:
        m.mask_is_sdpa = True
        if op.kind in ("sdpa", "sdpa_cpu"):
            if dtype_of(mask) == torch.bool:
                m.keep.append((mask, False))
            else:
                m.bias.append((mask, 1.0))
        else:
            m.bias.append((mask, 1.0))
    if op.kind != "sdpa":  # tuple-returning variants: the output is getitem 0
        outs = [u for u in node.users if op_of(u, gm) is not None and op_of(u, gm).kind == "getitem"]
        firsts = [u for u in outs if u.args[1] == 0]
        others = [u for u in node.users if u not in firsts and not is_assert(u) and u.args[1] != 0]
        if others:
            raise Reject(f"{target_name(node)}'s logsumexp/extra outputs are used ({others[0].name})")
        if len(firsts) != 1:
            raise Reject(f"{target_name(node)}'s output is not read exactly once")
        m.end = firsts[0]
    if m.is_causal:
        ks = shape_of(k)
        if ks is None or not same_size(qs[-2], ks[-2]):
            raise Reject("is_causal with a query length that is not provably the key length (top-left causal)")
    return m


BANDED = ("already sparse (banded attention over overlapping chunks, as Longformer computes its sliding window: "
          "the scores are a product of strided chunks rearranged by {via}); lcpass leaves it as the model computes it")
_REARRANGE = ("pad", "constant_pad_nd", "as_strided", "unfold")


def _rearranged_product(gm: GraphModule, node: Node, limit: int = 48) -> Optional[str]:
    """The rearranging op (a pad, as_strided, unfold) through which a matrix product reaches ``node``, when
    one does within ``limit`` nodes upstream: attention computed on chunks and re-laid out as bands."""
    frontier, seen, via = [(node, None)], set(), None
    while frontier and len(seen) < limit:
        n, through = frontier.pop(0)
        if not isinstance(n, Node) or n in seen:
            continue
        seen.add(n)
        name = target_name(n) if n.op in ("call_function", "call_method") else ""
        here = through or next((r for r in _REARRANGE if r in name.lower()), None)
        op = op_of(n, gm)
        if op is not None and op.kind in MATMULS and through is not None:
            via = through
            break
        frontier.extend((a, here) for a in n.all_input_nodes)
    return via


def _block_sparse_sites(rejected: list[Rejection]) -> list[Rejection]:
    """Every softmax of a site that computes block-sparse attention is part of it: say so, not why each
    piece alone is not attention."""
    sparse = {r.site for r in rejected if r.reason.startswith(BLOCK_SPARSE)}
    return [r if r.site not in sparse or r.reason.startswith(BLOCK_SPARSE)
            else Rejection(r.node, r.site, f"{BLOCK_SPARSE} (this softmax is one of its blocks: {r.reason})")
            for r in rejected]


def find_matches(gm: GraphModule) -> tuple[list[Match], list[Rejection]]:
    """Every attention site in ``gm`` as a :class:`Match`, and every softmax left alone with its reason."""
    matches: list[Match] = []
    rejected: list[Rejection] = []
    for node in list(gm.graph.nodes):
        op = op_of(node, gm)
        try:
            if op is not None and op.kind in _SDPA_KINDS:
                m = _match_sdpa(gm, node, op)
            else:
                sm = softmax_input(gm, node)
                if sm is None:
                    continue
                m = _match_softmax(gm, node, *sm)
            _check_operands(m)
            m.site = layer_name(node)
            matches.append(m)
        except Reject as why:
            rejected.append(Rejection(node.name, layer_name(node), str(why)))
    return matches, _block_sparse_sites(rejected)


def _check_operands(m: Match) -> None:
    ranks = {rank_of(m.q.node), rank_of(m.k.node), rank_of(m.v.node)}
    if len(ranks) != 1 or next(iter(ranks)) not in (3, 4):
        raise Reject(f"q, k, v ranks {sorted(r for r in ranks if r is not None)} are not all 3 or all 4")
    qs, ks = operand_shape(m.q), operand_shape(m.k)
    if len(qs) == 4:
        hq, hkv = qs[1], ks[1]
        if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv != 0:
            raise Reject(f"q has {hq} heads and k {hkv}; Hkv must divide Hq")
    if not same_size(qs[-1], ks[-1]):
        raise Reject(f"q and k head dims differ ({qs[-1]} vs {ks[-1]})")
