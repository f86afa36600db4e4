"""Attention whose value head dim differs from the key's (MLA: DeepSeek-V2/V3 keys 192, values 128).

The templates tile one head dim (``HEAD_DIM``, padded to ``BLOCK_D``). With ``Dk != Dv`` the entry points
zero-pad q and k (the scores are unchanged) or v (the extra output columns are zero) to the larger one and
drop the padding from the output: one kernel, exact, at the cost of the padded columns.

>>> import torch
>>> @common_head_dim
... def f(q, k, v):
...     return q.new_zeros(*q.shape[:-1], v.shape[-1])
>>> f(torch.zeros(1, 1, 2, 24), torch.zeros(1, 1, 2, 24), torch.zeros(1, 1, 2, 16)).shape
torch.Size([1, 1, 2, 16])
"""
from __future__ import annotations

import functools
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["common_head_dim", "pad_head_dims"]


def pad_head_dims(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """(q, k, v) padded to one head dim, and the value head dim to cut the output back to."""
    dv = v.shape[-1]
    d = max(q.shape[-1], dv)
    if q.shape[-1] == dv:
        return q, k, v, dv
    return tuple(F.pad(t, (0, d - t.shape[-1])) if t.shape[-1] < d else t for t in (q, k, v)) + (dv,)  # type: ignore[return-value]


def common_head_dim(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run ``fn(q, k, v, ...)`` on one head dim and return ``[..., Dv]``."""
    @functools.wraps(fn)
    def wrapper(q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> Tensor:
        if q.shape[-1] == v.shape[-1]:
            return fn(q, k, v, *args, **kwargs)
        q, k, v, dv = pad_head_dims(q, k, v)
        return fn(q, k, v, *args, **kwargs)[..., :dv]
    return wrapper
