"""What the ONNX wing's modules share: the domains and opset, the error, the site configuration a function
body depends on (:class:`AttentionFunction`), the body builder (:class:`Body`) and the mask algebra that
reads a planned site's static mask (:func:`long_mask`, :func:`simplify_mask`)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from lcpass import masks as M
from lcpass.lower import parse_spec, site_mask
from lcpass.methods import get_method

__all__ = ["DOMAIN", "OPSET", "MS_DOMAIN", "PROBE_LENS", "ONNXExportError", "AttentionFunction", "Body",
           "base_mask", "long_mask", "simplify_mask"]

DOMAIN = "lcpass"
OPSET = 23
MS_DOMAIN = "com.microsoft"
PROBE_LENS = (4099, 65537)  # lengths at which a mask is built to see whether it depends on the length


class ONNXExportError(ValueError):
    """A site that cannot be written as ONNX; the message names the site and what to do instead."""


@dataclass(frozen=True)
class AttentionFunction:
    """Everything one ``lcpass`` function body depends on (sites that agree share one function)."""

    planned: bool  # planned_attention (spec applies) or the canonical op (exact attention)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    is_causal: bool
    window: int
    softcap: float
    mask: str  # "none" | "bool" | "float": the mask tensor input
    mask_kind: str  # the detector's mask label (padding, bias ...), planned ops only
    spec: str  # spec_json of the head specs ("" for the canonical op)
    same_len: bool  # Sq == Sk symbolically (self-attention without cache)
    static_len: tuple[int, ...] = ()  # (Sq, Sk) when the export has a fixed sequence length
    ort_max_len: int = 0  # onnx_ops="ort": keys the SparseAttention layout covers (0 = default lowering)
    sinks: bool = False  # a learned sink logit per row (input "sinks", broadcastable to [B, Hq, Sq, 1])
    chunk: int = -1  # chunked attention: chunks of this many positions from each row's first attended key

    @property
    def name(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        return f"attention_{digest}"


class Body:
    """Collects the nodes of one function body; every value gets a fresh name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def op(self, op_type: str, *inputs: str, domain: str = "", n_out: int = 1, **attrs: Any):
        outs = [self._fresh(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: Any, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", value=helper.make_tensor(self._fresh("c"), helper.np_dtype_to_tensor_dtype(
            arr.dtype), arr.shape, arr.flatten().tolist()))

    def _fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem.lower()}_{self._n}"



# ------------------------------------------------------------------------------------ mask algebra


def simplify_mask(mask: M.MaskMod) -> tuple:
    """('full',), ('causal',), ('sliding', w), ('empty',) or ('other',) for a mask's key tree."""
    key = mask._key
    kind = key[0]
    if kind == "full":
        return ("full",)
    if kind == "causal":
        return ("causal",)
    if kind == "sliding_window" and isinstance(key[1], int):
        return ("sliding", key[1])
    if kind == "sink" and key[1] == 0:
        return ("empty",)
    if kind == "or":
        parts = [p for p in (simplify_mask(m) for m in key[1]) if p != ("empty",)]
        if ("full",) in parts:
            return ("full",)
        return parts[0] if len(set(parts)) == 1 else (("empty",) if not parts else ("other",))
    if kind == "and":
        out: tuple = ("full",)
        for p in (simplify_mask(m) for m in key[1]):
            if p == ("empty",):
                return p
            if p == ("other",):
                return p
            if out == ("full",):
                out = p
            elif p == ("full",):
                continue
            elif out == ("causal",):
                out = p
            elif p == ("causal",):
                continue
            else:  # two windows
                out = ("sliding", min(out[1], p[1]))
        return out
    if kind == "per_head":
        parts = {simplify_mask(m) for m in key[1]}
        return parts.pop() if len(parts) == 1 else ("other",)
    return ("other",)


def base_mask(is_causal: bool, window: int) -> M.MaskMod:
    parts = []
    if is_causal:
        parts.append(M.causal_mask())
    if window >= 0:
        parts.append(M.sliding_window_mask(window))
    return M.and_masks(*parts) if parts else M.full_mask()


def long_mask(fn: AttentionFunction) -> M.MaskMod:
    """The mask the planned op applies above its crossover; ONNXExportError when it depends on length or
    on the content (dynamic methods)."""
    dynamic = sorted({name for name, _ in parse_spec(fn.spec) if get_method(name).kind == "dynamic"})
    if dynamic:  # callers check lcpass.onnx.dynamic.dynamic_method first
        raise ONNXExportError(f"dynamic methods {dynamic} select by content: no static mask (lcpass.onnx.dynamic)")
    if fn.static_len:
        return site_mask(fn.spec, fn.n_heads, fn.static_len[0], fn.static_len[1], fn.is_causal, fn.window)
    a, b = (site_mask(fn.spec, fn.n_heads, n, n, fn.is_causal, fn.window) for n in PROBE_LENS)
    if a != b:
        raise ONNXExportError(
            f"the plan {fn.spec} builds a mask that depends on the sequence length ({a!r} at {PROBE_LENS[0]} "
            f"tokens, {b!r} at {PROBE_LENS[1]}); export it with dynamic_seq=False or format='torch'")
    return a
