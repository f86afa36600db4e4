"""MoA-style profiling: per-head attention mass captured by each window size, and the per-head windows
that keep the most mass at a target average density.

Paper: Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
2024. MoA profiles how much each head loses under each candidate span and solves for per-head spans
under a density budget. Here the profile of head h for window w is the attention mass it keeps,

    mass[h, w] = mean over profiled queries q of  sum_{k < sink  or  q - k < w} softmax(q K^T)[q, k]

measured on calibration inputs, and the allocation is greedy by marginal gain: every head starts at
the smallest window; the head whose next window adds the most mass per unit of density is upgraded
while the average density (fraction of causal (q, k) pairs kept, at the plan's length) stays within
the target.

Example:
    >>> windows = allocate_windows(mass, [64, 128, 256, 1024], length=1024, density=0.5, sink=4)  # doctest: +SKIP
    >>> float(window_density(windows, 4, 1024).mean()) <= 0.5                                   # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lcpass.calibration.probe import AttentionCall, attention_probe
from lcpass.calibration.progress import progress_bar

__all__ = ["candidate_windows", "window_density", "profile_window_mass", "allocate_windows"]


def candidate_windows(length: int, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest` below `length`, then `length` itself (= full causal attention).

    Example:
        >>> candidate_windows(1000, 64)
        [64, 128, 256, 512, 1000]
    """
    out = []
    w = smallest
    while w < length:
        out.append(w)
        w *= 2
    return out + [length]


def window_density(window: torch.Tensor | Sequence[int] | int, sink: int, length: int) -> torch.Tensor:
    """Fraction of the causal (q, k) pairs of a `length`-token prefill that a head with `sink` sinks and a
    causal window of `window` keys (itself included) attends to. Query q keeps min(q + 1, sink + window).

    Example:
        >>> round(float(window_density(4, 0, 8)), 3)   # 1+2+3+4+4*4 = 26 of 36 pairs
        0.722
    """
    w = torch.as_tensor(window, dtype=torch.float64)
    q = torch.arange(length, dtype=torch.float64)
    kept = torch.minimum(q + 1, (sink + w)[..., None]).sum(-1)
    return (kept / (length * (length + 1) / 2)).float()


def profile_window_mass(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    windows: Sequence[int],
    sink: int = 64,
    rows: int = 128,
    progress: bool = True,
) -> tuple[list[str], torch.Tensor]:
    """Mass kept by each window: (site names in model order, tensor [sites, heads, len(windows)]).

    `inputs` are [1, S] token-id tensors; `rows` query rows, evenly spaced over the second half of
    each input (where windows bite), are profiled per head.
    """
    if not inputs:
        raise ValueError("profile_window_mass: no inputs; pass at least one [1, S] token-id tensor")
    total: dict[str, torch.Tensor] = {}
    order: list[str] = []
    wins = torch.as_tensor(list(windows))

    def probe(call: AttentionCall) -> torch.Tensor:
        sq, sk = call.query.shape[2], call.key.shape[2]
        r = torch.linspace(sq // 2, sq - 1, steps=min(rows, sq - sq // 2)).round().long().unique()
        p = call.probs(r)[0]  # [H, R, Sk]
        q_pos = (sk - sq + r)[:, None]  # [R, 1]
        k_pos = torch.arange(sk)[None, :]
        dist = q_pos - k_pos  # [R, Sk]
        keep = (k_pos < sink)[None] | ((dist >= 0)[None] & (dist[None] < wins[:, None, None]))  # [W, R, Sk]
        mass = torch.einsum("hrk,wrk->hw", p, keep.float()) / len(r)  # [H, W]
        if call.site not in total:
            order.append(call.site)
            total[call.site] = torch.zeros_like(mass)
        total[call.site] += mass
        return call.dense()

    with progress_bar(progress) as bar:
        task = bar.add_task("MoA window profile", total=len(inputs), info="")
        for ids in inputs:
            with torch.no_grad(), attention_probe(model, probe):
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
            bar.advance(task)
    return order, torch.stack([total[s] / len(inputs) for s in order])


def allocate_windows(
    mass: torch.Tensor,
    windows: Sequence[int],
    length: int,
    density: float,
    sink: int = 64,
    group: int = 1,
) -> torch.Tensor:
    """Per-head window [sites, heads] maximising kept mass with average density <= `density`.

    `mass` is [sites, heads, W] (W = len(windows), increasing windows). With `group` > 1 the heads of
    each KV group (consecutive query heads) share one window, chosen on their mean mass, so a GQA cache
    can keep one window per KV head. If even the smallest windows exceed the target, they are returned
    (the tightest plan possible) and the density says by how much.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"MoA density={density!r} must lie in (0, 1] (fraction of causal attention kept)")
    n_sites, n_heads, n_w = mass.shape
    if n_w != len(windows) or list(windows) != sorted(windows):
        raise ValueError(f"allocate_windows: {len(windows)} windows (increasing) for {n_w} mass columns")
    if n_heads % group:
        raise ValueError(f"allocate_windows: group={group} does not divide {n_heads} heads")
    m = mass.view(n_sites, n_heads // group, group, n_w).mean(2).reshape(-1, n_w)  # [units, W]
    dens = window_density(list(windows), sink, length).double()  # [W]
    units = m.shape[0]
    level = torch.zeros(units, dtype=torch.long)
    budget = density * units
    used = float(dens[0]) * units
    while True:
        nxt = (level + 1).clamp(max=n_w - 1)
        gain = m[torch.arange(units), nxt] - m[torch.arange(units), level]
        cost = dens[nxt] - dens[level]
        ok = (level < n_w - 1) & (used + cost <= budget + 1e-9)
        if not bool(ok.any()):
            break
        eff = torch.where(ok, gain.double() / cost.clamp(min=1e-12), torch.full_like(cost, -1.0))
        u = int(eff.argmax())
        used += float(cost[u])
        level[u] += 1
    chosen = torch.as_tensor(list(windows))[level].view(n_sites, n_heads // group, 1)
    return chosen.expand(n_sites, n_heads // group, group).reshape(n_sites, n_heads)
