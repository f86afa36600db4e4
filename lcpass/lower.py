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

import json
import warnings
from functools import lru_cache
from typing import Any, Optional, Sequence

import torch
from torch.fx import GraphModule, Node

from lcpass import masks as M
from lcpass.engine import element_mask, sparse_attention
from lcpass.layout import build_layout
from lcpass.methods import site_crossover, site_mask_mod, spec_parts
from lcpass.patterns import CANONICAL_OP, Site, canonical_nodes
from lcpass.patterns.op import reference

__all__ = ["PLANNED_OP", "spec_json", "planned_attention", "lower_graph", "lowering_kind", "is_dense_spec"]

NEG_LIMIT = -1e4


def spec_json(head_specs: Sequence[Any], dense_below: Optional[int] = None) -> str:
    """A site's per-head method specs as the planned op's ``spec`` string (stable, hashable).

    ``dense_below`` overrides the methods' crossover (the key length below which the site runs
    dense); None keeps each method's own.
    """
    items = []
    for spec in head_specs:
        name, params = spec_parts(spec)
        items.append({"method": name, "params": dict(sorted(params.items()))})
    return json.dumps({"heads": items, "dense_below": dense_below}, sort_keys=True, separators=(",", ":"))


@lru_cache(maxsize=1024)
def _parse_full(spec: str) -> tuple[tuple[tuple[str, dict[str, Any]], ...], Optional[int]]:
    data = json.loads(spec)
    return tuple((d["method"], d["params"]) for d in data["heads"]), data.get("dense_below")


def _parse(spec: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    return _parse_full(spec)[0]


def crossover(spec: str, n_heads: int) -> int:
    """The key length below which a planned site runs dense."""
    heads, dense_below = _parse_full(spec)
    return site_crossover(list(heads), n_heads) if dense_below is None else int(dense_below)


def is_dense_spec(head_specs: Sequence[Any]) -> bool:
    return all(spec_parts(s)[0] == "dense" for s in head_specs)


@lru_cache(maxsize=256)
def _site_mask(spec: str, n_heads: int, q_len: int, kv_len: int, is_causal: bool, window: int):
    """The method's mask for the site, intersected with what the site itself already imposes."""
    mask = site_mask_mod(list(_parse(spec)), n_heads, q_len, kv_len)
    extra = []
    if is_causal:
        extra.append(M.causal_mask())
    if window >= 0:
        extra.append(M.sliding_window_mask(window))
    return M.and_masks(mask, *extra) if extra else mask


def _softcap_mod(softcap: float):
    def softcap_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return softcap_mod


def lowering_kind(mask_kind: str) -> str:
    """How a site with this mask kind is lowered: 'sparse' (block engine) or 'dense-masked'."""
    base = mask_kind.split("+")[-1] if mask_kind else "none"
    return "sparse" if base in ("none", "causal", "padding") or base.startswith("sliding") else "dense-masked"


def planned_attention_impl(q, k, v, mask, scale, is_causal, window, softcap, dropout_p, site, mask_kind, spec):
    specs = _parse(spec)
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    if all(name == "dense" for name, _ in specs) or sk < crossover(spec, hq) or dropout_p > 0:
        return reference(q, k, v, mask, scale, is_causal, window, softcap, dropout_p)
    mask_mod = _site_mask(spec, hq, sq, sk, bool(is_causal), int(window))
    score_mod = _softcap_mod(softcap) if softcap else None
    kv_keep = None
    if mask is not None:
        if lowering_kind(mask_kind) != "sparse":
            # A bias or an unnamed pattern: exact dense attention with the method's mask on top.
            keep = element_mask(mask_mod, 1, hq, sq, sk, device=q.device)
            if mask.dtype == torch.bool:
                mask = mask & keep
            else:
                mask = mask.masked_fill(~keep, float("-inf"))
            return reference(q, k, v, mask, scale, False, -1, softcap, 0.0)
        keep = mask if mask.dtype == torch.bool else mask > NEG_LIMIT
        # padding: a key is valid when any query (of any head) may attend it
        keep = keep.expand(keep.shape[0], *keep.shape[1:])
        kv_keep = keep.reshape(keep.shape[0], -1, keep.shape[-1]).any(1)  # [B|1, Sk]
        if kv_keep.shape[0] != q.shape[0]:
            kv_keep = kv_keep.expand(q.shape[0], -1)
        if bool(kv_keep.all()):
            kv_keep = None
    starts = _left_padding(kv_keep) if kv_keep is not None else None
    if starts is not None:
        # Left padding: positions (sinks, windows) count from each row's first real token, exactly as
        # the row would run alone. One engine call per row; padded query rows output zeros.
        out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
        for b, p in enumerate(starts):
            n = sk - p  # real keys of this row
            q0 = max(0, sq - n)  # queries at absolute positions >= p
            if n <= 0 or q0 >= sq:
                continue
            row_mask = _site_mask(spec, hq, sq - q0, n, bool(is_causal), int(window))
            lay = build_layout(row_mask, hq, sq - q0, n)
            out[b:b + 1, :, q0:] = sparse_attention(q[b:b + 1, :, q0:], k[b:b + 1, :, p:], v[b:b + 1, :, p:], lay,
                                                    scale=scale, mask_mod=row_mask, score_mod=score_mod)
        return out
    layout = build_layout(mask_mod, hq, sq, sk)
    return sparse_attention(q, k, v, layout, scale=scale, mask_mod=mask_mod, score_mod=score_mod, kv_keep=kv_keep)


def _left_padding(kv_keep: torch.Tensor) -> Optional[list[int]]:
    """Each row's first real key when every row is left-padded (False* True*); None otherwise."""
    first = kv_keep.int().argmax(-1)  # [B]
    idx = torch.arange(kv_keep.shape[-1], device=kv_keep.device)[None, :]
    if bool(((idx >= first[:, None]) == kv_keep).all()):
        return [int(p) for p in first.tolist()]
    return None


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
) -> torch.Tensor:
    return planned_attention_impl(q, k, v, mask, scale, is_causal, window, softcap, dropout_p, site, mask_kind,
                                  spec)


@planned_attention.register_fake
def _planned_fake(q, k, v, mask, scale, is_causal, window, softcap, dropout_p, site, mask_kind, spec):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


PLANNED_OP = torch.ops.lcpass.planned_attention.default


def lower_graph(gm: GraphModule, sites: Sequence[Site], resolve, dense_below: Optional[int] = None
                ) -> list[tuple[str, str]]:
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
        new_args = (*args[:10], site.mask, spec_json(specs, dense_below))
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
