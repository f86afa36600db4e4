"""The ``lcpass`` torch.compile backend: rewrite attention in every graph dynamo hands over, then
compile the rest with Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so after ``pip install`` the name
resolves by itself::

    >>> model = torch.compile(model, backend="lcpass",
    ...                       options={"method": "streaming", "sink": 4, "window": 1024})
    >>> model.forward = torch.compile(model.forward, backend="lcpass",
    ...                               options={"plan": "plan.json", "inner": "eager"})   # generate() too

For each graph: canonicalize (structural detection, parameters recognised among dynamo's lifted
placeholders), plan (``method`` + parameters, or ``plan``), lower each planned site to
``torch.ops.lcpass.planned_attention`` (:func:`lcpass.lower.lower_graph`), then hand the graph to
``inner``: ``"inductor"`` (default, :func:`torch._inductor.compile_fx.compile_fx`) or ``"eager"``.

Inductor's own attention fusion (``fx_passes/fuse_attention.py``, the ``_sfdp_*`` patterns) is kept off
for the graphs lcpass hands over: lcpass has already found the real attention, and in torch 2.13 the
fusion rewrites a softmax over the head axis of q·kᵀ (not attention) into SDPA with wrong results. The
patterns live in the first joint-graph pattern pass, which Inductor runs under the observer name
``pass_pattern_0``; the backend adds it to ``torch._inductor.config.disabled_passes`` with a config
patch around its own ``compile_fx`` call only.

Options (``options={...}`` of ``torch.compile``, or keyword arguments when calling the backend):

    method       a method name (see ``lcpass methods``); other unknown keys are its parameters
    plan         a :class:`~lcpass.plan.Plan` or the path of a plan JSON file (instead of method)
    inner        "inductor" (default) or "eager"
    dense_below  run dense below this key length instead of each method's crossover
    report       True: print one line per compiled graph (sites found, lowering per site)
    record       a list: one :class:`GraphRecord` is appended per compiled graph
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch.fx import GraphModule

from lcpass.patterns import canonicalize
from lcpass.patterns.graphinfo import shape_of
from lcpass.pipeline import compile_sites
from lcpass.plan import Plan, SiteInfo, SitePlan

__all__ = ["lcpass_backend", "GraphRecord", "INNER", "SFDP_PASS", "backend_options", "compile_options",
           "graph_plan", "model_site_name", "parameter_placeholders"]

INNER = ("inductor", "eager")
# Observer name under which Inductor applies joint_graph.patterns (where fuse_attention registers).
SFDP_PASS = "pass_pattern_0"
_OWN_KEYS = ("method", "plan", "inner", "dense_below", "report", "record")


@dataclass
class GraphRecord:
    """What the backend did to one graph dynamo handed it."""

    index: int  # order in which dynamo compiled the graphs
    n_nodes: int
    sites: list[str] = field(default_factory=list)
    lowering: dict[str, str] = field(default_factory=dict)  # site -> dense | sparse | dense-masked
    rejected: list[str] = field(default_factory=list)  # softmaxes left alone, with the reason

    @property
    def rewritten(self) -> int:
        """Sites now running their planned method (not the exact dense op)."""
        return sum(1 for v in self.lowering.values() if v != "dense")


@dataclass(frozen=True)
class BackendOptions:
    """The validated options of one ``torch.compile(..., backend="lcpass")``."""

    method: Optional[str]
    params: dict[str, Any]
    plan: Optional[Plan]
    inner: str
    dense_below: Optional[int]
    report: bool
    record: Optional[list]


def backend_options(options: Optional[dict[str, Any]] = None, **kwargs: Any) -> BackendOptions:
    """Validate the backend's options; ValueError naming the bad option and the fix.

    Example::

        >>> backend_options({"method": "streaming", "sink": 4, "window": 64}).params
        {'sink': 4, 'window': 64}
    """
    merged = {**(options or {}), **kwargs}
    merged.pop("mode", None)  # torch.compile(mode=...) is for Inductor's own tuning: ignored here
    method, plan = merged.get("method"), merged.get("plan")
    params = {k: v for k, v in merged.items() if k not in _OWN_KEYS}
    plan = Plan.request(method, plan, params, door="lcpass backend",
                        method_flag="options={'method': name, ...params}",
                        plan_flag="options={'plan': Plan or 'plan.json'}", own_options=_OWN_KEYS).plan
    inner = merged.get("inner", "inductor")
    if inner not in INNER:
        raise ValueError(f"lcpass backend: inner={inner!r}; use one of {INNER}")
    record = merged.get("record")
    if record is not None and not isinstance(record, list):
        raise ValueError(f"lcpass backend: record must be a list to append GraphRecords to, not "
                         f"{type(record).__name__}")
    dense_below = merged.get("dense_below")
    return BackendOptions(method, params, plan, inner, None if dense_below is None else int(dense_below),
                          bool(merged.get("report", False)), record)


def parameter_placeholders(gm: GraphModule, example_inputs: Sequence[Any]) -> frozenset[str]:
    """Placeholders dynamo lifted from parameters (so a learned bias is not read as padding)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return frozenset(n.name for n, x in zip(phs, example_inputs)
                     if isinstance(x, torch.nn.Parameter) or "_parameters_" in n.name)


_COUNTER = {"graphs": 0}


def _query_len(gm: GraphModule, node_name: str) -> Optional[int]:
    """The static query length of a canonical node (None when unknown or symbolic)."""
    for n in gm.graph.nodes:
        if n.name == node_name:
            shape = shape_of(n.args[0])  # q: [B, Hq, Sq, D]
            if shape is not None and len(shape) == 4 and isinstance(shape[2], int):
                return int(shape[2])
    return None


def _plan_sites(gm: GraphModule, sites) -> list[SiteInfo]:
    """The sites as the plan sees them. A decode step (one query) is detected without a causal mask
    (bottom-right causal is a no-op there), so it is not refused causal methods."""
    out = []
    for s in sites:
        info = SiteInfo.of(s)
        if info.is_causal is False and _query_len(gm, s.node) == 1:
            info = replace(info, is_causal=None)
        out.append(info)
    return out


_DYNAMO_PREFIX = re.compile(r"^L\.(?:args\.\d+\.|kwargs\.\w+\.|self\.|fn\.)?")


def model_site_name(name: str, known: Sequence[str] = ()) -> str:
    """A site name from a dynamo graph as the model (and a plan made on torch.export) names it.

    Dynamo sometimes roots the module path at the traced frame (``L.args.0.model.layers.0.self_attn``
    when a layer is reached through ``*args``). A name in ``known`` that the site name ends with (at a
    dot) wins; otherwise the frame prefix is stripped.

    Example::

        >>> model_site_name("L.args.0.model.layers.0.self_attn")
        'model.layers.0.self_attn'
    """
    if name in known:
        return name
    matches = [k for k in known if name.endswith("." + k)]
    if matches:
        return max(matches, key=len)
    return _DYNAMO_PREFIX.sub("", name)


def graph_plan(opts: BackendOptions, sites: list[SiteInfo]) -> Plan:
    """The plan of one graph dynamo handed over, keyed by the graph's site names.

    With ``plan``: the planned sites this graph holds (dynamo splits graphs, a plan may be partial), each
    validated against the graph's site, under the graph's names (dynamo may root them at the traced
    frame, :func:`model_site_name`). With ``method``: a uniform plan for the graph's sites. A graph
    without sites keeps the whole plan, so a model rewrite it asks for (a RoPE base) still finds the
    rotary tables dynamo put in another graph."""
    if opts.plan is not None:
        plan = opts.plan
        if not sites:
            return plan
        names = {s.name: model_site_name(s.name, list(plan.sites)) for s in sites}
        out = {}
        for s in sites:
            if names[s.name] in plan.sites:
                Plan({names[s.name]: plan.sites[names[s.name]]}).validate([replace(s, name=names[s.name])])
                out[s.name] = plan.sites[names[s.name]]
        return Plan(out)
    if not sites:
        return Plan({"*": SitePlan.same(opts.method, **opts.params)})
    return Plan.from_args(sites, opts.method, door="lcpass backend", **opts.params)


def _compile_inner(gm: GraphModule, example_inputs: Sequence[Any], inner: str):
    if inner == "eager":
        return gm.forward
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    disabled = inductor_config.disabled_passes
    patched = ",".join(p for p in (disabled, SFDP_PASS) if p)
    with inductor_config.patch(disabled_passes=patched):
        return compile_fx(gm, list(example_inputs))


def lcpass_backend(gm: GraphModule, example_inputs: Sequence[Any], *,
                   options: Optional[dict[str, Any]] = None, **kwargs: Any):
    """A torch.compile backend: canonicalize, plan and lower attention, then compile with ``inner``.

    ``options`` is what ``torch.compile(..., options=...)`` passes; keyword arguments are merged in (so
    ``functools.partial(lcpass_backend, method="streaming", window=64)`` works too). See the module
    docstring for the keys.

    Example::

        >>> compiled = torch.compile(model, backend="lcpass", options={"method": "dense", "inner": "eager"})
        >>> torch.equal(compiled(x), model(x))
        True
    """
    opts = backend_options(options, **kwargs)
    index = _COUNTER["graphs"]
    _COUNTER["graphs"] += 1
    # a graph dynamo made dynamic takes its sizes as SymInt inputs: mask meaning is read at their values
    concrete = [x.node.hint if isinstance(x, torch.SymInt) and x.node.hint is not None else x
                for x in example_inputs]
    det = canonicalize(gm, concrete, parameter_placeholders(gm, example_inputs))
    rec = GraphRecord(index, len(gm.graph.nodes), [model_site_name(s.name) for s in det.sites],
                      rejected=[f"{r.node}: {r.reason}" for r in det.rejected])
    # the one pipeline (as lcpass.optimize and lcpass.export): this graph's plan, its model rewrites (a
    # graph without sites or rotary tables, one dynamo split off, is left alone), the sites lowered
    low = compile_sites(gm, det.sites, graph_plan(opts, _plan_sites(gm, det.sites)), dense_below=opts.dense_below,
                        model_name=f"torch.compile graph {index}", inputs=list(example_inputs), rope_if_found=not det.sites)
    rec.lowering = {model_site_name(k): v for k, v in low.lowering.items()}
    if not det.sites:
        gm.recompile()
    if opts.record is not None:
        opts.record.append(rec)
    if opts.report:
        low = ", ".join(f"{k}: {v}" for k, v in rec.lowering.items()) or "no attention"
        print(f"lcpass backend: graph {index} ({rec.n_nodes} nodes): {rec.rewritten}/{len(rec.sites)} sites "
              f"rewritten ({low})")
    return _compile_inner(gm, example_inputs, opts.inner)


def compile_options(method: Optional[str] = None, plan: Union[Plan, str, Path, None] = None,
                    **params: Any) -> dict[str, Any]:
    """The ``options`` dict for ``torch.compile(..., backend="lcpass")``, validated now.

    Example::

        >>> torch.compile(model, backend="lcpass", options=compile_options("streaming", sink=4, window=64))
    """
    opts = {"method": method, "plan": plan, **params}
    opts = {k: v for k, v in opts.items() if v is not None}
    backend_options(opts)
    return opts
