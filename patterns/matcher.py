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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from .anchors import SDPA_KINDS
from .graphinfo import constant_number, dtype_of, is_neg_inf_like, layer_name, rank_of, shape_of, same_size
from .vocab import Op, is_assert, op_of, target_name

__all__ = ["Match", "Rejection", "Reject", "find_matches"]


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


_MATMULS = ("matmul", "bmm", "einsum", "baddbmm")
_SDPA_KINDS = SDPA_KINDS


_SHAPE_ONLY = {torch.ops.aten.full_like.default, torch.ops.aten.zeros_like.default,
               torch.ops.aten.empty_like.default, torch.ops.aten.ones_like.default}


def _users(node: Node) -> list[Node]:
    """Users that read the value (not asserts, not ``full_like`` that reads only the shape)."""
    return [u for u in node.users if not is_assert(u) and not (u.op == "call_function" and u.target in _SHAPE_ONLY)]


def _norm_dim(dim, rank: Optional[int]) -> Optional[int]:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return None
        dim = dim[0]
    if not isinstance(dim, int) or rank is None:
        return None
    return dim % rank


# --------------------------------------------------------------------------- operand peeling
def _is_batch_merge(gm: GraphModule, node: Node) -> Optional[Node]:
    """``view(expand(x))`` / ``view(x)`` that merges dims 0 and 1 of a 4-D ``x`` (matmul decomposition)."""
    op = op_of(node, gm)
    if op is None or op.kind != "view":
        return None
    src = op["x"]
    inner = op_of(src, gm)
    while inner is not None and inner.kind in ("expand", "identity"):
        if inner.kind == "expand" and shape_of(inner["x"]) != shape_of(src):
            break
        src = inner["x"]
        inner = op_of(src, gm)
    out_s, in_s = shape_of(node), shape_of(src)
    if out_s is None or in_s is None or len(in_s) != 4 or len(out_s) != 3:
        return None
    if same_size(out_s[0], in_s[0] * in_s[1]) and same_size(out_s[1], in_s[2]) and same_size(out_s[2], in_s[3]):
        return src
    return None


def _peel(gm: GraphModule, node: Node, scale: Optional[list[float]]) -> Node:
    """Strip casts, constant scale factors (into ``scale``; kept when it is None: a factor on v scales the
    output, not the scores) and matmul-decomposition reshapes off an operand."""
    while True:
        op = op_of(node, gm)
        if op is None:
            return node
        if op.kind in ("cast", "identity"):
            node = op["x"]
            continue
        if op.kind in ("mul", "div") and scale is not None:
            a, b = op["a"], op["b"]
            c = constant_number(b, gm)
            base = a
            if c is None and op.kind == "mul":
                c, base = constant_number(a, gm), b
            if c is not None and isinstance(base, Node) and op["rounding_mode"] is None:
                scale[0] *= (1.0 / c) if op.kind == "div" else c
                node = base
                continue
            return node
        if op.kind in ("mul", "div"):
            return node
        if op.kind == "expand" and shape_of(op["x"]) == shape_of(node):
            node = op["x"]
            continue
        merged = _is_batch_merge(gm, node)
        if merged is not None:
            node = merged
            continue
        return node


def _untranspose(gm: GraphModule, node: Node) -> Optional[Node]:
    """x for x.transpose(-2, -1) in any spelling; None when node is not such a transpose."""
    op = op_of(node, gm)
    if op is None:
        return None
    r = rank_of(op["x"])
    if op.kind == "transpose" and r is not None:
        dims = {op["dim0"] % r, op["dim1"] % r}
        return op["x"] if dims == {r - 2, r - 1} else None
    if op.kind == "permute" and r is not None:
        dims = [d % r for d in op["dims"]]
        want = list(range(r - 2)) + [r - 1, r - 2]
        return op["x"] if dims == want else None
    if op.kind == "mT":
        return op["x"]
    return None


def _fold_repeat_kv(gm: GraphModule, node: Node) -> tuple[Node, int]:
    """``repeat_kv``: reshape(expand(x[:, :, None], [B, Hkv, n, S, D]), [B, Hkv*n, S, D]) -> (x, n)."""
    op = op_of(node, gm)
    if op is not None and op.kind == "expand":  # MQA: x [B, 1, S, D].expand(B, H, S, D)
        xs, es = shape_of(op["x"]), shape_of(node)
        if xs is not None and es is not None and len(xs) == 4 and len(es) == 4 and xs[1] == 1 \
                and all(same_size(a, b) for i, (a, b) in enumerate(zip(xs, es)) if i != 1) and isinstance(es[1], int):
            return op["x"], es[1]
        return node, 1
    if op is None or op.kind != "view":
        return node, 1
    src = op["x"]
    inner = op_of(src, gm)
    while inner is not None and inner.kind == "identity":
        src = inner["x"]
        inner = op_of(src, gm)
    if inner is None or inner.kind != "expand":
        return node, 1
    exp_shape = shape_of(src)
    base = inner["x"]
    un = op_of(base, gm)
    if un is None or exp_shape is None or len(exp_shape) != 5:
        return node, 1
    if un.kind == "unsqueeze" and un["dim"] % 5 == 2:
        x = un["x"]
    elif un.kind == "getitem" and isinstance(un["index"], tuple) and len(un["index"]) >= 3 and un["index"][2] is None:
        x = un["x"]
    else:
        return node, 1
    xs = shape_of(x)
    if xs is None or len(xs) != 4 or not same_size(exp_shape[1], xs[1]):
        return node, 1
    n = exp_shape[2]
    return (x, n) if isinstance(n, int) else (node, 1)


def _is_parameter(gm: GraphModule, node: Node) -> bool:
    if node.op == "get_attr":
        try:
            return isinstance(gm.get_parameter(str(node.target)), torch.nn.Parameter)
        except AttributeError:
            return False
    return node.op == "placeholder" and "_parameters_" in node.name


def _operand(gm: GraphModule, node: Node, scale: Optional[list[float]], *, is_key: bool = False) -> Operand:
    node = _peel(gm, node, scale)
    if is_key:
        base = _untranspose(gm, node)
        if base is None and _is_parameter(gm, node):
            raise Reject(f"the right operand of the score matmul ({node.name}) is a parameter, not keys")
        if base is None:
            # keys held transposed ([.., D, Sk], e.g. SqueezeBERT's conv layout viewed to heads): the
            # matmul makes its last dim the key axis, so it is kᵀ whatever produced it
            if rank_of(node) not in (3, 4):
                raise Reject(f"the right operand of the score matmul ({node.name}) is not a 3-D or 4-D kᵀ")
            return Operand(node, 1, transpose=True)
        node = _peel(gm, base, scale)
    folded, group = _fold_repeat_kv(gm, node)
    return Operand(folded, group)


# --------------------------------------------------------------------------- einsum
def _parse_einsum(eq: str) -> tuple[list[str], str]:
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        raise Reject(f"einsum '{eq}' has no explicit output or uses ellipsis")
    lhs, out = eq.split("->")
    return lhs.split(","), out


def _to_order(have: str, want: str) -> Optional[tuple[int, ...]]:
    """The permutation taking an operand indexed ``have`` to ``want`` (None when already in order)."""
    perm = tuple(have.index(c) for c in want)
    return None if perm == tuple(range(len(want))) else perm


def _einsum_qk(op: Op) -> tuple[Node, Optional[tuple[int, ...]], Node, Optional[tuple[int, ...]], bool]:
    """(q, q's permutation, k, k's permutation, k held transposed) for ``q·kᵀ`` written as an einsum in
    any index order whose output ends with the query and key indices (``bind,bjnd->bnij``)."""
    ins, out = _parse_einsum(op["equation"])
    a, b = op["operands"]
    if len(ins) != 2 or len(out) < 3:
        raise Reject(f"einsum '{op['equation']}' is not a batched product of two operands")
    batch, i, j = out[:-2], out[-2], out[-1]
    contracted = [c for c in ins[0] if c not in out]
    if len(contracted) != 1:
        raise Reject(f"einsum '{op['equation']}' does not contract exactly one index")
    d = contracted[0]
    if ins[0] == batch + i + d and ins[1] == batch + j + d:
        return a, None, b, None, False
    if ins[0] == batch + i + d and ins[1] == batch + d + j:
        return a, None, b, None, True
    if len(out) == 4 and sorted(ins[0]) == sorted(batch + i + d) and sorted(ins[1]) == sorted(batch + j + d):
        return a, _to_order(ins[0], batch + i + d), b, _to_order(ins[1], batch + j + d), False
    raise Reject(f"einsum '{op['equation']}' is not q·kᵀ over the last index")


def _einsum_pv(op: Op, probs: Node) -> tuple[Node, Optional[tuple[int, ...]], Optional[tuple[int, ...]]]:
    """(v, v's permutation to [batch, keys, Dv], the output's permutation from [batch, queries, Dv])."""
    ins, out = _parse_einsum(op["equation"])
    p, v = op["operands"]
    if p is not probs:
        raise Reject("the attention probabilities are the right operand of the value einsum")
    batch, i, j = ins[0][:-2], ins[0][-2], ins[0][-1]
    e = [c for c in ins[1] if c not in ins[0]]
    if len(e) != 1 or j in out or sorted(ins[1]) != sorted(batch + j + e[0]) or \
            sorted(out) != sorted(batch + i + e[0]):
        raise Reject(f"einsum '{op['equation']}' is not probabilities·v")
    e = e[0]
    if ins[1] == batch + j + e and out == batch + i + e:
        return v, None, None
    if len(out) != 4:
        raise Reject(f"einsum '{op['equation']}' is probabilities·v in a layout lcpass reads only with 4-D operands")
    return v, _to_order(ins[1], batch + j + e), _to_order(batch + i + e, out)


# --------------------------------------------------------------------------- scores walk
def _leads_to_product(gm: GraphModule, node, depth: int = 12) -> bool:
    """Does this operand of an add lead back to a q·kᵀ product through score-chain ops?"""
    return _product_of(gm, node, depth) is not None


def _tensor_factor(gm: GraphModule, op: Op, node: Node) -> tuple[Node, Node]:
    """(scores, factor) for scores multiplied (or divided) by a tensor that is constant along the keys
    and does not depend on the scores: a learned logit scale ``[H, 1, 1]``, a cosine-attention scale."""
    a, b = op["a"], op["b"]
    if op.kind == "mul" and not _leads_to_product(gm, a) and _leads_to_product(gm, b):
        a, b = b, a
    if not isinstance(b, Node) or not _leads_to_product(gm, a) or _leads_to_product(gm, b):
        raise Reject(f"the scores are multiplied by a non-constant ({node.name}); not a recognised scale")
    fs, ss = shape_of(b), shape_of(node)
    if fs is None or ss is None or len(fs) > len(ss) or (fs and fs[-1] != 1):
        raise Reject(f"the scores are multiplied by a tensor of shape {fs} ({node.name}) that varies along the "
                     "keys; only factors constant along the keys (per head or per query) fold into q")
    if op.kind == "div":
        raise Reject(f"the scores are divided by a tensor ({node.name}); not a recognised scale")
    return a, b


_MAX_CALLS = (torch.max, torch.amax, torch.ops.aten.max.dim, torch.ops.aten.amax.default)


def _row_max_of(gm: GraphModule, node: object, scores: Node) -> bool:
    """``scores.max(-1, keepdim=True)[0]`` / ``amax(scores, -1, keepdim=True)`` (possibly detached or
    cast): each row's own maximum, whose subtraction the softmax does not see."""
    for _ in range(6):
        if not isinstance(node, Node):
            return False
        op = op_of(node, gm)
        if op is not None and (op.kind in ("cast", "identity") or (op.kind == "getitem" and op["index"] == 0)):
            node = op["x"]
            continue
        if node.op == "call_function" and node.target is getattr and node.args[1:] == ("values",):
            node = node.args[0]
            continue
        break
    if not isinstance(node, Node):
        return False
    if not ((node.op == "call_function" and node.target in _MAX_CALLS)
            or (node.op == "call_method" and node.target in ("max", "amax"))):
        return False
    args = list(node.args)
    dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
    r = rank_of(scores)
    return bool(args) and args[0] is scores and r is not None and _norm_dim(dim, r) == r - 1 and bool(keepdim)


_FOLLOW_X = ("cast", "identity", "view", "tanh", "masked_fill")


def _product_of(gm: GraphModule, node: object, depth: int = 12) -> Optional[Node]:
    """The q·kᵀ product an operand of the scores leads back to through score-chain ops (the first one
    found), or None. The one list of ops a score chain may pass; :func:`_walk_scores` reads each."""
    while isinstance(node, Node) and depth > 0:
        op = op_of(node, gm)
        if op is None:
            return None
        if op.kind in _MATMULS:
            return node
        if op.kind in ("add", "where", "maximum"):
            return _product_of(gm, op["a"], depth - 1) or _product_of(gm, op["b"], depth - 1)
        if op.kind in ("mul", "div"):  # follow the tensor side of a scaling
            node = op["b"] if op.kind == "mul" and constant_number(op["a"], gm) is not None else op["a"]
        elif op.kind == "sub":
            node = op["a"]
        elif op.kind == "cat" and isinstance(op["tensors"], (list, tuple)) and op["tensors"]:
            node = op["tensors"][0]  # scores with a sink column after them
        elif op.kind in _FOLLOW_X:
            node = op["x"]
        else:
            return None
        depth -= 1
    return None


def _key_of(gm: GraphModule, product: Node) -> object:
    op = op_of(product, gm)
    return op["operands"][1] if op.kind == "einsum" else op["b"]


def _inputs_of(node: object) -> set[Node]:
    """The forward inputs (placeholders that are not lifted parameters or buffers) ``node`` depends on."""
    seen: set[Node] = set()
    stack = [node] if isinstance(node, Node) else []
    found: set[Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and "_parameters_" not in n.name and "_buffers_" not in n.name:
            found.add(n)
        stack.extend(n.all_input_nodes)
    return found


def _content_term(gm: GraphModule, m: Match, node: Node, a: Node, b: Node) -> tuple[Node, Node]:
    """(scores, bias) when both operands of an add are products with q: the content term is the one whose
    keys come from the same inputs as the values (XLNet's ``ac + bd``, DeBERTa's content + position
    terms, Funnel's); the other (keys from position embeddings) is an additive bias, kept exactly."""
    why = f"both operands of {node.name} lead to a matmul: cannot tell the scores from the bias"
    probe = Match(anchor=m.anchor, end=m.anchor, q=None, k=None, v=None, scale=1.0)  # type: ignore[arg-type]
    try:
        _walk_values(gm, probe, m.anchor)
    except Reject:
        raise Reject(why) from None
    values = _inputs_of(probe.v.node)
    pa, pb = _product_of(gm, a), _product_of(gm, b)
    if not values or pa is None or pb is None:
        raise Reject(why)
    ka, kb = _inputs_of(_key_of(gm, pa)) & values, _inputs_of(_key_of(gm, pb)) & values
    if ka and not kb:
        return a, b
    if kb and not ka:
        return b, a
    raise Reject(why + " (both keys, or neither, come from the values' inputs)")


def _walk_scores(gm: GraphModule, m: Match, x: Node) -> Node:
    """From the softmax input back to the q·kᵀ product; fills scale/softcap/bias/keep on ``m``."""
    outer: list[tuple[str, object]] = []  # terms seen from the softmax inward
    node = x
    reshaped = False
    views: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # reshapes passed, outermost first

    def note(term: object) -> None:
        if views and isinstance(term, Node):
            m.term_views[term] = list(reversed(views))

    while True:
        op = op_of(node, gm)
        if op is None:
            raise Reject(f"the softmax input comes from {target_name(node) if isinstance(node, Node) else node!r}, "
                         "which is not a matmul of q and kᵀ")
        m.chain.append(node)
        kind = op.kind
        if kind in ("cast", "identity"):
            node = op["x"]
        elif kind == "view":
            reshaped = True
            pre, post = shape_of(op["x"]), shape_of(node)
            if pre is not None and post is not None and all(isinstance(d, int) for d in (*pre, *post)):
                views.append((tuple(pre), tuple(post)))
            else:
                views.append(((), ()))  # unknown: terms behind it are refused below
            node = op["x"]
        elif kind in ("mul", "div"):
            c = constant_number(op["b"], gm)
            base = op["a"]
            if c is None and kind == "mul":
                c, base = constant_number(op["a"], gm), op["b"]
            if op["rounding_mode"] is not None:
                raise Reject(f"the scores are divided with rounding ({node.name}); not a recognised scale")
            if c is None:
                scores, factor = _tensor_factor(gm, op, node)
                outer.append(("tscale", (factor, len(views))))
                node = scores
                continue
            tanh = op_of(base, gm)
            if kind == "mul" and tanh is not None and tanh.kind == "tanh":
                inner = op_of(tanh["x"], gm)
                ic = None
                if inner is not None and inner.kind == "div":
                    ic = constant_number(inner["b"], gm)
                elif inner is not None and inner.kind == "mul" and constant_number(inner["b"], gm):
                    ic = 1.0 / constant_number(inner["b"], gm)
                if ic is None or not math.isclose(ic, c, rel_tol=1e-6):
                    raise Reject(f"tanh on the scores ({tanh.node.name}) is not a softcap cap·tanh(s/cap)")
                outer.append(("softcap", c))
                m.chain.extend([tanh.node, inner.node])
                node = inner["a"]
                continue
            outer.append(("scale", (1.0 / c) if kind == "div" else c))
            node = base
        elif kind == "add":
            if op["alpha"] not in (1, 1.0):
                raise Reject(f"add with alpha={op['alpha']} on the scores")
            a, b = op["a"], op["b"]
            in_a, in_b = _leads_to_product(gm, a), _leads_to_product(gm, b)
            if not in_a and not in_b:
                raise Reject(f"the operands of {node.name} are not a matmul of q and kᵀ: "
                             "the softmax input is not attention scores")
            if in_a and in_b:
                scores, bias = _content_term(gm, m, node, a, b)
            else:
                scores, bias = (a, b) if in_a else (b, a)
            if reshaped and (not isinstance(bias, Node) or any(not p for p, _ in views)):
                raise Reject(f"a bias is added before a reshape of the scores ({node.name}) of unknown shape")
            if not isinstance(bias, Node):
                c = constant_number(bias, gm)
                if c is None:
                    raise Reject(f"unsupported bias {bias!r}")
                node = scores  # adding a constant changes nothing after softmax
                continue
            note(bias)
            outer.append(("bias", bias))
            node = scores
        elif kind == "where":
            cond, a, b = op["cond"], op["a"], op["b"]
            if _leads_to_product(gm, a) or (is_neg_inf_like(constant_number(b, gm)) and not _leads_to_product(gm, b)):
                scores, fill, negate = a, b, False
            else:
                scores, fill, negate = b, a, True
            if not is_neg_inf_like(constant_number(fill, gm)):
                raise Reject(f"where() on the scores ({node.name}) fills with {fill!r}, not -inf")
            if reshaped and any(not p for p, _ in views):
                raise Reject(f"a mask is applied before a reshape of the scores ({node.name}) of unknown shape")
            note(cond)
            outer.append(("keep", (cond, negate)))
            node = scores
        elif kind == "masked_fill":
            if not is_neg_inf_like(constant_number(op["value"], gm)):
                raise Reject(f"masked_fill on the scores ({node.name}) fills with {op['value']!r}, not -inf")
            if reshaped and any(not p for p, _ in views):
                raise Reject(f"a mask is applied before a reshape of the scores ({node.name}) of unknown shape")
            note(op["cond"])
            outer.append(("keep", (op["cond"], True)))
            node = op["x"]
        elif kind == "maximum":
            # a clamp of the scores from below at (about) the dtype's minimum: masked scores stay masked
            a, b = op["a"], op["b"]
            scores, floor = (a, b) if _leads_to_product(gm, a) else (b, a)
            if not is_neg_inf_like(constant_number(floor, gm)):
                raise Reject(f"the scores are clamped from below at {floor!r} ({node.name}), not at -inf / the "
                             "dtype's minimum")
            node = scores
        elif kind == "sub":
            if op["alpha"] not in (1, 1.0):
                raise Reject(f"sub with alpha={op['alpha']} on the scores")
            a, b = op["a"], op["b"]
            if not _leads_to_product(gm, a):
                raise Reject(f"the scores are subtracted from something ({node.name}): softmax of -scores")
            if constant_number(b, gm) is not None or _row_max_of(gm, b, a):
                node = a  # a constant shift, or each row's own maximum: softmax-invariant
                continue
            if _leads_to_product(gm, b):
                raise Reject(f"both operands of {node.name} lead to a matmul: cannot tell the scores from the bias")
            if reshaped and any(not p for p, _ in views):
                raise Reject(f"a bias is subtracted before a reshape of the scores ({node.name}) of unknown shape")
            note(b)
            outer.append(("bias", (b, -1.0)))  # scores - c * mask: an additive bias with coefficient -1
            node = a
        elif kind == "cat":
            node = _sink_column(gm, m, op, node, bool(outer or views))
        elif kind in _MATMULS:
            m.scores_rank = rank_of(x) or 4
            inner: list[tuple[str, object]] = []
            if kind == "baddbmm":  # beta * bias + alpha * (a @ b)
                alpha, beta = constant_number(op["alpha"]), constant_number(op["beta"])
                if beta not in (0.0, 1.0) or alpha is None:
                    raise Reject(f"baddbmm with beta={op['beta']}, alpha={op['alpha']}")
                inner = [("scale", alpha)]
                if beta == 1.0 and constant_number(op["x"], gm) != 0.0:  # beta=0 or a zero input: no bias
                    inner.append(("bias", op["x"]))
                    note(op["x"])
                if views and any(not p for p, _ in views):
                    raise Reject("baddbmm's bias reaches the softmax through a reshape of unknown shape")
            _apply_terms(m, inner + list(reversed(outer)), len(views))
            return node
        else:
            raise Reject(f"the softmax input passes through {target_name(node)}, which is not a scale, "
                         "softcap, mask or bias of q·kᵀ")


def _sink_column(gm: GraphModule, m: Match, op: Op, node: Node, outside: bool) -> Node:
    """``cat([scores, sink], -1)``: one extra logit per row after the masked scores (gpt-oss's learned
    sinks). Returns the scores; records the sink column on ``m``."""
    parts, r = op["tensors"], rank_of(node)
    if isinstance(parts, (list, tuple)) and sum(_leads_to_product(gm, p) for p in parts) >= 2 \
            and _norm_dim(op["dim"], r) == (r or 0) - 1:
        raise Reject(f"{BLOCK_SPARSE}: the scores concatenate several q·kᵀ blocks on the key axis ({node.name})")
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or _norm_dim(op["dim"], r) != (r or 0) - 1:
        raise Reject(f"the scores are concatenated with something ({node.name}) other than one column of "
                     "logits on the key axis")
    scores, sink = parts
    col = shape_of(sink)
    if not _leads_to_product(gm, scores) or _leads_to_product(gm, sink) or col is None or col[-1] != 1:
        raise Reject(f"{node.name} concatenates the scores with {getattr(sink, 'name', sink)!r}, which is not "
                     "one column of sink logits independent of the scores")
    if m.sink is not None or outside:
        raise Reject(f"the sink column ({node.name}) is scaled, masked or reshaped with the scores after it "
                     "joins them; only a shift (the row maximum) may follow")
    if r not in (3, 4):
        raise Reject(f"a sink column on rank-{r} scores ({node.name}); lcpass reads sinks on [B, H, Sq, Sk] "
                     "or [B*H, Sq, Sk] scores")
    m.sink = sink
    return scores


def _through(gm: GraphModule, node: object, kinds=("cast", "identity")) -> object:
    while isinstance(node, Node) and op_of(node, gm) is not None and op_of(node, gm).kind in kinds:
        node = op_of(node, gm)["x"]
    return node


def _lse_sink(gm: GraphModule, m: Match, softmax: Node) -> None:
    """``out * sigmoid(logsumexp(s, -1) - sink)[..., None]`` right after ``P @ v`` (Granite-SWA): the same
    learned sink as a concatenated logit column, applied from the row's log-sum-exp. The product becomes
    the site's end; ``s`` must be the very scores the softmax reads."""
    users = _users(m.end)
    if m.sink is not None or len(users) != 1 or m.scores_rank != 4:
        return
    mul = op_of(users[0], gm)
    if mul is None or mul.kind != "mul":
        return
    factor = mul["b"] if _through(gm, mul["a"]) is m.end else mul["a"] if _through(gm, mul["b"]) is m.end else None
    sq = op_of(_through(gm, factor), gm)
    if sq is None or sq.kind != "unsqueeze" or _norm_dim(sq["dim"], rank_of(sq.node)) != 3:
        return
    sig = op_of(_through(gm, sq["x"]), gm)
    sub = op_of(_through(gm, sig["x"]), gm) if sig is not None and sig.kind == "sigmoid" else None
    if sub is None or sub.kind != "sub" or sub["alpha"] not in (1, 1.0):
        return
    lse = op_of(_through(gm, sub["a"]), gm)
    scores = _softmax_input(gm, softmax)
    dims = lse["dim"] if lse is not None else None
    dims = dims[0] if isinstance(dims, (list, tuple)) and len(dims) == 1 else dims
    if lse is None or lse.kind != "logsumexp" or lse["keepdim"] or scores is None \
            or _through(gm, lse["x"]) is not _through(gm, scores[0]) or _norm_dim(dims, rank_of(lse["x"])) != 3:
        return
    sink = sub["b"]
    if not isinstance(sink, Node) or _leads_to_product(gm, sink) or (shape_of(sink) is not None and len(shape_of(sink)) > 3):
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
        return (_norm_dim(op["dim"], r) == r - 1 and op["start"] in (None, 0) and op["step"] in (None, 1)
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


def _apply_terms(m: Match, inner_to_outer: list[tuple[str, object]], n_views: int) -> None:
    """Replay the score terms from the product outward into scale -> softcap -> bias/keep. ``n_views``:
    the reshapes of the scores between the product and the softmax (a tensor factor must sit inside all)."""
    seen_mask = False
    for kind, value in inner_to_outer:
        if kind == "scale":
            if m.keep and value <= 0:
                raise Reject(f"the masked scores are multiplied by {value} <= 0")
            if m.softcap:
                if seen_mask:
                    raise Reject("the scores are scaled after a softcap and a mask")
                if value <= 0:
                    raise Reject(f"the softcapped scores are multiplied by {value} <= 0")
                # c * cap * tanh(s / cap) is cap' * tanh(s' / cap') with cap' = c * cap, s' = c * s
                m.softcap *= value
            m.bias = [(b, coef * value) for b, coef in m.bias]  # a later scale scales the bias too
            m.scale *= value
        elif kind == "tscale":
            factor, depth = value
            if seen_mask or m.softcap:
                raise Reject(f"the scores are multiplied by a tensor ({factor.name}) after a mask, bias or softcap")
            if depth != n_views:
                raise Reject(f"the scores are multiplied by a tensor ({factor.name}) across a reshape of the scores")
            m.q_scales.append(factor)
        elif kind == "softcap":
            if seen_mask:
                raise Reject("a mask or bias is applied before the softcap")
            if m.softcap:
                raise Reject("two softcaps on the same scores")
            m.softcap = float(value)
        elif kind == "bias":
            seen_mask = True
            m.bias.append(value if isinstance(value, tuple) else (value, 1.0))
        elif kind == "keep":
            seen_mask = True
            m.keep.append(value)


# --------------------------------------------------------------------------- anchors
def _softmax_input(gm: GraphModule, node: Node) -> Optional[tuple[Node, object]]:
    """(input, dim) when node is a softmax in any spelling, including the decomposed one."""
    op = op_of(node, gm)
    if op is None:
        return None
    if op.kind == "softmax":
        return op["x"], op["dim"]
    if op.kind == "div":
        num, den = op_of(op["a"], gm), op_of(op["b"], gm)
        if num is None or den is None or num.kind != "exp" or den.kind != "sum" or den["x"] is not op["a"]:
            return None
        sub = op_of(num["x"], gm)
        if sub is None or sub.kind != "sub":
            return None
        mx = op_of(sub["b"], gm)
        if mx is None or mx.kind != "amax" or mx["x"] is not sub["a"]:
            return None
        return sub["a"], den["dim"]
    return None


def _match_softmax(gm: GraphModule, node: Node, x: Node, dim) -> Match:
    r = rank_of(x)
    d = _norm_dim(dim, r)
    if r is None:
        raise Reject("the softmax input has no known shape")
    if d != r - 1:
        raise Reject(f"softmax over dim {dim} of a rank-{r} tensor, not the key axis (last dim)")
    m = Match(anchor=node, end=node, q=None, k=None, v=None, scale=1.0, source="eager-softmax")  # type: ignore[arg-type]
    try:
        product = _walk_scores(gm, m, x)
    except Reject:
        via = _rearranged_product(gm, x) if isinstance(x, Node) else None
        if via is not None:
            raise Reject(BANDED.format(via=via)) from None
        raise
    pop = op_of(product, gm)
    scale = [1.0]
    if pop.kind == "einsum":
        qn, qp, kn, kp, kt = _einsum_qk(pop)
        m.q = _operand(gm, qn, scale) if qp is None else Operand(_peel(gm, qn, scale), perm=qp)
        m.k = _operand(gm, kn, scale) if kp is None else Operand(_peel(gm, kn, scale), perm=kp)
        m.k.transpose = kt
        m.source = "einsum"
    else:
        a, b = pop["a"], pop["b"]
        if pop.kind in ("baddbmm", "bmm"):
            m.source = pop.kind
        m.q = _operand(gm, a, scale)
        m.k = _operand(gm, b, scale, is_key=True)
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
    _walk_values(gm, m, node)
    return m


def _walk_values(gm: GraphModule, m: Match, node: Node) -> None:
    """From the softmax forward to ``@ v``; fills v, end, dropout and the output layout on ``m``."""
    cur = node
    while True:
        users = _users(cur)
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
            m.v = _operand(gm, op["b"], None)
            m.end = u
            _lse_sink(gm, m, node)
            break
        elif op.kind == "einsum":
            vn, vp, m.out_perm = _einsum_pv(op, cur)
            m.v = _operand(gm, vn, None) if vp is None else Operand(_peel(gm, vn, None), perm=vp)
            m.end = u
            break
        else:
            raise Reject(f"no value matmul follows: the probabilities flow into {target_name(u)}")


def _predicate(gm: GraphModule, node: Node) -> tuple[Node, bool]:
    """A boolean tensor as (base, same): True where ``base`` is truthy when ``same``, where it is falsy
    otherwise — through views, broadcasts, casts, negations and comparisons with 0 / False."""
    same = True
    while isinstance(node, Node):
        op = op_of(node, gm)
        if op is None:
            break
        if op.kind in ("view", "expand", "unsqueeze", "cast", "identity"):
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
    for keep, negate in m.keep:  # negate: the scores are hidden where keep is truthy
        kb, ks = _predicate(gm, keep)
        hides_truthy = ks == negate
        if kb is base and hides_truthy == zeroes_truthy:
            return
    raise Reject(f"the probabilities are zeroed after the softmax ({node.name}) where the scores' mask does "
                 "not hide them (or by a condition lcpass cannot relate to that mask); the rewrite would "
                 "attend those keys")


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
    m.k = Operand(*_fold_repeat_kv(gm, k))
    m.v = Operand(*_fold_repeat_kv(gm, v))
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


BLOCK_SPARSE = ("already sparse (block-sparse attention, as BigBird computes it: softmaxes over gathered key blocks); "
                "lcpass leaves it as the model computes it")
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
        if op is not None and op.kind in _MATMULS and through is not None:
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
                sm = _softmax_input(gm, node)
                if sm is None:
                    continue
                m = _match_softmax(gm, node, *sm)
            _check_operands(m)
            m.site = layer_name(node)
            matches.append(m)
        except Reject as why:
            rejected.append(Rejection(node.name, layer_name(node), str(why)))
    return matches, _block_sparse_sites(rejected)


def operand_shape(o: Operand) -> Optional[tuple]:
    """An operand's shape in the canonical layout (its einsum permutation and kᵀ undone)."""
    s = shape_of(o.node)
    if s is None:
        return None
    if o.perm is not None:
        s = tuple(s[p] for p in o.perm)
    return (*s[:-2], s[-1], s[-2]) if o.transpose else s


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
