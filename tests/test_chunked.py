"""Chunked attention (Llama-4's chunked layers) as a first-class mask kind.

The positions are cut into chunks of C and a query attends, causally, only the keys of its own chunk.
Chunks begin at each batch row's first attended key (left padding moves them, as transformers' chunked
masks do). The detector reads them from a mask built from shapes and constants (or from the ``a // C ==
b // C`` constant when the example is shorter than a chunk); a mask built from an ``attention_mask`` is
structure only if its chunks move with the padding, else a checked claim.

Oracles: chunked attention written out element by element here, the hand-written modules themselves in
eager PyTorch (fresh lengths, fresh padding), and transformers' Llama-4.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lcpass
from lcpass.capture import capture
from lcpass.lower import PLANNED_OP, spec_json
from lcpass.patterns import canonicalize
from lcpass.patterns.op import reference

C = 5
SINK, WINDOW = 1, 3
STREAM = dict(method="streaming", sink=SINK, window=WINDOW, dense_below=0)


def _written_out(q, k, v, valid, chunk, scale, keep_extra=None):
    """Chunked causal attention one element at a time: row b's chunks start at its first valid key;
    ``keep_extra(i_rel, j_rel)`` restricts further on positions relative to that key."""
    b_, hq, sq, _ = q.shape
    g = hq // k.shape[1]
    sk = k.shape[2]
    out = torch.zeros(b_, hq, sq, v.shape[-1], dtype=torch.float64)
    for b in range(b_):
        p = int(valid[b].int().argmax()) if bool(valid[b].any()) else 0
        for h in range(hq):
            for i in range(sq):
                qi = sk - sq + i
                keys = [j for j in range(sk) if valid[b, j] and j <= qi and (j - p) // chunk == (qi - p) // chunk
                        and (keep_extra is None or keep_extra(qi - p, j - p))]
                if not keys:
                    continue
                s = torch.stack([(q[b, h, i].double() @ k[b, h // g, j].double()) * scale for j in keys])
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h // g, keys].double()
    return out


def _streaming(i, j):
    return j < SINK or i - j < WINDOW


@pytest.mark.parametrize("shape", [(2, 4, 2, 13, 13, 8, 8), (1, 2, 1, 4, 11, 8, 6), (3, 3, 3, 7, 7, 4, 4)])
def test_reference_chunks_are_the_written_out_chunks(shape):
    b, hq, hkv, sq, sk, dk, dv = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(b, hq, sq, dk, generator=g), torch.randn(b, hkv, sk, dk, generator=g), \
        torch.randn(b, hkv, sk, dv, generator=g)
    valid = torch.ones(b, sk, dtype=torch.bool)
    valid[-1, :min(3, sk - 1)] = False  # left padding on the last row moves its chunks
    mask = valid[:, None, None, :].expand(b, 1, sq, sk)
    for m in (None, mask):
        got = reference(q, k, v, m, 0.4, True, -1, 0.0, 0.0, None, C)
        want = _written_out(q, k, v, valid if m is not None else torch.ones(b, sk, dtype=torch.bool), C, 0.4)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_planned_streaming_on_chunks_equals_the_written_out_method():
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, n, d = 2, 4, 2, 23, 8
    q, k, v = torch.randn(b, hq, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g), \
        torch.randn(b, hkv, n, d, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :4] = False
    mask = valid[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
    spec = spec_json([("streaming", {"sink": SINK, "window": WINDOW})] * hq, dense_below=0)
    for m, vv in ((None, torch.ones(b, n, dtype=torch.bool)), (mask, valid)):
        got = PLANNED_OP(q, k, v, m, 0.35, True, -1, 0.0, 0.0, "l0", "chunked(5)+padding" if m is not None
                         else "chunked(5)", spec, None, C)
        want = _written_out(q, k, v, vv, C, 0.35, _streaming)
        rows = vv[:, None, -n:, None].expand(b, hq, n, d)  # padded query rows: the model's business
        torch.testing.assert_close(got.double()[rows], want[rows], rtol=0, atol=1e-5)


class Chunked(torch.nn.Module):
    """Causal attention within chunks, written as a user would: the mask from ``arange`` (``form=
    "shapes"``), from an ``attention_mask`` with chunks counted from the first real token as transformers
    does (``"padded"``), or with absolute chunks next to a padding mask (``"absolute"``)."""

    def __init__(self, chunk=C, form="shapes", d=32, h=4):
        super().__init__()
        self.chunk, self.form, self.h, self.dh = chunk, form, h, d // h
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.o = torch.nn.Linear(d, d)
        self.extra = None  # (i_rel, j_rel) -> keep: the hand-built reference of a plan

    def forward(self, x, attention_mask=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        i = torch.arange(n, device=x.device)[:, None]
        j = torch.arange(n, device=x.device)[None, :]
        if attention_mask is None:
            start = torch.zeros(b, 1, 1, 1, dtype=torch.long)
            valid = torch.ones(b, 1, 1, n, dtype=torch.bool)
        else:
            valid = attention_mask.bool()[:, None, None, :]
            pad = (attention_mask.cumsum(-1) == 0).sum(-1)
            start = pad.view(b, 1, 1, 1) if self.form == "padded" else torch.zeros_like(pad).view(b, 1, 1, 1)
        keep = (j <= i) & ((i - start) // self.chunk == (j - start) // self.chunk) & valid
        if self.extra is not None:
            keep = keep & self.extra(i - start, j - start)
        s = (q @ k.transpose(-1, -2)) * self.dh ** -0.5
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
        return self.o((p @ v).transpose(1, 2).reshape(b, n, -1))


def _pair(chunk=C, form="shapes"):
    torch.manual_seed(0)
    model = Chunked(chunk, form).eval()
    streaming = copy.deepcopy(model)
    streaming.extra = lambda i, j: (j < SINK) | (i - j < WINDOW)
    return model, streaming


def _padding(b, n, pads):
    am = torch.ones(b, n, dtype=torch.long)
    for row, p in enumerate(pads):
        am[row, :p] = 0
    return am


def _sites(model, *args):
    cap = capture(model, args)
    return canonicalize(cap.gm, cap.flat_inputs, cap.param_placeholders).sites


def test_chunks_are_read_from_shapes_from_padding_and_from_the_constant():
    x = torch.randn(2, 17, 32)
    (s,) = _sites(Chunked(C, "shapes").eval(), x)
    assert (s.mask, s.is_causal, s.chunk) == ("chunked(5)", True, 5)
    (s,) = _sites(Chunked(C, "padded").eval(), x, _padding(2, 17, (0, 3)))
    assert (s.mask, s.chunk) == ("chunked(5)+padding", 5)  # structure: the chunks move with the padding
    # absolute chunks next to a padding input do not move with it: no chunk structure, only the checked
    # claim the example implies (causal)
    (s,) = _sites(Chunked(C, "absolute").eval(), x, _padding(2, 17, (0, 3)))
    assert s.mask == "causal?+padding" and s.chunk == -1
    # a chunk longer than the example shows only in the graph's `a // C == b // C`
    (s,) = _sites(Chunked(64, "shapes").eval(), x)
    assert (s.mask, s.chunk) == ("chunked(64)", 64)


@pytest.mark.parametrize("form", ["shapes", "padded", "absolute"])
def test_optimize_and_compile_keep_chunks_on_fresh_inputs(form):
    model, streaming = _pair(C, form)
    x, fresh = torch.randn(2, 17, 32), torch.randn(2, 22, 32)  # optimize keeps the batch static
    args = (x,) if form == "shapes" else (x, _padding(2, 17, (0, 3)))
    fresh_args = (fresh,) if form == "shapes" else (fresh, _padding(2, 22, (6, 2)))
    unpadded = (fresh, _padding(2, 22, (0, 0)))

    def oracle(a):
        # absolute chunks: a mask that is not padding runs the method (on absolute positions) with it
        return streaming(*a)

    cases = (args, fresh_args) + ((unpadded,) if form != "shapes" else ())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = lcpass.optimize(copy.deepcopy(model), method="dense", example_inputs=args)
        opt = lcpass.optimize(copy.deepcopy(model), example_inputs=args, **STREAM)
        compiled = torch.compile(copy.deepcopy(model), backend="lcpass", options=STREAM)
        for a in cases:
            torch.testing.assert_close(dense(*a), model(*a), rtol=0, atol=1e-5)
            torch.testing.assert_close(opt(*a), oracle(a), rtol=0, atol=1e-5)
            torch.testing.assert_close(compiled(*a), oracle(a), rtol=0, atol=1e-5)
        probe = cases[-1]
        assert (opt(*probe) - model(*probe)).abs().max() > 1e-2  # the method really applies


def test_a_chunk_longer_than_the_example_still_applies_at_longer_lengths():
    model = Chunked(24, "shapes").eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = lcpass.optimize(copy.deepcopy(model), method="dense", example_inputs=(torch.randn(1, 17, 32),))
        long = torch.randn(1, 53, 32)
        torch.testing.assert_close(dense(long), model(long), rtol=0, atol=1e-5)


def test_verify_checks_chunked_sites():
    model, _ = _pair(C, "padded")
    args = (torch.randn(2, 17, 32), _padding(2, 17, (0, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = lcpass.optimize(copy.deepcopy(model), example_inputs=args, verify=True, **STREAM)
    assert not opt.lcpass_report.verify.failed


@pytest.mark.parametrize("form", ["shapes", "padded"])
def test_the_onnx_door_carries_chunks(tmp_path, form):
    import onnxruntime as ort

    from lcpass.export import export

    model, streaming = _pair(C, form)
    args = (torch.randn(2, 17, 32),) if form == "shapes" else (torch.randn(2, 17, 32), _padding(2, 17, (0, 3)))
    for plan, oracle in (({"method": "dense"}, model), (STREAM, streaming)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export(copy.deepcopy(model), args, tmp_path / "m.onnx", **plan)
        sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
        names = [i.name for i in sess.get_inputs()]
        for n, pads in ((17, (0, 3)), (12, (5, 1))):
            feed = (torch.randn(2, n, 32),) + (() if form == "shapes" else (_padding(2, n, pads),))
            got = torch.from_numpy(sess.run(None, {k: t.numpy() for k, t in zip(names, feed)})[0])
            with torch.no_grad():
                torch.testing.assert_close(got, oracle(*feed), rtol=0, atol=1e-4)


def test_llama4_chunked_layers_through_the_transformers_door():
    from lcpass.zoo.auto import architectures, build

    arch = next(a for a in architectures() if a.model_type == "llama4_text")
    model = build(arch, "eager").model
    assert model.config.attention_chunk_size < 19  # the chunks bite at the sweep's length
    ids = torch.randint(3, 200, (2, 19))
    example = {"input_ids": ids, "attention_mask": _padding(2, 19, (0, 5))}
    rep = lcpass.inspect(model, example_inputs=example)
    chunked = [s for s in rep.sites if s.chunk >= 1]
    assert chunked and all(s.mask == f"chunked({model.config.attention_chunk_size})+padding" for s in chunked)
    fresh = {"input_ids": torch.randint(3, 200, (3, 23)), "attention_mask": _padding(3, 23, (7, 0, 2))}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model(**fresh).logits
        dense = lcpass.optimize(build(arch, "eager").model, method="dense", example_inputs=example)
        torch.testing.assert_close(dense(**fresh).logits, want, rtol=0, atol=1e-5)
        opt = lcpass.optimize(build(arch, "eager").model, example_inputs=example, verify=True, **STREAM)
    assert not opt.lcpass_report.verify.failed
    assert "chunked attention" in opt.lcpass_report.kv  # the compressed cache refuses chunks, and says so
