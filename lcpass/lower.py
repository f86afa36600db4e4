"""Lower: a canonical attention site becomes its planned method.

One custom op, ``torch.ops.lcpass.planned_attention``, carries the canonical arguments plus the site's
plan (a JSON string of per-head method specs), so a lowered graph stays exportable and every door
(graph rewrite, the transformers attention hook, torch.compile, torch.export) runs the same code:

* every head dense, or the key length below the method's crossover -> the exact canonical reference;
* a mask that is only padding -> the CPU block-sparse engine with ``kv_keep`` (per-key validity);
* a mask that carries a bias (T5) or an unnamed pattern -> exact dense attention with the method's
  mask applied (correct, not faster; reported by :func:`lowering_kind`).

Example::

    >>> spec = spec_json([HeadSpec("streaming", {"sink": 4, "window": 256})])
    >>> out = torch.ops.lcpass.planned_attention(q, k, v, None, 0.125, True, -1, 0.0, 0.0,
    ...                                          "model.layers.0.self_attn", "none", spec)
"""
from __future__ import annotations

import itertools
import json
import warnings
from functools import lru_cache
from typing import Any, Optional, Sequence

import torch
from torch.fx import GraphModule

from lcpass import codegen
from lcpass import masks as M
from lcpass.codegen.headdim import pad_head_dims
from lcpass.engine import element_mask, sparse_attention, with_sinks
from lcpass.layout import build_layout
from lcpass.methods import get_method, site_crossover, site_mask_mod, spec_parts
from lcpass.methods.dynamic import TidalState, dynamic_attention, dynamic_select
from lcpass.patterns import Site, canonical_nodes
from lcpass.patterns.maskinfo import NEG_LIMIT, positional_label, read_positional
from lcpass.patterns.op import chunk_start, laid_out, output_buffer, positional_keep, reference

__all__ = ["PLANNED_OP", "spec_json", "planned_attention", "lower_graph", "lowering_kind", "is_dense_spec",
           "site_state", "seed_site_states", "site_mask", "parse_spec", "BACKENDS", "crossover", "is_dynamic_spec",
           "checked_kind", "checked_claim", "claim_holds", "padding_keys", "state_key"]



BACKENDS = ("auto", "cpu", "triton")


def spec_json(head_specs: Sequence[Any], dense_below: Optional[int] = None, backend: str = "auto",
              follow_q: bool = False, state: str = "") -> str:
    """A site's per-head method specs as the planned op's ``spec`` string (stable, hashable).

    ``dense_below`` overrides the methods' crossover (the key length below which the site runs
    dense); None keeps each method's own. ``backend``: ``"cpu"`` (the block engine), ``"triton"``
    (generated kernels; the CPU engine with a warning where a spec is unsupported) or ``"auto"``
    (Triton for CUDA tensors, the CPU engine otherwise). ``follow_q``: the output is laid out in q's
    memory order, as the SDPA call the site replaces returned it (else contiguous, as a matrix product).
    ``state``: the namespace of the sites' dynamic-method states (:func:`seed_site_states`), so two
    optimized models with the same layer names never share selection caches or learned gates.
    """
    if backend not in BACKENDS:
        raise ValueError(f"lcpass: backend={backend!r}; use one of {BACKENDS}")
    items = []
    for spec in head_specs:
        name, params = spec_parts(spec)
        items.append({"method": name, "params": dict(sorted(params.items()))})
    data = {"heads": items, "dense_below": dense_below, "backend": backend}
    if follow_q:
        data["follow_q"] = True
    if state:
        data["state"] = state
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


@lru_cache(maxsize=1024)
def _parse_full(spec: str) -> tuple[tuple[tuple[str, dict[str, Any]], ...], Optional[int]]:
    data = json.loads(spec)
    return tuple((d["method"], d["params"]) for d in data["heads"]), data.get("dense_below")


@lru_cache(maxsize=1024)
def _backend(spec: str) -> str:
    return json.loads(spec).get("backend", "auto")


@lru_cache(maxsize=1024)
def state_key(spec: str) -> str:
    """The state namespace a planned op's ``spec`` names ("" when none was seeded)."""
    return str(json.loads(spec).get("state", "")) if spec else ""


@lru_cache(maxsize=1024)
def _follow_q(spec: str) -> bool:
    return bool(json.loads(spec).get("follow_q", False))


def _use_triton(spec: str, q: torch.Tensor) -> bool:
    backend = _backend(spec)
    return backend == "triton" or (backend == "auto" and q.is_cuda)


def parse_spec(spec: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The (method, params) of each head from a planned op's ``spec`` string."""
    return _parse_full(spec)[0]


_parse = parse_spec


def crossover(spec: str, n_heads: int) -> int:
    """The key length below which a planned site runs dense."""
    heads, dense_below = _parse_full(spec)
    return site_crossover(list(heads), n_heads) if dense_below is None else int(dense_below)


def is_dense_spec(head_specs: Sequence[Any]) -> bool:
    return all(spec_parts(s)[0] == "dense" for s in head_specs)


@lru_cache(maxsize=256)
def site_mask(spec: str, n_heads: int, q_len: int, kv_len: int, is_causal: bool, window: int, chunk: int = -1):
    """The method's mask for the site, intersected with what the site itself already imposes (causality,
    a sliding window, chunks: ``kv // chunk == q // chunk``)."""
    mask = site_mask_mod(list(_parse(spec)), n_heads, q_len, kv_len)
    extra = []
    if is_causal:
        extra.append(M.causal_mask())
    if window >= 0:
        extra.append(M.sliding_window_mask(window))
    if chunk >= 1:
        extra.append(M.block_diagonal_mask(chunk))
    return M.and_masks(mask, *extra) if extra else mask


def _softcap_mod(softcap: float):
    def softcap_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return softcap_mod


def lowering_kind(mask_kind: str) -> str:
    """How a site with this mask kind is lowered: 'sparse' (block engine) or 'dense-masked'."""
    base = mask_kind.split("+")[-1] if mask_kind else "none"
    return "sparse" if base in ("none", "causal", "padding") or base.startswith(("sliding", "chunked")) \
        else "dense-masked"


_STATES: dict[tuple[str, str], dict[str, Any]] = {}
_NAMESPACES = itertools.count()


def site_state(site: str, spec: str = "") -> dict[str, Any]:
    """The mutable state of a site's dynamic method (selection caches, centroids, shared positions,
    a learned SeerAttention gate), in the namespace ``spec`` names (:func:`state_key`).

    ``lcpass.optimize`` and the compile backend seed one namespace per model (per compiled graph) with
    the layer index, the layer count and a TidalDecode state the sites share; a site nobody seeded starts
    empty. ``site_state(site)`` is the namespace of planned ops built without a seed (``lcpass.export``).
    """
    return _STATES.setdefault((state_key(spec), site), {})


def seed_site_states(site_names: Sequence[str]) -> str:
    """Fresh states for a model's sites, in layer order, with one cross-layer state they share, in a new
    namespace; returns its key for :func:`spec_json` (``state=``)."""
    key = f"s{next(_NAMESPACES)}"
    shared = TidalState()
    for i, name in enumerate(site_names):
        _STATES[(key, name)] = {"layer": i, "n_layers": len(site_names), "tidal": shared}
    return key


def _kv_keep(mask: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
    """Per-key validity [B, Sk] of a padding mask: a key is valid when any query of any head sees it."""
    keep = mask if mask.dtype == torch.bool else mask > NEG_LIMIT
    if keep.dim() < 4:  # [Sq, Sk] or [B|H, Sq, Sk]: broadcast like the scores do
        keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    kv_keep = keep.reshape(keep.shape[0], -1, keep.shape[-1]).any(1)  # [B|1, Sk]
    if kv_keep.shape[0] != batch:
        kv_keep = kv_keep.expand(batch, -1)
    return None if bool(kv_keep.all()) else kv_keep


def _row_ranges(kv_keep: torch.Tensor) -> Optional[list[tuple[int, int]]]:
    """Each row's real keys [start, end) when every row's real keys are one contiguous run (left or
    right padding); None for anything else."""
    idx = torch.arange(kv_keep.shape[-1], device=kv_keep.device)[None, :]
    start = kv_keep.int().argmax(-1)
    end = start + kv_keep.sum(-1)
    if bool((((idx >= start[:, None]) & (idx < end[:, None])) == kv_keep).all()):
        return [(int(a), int(b)) for a, b in zip(start.tolist(), end.tolist())]
    return None


def _is_dynamic(specs) -> bool:
    return any(get_method(name).kind == "dynamic" for name, _ in specs)


def is_dynamic_spec(spec: str) -> bool:
    """True when some head of a planned op's ``spec`` runs a dynamic (content-based) method."""
    return _is_dynamic(_parse(spec))


def _run_specs(q, k, v, *, spec: str, scale: float, is_causal: bool, window: int, softcap: float, site: str,
               kv_keep: Optional[torch.Tensor], sinks: Optional[torch.Tensor] = None, chunk: int = -1) -> torch.Tensor:
    """The site's method(s) on unpadded q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D]; ``sinks`` [B, Hq, Sq, 1]
    (static methods only: the engine returns the log-sum-exp they need)."""
    specs = _parse(spec)
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    if not _is_dynamic(specs):
        mask_mod = site_mask(spec, hq, sq, sk, bool(is_causal), int(window), int(chunk))
        layout = build_layout(mask_mod, hq, sq, sk)
        score_mod = _softcap_mod(softcap) if softcap else None
        if _use_triton(spec, q):  # the generated kernels start each row's softmax from its sink
            return codegen.attention_or_fallback(q, k, v, layout, scale=scale, mask_mod=mask_mod,
                                                 score_mod=score_mod, kv_keep=kv_keep, sinks=sinks)
        if sinks is not None:  # the engine knows each row's log-sum-exp
            out, lse = sparse_attention(q, k, v, layout, scale=scale, mask_mod=mask_mod, score_mod=score_mod,
                                        kv_keep=kv_keep, return_lse=True)
            return with_sinks(out, lse, sinks)
        return sparse_attention(q, k, v, layout, scale=scale, mask_mod=mask_mod, score_mod=score_mod,
                                kv_keep=kv_keep)
    if q.shape[-1] != v.shape[-1]:
        # content selection and its attention on one head dim: zero columns change no score, no norm and
        # no selection; the output drops them (Dk != Dv, MLA)
        q, k, v, dv = pad_head_dims(q, k, v)
        return _run_specs(q, k, v, spec=spec, scale=scale, is_causal=is_causal, window=window, softcap=softcap,
                          site=site, kv_keep=kv_keep, chunk=chunk)[..., :dv]
    keys = [json.dumps(s, sort_keys=True) for s in specs]
    if len(set(keys)) == 1:
        name, params = specs[0]
        if _use_triton(spec, q) and get_method(name).select is not None:
            # a pure selection: select, then the generated kernels (token lists or block layout)
            sel = dynamic_select(name, q, k, params, state=site_state(site, spec))
            return codegen.selection_attention(q, k, v, sel, scale=scale)
        return dynamic_attention(name, q, k, v, params, scale=scale, state=site_state(site, spec))
    # heads with different methods: each group of heads runs its own method (kv heads expanded)
    group = hq // k.shape[1]
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    by_spec: dict[str, list[int]] = {}
    for h, key in enumerate(keys):
        by_spec.setdefault(key, []).append(h)
    for key, heads in by_spec.items():
        idx = torch.tensor(heads, device=q.device)
        sub = spec_json([tuple(json.loads(key))], backend=_backend(spec), state=state_key(spec))
        out[:, idx] = _run_specs(q[:, idx], k[:, idx // group], v[:, idx // group], spec=sub, scale=scale,
                                 is_causal=is_causal, window=window, softcap=softcap, site=f"{site}/{key}",
                                 kv_keep=kv_keep, sinks=None if sinks is None else sinks[:, idx], chunk=chunk)
    return out


def checked_kind(is_causal: bool, window: int, base: str, chunk: int = -1) -> str:
    """The mask kind of a site whose causality / window / chunks are a claim about a mask tensor (read
    from an input's example value, or the model's run-time mask): ``causal?+padding``, ``sliding(8)?+bias``,
    ``chunked(4)?+padding``; the planned op checks the claim on every call."""
    if not is_causal and window < 0 and chunk < 1:
        return base
    return f"{positional_label(is_causal, window, chunk)}?+{base}"


def checked_claim(mask_kind: str) -> Optional[tuple[bool, int, int]]:
    """The (is_causal, window, chunk) a mask kind claims to be checked on every call; None when it claims
    none."""
    head = (mask_kind or "").split("+")[0]
    if not head.endswith("?"):
        return None
    claim = read_positional(head[:-1])
    return claim if claim is not None and (claim[0] or claim[1] >= 0 or claim[2] >= 1) else None


def _keep_of(mask: torch.Tensor) -> torch.Tensor:
    """A mask's keep pattern (True = the score is attended), at least 4-D like the scores."""
    keep = mask if mask.dtype == torch.bool else mask > NEG_LIMIT
    return keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape)) if keep.dim() < 4 else keep


def claim_holds(mask: torch.Tensor, q_len: int, kv_len: int, is_causal: bool, window: int, chunk: int = -1) -> bool:
    """Whether ``mask`` hides every score that causality / the window / the chunks hide (so imposing them
    is exact)."""
    pos = positional_keep(q_len, kv_len, is_causal, window, mask.device, chunk,
                          chunk_start(mask) if chunk >= 1 else None)
    return pos is None or not bool((_keep_of(mask) & ~pos).any())


def padding_keys(mask: torch.Tensor, batch: int, q_len: int, kv_len: int, is_causal: bool,
                 window: int, chunk: int = -1) -> tuple[bool, Optional[torch.Tensor]]:
    """Whether ``mask`` is padding on top of the positional part, and its per-key validity [B, Sk] (None
    when every key is valid). Padding: each query row that sees a key sees, of the positional keys
    (which the op imposes whatever the mask says), exactly those valid for its batch row, and a float
    mask adds nothing but 0 there. Anything else (a
    caller's arbitrary mask, a bias) is not padding and runs the exact masked path."""
    keep = _keep_of(mask)
    if not mask.dtype == torch.bool and bool((mask.masked_fill(~keep.expand(mask.shape), 0) != 0).any()):
        return False, None
    kv_keep = _kv_keep(mask, batch)
    form = positional_keep(q_len, kv_len, is_causal, window, mask.device, chunk,
                           chunk_start(mask) if chunk >= 1 else None)
    form = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device) if form is None else form
    form = form.reshape((1,) * (4 - form.dim()) + tuple(form.shape))
    seen = keep & form  # the positional part is imposed anyway: a mask may leave it to the op
    form = form if kv_keep is None else form & kv_keep[:, None, None, :]
    rows = form.any(-1, keepdim=True)  # query rows that see some key (padded queries see none)
    return not bool(((seen != form) & rows).any()), kv_keep


def _warn(site: str, why: str) -> None:
    # Python's warning filters show it once per place by default; an exact call is never silent
    warnings.warn(f"lcpass: site {site}: {why}; this call runs exact dense attention (correct, not faster)",
                  stacklevel=3)


def planned_attention_impl(q, k, v, mask, scale, is_causal, window, softcap, dropout_p, site, mask_kind, spec,
                           sinks=None, chunk=-1):
    specs = _parse(spec)
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    exact = dict(scale=scale, is_causal=is_causal, window=window, softcap=softcap, dropout_p=dropout_p,
                 sinks=sinks, chunk=chunk)
    if all(name == "dense" for name, _ in specs) or sk < crossover(spec, hq) or dropout_p > 0:
        return reference(q, k, v, mask, **exact)
    claim = checked_claim(mask_kind)
    if claim is not None and mask is not None:
        if not claim_holds(mask, sq, sk, *claim):
            _warn(site, f"the mask passed at run time is not {mask_kind.split('+')[0][:-1]} as the "
                             "example's was")
            return reference(q, k, v, mask, **exact)
        is_causal, window, chunk = claim  # the mask hides at least what the claim hides: imposing it is exact
    dynamic = _is_dynamic(specs)
    if dynamic and (not is_causal or window >= 0 or chunk >= 1 or softcap):
        # content selection is defined on plain causal attention: anything else stays exactly dense
        return reference(q, k, v, mask, **exact)
    if dynamic and sinks is not None:
        _warn(site, "dynamic methods do not carry learned sinks yet")
        return reference(q, k, v, mask, **exact)
    if sinks is not None:
        sinks = sinks.expand(q.shape[0], hq, sq, 1)
    kv_keep = None
    if mask is not None:
        padding, kv_keep = (padding_keys(mask, q.shape[0], sq, sk, bool(is_causal), int(window), int(chunk))
                            if lowering_kind(mask_kind) == "sparse" else (False, None))
        if not padding:
            if dynamic:
                return reference(q, k, v, mask, **{**exact, "sinks": None})
            # A bias or an arbitrary mask: exact dense attention with the method's mask on top (chunks
            # counted from each row's first attended key in the mask).
            keep = element_mask(site_mask(spec, hq, sq, sk, bool(is_causal), int(window)), 1, hq, sq, sk,
                                device=q.device)
            if chunk >= 1:
                keep = keep & positional_keep(sq, sk, False, -1, q.device, chunk, chunk_start(mask))
            mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
            return reference(q, k, v, mask, scale, False, -1, softcap, 0.0, sinks)
    run = dict(spec=spec, scale=scale, is_causal=is_causal, window=window, softcap=softcap, site=site,
               chunk=chunk)
    if kv_keep is None:
        return _run_specs(q, k, v, kv_keep=None, sinks=sinks, **run)
    rows = _row_ranges(kv_keep)
    if rows is None:
        if dynamic:
            raise ValueError(f"lcpass: site {site}: padding that is not one contiguous run of real keys per row "
                             "cannot run a dynamic method; pad on one side")
        if chunk >= 1:  # chunks count from each row's first real key: not one batched layout
            return reference(q, k, v, mask, **exact)
        return _run_specs(q, k, v, kv_keep=kv_keep, sinks=sinks, **run)
    # Padding: each row runs alone on its real keys, so positions (sinks, windows) count from its first
    # real token exactly as in an unbatched run; padded query rows output zeros.
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
    for b, (p, e) in enumerate(rows):
        q_lo = max(0, p - (sk - sq))  # queries at absolute positions in [p, e)
        q_hi = e - (sk - sq)
        if e <= p or q_hi <= q_lo:
            continue
        out[b:b + 1, :, q_lo:q_hi] = _run_specs(q[b:b + 1, :, q_lo:q_hi], k[b:b + 1, :, p:e],
                                                v[b:b + 1, :, p:e], kv_keep=None,
                                                sinks=None if sinks is None else sinks[b:b + 1, :, q_lo:q_hi],
                                                **run)
    return out


@torch.library.custom_op("lcpass::planned_attention", mutates_args=())
def planned_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
    window: int,
    softcap: float,
    dropout_p: float,
    site: str,
    mask_kind: str,
    spec: str,
    sinks: Optional[torch.Tensor] = None,
    chunk: int = -1,
) -> torch.Tensor:
    return laid_out(planned_attention_impl(q, k, v, mask, scale, is_causal, window, softcap, dropout_p, site,
                                           mask_kind, spec, sinks, chunk), q, _follow_q(spec))


@planned_attention.register_fake
def _planned_fake(q, k, v, mask, scale, is_causal, window, softcap, dropout_p, site, mask_kind, spec, sinks=None,
                  chunk=-1):
    return output_buffer(q, v.shape[-1], _follow_q(spec))


PLANNED_OP = torch.ops.lcpass.planned_attention.default


def lower_graph(gm: GraphModule, sites: Sequence[Site], resolve, dense_below: Optional[int] = None,
                backend: str = "auto", state: str = "") -> list[tuple[str, str]]:
    """Replace each canonical node of ``gm`` by its planned method.

    ``resolve(site_name, n_heads) -> list of head specs``. Sites whose heads are all dense keep the
    canonical op (exact). Returns (site, lowering) pairs: 'dense', 'sparse' or 'dense-masked'.
    """
    by_node = {s.node: s for s in sites}
    done: list[tuple[str, str]] = []
    for node in canonical_nodes(gm):
        site = by_node.get(node.name)
        if site is None:
            raise ValueError(f"{node.format_node()} has no detected site; canonicalize the graph first")
        specs = resolve(site.name, site.n_heads)
        if is_dense_spec(specs):
            done.append((site.name, "dense"))
            continue
        args = list(node.args)
        # (q, k, v, mask, scale, is_causal, window, softcap, dropout_p, site, source) -> planned op
        # (..., source[, sinks[, chunk]]) -> (..., mask_kind, spec[, sinks[, chunk]])
        new_args = (*args[:10], site.mask, spec_json(specs, dense_below, backend, follow_q=args[10] == "sdpa",
                                                    state=state),
                    *args[11:])
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(PLANNED_OP, new_args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        kind = lowering_kind(site.mask) if args[3] is not None else "sparse"
        if kind != "sparse":
            warnings.warn(f"lcpass: site {site.name} carries a {site.mask} mask: its method runs as exact dense "
                          "attention with the method's mask (correct, not faster)", stacklevel=2)
        done.append((site.name, kind))
    gm.graph.lint()
    gm.recompile()
    return done
