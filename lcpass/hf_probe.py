"""Proof, on a probe forward, that every planned site of a transformers model runs its plan.

A detected site is only worth rewriting if lcpass can show two things on the model itself:

1. **reached** — the lcpass attention path ran for the site (per-site call counters, :class:`lcpass.hf.SiteHits`),
   and never fell back to the model's own attention for a reason that would drop the plan (learned sinks,
   a dynamic method on scores, ...);
2. **the same model** — with every site's crossover disabled (the planned op then runs its exact
   reference instead of the method) the outputs equal the original model's: the masks, scales, caps and
   head layout the route hands the planned op are the model's own, and switching the implementation did
   not make the model take another branch.

Routes are tried in order until one passes: **interface** for every site (the attention interface,
``config._attn_implementation`` renamed to ``lcpass_*``); interface plus the **function** route
(:mod:`lcpass.hf_inline`) for the sites the interface never reached; the function route for every site
with the model's implementation name kept (models such as Falcon branch on that name). When none passes,
:class:`lcpass.UnsupportedModelError` names the sites and the evidence. Then the cache is probed: a
prefill and one decode step with the compressed cache; layers no route can see stay whole, and a model
whose cache cannot be compressed keeps its own (the report says so).

Example::

    >>> routes = prove_routes(model, sites, runtimes, inputs)      # done by lcpass.optimize
    >>> routes.routes["transformer.h.0.self_attention"]
    'function'
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch

from lcpass.capture import hf_defaults
from lcpass.errors import UnsupportedModelError
from lcpass.hf import (FALLBACK_OK, SiteRuntime, cache_kwarg, hits_of, install, kv_options, module_of, new_cache,
                       reset_hits, set_kv_cache, uninstall)
from lcpass.hf_inline import InlineSite, install_inline
from lcpass.kv.cache import CompressedCache
from lcpass.outputs import main_output

__all__ = ["ProvenRoutes", "prove_routes", "probe_tolerance", "PROBE_DENSE_BELOW"]

PROBE_DENSE_BELOW = 1 << 40  # the crossover during the probe: every planned op runs its exact reference


@dataclass
class ProvenRoutes:
    """What the probe established: each site's route, and how the KV cache is handled."""

    routes: dict[str, str] = field(default_factory=dict)  # site -> interface | function
    error: float = 0.0  # max abs output difference of the probe (crossover disabled)
    kv: str = "compressed"  # compressed | own cache (reason) | off (reason)
    plain_layers: frozenset = frozenset()
    bound_sites: frozenset = frozenset()  # sites whose KV the compressed cache holds as their plan says
    attempts: list[str] = field(default_factory=list)  # why earlier routes were not taken


def probe_tolerance(out: torch.Tensor) -> float:
    """Max abs difference allowed between the model and its probe run (the planned op's exact reference is
    computed with other kernels than the model's own attention: rounding, not meaning)."""
    base = 1e-4 if out.dtype in (torch.float32, torch.float64) else 3e-2
    return base * (1.0 + float(out.detach().abs().max()) if out.numel() else 1.0)


def _with_dense_below(rt: SiteRuntime, dense_below: int) -> SiteRuntime:
    if rt.dense:
        return rt
    data = json.loads(rt.spec)
    data["dense_below"] = dense_below
    return replace(rt, spec=json.dumps(data, sort_keys=True, separators=(",", ":")))


def _forward(model: torch.nn.Module, inputs: dict[str, Any], **extra: Any) -> Any:
    kwargs = hf_defaults(model, dict(inputs))
    kwargs.update(extra)
    with torch.no_grad():
        return model(**kwargs)


def _by_module(runtimes: dict[str, SiteRuntime]) -> dict[str, list[SiteRuntime]]:
    out: dict[str, list[SiteRuntime]] = defaultdict(list)
    for name in sorted(runtimes, key=lambda n: (module_of(n), int(n.split("#")[1]) if "#" in n else 0)):
        out[module_of(name)].append(runtimes[name])
    return dict(out)


def _install_routes(model: torch.nn.Module, sites: Sequence[Any], runtimes: dict[str, SiteRuntime],
                    routes: dict[str, str], rename: bool) -> None:
    uninstall(model)
    routed = {name: replace(rt, route=routes[name]) for name, rt in runtimes.items()}
    grouped = _by_module(routed)
    install(model, grouped, rename=rename)
    by_name = {s.name: s for s in sites}
    inline: dict[str, list[tuple[int, InlineSite]]] = defaultdict(list)
    heads: dict[str, dict[int, int]] = defaultdict(dict)
    for path, rts in grouped.items():
        for i, rt in enumerate(rts):
            if rt.route == "function":
                s = by_name[rt.site]
                inline[path].append((i, InlineSite(rt, s.anchor, s.anchor_index)))
                heads[path][i] = s.n_heads
    if inline:
        install_inline(model, dict(inline), dict(heads))


def _hits(model: torch.nn.Module, runtimes: dict[str, SiteRuntime]) -> dict[str, Any]:
    out = {}
    for path, rts in _by_module(runtimes).items():
        hits = hits_of(model.get_submodule(path))
        for rt, h in zip(rts, hits):
            out[rt.site] = h
    return out


def _attempt(model, sites, runtimes, routes, rename, inputs, ref) -> tuple[Optional[str], dict, float]:
    """Install ``routes`` with the crossover disabled, run the probe; (failure or None, hits, error)."""
    probe = {n: _with_dense_below(rt, PROBE_DENSE_BELOW) for n, rt in runtimes.items()}
    _install_routes(model, sites, probe, routes, rename)
    reset_hits(model)
    try:
        out = main_output(_forward(model, inputs))
    except Exception as exc:  # noqa: BLE001 - a route under which the model fails is not taken
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the forward raised {type(exc).__name__}: {text[:200]}", _hits(model, runtimes), float("inf")
    hits = _hits(model, runtimes)
    err = float((out.float() - ref.float()).abs().max()) if out.shape == ref.shape else float("inf")
    unreached = [n for n, h in hits.items() if h.calls == 0 and not runtimes[n].dense]  # dense: the model's own
    bad = {n: [w for w in h.fallbacks if w not in FALLBACK_OK] for n, h in hits.items()}
    bad = {n: w for n, w in bad.items() if w}
    if unreached:
        return f"{len(unreached)} site(s) never reached ({_names(unreached)})", hits, err
    if bad:
        name, why = next(iter(bad.items()))
        return f"site {name} ran the model's own attention: {why[0]}", hits, err
    if err > probe_tolerance(ref):
        return f"the outputs changed by {err:.3g} with every method's crossover disabled", hits, err
    return None, hits, err


def _names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def prove_routes(model: torch.nn.Module, sites: Sequence[Any], runtimes: dict[str, SiteRuntime],
                 inputs: dict[str, Any]) -> ProvenRoutes:
    """Choose and prove a route for every site, install the real runtimes on it, probe the cache.

    Raises :class:`lcpass.UnsupportedModelError` when no route passes the probe.
    """
    name = type(model).__name__
    uninstall(model)
    ref = main_output(_forward(model, inputs))
    anchored = {s.name for s in sites if s.anchor in ("sdpa", "softmax") and s.anchor_index >= 0}
    interface = {n: "interface" for n in runtimes}
    attempts: list[tuple[dict[str, str], bool, str]] = [(interface, True, "the attention interface")]
    result = ProvenRoutes()
    chosen_rename = True
    for i, (routes, rename, label) in enumerate(attempts):
        why, hits, err = _attempt(model, sites, runtimes, routes, rename, inputs, ref)
        if why is None:
            result.routes, result.error, chosen_rename = dict(routes), err, rename
            break
        result.attempts.append(f"{label}: {why}")
        if i == 0:
            unreached = {n for n, h in hits.items() if h.calls == 0 and not runtimes[n].dense} & anchored
            if unreached:
                mixed = {n: ("function" if n in unreached else "interface") for n in runtimes}
                attempts.append((mixed, True, "the interface, and the function route where it never reached"))
            if anchored:
                inline = {n: ("function" if n in anchored else "interface") for n in runtimes}
                attempts.append((inline, False, "the function route under the model's own implementation name"))
    else:
        uninstall(model)
        not_anchored = sorted(set(runtimes) - anchored)
        hint = (f"; sites {_names(not_anchored)} have no SDPA or softmax call lcpass can meet at run time"
                if not_anchored else "")
        raise UnsupportedModelError(
            f"lcpass.optimize({name}): cannot show that every planned site runs its plan: "
            f"{'; '.join(result.attempts)}{hint}. Plan those sites 'dense' (Plan.with_site(name, "
            f"HeadSpec('dense'))) or optimize the model through torch.compile(backend='lcpass') / "
            f"lcpass.export, which rewrite the captured graph itself")
    _install_routes(model, sites, runtimes, result.routes, chosen_rename)
    _probe_cache(model, inputs, result)
    return result


def _probe_cache(model: torch.nn.Module, inputs: dict[str, Any], result: ProvenRoutes) -> None:
    """Prefill and one decode step with the compressed cache: cache layers no route bound stay whole; a
    model whose cache the compressed one cannot stand in for keeps its own."""
    opts = kv_options(model)
    if not opts.get("enabled"):
        result.kv = "off"
        return
    cache = new_cache(model)
    if cache is None:
        result.kv = "own cache (the model makes a cache of its own kind; its KV is kept whole)"
        set_kv_cache(model, False, reason=result.kv)
        return
    kwarg = cache_kwarg(model)
    try:
        out = _forward(model, inputs, use_cache=True, **{kwarg: cache})
        compressed = getattr(cache, "self_attention_cache", cache)
        plain = frozenset()
        if isinstance(compressed, CompressedCache):
            plain = frozenset(layer.layer_idx for layer in compressed.compressed_layers() if layer.binding is None)
        if plain:
            set_kv_cache(model, True, select=opts.get("select"), plain_layers=plain)
            cache = new_cache(model)
            out = _forward(model, inputs, use_cache=True, **{kwarg: cache})
        result.plain_layers = plain
        if isinstance(getattr(cache, "self_attention_cache", cache), CompressedCache):
            result.bound_sites = frozenset(
                layer.binding.site for layer in getattr(cache, "self_attention_cache", cache).compressed_layers()
                if layer.binding is not None)
        ids = inputs.get("input_ids")
        if ids is not None and not getattr(model.config, "is_encoder_decoder", False):
            nxt = main_output(out)[:, -1:].argmax(-1)
            step = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            step["input_ids"] = nxt
            if "attention_mask" in inputs:
                mask = inputs["attention_mask"]
                step["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            _forward(model, step, use_cache=True, **{kwarg: cache})
        result.kv = "compressed" if not plain else f"compressed ({len(plain)} layer(s) kept whole: no route sees them)"
    except Exception as exc:  # noqa: BLE001 - the model keeps its own cache, and the report says why
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result.kv = f"off (the model's forward refuses the compressed cache: {type(exc).__name__}: {text[:160]})"
        set_kv_cache(model, False, reason=result.kv)

