"""The shape every attention method shares: `Param`, `KVPolicy`, `Method`, and parameter checking.

A method is a frozen record of plain data plus three plain functions with fixed signatures:

    mask_mod(params, *, head, n_heads, q_len, kv_len) -> mask_mod   # what head `head` may attend to
    kv_policy(params, *, kv_len) -> KVPolicy                       # what the KV cache must keep
    score_mod(params, *, head, n_heads) -> score_mod | None         # optional score rewrite

`params` is always the *complete* dict returned by `resolve_params` (defaults filled, types checked,
ranges checked), so the functions never look up defaults themselves.

Example:
    >>> p = Param("window", "int", 1020, 1, None, "recent keys each query sees")
    >>> check_param_value("streaming", p, -3)
    Traceback (most recent call last):
    ...
    ValueError: streaming: parameter 'window' = -3 is out of range; allowed: window >= 1 (recent keys each query sees)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

ParamType = Literal["int", "float", "bool"]
Kind = Literal["dense", "static", "dynamic"]
Phase = Literal["prefill", "decode", "kv"]
KVKind = Literal["all", "sinks+recent", "compensated", "selected"]

PHASES: tuple[str, ...] = ("prefill", "decode", "kv")
KINDS: tuple[str, ...] = ("dense", "static", "dynamic")


@dataclass(frozen=True)
class Param:
    """One method parameter, named as in the method's paper.

    `low`/`high` are inclusive bounds (None = unbounded); ignored for "bool".

    Example:
        >>> Param("sink", "int", 4, 0, None, "initial tokens kept as attention sinks").default
        4
    """

    name: str
    type: ParamType
    default: Any
    low: float | None = None
    high: float | None = None
    doc: str = ""

    def range_text(self) -> str:
        """Human-readable allowed range, e.g. ``"1 <= window"`` or ``"true or false"``."""
        if self.type == "bool":
            return "true or false"
        if self.low is not None and self.high is not None:
            return f"{self.low} <= {self.name} <= {self.high}"
        if self.low is not None:
            return f"{self.name} >= {self.low}"
        if self.high is not None:
            return f"{self.name} <= {self.high}"
        return f"any {self.type}"


@dataclass(frozen=True)
class KVPolicy:
    """What one head must keep in its KV cache for decoding (plain data).

    kind: "all" (every token), "sinks+recent" (first `sink` + last `recent` tokens),
    "compensated" (sinks+recent plus one token summarising the dropped ones, RazorAttention),
    "selected" (a dynamic method keeps at most `budget` tokens it selects).

    Example:
        >>> KVPolicy.sinks_recent(4, 1020).kept(5000)
        1024
    """

    kind: KVKind = "all"
    sink: int = 0
    recent: int = 0
    budget: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("all", "sinks+recent", "compensated", "selected"):
            raise ValueError(
                f"KVPolicy kind {self.kind!r} is unknown; use 'all', 'sinks+recent', 'compensated' "
                f"or 'selected'"
            )
        for name in ("sink", "recent", "budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"KVPolicy {name}={getattr(self, name)} is negative; use a count >= 0")

    @staticmethod
    def all() -> "KVPolicy":
        """Keep every token."""
        return KVPolicy("all")

    @staticmethod
    def sinks_recent(sink: int, recent: int) -> "KVPolicy":
        """Keep the first `sink` and the last `recent` tokens."""
        return KVPolicy("sinks+recent", sink=sink, recent=recent)

    @staticmethod
    def compensated(sink: int, recent: int) -> "KVPolicy":
        """Keep sinks + recent and one compensation token for the dropped middle."""
        return KVPolicy("compensated", sink=sink, recent=recent)

    @staticmethod
    def selected(budget: int) -> "KVPolicy":
        """Keep at most `budget` selected tokens."""
        return KVPolicy("selected", budget=budget)

    def kept(self, kv_len: int) -> int:
        """Number of KV entries this head holds for a context of `kv_len` tokens."""
        if self.kind == "all":
            return kv_len
        if self.kind == "selected":
            return min(self.budget, kv_len)
        window = self.sink + self.recent
        if kv_len <= window:
            return kv_len
        return window + (1 if self.kind == "compensated" else 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"kind": self.kind, "sink": self.sink, "recent": self.recent, "budget": self.budget}


MaskFactory = Callable[..., Any]
KVFactory = Callable[..., KVPolicy]


def _all_kv(params: Mapping[str, Any], *, kv_len: int) -> KVPolicy:
    return KVPolicy.all()


@dataclass(frozen=True)
class Method:
    """A registered attention method (plain data + fixed-signature factories).

    `crossover`: below this KV length the lowering runs the site dense (the method's skipped work
    would not pay for the block-sparse bookkeeping, and short prompts must stay exact).
    `per_head`: the mask depends on the head index even with identical params (S2, LongLoRA), so a
    site whose heads all agree still needs one mask per head.

    Example:
        >>> from lcpass.methods import get_method
        >>> get_method("streaming").kind
        'static'
    """

    name: str
    paper: str
    summary: str
    params: tuple[Param, ...]
    kind: Kind
    phases: frozenset[str]
    needs_calibration: bool
    crossover: int
    mask_mod: MaskFactory
    kv_policy: KVFactory = _all_kv
    score_mod: Callable[..., Any] | None = None
    per_head: bool = False
    crossover_why: str = ""
    # a rewrite of the model besides its attention: the RoPE base this method's heads need
    # (``rope_base(params) -> base``; 0 = none), applied by the pipeline (:func:`lcpass.rope.apply_plan_rope`)
    rope_base: Callable[[Mapping[str, Any]], float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        bad = set(self.phases) - set(PHASES)
        if bad:
            raise ValueError(f"method {self.name!r}: phases {sorted(bad)} are not in {PHASES}")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name!r}: duplicate parameter names in {names}")
        if self.crossover < 0:
            raise ValueError(f"method {self.name!r}: crossover {self.crossover} must be >= 0")

    def param(self, name: str) -> Param:
        """The `Param` called `name`; ValueError listing the method's parameters otherwise."""
        for p in self.params:
            if p.name == name:
                return p
        raise ValueError(
            f"method {self.name!r} has no parameter {name!r}; its parameters are "
            f"{[p.name for p in self.params] or 'none'}"
        )

    def defaults(self) -> dict[str, Any]:
        """The default value of every parameter, in declaration order."""
        return {p.name: p.default for p in self.params}


def check_param_value(method: str, p: Param, value: Any) -> Any:
    """Check one value against its `Param`; return it coerced (int-valued float -> int for "int").

    Raises ValueError naming the method, the parameter, the value and the allowed range.
    """
    where = f"{method}: parameter {p.name!r} = {value!r}"
    if p.type == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} is not a bool; allowed: {p.range_text()}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} is not a number; allowed: {p.range_text()} ({p.type})")
    if p.type == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{where} is not an integer; allowed: {p.range_text()} (int)")
            value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where} is not finite; allowed: {p.range_text()}")
    if (p.low is not None and value < p.low) or (p.high is not None and value > p.high):
        doc = f" ({p.doc})" if p.doc else ""
        raise ValueError(f"{where} is out of range; allowed: {p.range_text()}{doc}")
    return value


def resolve_params(method: Method, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fill defaults, reject unknown names, check every value; return a new complete dict.

    Example:
        >>> from lcpass.methods import get_method
        >>> resolve_params(get_method("streaming"), {"window": 64})
        {'sink': 4, 'window': 64}
    """
    params = dict(params or {})
    known = {p.name for p in method.params}
    unknown = [k for k in params if k not in known]
    if unknown:
        raise ValueError(
            f"{method.name}: unknown parameter(s) {unknown}; allowed: "
            f"{[p.name for p in method.params] or 'none'}"
        )
    out: dict[str, Any] = {}
    for p in method.params:
        out[p.name] = check_param_value(method.name, p, params.get(p.name, p.default))
    return out
