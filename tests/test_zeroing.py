"""Probabilities zeroed again after the softmax, and keys held transposed.

DeBERTa's XSoftmax, CPM-Ant and SEW-D set the probabilities of masked keys to 0 after the softmax
(``masked_fill(p, ~mask, 0)`` / ``where(mask, p, 0)``). The rewrite may drop that zeroing only when it
hides nothing the scores' mask lets through; with any other condition the site must be left alone with a
reason (dropping it would attend keys the model zeroes: a silent wrong answer). SqueezeBERT holds its keys
transposed (``[B, H, D, S]``) and multiplies ``q @ kᵀ`` without a transpose in the graph.

The oracle is eager PyTorch on fresh inputs and fresh masks.
"""
from __future__ import annotations

import pytest
import torch

import lcpass

B, H, S, D = 2, 2, 10, 8


class ZeroedAgain(torch.nn.Module):
    """Masked attention whose probabilities are zeroed after the softmax by ``zero_by``."""

    def __init__(self, how: str, zero_by: str):
        super().__init__()
        self.how, self.zero_by = how, zero_by
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)

    def forward(self, x, mask, other):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, H, D).permute(2, 0, 3, 1, 4)
        keep = mask[:, None, None, :].bool()  # [B, 1, 1, S] padding-style keep mask
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        p = torch.softmax(s, -1)
        zero = keep if self.zero_by == "same" else other[:, None, None, :].bool()
        if self.how == "masked_fill":
            p = p.masked_fill(~zero, 0.0)
        elif self.how == "where":
            p = torch.where(zero, p, 0.0)
        else:  # where(c, 0, p) with the negated mask, the condition compared with 0
            p = torch.where(zero.int() == 0, torch.zeros_like(p), p)
        return (p @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], H * D)


def _pad(gen) -> torch.Tensor:
    m = (torch.rand(B, S, generator=gen) < 0.7).long()
    m[:, 0] = 1  # every row keeps a key
    return m


@pytest.mark.parametrize("how", ["masked_fill", "where", "where-eq0"])
def test_zeroing_by_the_scores_own_mask_is_rewritten_exactly(how):
    torch.manual_seed(0)
    model = ZeroedAgain(how, "same").eval()
    gen = torch.Generator().manual_seed(0)
    x, m = torch.randn(B, S, H * D), _pad(gen)
    report = lcpass.inspect(model, (x, m, m))
    assert len(report.sites) == 1, report.rejected
    opt = lcpass.optimize(model, method="dense", example_inputs=(x, m, m))
    for _ in range(3):
        xx, mm, other = torch.randn(B, S, H * D, generator=gen), _pad(gen), _pad(gen)
        with torch.no_grad():
            torch.testing.assert_close(opt(xx, mm, other), model(xx, mm, other), rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["masked_fill", "where", "where-eq0"])
def test_zeroing_by_another_mask_is_refused_with_a_reason(how):
    """The zeroing condition is another input: it hides keys the scores' mask keeps, so the site is left
    alone (the old matcher dropped it and was off by ~1 on such inputs)."""
    torch.manual_seed(0)
    model = ZeroedAgain(how, "other").eval()
    gen = torch.Generator().manual_seed(1)
    x, m, other = torch.randn(B, S, H * D), _pad(gen), _pad(gen)
    report = lcpass.inspect(model, (x, m, other))
    assert report.sites == []
    assert any("zeroed after the softmax" in r.reason for r in report.rejected), report.rejected
    # optimize refuses the model by default (strict); strict=False keeps the model's own attention there
    with pytest.raises(lcpass.UnsupportedModelError, match="recognised 0"):
        lcpass.optimize(model, method="dense", example_inputs=(x, m, other))
    with pytest.warns(UserWarning, match="would silently keep the model's own attention"):
        opt = lcpass.optimize(model, method="dense", example_inputs=(x, m, other), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(opt(x, m, other), model(x, m, other), rtol=0, atol=1e-5)


class TransposedKeys(torch.nn.Module):
    """SqueezeBERT's layout: keys come out of a 1x1 conv as [B, C, S] and are viewed to [B, H, D, S]."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Conv1d(H * D, H * D, 1)
        self.k = torch.nn.Conv1d(H * D, H * D, 1)
        self.v = torch.nn.Conv1d(H * D, H * D, 1)

    def forward(self, x):  # x: [B, C, S]
        b, _, n = x.shape
        q = self.q(x).view(b, H, D, n).permute(0, 1, 3, 2)  # [B, H, S, D]
        kt = self.k(x).view(b, H, D, n)  # [B, H, D, S]: already kᵀ
        v = self.v(x).view(b, H, D, n).permute(0, 1, 3, 2)
        p = torch.softmax((q @ kt) / D ** 0.5, dim=-1)
        return (p @ v).permute(0, 1, 3, 2).reshape(b, H * D, n)


def test_keys_held_transposed_are_found_and_exact():
    torch.manual_seed(0)
    model = TransposedKeys().eval()
    x = torch.randn(B, H * D, S)
    report = lcpass.inspect(model, (x,))
    assert len(report.sites) == 1, report.rejected
    site = report.sites[0]
    assert site.head_dim == D and site.n_heads == H and site.scale == pytest.approx(D ** -0.5)
    opt = lcpass.optimize(model, method="dense", example_inputs=(x,))
    xx = torch.randn(B, H * D, S)
    with torch.no_grad():
        torch.testing.assert_close(opt(xx), model(xx), rtol=0, atol=1e-5)


def test_a_parameter_on_the_right_of_the_scores_is_not_keys():
    """A learned [D, N] matrix on the right of the matmul (a classifier / router) is not kᵀ."""

    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(D, S))
            self.v = torch.nn.Parameter(torch.randn(S, D))

        def forward(self, x):
            return torch.softmax(x @ self.w, -1) @ self.v

    report = lcpass.inspect(Router().eval(), (torch.randn(B, H, S, D),))
    assert report.sites == []
