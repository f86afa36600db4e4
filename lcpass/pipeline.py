"""The one pipeline every door calls once its graph is captured and its sites detected.

    capture (the door's own: torch.export, torch.fx, the graph dynamo hands a backend)
      -> detect (:func:`lcpass.patterns.canonicalize`: canonical sites)
      -> compile_sites (this module): the plan for the sites, built and validated once; the model
         rewrites the plan's method records ask for (a RoPE base); one state namespace for the sites'
         dynamic methods; each site lowered to ``lcpass.planned_attention`` (or, on the transformers
         route, the spec each site's runtime runs); tensor KV caches the graph returns bounded
      -> the door's packaging (:class:`lcpass.OptimizedModule`, a transformers model with its attention
         switched, an ``ExportedProgram`` / ONNX file, Inductor's compiled graph)

``lcpass.optimize`` (both routes), ``torch.compile(backend="lcpass")`` and ``lcpass.export`` (and the
CLI, which calls them) all go through :func:`compile_sites`, so a fix in a stage reaches every door.

Example::

    >>> cap, det = lcpass.inspect.detect(model, (x,))[0]
    >>> low = compile_sites(cap.gm, det.sites, Plan.request("streaming", None, {"window": 64}, door="me"))
    >>> low.lowering
    {'attn': 'sparse'}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch.fx import GraphModule

from lcpass.kv.functional import bound_cache_appends
from lcpass.lower import is_dense_spec, lower_graph, seed_site_states, spec_json
from lcpass.patterns import Site
from lcpass.plan import ModelFingerprint, Plan, PlanRequest
from lcpass.rope import apply_plan_rope

__all__ = ["Lowered", "compile_sites", "ROUTES"]

ROUTES = ("graph", "model")


@dataclass
class Lowered:
    """What :func:`compile_sites` did."""

    plan: Plan  # the validated plan the sites run
    sites: list[Site]
    state: str  # the namespace of the sites' dynamic-method states (:func:`lcpass.lower.site_state`)
    lowering: dict[str, str] = field(default_factory=dict)  # graph route: site -> dense | sparse | dense-masked
    specs: dict[str, str] = field(default_factory=dict)  # site -> the spec JSON its op / runtime runs
    dense: dict[str, bool] = field(default_factory=dict)  # site -> every head dense (the exact op kept)
    kv_bounds: list[tuple[str, int, int]] = field(default_factory=list)  # (site, sink, recent) appends bounded


def compile_sites(gm: Optional[GraphModule], sites: Sequence[Site], plan: Union[Plan, PlanRequest], *,
                  route: str = "graph", dense_below: Optional[int] = None, backend: str = "auto",
                  fingerprint: Optional[ModelFingerprint] = None, rope_target: Optional[torch.nn.Module] = None,
                  model_name: str = "", inputs: Optional[Sequence[Any]] = None, rope_if_found: bool = False,
                  bound_caches: bool = False, state: Optional[str] = None) -> Lowered:
    """Plan, rewrite and lower the detected ``sites`` of ``gm``.

    Args:
        gm: the captured graph (``route="graph"``: rewritten in place; may be None on the model route).
        sites: the detected sites (:class:`lcpass.patterns.Site`).
        plan: a :class:`PlanRequest` from :meth:`Plan.request` (built for these sites here, and validated
            against ``fingerprint`` when given: a calibrated plan refuses other weights by name), or a
            :class:`Plan` already made for them.
        route: ``"graph"`` lowers ``gm``; ``"model"`` leaves it alone and returns each site's spec (the
            transformers door installs them as site runtimes).
        dense_below, backend: baked into each site's spec (as in :func:`lcpass.optimize`).
        rope_target: the module whose rotary embedding a method's ``rope_base`` rewrites (default ``gm``).
        inputs: the graph's example inputs (so lifted ``inv_freq`` placeholders are found).
        rope_if_found: a target without rotary tables is left alone instead of refused (a graph dynamo
            split off the model).
        bound_caches: bound the tensor KV caches the graph returns (:mod:`lcpass.kv.functional`).
        state: the dynamic-method state namespace the ops read; None (default): a fresh one seeded with
            the sites' layer order (:func:`lcpass.lower.seed_site_states`); ``""``: the shared unseeded
            one ``site_state(site)`` addresses (``lcpass.export``: a state loaded there is what the
            exported ops see).
    """
    if route not in ROUTES:
        raise ValueError(f"compile_sites: route={route!r}; use one of {ROUTES}")
    if route == "graph" and gm is None:
        raise ValueError("compile_sites: route='graph' needs the captured GraphModule")
    sites = list(sites)
    the_plan = plan.for_sites(fingerprint if fingerprint is not None else sites) \
        if isinstance(plan, PlanRequest) else plan
    if state is None:
        state = seed_site_states([s.name for s in sites])  # this model's (graph's) own dynamic-method states
    apply_plan_rope(rope_target if rope_target is not None else gm, the_plan, sites or None,
                    model_name=model_name, inputs=inputs, only_if_found=rope_if_found)
    out = Lowered(the_plan, sites, state)
    for s in sites:
        specs = the_plan.resolve(s.name, s.n_heads)
        out.dense[s.name] = is_dense_spec(specs)
        out.specs[s.name] = spec_json(specs, dense_below, backend, state=state)
    if route == "graph" and sites:
        out.lowering = dict(lower_graph(gm, sites, the_plan.resolve, dense_below, backend, state))
        if bound_caches:
            out.kv_bounds = bound_cache_appends(gm, sites, the_plan.resolve)
    return out
