"""The canonical op: exact semantics, fake kernel, autograd, and the bottom-right causal convention."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lcpass  # noqa: F401  registers torch.ops.lcpass.attention
from lcpass.patterns.op import positional_keep, reference

OP = torch.ops.lcpass.attention


def _explicit(q, k, v, keep=None, bias=None, scale=None, softcap=0.0):
    """Attention written out by hand: the oracle for the oracle."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    s = q @ k.transpose(-2, -1) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("sq,sk", [(13, 13), (1, 13), (5, 13)])
def test_causal_window_gqa_matches_explicit(hq, hkv, sq, sk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, sq, 8, generator=g)
    k, v = torch.randn(2, hkv, sk, 8, generator=g), torch.randn(2, hkv, sk, 8, generator=g)
    for window in (-1, 4):
        keep = positional_keep(sq, sk, True, window)
        got = OP(q, k, v, None, 0.3, True, window, 0.0, 0.0, "s", "test")
        torch.testing.assert_close(got, _explicit(q, k, v, keep, scale=0.3), atol=1e-5, rtol=0)


def test_bottom_right_causal_decode_sees_everything():
    keep = positional_keep(1, 9, True, -1)
    assert keep.all()
    assert positional_keep(3, 5, True, -1).tolist() == [
        [True, True, True, False, False], [True, True, True, True, False], [True] * 5]
    assert positional_keep(4, 4, True, 2).sum(-1).tolist() == [1, 2, 2, 2]


def test_bool_and_float_masks_softcap():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    keep = torch.rand(1, 1, 6, 6, generator=g) > 0.3
    keep[..., 0] = True
    bias = torch.randn(1, 2, 6, 6, generator=g)
    torch.testing.assert_close(OP(q, k, v, keep, 0.5, False, -1, 0.0, 0.0, "s", "t"),
                               _explicit(q, k, v, keep, scale=0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(OP(q, k, v, bias, 0.5, False, -1, 30.0, 0.0, "s", "t"),
                               _explicit(q, k, v, bias=bias, scale=0.5, softcap=30.0), atol=1e-6, rtol=0)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = (torch.randn(1, 1, 3, 4) for _ in range(3))
    keep = torch.tensor([[True, True, True], [False, False, False], [True, False, False]])
    out = OP(q, k, v, keep, 0.5, False, -1, 0.0, 0.0, "s", "t")
    assert torch.isfinite(out).all() and out[0, 0, 1].abs().max() == 0


def test_fake_kernel_and_rejects_bad_heads():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = OP(torch.empty(2, 6, 7, 8), torch.empty(2, 3, 9, 8), torch.empty(2, 3, 9, 5), None, 1.0, False,
                 -1, 0.0, 0.0, "s", "t")
    assert tuple(out.shape) == (2, 6, 7, 5)
    with pytest.raises(ValueError, match="Hkv must divide Hq"):
        reference(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))


def test_autograd_matches_sdpa():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 7, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 7, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 7, 8, generator=g, requires_grad=True)
    OP(q, k, v, None, 0.35, True, -1, 0.0, 0.0, "s", "t").square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.35, enable_gqa=True).square().sum().backward()
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
