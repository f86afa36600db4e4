"""Replace each matched attention subgraph by one ``torch.ops.lcpass.attention`` node."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import TensorMetadata

from .graphinfo import dtype_of, eliminate_dead_code, rank_of, shape_of, value_of
from .maskinfo import MaskInfo
from .op import CANONICAL_OP
from .records import Match, Operand
from .vocab import is_assert

aten = torch.ops.aten

__all__ = ["Site", "rewrite_matches"]


@dataclass(frozen=True)
class Site:
    """One canonical attention site, as later stages and reports see it."""

    name: str  # layer name (from nn_module_stack), unique within the graph
    source: str  # the source form: sdpa, eager-softmax, bmm, baddbmm, einsum ...
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mask: str  # none | causal | sliding(W) | chunked(C) | padding[...] | bias[...] | custom
    is_causal: bool
    window: int
    scale: float
    softcap: float
    dropout_p: float
    node: str  # the canonical node's name in the rewritten graph
    anchor: str = ""  # "sdpa" | "softmax": the call the site was found from
    anchor_index: int = -1  # its position among the site module's calls of that kind (patterns.anchors)
    sinks: bool = False  # learned per-head sink logits join the softmax (the canonical op's ``sinks``)
    chunk: int = -1  # chunked attention: a query sees only keys of its own chunk of ``chunk`` positions

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _to_meta(v: Any) -> Any:
    """ShapeProp's TensorMetadata -> a meta tensor of that shape and dtype."""
    if isinstance(v, TensorMetadata):
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    return v


def _attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _meta(v: Any) -> Any:
    """A meta tensor of a value's shape, dtype and strides (fake, real or TensorMetadata)."""
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
    return _to_meta(v)


def _fake(target, args: tuple) -> Any:
    """The new node's value on fake (or meta) tensors, so later stages can read its shape."""
    vals = map_arg(args, value_of)
    leaves = torch.utils._pytree.tree_leaves(vals)
    mode = torch._guards.detect_fake_mode([v for v in leaves if isinstance(v, torch.Tensor)])
    if mode is not None:
        try:
            with mode:
                return target(*vals)
        except Exception:  # noqa: BLE001 - e.g. a real parameter next to fake activations: try meta
            pass
    try:
        return target(*map_arg(args, lambda n: _meta(value_of(n))))
    except Exception:  # meta is a convenience for later stages; never fail a rewrite on it
        return None


def _call(gm: GraphModule, target, args: tuple, like: Node) -> Node:
    for a in torch.utils._pytree.tree_leaves(args):
        if isinstance(a, Node) and a.op == "get_attr" and value_of(a) is None:
            try:  # a module attribute (a learned scale) has no recorded value: give it its meta
                a.meta["val"] = _meta(_attr(gm, str(a.target)))
            except AttributeError:
                pass
    node = gm.graph.call_function(target, args)
    val = _fake(target, args)
    if val is not None:
        node.meta["val"] = val
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _as4d(gm: GraphModule, op: Operand, like: Node) -> Node:
    node = op.node
    if op.perm is not None:
        node = _call(gm, aten.permute.default, (node, list(op.perm)), like)
    if op.transpose:
        node = _call(gm, aten.transpose.int, (node, -2, -1), like)
    if rank_of(node) == 3:  # [N, S, D] -> [N, 1, S, D]
        node = _call(gm, aten.unsqueeze.default, (node, 1), like)
    return node


def _scaled_q(gm: GraphModule, m: Match, like: Node) -> Operand:
    """q with the scores' tensor factors folded in (each constant along the keys, so exact), in q's dtype."""
    if not m.q_scales:
        return m.q
    node = m.q.node
    dtype = dtype_of(node)
    qs = shape_of(node)
    for f in m.q_scales:
        fs = shape_of(f)
        if m.scores_rank == 3 and qs is not None and fs is not None and len(qs) == 4 and len(fs) == 3 \
                and fs[0] != 1:
            f = _call(gm, aten.reshape.default, (f, [qs[0], qs[1], fs[1], fs[2]]), like)  # [B*H, ..] -> [B, H, ..]
        node = _call(gm, aten.mul.Tensor, (node, f), like)
    if dtype is not None and dtype_of(node) != dtype:
        node = _call(gm, torch.ops.prims.convert_element_type.default, (node, dtype), like)
    return Operand(node, m.q.group, m.q.transpose, m.q.perm)


def _in_scores_layout(gm: GraphModule, m: Match, term: Node, like: Node) -> Node:
    """A term added before reshapes of the scores, reshaped the way the scores were (see Match.term_views)."""
    for pre, post in m.term_views.get(term, ()):
        term = _call(gm, aten.expand.default, (term, list(pre)), like)
        term = _call(gm, aten.reshape.default, (term, list(post)), like)
    return term


def _mask_node(gm: GraphModule, m: Match, q4: Node, like: Node) -> Optional[Node]:
    bias: Optional[Node] = None
    for term, coef in m.bias:
        term = _in_scores_layout(gm, m, term, like) if isinstance(term, Node) else term
        t = term if coef == 1.0 else _call(gm, aten.mul.Tensor, (term, coef), like)
        bias = t if bias is None else _call(gm, aten.add.Tensor, (bias, t), like)
    keep: Optional[Node] = None
    for cond, negate in m.keep:
        cond = _in_scores_layout(gm, m, cond, like) if isinstance(cond, Node) else cond
        c = _call(gm, aten.logical_not.default, (cond,), like) if negate else cond
        if c is not None and value_of(c) is not None and getattr(value_of(c), "dtype", torch.bool) != torch.bool:
            c = _call(gm, aten.ne.Scalar, (c, 0), like)
        keep = c if keep is None else _call(gm, aten.logical_and.default, (keep, c), like)
    if bias is not None and keep is not None:
        mask = _call(gm, aten.where.ScalarOther, (keep, bias, float("-inf")), like)
    else:
        mask = bias if bias is not None else keep
    if mask is None:
        return None
    if m.scores_rank == 3 and rank_of(mask) == 3:
        if rank_of(m.q.node) == 3:  # the site runs as [N, 1, S, D]
            mask = _call(gm, aten.unsqueeze.default, (mask, 1), like)
        else:  # q was [B, H, S, D] before a batch merge: unmerge the mask the same way
            qs, ms = shape_of(q4), shape_of(mask)
            mask = _call(gm, aten.reshape.default, (mask, [qs[0], qs[1], ms[-2], ms[-1]]), like)
    return mask


def _sink_node(gm: GraphModule, m: Match, q4: Node, like: Node) -> Node:
    """The sink column in the canonical layout [B|1, Hq|1, Sq|1, 1] (merged [B*H, Sq, 1] scores unmerged)."""
    sink = m.sink
    if m.sink_lse:  # a [B|1, H|1, Sq|1] (or fewer dims) logit subtracted from the row's log-sum-exp
        return _call(gm, aten.unsqueeze.default, (sink, -1), like)
    if rank_of(sink) == 3:
        if rank_of(m.q.node) == 3:  # the site runs as [N, 1, S, D]
            return _call(gm, aten.unsqueeze.default, (sink, 1), like)
        qs, ss = shape_of(q4), shape_of(sink)
        if ss[0] != 1:
            sink = _call(gm, aten.expand.default, (sink, [qs[0] * qs[1], ss[1], 1]), like)
            return _call(gm, aten.reshape.default, (sink, [qs[0], qs[1], ss[1], 1]), like)
        return _call(gm, aten.unsqueeze.default, (sink, 0), like)
    return sink


def _int(x: Any) -> int:
    try:
        return int(x)
    except Exception:
        return -1


def rewrite_matches(gm: GraphModule, matches: list[Match], infos: list[MaskInfo]) -> list[Site]:
    """Mutate ``gm``: one canonical node per match; returns the sites in graph order."""
    sites: list[Site] = []
    used: dict[str, int] = {}
    for m, info in zip(matches, infos):
        name = m.site or "attention"
        used[name] = used.get(name, 0) + 1
        if used[name] > 1:
            name = f"{name}#{used[name] - 1}"
        like = m.anchor
        with gm.graph.inserting_before(m.end):
            q4 = _as4d(gm, _scaled_q(gm, m, like), like)
            k4 = _as4d(gm, m.k, like)
            v4 = _as4d(gm, m.v, like)
            mask = _mask_node(gm, m, q4, like) if info.keep_tensor else None
            causal, window, chunk = info.op_causal
            sinks = None if m.sink is None else _sink_node(gm, m, q4, like)
            tail = (sinks, int(chunk)) if chunk >= 1 else () if sinks is None else (sinks,)
            out = _call(gm, CANONICAL_OP, (q4, k4, v4, mask, float(m.scale), bool(causal),
                                           int(window), float(m.softcap), float(m.dropout_p), name, m.source,
                                           *tail), like)
            result = out
            if m.out_perm is not None:  # the value einsum wrote another layout ('bnij,jbnd->ibnd')
                result = _call(gm, aten.permute.default, (out, list(m.out_perm)), like)
            if rank_of(m.end) == 3:
                if rank_of(m.q.node) == 3:
                    result = _call(gm, aten.squeeze.dim, (out, 1), like)
                else:
                    result = _call(gm, aten.flatten.using_ints, (out, 0, 1), like)
        m.end.replace_all_uses_with(result)
        qs, ks = shape_of(q4), shape_of(k4)
        sites.append(Site(name=name, source=m.source, n_heads=_int(qs[1]), n_kv_heads=_int(ks[1]),
                          head_dim=_int(qs[-1]), mask=info.label, is_causal=info.is_causal, window=info.window,
                          scale=float(m.scale), softcap=float(m.softcap), dropout_p=float(m.dropout_p),
                          node=out.name, sinks=m.sink is not None, chunk=info.chunk))
    _drop_dead(gm)
    return sites


def _drop_dead(gm: GraphModule) -> None:
    """Dead-code elimination that also drops the metadata asserts hanging off dead nodes."""
    for _ in range(8):
        changed = False
        for node in list(gm.graph.nodes):
            if is_assert(node):
                watched = node.all_input_nodes
                if watched and all(all(is_assert(u) for u in w.users) for w in watched):
                    gm.graph.erase_node(node)
                    changed = True
        changed |= eliminate_dead_code(gm)
        if not changed:
            break
    gm.graph.lint()
    gm.recompile()
