"""Run one module through one of lcpass's doors (shared by the door-parity tests).

Doors: ``lcpass.optimize``, ``torch.compile(backend="lcpass")`` with ``inner="eager"`` and with Inductor,
``lcpass.export`` to a torch.export program and to ONNX (run by onnxruntime). Inputs are positional (a
tuple) or by name (a dict), the example the door captures with and the fresh inputs it is then run on.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Union

import numpy as np
import torch
from torch import nn

import lcpass
from lcpass.backend import lcpass_backend

DOORS = ("optimize", "compile_eager", "compile_inductor", "export_torch", "export_onnx")
ATTENTION_OPS = ("softmax", "scaled_dot_product", "_safe_softmax")
Inputs = Union[tuple, dict]


def attention_left(names) -> list[str]:
    """Op names that compute attention outside lcpass's ops."""
    return [n for n in names if any(a in n.lower() for a in ATTENTION_OPS) and "lcpass" not in n]


def fx_targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def main_tensor(out: Any) -> torch.Tensor:
    """A forward's main output: the tensor, or a transformers output's logits / last hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = out.get(name) if isinstance(out, dict) else getattr(out, name, None)
        if value is not None:
            return value
    return next(iter(out.values())) if isinstance(out, dict) else out[0]


def call(fn, inputs: Inputs) -> Any:
    return fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)


def _onnx_feeds(model: nn.Module, sess, fresh: Inputs) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    if isinstance(fresh, dict):
        by_name = fresh
    else:
        params = list(inspect.signature(model.forward).parameters)
        by_name = dict(zip(params, fresh))
    if all(n in by_name for n in names):
        return {n: by_name[n].numpy() for n in names}
    return {n: t.numpy() for n, t in zip(names, fresh if isinstance(fresh, tuple) else fresh.values())}


def run_door(door: str, model: nn.Module, example: Inputs, fresh: Inputs, method: str, params: dict,
             tmp_path) -> tuple[torch.Tensor, list[str]]:
    """(main output on the fresh inputs, the op names of the lowered graph(s))."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if door == "optimize":
            opt = lcpass.optimize(model, method=method, example_inputs=example, **params)
            gm = getattr(opt, "graph_module", None)
            return main_tensor(call(opt, fresh)), fx_targets(gm) if gm is not None else []
        if door.startswith("compile"):
            seen: list[torch.fx.GraphModule] = []

            def keep(gm, inputs, **kw):
                out = lcpass_backend(gm, inputs, **kw)
                seen.append(gm)  # lowered in place
                return out

            torch._dynamo.reset()
            inner = "eager" if door == "compile_eager" else "inductor"
            comp = torch.compile(model, backend=functools.partial(keep, method=method, inner=inner, **params),
                                 dynamic=False)
            return main_tensor(call(comp, fresh)), [t for gm in seen for t in fx_targets(gm)]
        fmt = "torch" if door == "export_torch" else "onnx"
        res = lcpass.export(model, example, tmp_path / f"m.{'pt2' if fmt == 'torch' else 'onnx'}", format=fmt,
                            method=method, **params)
        if fmt == "torch":
            ops = [str(n.target) for n in res.program.graph.nodes if n.op == "call_function"]
            return main_tensor(call(res.program.module(), fresh)), ops
        import onnxruntime as ort  # lazy: only the ONNX door needs it

        sess = ort.InferenceSession(str(res.path))
        out = torch.from_numpy(np.asarray(sess.run(None, _onnx_feeds(model, sess, fresh))[0]))
        return out, [n.op_type for n in res.program.graph.node if n.domain != "lcpass"]
