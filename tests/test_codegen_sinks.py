"""Learned attention sinks in the generated Triton kernels (TRITON_INTERPRET=1 on CPU).

A sink is one more logit per row that attends nothing (gpt-oss): the kernels start each row's online
softmax from it (prefill) or start the split merge from it (decode). Checked against the gpt-oss
formulation written out in float64 (a concatenated column, softmax, the column dropped): block-sparse
layouts on a ragged length (not a multiple of the 64-key block, 32x32 sub-tiles), the dense causal /
full kernels, GQA and MQA, batch 2 with left padding (rows without keys output zeros), Dk != Dv,
decode with one and three new queries, and the gradients of q, k, v and the sinks through the
generated backward. The planned op on ``backend="triton"`` reaches the kernels, not the engine.
"""

from __future__ import annotations

import copy
import os
import warnings

os.environ["TRITON_INTERPRET"] = "1"  # before triton compiles anything in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import lcpass  # noqa: E402
from lcpass import codegen  # noqa: E402
from lcpass import masks as M  # noqa: E402
from lcpass.codegen import launch  # noqa: E402
from lcpass.engine import element_mask  # noqa: E402
from lcpass.layout import build_layout  # noqa: E402

N, BLOCK, TILES, TOL = 200, 64, (32, 32), 1e-4


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LCPASS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lcpass-cache"))


def _eager(q, k, v, keep, sinks, scale):
    """The gpt-oss formulation: keep [B|1, Hq|1, Sq, Sk] (True = attend), sinks [Hq]; float64."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    col = sinks.double().reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
    c = torch.cat([s, col], -1)
    p = torch.softmax(c - c.max(-1, keepdim=True).values, -1)[..., :-1]
    return p @ v


def _inputs(B, Hq, Hkv, Sq, Sk, dk=32, dv=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, dk, generator=g)
    k = torch.randn(B, Hkv, Sk, dk, generator=g)
    v = torch.randn(B, Hkv, Sk, dv, generator=g)
    sinks = torch.randn(Hq, generator=g) * 3  # some sinks dominate their rows, some barely count
    return q, k, v, sinks


def _keep(mm, B, Hq, Sq, Sk, kv_keep):
    return element_mask(mm, B, Hq, Sq, Sk, kv_keep)


CASES = {
    # name: (mask_mod, layout?, B, Hq, Hkv, Sq, padded, dk, dv)
    "streaming-gqa": (M.streaming_mask(4, 40), True, 2, 8, 2, N, False, 32, 32),
    "streaming-mqa-padded": (M.streaming_mask(4, 40), True, 2, 4, 1, N, True, 32, 32),
    "sliding-chunked-prefill": (M.sliding_window_mask(48), True, 1, 4, 2, 136, False, 32, 32),
    "dense-causal-padded": (M.causal_mask(), False, 2, 4, 2, N, True, 32, 32),
    "dense-full": (M.full_mask(), False, 1, 4, 4, 70, False, 32, 32),
    "streaming-dk-dv": (M.streaming_mask(4, 40), True, 1, 4, 2, N, False, 24, 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_kernels_start_each_row_from_its_sink(case):
    mm, sparse, B, Hq, Hkv, Sq, padded, dk, dv = CASES[case]
    q, k, v, sinks = _inputs(B, Hq, Hkv, Sq, N, dk, dv, seed=len(case))
    kv_keep = None
    if padded:  # left padding: batch row 1's first 70 keys are not real (its first queries see none)
        kv_keep = torch.ones(B, N, dtype=torch.bool)
        kv_keep[1, :70] = False
    lay = build_layout(mm, Hq, Sq, N, BLOCK) if sparse else None
    tiles = TILES if sparse else None
    out = codegen.attention(q, k, v, lay, scale=dk ** -0.5, mask_mod=None if sparse else mm, tiles=tiles,
                            kv_keep=kv_keep, sinks=sinks[None, :, None])
    want = _eager(q, k, v, _keep(mm, B, Hq, Sq, N, kv_keep), sinks, dk ** -0.5)
    assert out.shape == want.shape
    assert (out.double() - want).abs().max().item() < TOL, case
    if padded:
        assert out[1, :, : 70 - (N - Sq)].abs().max() == 0  # rows without keys: zeros, not the sink's NaN
    plain = codegen.attention(q, k, v, lay, scale=dk ** -0.5, mask_mod=None if sparse else mm, tiles=tiles,
                              kv_keep=kv_keep)
    assert (plain - out).abs().max() > 1e-2  # the sinks really take their share


@pytest.mark.parametrize("sq,heads", [(1, (8, 2)), (3, (4, 1))])
def test_decode_merge_starts_from_the_sink(sq, heads):
    Hq, Hkv = heads
    mm = M.streaming_mask(4, 40)
    q, k, v, sinks = _inputs(2, Hq, Hkv, sq, N, seed=sq)
    lay = build_layout(mm, Hq, sq, N, BLOCK)
    out = codegen.decode_attention(q, k, v, lay, scale=32 ** -0.5, n_splits=2, block_n=32,
                                   sinks=sinks[None, :, None])
    want = _eager(q, k, v, _keep(mm, 2, Hq, sq, N, None), sinks, 32 ** -0.5)
    assert (out.double() - want).abs().max().item() < TOL


def test_gradients_of_q_k_v_and_the_sinks():
    mm = M.streaming_mask(4, 40)
    q, k, v, sinks = _inputs(2, 4, 2, 136, 136, seed=7)
    lay = build_layout(mm, 4, 136, 136, BLOCK)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = codegen.attention(*leaves[:3], lay, scale=32 ** -0.5, tiles=TILES, sinks=leaves[3][None, :, None])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, leaves, dout)
    ref = [t.double().requires_grad_() for t in (q, k, v, sinks)]
    want = torch.autograd.grad(_eager(*ref[:3], _keep(mm, 2, 4, 136, 136, None), ref[3], 32 ** -0.5), ref,
                               dout.double())
    for name, a, b in zip("q k v sinks".split(), got, want):
        assert (a.double() - b).abs().max().item() < 1e-3, name


def test_bad_sink_shapes_are_refused_by_name():
    q, k, v, sinks = _inputs(1, 4, 2, 16, 16)
    with pytest.raises(ValueError, match=r"sinks of shape \(3,\).*sinks\[None, :, None\]"):
        codegen.attention(q, k, v, None, scale=1.0, sinks=sinks[:3])
    with pytest.raises(ValueError, match="one logit per"):
        launch._sink_args(torch.zeros(1, 4, 15), q)


class _Sinks(torch.nn.Module):
    """gpt-oss's eager attention, written out (GQA by repeat_interleave, a sink column concatenated)."""

    def __init__(self, d=32, h=4, hkv=2):
        super().__init__()
        self.h, self.hkv, self.dh = h, hkv, d // h
        self.q, self.o = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.kv = torch.nn.Linear(d, 2 * hkv * self.dh)
        self.sinks = torch.nn.Parameter(torch.randn(h) * 2)
        self.keep = None

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.dh).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.hkv, self.dh).permute(2, 0, 3, 1, 4)
        k, v = (t.repeat_interleave(self.h // self.hkv, 1) for t in (k, v))
        s = q @ k.transpose(-1, -2) * self.dh ** -0.5
        keep = torch.ones(n, n, dtype=torch.bool).tril() if self.keep is None else self.keep(n)
        c = torch.cat([s.masked_fill(~keep, float("-inf")), self.sinks.reshape(1, -1, 1, 1).expand(b, -1, n, 1)], -1)
        p = torch.softmax(c, -1)[..., :-1]
        return self.o((p @ v).transpose(1, 2).reshape(b, n, -1))


def test_the_planned_op_on_the_triton_backend_runs_the_kernels_with_sinks(monkeypatch):
    torch.manual_seed(0)
    model = _Sinks().eval()
    streaming = copy.deepcopy(model)
    i = torch.arange(70)
    streaming.keep = lambda n: ((i[:n, None] >= i[None, :n]) & ((i[None, :n] < 2) | (i[:n, None] - i[None, :n] < 8)))
    calls = []
    fwd = launch.fwd
    monkeypatch.setattr(launch, "fwd", lambda *a, **kw: calls.append(kw.get("sinks")) or fwd(*a, **kw))
    x, fresh = torch.randn(2, 70, 32), torch.randn(2, 45, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to the engine
        opt = lcpass.optimize(copy.deepcopy(model), example_inputs=(x,), method="streaming", sink=2,
                              window=8, dense_below=0, backend="triton")
        calls.clear()
        for inp in (x, fresh):
            torch.testing.assert_close(opt(inp), streaming(inp), rtol=0, atol=1e-5)
    assert calls and all(s is not None and s.numel() for s in calls)
