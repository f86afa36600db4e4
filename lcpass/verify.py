"""Verify mode: run every planned attention site once against the dense reference.

:func:`verify_model` runs the model once on the example inputs under a ``TorchDispatchMode`` that records
the inputs of the first call of ``torch.ops.lcpass.planned_attention`` per site (whichever door issued it:
the transformers attention hook, a lowered graph, a compiled graph run eagerly). Each recorded call is
then run again through the planned op and through :func:`lcpass.engine.reference_attention` (plain
PyTorch, float32) with the site's mask: the method's mask_mod intersected with the site's own causal /
window, and the key padding read from the mask tensor; below the method's crossover the op is specified
to be exact dense attention, so the reference is the canonical op's. Sites whose error exceeds the
bound for their dtype are reported by name.

Example::

    >>> m = lcpass.optimize(model, method="streaming", sink=4, window=64, dense_below=0)
    >>> rep = verify_model(m, {"input_ids": ids})
    >>> rep                                   # site -> max abs error
    {'model.layers.0.self_attn': 2.4e-07, 'model.layers.1.self_attn': 1.8e-07}
    >>> rep.failed
    []
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lcpass.engine import element_mask, reference_attention
from lcpass.lower import (PLANNED_OP, checked_claim, claim_holds, crossover, lowering_kind, padding_keys,
                          parse_spec, site_mask)
from lcpass.methods import get_method
from lcpass.patterns.maskinfo import NEG_LIMIT
from lcpass.patterns.op import chunk_start, positional_keep, reference

__all__ = ["verify_model", "verify_call", "VerifyReport", "DTYPE_BOUNDS", "record_planned_calls", "specified_output",
           "PLANNED_ARGS"]

# max |planned - reference|, relative to max(1, max |reference|): the engine computes exact attention over
# the blocks it keeps, so what remains is summation order (fp32) or the low-precision output rounding
DTYPE_BOUNDS = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}

PLANNED_ARGS = ("q", "k", "v", "mask", "scale", "is_causal", "window", "softcap", "dropout_p", "site", "mask_kind",
                "spec", "sinks", "chunk")
_ARGS = PLANNED_ARGS


class VerifyReport(dict):
    """site -> max abs error of the planned op against the reference, with the bound per site."""

    def __init__(self, errors: dict[str, float], bounds: dict[str, float],
                 skipped: Optional[dict[str, str]] = None) -> None:
        super().__init__(errors)
        self.bounds = bounds
        self.skipped = dict(skipped or {})  # site -> why it has no reference

    @property
    def failed(self) -> list[str]:
        """Sites whose error exceeds their bound."""
        return [s for s, e in self.items() if not e <= self.bounds[s]]


@dataclass
class _Call:
    args: dict[str, Any]


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, _Call] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is PLANNED_OP:
            values = dict(zip(_ARGS, args))
            values.update(kwargs)
            site = str(values["site"])
            if site not in self.calls:
                self.calls[site] = _Call({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                                          for k, v in values.items()})
        return func(*args, **kwargs)


def record_planned_calls(model: torch.nn.Module, example_inputs: Any) -> dict[str, dict[str, Any]]:
    """The arguments of the first ``planned_attention`` call per site when ``model`` runs the inputs once."""
    rec = _Recorder()
    with torch.no_grad(), rec:
        if isinstance(example_inputs, dict):
            model(**example_inputs)
        elif isinstance(example_inputs, torch.Tensor):
            model(example_inputs)
        else:
            model(*example_inputs)
    return {site: call.args for site, call in rec.calls.items()}


class _NotVerifiable(ValueError):
    """A site whose method has no static reference (dynamic, content-based selection)."""


def _dynamic(specs) -> bool:
    return any(get_method(name).kind == "dynamic" for name, _ in specs)


def _softcap_mod(softcap: float):
    def softcap_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return softcap_mod


def _oracle(q, k, v, mask_mod, *, scale, score_mod, softcap, kv_keep=None, sinks=None):
    """reference_attention; with learned sinks the canonical reference (a sink column in the softmax) on the
    materialised mask, so the planned op's log-sum-exp route is checked against the eager formulation."""
    if sinks is None:
        return reference_attention(q, k, v, mask_mod, scale=scale, score_mod=score_mod, kv_keep=kv_keep)
    full = element_mask(mask_mod, q.shape[0], q.shape[1], q.shape[2], k.shape[2], kv_keep, device=q.device)
    return reference(q.float(), k.float(), v.float(), full, scale, False, -1, softcap, 0.0, sinks).to(q.dtype)


def specified_output(a: dict[str, Any]) -> torch.Tensor:
    """What the planned op is specified to return for its named arguments ``a``, computed densely in
    float32 from plain PyTorch (differentiable; :mod:`lcpass.grad` takes the op's gradient from it).
    Raises ValueError for dynamic methods (no fixed mask)."""
    q, k, v, mask = a["q"], a["k"], a["v"], a["mask"]
    sinks = a.get("sinks")
    sinks = None if sinks is None else sinks.float()
    chunk = int(a.get("chunk", -1))
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    specs = parse_spec(a["spec"])
    if _dynamic(specs):
        raise _NotVerifiable(f"dynamic (content-selected) methods {sorted({n for n, _ in specs})} have no "
                             "fixed mask to compare against")
    if all(n == "dense" for n, _ in specs) or sk < crossover(a["spec"], hq) or a["dropout_p"] > 0:
        return reference(q.float(), k.float(), v.float(), None if mask is None else
                         (mask if mask.dtype == torch.bool else mask.float()), a["scale"], a["is_causal"],
                         a["window"], a["softcap"], 0.0, sinks, chunk).to(q.dtype)
    claim = checked_claim(a["mask_kind"])
    if claim is not None and mask is not None:
        if not claim_holds(mask, sq, sk, *claim):  # the claim fails: exact attention, as the op runs it
            return reference(q.float(), k.float(), v.float(), mask if mask.dtype == torch.bool else mask.float(),
                             a["scale"], a["is_causal"], a["window"], a["softcap"], 0.0, sinks, chunk).to(q.dtype)
        a = {**a, "is_causal": claim[0], "window": claim[1]}
        chunk = claim[2]
    mask_mod = site_mask(a["spec"], hq, sq, sk, bool(a["is_causal"]), int(a["window"]), chunk)
    score_mod = _softcap_mod(a["softcap"]) if a["softcap"] else None
    padding = mask is not None and lowering_kind(a["mask_kind"]) == "sparse" and \
        padding_keys(mask, q.shape[0], sq, sk, bool(a["is_causal"]), int(a["window"]), chunk)[0]
    if mask is not None and not padding:
        # chunks count from each row's first attended key (the reference's own chunks)
        keep = element_mask(site_mask(a["spec"], hq, sq, sk, bool(a["is_causal"]), int(a["window"])), 1, hq,
                            sq, sk, device=q.device)
        if chunk >= 1:
            keep = keep & positional_keep(sq, sk, False, -1, q.device, chunk, chunk_start(mask))
        full = mask & keep if mask.dtype == torch.bool else mask.float().masked_fill(~keep, float("-inf"))
        return reference(q.float(), k.float(), v.float(), full, a["scale"], False, -1, a["softcap"], 0.0,
                         sinks).to(q.dtype)
    kv_keep = None
    if mask is not None:
        keep = mask if mask.dtype == torch.bool else mask > NEG_LIMIT
        keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))  # [S, S] / [B|H, S, S] broadcast as scores
        kv_keep = keep.reshape(keep.shape[0], -1, keep.shape[-1]).any(1).expand(q.shape[0], -1)  # [B, Sk]
        rows = _runs(kv_keep) if not bool(kv_keep.all()) else None
        if rows is None and chunk >= 1 and not bool(kv_keep.all()):  # as the op: exact, chunks per row
            return reference(q.float(), k.float(), v.float(), mask if mask.dtype == torch.bool else mask.float(),
                             a["scale"], a["is_causal"], a["window"], a["softcap"], 0.0, sinks, chunk).to(q.dtype)
        if rows is not None:
            # each row alone on its one run of real keys [p, e): positions count from p, as unbatched
            out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
            for b, (p, e) in enumerate(rows):
                lo, hi = max(0, p - (sk - sq)), e - (sk - sq)
                if e <= p or hi <= lo:
                    continue
                row = site_mask(a["spec"], hq, hi - lo, e - p, bool(a["is_causal"]), int(a["window"]), chunk)
                rs = None if sinks is None else sinks.expand(*q.shape[:-1], 1)[b:b + 1, :, lo:hi]
                out[b:b + 1, :, lo:hi] = _oracle(q[b:b + 1, :, lo:hi], k[b:b + 1, :, p:e], v[b:b + 1, :, p:e], row,
                                                 scale=a["scale"], score_mod=score_mod, softcap=a["softcap"],
                                                 sinks=rs)
            return out
    return _oracle(q, k, v, mask_mod, scale=a["scale"], score_mod=score_mod, softcap=a["softcap"], kv_keep=kv_keep,
                   sinks=sinks)


def _runs(kv_keep: torch.Tensor) -> Optional[list[tuple[int, int]]]:
    """Each row's real keys [start, end) when they form one contiguous run per row (left or right padding)."""
    out = []
    for row in kv_keep.tolist():
        idx = [i for i, x in enumerate(row) if x]
        if idx and idx[-1] - idx[0] + 1 != len(idx):
            return None
        out.append((idx[0], idx[-1] + 1) if idx else (0, 0))
    return out


def verify_call(args: dict[str, Any]) -> tuple[float, float]:
    """(max abs error, bound) of one recorded planned call against the reference."""
    want = specified_output(args)
    got = PLANNED_OP(*(args.get(n) for n in _ARGS[:-1]), args.get("chunk", -1))
    err = float((got.float() - want.float()).abs().max().item()) if got.numel() else 0.0
    bound = DTYPE_BOUNDS.get(args["q"].dtype, 1e-4) * max(1.0, float(want.float().abs().max().item()))
    return err, bound


def verify_model(model: torch.nn.Module, example_inputs: Any, *, strict: bool = False,
                 bound: Optional[float] = None) -> VerifyReport:
    """Run each planned site of ``model`` once against the reference on ``example_inputs``.

    Args:
        model: a model returned by :func:`lcpass.optimize` (either door) or anything that calls
            ``torch.ops.lcpass.planned_attention``.
        example_inputs: keyword arguments (dict), positional ones (tuple) or one tensor.
        strict: raise ValueError naming the sites over their bound (default: a warning).
        bound: one absolute bound for every site instead of :data:`DTYPE_BOUNDS`.

    Returns:
        site -> max abs error (a :class:`VerifyReport`; ``.failed`` lists sites over their bound).

    Example::

        >>> verify_model(lcpass.optimize(model, method="streaming", window=64), {"input_ids": ids}).failed
        []
    """
    calls = record_planned_calls(model, example_inputs)
    if not calls:
        warnings.warn(f"lcpass.verify: {type(model).__name__} ran no planned attention site on these inputs "
                      "(dense plans keep the exact op); nothing to verify", stacklevel=2)
    errors, bounds, skipped = {}, {}, {}
    with torch.no_grad():
        for site, args in calls.items():
            try:
                errors[site], bounds[site] = verify_call(args)
            except _NotVerifiable as why:
                skipped[site] = str(why)
                continue
            if bound is not None:
                bounds[site] = float(bound)
    rep = VerifyReport(errors, bounds, skipped)
    if rep.failed:
        msg = "lcpass.verify: sites over their error bound: " + ", ".join(
            f"{s} (max abs error {rep[s]:.3g} > {rep.bounds[s]:.3g})" for s in rep.failed)
        if strict:
            raise ValueError(msg + "; run them dense (plan 'dense') or report the plan and inputs")
        warnings.warn(msg, stacklevel=2)
    return rep
