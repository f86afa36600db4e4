"""The method registry: one explicit, ordered table of attention methods, and per-site mask building.

A *method* (`Method`) is plain data plus fixed-signature factories; each family lives in its own module
(`dense`, `streaming`, `duo`, `razor`, `moa`, `s2`, `dilated`, `longlora`). The table below is the only
place methods are listed; registration is idempotent (registering the same record twice is a no-op,
a different record under a taken name is an error).

A site's heads may use different methods. `site_mask_mod` turns the per-head choices into one mask_mod,
combining them with `per_head_mask` and collapsing to a single mask when every head agrees.

Example:
    >>> from lcpass.methods import get_method, validate_params, site_mask_mod
    >>> validate_params("streaming", {"window": 256})
    {'sink': 4, 'window': 256}
    >>> mm = site_mask_mod([("streaming", {"window": 256})], n_heads=8, q_len=1024, kv_len=1024)
    >>> get_method("nope")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown attention method 'nope'; known methods: dense, causal, streaming, duo, ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lcpass import masks as M
from lcpass.methods.base import KVPolicy, Method, Param, check_param_value, resolve_params
from lcpass.methods.dense import CAUSAL, DENSE
from lcpass.methods.dilated import DILATED
from lcpass.methods.duo import DUO
from lcpass.methods.dynamic import DYNAMIC_METHODS
from lcpass.methods.longlora import LONGLORA, shifted_sparse_attention
from lcpass.methods.moa import MOA
from lcpass.methods.razor import RAZOR, compensated_attention, compress_kv
from lcpass.methods.s2 import S2
from lcpass.methods.streaming import STREAMING

__all__ = [
    "KVPolicy",
    "Method",
    "Param",
    "check_param_value",
    "compensated_attention",
    "compress_kv",
    "get_method",
    "head_mask_mod",
    "list_methods",
    "method_names",
    "register",
    "resolve_params",
    "shifted_sparse_attention",
    "kv_head_policies",
    "site_crossover",
    "site_kv_policies",
    "site_mask_mod",
    "spec_parts",
    "validate_params",
]

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the table (idempotent). A different record under a taken name is refused."""
    old = _REGISTRY.get(method.name)
    if old is not None and old != method:
        raise ValueError(
            f"attention method {method.name!r} is already registered with a different record; "
            f"pick another name"
        )
    _REGISTRY[method.name] = method
    return method


# The table: display and lookup order. Add new methods here, nowhere else.
for _m in (DENSE, CAUSAL, STREAMING, DUO, RAZOR, MOA, S2, DILATED, LONGLORA, *DYNAMIC_METHODS):
    register(_m)


def list_methods() -> tuple[Method, ...]:
    """Every registered method, in table order."""
    return tuple(_REGISTRY.values())


def method_names() -> tuple[str, ...]:
    """Names of every registered method, in table order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The method called `name`; ValueError listing the known methods otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown attention method {name!r}; known methods: {', '.join(_REGISTRY)}"
        ) from None


def validate_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check `params` for method `name`; return the complete dict (defaults filled).

    Raises ValueError naming the method, the parameter, the value and the allowed range.
    """
    return resolve_params(get_method(name), params)


def spec_parts(spec: Any) -> tuple[str, Mapping[str, Any]]:
    """(method, params) of a head spec: a `HeadSpec`-like object, a (name, params) pair, a name,
    or a {"method": ..., "params": ...} dict."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        return spec["method"], spec.get("params") or {}
    if isinstance(spec, tuple) and len(spec) == 2:
        return spec[0], spec[1] or {}
    if hasattr(spec, "method"):
        return spec.method, getattr(spec, "params", None) or {}
    raise TypeError(
        f"head spec {spec!r} is not understood; use HeadSpec(method, params), (method, params) or a name"
    )


def _expand(head_specs: Sequence[Any], n_heads: int) -> list[tuple[Method, dict[str, Any]]]:
    if len(head_specs) not in (1, n_heads):
        raise ValueError(
            f"{len(head_specs)} head specs for a site with {n_heads} heads; give one spec (all heads) "
            f"or exactly {n_heads}"
        )
    resolved = []
    for spec in head_specs:
        name, params = spec_parts(spec)
        method = get_method(name)
        resolved.append((method, resolve_params(method, params)))
    return resolved * n_heads if len(resolved) == 1 else resolved


def head_mask_mod(spec: Any, *, head: int, n_heads: int, q_len: int, kv_len: int) -> Any:
    """The mask_mod of one head under `spec` (params validated)."""
    name, params = spec_parts(spec)
    method = get_method(name)
    params = resolve_params(method, params)
    return method.mask_mod(params, head=head, n_heads=n_heads, q_len=q_len, kv_len=kv_len)


def site_mask_mod(head_specs: Sequence[Any], n_heads: int, q_len: int, kv_len: int) -> Any:
    """One mask_mod for a whole site whose heads may use different methods.

    `head_specs` has one entry (all heads) or `n_heads` entries. When every head has the same method
    and params and the method's mask does not depend on the head index, the result is that one mask;
    otherwise `per_head_mask` over the heads (identical heads share one mask object).

    Example:
        >>> duo = [("duo", {"retrieval": h == 0}) for h in range(4)]
        >>> site_mask_mod(duo, n_heads=4, q_len=512, kv_len=512).__name__.startswith("per_head")
        True
    """
    resolved = _expand(head_specs, n_heads)
    keys = [(m.name, tuple(sorted(p.items()))) for m, p in resolved]
    first_method = resolved[0][0]
    if len(set(keys)) == 1 and not first_method.per_head:
        return first_method.mask_mod(resolved[0][1], head=0, n_heads=n_heads, q_len=q_len, kv_len=kv_len)
    shared: dict[Any, Any] = {}
    masks = []
    for head, ((method, params), key) in enumerate(zip(resolved, keys)):
        if method.per_head:
            masks.append(method.mask_mod(params, head=head, n_heads=n_heads, q_len=q_len, kv_len=kv_len))
            continue
        if key not in shared:
            shared[key] = method.mask_mod(params, head=head, n_heads=n_heads, q_len=q_len, kv_len=kv_len)
        masks.append(shared[key])
    return M.per_head_mask(masks)


def site_kv_policies(head_specs: Sequence[Any], n_heads: int, kv_len: int) -> list[KVPolicy]:
    """The KV policy of every head of a site (one entry per query head).

    Example:
        >>> [p.kind for p in site_kv_policies([("duo", {"retrieval": h < 1}) for h in range(2)], 2, 4096)]
        ['all', 'sinks+recent']
    """
    return [m.kv_policy(p, kv_len=kv_len) for m, p in _expand(head_specs, n_heads)]


def kv_head_policies(head_specs: Sequence[Any], n_heads: int, n_kv_heads: int, kv_len: int) -> list[KVPolicy]:
    """The KV policy of every KV head (GQA): the query heads of a group share one cache entry.

    A KV head can only evict what none of its query heads needs, so when its query heads disagree it
    keeps everything ("all"); their masks still restrict what each query head reads.

    Example:
        >>> specs = [("duo", {"retrieval": h == 0}) for h in range(4)]
        >>> [p.kind for p in kv_head_policies(specs, 4, 2, 4096)]
        ['all', 'sinks+recent']
    """
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads} (GQA groups)")
    per_q = site_kv_policies(head_specs, n_heads, kv_len)
    group = n_heads // n_kv_heads
    out = []
    for g in range(n_kv_heads):
        members = set(per_q[g * group : (g + 1) * group])
        out.append(members.pop() if len(members) == 1 else KVPolicy.all())
    return out


def site_crossover(head_specs: Sequence[Any], n_heads: int) -> int:
    """KV length below which the whole site should run dense: the largest crossover among the
    methods of its heads (0 when every head is dense), since the site is lowered as one op.

    Example:
        >>> site_crossover([("dense", {}), ("streaming", {})], 2)
        2048
    """
    return max((m.crossover for m, _ in _expand(head_specs, n_heads)), default=0)
