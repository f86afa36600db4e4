"""mask_mod / score_mod -> Triton: trace the SAME Python callable the engine runs and print it.

The callable is run once on *symbolic* arguments (:class:`Sym`, a ``__torch_function__`` tracer), so
the trace sees exactly what the engine's ``mask_mod(b, h, q_idx, kv_idx)`` or
``score_mod(score, b, h, q_idx, kv_idx)`` computes. Every operation becomes one SSA line of Triton
(identical operations are shared: common sub-expressions are computed once), e.g. for
``and_masks(causal_mask(), sliding_window_mask(64))``::

    mm_0 = kv_idx <= q_idx
    mm_1 = q_idx - kv_idx
    mm_2 = mm_1 >= 0
    mm_3 = mm_1 < 64
    mm_4 = mm_2 & mm_3
    mm_5 = mm_0 & mm_4          # PrintedFn.expr == "mm_5"

Per-head parameters (``torch.tensor(values)[h]`` as the factories of :mod:`lcpass.masks` write them)
become *tables*: small 1-D tensors passed to the kernel as pointer arguments (``mask_tab0``) and read
with ``tl.load(mask_tab0 + h)``. Integer ``//`` and ``%`` follow torch's floor semantics (Triton's
follow C), through the ``lc_floordiv`` / ``lc_floormod`` helpers every template defines.

Anything the printer does not know raises :class:`UnsupportedSpec` naming the operation, so the
caller can fall back to the CPU engine instead of running a wrong kernel.

>>> from lcpass.masks import sliding_window_mask
>>> p = print_mask_mod(sliding_window_mask([4, 8]))
>>> p.tables, p.expr
(((4, 8),), 'mm_4')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["UnsupportedSpec", "PrintedFn", "Step", "Sym", "print_mask_mod", "print_score_mod", "SUPPORTED_OPS"]


class UnsupportedSpec(ValueError):
    """A kernel spec the code generator cannot handle (an unknown op, an untileable head_dim, ...).

    The message names the object, the offending value and the fix; callers fall back to the CPU
    engine (see :func:`lcpass.codegen.available`).
    """


_INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True)
class Step:
    """One traced operation, in structured form: ``name = op(*args)`` with result ``kind``.

    ``args`` are variable names (str: ``"b"``, ``"h"``, ``"q_idx"``, ``"kv_idx"``, ``"score"`` or an
    earlier step's name) or Python constants (bool / int / float). ``op`` is one of the names in
    :data:`PrintedFn.ops`; ``"table"`` has args ``(values, dtype, index)``; ``"to"`` casts ``args[0]`` to
    ``kind``. The Triton lines and any other printer (ONNX: :mod:`lcpass.onnx.maskmod`) read the same trace.
    """

    name: str
    op: str
    args: tuple
    kind: str


@dataclass(frozen=True)
class PrintedFn:
    """A traced mask_mod / score_mod printed as Triton.

    ``lines``: SSA statements (``mm_3 = mm_1 < 64``) to paste before the use; ``expr``: the result
    (a variable name or literal), ``None`` when a mask is the constant True (nothing to apply);
    ``tables``: per-head parameter tables in argument order (``{prefix}tab{i}``); ``table_dtypes``:
    ``"int32"`` or ``"float32"`` per table; ``ops``: the op names used (for reports and tests);
    ``steps``: the same statements as :class:`Step` records; ``result``: the output as a step operand
    (a variable name or a constant), ``kind`` its kind.
    """

    lines: tuple[str, ...]
    expr: str | None
    tables: tuple[tuple, ...]
    table_dtypes: tuple[str, ...]
    ops: frozenset[str]
    prefix: str
    name: str
    steps: tuple[Step, ...] = ()
    result: Any = None
    kind: str = "bool"

    @property
    def table_names(self) -> tuple[str, ...]:
        """Kernel argument names of the tables (``mask_tab0``, ...)."""
        return tuple(f"{self.prefix}tab{i}" for i in range(len(self.tables)))

    def source(self, indent: str = "") -> str:
        """The statements, one per line, each prefixed with ``indent``."""
        return "\n".join(indent + ln for ln in self.lines)

    def key(self) -> tuple:
        """What the generated code depends on (tables are runtime arguments, only their count and
        dtypes matter)."""
        return (self.lines, self.expr, self.table_dtypes)

    def table_tensors(self, device: torch.device | str) -> list[torch.Tensor]:
        """The tables as contiguous 1-D tensors on ``device`` (int32 or float32)."""
        out = []
        for vals, dt in zip(self.tables, self.table_dtypes):
            out.append(torch.tensor(vals, dtype=getattr(torch, dt), device=device))
        return out


# ------------------------------------------------------------------------------------------------
# the tracer


@dataclass
class _Builder:
    """Accumulates SSA lines; identical (op, operands) share one variable."""

    prefix: str
    owner: str
    lines: list[str] = field(default_factory=list)
    memo: dict[str, str] = field(default_factory=dict)
    tables: list[tuple] = field(default_factory=list)
    table_dtypes: list[str] = field(default_factory=list)
    ops: set[str] = field(default_factory=set)
    steps: list[Step] = field(default_factory=list)

    def emit(self, rhs: str, kind: str, op: str, args: tuple = ()) -> "Sym":
        self.ops.add(op)
        name = self.memo.get(rhs)
        if name is None:
            name = f"{self.prefix}{len(self.memo)}"
            self.memo[rhs] = name
            self.lines.append(f"{name} = {rhs}")
            self.steps.append(Step(name, op, args, kind))
        return Sym(self, name, kind)

    def table(self, values: tuple, dtype: str) -> str:
        for i, (t, d) in enumerate(zip(self.tables, self.table_dtypes)):
            if t == values and d == dtype:
                return f"{self.prefix}tab{i}"
        self.tables.append(values)
        self.table_dtypes.append(dtype)
        return f"{self.prefix}tab{len(self.tables) - 1}"

    def unsupported(self, what: str) -> UnsupportedSpec:
        return UnsupportedSpec(
            f"{self.owner} uses {what}, which the Triton printer (lcpass.codegen.printer) does not "
            f"support; supported: {', '.join(sorted(SUPPORTED_OPS))}. Build the mask from "
            f"lcpass.masks factories, or run this site on the CPU engine (backend='cpu')")


def _lit(x: Any, b: _Builder) -> tuple[str, str]:
    """(text, kind) of a Python / 0-d tensor constant."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise b.unsupported(f"a constant tensor of shape {tuple(x.shape)} (only scalars and "
                                f"1-D per-head tables indexed by h can be printed)")
        x = x.item()
    if isinstance(x, bool):
        return ("True" if x else "False"), "bool"
    if isinstance(x, int):
        if abs(x) > _INT32_MAX:
            raise b.unsupported(f"the integer constant {x} (beyond int32; kernels index in int32)")
        return (f"({x})" if x < 0 else str(x)), "int"
    if isinstance(x, float):
        if math.isnan(x):
            return 'float("nan")', "float"
        if math.isinf(x):
            return ('float("inf")' if x > 0 else 'float("-inf")'), "float"
        return repr(x), "float"
    raise b.unsupported(f"the constant {x!r} of type {type(x).__name__}")


def _operand(x: Any, b: _Builder) -> tuple[str, str]:
    if isinstance(x, Sym):
        return x.name, x.kind
    return _lit(x, b)


def _arg(x: Any, b: _Builder) -> Any:
    """``x`` as a :class:`Step` operand: a variable name, or the constant (checked by :func:`_lit`)."""
    if isinstance(x, Sym):
        return x.name if x.value is _VAR else x.value
    _lit(x, b)
    return x.item() if isinstance(x, torch.Tensor) else x


_VAR = object()  # Sym.value of a traced variable (a constant Sym holds its Python value)


def _promote(*kinds: str) -> str:
    if "float" in kinds:
        return "float"
    if "int" in kinds:
        return "int"
    return "bool"


class Sym:
    """A traced value inside the kernel (an int32 index tile, a bool mask tile or a float score).

    Supports Python operators and the torch functions in :data:`SUPPORTED_OPS` through
    ``__torch_function__``; ``.shape`` is ``()`` and ``.device`` CPU so that helpers such as
    ``torch.ones(torch.broadcast_shapes(b.shape, q.shape))`` evaluate to constants.
    """

    shape = torch.Size([])
    device = torch.device("cpu")

    def __init__(self, builder: _Builder, name: str, kind: str, value: Any = _VAR) -> None:
        self._b = builder
        self.name = name
        self.kind = kind  # "int" | "bool" | "float"
        self.value = value  # _VAR, or the Python constant this Sym stands for

    @property
    def dtype(self) -> torch.dtype:
        return {"int": torch.int64, "bool": torch.bool, "float": torch.float32}[self.kind]

    def dim(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"Sym({self.name}: {self.kind})"

    def __bool__(self) -> bool:
        raise self._b.unsupported("Python control flow on a traced value (bool() of a tensor); "
                                  "write it with torch.where or & / |")

    __index__ = __int__ = __float__ = __bool__

    # -- operators ----------------------------------------------------------------------------
    def _bin(self, other: Any, fmt: str, op: str, kind: str | None = None, swap: bool = False) -> "Sym":
        a, ka = _operand(self, self._b)
        o, ko = _operand(other, self._b)
        args = (_arg(self, self._b), _arg(other, self._b))
        if swap:
            a, o, ka, ko, args = o, a, ko, ka, args[::-1]
        return self._b.emit(fmt.format(a=a, b=o), kind or _promote(ka, ko), op, args)

    def _logic(self, other: Any, sym: str, op: str, swap: bool = False) -> "Sym":
        ko = _operand(other, self._b)[1]
        if self.kind == "float" or ko == "float":
            raise self._b.unsupported(f"'{sym}' on a float value")
        if self.kind == "bool" and (isinstance(other, bool) or (isinstance(other, torch.Tensor)
                                                              and other.numel() == 1)):
            val = bool(other.item()) if isinstance(other, torch.Tensor) else other
            if (sym == "&" and val) or (sym == "|" and not val):
                return self  # x & True, x | False: fold
            if sym in "&|":
                return val  # x & False -> False, x | True -> True
        return self._bin(other, "{a} " + sym + " {b}", op, swap=swap)

    def __add__(self, o): return self._bin(o, "{a} + {b}", "add")
    def __radd__(self, o): return self._bin(o, "{a} + {b}", "add", swap=True)
    def __sub__(self, o): return self._bin(o, "{a} - {b}", "sub")
    def __rsub__(self, o): return self._bin(o, "{a} - {b}", "sub", swap=True)
    def __mul__(self, o): return self._bin(o, "{a} * {b}", "mul")
    def __rmul__(self, o): return self._bin(o, "{a} * {b}", "mul", swap=True)
    def __truediv__(self, o): return self._bin(o, "{a} / {b}", "truediv", "float")
    def __rtruediv__(self, o): return self._bin(o, "{a} / {b}", "truediv", "float", swap=True)

    def _floor(self, o: Any, fn: str, op: str, swap: bool = False) -> "Sym":
        k = _promote(self.kind, _operand(o, self._b)[1])
        if k == "float":
            fmt = "tl.floor({a} / {b})" if fn == "lc_floordiv" else "{a} - {b} * tl.floor({a} / {b})"
            return self._bin(o, fmt, op, "float", swap)
        return self._bin(o, fn + "({a}, {b})", op, "int", swap)

    def __floordiv__(self, o): return self._floor(o, "lc_floordiv", "floordiv")
    def __rfloordiv__(self, o): return self._floor(o, "lc_floordiv", "floordiv", swap=True)
    def __mod__(self, o): return self._floor(o, "lc_floormod", "remainder")
    def __rmod__(self, o): return self._floor(o, "lc_floormod", "remainder", swap=True)
    def __neg__(self): return self._b.emit(f"-{self.name}", self.kind, "neg", (_arg(self, self._b),))
    def __pos__(self): return self
    def __abs__(self): return self._b.emit(f"tl.abs({self.name})", self.kind, "abs", (_arg(self, self._b),))
    def __and__(self, o): return self._logic(o, "&", "and")
    def __rand__(self, o): return self._logic(o, "&", "and", swap=True)
    def __or__(self, o): return self._logic(o, "|", "or")
    def __ror__(self, o): return self._logic(o, "|", "or", swap=True)
    def __xor__(self, o): return self._logic(o, "^", "xor")
    def __rxor__(self, o): return self._logic(o, "^", "xor", swap=True)

    def __invert__(self):
        if self.kind == "bool":
            return self._b.emit(f"{self.name} == 0", "bool", "not", (_arg(self, self._b),))
        if self.kind == "int":
            return self._b.emit(f"~{self.name}", "int", "invert", (_arg(self, self._b),))
        raise self._b.unsupported("'~' on a float value")

    def _cmp(self, o, sym, op): return self._bin(o, "{a} " + sym + " {b}", op, "bool")
    def __lt__(self, o): return self._cmp(o, "<", "lt")
    def __le__(self, o): return self._cmp(o, "<=", "le")
    def __gt__(self, o): return self._cmp(o, ">", "gt")
    def __ge__(self, o): return self._cmp(o, ">=", "ge")
    def __eq__(self, o): return self._cmp(o, "==", "eq")  # type: ignore[override]
    def __ne__(self, o): return self._cmp(o, "!=", "ne")  # type: ignore[override]
    __hash__ = object.__hash__

    # -- tensor-ish methods ---------------------------------------------------------------------
    def to(self, *args, **kwargs): return _cast(self, _dtype_of(args, kwargs))
    def long(self): return _cast(self, torch.int64)
    def int(self): return _cast(self, torch.int32)
    def bool(self): return _cast(self, torch.bool)
    def float(self): return _cast(self, torch.float32)
    def abs(self): return self.__abs__()
    def exp(self): return _TORCH_FNS["exp"](self._b, self)
    def expand(self, *a, **k): return self
    def expand_as(self, o): return self
    def clone(self): return self
    def contiguous(self): return self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        b = next(a._b for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, Sym))
        name = getattr(func, "__name__", str(func))
        handler = _TORCH_FNS.get(name)
        if handler is None:
            raise b.unsupported(f"torch.{name}")
        return handler(b, *args, **kwargs)


def _dtype_of(args: tuple, kwargs: dict) -> torch.dtype:
    for a in (*args, kwargs.get("dtype")):
        if isinstance(a, torch.dtype):
            return a
    return torch.int64


def _cast(x: Sym, dtype: torch.dtype) -> Sym:
    a = (_arg(x, x._b),)
    if dtype == torch.bool:
        return x if x.kind == "bool" else x._b.emit(f"{x.name} != 0", "bool", "to", a)
    if dtype.is_floating_point:
        return x if x.kind == "float" else x._b.emit(f"{x.name}.to(tl.float32)", "float", "to", a)
    return x if x.kind == "int" else x._b.emit(f"{x.name}.to(tl.int32)", "int", "to", a)


def _as_sym(b: _Builder, x: Any) -> Sym:
    if isinstance(x, Sym):
        return x
    text, kind = _lit(x, b)
    return Sym(b, text, kind, x.item() if isinstance(x, torch.Tensor) else x)


def _binary(method: str) -> Callable:
    def h(b: _Builder, x: Any, y: Any, *rest: Any, **kw: Any) -> Sym:
        if rest or kw.get("alpha", 1) != 1:
            raise b.unsupported(f"torch.{method} with extra arguments {rest or kw}")
        return getattr(_as_sym(b, x), method)(y)
    return h


def _div(b: _Builder, x: Any, y: Any, *, rounding_mode: str | None = None) -> Sym:
    xs = _as_sym(b, x)
    if rounding_mode == "floor":
        return xs.__floordiv__(y)
    if rounding_mode is None:
        return xs.__truediv__(y)
    raise b.unsupported(f"torch.div(rounding_mode={rounding_mode!r})")


def _where(b: _Builder, cond: Any, x: Any, y: Any) -> Sym:
    c = _operand(cond, b)[0]
    xo, kx = _operand(x, b)
    yo, ky = _operand(y, b)
    return b.emit(f"tl.where({c}, {xo}, {yo})", _promote(kx, ky), "where", (_arg(cond, b), _arg(x, b), _arg(y, b)))


def _minmax(fn: str) -> Callable:
    def h(b: _Builder, x: Any, y: Any) -> Sym:
        xo, kx = _operand(x, b)
        yo, ky = _operand(y, b)
        return b.emit(f"{fn}({xo}, {yo})", _promote(kx, ky), fn.split(".")[-1], (_arg(x, b), _arg(y, b)))
    return h


def _clamp(b: _Builder, x: Any, min: Any = None, max: Any = None) -> Sym:  # noqa: A002
    out = _as_sym(b, x)
    if min is not None:
        out = _minmax("tl.maximum")(b, out, min)
    if max is not None:
        out = _minmax("tl.minimum")(b, out, max)
    return out


def _unary(fmt: str, op: str, kind: str | None = None) -> Callable:
    def h(b: _Builder, x: Any) -> Sym:
        xs = _as_sym(b, x)
        if kind == "float" and xs.kind != "float":
            xs = _cast(xs, torch.float32)
        return b.emit(fmt.format(x=xs.name), kind or xs.kind, op, (_arg(xs, b),))
    return h


def _getitem(b: _Builder, table: Any, index: Any) -> Sym:
    """``table[h]``: a constant 1-D tensor gathered by a traced index -> a kernel table argument."""
    if not isinstance(table, torch.Tensor) or table.dim() != 1 or not isinstance(index, Sym):
        raise b.unsupported("tensor indexing other than a 1-D constant table indexed by one traced "
                            "value (per-head parameters: torch.tensor(values)[h])")
    if table.dtype.is_floating_point:
        vals, dt, kind = tuple(float(v) for v in table.tolist()), "float32", "float"
    elif table.dtype == torch.bool:
        vals, dt, kind = tuple(int(v) for v in table.tolist()), "int32", "int"
    else:
        vals, dt, kind = tuple(int(v) for v in table.tolist()), "int32", "int"
        if any(abs(v) > _INT32_MAX for v in vals):
            raise b.unsupported(f"a per-head table {vals} with values beyond int32")
    name = b.table(vals, dt)
    out = b.emit(f"tl.load({name} + {index.name})", kind, "table", (vals, dt, _arg(index, b)))
    return _cast(out, torch.bool) if table.dtype == torch.bool else out


def _identity(b: _Builder, x: Any, *a: Any, **k: Any) -> Any:
    return x


def _logical(method: str) -> Callable:
    def h(b: _Builder, x: Any, y: Any = None) -> Sym:
        xs = _cast(_as_sym(b, x), torch.bool)
        if method == "not":
            return ~xs
        return getattr(xs, method)(_cast(_as_sym(b, y), torch.bool))
    return h


_TORCH_FNS: dict[str, Callable] = {
    "add": _binary("__add__"), "__add__": _binary("__add__"), "__radd__": _binary("__radd__"),
    "sub": _binary("__sub__"), "__sub__": _binary("__sub__"), "__rsub__": _binary("__rsub__"),
    "mul": _binary("__mul__"), "__mul__": _binary("__mul__"), "__rmul__": _binary("__rmul__"),
    "div": _div, "true_divide": _binary("__truediv__"), "__truediv__": _binary("__truediv__"),
    "__rtruediv__": _binary("__rtruediv__"),
    "floor_divide": _binary("__floordiv__"), "__floordiv__": _binary("__floordiv__"),
    "__rfloordiv__": _binary("__rfloordiv__"),
    "remainder": _binary("__mod__"), "__mod__": _binary("__mod__"), "__rmod__": _binary("__rmod__"),
    "fmod": None,  # C semantics; listed to be refused by name below
    "eq": _binary("__eq__"), "__eq__": _binary("__eq__"), "ne": _binary("__ne__"),
    "__ne__": _binary("__ne__"), "lt": _binary("__lt__"), "__lt__": _binary("__lt__"),
    "le": _binary("__le__"), "__le__": _binary("__le__"), "gt": _binary("__gt__"),
    "__gt__": _binary("__gt__"), "ge": _binary("__ge__"), "__ge__": _binary("__ge__"),
    "bitwise_and": _binary("__and__"), "__and__": _binary("__and__"), "__rand__": _binary("__rand__"),
    "bitwise_or": _binary("__or__"), "__or__": _binary("__or__"), "__ror__": _binary("__ror__"),
    "bitwise_xor": _binary("__xor__"), "__xor__": _binary("__xor__"),
    "logical_and": _logical("__and__"), "logical_or": _logical("__or__"), "logical_not": _logical("not"),
    "bitwise_not": lambda b, x: ~_as_sym(b, x), "__invert__": lambda b, x: ~_as_sym(b, x),
    "neg": lambda b, x: -_as_sym(b, x), "__neg__": lambda b, x: -_as_sym(b, x),
    "where": _where, "maximum": _minmax("tl.maximum"), "minimum": _minmax("tl.minimum"),
    "clamp": _clamp, "clip": _clamp, "abs": _unary("tl.abs({x})", "abs"),
    "exp": _unary("tl.exp({x})", "exp", "float"), "log": _unary("tl.log({x})", "log", "float"),
    "sqrt": _unary("tl.sqrt({x})", "sqrt", "float"),
    "sigmoid": _unary("tl.sigmoid({x})", "sigmoid", "float"),
    # tanh through sigmoid: exact identity, available on every backend and in the interpreter
    "tanh": _unary("(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)", "tanh", "float"),
    "__getitem__": _getitem, "as_tensor": _identity, "__bool__": None,
    "to": lambda b, x, *a, **k: _cast(_as_sym(b, x), _dtype_of(a, k)),
    "long": lambda b, x: _cast(_as_sym(b, x), torch.int64),
    "bool": lambda b, x: _cast(_as_sym(b, x), torch.bool),
    "float": lambda b, x: _cast(_as_sym(b, x), torch.float32),
}
_TORCH_FNS = {k: v for k, v in _TORCH_FNS.items() if v is not None}

#: op names the printer understands (torch function names and Python operators)
SUPPORTED_OPS: frozenset[str] = frozenset(k.strip("_") for k in _TORCH_FNS)


# ------------------------------------------------------------------------------------------------
# entry points


def _owner(fn: Any, what: str) -> str:
    return f"{what} {getattr(fn, '__name__', repr(fn))!r}"


def _finish(b: _Builder, out: Any, name: str, want: str) -> PrintedFn:
    if isinstance(out, Sym):
        if want == "bool" and out.kind != "bool":
            out = _cast(out, torch.bool)
        if want == "float" and out.kind != "float":
            out = _cast(out, torch.float32)
        expr: str | None = out.name
    else:
        text, _ = _lit(out, b)
        if want == "bool":
            if text == "True":
                expr = None  # attends everywhere: nothing to apply
            else:
                expr = text
        else:
            expr = text
    result = _arg(out, b) if isinstance(out, Sym) else (out.item() if isinstance(out, torch.Tensor) else out)
    kind = out.kind if isinstance(out, Sym) else _lit(out, b)[1]
    return PrintedFn(tuple(b.lines), expr, tuple(b.tables), tuple(b.table_dtypes), frozenset(b.ops),
                     b.prefix, name, tuple(b.steps), result, kind)


def _call(fn: Callable, args: tuple, b: _Builder) -> Any:
    try:
        return fn(*args)
    except UnsupportedSpec:
        raise
    except Exception as exc:  # the callable did something the tracer cannot follow
        what = f"an operation that failed under tracing ({type(exc).__name__}: {exc})"
        raise b.unsupported(what) from exc


def print_mask_mod(mask_mod: Callable, prefix: str = "mm_") -> PrintedFn:
    """Trace ``mask_mod(b, h, q_idx, kv_idx)`` and print it as Triton statements.

    In the kernel, ``b`` and ``h`` are scalars or ``[M, 1]`` int32 tiles, ``q_idx`` ``[M, 1]`` and
    ``kv_idx`` ``[1, N]`` absolute positions; the result broadcasts to the ``[M, N]`` tile.

    >>> from lcpass.masks import causal_mask
    >>> print_mask_mod(causal_mask()).lines
    ('mm_0 = kv_idx <= q_idx',)
    """
    b = _Builder(prefix, _owner(mask_mod, "mask_mod"))
    args = tuple(Sym(b, n, "int") for n in ("b", "h", "q_idx", "kv_idx"))
    return _finish(b, _call(mask_mod, args, b), getattr(mask_mod, "__name__", "mask_mod"), "bool")


def print_score_mod(score_mod: Callable, prefix: str = "sm_") -> PrintedFn:
    """Trace ``score_mod(score, b, h, q_idx, kv_idx)`` (score = the scaled logits, natural units).

    >>> p = print_score_mod(lambda s, b, h, q, kv: 30.0 * torch.tanh(s / 30.0))   # softcap
    >>> p.expr
    'sm_2'
    """
    b = _Builder(prefix, _owner(score_mod, "score_mod"))
    args = (Sym(b, "score", "float"),) + tuple(Sym(b, n, "int") for n in ("b", "h", "q_idx", "kv_idx"))
    return _finish(b, _call(score_mod, args, b), getattr(score_mod, "__name__", "score_mod"), "float")
