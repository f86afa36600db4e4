"""The main output of a forward, for comparing two runs of one model."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["main_output"]


def main_output(out: Any) -> torch.Tensor:
    """Logits, else the last hidden state, else the first floating-point tensor of ``out``.

    >>> main_output((torch.ones(2), torch.zeros(1)))
    tensor([1., 1.])
    """
    for attr in ("logits", "last_hidden_state", "prediction_logits", "audio_values"):
        t = getattr(out, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, torch.Tensor):
        return out
    leaves = [t for t in torch.utils._pytree.tree_leaves(out.to_tuple() if hasattr(out, "to_tuple") else out)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError(f"no floating-point tensor in the output {type(out).__name__}")
    return leaves[0]
