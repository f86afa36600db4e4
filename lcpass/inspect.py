"""``lcpass.inspect``: capture a model, find its attention sites, and report them.

Example::

    >>> import lcpass
    >>> report = lcpass.inspect(model, {"input_ids": ids})
    >>> [(s.name, s.mask) for s in report.sites][:1]
    [('model.layers.0.self_attn', 'causal')]
    >>> report.rejected            # softmaxes left alone, each with its reason
    []
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from lcpass.capture import CaptureError, Captured, capture, capture_dynamo, hf_defaults
from lcpass.patterns import Detection, Rejection, Site, canonicalize

__all__ = ["InspectReport", "inspect", "detect", "default_example_inputs"]

ExampleInputs = Union[dict[str, Any], Sequence[Any], None]


@dataclass
class InspectReport:
    """What lcpass found in a model: its canonical attention sites and the softmaxes it left alone."""

    model: str
    route: str
    sites: list[Site] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "route": self.route,
            "sites": [s.as_dict() for s in self.sites],
            "rejected": [{"node": r.node, "site": r.site, "reason": r.reason} for r in self.rejected],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def default_example_inputs(model: torch.nn.Module, seq_len: int = 32) -> dict[str, Any]:
    """Token ids for a transformers model (from its config); a clear error for anything else."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise ValueError(
            f"lcpass.inspect: cannot invent example inputs for {type(model).__name__}; "
            "pass example_inputs (a dict of keyword arguments or a tuple of positional ones)"
        )
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, int(vocab), (1, seq_len), generator=gen)}


def split_inputs(example_inputs: ExampleInputs, model: torch.nn.Module) -> tuple[tuple, dict[str, Any]]:
    """Example inputs as (args, kwargs): a dict is keyword arguments, a tensor or a tuple positional ones,
    None a transformers model's default token ids."""
    if example_inputs is None:
        return (), default_example_inputs(model)
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def detect(
    model: torch.nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    route: str = "export",
    decompose: bool = False,
    dynamic_seq: bool = False,
    seq_dim: int = 1,
    fallback: bool = True,
) -> list[tuple[Captured, Detection]]:
    """Capture ``model`` and canonicalise every graph; one (captured, detection) pair per graph.

    When ``torch.export`` fails (and ``fallback``), the model is captured with dynamo instead, with a
    warning that names the export error."""
    args, kwargs = split_inputs(example_inputs, model)
    if route == "dynamo":
        caps = capture_dynamo(model, args, kwargs)
    else:
        try:
            caps = [capture(model, args, kwargs, route=route, decompose=decompose, dynamic_seq=dynamic_seq,
                            seq_dim=seq_dim)]
        except CaptureError as exc:
            if route != "export" or decompose or dynamic_seq or not fallback:
                raise
            # torch.export refuses some models (data-dependent guards in MoE routing, cache objects in the
            # outputs): the graphs dynamo hands a backend show the same attention
            try:
                caps = capture_dynamo(model, args, hf_defaults(model, kwargs))
            except CaptureError:
                raise exc from None
            warnings.warn(f"lcpass: {exc}; captured {type(model).__name__} with dynamo instead "
                          f"({len(caps)} graph(s))", stacklevel=2)
    return [(c, canonicalize(c.gm, c.flat_inputs, c.param_placeholders)) for c in caps]


def inspect(
    model: torch.nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    route: str = "export",
    decompose: bool = False,
    name: Optional[str] = None,
) -> InspectReport:
    """Capture ``model`` on ``example_inputs`` and report its attention sites.

    Args:
        model: any nn.Module (a transformers model or plain torch code).
        example_inputs: keyword arguments (dict) or positional ones (tuple); for a transformers model
            they default to 32 random token ids.
        route: ``"export"`` (default), ``"dynamo"`` or ``"fx"``.
        decompose: inspect the core-ATen graph (after ``run_decompositions()``).
    """
    found = detect(model, example_inputs, route=route, decompose=decompose)
    report = InspectReport(name or type(model).__name__, route)
    for _cap, det in found:
        report.sites.extend(det.sites)
        report.rejected.extend(det.rejected)
    return report
