"""``lcpass.export``: a model whose attention runs its planned method, as a torch.export program or ONNX.

The graph route for every model (transformers models included): capture with ``torch.export`` (optionally
with a symbolic sequence length), canonicalize, lower each planned site to
``torch.ops.lcpass.planned_attention`` (dense sites keep the exact ``torch.ops.lcpass.attention``), then

* ``format="torch"``: ``torch.export.export`` the lowered graph and ``torch.export.save`` it; the
  program's attention sites are lcpass custom ops, so ``torch.export.load`` works after ``import lcpass``;
* ``format="onnx"``: ``torch.onnx.export(dynamo=True, opset_version=23)`` with a custom translation per
  lcpass op: one ``lcpass``-domain function per site configuration (ONNX ``Attention`` with the method's
  mask built in-graph from positions, or ``com.microsoft.GroupQueryAttention`` for a pure sliding
  window); see :mod:`lcpass.onnx.attention`. The block top-k dynamic methods (``quest``, ``landmark``,
  ``seer`` without a learned gate) compute their selection in standard ops (block min/max/mean,
  ``MatMul``, ``TopK``, ``Gather``) and feed it to ``Attention`` as a bool mask (:mod:`lcpass.onnx.dynamic`);
  other dynamic methods are refused by name.

Example::

    >>> res = lcpass.export(model, {"input_ids": ids}, "model.onnx", method="streaming", sink=4, window=64)
    >>> import onnxruntime as ort
    >>> sess = ort.InferenceSession("model.onnx")
    >>> logits = sess.run(None, {"input_ids": ids.numpy()})[0]
    >>> ep = lcpass.export(model, {"input_ids": ids}, "model.pt2", format="torch", method="dense").program
"""
from __future__ import annotations

import inspect as _inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lcpass.capture import CaptureError, Captured, capture, export_dynamic, export_program
from lcpass.capture import sequence_dim as seq_dim
from lcpass.found import Coverage, check_all_found, coverage, prefer_static
from lcpass.inspect import ExampleInputs, split_inputs
from lcpass.patterns import canonicalize
from lcpass.pipeline import compile_sites
from lcpass.plan import Plan

__all__ = ["export", "ExportResult", "FORMATS", "ONNX_OPS", "check_output_path"]

FORMATS = ("onnx", "torch")
ONNX_OPS = ("default", "ort")


@dataclass
class ExportResult:
    """What ``lcpass.export`` wrote."""

    path: Path
    format: str
    program: Any  # torch.export.ExportedProgram or onnx.ModelProto
    lowering: dict[str, str] = field(default_factory=dict)  # site -> dense | sparse | dense-masked
    input_names: list[str] = field(default_factory=list)  # ONNX graph inputs, in order
    functions: list[str] = field(default_factory=list)  # ONNX: the lcpass functions (or contrib ops) used
    kv_buffers: list[str] = field(default_factory=list)  # onnx_ops="ort": KV inputs to bind (IOBinding)
    notes: dict[str, str] = field(default_factory=dict)  # onnx_ops="ort": site -> why it kept the default


def check_output_path(path: Union[str, Path], what: str = "lcpass.export") -> Path:
    """``path`` as a Path whose folder exists and is writable; ValueError naming the path otherwise."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ValueError(f"{what}: output path '{p}' is a directory; give a file name such as '{p / 'model.onnx'}'")
    if not parent.is_dir():
        raise ValueError(f"{what}: cannot write '{p}': folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{what}: cannot write '{p}': permission denied; choose a writable path")
    return p


class _PlainOutputs(torch.nn.Module):
    """The lowered graph with a transformers ``ModelOutput`` returned as a plain dict: a saved program then
    loads without transformers' pytree registrations (``ep.module()(input_ids=ids)["logits"]``)."""

    def __init__(self, gm: torch.fx.GraphModule, fixed: dict[str, Any]) -> None:
        super().__init__()
        self.gm = gm
        self.fixed = fixed  # non-tensor keyword arguments baked in (use_cache=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.gm(*args, **kwargs, **self.fixed)
        if isinstance(out, dict) and type(out) is not dict:  # ModelOutput is an OrderedDict subclass
            return {k: v for k, v in out.items()}
        return out


def _plain_outputs(gm: torch.fx.GraphModule, fixed: dict[str, Any]) -> torch.nn.Module:
    """A :class:`_PlainOutputs` whose forward shows ``gm``'s own signature less the ``fixed`` arguments."""
    sig = _inspect.signature(gm.forward)
    sig = sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in fixed])
    cls = type("LoweredModel", (_PlainOutputs,), {})
    fwd = lambda self, *args, **kwargs: _PlainOutputs.forward(self, *args, **kwargs)  # noqa: E731
    self_param = _inspect.Parameter("self", _inspect.Parameter.POSITIONAL_OR_KEYWORD)
    fwd.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    cls.forward = fwd
    return cls(gm, fixed)


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], dynamic_seq: bool) -> Captured:
    """lcpass.capture's export route, with the sequence bound from the model's position limit."""
    if not dynamic_seq:
        return capture(model, args, kwargs)
    try:
        params = _inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" in params and "use_cache" not in kwargs and hasattr(model, "config"):
        kwargs = {**kwargs, "use_cache": False}  # a cache object is no exportable output
    try:
        ep = export_dynamic(model, args, kwargs, seq_dim(model))
    except Exception as exc:  # noqa: BLE001 - the example's shapes, said in one line naming the model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        warnings.warn(f"lcpass.export: torch.export of {type(model).__name__} with a dynamic sequence length failed "
                      f"({type(exc).__name__}: {first}); exporting with the example's shapes instead (the program "
                      "runs at those shapes only; pass dynamic_seq=False to ask for that)", stacklevel=4)
        cap = capture(model, args, kwargs)
        cap.extra["dynamic"] = False
        return cap
    flat = torch.utils._pytree.tree_leaves((tuple(args), kwargs))
    return Captured(ep.module(), list(flat), "export", frozenset(), ep, {"kwargs": kwargs, "dynamic": True})


def lower_for_export(model: torch.nn.Module, example_inputs: ExampleInputs, *, method: Optional[str] = None,
                     plan: Union[Plan, str, Path, None] = None, dynamic_seq: bool = True,
                     dense_below: Optional[int] = None, **params: Any):
    """Capture, canonicalize and lower ``model``; returns (captured, lowering, args, kwargs)."""
    request = Plan.request(method, plan, params, door="lcpass.export")  # bad arguments fail before capture
    args, kwargs = split_inputs(example_inputs, model)
    cap = _capture(model, args, kwargs, dynamic_seq)
    det = canonicalize(cap.gm, cap.flat_inputs, cap.param_placeholders)
    cov = coverage(model, kwargs, det, args)
    if cap.extra.get("dynamic"):
        def static():
            s_cap = capture(model, args, kwargs)
            s_cap.extra["dynamic"] = False
            return s_cap, canonicalize(s_cap.gm, s_cap.flat_inputs, s_cap.param_placeholders)
        cap, det, specialised = prefer_static("lcpass.export", model, (cap, det), cov, static,
                                              "exporting with the example's shapes instead (the program runs "
                                              "at those shapes only)")
        if specialised:
            cov = Coverage.of(cov.calls, det)
    check_all_found(model, kwargs, det, strict=False, door="lcpass.export", cov=cov)
    if not det.sites:
        warnings.warn(f"lcpass.export: no attention found in {type(model).__name__}; exporting it unchanged",
                      stacklevel=3)
        return cap, {}, args, cap.extra.get("kwargs", kwargs)
    # the one pipeline (as lcpass.optimize): plan, the plan's model rewrites (a RoPE base), lowering
    lowering = compile_sites(cap.gm, det.sites, request, dense_below=dense_below, model_name=type(model).__name__,
                             inputs=cap.flat_inputs, state="").lowering
    return cap, lowering, args, cap.extra.get("kwargs", kwargs)


def export(
    model: torch.nn.Module,
    example_inputs: ExampleInputs,
    path: Union[str, Path],
    format: str = "onnx",
    method: Optional[str] = None,
    plan: Union[Plan, str, Path, None] = None,
    dynamic_seq: bool = True,
    *,
    dense_below: Optional[int] = None,
    onnx_ops: str = "default",
    **params: Any,
) -> ExportResult:
    """Export ``model`` with every detected attention site running its planned method.

    Args:
        model: any module ``torch.export`` captures (transformers models included).
        example_inputs: keyword arguments (dict) or positional ones (tuple) of one forward.
        path: the file to write (``.onnx`` or ``.pt2``).
        format: ``"onnx"`` (opset 23, onnxruntime) or ``"torch"`` (a saved ``torch.export`` program).
        method, plan, params: as in :func:`lcpass.optimize` (``method="streaming", sink=4, window=64``).
        dynamic_seq: a symbolic sequence length: dim 1 of the first tensor input, and every dim of every
            tensor input of that size (a ``[B, 1, S, S]`` mask input included).
        dense_below: run dense below this key length instead of each method's crossover.
        onnx_ops: ``"default"``: ONNX ``Attention`` functions (and ``com.microsoft.GroupQueryAttention`` for
            a pure sliding window); the model's inputs and outputs are the PyTorch model's. ``"ort"``: also
            ``com.microsoft.SparseAttention`` for sites with a block-aligned static layout (see
            :mod:`lcpass.onnx.sparse`); each adds KV buffer inputs ``past_key.<i>``/``past_value.<i>`` and
            outputs ``present_*.<i>`` that must share memory (run with
            :func:`lcpass.onnx.sparse.run_with_kv_buffers`); other sites keep the default, with the
            reason in ``ExportResult.notes`` and a warning.

    Example::

        >>> res = export(model, {"input_ids": ids}, "m.onnx", method="streaming", sink=4, window=64)
        >>> res.functions   # the lcpass functions in the model
        ['attention_1a2b3c4d5e6f']
    """
    if format not in FORMATS:
        raise ValueError(f"lcpass.export: format={format!r} is not supported; use one of {FORMATS}")
    if onnx_ops not in ONNX_OPS:
        raise ValueError(f"lcpass.export: onnx_ops={onnx_ops!r} is not supported; use one of {ONNX_OPS}")
    if onnx_ops != "default" and format != "onnx":
        raise ValueError(f"lcpass.export: onnx_ops={onnx_ops!r} applies to format='onnx', not {format!r}")
    out = check_output_path(path)
    cap, lowering, args, kwargs = lower_for_export(model, example_inputs, method=method, plan=plan,
                                                   dynamic_seq=dynamic_seq, dense_below=dense_below, **params)
    fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor) and (v is None or
                                                                                    isinstance(v, (bool, int, float)))}
    kwargs = {k: v for k, v in kwargs.items() if k not in fixed}
    gm = _plain_outputs(cap.gm, fixed)
    dynamic_seq = bool(cap.extra.get("dynamic", False))  # False where the dynamic capture fell back
    if dynamic_seq:
        ep = export_dynamic(gm, args, kwargs, seq_dim(model))
    else:
        ep = export_program(gm, args, kwargs)
    if format == "torch":
        torch.export.save(ep, str(out))
        return ExportResult(out, format, ep, lowering)
    max_len = 0
    if onnx_ops == "ort":
        lens = [t.shape[1] for t in torch.utils._pytree.tree_leaves((tuple(args), kwargs))
                if isinstance(t, torch.Tensor) and t.dim() > 1]
        max_len = int(seq_dim(model).max) if dynamic_seq else max(lens, default=0)
    return _to_onnx(ep, out, lowering, max_len)


def _to_onnx(ep: torch.export.ExportedProgram, out: Path, lowering: dict[str, str], max_len: int = 0) -> ExportResult:
    import onnx  # lazy: onnx is optional (the export extra), loaded only when ONNX is written

    from lcpass.onnx import (  # lazy: lcpass.onnx imports onnx, the optional export extra
        DOMAIN, MS_DOMAIN, OPSET, AttentionFunction, attach_functions, precheck, translation_table)

    precheck(ep.graph)
    functions: dict[str, AttentionFunction] = {}
    notes: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(ep, dynamo=True, opset_version=OPSET, optimize=False, verbose=False,
                                 custom_translation_table=translation_table(functions, max_len, notes))
    model = prog.model_proto
    buffers = attach_functions(model, functions)
    for site, why in notes.items():
        warnings.warn(f"lcpass.export(onnx_ops='ort'): site {site} keeps the lcpass Attention function, not "
                      f"com.microsoft.SparseAttention: {why}", stacklevel=3)
    big = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: weights go to a side file
    if not big:
        onnx.checker.check_model(model)
    onnx.save(model, str(out), save_as_external_data=big)
    used = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})
    contrib = sorted({f"{n.domain}.{n.op_type}" for f in model.functions for n in f.node if n.domain == MS_DOMAIN})
    return ExportResult(out, "onnx", model, lowering, [i.name for i in model.graph.input], used + contrib, buffers,
                        notes)
