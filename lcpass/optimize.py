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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from lcpass import masks as M
from lcpass.capture import CaptureError
from lcpass.found import ALREADY_SPARSE, Coverage, check_all_found, coverage, prefer_static
from lcpass.hf import SiteRuntime, is_transformers_model, uninstall
from lcpass.hf_probe import prove_routes
from lcpass.inspect import ExampleInputs, default_example_inputs, detect, split_inputs
from lcpass.layout import build_layout
from lcpass.lower import BACKENDS, is_dense_spec, site_mask, spec_json
from lcpass.methods import kv_head_policies, spec_parts
from lcpass.patterns import Detection, Site
from lcpass.pipeline import compile_sites
from lcpass.plan import ModelFingerprint, Plan, PlanRequest
from lcpass.verify import verify_model

__all__ = ["optimize", "OptimizedModule", "OptimizeReport", "SiteReport", "BACKENDS", "CAPTURES"]

CAPTURES = ("auto", "fx")


@dataclass(frozen=True)
class SiteReport:
    site: str
    methods: str
    lowering: str  # dense | sparse | dense-masked
    density: float  # fraction of the causal (or full) attention work computed, at report_len
    kv_fraction: float  # fraction of the dense KV cache kept, at report_len
    route: str = "graph"  # how the site is reached: graph (lowered graph) | interface | function


@dataclass
class OptimizeReport:
    """What ``optimize`` did, and the attention work and KV bytes it expects versus dense."""

    model: str
    report_len: int
    sites: list[SiteReport] = field(default_factory=list)
    verify: Optional[dict[str, float]] = None  # site -> max abs error vs the reference (verify=True)
    kv: str = ""  # how the KV cache is handled (transformers door): compressed | own cache (why) | off (why)
    probe_error: Optional[float] = None  # max abs output change of the route probe (crossover disabled)

    @property
    def routes(self) -> dict[str, str]:
        """site -> route: ``graph`` (the lowered graph), ``interface`` (transformers' attention interface)
        or ``function`` (the site's own SDPA / softmax call, :mod:`lcpass.hf_inline`)."""
        return {s.site: s.route for s in self.sites}

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
                "kv": self.kv, "probe_error": self.probe_error, "sites": [s.__dict__ for s in self.sites]}

    def print(self, file=None) -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"lcpass.optimize({self.model}): {self.rewritten}/{len(self.sites)} sites rewritten; "
                        f"at {self.report_len} tokens attention work x{self.attention_flops_ratio:.3f}, "
                        f"KV bytes x{self.kv_bytes_ratio:.3f} of dense")
        for col in ("site", "methods", "route", "lowering", "attention work", "KV kept"):
            t.add_column(col)
        for s in self.sites:
            t.add_row(s.site, s.methods, s.route, s.lowering, f"{s.density:.3f}", f"{s.kv_fraction:.3f}")
        console = Console(file=file, width=150)
        console.print(t)
        if self.kv:
            console.print(f"KV cache: {self.kv}")


class OptimizedModule(torch.nn.Module):
    """A plain module whose attention sites were lowered; same forward arguments as the original."""

    def __init__(self, original: torch.nn.Module, gm: torch.fx.GraphModule, route: str, report: OptimizeReport,
                 example_inputs: ExampleInputs = None):
        super().__init__()
        self.graph_module = gm
        self.lcpass_report = report
        self._route = route
        self._signature = _inspect.signature(original.forward)
        self._original_type = type(original).__name__
        self._captured: Optional[tuple[str, tuple[str, ...]]] = None  # ("args" | "kwargs", parameter names)
        params = [p for p in self._signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if isinstance(example_inputs, dict):
            self._captured = ("kwargs", tuple(example_inputs))
        elif isinstance(example_inputs, (tuple, list)) and len(example_inputs) <= len(params):
            self._captured = ("args", tuple(p.name for p in params[:len(example_inputs)]))
        # per graph input: (name, sizes with None where symbolic), None for a non-tensor input
        self._static: list[tuple[str, Optional[tuple]]] = [
            (n.name, tuple(d if isinstance(d, int) else None for d in n.meta["val"].shape)
             if isinstance(n.meta.get("val"), torch.Tensor) else None)
            for n in gm.graph.find_nodes(op="placeholder")]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._route == "fx":
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return self.graph_module(*bound.arguments.values())
        call_args, call_kwargs = args, kwargs
        if self._captured is not None:
            # an exported graph takes its inputs in the form it was captured with (positional or by
            # name): a caller may pass them either way, as to the original module
            bound = self._signature.bind(*args, **kwargs)
            form, names = self._captured
            if set(bound.arguments) <= set(names):
                if form == "kwargs":
                    call_args, call_kwargs = (), dict(bound.arguments)
                elif list(bound.arguments) == list(names)[:len(bound.arguments)]:
                    call_args, call_kwargs = tuple(bound.arguments.values()), {}
        self._check_static_sizes(call_args, call_kwargs)
        return self.graph_module(*call_args, **call_kwargs)

    def _check_static_sizes(self, args: tuple, kwargs: dict) -> None:
        """ValueError naming the input and dimension where a call's shape differs from a size the exported
        graph holds as a constant (torch.export specialised it, e.g. a batch of 1), before the graph's own
        guard fails with an assertion."""
        static = self._static
        if not static:
            return
        spec = getattr(self.graph_module, "_in_spec", None)
        order = spec.child(1).context if spec is not None and spec.num_children == 2 else sorted(kwargs)
        if set(order) != set(kwargs):
            return  # the graph module reports a different set of inputs itself
        leaves = torch.utils._pytree.tree_leaves((args, {k: kwargs[k] for k in order}))
        if len(leaves) != len(static):
            return
        for leaf, (name, sizes) in zip(leaves, static):
            if not isinstance(leaf, torch.Tensor) or sizes is None:
                continue
            if leaf.dim() != len(sizes):
                raise ValueError(f"optimized {self._original_type}: input {name!r} has {leaf.dim()} dims, the "
                                 f"captured graph takes {len(sizes)}; call it as the example was called")
            for dim, (want, got) in enumerate(zip(sizes, leaf.shape)):
                if want is not None and want != got:
                    raise ValueError(
                        f"optimized {self._original_type}: input {name!r} has size {got} at dim {dim}, where "
                        f"the captured graph is specialised to the example's {want} (torch.export could not "
                        f"keep that size symbolic for this model); call it with size {want} there, or optimize "
                        f"again with example inputs of the shapes you run (a size of 1 is always specialised)")

    def extra_repr(self) -> str:
        return f"optimized {self._original_type} ({self.lcpass_report.rewritten} sites rewritten)"


def _kwargs_of(example_inputs: ExampleInputs) -> dict[str, Any]:
    if isinstance(example_inputs, dict):
        return dict(example_inputs)
    raise ValueError("lcpass.optimize: a transformers model needs example_inputs as keyword arguments "
                     "(e.g. {'input_ids': ids}), or none (32 token ids are made up)")


def _methods_label(specs: Sequence[Any]) -> str:
    from collections import Counter

    counts = Counter(spec_parts(s)[0] for s in specs)
    return ", ".join(f"{name}x{n}" if len(counts) > 1 else name for name, n in counts.items())


def _site_report(site: Site, specs: Sequence[Any], lowering: str, n: int) -> SiteReport:
    if is_dense_spec(specs):
        return SiteReport(site.name, _methods_label(specs), "dense", 1.0, 1.0)
    spec = spec_json(specs)
    mask = site_mask(spec, site.n_heads, n, n, site.is_causal, site.window, site.chunk)
    lay = build_layout(mask, site.n_heads, n, n)
    base = build_layout(_dense_mask(site), site.n_heads, n, n)
    computed = float((lay.kv_num_blocks.sum() + lay.full_kv_num_blocks.sum()).item())
    total = float((base.kv_num_blocks.sum() + base.full_kv_num_blocks.sum()).item())
    pols = kv_head_policies(list(specs), site.n_heads, site.n_kv_heads, n)
    kv = sum(p.kept(n) for p in pols) / (len(pols) * n)
    return SiteReport(site.name, _methods_label(specs), lowering, computed / max(total, 1.0), kv)


def _dense_mask(site: Site):
    parts = []
    if site.is_causal:
        parts.append(M.causal_mask())
    if site.window >= 0:
        parts.append(M.sliding_window_mask(site.window))
    if site.chunk >= 1:
        parts.append(M.block_diagonal_mask(site.chunk))
    return M.and_masks(*parts) if len(parts) > 1 else (parts[0] if parts else M.full_mask())


def optimize(
    model: torch.nn.Module,
    method: Optional[str] = None,
    plan: Union[Plan, PlanRequest, str, Path, None] = None,
    backend: str = "auto",
    example_inputs: ExampleInputs = None,
    *,
    dense_below: Optional[int] = None,
    verify: bool = False,
    report: bool = False,
    report_len: int = 8192,
    strict: bool = True,
    capture: str = "auto",
    **params: Any,
) -> torch.nn.Module:
    """Return ``model`` with every detected attention site running its planned method.

    Args:
        model: a transformers model (returned as the same object, attention switched in place) or any
            nn.Module (returned as an :class:`OptimizedModule` with the same forward arguments).
        method: a method name from ``lcpass methods`` applied to every head of every site, with
            ``**params`` (e.g. ``sink=4, window=1024``). Mutually exclusive with ``plan``.
        plan: a :class:`~lcpass.plan.Plan`, the path of a plan JSON file, or a checked
            :class:`~lcpass.plan.PlanRequest` (``Plan.request(...)``). The plan the model runs is
            ``result.lcpass_plan``.
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
        strict: refuse a model in which the eager forward computes more attention
            than detection found (:class:`lcpass.UnsupportedModelError` with each unrecognised softmax's
            reason): the plan would silently not apply there. ``strict=False`` optimizes the sites found
            and leaves the others running the model's own attention (a warning names them).
        capture: (plain modules) ``"auto"``: torch.export with a symbolic sequence length where it can,
            else the example's shapes, else torch.fx; ``"fx"``: torch.fx only, so every shape stays
            symbolic and one graph serves prefill and decode of a model that carries its KV cache as
            tensors (``forward(x, pos, past_k, past_v)``; the returned caches are bounded to what the plan
            keeps, listed in ``result.lcpass_kv_bounds``; positions must come from an input).

    Example::

        >>> m = lcpass.optimize(model, method="streaming", sink=4, window=1024)
        >>> type(m) is type(model)
        True
    """
    if backend not in BACKENDS:
        raise ValueError(f"lcpass.optimize: backend={backend!r}; use one of {BACKENDS}")
    if capture not in CAPTURES:
        raise ValueError(f"lcpass.optimize: capture={capture!r}; use one of {CAPTURES}")
    request = Plan.request(method, plan, params, door="lcpass.optimize")  # bad arguments fail before capture
    hf = is_transformers_model(model)
    if hf and capture != "auto":
        raise ValueError(f"lcpass.optimize: capture={capture!r} is for plain modules; a transformers model "
                         "keeps its own cache objects (leave capture='auto')")
    if hf:
        uninstall(model)  # optimizing an optimized model starts from the model's own attention
        if example_inputs is None:
            example_inputs = default_example_inputs(model)
        found = detect(model, example_inputs)
    else:  # the lowered graph must run at other lengths: a symbolic sequence dim where export allows one
        found = None
        # the sequence is the first tensor input's dim 1 ([B, S, C]) or a later one ([B, C, S] conv layouts)
        ex_args, ex_kwargs = split_inputs(example_inputs, model)
        first = next((x for x in (*ex_args, *ex_kwargs.values()) if isinstance(x, torch.Tensor)), None)
        axes = range(1, first.dim()) if first is not None and first.dim() > 1 else [1]
        tries = ({"route": "fx"},) if capture == "fx" else \
            (*({"dynamic_seq": True, "seq_dim": d} for d in axes), {}, {"route": "fx"})
        for how in tries:
            try:
                found = detect(model, example_inputs, fallback=False, **how)
                break
            except CaptureError as exc:
                error = exc
        if found is None:
            raise error
        cov = coverage(model, ex_kwargs, found[0][1], ex_args)
        if how.get("dynamic_seq"):
            def static():
                return detect(model, example_inputs, fallback=False)[0]
            cap, det, specialised = prefer_static("lcpass.optimize", model, found[0], cov, static,
                                                  "the optimized module is specialised to the example's shapes")
            found = [(cap, det)]
            if specialised:
                cov = Coverage.of(cov.calls, det)
    cap, det = found[0]
    if hf and len(found) > 1:  # dynamo's graphs (export failed): the sites of all of them
        det = Detection(det.gm, [s for _, d in found for s in d.sites], [r for _, d in found for r in d.rejected])
    name = type(model).__name__
    if hf:
        check_all_found(model, _kwargs_of(example_inputs), det, strict)
    else:
        check_all_found(model, ex_kwargs, det, strict, cov=cov)
    if not det.sites:
        what = ("only attention it already computes sparsely" if any(
            r.reason.startswith(ALREADY_SPARSE) for r in det.rejected) else "no attention")
        warnings.warn(f"lcpass.optimize: {what} found in {name}; returning it unchanged", stacklevel=2)
        if hf:
            model.lcpass_plan = None  # uninstalled above: no plan runs
        return model
    weighed = request.plan is not None and getattr(request.plan.fingerprint, "weights", None)
    # the one pipeline: plan (a calibrated plan names the weights it was measured on: other weights are
    # refused by name), the plan's model rewrites (the model in place for transformers, else the graph),
    # then the graph lowered, or the transformers sites' runtime specs
    low = compile_sites(None if hf else cap.gm, det.sites, request, route="model" if hf else "graph",
                        dense_below=dense_below, backend=backend,
                        fingerprint=ModelFingerprint.of_model(model, det.sites) if weighed else None,
                        rope_target=model if hf else cap.gm, model_name=name, bound_caches=not hf)
    the_plan = low.plan
    rep = OptimizeReport(name, report_len)
    if hf:
        runtimes = {s.name: SiteRuntime(s.name, low.specs[s.name], low.dense[s.name], s.is_causal, s.window,
                                        s.scale, s.softcap, s.mask, chunk=s.chunk) for s in det.sites}
        proven = prove_routes(model, det.sites, runtimes, _kwargs_of(example_inputs))
        rep.kv, rep.probe_error = proven.kv, proven.error
        kv_kept = proven.kv.startswith("compressed")
        for s in det.sites:
            specs = the_plan.resolve(s.name, s.n_heads)
            route = proven.routes[s.name]
            if low.dense[s.name]:
                lowering = "dense"
            elif s.mask.split("+")[-1] == "bias" or (route == "function" and s.anchor == "softmax"):
                lowering = "dense-masked"
            else:
                lowering = "sparse"
            row = _site_report(s, specs, lowering, report_len)
            whole = not kv_kept or s.name not in proven.bound_sites
            rep.sites.append(replace(row, route=route, kv_fraction=1.0 if whole else row.kv_fraction))
        model.lcpass_report = rep
        model.lcpass_plan = the_plan
        out: torch.nn.Module = model
    else:
        for s in det.sites:
            rep.sites.append(_site_report(s, the_plan.resolve(s.name, s.n_heads), low.lowering[s.name],
                                          report_len))
        out = OptimizedModule(model, cap.gm, cap.route, rep, example_inputs)
        out.lcpass_plan = the_plan
        out.lcpass_kv_bounds = low.kv_bounds  # (site, sink, recent) of the tensor KV caches forward returns
    if verify:
        # the inputs detection ran on: the captured keyword arguments (a transformers model's default ids),
        # else the caller's example inputs as given (positional ones included)
        args = found[0][0].extra.get("kwargs") if found[0][0].route == "export" else None
        rep.verify = verify_model(out, args if args else example_inputs)
    if report:
        rep.print()
    return out
