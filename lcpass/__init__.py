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
from lcpass.errors import UnsupportedModelError
from lcpass.inspect import InspectReport, detect, inspect
from lcpass.lower import planned_attention as _planned  # noqa: F401  registers torch.ops.lcpass.planned_attention
from lcpass.optimize import OptimizedModule, OptimizeReport, optimize
from lcpass.plan import Plan
from lcpass.export import ExportResult, export
from lcpass.verify import VerifyReport, verify_model
from lcpass import grad as _grad  # noqa: F401  registers the planned op's backward

__version__ = "0.1.0"


def __getattr__(name: str):
    """``lcpass.calibrate`` and ``lcpass.eval`` (the quality harness) load on first use."""
    if name == "calibrate":
        from lcpass.calibration import calibrate  # lazy: PEP 562 attribute; import lcpass skips calibration and rich

        return calibrate
    if name == "eval":
        from lcpass.quality import evaluate  # lazy: PEP 562 attribute; import lcpass skips the quality harness

        return evaluate
    raise AttributeError(f"module 'lcpass' has no attribute {name!r}")


__all__ = ["CaptureError", "Captured", "ExportResult", "InspectReport", "OptimizeReport", "OptimizedModule", "Plan",
           "UnsupportedModelError", "VerifyReport", "calibrate", "capture", "capture_dynamo", "detect", "eval", "export", "inspect", "optimize",
           "verify_model"]
