"""``lcpass.optimize``: one call from a model to a model whose attention runs its planned method.

Pipeline: capture (torch.export) -> detect (canonical sites) -> plan (a method name + params, a Plan,
or a plan file) -> validate -> lower. A transformers model is returned as the same object (class,
config, ``generate()``, ``save_pretrained()`` intact) with its sites switched to the lcpass attention;
any other module comes back as an :class:`OptimizedModule` whose forward takes the same arguments and
runs the lowered graph.

Example::

    >>> model = lcpass.optimize(model, method="streaming", sink=4, window=1024)
    >>> model.generate(ids, max_new_tokens=32)          # still a LlamaForCausalLM
    >>> lcpass.optimize(model, plan="plan.json", report=True).lcpass_report.print()
"""
from __future__ import annotations

import inspect as _inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from lcpass.capture import CaptureError
from lcpass.hf import SiteRuntime, install, is_transformers_model
from lcpass.inspect import ExampleInputs, detect
from lcpass.lower import BACKENDS, is_dense_spec, lower_graph, seed_site_states, spec_json
from lcpass.patterns import Site
from lcpass.plan import Plan

__all__ = ["optimize", "OptimizedModule", "OptimizeReport", "SiteReport", "BACKENDS"]


@dataclass(frozen=True)
class SiteReport:
    site: str
    methods: str
    lowering: str  # dense | sparse | dense-masked
    density: float  # fraction of the causal (or full) attention work computed, at report_len
    kv_fraction: float  # fraction of the dense KV cache kept, at report_len


@dataclass
class OptimizeReport:
    """What ``optimize`` did, and the attention work and KV bytes it expects versus dense."""

    model: str
    report_len: int
    sites: list[SiteReport] = field(default_factory=list)
    verify: Optional[dict[str, float]] = None  # site -> max abs error vs the reference (verify=True)

    @property
    def rewritten(self) -> int:
        return sum(1 for s in self.sites if s.lowering != "dense")

    @property
    def attention_flops_ratio(self) -> float:
        return sum(s.density for s in self.sites) / max(len(self.sites), 1)

    @property
    def kv_bytes_ratio(self) -> float:
        return sum(s.kv_fraction for s in self.sites) / max(len(self.sites), 1)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "report_len": self.report_len, "rewritten": self.rewritten,
                "attention_flops_ratio": self.attention_flops_ratio, "kv_bytes_ratio": self.kv_bytes_ratio,
                "sites": [s.__dict__ for s in self.sites]}

    def print(self, file=None) -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"lcpass.optimize({self.model}): {self.rewritten}/{len(self.sites)} sites rewritten; "
                        f"at {self.report_len} tokens attention work x{self.attention_flops_ratio:.3f}, "
                        f"KV bytes x{self.kv_bytes_ratio:.3f} of dense")
        for col in ("site", "methods", "lowering", "attention work", "KV kept"):
            t.add_column(col)
        for s in self.sites:
            t.add_row(s.site, s.methods, s.lowering, f"{s.density:.3f}", f"{s.kv_fraction:.3f}")
        Console(file=file, width=150).print(t)


class OptimizedModule(torch.nn.Module):
    """A plain module whose attention sites were lowered; same forward arguments as the original."""

    def __init__(self, original: torch.nn.Module, gm: torch.fx.GraphModule, route: str, report: OptimizeReport):
        super().__init__()
        self.graph_module = gm
        self.lcpass_report = report
        self._route = route
        self._signature = _inspect.signature(original.forward)
        self._original_type = type(original).__name__

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._route == "fx":
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return self.graph_module(*bound.arguments.values())
        return self.graph_module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"optimized {self._original_type} ({self.lcpass_report.rewritten} sites rewritten)"


def _load_plan(plan: Union[Plan, str, Path, None]) -> Optional[Plan]:
    if plan is None or isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, Path)):
        return Plan.load(plan)
    raise TypeError(f"lcpass.optimize: plan must be a Plan or a path to a plan JSON file, not {type(plan).__name__}")


def _methods_label(specs: Sequence[Any]) -> str:
    from collections import Counter

    from lcpass.methods import spec_parts

    counts = Counter(spec_parts(s)[0] for s in specs)
    return ", ".join(f"{name}x{n}" if len(counts) > 1 else name for name, n in counts.items())


def _site_report(site: Site, specs: Sequence[Any], lowering: str, n: int) -> SiteReport:
    from lcpass.layout import build_layout
    from lcpass.lower import site_mask
    from lcpass.methods import kv_head_policies

    if is_dense_spec(specs):
        return SiteReport(site.name, _methods_label(specs), "dense", 1.0, 1.0)
    spec = spec_json(specs)
    mask = site_mask(spec, site.n_heads, n, n, site.is_causal, site.window)
    lay = build_layout(mask, site.n_heads, n, n)
    base = build_layout(_dense_mask(site), site.n_heads, n, n)
    computed = float((lay.kv_num_blocks.sum() + lay.full_kv_num_blocks.sum()).item())
    total = float((base.kv_num_blocks.sum() + base.full_kv_num_blocks.sum()).item())
    pols = kv_head_policies(list(specs), site.n_heads, site.n_kv_heads, n)
    kv = sum(p.kept(n) for p in pols) / (len(pols) * n)
    return SiteReport(site.name, _methods_label(specs), lowering, computed / max(total, 1.0), kv)


def _dense_mask(site: Site):
    from lcpass import masks as M

    parts = []
    if site.is_causal:
        parts.append(M.causal_mask())
    if site.window >= 0:
        parts.append(M.sliding_window_mask(site.window))
    return M.and_masks(*parts) if len(parts) > 1 else (parts[0] if parts else M.full_mask())


def optimize(
    model: torch.nn.Module,
    method: Optional[str] = None,
    plan: Union[Plan, str, Path, None] = None,
    backend: str = "auto",
    example_inputs: ExampleInputs = None,
    *,
    dense_below: Optional[int] = None,
    verify: bool = False,
    report: bool = False,
    report_len: int = 8192,
    **params: Any,
) -> torch.nn.Module:
    """Return ``model`` with every detected attention site running its planned method.

    Args:
        model: a transformers model (returned as the same object, attention switched in place) or any
            nn.Module (returned as an :class:`OptimizedModule` with the same forward arguments).
        method: a method name from ``lcpass methods`` applied to every head of every site, with
            ``**params`` (e.g. ``sink=4, window=1024``). Mutually exclusive with ``plan``.
        plan: a :class:`~lcpass.plan.Plan` or the path of a plan JSON file.
        backend: ``"auto"`` (generated Triton kernels for CUDA tensors, the CPU block-sparse engine
            otherwise), ``"cpu"`` or ``"triton"`` (a spec the kernels cannot express falls back to the
            CPU engine with a warning, never a wrong result).
        example_inputs: inputs used to capture and detect (default for transformers models: 32 token ids).
        dense_below: run dense below this key length instead of each method's own crossover.
        verify: run each rewritten site once against the reference on the example inputs; the max
            error per site lands in ``result.lcpass_report.verify`` and sites over their method's bound
            are reported by name (a warning).
        report: print the report (it is always available as ``result.lcpass_report``).
        report_len: sequence length at which the report's expected work and KV bytes are computed.

    Example::

        >>> m = lcpass.optimize(model, method="streaming", sink=4, window=1024)
        >>> type(m) is type(model)
        True
    """
    if backend not in BACKENDS:
        raise ValueError(f"lcpass.optimize: backend={backend!r}; use one of {BACKENDS}")
    if (method is None) == (plan is None):
        raise ValueError("lcpass.optimize: pass exactly one of method='name' (see `lcpass methods`) or plan=...")
    if method is not None:
        from lcpass.methods import get_method, resolve_params

        resolve_params(get_method(method), params)  # unknown method / bad params fail before capture
    elif params:
        raise ValueError(f"lcpass.optimize: parameters {sorted(params)} go with method=..., not with plan=")
    the_plan = _load_plan(plan)
    hf = is_transformers_model(model)
    if hf:
        found = detect(model, example_inputs)
    else:  # the lowered graph must run at other lengths: a symbolic sequence dim where export allows one
        found = None
        for kwargs in ({"dynamic_seq": True}, {}, {"route": "fx"}):
            try:
                found = detect(model, example_inputs, **kwargs)
                break
            except CaptureError as exc:
                error = exc
        if found is None:
            raise error
    cap, det = found[0]
    name = type(model).__name__
    if not det.sites:
        warnings.warn(f"lcpass.optimize: no attention found in {name}; returning it unchanged", stacklevel=2)
        return model
    if the_plan is None:
        the_plan = Plan.uniform(det.sites, method, **params)
    if the_plan.fingerprint is not None and getattr(the_plan.fingerprint, "weights", None):
        from lcpass.plan import ModelFingerprint

        # a calibrated plan names the weights it was measured on: refuse other weights by name
        the_plan.validate(ModelFingerprint.of_model(model, det.sites))
    else:
        the_plan.validate(det.sites)
    seed_site_states([s.name for s in det.sites])
    from lcpass.rope import apply_entropy_abf

    # entropy_abf's other half: the RoPE base (the model in place for transformers, else the graph)
    apply_entropy_abf(model if hf else cap.gm, the_plan, det.sites, model_name=name)
    rep = OptimizeReport(name, report_len)
    if hf:
        runtimes = {}
        for s in det.sites:
            specs = the_plan.resolve(s.name, s.n_heads)
            dense = is_dense_spec(specs)
            runtimes[s.name] = SiteRuntime(s.name, spec_json(specs, dense_below, backend), dense, s.is_causal,
                                           s.window, s.scale, s.softcap, s.mask)
            lowering = "dense" if dense else ("sparse" if s.mask.split("+")[-1] != "bias" else "dense-masked")
            rep.sites.append(_site_report(s, specs, lowering, report_len))
        install(model, runtimes)
        model.lcpass_report = rep
        out: torch.nn.Module = model
    else:
        lowered = dict(lower_graph(cap.gm, det.sites, the_plan.resolve, dense_below, backend))
        from lcpass.kv.functional import bound_cache_appends

        bound_cache_appends(cap.gm, det.sites, the_plan.resolve)  # tensor KV caches returned by forward
        for s in det.sites:
            rep.sites.append(_site_report(s, the_plan.resolve(s.name, s.n_heads), lowered[s.name], report_len))
        out = OptimizedModule(model, cap.gm, cap.route, rep)
    if verify:
        from lcpass.verify import verify_model

        args = found[0][0].extra.get("kwargs") if found[0][0].route == "export" else None
        rep.verify = verify_model(out, args if args is not None else example_inputs)
    if report:
        rep.print()
    return out
