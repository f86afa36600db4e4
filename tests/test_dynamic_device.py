"""Dynamic methods are device-agnostic: every tensor they create lives on the inputs' device.

There is no GPU in the CPU tier, so two checks stand in for a CUDA run:

1. **meta run** — q, k, v on the ``meta`` device (shapes only). A tensor created without
   ``device=`` lands on the CPU, and mixing it into a meta computation raises a device error, so
   every data-independent path of a selector / attend helper / score_mod is checked end to end
   (including what it calls outside ``lcpass.methods.dynamic``, e.g. the layout builder). The output
   must be on meta with the right shape.
2. **factory audit** — meta cannot run a path that needs a value on the host (HiP's halving loop,
   Squeezed's selection width, Routing's cluster sizes, TokenSelect's cache-hit test, the
   unmasked-chunk shortcut of the CPU gather). Those methods run on CPU inputs under a
   :class:`torch.overrides.TorchFunctionMode` that sees every call of a factory function (``arange``,
   ``zeros``, ``full``, ``tensor``, ``linspace``, ``randint``, ...) with the arguments *as written*
   and fails when a call made from ``lcpass/methods/dynamic/`` has no ``device=`` (or ``device=None``).
   A ``__torch_dispatch__`` mode cannot tell: at the dispatcher the default device is already
   filled in (``device=cpu``) and ``torch.tensor`` shows up as ``lift_fresh`` without one. The
   audit runs on every method and branch (prefill, decode, caches, learned weights, sampling), so
   it also guards the paths the meta run covers.

Removing one ``device=`` from the dynamic methods makes the audit fail (and, on a
data-independent path, the meta run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lcpass.methods.dynamic as dyn
from lcpass.methods.dynamic import (DYNAMIC_METHODS, SeerGate, TidalState, TokenSelection, dynamic_attention,
                                    dynamic_select)
from lcpass.methods.dynamic.common import _flash_cpu, _math_lse

D = 16
SCALE = D ** -0.5
DYN_DIR = str(Path(dyn.__file__).resolve().parent)
TORCH_DIR = str(Path(torch.__file__).resolve().parent)

# small shapes: awkward lengths (not multiples of the blocks), GQA (4 query heads on 2 KV heads), batch 2
PARAMS = {
    "quest": {"token_budget": 64, "page_size": 16, "share_kv_heads": False},
    "seer": {"topk": 3, "block_size": 16},
    "tokenselect": {"k": 8, "n_local": 4, "block_size": 16, "cache_threshold": -1.0},
    "hip": {"k": 16, "block_size_q": 16, "block_size_k": 4, "n_local": 4},
    "squeezed": {"budget": 0.3, "n_clusters": 8, "n_coarse": 2, "block_size": 16},
    "routing": {"n_clusters": 3, "window": 16, "update": True, "decay": 0.5},
    "hyper": {"min_seq_len": 16, "block_size": 8, "sample_size": 4},
    "longheads": {"chunk_size": 16, "trained_length": 32},
    "landmark": {"topk": 3, "block_size": 16},
    "cca": {"group_size": 4, "local_window": 16},
    "recycled": {"K": 8, "S": 3},
    "tidal": {"k": 8, "selection_layer": 0, "reselection_layer": 0},
    "selective": {"alpha": 0.1},
    "tempscale": {"temperature": 0.5},
    "entropy_abf": {"trained_length": 32},
    "pasta": {"alpha": 0.5},
}
DECODE = ("tokenselect", "recycled", "tidal")  # stateful decode branches: two decode steps after prefill
# paths that read a value on the host (documented `# host sync` in the code): factory audit only
HOST_VALUES = {"hip": "halving loop", "squeezed": "selection width K", "routing": "cluster sizes"}


def qkv(device, *, b=2, hq=4, n=75):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, D, generator=g) for h in (hq, 2, 2))
    return q.to(device), k.to(device), v.to(device)


def make_state(name: str) -> dict:
    st: dict = {"tidal": TidalState(), "layer": 1, "n_layers": 4, "spans": [(0, 10), (30, 40)]}
    if name == "pasta":
        st["heads"] = [1, 3]
    return st


def run_method(name: str, q, k, v, state: dict, *, decode_steps: int = 2) -> list:
    """Selection (if any) and attention; stateful methods prefill all but the last ``decode_steps``
    positions, then decode them one at a time (TidalDecode: a selection layer, then a reusing one)."""
    m = dyn._method(name)
    p = PARAMS[name]
    n = q.shape[2] - (decode_steps if name in DECODE else 0)
    steps = [(q[:, :, :n], k[:, :, :n], v[:, :, :n])]
    steps += [(q[:, :, t - 1:t], k[:, :, :t], v[:, :, :t]) for t in range(n + 1, q.shape[2] + 1)]
    res = []
    for qs, ks, vs in steps:
        if name == "tidal":  # the selection layer picks positions the next layer reuses
            sel_state = {**state, "layer": 0}
            res.append(dynamic_attention(name, qs, ks, vs, p, scale=SCALE, state=sel_state))
        if m.select is not None:
            res.append(dynamic_select(name, qs, ks, p, state=state))
        res.append(dynamic_attention(name, qs, ks, vs, p, scale=SCALE, state=state))
    return res


def tensors_of(res) -> list[torch.Tensor]:
    out = []
    for r in res:
        if isinstance(r, torch.Tensor):
            out.append(r)
        elif isinstance(r, TokenSelection):
            out.append(r.indices)
        else:  # BlockLayout
            out += [r.kv_num_blocks, r.kv_indices]
    return out


# ---------------------------------------------------------------------------------------------
# 1. meta run


@pytest.mark.parametrize("name", [m.name for m in DYNAMIC_METHODS if m.name not in HOST_VALUES])
def test_dynamic_method_runs_on_meta(name):
    q, k, v = qkv("meta")
    state = make_state(name)
    # TokenSelect's second decode step tests its cache with a host value: the audit covers it
    res = run_method(name, q, k, v, state, decode_steps=1 if name == "tokenselect" else 2)
    outs = [r for r in res if isinstance(r, torch.Tensor)]
    assert outs and all(o.device.type == "meta" for o in outs)
    assert tuple(outs[-1].shape) == ((2, 4, 1, D) if name in DECODE else tuple(q.shape))
    if dyn._method(name).granularity == "block":  # content-based layouts stay on the inputs' device
        assert all(t.device.type == "meta" for t in tensors_of(res))
    sels = [r for r in res if isinstance(r, TokenSelection)]
    assert all(r.indices.device.type == "meta" for r in sels)
    if name in ("tokenselect", "recycled", "tidal"):
        assert sels, f"{name}: no token selection was exercised"


@pytest.mark.parametrize("owner", ["token_attention", "selection_mask"])
def test_token_selection_executor_runs_on_meta(owner):
    q, k, v = qkv("meta", n=40)
    idx = torch.tensor([0, 3, -1, 7], device="meta").view(1, 1, 1, 4).expand(2, 2, 3, 4)
    sel = TokenSelection(idx.clone(), block_q=16, q_len=40, kv_len=40)
    if owner == "token_attention":
        out = dyn.token_attention(q, k, v, sel, scale=SCALE)
        assert out.device.type == "meta" and out.shape == q.shape
    else:
        m = dyn.selection_mask(sel, 4)
        assert m.device.type == "meta" and tuple(m.shape) == (2, 4, 40, 40)
        assert sel.block_starts().device.type == "meta"


# ---------------------------------------------------------------------------------------------
# 2. factory audit

_FACTORIES = {
    getattr(torch, f) for f in (
        "arange", "range", "zeros", "ones", "full", "empty", "empty_strided", "tensor", "as_tensor",
        "scalar_tensor", "linspace", "logspace", "eye", "tril_indices", "triu_indices", "rand", "randn",
        "randint", "randperm", "normal", "bernoulli", "zeros_like", "ones_like", "full_like", "empty_like",
        "rand_like", "randn_like", "randint_like",
    )
}
# *_like inherit the device of their input unless told otherwise: not audited
_INHERIT = {getattr(torch, f) for f in ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
                                        "randn_like", "randint_like")}


def _caller() -> tuple[str, int]:
    """File and line of the first frame outside torch and this test (who called the factory)."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(TORCH_DIR) or f.f_code.co_filename == __file__):
        f = f.f_back
    return (f.f_code.co_filename, f.f_lineno) if f is not None else ("?", 0)


class FactoryAudit(torch.overrides.TorchFunctionMode):
    """Records factory calls made from lcpass/methods/dynamic/ without an explicit ``device=``."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = 0
        self.missing: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and func not in _INHERIT:
            path, line = _caller()
            if path.startswith(DYN_DIR):
                self.checked += 1
                if kwargs.get("device") is None:
                    self.missing.append(f"{Path(path).name}:{line} torch.{func.__name__}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", [m.name for m in DYNAMIC_METHODS])
def test_every_factory_call_names_a_device(name):
    q, k, v = qkv("cpu")
    state = make_state(name)
    if name == "seer":  # the learned gate path (weights moved to q's device)
        eye = torch.eye(D)
        state["gate"] = SeerGate(torch.cat([eye, eye, eye], 1).expand(4, D, 3 * D).clone(),
                                 torch.block_diag(eye, eye, eye).expand(2, 3 * D, 3 * D).clone())
    with FactoryAudit() as audit:
        res = run_method(name, q, k, v, state)
        if name == "seer":
            res.append(dynamic_select(name, q, k, {"threshold": 0.2, "block_size": 16}))
        if name == "selective":  # and with learned query weights
            res.append(dynamic_attention(name, q, k, v, PARAMS[name], scale=SCALE,
                                         state={"selective_weight": torch.randn(4, D)}))
    assert audit.checked > 0 or name in ("tempscale", "entropy_abf", "cca"), "the audit saw no factory call"
    assert not audit.missing, f"{name}: factory calls without device=: {sorted(set(audit.missing))}"
    if name == "tokenselect":
        assert state.get("tokenselect_hits", 0) >= 1  # the cache-hit branch was audited too
    if name in ("recycled", "tidal"):
        assert any(isinstance(r, TokenSelection) for r in res)  # the reuse branch was audited too
    assert all(t.device.type == "cpu" for t in tensors_of(res))


def test_token_executor_factory_calls_name_a_device():
    q, k, v = qkv("cpu", n=40)
    idx = torch.tensor([0, 3, -1, 7]).view(1, 1, 1, 4).expand(2, 2, 3, 4)
    sel = TokenSelection(idx.clone(), block_q=16, q_len=40, kv_len=40)
    with FactoryAudit() as audit:
        dyn.token_attention(q, k, v, sel, scale=SCALE)
        dyn.selection_mask(sel, 4)
        sel.block_starts()
        dyn.hyper_attention(q, k, v, scale=SCALE, causal=False, block_size=8, sample_size=4)
    assert audit.checked > 0 and not audit.missing, sorted(set(audit.missing))


def test_audit_catches_a_factory_call_without_device():
    with FactoryAudit() as audit:
        exec(compile("torch.arange(3); torch.zeros(2, device='cpu')", str(Path(DYN_DIR) / "x.py"), "exec"))
    assert audit.checked == 2 and audit.missing == ["x.py:1 torch.arange"]


# ---------------------------------------------------------------------------------------------
# the portable (non-CPU) attention kernel equals the flash-for-CPU one


@pytest.mark.parametrize("case", ["plain", "causal", "mask"])
def test_math_lse_matches_flash_for_cpu(case):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 2, 12, D, generator=g), torch.randn(3, 2, 12, D, generator=g), \
        torch.randn(3, 2, 12, D, generator=g)
    kw: dict = {"scale": SCALE}
    seen = torch.ones(3, 2, 12, dtype=torch.bool)
    if case == "causal":
        kw["is_causal"] = True
    if case == "mask":
        keep = torch.rand(3, 1, 12, 12, generator=g) > 0.5
        keep[0, 0, 3] = False  # a row without keys (flash-for-CPU's lse there is arbitrary;
        seen = keep.any(-1).expand(3, 2, 12)  # attend_lse overwrites it): math gives out 0, lse -inf
        kw["attn_mask"] = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    o1, l1 = _flash_cpu(q, k, v, **kw)
    o2, l2 = _math_lse(q, k, v, **kw)
    assert (l1[seen] - l2[seen]).abs().max() < 1e-5
    assert (o1.float()[seen] - o2[seen]).abs().max() < 1e-5
    assert (l2[~seen] == float("-inf")).all() and (o2[~seen] == 0).all()
    assert not seen.all() or case != "mask"
