"""A mask_mod as ONNX: the SAME trace the Triton printer reads, emitted as standard ops.

:func:`lcpass.codegen.printer.print_mask_mod` runs a mask's callable once on symbolic ``(b, h, q_idx,
kv_idx)`` and records every operation as a :class:`~lcpass.codegen.printer.Step`. This module walks those
steps and writes one ONNX node (or a short fixed sequence) per step, so the kernel, the engine and the ONNX
graph all compute what the one Python callable computes: a new mask factory in :mod:`lcpass.masks` needs no
ONNX code of its own.

Kinds map to ONNX types as the printer's kinds do: ``int`` -> int64 (positions), ``float`` -> float32,
``bool`` -> bool. Integer ``//`` and ``%`` keep torch's floor semantics (``Mod(fmod=0)``, and ``(a - a % b)
/ b`` for the quotient, since ONNX's integer ``Div`` truncates). A ``where`` whose result is a bool becomes
``(c & a) | (~c & b)`` (onnxruntime's CPU ``Where`` has no bool kernel). Per-head tables become constants
gathered by the head index.

>>> import numpy as np
>>> from lcpass.masks import sliding_window_mask
>>> from lcpass.onnx.common import Body
>>> body = Body()
>>> keep = emit_mask_mod(body, sliding_window_mask(64), "h", "q", "kv")
>>> sorted({n.op_type for n in body.nodes})
['And', 'Constant', 'GreaterOrEqual', 'Less', 'Sub']
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
from onnx import TensorProto

from lcpass.codegen.printer import Step, UnsupportedSpec, print_mask_mod
from lcpass.onnx.common import Body, ONNXExportError

__all__ = ["emit_mask_mod"]

_NP = {"int": np.int64, "float": np.float32, "bool": np.bool_}
_TP = {"int": TensorProto.INT64, "float": TensorProto.FLOAT, "bool": TensorProto.BOOL}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "truediv": "Div", "maximum": "Max", "minimum": "Min"}
_COMPARE = {"lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual", "eq": "Equal"}
_LOGIC = {"and": ("And", "BitwiseAnd"), "or": ("Or", "BitwiseOr"), "xor": ("Xor", "BitwiseXor")}
_UNARY = {"neg": "Neg", "abs": "Abs", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "sigmoid": "Sigmoid",
          "tanh": "Tanh"}


def _kind_of(value: Any) -> str:
    return "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float"


class _Emitter:
    """Step operands -> ONNX value names of a known kind, casting where ops need one kind."""

    def __init__(self, body: Body, inputs: dict[str, str], owner: str) -> None:
        self.body = body
        self.values: dict[str, tuple[str, str]] = {k: (v, "int") for k, v in inputs.items()}
        self.owner = owner

    def _value(self, arg: str) -> tuple[str, str]:
        if arg not in self.values:
            raise ONNXExportError(f"{self.owner} reads {arg!r}, which has no ONNX value here (the batch index "
                                  f"'b' is not an input of the ONNX attention body); write the mask from "
                                  f"h, q_idx and kv_idx, or export with format='torch'")
        return self.values[arg]

    def get(self, arg: Any, kind: Optional[str] = None) -> str:
        """The ONNX name of ``arg`` (a variable or a constant), cast to ``kind`` when given."""
        if isinstance(arg, str):
            name, have = self._value(arg)
            return name if kind is None or kind == have else self.body.op("Cast", name, to=_TP[kind])
        want = kind or _kind_of(arg)
        return self.body.const(arg, dtype=_NP[want])

    def kind(self, arg: Any) -> str:
        return self._value(arg)[1] if isinstance(arg, str) else _kind_of(arg)

    def common(self, *args: Any) -> str:
        kinds = {self.kind(a) for a in args}
        return "float" if "float" in kinds else "int" if "int" in kinds else "bool"

    def step(self, s: Step) -> str:
        b, a, op = self.body, s.args, s.op
        if op in _BINARY:
            kind = "float" if op == "truediv" else s.kind
            return b.op(_BINARY[op], *(self.get(x, kind) for x in a))
        if op in _COMPARE or op == "ne":
            kind = self.common(*a)
            eq = b.op(_COMPARE.get(op, "Equal"), *(self.get(x, kind) for x in a))
            return b.op("Not", eq) if op == "ne" else eq
        if op in _LOGIC:
            bool_op, int_op = _LOGIC[op]
            return b.op(bool_op if s.kind == "bool" else int_op, *(self.get(x, s.kind) for x in a))
        if op in ("floordiv", "remainder"):
            x, y = (self.get(v, s.kind) for v in a)
            if s.kind == "float":
                quotient = b.op("Floor", b.op("Div", x, y))
                return quotient if op == "floordiv" else b.op("Sub", x, b.op("Mul", y, quotient))
            rem = b.op("Mod", x, y, fmod=0)  # the sign of the divisor: torch's floor semantics
            return rem if op == "remainder" else b.op("Div", b.op("Sub", x, rem), y)
        if op in _UNARY:
            return b.op(_UNARY[op], self.get(a[0], s.kind))
        if op == "not":
            return b.op("Not", self.get(a[0], "bool"))
        if op == "invert":
            return b.op("BitwiseNot", self.get(a[0], "int"))
        if op == "to":
            return self.get(a[0], s.kind)
        if op == "where":
            cond, x, y = self.get(a[0], "bool"), self.get(a[1], s.kind), self.get(a[2], s.kind)
            if s.kind == "bool":  # onnxruntime's CPU Where has no bool kernel
                return b.op("Or", b.op("And", cond, x), b.op("And", b.op("Not", cond), y))
            return b.op("Where", cond, x, y)
        if op == "table":
            values, dtype, index = a
            table = b.const(np.asarray(values, dtype=np.float32 if dtype == "float32" else np.int64))
            return b.op("Gather", table, self.get(index, "int"), axis=0)
        raise ONNXExportError(f"{self.owner}: the traced operation {op!r} has no ONNX form here; export with "
                              f"format='torch'")


def emit_mask_mod(body: Body, mask_mod: Callable, h: str, q: str, kv: str) -> Optional[str]:
    """Append ``mask_mod(b, h, q_idx, kv_idx)`` to ``body`` as ONNX; the bool value's name, None when the
    mask is the constant True (nothing to apply).

    ``h``, ``q``, ``kv`` name int64 values that broadcast against each other (e.g. ``[1, H, 1, 1]``,
    ``[B|1, 1, Sq, 1]``, ``[B|1, 1, 1, Sk]``). Raises :class:`ONNXExportError` naming the mask when its trace
    uses something ONNX cannot express here.
    """
    owner = f"mask_mod {getattr(mask_mod, '__name__', repr(mask_mod))!r}"
    try:
        printed = print_mask_mod(mask_mod)
    except UnsupportedSpec as exc:
        raise ONNXExportError(f"{owner} cannot be traced for ONNX ({exc}); export with format='torch'") from exc
    if printed.expr is None:
        return None
    emit = _Emitter(body, {"h": h, "q_idx": q, "kv_idx": kv}, owner)
    for s in printed.steps:
        emit.values[s.name] = (emit.step(s), s.kind)
    return emit.get(printed.result, "bool")
