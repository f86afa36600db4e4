"""Public entry points of lcpass.codegen: attention / decode_attention / available / source.

The lowering calls :func:`attention` (prefill, any query length) and :func:`decode_attention` (one
query block, split-KV) when ``backend="triton"``, or on CUDA with ``"auto"``; before that it asks
:func:`available` and falls back to the CPU engine with a warning when the answer is no (or uses
:func:`attention_or_fallback`, which does exactly that).

>>> from lcpass.layout import build_layout
>>> from lcpass.masks import sliding_window_mask
>>> lay = build_layout(sliding_window_mask(512), 8, 4096, 4096, 128)
>>> q = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)   # doctest: +SKIP
>>> k = v = torch.randn(1, 2, 4096, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
>>> out = attention(q, k, v, lay, scale=128 ** -0.5)          # [1, 8, 4096, 128]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from lcpass.codegen import launch
from lcpass.codegen.cache import load_by_key, load_kernel
from lcpass.codegen.printer import PrintedFn, UnsupportedSpec, print_mask_mod, print_score_mod
from lcpass.codegen.headdim import common_head_dim
from lcpass.codegen.spec import KernelSpec, check_head_dim, render
from lcpass.engine import sparse_attention, with_sinks
from lcpass.layout import DEFAULT_BLOCK_SIZE, BlockLayout, build_layout
from lcpass.masks import MaskMod, causal_mask, full_mask

__all__ = ["AttentionSpec", "PreparedAttention", "attention", "decode_attention",
           "attention_or_fallback", "available", "generate_source", "kernel_specs", "choose_tiles",
           "prepare_attention", "prepare_decode"]

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ------------------------------------------------------------------------------------------------
# spec construction


@functools.lru_cache(maxsize=256)
def _print_mask(mask_mod: Any) -> PrintedFn:
    return print_mask_mod(mask_mod)


@functools.lru_cache(maxsize=64)
def _print_score(score_mod: Any) -> PrintedFn:
    return print_score_mod(score_mod)


def printed(mask_mod: Any, score_mod: Any) -> tuple[PrintedFn | None, PrintedFn | None]:
    """Printed (cached) mask_mod and score_mod; ``None`` for absent ones."""
    pm = None if mask_mod is None else _print_mask(mask_mod)
    if pm is not None and pm.expr is None and not pm.lines:
        pm = None  # attends everywhere
    ps = None if score_mod is None else _print_score(score_mod)
    return pm, ps


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise UnsupportedSpec(f"dtype {dtype} is not supported by the Triton templates; use float32, "
                              f"float16 or bfloat16, or the CPU engine") from None


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def choose_tiles(head_dim: int, dtype: torch.dtype, sparse_q: int, sparse_kv: int,
                 kind: str = "prefill") -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for a layout block: 128 x 64 for 16-bit d <= 128 (H100/H200 FlexAttention
    default), 64 x 64 for fp32 or d > 128, 64 x 32 for d = 256; clipped to divide the layout block.
    Decode returns BLOCK_N only in the second slot (BLOCK_M is the packed group)."""
    bd = check_head_dim(head_dim)
    if kind == "decode":
        bm, bn = 16, 128 if bd <= 128 else 64
    elif dtype == torch.float32 or bd > 128:
        bm, bn = 64, 32 if bd > 128 else 64
    else:
        bm, bn = 128, 64
    bm = min(bm, _pow2_floor(sparse_q & -sparse_q))  # largest power of two dividing the block
    bn = min(bn, _pow2_floor(sparse_kv & -sparse_kv))
    return bm, bn


def _spec(template: str, head_dim: int, group: int, dtype: torch.dtype, block_size: tuple[int, int],
          mask_mod: Any, score_mod: Any, layout: str = "csr", tiles: tuple[int, int] | None = None,
          options: tuple = ()) -> KernelSpec:
    pm, ps = printed(mask_mod, score_mod)
    if template == "attn_bwd" and ps is not None:
        raise UnsupportedSpec("a score_mod in the backward kernel is not supported (its derivative "
                              "is not generated); train without score_mod or use the CPU engine")
    kind = "decode" if template == "attn_decode" else "prefill"
    bm, bn = tiles or choose_tiles(head_dim, dtype, *block_size, kind=kind)
    return KernelSpec(template, head_dim, bm, bn, block_size[0], block_size[1], group=group,
                      dtype=_dtype_name(dtype), layout=layout, mask=pm, score=ps, options=options)


_KEYS: dict[tuple, str] = {}


def _kernel_key(template: str, head_dim: int, group: int, dtype: torch.dtype,
                block_size: tuple[int, int], mask_mod: Any, score_mod: Any, layout: str = "csr",
                tiles: tuple[int, int] | None = None) -> str:
    """Spec key of the (loaded) kernel for these arguments, memoised: the per-call host cost of a
    warm call is one dict lookup, not a spec hash (decode steps are launch-bound)."""
    memo = (template, head_dim, group, dtype, tuple(block_size), mask_mod, score_mod, layout, tiles)
    key = _KEYS.get(memo)
    if key is None:
        spec = _spec(template, head_dim, group, dtype, tuple(block_size), mask_mod, score_mod,
                     layout=layout, tiles=tiles)
        key = _KEYS[memo] = load_kernel(spec).SPEC_KEY
    return key


def _backend_ok(device: torch.device) -> None:
    try:
        import triton  # noqa: F401  # lazy: triton is optional (Linux x86-64 only); this probes for it
    except ImportError:
        raise UnsupportedSpec("triton is not installed; pip install triton (Linux x86-64) or use the "
                              "CPU engine") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedSpec("CUDA is not available in this process; generated kernels need a "
                                  "GPU (use the CPU engine)")
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise UnsupportedSpec(f"tensors on {device} cannot run generated Triton kernels (CUDA only; CPU "
                          f"tensors only under TRITON_INTERPRET=1, for tests); use the CPU engine")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, owner: str) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{owner}: q [B, Hq, Sq, D] and k, v [B, Hkv, Sk, D] expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"{owner}: batch and head_dim must match and Hkv={k.shape[1]} divide "
                         f"Hq={q.shape[1]}: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"{owner}: Sq={q.shape[2]} > Sk={k.shape[2]}; queries are the last Sq keys")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{owner}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{owner}: q, k, v devices differ ({q.device}, {k.device}, {v.device})")


def _check_keep(kv_keep: Tensor | None, q: Tensor, k: Tensor, owner: str) -> None:
    if kv_keep is None:
        return
    want = (q.shape[0], k.shape[2])
    if kv_keep.dtype != torch.bool or tuple(kv_keep.shape) != want or kv_keep.device != q.device:
        raise ValueError(f"{owner}: kv_keep must be Bool[B={want[0]}, Sk={want[1]}] on {q.device}, "
                         f"got {kv_keep.dtype} {tuple(kv_keep.shape)} on {kv_keep.device}")


def _check_layout(layout: BlockLayout, q: Tensor, k: Tensor, owner: str) -> None:
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    if (layout.q_len, layout.kv_len) != (Sq, Sk) or layout.n_heads != Hq or layout.batch not in (1, B):
        raise ValueError(f"{owner}: layout is for q_len={layout.q_len}, kv_len={layout.kv_len}, "
                         f"{layout.n_heads} heads, batch {layout.batch}, but q is {tuple(q.shape)} and "
                         f"k {tuple(k.shape)}; build_layout(mask, {Hq}, {Sq}, {Sk})")


def _tracing(ts: tuple) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return torch.compiler.is_compiling() or any(isinstance(t, FakeTensor) for t in ts)


def _on(layout: BlockLayout, device: torch.device, what: str, make: Callable[[], tuple]) -> tuple:
    """Layout-derived tensors on ``device``, cached on the layout (never while tracing)."""
    key = ("codegen", what, str(device))
    got = layout._cache.get(key)
    if got is None:
        got = tuple(t if t.device == device and t.is_contiguous() else t.to(device).contiguous()
                    for t in make())
        if not _tracing(got):
            layout._cache[key] = got
    return got


def _csr_lists(layout: BlockLayout, device: torch.device) -> tuple[Tensor, ...]:
    return _on(layout, device, "csr", lambda: (layout.kv_num_blocks, layout.kv_indices,
                                               layout.full_kv_num_blocks, layout.full_kv_indices))


_TABLES: dict[tuple, tuple[Tensor, ...]] = {}


def _tables(p: PrintedFn | None, device: torch.device) -> tuple[Tensor, ...]:
    if p is None or not p.tables:
        return ()
    key = (p.tables, p.table_dtypes, str(device))
    got = _TABLES.get(key)
    if got is None:
        got = tuple(p.table_tensors(device))
        if not _tracing(got):
            _TABLES[key] = got
    return got


def _all_tables(mask_mod: Any, score_mod: Any, device: torch.device) -> list[Tensor]:
    pm, ps = printed(mask_mod, score_mod)
    return [*_tables(pm, device), *_tables(ps, device)]


# ------------------------------------------------------------------------------------------------
# entry points


@common_head_dim
def attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout | None, *, scale: float,
              mask_mod: MaskMod | None = None, score_mod: ScoreMod | None = None,
              tiles: tuple[int, int] | None = None, kv_keep: Tensor | None = None,
              sinks: Tensor | None = None) -> Tensor:
    """Block-sparse attention with a generated Triton kernel (differentiable when the inputs
    require grad: the generated backward runs; no score_mod then).

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]`` (GQA: kv head = h // (Hq // Hkv)); queries at
    absolute positions ``Sk - Sq + i``. ``layout`` lists the partial/full blocks (per query head);
    ``mask_mod`` (default ``layout.mask_mod``) is applied on partial blocks only; ``score_mod`` on
    every computed score (natural units, before the mask). ``layout=None`` runs the dense kernel of
    ``mask_mod`` (None/full: every key; causal: the causal triangle; anything else: its layout at the
    default block size). ``kv_keep: Bool[B, Sk]`` (True = real key) masks padding on every tile;
    rows that see no key return zeros. ``sinks`` (broadcastable to ``Float[B, Hq, Sq]``, e.g.
    ``[1, Hq, 1]``): one more logit per row that attends nothing (learned attention sinks, gpt-oss);
    the softmax starts from it inside the kernel, and its gradient is returned when it requires
    grad. Raises :class:`UnsupportedSpec` naming what cannot be generated.

    >>> out = attention(q, k, v, build_layout(causal_mask(), 8, 4096, 4096), scale=0.088)  # doctest: +SKIP
    """
    _check_inputs(q, k, v, "codegen.attention")
    _check_keep(kv_keep, q, k, "codegen.attention")
    _backend_ok(q.device)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    if layout is None:
        mm = mask_mod if mask_mod is not None else full_mask()
        if not grad and mm in (full_mask(), causal_mask()):
            return _dense(q, k, v, mm, scale, score_mod, tiles, kv_keep, sinks)
        layout = build_layout(mm, Hq, Sq, Sk, DEFAULT_BLOCK_SIZE)
    _check_layout(layout, q, k, "codegen.attention")
    prep = prepare_attention(layout, head_dim=D, n_heads=Hq, n_kv_heads=Hkv, dtype=q.dtype,
                             device=q.device, scale=scale, mask_mod=mask_mod, score_mod=score_mod,
                             backward=grad, tiles=tiles)
    return prep(q, k, v, kv_keep, sinks)


@dataclass(frozen=True, eq=False)
class PreparedAttention:
    """Everything host-side of one site, resolved once: kernel keys, layout lists and per-head
    tables on the device. Calling it issues only the custom op (or, in eager, the launch), so a
    lowering can build it at rewrite time and torch.compile(fullgraph=True) traces one op node.

    >>> prep = prepare_attention(lay, head_dim=128, n_heads=32, n_kv_heads=8,   # doctest: +SKIP
    ...                          dtype=torch.bfloat16, device="cuda", scale=128 ** -0.5)
    >>> out = prep(q, k, v)                                                     # doctest: +SKIP
    """

    key: str
    bwd_key: str
    lists: tuple[Tensor, ...]
    tables: tuple[Tensor, ...]
    scale: float
    decode: bool = False
    n_splits: int = 0

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, kv_keep: Tensor | None = None,
                 sinks: Tensor | None = None) -> Tensor:
        import lcpass.codegen.ops  # noqa: F401  # lazy: triton_op loads torch._inductor and triton (~1 s)

        sink = _sinks_or_empty(sinks, q)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, sink))
        if _eager(q, k, v, sink) and not grad:  # same kernels without the custom-op layer
            if self.decode:
                return launch.decode(load_by_key(self.key), q, k, v, self.lists, self.tables,
                                     self.scale, self.n_splits, kv_keep=kv_keep, sinks=sink)
            return launch.fwd(load_by_key(self.key), q, k, v, *self.lists, self.tables, self.scale,
                              store_lse=False, kv_keep=kv_keep, sinks=sink)[0]
        if self.decode:
            if grad:
                raise UnsupportedSpec("the decode kernel has no backward; call codegen.attention "
                                      "(prefill kernels) with inputs that require grad")
            return torch.ops.lcpass_codegen.sparse_decode(
                q, k, v, *self.lists, list(self.tables), self.scale, self.key, self.n_splits,
                _keep_or_empty(kv_keep, q), sink)
        if grad and not self.bwd_key:
            raise UnsupportedSpec("inputs require grad but this PreparedAttention has no backward "
                                  "kernel; prepare it with backward=True")
        return torch.ops.lcpass_codegen.sparse_attention(
            q, k, v, *self.lists, list(self.tables), self.scale, self.key, self.bwd_key,
            _keep_or_empty(kv_keep, q), sink)[0]


def prepare_attention(layout: BlockLayout, *, head_dim: int, n_heads: int, n_kv_heads: int,
                      dtype: torch.dtype, device: torch.device | str, scale: float,
                      mask_mod: MaskMod | None = None, score_mod: ScoreMod | None = None,
                      backward: bool = False, tiles: tuple[int, int] | None = None
                      ) -> PreparedAttention:
    """Resolve the prefill kernels of a site (generated and cached on first use) for ``layout``.

    ``backward=True`` also generates the backward kernel (no score_mod then)."""
    device = torch.device(device)
    _backend_ok(device)
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"prepare_attention: n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
    mm = mask_mod if mask_mod is not None else layout.mask_mod
    G = n_heads // n_kv_heads
    key = _kernel_key("attn_fwd", head_dim, G, dtype, layout.block_size, mm, score_mod, tiles=tiles)
    bwd_key = ""
    if backward:
        if score_mod is not None:
            raise UnsupportedSpec("a score_mod in the backward kernel is not supported (its "
                                  "derivative is not generated); train without score_mod or use the "
                                  "CPU engine")
        bwd_key = _kernel_key("attn_bwd", head_dim, G, dtype, layout.block_size, mm, None,
                              tiles=tiles)
    return PreparedAttention(key, bwd_key, _csr_lists(layout, device),
                             tuple(_all_tables(mm, score_mod, device)), float(scale))


def _eager(*ts: Tensor) -> bool:
    """Plain tensors outside torch.compile/export: launch directly (the op adds ~75 us per call,
    measured on H200); traced calls go through the custom op so graphs see one node."""
    return not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in ts)


def _dense(q: Tensor, k: Tensor, v: Tensor, mm: MaskMod, scale: float, score_mod: Any,
           tiles: tuple[int, int] | None, kv_keep: Tensor | None = None,
           sinks: Tensor | None = None) -> Tensor:
    """The dense generated kernel: implicit causal / full tiles, no lists to read."""
    import lcpass.codegen.ops  # noqa: F401  # lazy: triton_op loads torch._inductor and triton (~1 s)

    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    kind = "causal" if mm == causal_mask() else "full"
    bm, bn = tiles or choose_tiles(D, q.dtype, 128, 128)
    key = _kernel_key("attn_fwd", D, Hq // Hkv, q.dtype, (bm, bn), mm if kind == "causal" else None,
                      score_mod, layout=kind, tiles=(bm, bn))
    dummy_n = torch.zeros((1, 1, 1), dtype=torch.int32, device=q.device)
    dummy_i = torch.zeros((1, 1, 1, 1), dtype=torch.int32, device=q.device)
    out, _ = torch.ops.lcpass_codegen.sparse_attention(
        q, k, v, dummy_n, dummy_i, dummy_n, dummy_i,
        _all_tables(mm if kind == "causal" else None, score_mod, q.device), float(scale), key, "",
        _keep_or_empty(kv_keep, q), _sinks_or_empty(sinks, q))
    return out


def _keep_or_empty(kv_keep: Tensor | None, q: Tensor) -> Tensor:
    """The ops take no optional tensors: an empty Bool tensor stands for 'no key padding'."""
    return kv_keep if kv_keep is not None else q.new_empty((0,), dtype=torch.bool)


def _sinks_or_empty(sinks: Tensor | None, q: Tensor) -> Tensor:
    """Sink logits broadcast to Float[B, Hq, Sq] (one per row), or an empty tensor for none."""
    if sinks is None or sinks.numel() == 0:
        return q.new_empty((0,), dtype=torch.float32)
    B, Hq, Sq = q.shape[:3]
    if sinks.dim() == 4 and sinks.shape[-1] == 1:  # the planned op's [B, Hq, Sq, 1]
        sinks = sinks[..., 0]
    try:
        return sinks.to(q.device, torch.float32).expand(B, Hq, Sq).contiguous()
    except RuntimeError:
        raise ValueError(f"sinks of shape {tuple(sinks.shape)} do not broadcast to one logit per "
                         f"(batch, head, query) [{B}, {Hq}, {Sq}]; pass e.g. sinks[None, :, None] "
                         f"for per-head sinks [{Hq}]") from None


@common_head_dim
def decode_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, scale: float,
                     mask_mod: MaskMod | None = None, score_mod: ScoreMod | None = None,
                     n_splits: int | None = None, block_n: int | None = None,
                     kv_keep: Tensor | None = None, sinks: Tensor | None = None) -> Tensor:
    """Split-KV decode with a generated kernel: grid ``(B, Hkv, n_splits)``, the ``G * Sq`` query
    rows of a GQA group packed into one tile (padded to >= 16), the group's selected blocks split
    across programs and merged by log-sum-exp.

    ``layout`` must have ONE query block (``Sq <= block_size[0]``); heads of a group may list
    different blocks (each row keeps its own head's blocks exactly). ``n_splits`` defaults to
    enough programs for ~2x the SMs of an H100/H200. ``sinks`` as in :func:`attention` (applied
    in the split merge).

    >>> out = decode_attention(q[:, :, -1:], k, v, lay1, scale=0.088)   # doctest: +SKIP
    """
    _check_inputs(q, k, v, "codegen.decode_attention")
    _check_keep(kv_keep, q, k, "codegen.decode_attention")
    _backend_ok(q.device)
    B, Hq, Sq, D = q.shape
    _check_layout(layout, q, k, "codegen.decode_attention")
    prep = prepare_decode(layout, head_dim=D, n_heads=Hq, n_kv_heads=k.shape[1], dtype=q.dtype,
                          device=q.device, scale=scale, batch=B, mask_mod=mask_mod,
                          score_mod=score_mod, n_splits=n_splits, block_n=block_n)
    return prep(q, k, v, kv_keep, sinks)


def prepare_decode(layout: BlockLayout, *, head_dim: int, n_heads: int, n_kv_heads: int,
                   dtype: torch.dtype, device: torch.device | str, scale: float, batch: int = 1,
                   mask_mod: MaskMod | None = None, score_mod: ScoreMod | None = None,
                   n_splits: int | None = None, block_n: int | None = None) -> PreparedAttention:
    """Resolve the split-KV decode kernel of a site for ``layout`` (one query block): kernel key,
    per-KV-head block lists with per-head bits, tables and the number of splits."""
    device = torch.device(device)
    _backend_ok(device)
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"prepare_decode: n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
    G = n_heads // n_kv_heads
    Sq = layout.q_len
    if layout.num_q_blocks != 1:
        raise UnsupportedSpec(f"decode_attention: the layout has {layout.num_q_blocks} query blocks "
                              f"(Sq={Sq} > block {layout.block_size[0]}); use codegen.attention")
    rows = G * Sq
    if rows > 128:
        raise UnsupportedSpec(f"decode_attention: G * Sq = {G} * {Sq} = {rows} query rows exceed one "
                              f"128-row tile; use codegen.attention for this many queries")
    if G > 31:
        raise UnsupportedSpec(f"decode_attention: GQA group {G} > 31 (per-head bits are int32)")
    bm = max(16, 1 << (rows - 1).bit_length())
    _, bn = choose_tiles(head_dim, dtype, layout.block_size[0], layout.block_size[1], kind="decode")
    bn = block_n or bn
    mm = mask_mod if mask_mod is not None else layout.mask_mod
    key = _kernel_key("attn_decode", head_dim, G, dtype, layout.block_size, mm, score_mod,
                      tiles=(bm, bn))
    lists = _on(layout, device, f"decode{n_kv_heads}", lambda: launch.decode_lists(
        layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices,
        n_kv_heads))
    splits = n_splits or launch.decode_splits(batch, n_kv_heads, layout.num_kv_blocks)
    return PreparedAttention(key, "", lists, tuple(_all_tables(mm, score_mod, device)), float(scale),
                             decode=True, n_splits=int(splits))


def attention_or_fallback(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, scale: float,
                          mask_mod: MaskMod | None = None, score_mod: ScoreMod | None = None,
                          kv_keep: Tensor | None = None, sinks: Tensor | None = None) -> Tensor:
    """:func:`attention` (or :func:`decode_attention` for one-query-block layouts), and on
    :class:`UnsupportedSpec` a warning naming the reason and the CPU engine's result instead."""
    try:
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
        rows = q.shape[2] * (q.shape[1] // k.shape[1])
        if layout.num_q_blocks == 1 and layout.q_len < layout.kv_len and rows <= 128 and not grad:
            return decode_attention(q, k, v, layout, scale=scale, mask_mod=mask_mod,
                                    score_mod=score_mod, kv_keep=kv_keep, sinks=sinks)
        return attention(q, k, v, layout, scale=scale, mask_mod=mask_mod, score_mod=score_mod,
                         kv_keep=kv_keep, sinks=sinks)
    except UnsupportedSpec as exc:
        warnings.warn(f"lcpass.codegen: falling back to the CPU engine: {exc}", stacklevel=2)
        if sinks is None:
            return sparse_attention(q, k, v, layout, scale=scale, mask_mod=mask_mod,
                                    score_mod=score_mod, kv_keep=kv_keep, dense_below=0)
        out, lse = sparse_attention(q, k, v, layout, scale=scale, mask_mod=mask_mod, score_mod=score_mod,
                                    kv_keep=kv_keep, dense_below=0, return_lse=True)
        return with_sinks(out, lse, _sinks_or_empty(sinks, q)[..., None])


# ------------------------------------------------------------------------------------------------
# availability and source


@dataclass(frozen=True)
class AttentionSpec:
    """What a lowering knows about a site before running it (the question :func:`available` answers).

    ``kind``: ``"prefill"``, ``"decode"`` or ``"backward"``; ``device``: where the tensors live.
    """

    head_dim: int
    mask_mod: Any = None
    score_mod: Any = None
    dtype: torch.dtype = torch.bfloat16
    n_heads: int = 1
    n_kv_heads: int = 1
    block_size: tuple[int, int] = (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE)
    kind: str = "prefill"
    device: str = "cuda"


_TEMPLATE_OF = {"prefill": "attn_fwd", "decode": "attn_decode", "backward": "attn_bwd"}


def kernel_specs(spec: AttentionSpec) -> list[KernelSpec]:
    """The KernelSpec(s) ``spec`` needs (raises UnsupportedSpec naming what cannot be generated)."""
    if spec.kind not in _TEMPLATE_OF:
        raise UnsupportedSpec(f"AttentionSpec.kind={spec.kind!r}; use one of {tuple(_TEMPLATE_OF)}")
    if spec.n_kv_heads < 1 or spec.n_heads % spec.n_kv_heads:
        raise UnsupportedSpec(f"n_kv_heads={spec.n_kv_heads} does not divide n_heads={spec.n_heads}")
    G = spec.n_heads // spec.n_kv_heads
    bs = tuple(spec.block_size) if not isinstance(spec.block_size, int) else (spec.block_size,) * 2
    out = []
    if spec.kind == "decode":
        if G > 31:
            raise UnsupportedSpec(f"decode: GQA group {G} > 31 (per-head bits are int32)")
        bm = max(16, 1 << (G - 1).bit_length())
        _, bn = choose_tiles(spec.head_dim, spec.dtype, *bs, kind="decode")
        out.append(_spec("attn_decode", spec.head_dim, G, spec.dtype, bs, spec.mask_mod,
                         spec.score_mod, tiles=(bm, bn)))
    else:
        out.append(_spec("attn_fwd", spec.head_dim, G, spec.dtype, bs, spec.mask_mod, spec.score_mod))
        if spec.kind == "backward":
            out.append(_spec("attn_bwd", spec.head_dim, G, spec.dtype, bs, spec.mask_mod,
                             spec.score_mod))
    return out


def available(spec: AttentionSpec) -> tuple[bool, str]:
    """``(True, "")`` when generated kernels can run ``spec``, else ``(False, reason)``; the reason
    names the op, head_dim, dtype or device at fault and the fix (the caller warns and falls back).

    >>> available(AttentionSpec(head_dim=300))[1][:12]
    'head_dim=300'
    """
    try:
        kernel_specs(spec)
        _backend_ok(torch.device(spec.device))
    except UnsupportedSpec as exc:
        return False, str(exc)
    return True, ""


def generate_source(spec: AttentionSpec) -> str:
    """The generated Python/Triton source for ``spec`` (all modules it needs, concatenated)."""
    return "\n\n".join(render(s) for s in kernel_specs(spec))
