"""Method specs for the quality harness, and the ONE function that applies a method to a model.

A method spec is a string:

    dense                                   the unmodified model (the reference)
    streaming | streaming:window=256,sink=4 any registered method, uniform over all heads, with params
    duo | duo:ratio=0.25,sink=64,recent=256 DuoAttention with retrieval heads from calibration
    duo-opt:ratio=0.5,steps=8               DuoAttention with heads from the gate optimisation
    duo-random:ratio=0.5,seed=0             the same number of retrieval heads, chosen at random
    razor:ratio=0.25,compression=8          RazorAttention (ratio = head share, compression = its C)
    moa:density=0.5                         MoA windows profiled for a target density
    path/to/plan.json                        a saved plan (refused when made for another model)

`apply_method(model, plan)` returns the model to evaluate: the model itself for dense (no plan), else a
fresh deep copy optimized with ``lcpass.optimize(copy, plan=plan)``.

Example:
    >>> spec = parse_method("streaming:window=256")
    >>> spec.method, spec.params
    ('streaming', {'window': 256})
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import lcpass
from lcpass.methods import get_method, resolve_params
from lcpass.plan import Plan, SiteInfo

__all__ = ["MethodSpec", "parse_method", "build_plan", "apply_method", "CALIBRATED"]

CALIBRATED = ("duo", "duo-opt", "duo-random", "razor", "moa")
_CAL_KEYS = {"ratio", "density", "steps", "seed", "mode"}


@dataclass
class MethodSpec:
    """A parsed method spec: `label` (as given), `method` (registry name or calibrated variant),
    `params`, or `plan_path` for a plan file."""

    label: str
    method: str = "dense"
    params: dict[str, Any] = field(default_factory=dict)
    plan_path: str | None = None


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_method(text: str) -> MethodSpec:
    """Parse a method spec string (see the module doc); ValueError naming the bad part."""
    label = text.strip()
    if not label:
        raise ValueError("empty method spec; use e.g. 'dense', 'streaming:window=256' or 'plan.json'")
    if label.endswith(".json") or "/" in label:
        return MethodSpec(label, "plan", {}, label)
    name, _, rest = label.partition(":")
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method spec {label!r}: parameter {part!r} is not key=value")
        params[key.strip()] = _value(val.strip())
    if name not in CALIBRATED:
        resolve_params(get_method(name), params)  # unknown method or bad params -> ValueError
    return MethodSpec(label, name, params)


def build_plan(
    spec: MethodSpec,
    model: nn.Module,
    sites: list[SiteInfo],
    tokenizer: Any = None,
    calibration: dict[str, Any] | None = None,
    progress: bool = True,
) -> Plan | None:
    """The plan `spec` stands for on `model` (None for dense). Calibrated methods run `lcpass.calibrate`
    (settings from `calibration`, e.g. lengths/depths); plan files are loaded and checked against the model."""
    from lcpass.calibration import (  # lazy: lcpass.calibration imports lcpass.quality.prompts (this package)
        calibrate, check_plan, model_fingerprint, random_duo_plan)

    if spec.method == "dense":
        return None
    if spec.method == "plan":
        plan = Plan.load(spec.plan_path or spec.label)
        check_plan(plan, model, sites)
        return plan
    cal = dict(calibration or {})
    p = dict(spec.params)
    if spec.method in CALIBRATED:
        ratio = float(p.pop("ratio", cal.pop("retrieval_ratio", 0.5)))
        seed = int(p.pop("seed", 0))
        if spec.method == "duo-random":
            fp = model_fingerprint(model, sites)
            return random_duo_plan(sites, ratio, sink=int(p.pop("sink", 64)), recent=int(p.pop("recent", 256)),
                                   seed=seed, fingerprint=fp)
        method = "duo" if spec.method.startswith("duo") else spec.method
        mode = "optimize" if spec.method == "duo-opt" else p.pop("mode", "score")
        kwargs: dict[str, Any] = {**cal, "mode": mode, "seed": seed, "progress": progress}
        if "steps" in p:
            kwargs["steps"] = int(p.pop("steps"))
        if "density" in p:
            kwargs["density"] = float(p.pop("density"))
        if method == "duo":
            kwargs.update({k: int(p.pop(k)) for k in ("sink", "recent") if k in p})
        elif method == "moa":
            kwargs.update({k: int(p.pop(k)) for k in ("sink",) if k in p})
        else:  # razor: its own compression ratio C is spelled `compression` (`ratio` is the head share)
            if "compression" in p:
                p["ratio"] = p.pop("compression")
            kwargs["razor_params"] = {**kwargs.get("razor_params", {}), **p}
            p = {}
        if p:
            raise ValueError(f"method spec {spec.label!r}: parameters {sorted(p)} are not understood")
        return calibrate(model, method, tokenizer=tokenizer, retrieval_ratio=ratio, **kwargs)  # type: ignore[arg-type]
    plan = Plan.uniform(sites, spec.method, **p)
    return Plan(plan.sites, model_fingerprint(model, sites))


def apply_method(
    model: nn.Module,
    plan: Plan | None,
    *,
    example_inputs: dict[str, Any] | None = None,
    dense_below: int | None = None,
) -> nn.Module:
    """The model to evaluate under `plan`: `model` itself when `plan` is None (dense), otherwise a deep
    copy optimized with ``lcpass.optimize(copy, plan=plan)`` (the original is never modified).

    `dense_below` is handed to optimize: sites run dense below that many keys (None = each method's
    own crossover, as deployed; 0 = always run the method, to measure its effect at short lengths).

    Raises:
        RuntimeError: this lcpass has no ``lcpass.optimize`` yet (then only dense can be evaluated).
    """
    if plan is None:
        return model
    optimize = getattr(lcpass, "optimize", None)
    if optimize is None:
        raise RuntimeError(
            "lcpass.optimize is not available in this build, so only 'dense' can be evaluated; "
            "update lcpass (the optimize entry point lands with lcpass/optimize.py)"
        )
    fresh = copy.deepcopy(model)
    kwargs: dict[str, Any] = {"plan": plan}
    if example_inputs is not None:
        kwargs["example_inputs"] = example_inputs
    if dense_below is not None:
        kwargs["dense_below"] = dense_below
    out = optimize(fresh, **kwargs)
    return fresh if out is None else out


def plan_path_exists(spec: MethodSpec) -> bool:
    """Whether a plan-file spec points at an existing file."""
    return spec.plan_path is not None and Path(spec.plan_path).is_file()
