"""The values walk: from the softmax forward to ``@ v``.

Through casts, reshapes, dropout, the drop of a sink column's probability and the row zeroing of a safe
softmax (passed only when it zeroes nothing the scores' mask lets through), to the value product, and past
it to a sink applied from the scores' log-sum-exp. Fills v, the site's end, dropout and the output layout
of a :class:`Match`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from .graphinfo import constant_number, dtype_of, is_neg_inf_like, rank_of, shape_of
from .operands import einsum_pv, leads_to_product, norm_dim, operand, peel, softmax_input, users_of
from .maskinfo import NEG_LIMIT
from .records import Match, Operand, Reject
from .vocab import Op, op_of, target_name

__all__ = ["walk_values"]


def walk_values(gm: GraphModule, m: Match, node: Node) -> None:
    """From the softmax forward to ``@ v``; fills v, end, dropout and the output layout on ``m``."""
    cur = node
    while True:
        users = users_of(cur)
        if len(users) != 1:
            what = ", ".join(u.name for u in users) or "nothing"
            raise Reject(f"attention probabilities used elsewhere too ({what}); rewriting would change them" if users
                         else "the softmax output is unused")
        u = users[0]
        op = op_of(u, gm)
        m.chain.append(u)
        if op is None:
            raise Reject(f"no value matmul follows: the probabilities flow into {target_name(u)}")
        if op.kind in ("cast", "identity", "expand"):
            cur = u
        elif op.kind == "view":
            cur = u
        elif op.kind == "dropout":
            if op["train"] and op["p"]:
                m.dropout_p = float(op["p"])
            cur = u
        elif op.kind == "getitem" and op["index"] == 0:
            cur = u
        elif op.kind in ("slice", "getitem") and m.sink is not None and not m.sink_dropped and _drops_sink(op, u):
            m.sink_dropped = True
            cur = u
        elif op.kind == "where" and (constant_number(op["a"], gm) == 0.0 or constant_number(op["b"], gm) == 0.0):
            zero_if = constant_number(op["a"], gm) == 0.0 and op["b"] is cur  # where(c, 0, p): zeroes where c
            if not zero_if and op["a"] is not cur:
                raise Reject(f"where() after the softmax ({u.name}) does not select the probabilities")
            _check_zeroing(gm, m, node, u, op["cond"], zero_if)
            cur = u  # zeroes only what the mask hides: what the canonical op does too
        elif op.kind == "masked_fill" and op["x"] is cur and constant_number(op["value"], gm) == 0.0:
            _check_zeroing(gm, m, node, u, op["cond"], True)
            cur = u  # DeBERTa's XSoftmax / CPM-Ant: the probabilities of masked keys set to 0 again
        elif op.kind == "nan_to_num" and (op["nan"] is None or constant_number(op["nan"], gm) == 0.0):
            cur = u  # fully masked rows' NaN probabilities -> 0 (the same zeroing, spelled as nan_to_num)
        elif m.sink is not None and not m.sink_dropped and op.kind in ("matmul", "bmm", "einsum"):
            raise Reject(f"the sink column's probability is not dropped before the value product ({u.name})")
        elif op.kind in ("matmul", "bmm"):
            if op["a"] is not cur:
                raise Reject("the probabilities are the right operand of the value matmul")
            m.v = operand(gm, op["b"], None)
            m.end = u
            _lse_sink(gm, m, node)
            break
        elif op.kind == "einsum":
            vn, vp, m.out_perm = einsum_pv(op, cur)
            m.v = operand(gm, vn, None) if vp is None else Operand(peel(gm, vn, None), perm=vp)
            m.end = u
            break
        else:
            raise Reject(f"no value matmul follows: the probabilities flow into {target_name(u)}")


def _keeps_truth(node: Node, op: Op) -> bool:
    """A cast that keeps which elements are truthy: to bool, or from bool / an integer type (a float cast
    to an integer rounds 0.5 to 0, so it is not followed)."""
    src, dst = dtype_of(op["x"]), dtype_of(node)
    if src is None or dst is None:
        return False
    return dst == torch.bool or src == torch.bool or not src.is_floating_point and not src.is_complex


def _predicate(gm: GraphModule, node: Node) -> tuple[Node, bool]:
    """A boolean tensor as (base, same): True where ``base`` is truthy when ``same``, where it is falsy
    otherwise — through views, broadcasts, casts, negations and comparisons with 0 / False."""
    same = True
    while isinstance(node, Node):
        op = op_of(node, gm)
        if op is None:
            break
        if op.kind in ("view", "expand", "unsqueeze", "identity") or (op.kind == "cast" and _keeps_truth(node, op)):
            node = op["x"]
        elif op.kind == "logical_not":
            node, same = op["x"], not same
        elif op.kind in ("eq", "ne") and isinstance(op["a"], Node) and constant_number(op["b"], gm) == 0.0:
            node, same = op["a"], same if op.kind == "ne" else not same
        else:
            break
    return node, same


def _masked_rows(gm: GraphModule, softmax: Node, base: Node, same: bool, zero_if: bool) -> bool:
    """Whether the condition zeroes only rows whose every key is masked (-inf): the safe softmax of SDPA's
    core-ATen decomposition, ``where(~any(~(s == -inf), -1, keepdim=True), 0, softmax(s))``, or its
    ``all(s == -inf)`` spelling. Such rows have no visible key, so zeroing them changes no exact answer."""
    op = op_of(base, gm)
    if op is None or op.kind not in ("any", "all") or not op["keepdim"]:
        return False
    dim = op["dim"][0] if isinstance(op["dim"], (list, tuple)) and len(op["dim"]) == 1 else op["dim"]
    if dim not in (-1, rank_of(base) - 1):
        return False
    zero_when = same == zero_if  # the rows zeroed are those where the reduction is True (else False)
    pb, ps = _predicate(gm, op["x"])
    pop = op_of(pb, gm)
    if pop is None or pop.kind != "eq" or constant_number(pop["b"], gm) != float("-inf"):
        return False
    scores = softmax.args[0] if softmax.args else None
    if pop["a"] is not scores:
        return False
    # all(masked) True -> zero; any(visible) False -> zero (visible = not masked, i.e. ps False)
    return (op.kind == "all" and ps and zero_when) or (op.kind == "any" and not ps and not zero_when)


def _hiding_biases(gm: GraphModule, m: Match) -> list[tuple[Node, bool]]:
    """Conditions an additive mask hides by: ``x.masked_fill(c, -inf)`` hides where ``c`` is truthy,
    ``where(c, -inf, y)`` where it is, ``where(c, y, -inf)`` where it is not, ``s - big * b`` (a bool ``b``
    cast to the scores' dtype, ``big`` at least -NEG_LIMIT: exp underflows to 0) where ``b`` is (as
    (cond, negate) pairs)."""
    out = []
    for term, coef in m.bias:
        op = op_of(term, gm)
        if op is None:
            continue
        if op.kind == "mul" and coef < 0:  # s - c * x, c huge: hides where x (a 0/1 mask) is truthy
            for x, c in ((op["a"], op["b"]), (op["b"], op["a"])):
                big = constant_number(c, gm)
                if isinstance(x, Node) and big is not None and -coef * big >= -NEG_LIMIT and \
                        dtype_of(_predicate(gm, x)[0]) == torch.bool:
                    out.append((x, True))
            continue
        if coef <= 0:
            continue
        if op.kind == "masked_fill" and isinstance(op["cond"], Node) and \
                is_neg_inf_like(constant_number(op["value"], gm)):
            out.append((op["cond"], True))
        elif op.kind == "where" and isinstance(op["cond"], Node):
            if is_neg_inf_like(constant_number(op["a"], gm)):
                out.append((op["cond"], True))
            elif is_neg_inf_like(constant_number(op["b"], gm)):
                out.append((op["cond"], False))
    return out


def _check_zeroing(gm: GraphModule, m: Match, softmax: Node, node: Node, cond: Node, zero_if: bool) -> None:
    """A ``where`` / ``masked_fill`` that sets probabilities to 0 after the softmax is dropped by the
    rewrite only when it zeroes nothing the mask lets through: its condition must be the scores' own
    boolean mask (the same tensor, up to views, casts and negation) with the polarity that hides, or the
    rows where every score is -inf."""
    if not isinstance(cond, Node):
        raise Reject(f"the probabilities are zeroed after the softmax ({node.name}) by a constant condition")
    base, same = _predicate(gm, cond)
    zeroes_truthy = same == zero_if  # zeroes where base is truthy
    if _masked_rows(gm, softmax, base, same, zero_if):
        return
    for keep, negate in [*m.keep, *_hiding_biases(gm, m)]:  # negate: the scores are hidden where keep is truthy
        kb, ks = _predicate(gm, keep)
        hides_truthy = ks == negate
        if kb is base and hides_truthy == zeroes_truthy:
            return
    raise Reject(f"the probabilities are zeroed after the softmax ({node.name}) where the scores' mask does "
                 "not hide them (or by a condition lcpass cannot relate to that mask); the rewrite would "
                 "attend those keys")


def _through(gm: GraphModule, node: object, kinds=("cast", "identity")) -> object:
    while isinstance(node, Node) and op_of(node, gm) is not None and op_of(node, gm).kind in kinds:
        node = op_of(node, gm)["x"]
    return node


def _lse_sink(gm: GraphModule, m: Match, softmax: Node) -> None:
    """``out * sigmoid(logsumexp(s, -1) - sink)[..., None]`` right after ``P @ v`` (Granite-SWA): the same
    learned sink as a concatenated logit column, applied from the row's log-sum-exp. The product becomes
    the site's end; ``s`` must be the very scores the softmax reads."""
    users = users_of(m.end)
    if m.sink is not None or len(users) != 1 or m.scores_rank != 4:
        return
    mul = op_of(users[0], gm)
    if mul is None or mul.kind != "mul":
        return
    factor = mul["b"] if _through(gm, mul["a"]) is m.end else mul["a"] if _through(gm, mul["b"]) is m.end else None
    sq = op_of(_through(gm, factor), gm)
    if sq is None or sq.kind != "unsqueeze" or norm_dim(sq["dim"], rank_of(sq.node)) != 3:
        return
    sig = op_of(_through(gm, sq["x"]), gm)
    sub = op_of(_through(gm, sig["x"]), gm) if sig is not None and sig.kind == "sigmoid" else None
    if sub is None or sub.kind != "sub" or sub["alpha"] not in (1, 1.0):
        return
    lse = op_of(_through(gm, sub["a"]), gm)
    scores = softmax_input(gm, softmax)
    dims = lse["dim"] if lse is not None else None
    dims = dims[0] if isinstance(dims, (list, tuple)) and len(dims) == 1 else dims
    if lse is None or lse.kind != "logsumexp" or lse["keepdim"] or scores is None \
            or _through(gm, lse["x"]) is not _through(gm, scores[0]) or norm_dim(dims, rank_of(lse["x"])) != 3:
        return
    sink = sub["b"]
    if not isinstance(sink, Node) or leads_to_product(gm, sink) or (shape_of(sink) is not None and len(shape_of(sink)) > 3):
        return
    m.sink, m.sink_dropped, m.sink_lse = sink, True, True
    m.chain.extend([mul.node, sq.node, sig.node, sub.node, lse.node])
    m.end = mul.node


def _drops_sink(op: Op, node: Node) -> bool:
    """``probs[..., :-1]`` / ``aten.slice(probs, -1, 0, -1)``: the sink column dropped."""
    r = rank_of(op["x"])
    if r is None:
        return False
    if op.kind == "slice":
        return (norm_dim(op["dim"], r) == r - 1 and op["start"] in (None, 0) and op["step"] in (None, 1)
                and _is_minus_one(op["end"], shape_of(op["x"])))
    index = op["index"]
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return False
    last, lead = index[-1], index[:-1]
    if not (lead == (Ellipsis,) or (len(lead) == r - 1 and all(i == slice(None) for i in lead))):
        return False
    return last.start in (None, 0) and last.step in (None, 1) and _is_minus_one(last.stop, shape_of(op["x"]))


def _is_minus_one(end: object, shape: Optional[tuple]) -> bool:
    """An end index that drops exactly the last column."""
    return end == -1 or (shape is not None and isinstance(shape[-1], int) and end == shape[-1] - 1)
