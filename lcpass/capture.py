"""Capture: nn.Module + example inputs -> ``torch.fx.GraphModule``.

Three routes, one result (:class:`Captured`):

* ``"export"`` (primary) — ``torch.export.export(strict=False)``, optionally with a dynamic sequence
  dimension and optionally lowered to core ATen (``decompose=True``). Works on every transformers v5
  model tried.
* ``"dynamo"`` — the graph(s) ``torch.compile`` hands a backend (parameters arrive as placeholders).
* ``"fx"`` — ``torch.fx.symbolic_trace``, for plain torch code only (it fails on transformers models).

Example::

    >>> cap = capture(model, kwargs={"input_ids": ids})            # torch.export
    >>> cap.gm(**{"input_ids": ids})                               # runs like the model
    >>> caps = capture_dynamo(model, kwargs={"input_ids": ids})    # one Captured per graph
"""
from __future__ import annotations

import inspect
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch.fx import GraphModule

from lcpass.patterns.graphinfo import normalise_path

__all__ = ["CaptureError", "Captured", "capture", "capture_dynamo", "ROUTES"]

ROUTES = ("export", "dynamo", "fx")


class CaptureError(RuntimeError):
    """A model that could not be captured; the message names the route and the first failing frame."""


@dataclass
class Captured:
    """A captured graph and what later stages need to run and read it."""

    gm: GraphModule
    flat_inputs: list[Any]  # example values in placeholder order
    route: str
    param_placeholders: frozenset[str] = frozenset()
    exported: Optional[torch.export.ExportedProgram] = None
    extra: dict[str, Any] = field(default_factory=dict)


def _failing_frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    own = [f for f in frames if not f.filename.startswith(skip)]
    f = (own or frames or [None])[-1]
    if f is None:
        return "unknown frame"
    return f"{os.path.relpath(f.filename) if not f.filename.startswith('/') else f.filename}:{f.lineno} in {f.name}"


def _fail(route: str, model: torch.nn.Module, exc: BaseException) -> CaptureError:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CaptureError(
        f"capture via {route} failed for {type(model).__name__}: {type(exc).__name__}: {msg} "
        f"(first failing frame: {_failing_frame(exc)}); try another route "
        f"({', '.join(r for r in ROUTES if r != route)})"
    )


def hf_defaults(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers models return a cache object torch.export cannot flatten: ask for none."""
    kwargs = dict(kwargs)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    takes = "use_cache" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes and "use_cache" not in kwargs and hasattr(getattr(model, "config", None), "get_text_config"):
        kwargs["use_cache"] = False
    return kwargs


def sequence_dim(model: torch.nn.Module) -> Any:
    """The symbolic sequence length: 2 .. the model's position limit (learned position tables bound it)."""
    config = getattr(model, "config", None)
    limit = None
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        limit = limit or getattr(config, attr, None)
    return torch.export.Dim("seq", min=2, max=int(limit) if limit else 1 << 16)


def sequence_shapes(fn: Any, args: Sequence[Any], kwargs: dict[str, Any], seq: Any, seq_dim: int = 1,
                    by_size: bool = True) -> dict[str, Any]:
    """``dynamic_shapes`` for ``torch.export``, keyed by ``fn``'s parameter names: the example's sequence
    length ``S`` is dim ``seq_dim`` of the first tensor input that has one, and every dim past the batch of
    every tensor input whose size is ``S`` is that length (ids ``[B, S]``, a mask ``[S, S]`` or
    ``[B, 1, S, S]``). ``by_size=False``: dim ``seq_dim`` of every tensor input, whatever its size.

    >>> sequence_shapes(lambda x, mask: 0, (torch.zeros(2, 7, 8), torch.ones(2, 1, 7, 7)), {}, seq)
    {'x': {1: seq}, 'mask': {2: seq, 3: seq}}
    """
    bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    tensors = [v for v in bound.arguments.values() if isinstance(v, torch.Tensor) and v.dim() > seq_dim]
    n = tensors[0].shape[seq_dim] if tensors else None

    def spec(x):
        if not isinstance(x, torch.Tensor):
            return None
        if not by_size:
            return {seq_dim: seq} if x.dim() > seq_dim else None
        dims = {d: seq for d in range(1, x.dim()) if x.shape[d] == n}
        return dims or None

    return {name: spec(value) for name, value in bound.arguments.items()}


def unaliased(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` with every tensor that shares storage with an earlier one cloned.

    ``torch.export`` dedupes inputs that alias (the same mask passed as two arguments) into one
    placeholder, so the program would read one argument where the model reads the other, silently, on
    every later call with distinct tensors. The example's values do not change; only the aliasing goes.
    """
    seen: set[tuple[int, int]] = set()

    def fresh(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.device.type == "meta":
            return x
        key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
        if key in seen and key[1]:
            return x.clone()
        seen.add(key)
        return x

    args, kwargs = torch.utils._pytree.tree_map(fresh, (tuple(args), dict(kwargs)))
    return args, kwargs


def export_program(model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any],
                   dynamic_shapes: Any = None) -> Any:
    """``torch.export.export(strict=False)`` under ``no_grad`` on :func:`unaliased` inputs: every door's
    one call into torch.export."""
    args, kwargs = unaliased(args, kwargs)
    with torch.no_grad():
        return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)


def export_dynamic(model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any], seq: Any,
                   seq_dim: int = 1) -> Any:
    """``torch.export.export`` with a symbolic sequence length (:func:`sequence_shapes`); when a dim that
    only happens to have the sequence's size is fixed by the model (a hidden size equal to the example's
    length), once more with dim ``seq_dim`` of every input only."""
    first = sequence_shapes(model.forward, args, kwargs, seq, seq_dim)
    try:
        return export_program(model, args, kwargs, first)
    except Exception:  # noqa: BLE001 - retried below; the second failure is the one reported
        plain = sequence_shapes(model.forward, args, kwargs, seq, seq_dim, by_size=False)
        if plain == first:
            raise
    return export_program(model, args, kwargs, plain)


def capture(
    model: torch.nn.Module,
    args: Sequence[Any] = (),
    kwargs: Optional[dict[str, Any]] = None,
    *,
    route: str = "export",
    dynamic_seq: bool = False,
    seq_dim: int = 1,
    decompose: bool = False,
) -> Captured:
    """Capture ``model(*args, **kwargs)`` as a GraphModule through ``route``.

    Args:
        route: ``"export"`` (default), ``"dynamo"`` (first graph; see :func:`capture_dynamo` for all)
            or ``"fx"``.
        dynamic_seq: export with a symbolic sequence length (:func:`sequence_shapes`: ``seq_dim`` of the
            first tensor input, and each dim of every tensor input of that size).
        decompose: lower the exported program to core ATen (``run_decompositions()``).
    """
    kwargs = dict(kwargs or {})
    if route not in ROUTES:
        raise ValueError(f"capture route {route!r} is not one of {ROUTES}")
    if route == "dynamo":
        graphs = capture_dynamo(model, args, kwargs)
        return graphs[0]
    if route == "fx":
        return _capture_fx(model, args, kwargs)
    kwargs = hf_defaults(model, kwargs)
    try:
        if dynamic_seq:
            limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or (1 << 20)
            ep = export_dynamic(model, args, kwargs, torch.export.Dim("seq", min=2, max=int(limit)), seq_dim)
        else:
            ep = export_program(model, args, kwargs)
        if decompose:
            ep = ep.run_decompositions()
        gm = ep.module()
    except Exception as exc:  # noqa: BLE001 - reported with the route and frame
        raise _fail("export", model, exc) from exc
    flat = torch.utils._pytree.tree_leaves((tuple(args), kwargs))
    return Captured(gm, list(flat), "export", frozenset(), ep, {"kwargs": kwargs})


def capture_dynamo(
    model: torch.nn.Module, args: Sequence[Any] = (), kwargs: Optional[dict[str, Any]] = None
) -> list[Captured]:
    """Every graph dynamo hands a backend for one call of the model (more than one on graph breaks)."""
    kwargs = dict(kwargs or {})
    graphs: list[Captured] = []

    def grab(gm: GraphModule, example_inputs: list[Any]):
        _root_module_paths(gm, example_inputs, model)
        params = frozenset(
            n.name for n, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs)
            if isinstance(x, torch.nn.Parameter) or "_parameters_" in n.name
        )
        graphs.append(Captured(gm, list(example_inputs), "dynamo", params))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=grab, dynamic=False)(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _fail("dynamo", model, exc) from exc
    finally:
        torch._dynamo.reset()
    if not graphs:
        raise CaptureError(f"capture via dynamo produced no graph for {type(model).__name__}")
    return graphs


def _root_module_paths(gm: GraphModule, example_inputs: list[Any], model: torch.nn.Module) -> None:
    """Make the graph's module paths relative to ``model``.

    After a graph break dynamo traces the frame of a submodule's forward, and ``nn_module_stack`` paths
    start at *that* module's ``self`` (``L['self'].layer[0].SelfAttention`` inside ``encoder.block.1``):
    names repeat across blocks and name no submodule of the model. The prefix is recovered from the
    parameters the graph reads: a parameter used inside module ``rel`` whose full name in ``model`` is
    ``<prefix>.<rel>.<leaf>`` gives ``prefix``; every path of the graph is then rewritten to start at
    ``model``."""
    names: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(name)
    holders = {n: names[id(x)] for n, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs)
               if isinstance(x, torch.Tensor) and id(x) in names}
    if not holders:
        return
    prefix = _frame_prefix(gm, holders)
    if not prefix:
        return
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        fixed = {}
        for key, val in stack.items():
            path = val[0] if isinstance(val, tuple) else str(val)
            rel = normalise_path(path)
            full = (prefix + rel).rstrip(".")
            fixed[key] = (full, *val[1:]) if isinstance(val, tuple) else full
        node.meta["nn_module_stack"] = fixed


def _frame_prefix(gm: GraphModule, holders: dict[Any, list[str]]) -> Optional[str]:
    """The traced frame's path in the model: from the first parameter read inside module ``rel`` whose
    full name is ``<prefix><rel>.<leaf>``; None when no parameter tells."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        last = list(stack.values())[-1]
        rel = normalise_path(last[0] if isinstance(last, tuple) else str(last))
        for arg in node.args:
            for full in holders.get(arg, ()):
                head = full.rpartition(".")[0]
                if not rel:
                    return head + "." if head else ""
                if head == rel or head.endswith("." + rel):
                    return head[: len(head) - len(rel)]
    return None


def _capture_fx(model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> Captured:
    try:
        gm = torch.fx.symbolic_trace(model)
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        flat = [bound.arguments.get(n.target, None) for n in gm.graph.nodes if n.op == "placeholder"]
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(*flat)
    except Exception as exc:  # noqa: BLE001
        raise _fail("fx", model, exc) from exc
    return Captured(gm, flat, "fx", frozenset())
