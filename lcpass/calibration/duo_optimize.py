"""DuoAttention's optimisation-based identification of retrieval heads.

Paper: Xiao et al., "DuoAttention", ICLR 2025, section 3.2. Every KV head j of layer i gets a gate
alpha[i, j] in [0, 1] that mixes the two attention outputs of its query heads:

    attn = alpha * full_attention(q, k, v) + (1 - alpha) * streaming_attention(q, k, v; sink, recent)

The model's weights stay frozen; only the gates are trained, on synthetic passkey-style copy prompts,
to make the gated model's final hidden states match the full-attention model's on the last `tail`
tokens (the answer), with an L1 penalty pushing gates towards 0 (streaming):

    L = mean_j ||H_full[j] - H_gated[j]||^2 / hidden   +   l1 * mean(alpha)

Heads whose gates stay high are retrieval heads; `calibrate(..., mode="optimize")` ranks KV heads by
their final gate and keeps the top `retrieval_ratio` as retrieval heads. With few steps many gates sit
at the same value (clamped at 1, or moved in lockstep by Adam's sign-like first steps), so ties are
broken by each gate's accumulated *distillation pressure* (the sum over steps of -dL_distill/dalpha:
how much the answer's hidden states need that head's full attention).

Example:
    >>> trained = train_duo_gates(model, prompts, sites, sink=4, recent=32, steps=3)  # doctest: +SKIP
    >>> trained.gates.shape                                                            # doctest: +SKIP
    torch.Size([30, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lcpass.calibration.probe import AttentionCall, attention_probe
from lcpass.calibration.progress import progress_bar
from lcpass.plan import SiteInfo
from lcpass.quality.prompts import Prompt

__all__ = ["DuoGates", "train_duo_gates", "streaming_allowed"]


@dataclass
class DuoGates:
    """Trained gates [sites, kv_heads] in [0, 1], distillation pressure (same shape), loss per step."""

    gates: torch.Tensor
    pressure: torch.Tensor
    history: list[float]

    def ranking_key(self) -> torch.Tensor:
        """gates + 1e-3 * pressure / max|pressure|: ranks by gate, ties broken by pressure."""
        scale = float(self.pressure.abs().max()) or 1.0
        return self.gates + 1e-3 * self.pressure / scale


def streaming_allowed(call: AttentionCall, sink: int, recent: int) -> torch.Tensor:
    """Bool [.., Sq, Sk]: the call's allowed pairs restricted to `sink` first keys + `recent` last ones."""
    sq, sk = call.query.shape[2], call.key.shape[2]
    q_pos = torch.arange(sk - sq, sk)[:, None]
    k_pos = torch.arange(sk)[None, :]
    window = (k_pos < sink) | (q_pos - k_pos < recent)
    return call.allowed() & window[None, None].to(call.query.device)


def train_duo_gates(
    model: nn.Module,
    prompts: Sequence[Prompt],
    sites: Sequence[SiteInfo],
    sink: int = 64,
    recent: int = 256,
    steps: int = 8,
    lr: float = 0.05,
    l1: float = 0.05,
    tail: int = 32,
    progress: bool = True,
) -> DuoGates:
    """Train per-KV-head gates (see module doc); return the gates, their pressure and the loss history.

    One step = one prompt (cycled). The model's parameters are frozen during training and their
    ``requires_grad`` flags restored afterwards.
    """
    if steps < 1:
        raise ValueError(f"train_duo_gates: steps={steps} must be >= 1")
    if not prompts:
        raise ValueError("train_duo_gates: no prompts; pass at least one")
    index = {s.name: i for i, s in enumerate(sites)}
    n_kv = max(s.n_kv_heads for s in sites)
    gates = torch.ones(len(sites), n_kv, requires_grad=True)
    opt = torch.optim.Adam([gates], lr=lr)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    history: list[float] = []
    pressure = torch.zeros_like(gates)
    targets: dict[int, torch.Tensor] = {}

    def mix(call: AttentionCall) -> torch.Tensor:
        i = index.get(call.site)
        full = call.dense()
        if i is None:
            return full
        stream = call.dense(streaming_allowed(call, sink, recent))
        group = call.n_heads // call.n_kv_heads
        a = gates[i, : call.n_kv_heads].clamp(0, 1).repeat_interleave(group)[None, :, None, None]
        return a * full + (1 - a) * stream

    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with progress_bar(progress) as bar:
            task = bar.add_task("DuoAttention gates", total=steps, info="")
            for step in range(steps):
                k = step % len(prompts)
                ids = prompts[k].ids
                mask = torch.ones_like(ids)
                if k not in targets:
                    # the target runs through the same probe (full attention only), so at alpha = 1 the
                    # distillation term is exactly 0 rather than kernel rounding noise Adam would amplify
                    with torch.no_grad(), attention_probe(model, lambda call: call.dense()):
                        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                    targets[k] = out.hidden_states[-1][:, -tail:].detach()
                with attention_probe(model, mix):
                    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                h = out.hidden_states[-1][:, -tail:]
                distill = ((h - targets[k]) ** 2).sum(-1).mean() / h.shape[-1]
                opt.zero_grad()
                distill.backward()
                assert gates.grad is not None
                pressure -= gates.grad
                gates.grad += l1 / gates.numel()  # d(l1 * mean(alpha)) / d alpha
                loss = distill.detach() + l1 * gates.detach().clamp(0, 1).mean()
                opt.step()
                with torch.no_grad():
                    gates.clamp_(0, 1)
                history.append(float(loss.detach()))
                bar.update(task, advance=1, info=f"loss {float(loss.detach()):.4g} mean gate {float(gates.detach().mean()):.3f}")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return DuoGates(gates.detach().clone(), pressure, history)
