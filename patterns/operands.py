"""Operand helpers the matcher's walks share.

Reading q, k and v off the products they feed: the users that read a value, dim normalisation, peeling
casts, constant scale factors and matmul-decomposition batch merges off an operand, undoing kᵀ, folding
``repeat_kv`` into a kv-head group, and the einsum spellings of ``q·kᵀ`` and ``probabilities·v``. Also the
two questions both walks ask: which q·kᵀ product a score-chain operand leads back to, and whether a node
is a softmax (in any spelling) and of what.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from .graphinfo import constant_number, rank_of, shape_of, same_size
from .records import Operand, Reject
from .vocab import Op, is_assert, op_of

__all__ = ["MATMULS", "einsum_pv", "einsum_qk", "fold_repeat_kv", "leads_to_product", "norm_dim", "operand",
           "peel", "product_of", "softmax_input", "users_of"]

MATMULS = ("matmul", "bmm", "einsum", "baddbmm")

# users that read only a tensor's shape, dtype and device (aten in exported graphs, torch / Tensor methods in
# dynamo's): a fresh tensor "like" the probabilities is not a use of their values
_SHAPE_ONLY = {torch.ops.aten.full_like.default, torch.ops.aten.zeros_like.default,
               torch.ops.aten.empty_like.default, torch.ops.aten.ones_like.default,
               torch.full_like, torch.zeros_like, torch.empty_like, torch.ones_like}
_SHAPE_ONLY_METHODS = {"size", "dim", "new_zeros", "new_ones", "new_empty", "new_full"}


def _shape_only(user: Node, node: Node) -> bool:
    if user.op == "call_function":
        return user.target in _SHAPE_ONLY and bool(user.args) and user.args[0] is node
    return user.op == "call_method" and user.target in _SHAPE_ONLY_METHODS and user.args[0] is node


def users_of(node: Node) -> list[Node]:
    """Users that read the value (not asserts, not ``full_like`` that reads only the shape)."""
    return [u for u in node.users if not is_assert(u) and not _shape_only(u, node)]


def norm_dim(dim, rank: Optional[int]) -> Optional[int]:
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


def peel(gm: GraphModule, node: Node, scale: Optional[list[float]]) -> Node:
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


def fold_repeat_kv(gm: GraphModule, node: Node) -> tuple[Node, int]:
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


def operand(gm: GraphModule, node: Node, scale: Optional[list[float]], *, is_key: bool = False) -> Operand:
    node = peel(gm, node, scale)
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
        node = peel(gm, base, scale)
    folded, group = fold_repeat_kv(gm, node)
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


def einsum_qk(op: Op) -> tuple[Node, Optional[tuple[int, ...]], Node, Optional[tuple[int, ...]], bool]:
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


def einsum_pv(op: Op, probs: Node) -> tuple[Node, Optional[tuple[int, ...]], Optional[tuple[int, ...]]]:
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


# --------------------------------------------------------------------------- score chain
_FOLLOW_X = ("cast", "identity", "view", "tanh", "masked_fill")


def product_of(gm: GraphModule, node: object, depth: int = 12) -> Optional[Node]:
    """The q·kᵀ product an operand of the scores leads back to through score-chain ops (the first one
    found), or None. The one list of ops a score chain may pass; :func:`.scores.walk_scores` reads each."""
    while isinstance(node, Node) and depth > 0:
        op = op_of(node, gm)
        if op is None:
            return None
        if op.kind in MATMULS:
            return node
        if op.kind in ("add", "where", "maximum"):
            return product_of(gm, op["a"], depth - 1) or product_of(gm, op["b"], depth - 1)
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


def leads_to_product(gm: GraphModule, node, depth: int = 12) -> bool:
    """Does this operand of an add lead back to a q·kᵀ product through score-chain ops?"""
    return product_of(gm, node, depth) is not None


# --------------------------------------------------------------------------- anchors
def softmax_input(gm: GraphModule, node: Node) -> Optional[tuple[Node, object]]:
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
