"""The function route of the transformers door: attention written inline in a modeling file.

Some transformers models never call the attention interface: Falcon calls
``torch.nn.functional.scaled_dot_product_attention`` itself (and branches on the implementation's *name*),
Bloom and MPT spell ``baddbmm(alibi, q, kᵀ) -> softmax -> bmm``. The captured graph still shows each such
site and which call it is: its anchor (an SDPA call or a softmax) and that anchor's position among the
anchors of the same kind inside the site's module (:func:`lcpass.patterns.anchor_positions`). This route
installs, on exactly those modules, a :class:`~torch.overrides.TorchFunctionMode` active only while the
module runs (a forward pre-hook enters it, a forward hook that always runs leaves it), which counts the
module's SDPA and softmax calls and hands the site's own call to the site's plan:

* an **SDPA** call becomes :func:`lcpass.hf.site_attention` on its ``q, k, v`` and mask — the planned op,
  at engine speed, with the compressed KV cache when the key the model passes is the one the cache
  returned;
* a **softmax** call gets the method's keep-mask on its scores (``-inf`` elsewhere): the method's exact
  meaning at dense cost (the ALiBi models this serves are bias sites, which the graph door also lowers
  dense-masked). Positions count from each row's first real key, as the planned op's padding rule does;
  a dynamic (content-based) method needs q and k and is not applied on scores (the probe refuses it).

Every other call inside the module runs untouched. :mod:`lcpass.hf_probe` proves the route on a probe
forward (every site reached, outputs unchanged with the crossover disabled) before optimize keeps it.

Example::

    >>> install_inline(model, {"transformer.h.0.self_attention": [InlineSite(rt, "softmax", 0)]})
"""
from __future__ import annotations

import inspect as _inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lcpass.engine import element_mask
from lcpass.hf import HITS_ATTR, INLINE_ATTR, SITES_ATTR, SiteHits, SiteRuntime, site_attention
from lcpass.lower import claim_holds, crossover, is_dynamic_spec, site_mask

__all__ = ["InlineSite", "install_inline", "uninstall_inline", "SDPA_FUNCS", "SOFTMAX_FUNCS"]

SDPA_FUNCS = frozenset({F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention})
SOFTMAX_FUNCS = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, torch._softmax})
_INLINE_ATTR = INLINE_ATTR
_SDPA_SIG = _inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                               scale=None, enable_gqa=False: None)


@dataclass(frozen=True)
class InlineSite:
    """One site reached by the function route: its runtime, its anchor kind and position in the module."""

    runtime: SiteRuntime
    kind: str  # "sdpa" | "softmax"
    ordinal: int  # position among the module's calls of that kind, in execution order


class _InlineMode(TorchFunctionMode):
    """Active while one module runs: its site calls go to their plans, every other call runs as is."""

    def __init__(self, module: torch.nn.Module, sites: dict[tuple[str, int], int], n_heads: dict[int, int]):
        super().__init__()
        self.module = module
        self.sites = sites  # (kind, ordinal) -> index into the module's runtimes
        self.n_heads = n_heads
        self.count = {"sdpa": 0, "softmax": 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = "sdpa" if func in SDPA_FUNCS else "softmax" if func in SOFTMAX_FUNCS else None
        if kind is None:
            return func(*args, **kwargs)
        n = self.count[kind]
        self.count[kind] += 1
        index = self.sites.get((kind, n))
        if index is None:
            return func(*args, **kwargs)
        rt = getattr(self.module, SITES_ATTR)[index]
        hits = getattr(self.module, HITS_ATTR)[index]
        if kind == "sdpa":
            return _sdpa(self.module, rt, hits, func, args, kwargs)
        return _softmax(rt, hits, self.n_heads.get(index, 0), func, args, kwargs)


def _sdpa(module, rt: SiteRuntime, hits: SiteHits, func, args, kwargs):
    bound = _SDPA_SIG.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments

    def own():
        return func(*args, **kwargs)

    mask = a["attn_mask"]
    out = site_attention(rt, hits, module, a["query"], a["key"], a["value"], mask, float(a["dropout_p"] or 0.0),
                         a["scale"], own)
    return own() if out is None else out


def _softmax_dim(func, args, kwargs, x: torch.Tensor) -> Optional[int]:
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        return None
    return int(dim) % x.dim()


def _finite_floor(scores: torch.Tensor) -> float:
    """Scores at or below this are masked out (the model filled them with its dtype's minimum or -inf)."""
    return torch.finfo(scores.dtype).min / 2 if scores.is_floating_point() else -1e30


def _keep(rt: SiteRuntime, scores: torch.Tensor, n_heads: int) -> Optional[torch.Tensor]:
    """The method's keep-mask for ``scores`` [..., Sq, Sk] (same rank), positions relative to each row's
    first real key; None when the scores are not [B, H, Sq, Sk] or [B*H, Sq, Sk]."""
    sq, sk = scores.shape[-2], scores.shape[-1]
    if scores.dim() == 4:
        s4 = scores
    elif scores.dim() == 3 and n_heads and scores.shape[0] % n_heads == 0:
        s4 = scores.view(-1, n_heads, sq, sk)
    else:
        return None
    H = s4.shape[1]
    mask_mod = site_mask(rt.spec, H, sq, sk, bool(rt.is_causal), int(rt.window), int(rt.chunk))
    finite = _finite_floor(scores)
    valid = (s4 > finite).any(1).any(1)  # [B, Sk]: keys some query of the row sees
    if bool(valid.all()):
        keep = element_mask(mask_mod, 1, H, sq, sk, device=scores.device)  # [1, H|1, Sq, Sk]
    else:
        kpos = valid.long().cumsum(1) - 1  # row-relative positions, -1 before the first real key
        kpos = torch.where(valid, kpos, torch.full_like(kpos, -1))
        qpos = kpos[:, sk - sq:]  # the queries are the last Sq positions
        B = s4.shape[0]
        b = torch.arange(B, device=scores.device).view(-1, 1, 1, 1)
        h = torch.arange(H, device=scores.device).view(1, -1, 1, 1)
        keep = mask_mod(b, h, qpos.view(B, 1, sq, 1), kpos.view(B, 1, 1, sk)) & valid[:, None, None, :]
    keep = keep.expand(s4.shape[0] if keep.shape[0] != 1 else 1, H, sq, sk)
    return keep if scores.dim() == 4 else keep.expand(s4.shape[0], H, sq, sk).reshape(-1, sq, sk)


def _softmax(rt: SiteRuntime, hits: SiteHits, n_heads: int, func, args, kwargs):
    hits.calls += 1
    x = args[0]
    if rt.dense:
        return func(*args, **kwargs)
    if is_dynamic_spec(rt.spec):
        hits.fallback("a dynamic method on attention written inline with a softmax (needs q and k)")
        return func(*args, **kwargs)
    dim = _softmax_dim(func, args, kwargs, x)
    if dim != x.dim() - 1 or x.dim() < 3:
        hits.fallback(f"softmax over dim {dim} of a rank-{x.dim()} tensor is not over the keys")
        return func(*args, **kwargs)
    heads = x.shape[1] if x.dim() == 4 else n_heads
    if x.shape[-1] < crossover(rt.spec, heads):
        return func(*args, **kwargs)
    if (rt.is_causal or rt.window >= 0 or rt.chunk >= 1) and not claim_holds(
            x > _finite_floor(x), x.shape[-2], x.shape[-1], bool(rt.is_causal), int(rt.window), int(rt.chunk)):
        what = "to the chunks" if rt.chunk >= 1 else "causally" if rt.window < 0 else "to the window"
        hits.fallback(f"the scores at run time are not masked {what} as on the example inputs")
        return func(*args, **kwargs)
    keep = _keep(rt, x, n_heads)
    if keep is None:
        hits.fallback(f"scores of shape {tuple(x.shape)} have no head axis lcpass can read")
        return func(*args, **kwargs)
    x = x.masked_fill(~keep, float("-inf"))
    out = func(x, *args[1:], **kwargs)
    return torch.nan_to_num(out, nan=0.0)  # rows that see no key output zeros


def _enter(module, args, kwargs=None):
    state = getattr(module, _INLINE_ATTR)
    mode = _InlineMode(module, state["sites"], state["heads"])
    state["stack"].append(mode)
    mode.__enter__()


def _leave(module, args, *rest):
    state = getattr(module, _INLINE_ATTR, None)
    if state and state["stack"]:
        state["stack"].pop().__exit__(None, None, None)


def install_inline(model: torch.nn.Module, sites: dict[str, list[tuple[int, InlineSite]]],
                   n_heads: Optional[dict[str, dict[int, int]]] = None) -> None:
    """For each module path, the (runtime index, :class:`InlineSite`) pairs it holds: enter the function
    route around that module's forward. The runtimes themselves are installed by :func:`lcpass.hf.install`."""
    for path, items in sites.items():
        module = model.get_submodule(path)
        uninstall_module(module)
        hooks = [module.register_forward_pre_hook(_enter),
                 module.register_forward_hook(_leave, always_call=True)]
        setattr(module, _INLINE_ATTR, {"sites": {(s.kind, s.ordinal): i for i, s in items}, "stack": [],
                                       "hooks": hooks, "heads": (n_heads or {}).get(path, {})})


def uninstall_module(module: torch.nn.Module) -> None:
    state = module.__dict__.pop(_INLINE_ATTR, None)
    if state:
        for h in state["hooks"]:
            h.remove()


def uninstall_inline(model: torch.nn.Module) -> None:
    """Remove every function-route hook of ``model``."""
    for mod in model.modules():
        uninstall_module(mod)
