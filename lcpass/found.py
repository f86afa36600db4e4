"""Did detection find every attention the model computes? The check every door runs after detecting.

The oracle is lcpass's own dispatcher-level count of the eager forward (:mod:`lcpass.oracle`: each
``softmax -> @ v`` or fused attention kernel the forward actually runs), which owes nothing to the FX
matcher. More attention in the eager forward than detected sites means some spelling was not recognised:
that attention would keep the model's own code while the door claims to have optimized the model.
Attention the model already computes sparsely (BigBird's blocks, Longformer's bands) is accounted for and
said, not hidden.

Example::

    cov = check_all_found(model, kwargs, detection, strict=True)   # UnsupportedModelError if cov.missed
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from lcpass.capture import hf_defaults
from lcpass.errors import UnsupportedModelError
from lcpass.oracle import attention_calls
from lcpass.patterns import Detection

__all__ = ["ALREADY_SPARSE", "Coverage", "coverage", "check_all_found", "prefer_static"]

ALREADY_SPARSE = "already sparse"
C = TypeVar("C")


@dataclass(frozen=True)
class Coverage:
    """The eager forward's attention count against a detection."""

    calls: int  # attention computations of the eager forward
    found: int  # detected sites
    sparse: tuple  # rejections of attention the model computes sparsely itself
    reasons: str  # the first rejections, "site: reason; ..."

    @property
    def missed(self) -> int:
        return max(0, self.calls - self.found - len(self.sparse))

    @classmethod
    def of(cls, calls: int, det: Detection) -> "Coverage":
        """``calls`` eager attention computations against ``det`` (another capture's detection of the same
        forward needs no second eager run)."""
        sparse = tuple(r for r in det.rejected if r.reason.startswith(ALREADY_SPARSE))
        reasons = "; ".join(f"{r.site or r.node}: {r.reason}" for r in det.rejected[:4]) or "no softmax was examined"
        return cls(calls, len(det.sites), sparse, reasons)


def coverage(model: torch.nn.Module, inputs: dict[str, Any], det: Detection, args: tuple = ()) -> Coverage:
    """Count the attention of the eager forward ``model(*args, **inputs)`` and compare with ``det``."""
    calls, _ = attention_calls(model, hf_defaults(model, inputs), args)
    return Coverage.of(len(calls), det)


def check_all_found(model: torch.nn.Module, inputs: dict[str, Any], det: Detection, strict: bool, *,
                    door: str = "lcpass.optimize", fix: str = "pass strict=False to optimize the recognised sites "
                    "only", cov: Coverage | None = None) -> Coverage:
    """Warn about attention the model computes sparsely; raise :class:`UnsupportedModelError` (``strict``)
    or warn when some attention was not recognised, naming the sites and the reasons."""
    cov = cov or coverage(model, inputs, det)
    name = f"{door}({type(model).__name__})"
    if cov.sparse:
        where = ", ".join(sorted({r.site or r.node for r in cov.sparse}))
        warnings.warn(f"{name}: {where} compute attention that is {cov.sparse[0].reason}", stacklevel=3)
    if cov.missed:
        text = (f"{name}: the eager forward computes {cov.calls} attention(s) but lcpass recognised {cov.found}: "
                f"{cov.missed} would silently keep the model's own attention (unrecognised: {cov.reasons})")
        if strict:
            raise UnsupportedModelError(f"{text}; {fix}")
        warnings.warn(text, stacklevel=3)
    return cov


def prefer_static(door: str, model: torch.nn.Module, dynamic: tuple[C, Detection], cov: Coverage,
                  static: Callable[[], tuple[C, Detection]], consequence: str) -> tuple[C, Detection, bool]:
    """The graph captured with a symbolic sequence length, or the example's static one where that shows
    more attention; returns ``(captured, detection, specialised)``.

    A symbolic length can hide what a softmax's terms are (a bias added before a reshape of unknown
    shape). Where the eager forward has attention that the dynamic graph's detection missed, ``static()``
    captures the example's shapes; if its detection finds more sites, that graph is used and the door warns,
    saying ``consequence`` (what the specialisation means for the caller). Every door decides this here.
    """
    cap, det = dynamic
    if not cov.missed:
        return cap, det, False
    s_cap, s_det = static()
    if len(s_det.sites) <= len(det.sites):
        return cap, det, False
    warnings.warn(f"{door}: {type(model).__name__}: with a symbolic sequence length {len(det.sites)} of "
                  f"{len(s_det.sites)} attention sites are found ({cov.reasons}); {consequence}", stacklevel=3)
    return s_cap, s_det, True
