"""Dilated sliding window (Longformer).

Paper: Beltagy, Peters, Cohan, "Longformer: The Long-Document Transformer", arXiv 2020. Each query sees
``window`` keys spaced ``dilation`` apart, ending at itself: keys q, q-d, q-2d, ... (w of them), so the
receptive field per layer is (w-1)*d + 1 tokens with the cost of w. Here it is causal (autoregressive
variant); ``dilation=1`` is the ordinary sliding window.

Parameters (paper's names): ``window`` (w), ``dilation`` (d).

Example:
    >>> from lcpass.methods import get_method
    >>> get_method("dilated").kv_policy({"window": 4, "dilation": 3}, kv_len=100).recent
    10
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lcpass import masks as M
from lcpass.methods.base import KVPolicy, Method, Param


def dilated_mask_mod(params: Mapping[str, Any], *, head: int, n_heads: int, q_len: int, kv_len: int) -> Any:
    """causal & (q - kv) % dilation == 0 & (q - kv) // dilation < window."""
    return M.dilated_window_mask(params["window"], params["dilation"])  # causal by construction


def dilated_kv(params: Mapping[str, Any], *, kv_len: int) -> KVPolicy:
    """The cache must span the receptive field (window - 1) * dilation + 1."""
    return KVPolicy.sinks_recent(0, (params["window"] - 1) * params["dilation"] + 1)


DILATED = Method(
    name="dilated",
    paper="Longformer: The Long-Document Transformer (arXiv 2020), dilated sliding window",
    summary="Each query sees `window` keys spaced `dilation` apart, ending at itself (causal).",
    params=(
        Param("window", "int", 512, 1, None, "keys each query sees (w)"),
        Param("dilation", "int", 2, 1, None, "gap between those keys (d); 1 = plain sliding window"),
    ),
    kind="static",
    phases=frozenset({"prefill", "decode", "kv"}),
    needs_calibration=False,
    crossover=2048,
    crossover_why=(
        "the default 512 keys per query skip under half of a causal prefill below ~2048 tokens, and a "
        "dilated mask makes every visited block partial, so the win starts later than a plain window"
    ),
    mask_mod=dilated_mask_mod,
    kv_policy=dilated_kv,
)
