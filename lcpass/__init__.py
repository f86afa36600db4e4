"""lcpass — a compiler pass for long-context attention.

Capture any PyTorch model as an FX graph, find every attention subgraph structurally, and replace it
with a sparse or KV-compressed method chosen per layer and head.

Example::

    >>> import lcpass
    >>> report = lcpass.inspect(model, {"input_ids": ids})   # the attention sites lcpass finds
    >>> for s in report.sites: print(s.name, s.mask)
"""
from __future__ import annotations

from lcpass.patterns import op as _op  # noqa: F401  registers torch.ops.lcpass.attention
from lcpass.capture import CaptureError, Captured, capture, capture_dynamo
from lcpass.inspect import InspectReport, detect, inspect
from lcpass.lower import planned_attention as _planned  # noqa: F401  registers torch.ops.lcpass.planned_attention
from lcpass.optimize import OptimizedModule, OptimizeReport, optimize
from lcpass.plan import Plan
from lcpass.export import ExportResult, export
from lcpass.verify import VerifyReport, verify_model

__version__ = "0.1.0"

__all__ = ["CaptureError", "Captured", "ExportResult", "InspectReport", "OptimizeReport", "OptimizedModule", "Plan",
           "VerifyReport", "capture", "capture_dynamo", "detect", "export", "inspect", "optimize", "verify_model"]
