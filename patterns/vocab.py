"""One vocabulary for every IR level.

The same operation is spelled differently in a dynamo graph (``torch.matmul``, ``operator.matmul``,
``x.softmax(-1)``), an export graph (``aten.matmul.default``, ``aten.softmax.int``), a core-ATen graph
(``aten.bmm.default``, ``aten._softmax.default``) and a ``symbolic_trace`` graph (``call_module`` of an
``nn.Softmax``). :func:`op_of` maps all of them to one small record, ``Op(kind, args)``, whose ``args``
are *named* (``x``, ``dim``, ``other`` ...), so the matcher never reads node positions.

Example::

    >>> op = op_of(node)            # node: aten._softmax.default(%add, -1, False)
    >>> op.kind, op["dim"]
    ('softmax', -1)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

aten = torch.ops.aten

__all__ = ["Op", "op_of", "is_assert", "TRANSPARENT_KINDS"]


@dataclass(frozen=True)
class Op:
    """A node seen through the vocabulary: its kind and its named arguments."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    node: Optional[Node] = None

    def __getitem__(self, name: str) -> Any:
        return self.args.get(name)


# (kind, targets, positional argument names, defaults). Targets are callables, OpOverloadPackets
# (every overload), or method names ("method:softmax").
_TABLE: list[tuple[str, tuple, tuple[str, ...], dict[str, Any]]] = [
    ("sdpa", (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
              aten.scaled_dot_product_attention),
     ("q", "k", "v", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
     {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}),
    ("sdpa_cpu", (aten._scaled_dot_product_flash_attention_for_cpu,),
     ("q", "k", "v", "dropout_p", "is_causal"),
     {"dropout_p": 0.0, "is_causal": False, "attn_mask": None, "scale": None}),
    ("sdpa_flash", (aten._scaled_dot_product_flash_attention,),
     ("q", "k", "v", "dropout_p", "is_causal", "return_debug_mask"),
     {"dropout_p": 0.0, "is_causal": False, "attn_mask": None, "scale": None}),
    ("sdpa_efficient", (aten._scaled_dot_product_efficient_attention,),
     ("q", "k", "v", "attn_mask", "compute_log_sumexp", "dropout_p", "is_causal"),
     {"dropout_p": 0.0, "is_causal": False, "attn_mask": None, "scale": None}),
    ("sdpa_cudnn", (aten._scaled_dot_product_cudnn_attention,),
     ("q", "k", "v", "attn_mask", "compute_log_sumexp", "dropout_p", "is_causal", "return_debug_mask"),
     {"dropout_p": 0.0, "is_causal": False, "attn_mask": None, "scale": None}),
    ("softmax", (torch.softmax, F.softmax, torch.Tensor.softmax, aten.softmax, aten._softmax,
                 aten._safe_softmax, "method:softmax"),
     ("x", "dim"), {"dim": None}),
    ("matmul", (torch.matmul, operator.matmul, torch.Tensor.matmul, aten.matmul, "method:matmul",
                "method:__matmul__"), ("a", "b"), {}),
    ("bmm", (torch.bmm, aten.bmm, "method:bmm"), ("a", "b"), {}),
    ("einsum", (torch.einsum, aten.einsum), ("equation", "operands"), {}),
    ("baddbmm", (torch.baddbmm, aten.baddbmm, "method:baddbmm"),
     ("x", "a", "b"), {"beta": 1, "alpha": 1}),
    ("mul", (operator.mul, operator.imul, torch.mul, aten.mul, aten.mul_, "method:mul", "method:__mul__",
             "method:mul_", "method:__imul__"), ("a", "b"), {}),
    ("div", (operator.truediv, operator.itruediv, torch.div, torch.true_divide, aten.div, aten.div_,
             "method:div", "method:__truediv__", "method:div_", "method:__itruediv__"), ("a", "b"),
     {"rounding_mode": None}),
    ("add", (operator.add, operator.iadd, torch.add, aten.add, aten.add_, "method:add", "method:__add__",
             "method:add_", "method:__iadd__"), ("a", "b"), {"alpha": 1}),
    ("sub", (operator.sub, operator.isub, torch.sub, aten.sub, aten.sub_, "method:sub", "method:__sub__",
             "method:sub_", "method:__isub__"), ("a", "b"), {"alpha": 1}),
    ("maximum", (torch.maximum, aten.maximum, aten.max.other, "method:maximum"), ("a", "b"), {}),
    ("where", (torch.where, aten.where, "method:where"), ("cond", "a", "b"), {}),
    ("masked_fill", (torch.masked_fill, aten.masked_fill, aten.masked_fill_, "method:masked_fill",
                     "method:masked_fill_"),
     ("x", "cond", "value"), {}),
    ("tanh", (torch.tanh, F.tanh, aten.tanh, "method:tanh"), ("x",), {}),
    ("nan_to_num", (torch.nan_to_num, aten.nan_to_num, aten.nan_to_num_, "method:nan_to_num", "method:nan_to_num_"),
     ("x", "nan", "posinf", "neginf"), {"nan": None, "posinf": None, "neginf": None}),
    ("exp", (torch.exp, aten.exp, "method:exp"), ("x",), {}),
    ("sigmoid", (torch.sigmoid, F.sigmoid, aten.sigmoid, "method:sigmoid"), ("x",), {}),
    ("logsumexp", (torch.logsumexp, aten.logsumexp, "method:logsumexp"), ("x", "dim", "keepdim"), {"keepdim": False}),
    ("amax", (torch.amax, aten.amax, "method:amax"), ("x", "dim", "keepdim"), {"keepdim": False}),
    ("sum", (torch.sum, aten.sum, "method:sum"), ("x", "dim", "keepdim"), {"keepdim": False}),
    ("cast", (aten._to_copy, aten.to, torch.ops.prims.convert_element_type,
              aten.type_as, "method:to", "method:float", "method:type", "method:type_as", "method:half",
              "method:bfloat16", "method:double", "method:bool", "method:int", "method:long"), ("x",), {}),
    ("dropout", (F.dropout, torch.dropout, aten.dropout, aten.native_dropout, "method:dropout"),
     ("x", "p", "train"), {"p": 0.5, "train": True}),
    ("identity", (aten.clone, aten.alias, aten.contiguous, aten.detach, aten.lift_fresh_copy,
                  "method:contiguous", "method:clone"), ("x",), {}),
    ("transpose", (torch.transpose, aten.transpose, "method:transpose"), ("x", "dim0", "dim1"), {}),
    ("permute", (torch.permute, aten.permute, "method:permute"), ("x", "dims"), {}),
    ("mT", (aten.t, "method:t"), ("x",), {}),
    ("view", (torch.reshape, aten.view, aten.reshape, aten._unsafe_view, "method:view",
              "method:reshape"), ("x", "shape"), {}),
    ("expand", (aten.expand, "method:expand"), ("x", "shape"), {}),
    ("unsqueeze", (torch.unsqueeze, aten.unsqueeze, "method:unsqueeze"), ("x", "dim"), {}),
    ("getitem", (operator.getitem,), ("x", "index"), {}),
    ("cat", (torch.cat, torch.concat, torch.concatenate, aten.cat), ("tensors", "dim"), {"dim": 0}),
    ("slice", (aten.slice,), ("x", "dim", "start", "end", "step"), {"dim": 0, "start": None, "end": None, "step": 1}),
    ("logical_not", (torch.logical_not, aten.logical_not, operator.invert, aten.bitwise_not,
                     "method:logical_not", "method:__invert__", "method:bitwise_not"), ("x",), {}),
    ("eq", (torch.eq, aten.eq, operator.eq, "method:eq", "method:__eq__"), ("a", "b"), {}),
    ("ne", (torch.ne, aten.ne, operator.ne, "method:ne", "method:__ne__"), ("a", "b"), {}),
    ("any", (torch.any, aten.any, "method:any"), ("x", "dim", "keepdim"), {"dim": None, "keepdim": False}),
    ("all", (torch.all, aten.all, "method:all"), ("x", "dim", "keepdim"), {"dim": None, "keepdim": False}),
]

_BY_TARGET: dict[Any, tuple[str, tuple[str, ...], dict[str, Any]]] = {}
for _kind, _targets, _names, _defaults in _TABLE:
    for _t in _targets:
        _BY_TARGET[_t] = (_kind, _names, _defaults)

TRANSPARENT_KINDS = frozenset({"cast", "identity"})


def is_assert(node: Node) -> bool:
    """Nodes that read a value only to check it (``_assert_tensor_metadata`` ...): not real users."""
    target = node.target
    name = getattr(target, "__name__", "") or str(target)
    return node.op == "call_function" and ("_assert" in name or "assert" == name)


def _is_binary_max(node: Node) -> bool:
    if not ((node.op == "call_function" and node.target is torch.max) or (node.op == "call_method"
                                                                          and node.target == "max")):
        return False
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return isinstance(other, (Node, torch.Tensor))


def _lookup(node: Node, gm: Optional[torch.fx.GraphModule]):
    if _is_binary_max(node):  # torch.max(a, b) / a.max(b) of two tensors is torch.maximum, not a reduction
        return _BY_TARGET[torch.maximum]
    if node.op == "call_method":
        return _BY_TARGET.get(f"method:{node.target}")
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(node.target)
        if isinstance(mod, torch.nn.Softmax):
            return ("softmax", ("x",), {"dim": mod.dim})
        if isinstance(mod, torch.nn.Dropout):
            return ("dropout", ("x",), {"p": mod.p, "train": mod.training})
        if isinstance(mod, torch.nn.Identity):
            return ("identity", ("x",), {})
        return None
    if node.op != "call_function":
        return None
    target = node.target
    hit = _BY_TARGET.get(target)
    if hit is None and isinstance(target, torch._ops.OpOverload):
        hit = _BY_TARGET.get(target.overloadpacket)
    return hit


def op_of(node: Any, gm: Optional[torch.fx.GraphModule] = None) -> Optional[Op]:
    """The node seen through the vocabulary, or None for an operation lcpass does not read."""
    if not isinstance(node, Node):
        return None
    hit = _lookup(node, gm)
    if hit is None:
        return None
    kind, names, defaults = hit
    args: dict[str, Any] = dict(defaults)
    positional = list(node.args)
    if kind == "einsum" and positional and isinstance(positional[0], str) and len(positional) > 2:
        positional = [positional[0], list(positional[1:])]  # torch.einsum(eq, a, b)
    for name, value in zip(names, positional):
        args[name] = value
    extra = positional[len(names):]
    args.update(node.kwargs)
    if "attn_mask" in node.kwargs or "attn_bias" in node.kwargs:
        args["attn_mask"] = node.kwargs.get("attn_mask", node.kwargs.get("attn_bias"))
    if kind in ("softmax",) and args.get("dim") is None and "dim" in node.kwargs:
        args["dim"] = node.kwargs["dim"]
    if kind == "softmax" and extra:
        args["extra"] = extra
    if kind in ("view", "expand", "permute") and extra:  # x.view(a, b, c)
        args[{"view": "shape", "expand": "shape", "permute": "dims"}[kind]] = [args.get(
            {"view": "shape", "expand": "shape", "permute": "dims"}[kind])] + extra
    if kind == "dropout" and "training" in node.kwargs:  # F.dropout(x, p, training=...) names it "training"
        args["train"] = node.kwargs["training"]
    if kind == "dropout" and "input" in node.kwargs:
        args["x"] = node.kwargs["input"]
    if kind == "sum" and args.get("dim") is None and "dim" in node.kwargs:
        args["dim"] = node.kwargs["dim"]
    if kind == "cast":
        args = {"x": positional[0] if positional else node.kwargs.get("self", node.kwargs.get("input"))}
    return Op(kind, args, node)


def target_name(node: Node) -> str:
    """A short readable name for a node's operation (for reasons and reports)."""
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_module":
        return f"module {node.target}"
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def is_constant_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


Predicate = Callable[[Node], bool]
