"""CPU block-sparse attention engine and its dense oracle.

>>> import torch
>>> from lcpass.engine import sparse_attention, reference_attention
>>> from lcpass.layout import build_layout
>>> from lcpass.masks import sliding_window_mask
>>> q = torch.randn(1, 4, 300, 32); k = v = torch.randn(1, 2, 300, 32)
>>> lay = build_layout(sliding_window_mask(64), 4, 300, 300, block_size=64)
>>> out = sparse_attention(q, k, v, lay, scale=32 ** -0.5, dense_below=0)
>>> ref = reference_attention(q, k, v, sliding_window_mask(64), scale=32 ** -0.5)
>>> bool((out - ref).abs().max() < 1e-5)
True
"""

from lcpass.engine.plan import EnginePlan, build_plan
from lcpass.engine.reference import ScoreMod, dense_attention, element_mask, reference_attention, with_sinks
from lcpass.engine.sparse import DENSE_BELOW, get_plan, run_plan, sparse_attention

__all__ = [
    "DENSE_BELOW",
    "EnginePlan",
    "ScoreMod",
    "build_plan",
    "dense_attention",
    "element_mask",
    "get_plan",
    "reference_attention",
    "run_plan",
    "sparse_attention",
    "with_sinks",
]
