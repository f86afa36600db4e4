"""Shared pieces of the model zoo (see :mod:`lcpass.zoo`): the `ZooModel` record, site expectations,
tiny shapes and deterministic inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ZooModel", "UnknownZooModelError", "MASK_KINDS", "site", "torch_entry"]

MASK_KINDS = ("none", "causal", "sliding", "padding", "causal+padding", "bias", "causal+bias")

# Shared tiny shapes: hidden 64 = 4 heads x 16, two layers, lengths that are not multiples of 8.
HIDDEN, HEADS, HEAD_DIM, LAYERS, VOCAB = 64, 4, 16, 2, 128
BATCH, SEQ = 2, 19
WINDOW = 8


@dataclass
class ZooModel:
    """One zoo entry, ready to run: `model(**example_inputs)`.

    Attributes:
        name: registry name.
        model: the module, eval mode, fp32, deterministic weights.
        example_inputs: keyword arguments of one forward.
        n_attention: attention computations in one forward (= canonical sites the detector must produce).
        expected: one `site()` dict per attention computation, in forward execution order.
        causal_lm: the model is a causal language model (supports decode / generate).
        family: model family ("llama", "t5", "torch", ...).
        attn_impl: transformers attn_implementation ("sdpa" / "eager"), None for hand-written models.
        export_ok: torch.export.export(model, (), example_inputs, strict=False) succeeds.
        fx_ok: torch.fx.symbolic_trace(model) succeeds (False for every transformers v5 model).
        reason_contains: negatives only: words the detector's rejection reason must contain.
        notes: what is special about the entry (how it traces, what it returns).
    """

    name: str
    model: nn.Module
    example_inputs: dict[str, Any]
    n_attention: int
    expected: list[dict[str, Any]]
    causal_lm: bool
    family: str
    attn_impl: str | None
    export_ok: bool = True
    fx_ok: bool = False
    reason_contains: str | None = None
    notes: str = ""


class UnknownZooModelError(ValueError):
    """A zoo name that is in neither registry."""


def site(
    mask: str,
    hq: int = HEADS,
    hkv: int | None = None,
    head_dim: int = HEAD_DIM,
    *,
    window: int | None = None,
    softcap: float | None = None,
    cross: bool = False,
    scale: float | None = None,
) -> dict[str, Any]:
    """One attention site's expectation (see the module docstring for the keys).

    `hkv` defaults to `hq`, `scale` to `head_dim ** -0.5`.

    Example:
        >>> site("sliding", 4, 2, window=8)["scale"]
        0.25
    """
    if mask not in MASK_KINDS:
        raise ValueError(f"site(mask={mask!r}): unknown mask kind; use one of {MASK_KINDS}")
    if (mask == "sliding") != (window is not None):
        raise ValueError(f"site(mask={mask!r}, window={window!r}): a window goes with mask='sliding' only")
    hkv = hq if hkv is None else hkv
    if hq % hkv:
        raise ValueError(f"site(hq={hq}, hkv={hkv}): hkv must divide hq")
    return dict(
        mask=mask,
        window=window,
        hq=hq,
        hkv=hkv,
        head_dim=head_dim,
        softcap=softcap,
        cross=cross,
        scale=head_dim**-0.5 if scale is None else float(scale),
    )


def _tokens(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen)


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen)


def torch_entry(name: str, model: nn.Module, inputs: dict[str, Any], expected: list[dict[str, Any]], *,
                fx_ok: bool = True, export_ok: bool = True, causal_lm: bool = False, notes: str = "",
           reason: str | None = None) -> ZooModel:
    return ZooModel(
        name=name, model=model.eval(), example_inputs=inputs, n_attention=len(expected), expected=expected,
        causal_lm=causal_lm, family="torch", attn_impl=None, export_ok=export_ok, fx_ok=fx_ok,
        reason_contains=reason, notes=notes,
    )
