"""The scores walk: from the softmax input back to the ``q @ kᵀ`` product.

Through casts, reshapes, constant scales, tensor factors constant along the keys (folded into q), softcap,
additive and subtracted biases, ``where`` / ``masked_fill`` masks, clamps at the dtype's minimum, a row's
own maximum subtracted, a learned sink column concatenated after the scores and ``baddbmm``. The terms are
replayed from the product outward into the scale, softcap, bias and keep of a :class:`Match`.
"""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from .graphinfo import constant_number, is_neg_inf_like, rank_of, shape_of
from .operands import MATMULS, leads_to_product, norm_dim, product_of
from .records import Match, Reject
from .values import walk_values
from .vocab import Op, op_of, target_name

__all__ = ["BLOCK_SPARSE", "walk_scores"]

BLOCK_SPARSE = ("already sparse (block-sparse attention, as BigBird computes it: softmaxes over gathered key blocks); "
                "lcpass leaves it as the model computes it")


def _tensor_factor(gm: GraphModule, op: Op, node: Node) -> tuple[Node, Node]:
    """(scores, factor) for scores multiplied (or divided) by a tensor that is constant along the keys
    and does not depend on the scores: a learned logit scale ``[H, 1, 1]``, a cosine-attention scale."""
    a, b = op["a"], op["b"]
    if op.kind == "mul" and not leads_to_product(gm, a) and leads_to_product(gm, b):
        a, b = b, a
    if not isinstance(b, Node) or not leads_to_product(gm, a) or leads_to_product(gm, b):
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
    return bool(args) and args[0] is scores and r is not None and norm_dim(dim, r) == r - 1 and bool(keepdim)


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
        walk_values(gm, probe, m.anchor)
    except Reject:
        raise Reject(why) from None
    values = _inputs_of(probe.v.node)
    pa, pb = product_of(gm, a), product_of(gm, b)
    if not values or pa is None or pb is None:
        raise Reject(why)
    ka, kb = _inputs_of(_key_of(gm, pa)) & values, _inputs_of(_key_of(gm, pb)) & values
    if ka and not kb:
        return a, b
    if kb and not ka:
        return b, a
    raise Reject(why + " (both keys, or neither, come from the values' inputs)")


def walk_scores(gm: GraphModule, m: Match, x: Node) -> Node:
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
            in_a, in_b = leads_to_product(gm, a), leads_to_product(gm, b)
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
            if leads_to_product(gm, a) or (is_neg_inf_like(constant_number(b, gm)) and not leads_to_product(gm, b)):
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
            scores, floor = (a, b) if leads_to_product(gm, a) else (b, a)
            if not is_neg_inf_like(constant_number(floor, gm)):
                raise Reject(f"the scores are clamped from below at {floor!r} ({node.name}), not at -inf / the "
                             "dtype's minimum")
            node = scores
        elif kind == "sub":
            if op["alpha"] not in (1, 1.0):
                raise Reject(f"sub with alpha={op['alpha']} on the scores")
            a, b = op["a"], op["b"]
            if not leads_to_product(gm, a):
                raise Reject(f"the scores are subtracted from something ({node.name}): softmax of -scores")
            if constant_number(b, gm) is not None or _row_max_of(gm, b, a):
                node = a  # a constant shift, or each row's own maximum: softmax-invariant
                continue
            if leads_to_product(gm, b):
                raise Reject(f"both operands of {node.name} lead to a matmul: cannot tell the scores from the bias")
            if reshaped and any(not p for p, _ in views):
                raise Reject(f"a bias is subtracted before a reshape of the scores ({node.name}) of unknown shape")
            note(b)
            outer.append(("bias", (b, -1.0)))  # scores - c * mask: an additive bias with coefficient -1
            node = a
        elif kind == "cat":
            node = _sink_column(gm, m, op, node, bool(outer or views))
        elif kind in MATMULS:
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
    if isinstance(parts, (list, tuple)) and sum(leads_to_product(gm, p) for p in parts) >= 2 \
            and norm_dim(op["dim"], r) == (r or 0) - 1:
        raise Reject(f"{BLOCK_SPARSE}: the scores concatenate several q·kᵀ blocks on the key axis ({node.name})")
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or norm_dim(op["dim"], r) != (r or 0) - 1:
        raise Reject(f"the scores are concatenated with something ({node.name}) other than one column of "
                     "logits on the key axis")
    scores, sink = parts
    col = shape_of(sink)
    if not leads_to_product(gm, scores) or leads_to_product(gm, sink) or col is None or col[-1] != 1:
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
