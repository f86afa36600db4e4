"""Small facts about fx nodes that every IR level spells differently: shapes, dtypes, constants,
layer names.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from .vocab import op_of

__all__ = ["value_of", "shape_of", "rank_of", "dtype_of", "constant_number", "layer_name", "same_size"]


def value_of(node: Any) -> Any:
    """The example/fake value recorded on a node (``val``, ``example_value`` or ``tensor_meta``)."""
    if not isinstance(node, Node):
        return node
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    return node.meta.get("tensor_meta")


def shape_of(node: Any) -> Optional[tuple]:
    """The node's shape (ints or SymInts), or None when unknown."""
    v = value_of(node)
    shape = getattr(v, "shape", None)
    return tuple(shape) if shape is not None else None


def rank_of(node: Any) -> Optional[int]:
    s = shape_of(node)
    return None if s is None else len(s)


def dtype_of(node: Any) -> Optional[torch.dtype]:
    v = value_of(node)
    return getattr(v, "dtype", None)


def same_size(a: Any, b: Any) -> bool:
    """True when two sizes are provably equal (ints or SymInts)."""
    try:
        return bool(a == b)
    except Exception:  # an unbacked or data-dependent symbol
        return False


_aten = torch.ops.aten
_PASS_THROUGH = {_aten.lift_fresh_copy.default, _aten.clone.default, _aten.detach.default, _aten.detach_.default,
                 _aten.alias.default, _aten._to_copy.default, _aten.to.dtype, _aten.to.dtype_layout,
                 _aten.to.device, _aten.to.other, torch.ops.prims.convert_element_type.default, torch.Tensor.detach,
                 torch.Tensor.to}

_ZEROS = {_aten.zeros.default, _aten.zeros_like.default, torch.zeros, torch.zeros_like}
_ONES = {_aten.ones.default, _aten.ones_like.default, torch.ones, torch.ones_like}


def _mutated(node: Node) -> bool:
    """Whether some user writes ``node`` in place (``masked_fill_``, ``+=``, ``copy_``)."""
    for u in node.users:
        t = u.target
        if isinstance(t, torch._ops.OpOverload):
            name = t.overloadpacket.__name__
        else:
            name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        if name in ("detach_", "requires_grad_"):
            continue  # autograd metadata, not the values
        if u.args and u.args[0] is node and (name.endswith("_") and not name.endswith("__")
                                             or name in ("iadd", "isub", "imul", "itruediv", "ior", "iand")):
            return True
    return False


def constant_number(value: Any, gm: Optional[GraphModule] = None) -> Optional[float]:
    """A Python number for a literal, a 0-d constant tensor, or a node holding one; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, Node):
        if value.op == "get_attr" and gm is not None:
            try:
                t = gm
                for part in str(value.target).split("."):
                    t = getattr(t, part)
                if isinstance(t, torch.Tensor) and t.numel() == 1:
                    return float(t.item())
            except AttributeError:
                return None
        if value.op == "call_function" and value.target in _PASS_THROUGH:
            # a constant copied, detached or cast (``torch.tensor(finfo.min).to(dtype).detach()``)
            return constant_number(value.args[0], gm) if value.args else None
        if value.op == "call_method" and value.target in ("detach", "detach_", "clone", "to", "float", "half",
                                                          "bfloat16", "type_as", "contiguous"):
            return constant_number(value.args[0], gm) if value.args else None
        if value.op == "call_function" and value.target in (
            torch.ops.aten.full.default, torch.ops.aten.scalar_tensor.default, torch.ops.aten.full_like.default
        ) and not _mutated(value):
            fill = value.args[0] if value.target is torch.ops.aten.scalar_tensor.default else value.args[1]
            return constant_number(fill, gm)
        if _mutated(value):
            return None  # a tensor written in place later (dynamo graphs are not functional): not a constant
        if value.op == "call_function" and value.target in _ZEROS:
            return 0.0
        if value.op == "call_function" and value.target in _ONES:
            return 1.0
        v = value_of(value)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if gm is not None:
            return _fold(value, gm)
    return None


_FOLD_LIMIT = 16  # nodes: a scale computed from constants (``sqrt(tensor(d) * factor)``), not a subgraph


def _fold(node: Node, gm: GraphModule) -> Optional[float]:
    """The value of a one-element tensor computed only from literals and constant tensors (no input, no
    parameter, nothing random or written in place), by running those few nodes; else None."""
    order: list[Node] = []  # inputs before users (depth-first post-order)
    state: dict[Node, bool] = {}

    def visit(n: Node) -> bool:
        if n in state:
            return state[n]
        state[n] = False
        if len(state) > _FOLD_LIMIT or n.op not in ("call_function", "get_attr") or _mutated(n):
            return False
        if n.op == "call_function" and ("rand" in str(n.target) or "dropout" in str(n.target)):
            return False
        if not all(visit(a) for a in n.all_input_nodes):
            return False
        state[n] = True
        order.append(n)
        return True

    if not visit(node):
        return None
    env: dict[Node, Any] = {}
    try:
        for n in order:
            if n.op == "get_attr":
                t: Any = gm
                for part in str(n.target).split("."):
                    t = getattr(t, part)
                if isinstance(t, torch.nn.Parameter):
                    return None
                env[n] = t
            else:
                args = torch.fx.node.map_arg(n.args, env.__getitem__)
                kwargs = torch.fx.node.map_arg(n.kwargs, env.__getitem__)
                with torch.no_grad():
                    env[n] = n.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - not foldable here: not a constant
        return None
    out = env.get(node)
    if isinstance(out, torch.Tensor) and out.numel() == 1 and not isinstance(out, torch._subclasses.FakeTensor):
        return float(out.item())
    return float(out) if isinstance(out, (int, float)) and not isinstance(out, bool) else None


def is_neg_inf_like(x: Optional[float]) -> bool:
    """A fill value that masks a score out: -inf or a huge negative number (dtype min, -1e9 ...)."""
    return x is not None and (x == -math.inf or x <= -1e4)


_BRACKET = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")
_FRAME = re.compile(r"^L\.(?:args\.\d+\.|kwargs\.\w+\.|self\.)")


def normalise_path(path: str) -> str:
    """``L['self'].model.layers[0].self_attn`` / ``model._modules['layers']`` -> ``model.layers.0.self_attn``."""
    p = path
    for prefix in ("L['self'].", "L[\"self\"].", "self."):
        if p.startswith(prefix):
            p = p[len(prefix):]
    if p in ("L['self']", "self"):
        return ""
    p = p.replace("._modules", "")
    p = _BRACKET.sub(lambda m: "." + m.group(1), p)
    p = p.replace("..", ".").strip(".")
    # dynamo roots paths reached through *args / self at the traced frame: L.args.0.model... -> model...
    p = _FRAME.sub("", p)
    return p


def layer_name(node: Node) -> str:
    """The innermost module path of a node, from ``nn_module_stack``; '' at the top level."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    last = list(stack.values())[-1]
    path = last[0] if isinstance(last, tuple) else str(last)
    return normalise_path(path)


_VMAP_STATE = {"_vmap_increment_nesting": 1, "_vmap_decrement_nesting": -1, "lazy_load_decompositions": 0}


def vmap_state(n: Node) -> Optional[int]:
    """For the functorch state calls export keeps in a graph (masks built with ``torch.vmap``): the vmap
    level change (+1 / -1; 0 for loading vmap's decompositions); None for every other node."""
    name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
    return _VMAP_STATE.get(name)


# random ops torch marks impure (nondeterministic_seeded) that a rewrite leaves without users: the attention
# a canonical op replaced (it applies the dropout itself) and dropout on its probabilities. Kept, they would
# run on every call next to the op that replaced them.
_DEAD_RANDOM = ("sdpa", "sdpa_cpu", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "dropout")


def _impure(n: Node) -> bool:
    if vmap_state(n) is not None:
        return True
    if not n.is_impure():
        return False
    op = op_of(n)
    return op is None or op.kind not in _DEAD_RANDOM


def eliminate_dead_code(gm: GraphModule) -> bool:
    """``gm.graph.eliminate_dead_code()`` that keeps functorch's state calls (a vmap level closed or
    decompositions loaded have no users, yet the batch-dim ops around them fail without them) and drops
    dead attention and dropout calls (random, so torch would keep them)."""
    return gm.graph.eliminate_dead_code(is_impure_node=_impure)
