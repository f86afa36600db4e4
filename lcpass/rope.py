"""Rotary-embedding rewrite: give a model's RoPE a new base (Entropy-ABF's adjusted base frequency).

Entropy-ABF (Zhang et al., 2024, "Extending LLMs' Context Window with 100 Samples") has two halves: the
RoPE base raised to ``abf_base`` (500,000 in the paper) and the entropy-aware logit scaling past the
trained length. The second is the ``entropy_abf`` score_mod of :mod:`lcpass.methods.dynamic.score_mods`;
this module does the first, found structurally, never by model name:

* a transformers model (rewritten in place, like the rest of ``lcpass.optimize``): every module with an
  ``inv_freq`` buffer (``<layer_type>_inv_freq`` for per-layer-type RoPE, e.g. Gemma 3) of the
  ``"default"`` rope type gets ``inv_freq = 1 / base ** (arange(0, d, 2) / d)``; its
  ``original_inv_freq`` and ``config.rope_parameters["rope_theta"]`` follow, so the model and its saved
  config agree;
* a captured graph (``lcpass.optimize`` on a plain module; the original module is left unchanged):
  every ``sin``/``cos`` is walked back to the frequencies feeding it, either a ``get_attr`` constant
  whose values are ``base ** -(2i/d)`` and that reaches an outer product with the positions (replaced by
  a new constant on the graph module), or an in-graph ``base ** (arange(0, d, 2) / d)`` (its scalar base
  replaced).

The base only grows: the new base is ``max(current, abf_base)``. Which base a plan asks for is each
method record's ``rope_base`` (:func:`plan_rope_base`); the pipeline applies it (:func:`apply_plan_rope`).

Example::

    model = lcpass.optimize(model, method="entropy_abf", trained_length=4096)  # base 500000 + scaling
    set_rope_base(model, 500000.0)                                            # the rewrite alone

>>> rope_inv_freq(10000.0, 8)
tensor([1.0000, 0.1000, 0.0100, 0.0010])
>>> round(infer_rope_base(rope_inv_freq(500000.0, 64)), -2)   # read back from a float32 table
500000.0
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node

from lcpass.methods import get_method, resolve_params, spec_parts

__all__ = ["RotarySite", "RopeRewriteError", "rope_inv_freq", "infer_rope_base", "find_rotary",
           "set_rope_base", "plan_rope_base", "apply_plan_rope"]

_FIX = "pass abf_base=0 to apply only Entropy-ABF's logit scaling"


class RopeRewriteError(ValueError):
    """No rotary embedding to rewrite, or one whose frequencies are not ``base ** -(2i/d)``."""


@dataclass(frozen=True)
class RotarySite:
    """One rotary frequency table: where it is, its kind, the rotary dim ``d`` and its current base.

    ``kind``: ``"module"`` (an ``inv_freq`` buffer of a module), ``"graph-constant"`` (a ``get_attr``
    feeding cos/sin), ``"graph-pow"`` (an in-graph ``base ** (arange(0, d, 2) / d)``).
    """

    where: str
    kind: str
    dim: int
    base: float


def rope_inv_freq(base: float, dim: int) -> torch.Tensor:
    """RoPE's inverse frequencies ``1 / base ** (arange(0, dim, 2) / dim)``: float32 [dim // 2]
    (the same float32 arithmetic as transformers' default rope init)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def infer_rope_base(inv_freq: torch.Tensor, rtol: float = 1e-4) -> Optional[float]:
    """The base of a 1-D ``base ** -(2i/d)`` table (d = 2 * len), or None if it is not one."""
    if inv_freq.dim() != 1 or inv_freq.numel() < 2 or not inv_freq.is_floating_point():
        return None
    f = inv_freq.detach().double().cpu()
    d = 2 * f.numel()
    if not (f[0] == 1.0 and 0 < f[1] < 1):
        return None
    base = float(f[1]) ** (-d / 2)
    ok = torch.allclose(rope_inv_freq(base, d).double(), f, rtol=rtol, atol=0.0)
    return base if ok else None


# ----------------------------------------------------------------------------------------------
# transformers models: modules with an inv_freq buffer


def _module_tables(model: nn.Module) -> list[tuple[str, nn.Module, str, Optional[str]]]:
    """(module name, module, buffer name, layer type or None) of every rotary frequency buffer."""
    out = []
    for mname, mod in model.named_modules():
        for b in list(mod._buffers):
            if b == "inv_freq":
                out.append((mname, mod, b, None))
            elif b.endswith("_inv_freq") and not b.endswith(("original_inv_freq", "long_inv_freq")):
                out.append((mname, mod, b, b[: -len("_inv_freq")]))
    return out


def _rope_params(mod: nn.Module, model: nn.Module, layer_type: Optional[str]) -> Optional[dict]:
    cfg = getattr(mod, "config", None) or getattr(model, "config", None)
    rp = getattr(cfg, "rope_parameters", None)
    if not isinstance(rp, dict):
        return None
    if layer_type is not None:
        rp = rp.get(layer_type)
    return rp if isinstance(rp, dict) else None


def _module_sites(model: nn.Module, model_name: str) -> list[tuple[RotarySite, nn.Module, str, Optional[str]]]:
    sites = []
    for mname, mod, b, layer_type in _module_tables(model):
        where = f"{mname}.{b}" if mname else b
        rt = getattr(mod, "rope_type", "default")
        if isinstance(rt, dict):
            rt = rt.get(layer_type, "default")
        rp = _rope_params(mod, model, layer_type) or {}
        if rt == "default":  # the module's own type first, then its config's
            rt = rp.get("rope_type", rt) or "default"
        if rt != "default":
            raise RopeRewriteError(
                f"entropy_abf: {model_name}: {where} uses rope_type={rt!r}; the RoPE base rewrite supports "
                f"the default RoPE (inv_freq = base ** -(2i/d)) only: drop the rope scaling from "
                f"config.rope_parameters, or {_FIX}")
        t = mod._buffers[b]
        base = infer_rope_base(t)
        if base is None:
            raise RopeRewriteError(
                f"entropy_abf: {model_name}: {where} (shape {tuple(t.shape)}) is not a table "
                f"base ** -(2i/d) although its rope_type is 'default'; {_FIX}")
        sites.append((RotarySite(where, "module", 2 * t.numel(), float(rp.get("rope_theta", base))),
                      mod, b, layer_type))
    return sites


def _set_module_base(model: nn.Module, found, new_base: float) -> None:
    for site, mod, b, layer_type in found:
        old = mod._buffers[b]
        new = rope_inv_freq(new_base, site.dim).to(device=old.device, dtype=old.dtype)
        mod._buffers[b] = new  # a new tensor: nothing that aliased the old table changes
        orig = f"{layer_type}_original_inv_freq" if layer_type else "original_inv_freq"
        if orig in mod._buffers:
            mod._buffers[orig] = new.clone()
        rp = _rope_params(mod, model, layer_type)
        if rp is not None:
            rp["rope_theta"] = new_base
        cfg = getattr(mod, "config", None) or getattr(model, "config", None)
        if layer_type is None and cfg is not None and "rope_theta" in getattr(cfg, "__dict__", {}):
            cfg.rope_theta = new_base


# ----------------------------------------------------------------------------------------------
# captured graphs: the frequencies feeding cos/sin

_TRIG = {torch.cos, torch.sin, torch.ops.aten.cos.default, torch.ops.aten.sin.default}
_PRODUCT = {operator.mul, operator.matmul, torch.mul, torch.matmul, torch.outer, torch.einsum, torch.bmm,
            torch.mm, torch.ops.aten.mul.Tensor, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default,
            torch.ops.aten.mm.default, torch.ops.aten.outer.default, torch.ops.aten.einsum.default}
_POW = {operator.pow, torch.pow, torch.ops.aten.pow.Scalar}
_ARANGE = {torch.arange, torch.ops.aten.arange.default, torch.ops.aten.arange.start,
           torch.ops.aten.arange.start_step}


def _is(node: Node, targets: set, methods: tuple[str, ...] = ()) -> bool:
    if node.op == "call_function":
        return node.target in targets
    return node.op == "call_method" and node.target in methods


def _ancestors(nodes: Sequence[Node]) -> set[Node]:
    seen: set[Node] = set()
    todo = list(nodes)
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _feeds_product(node: Node) -> bool:
    """Through single-input ops (casts, views, expand, indexing), the table meets the positions in a
    product (mul / matmul / outer / einsum)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if _is(u, _PRODUCT, ("mul", "matmul", "__mul__", "__matmul__", "outer")):
                return True
            if len(u.all_input_nodes) == 1:
                todo.append(u)
    return False


def _get_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _graph_sites(gm: GraphModule, inputs: Optional[Sequence[Any]] = None) -> list[tuple[RotarySite, Node]]:
    """Rotary tables of a graph: constants (get_attr), in-graph ``base ** (arange / d)`` and, with the
    graph's example ``inputs``, lifted buffers (dynamo passes a module's ``inv_freq`` as a placeholder)."""
    trig = [n for n in gm.graph.nodes if _is(n, _TRIG, ("cos", "sin"))]
    if not trig:
        return []
    up = _ancestors(trig)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, inputs)) if inputs is not None else {}
    sites = []
    for n in gm.graph.nodes:
        if n not in up:
            continue
        if n.op in ("get_attr", "placeholder"):
            t = _get_attr(gm, n.target) if n.op == "get_attr" else values.get(n)
            base = infer_rope_base(t) if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() > 1 else None
            if base is not None and _feeds_product(n):
                kind = "graph-constant" if n.op == "get_attr" else "graph-input"
                sites.append((RotarySite(n.name, kind, 2 * t.numel(), base), n))
        elif _is(n, _POW, ("__rpow__",)) and isinstance(n.args[0], (int, float)) and len(n.args) > 1 \
                and isinstance(n.args[1], Node) and any(_is(a, _ARANGE) for a in _ancestors([n.args[1]])):
            val = n.meta.get("val", n.meta.get("tensor_meta"))
            dim = 2 * int(val.shape[-1]) if val is not None and len(val.shape) else 0
            sites.append((RotarySite(n.name, "graph-pow", dim, float(n.args[0])), n))
    return sites


def _set_graph_base(gm: GraphModule, found, new_base: float, inputs: Optional[Sequence[Any]] = None) -> None:
    for i, (site, node) in enumerate(found):
        if site.kind == "graph-pow":
            node.args = (new_base, *node.args[1:])
            continue
        if node.op == "get_attr":
            old = _get_attr(gm, node.target)
        else:
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            old = list(inputs or ())[placeholders.index(node)]
        name = f"_lcpass_rope_inv_freq_{i}"
        while hasattr(gm, name):
            name += "_"
        # a new constant on the graph module: the captured module's tensor (shared with the original
        # model) is never written
        gm.register_buffer(name, rope_inv_freq(new_base, site.dim).to(device=old.device, dtype=old.dtype))
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(name)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        if node.op == "get_attr":  # a placeholder stays (the caller still passes it), unused
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


# ----------------------------------------------------------------------------------------------
# public entry points


def find_rotary(target: nn.Module, *, model_name: str = "",
                inputs: Optional[Sequence[Any]] = None) -> list[RotarySite]:
    """The rotary frequency tables of a transformers-style module (``inv_freq`` buffers) or, for a
    GraphModule, of its graph (with ``inputs``, its example inputs, also lifted ``inv_freq`` placeholders).
    Raises :class:`RopeRewriteError` for a table it could not rewrite."""
    name = model_name or type(target).__name__
    if isinstance(target, GraphModule):
        return [s for s, _ in _graph_sites(target, inputs)]
    return [s for s, *_ in _module_sites(target, name)]


def set_rope_base(target: nn.Module, abf_base: float, *, model_name: str = "",
                  inputs: Optional[Sequence[Any]] = None) -> list[RotarySite]:
    """Raise every rotary base of ``target`` to ``max(base, abf_base)``; returns the sites found (with
    their old bases). A GraphModule's graph is rewritten; any other module's buffers (in place).

    Raises :class:`RopeRewriteError` naming the model when there is no rotary embedding, or one with a
    rope scaling type other than the default.
    """
    name = model_name or type(target).__name__
    if isinstance(target, GraphModule):
        found: list = _graph_sites(target, inputs)
        bad = [s for s, _ in found if s.kind == "graph-pow" and s.dim <= 0]
        if bad:
            raise RopeRewriteError(f"entropy_abf: {name}: the rotary frequencies {bad[0].where} have no "
                                   f"known shape (capture with shape propagation); {_FIX}")
    else:
        found = _module_sites(target, name)
    if not found:
        what = ("cos/sin fed by base ** (arange(0, d, 2) / d) frequencies in its captured graph"
                if isinstance(target, GraphModule) else "a module with an inv_freq buffer")
        raise RopeRewriteError(f"entropy_abf: no rotary embedding found in {name} (looked for {what}); "
                               f"Entropy-ABF raises the RoPE base, so it needs a RoPE model: {_FIX}")
    groups: dict[float, list] = {}
    for item in found:  # a base already >= abf_base is left exactly as it is (the base only grows)
        if item[0].base < abf_base:
            groups.setdefault(max(float(item[0].base), float(abf_base)), []).append(item)
    for nb, items in groups.items():
        if isinstance(target, GraphModule):
            _set_graph_base(target, items, nb, inputs)
        else:
            _set_module_base(target, items, nb)
    return [item[0] for item in found]


def plan_rope_base(plan: Any, sites: Optional[Sequence[Any]] = None) -> Optional[tuple[float, str]]:
    """The RoPE base the plan's heads ask for, with the method that asks: each method record's
    ``rope_base(params)`` (Entropy-ABF's ``abf_base``; 0 = leave the base alone), over the heads of
    ``sites``, or over every head spec the plan holds when ``sites`` is None (a compiled graph that holds
    none of the plan's sites may still hold the model's rotary embedding). None: no head asks.

    The model has one rotary embedding: heads asking for different bases are refused by name."""
    if sites is None:
        specs = [(name, h) for name, sp in plan.sites.items() for h in sp.heads]
    else:
        specs = [(s.name, h) for s in sites for h in plan.resolve(s.name, s.n_heads)]
    bases: dict[float, tuple[str, str]] = {}
    for site, spec in specs:
        name, params = spec_parts(spec)
        method = get_method(name)
        if method.rope_base is not None:
            base = float(method.rope_base(resolve_params(method, params)))
            if base > 0:
                bases.setdefault(base, (name, site))
    if len(bases) > 1:
        raise ValueError(f"{next(iter(bases.values()))[0]}: the plan asks for RoPE bases {sorted(bases)} (sites "
                         f"{sorted({w for _, w in bases.values()})}); the model has one RoPE base: use one value")
    if not bases:
        return None
    base, (name, _) = next(iter(bases.items()))
    return base, name


def apply_plan_rope(target: nn.Module, plan: Any, sites: Optional[Sequence[Any]], *, model_name: str = "",
                    inputs: Optional[Sequence[Any]] = None, only_if_found: bool = False) -> list[RotarySite]:
    """The pipeline's model rewrite: when a head's method asks for a RoPE base (:func:`plan_rope_base`),
    raise the rotary base of ``target`` (the transformers model, or the captured GraphModule; ``inputs``:
    a graph's example inputs, so lifted ``inv_freq`` placeholders are found too). ``only_if_found``: a
    graph without rotary tables is left alone (a graph dynamo split off the model) instead of refused."""
    asked = plan_rope_base(plan, sites)
    if asked is None:
        return []
    if only_if_found and not find_rotary(target, model_name=model_name, inputs=inputs):
        return []
    return set_rope_base(target, asked[0], model_name=model_name, inputs=inputs)
