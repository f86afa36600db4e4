"""Door parity: the same modules through every door give eager's answer, and the lowered graphs hold no
attention besides lcpass's ops.

Doors: ``lcpass.optimize``, ``torch.compile(backend="lcpass")`` with ``inner="eager"`` and with Inductor,
``lcpass.export`` to a torch.export program and to ONNX (run by onnxruntime). Cases: GPT-2-style fused
qkv with permuted views, a tril buffer and eval-mode dropout; a BERT-style padding mask passed as an
input; 3-D ``bmm`` attention (no head axis); SDPA with GQA; a ``[S, S]`` mask input whose example happens
to be causal. Every door runs on fresh inputs (a fresh mask too), not the captured example. ``dense``
plans must equal eager (1e-5, fp32); a ``streaming`` plan must give one answer on every door, and not
eager's (it drops keys). A site the detector must refuse (zeroing by another mask) keeps the model's own
attention, and eager's answer, on every door. The zoo's modules run through every door but Inductor
(covered above) with a dense plan on fresh inputs.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from doors import DOORS, attention_left, call, main_tensor, run_door
from test_zeroing import TransposedKeys, ZeroedAgain
from torch import nn

import lcpass
from lcpass.zoo import TORCH_ZOO, get_zoo_model

B, S, H, D = 2, 12, 2, 8
ATOL = 1e-5


class GPT2Style(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(H * D, 3 * H * D)
        self.register_buffer("tril", torch.tril(torch.ones(64, 64, dtype=torch.bool)))
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
        w = q @ k.transpose(-1, -2) / math.sqrt(D)
        w = w.masked_fill(~self.tril[:n, :n], torch.finfo(w.dtype).min)
        p = self.drop(torch.softmax(w, -1))
        return (p @ v).transpose(1, 2).reshape(b, n, H * D)


class BertPadded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(H * D, H * D) for _ in range(3))

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, H, D).transpose(1, 2) for f in (self.q, self.k, self.v))
        w = q @ k.transpose(-1, -2) * D ** -0.5 + (1.0 - mask[:, None, None, :].float()) * -10000.0
        return (torch.softmax(w, -1) @ v).transpose(1, 2).reshape(b, n, H * D)


class Bmm3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * D ** -0.5, -1), v)


class SdpaGQA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 4 * D), nn.Linear(32, 2 * D), nn.Linear(32, 2 * D)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, D).transpose(1, 2)
        k, v = (f(x).view(b, n, 2, D).transpose(1, 2) for f in (self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).flatten(2)


class MaskInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(H * D, 3 * H * D)

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def _padding(gen: torch.Generator) -> torch.Tensor:
    m = torch.ones(B, S, dtype=torch.long)
    m[1, S - 1 - int(torch.randint(1, 5, (), generator=gen)):] = 0
    return m


def _square(gen: torch.Generator, causal: bool) -> torch.Tensor:
    if causal:
        return torch.ones(S, S, dtype=torch.bool).tril()
    return (torch.rand(S, S, generator=gen) > 0.4) | torch.eye(S, dtype=torch.bool)


# case -> (module class, inputs(generator, is_example), methods)
CASES = {
    "gpt2_permuted_dropout": (GPT2Style, lambda g, ex: (torch.randn(B, S, H * D, generator=g),),
                              ("dense", "streaming")),
    "bert_padding_input": (BertPadded, lambda g, ex: (torch.randn(B, S, H * D, generator=g), _padding(g)),
                           ("dense",)),
    "bmm_3d": (Bmm3, lambda g, ex: (torch.randn(B, S, D, generator=g),), ("dense",)),
    "sdpa_gqa": (SdpaGQA, lambda g, ex: (torch.randn(B, S, 32, generator=g),), ("dense", "streaming")),
    "square_mask_input": (MaskInput, lambda g, ex: (torch.randn(B, S, H * D, generator=g), _square(g, ex)),
                          ("dense",)),
    # probabilities zeroed again by the scores' own padding mask (DeBERTa's XSoftmax): the zeroing is dropped
    "zeroed_by_own_mask": (lambda: ZeroedAgain("where-eq0", "same"),
                           lambda g, ex: (torch.randn(B, S, H * D, generator=g), _padding(g), _padding(g)),
                           ("dense",)),
    # keys that come out of a conv already transposed (SqueezeBERT): no transpose in the graph
    "keys_transposed": (TransposedKeys, lambda g, ex: (torch.randn(B, H * D, S, generator=g),), ("dense",)),
}
PARAMS = {"dense": {}, "streaming": {"sink": 1, "window": 3, "dense_below": 0}}


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_door_gives_eager_answer(case, door, tmp_path):
    cls, make, methods = CASES[case]
    torch.manual_seed(0)
    model = cls().eval()
    gen = torch.Generator().manual_seed(1)
    example, fresh = make(gen, True), make(gen, False)
    with torch.no_grad():
        want = model(*fresh)
        outs = {}
        for method in methods:
            got, ops = run_door(door, model, example, fresh, method, PARAMS[method], tmp_path)
            assert not attention_left(ops), f"{case}/{door}/{method}: lowered graph keeps {attention_left(ops)}"
            outs[method] = got
    err = (outs["dense"] - want).abs().max().item()
    assert err < ATOL, f"{case} through {door} (dense plan): max error {err:.2e} vs eager"
    if "streaming" in outs:
        # one answer on every door: compare with optimize's, which test_optimize checks against references
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = lcpass.optimize(model, method="streaming", example_inputs=example, **PARAMS["streaming"])(*fresh)
        assert (ref - want).abs().max().item() > 1e-3  # streaming drops keys: not eager's answer
        err = (outs["streaming"] - ref).abs().max().item()
        assert err < ATOL, f"{case} through {door} (streaming): max error {err:.2e} vs lcpass.optimize"


def test_a_refused_site_keeps_eager_answer_on_every_door(tmp_path):
    """Zeroing by another mask hides keys the scores' mask keeps: every door leaves the softmax alone."""
    torch.manual_seed(0)
    model = ZeroedAgain("masked_fill", "other").eval()
    gen = torch.Generator().manual_seed(2)
    make = lambda: (torch.randn(B, S, H * D, generator=gen), _padding(gen), _padding(gen))  # noqa: E731
    example, fresh = make(), make()
    with torch.no_grad():
        want = model(*fresh)
    assert lcpass.inspect(model, example).sites == []
    # optimize refuses by default, naming the site and the reason; strict=False hands back the model itself
    with pytest.raises(lcpass.UnsupportedModelError, match="zeroed after the softmax"):
        lcpass.optimize(model, method="dense", example_inputs=example)
    for door in DOORS:
        if door == "optimize":
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                got = lcpass.optimize(model, method="dense", example_inputs=example, strict=False)(*fresh)
        else:
            got, ops = run_door(door, model, example, fresh, "dense", {}, tmp_path)
            assert attention_left(ops), f"{door}: the refused site was rewritten"
        err = (got - want).abs().max().item()
        assert err < ATOL, f"refused site through {door}: max error {err:.2e} vs eager"


def _fresh_like(inputs: dict, gen: torch.Generator) -> dict:
    """New values of the example's shapes: floats redrawn, token ids redrawn, 0/1 masks with new padding."""
    out = {}
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            out[name] = t
        elif t.is_floating_point():
            out[name] = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        elif set(t.unique().tolist()) <= {0, 1} and t.dim() == 2:
            m = torch.ones_like(t)
            m[-1, t.shape[1] - int(torch.randint(1, t.shape[1] // 2, (), generator=gen)):] = 0
            out[name] = m
        else:
            out[name] = torch.randint(0, int(t.max()) + 1, t.shape, generator=gen, dtype=t.dtype)
    return out


ZOO_DOORS = ("optimize", "compile_eager", "export_torch", "export_onnx")
ZOO_CASES = [*TORCH_ZOO, "llama-tiny", "gpt2-tiny", "bert-tiny", "vit-tiny"]


@pytest.mark.parametrize("door", ZOO_DOORS)
@pytest.mark.parametrize("name", ZOO_CASES)
def test_zoo_keeps_eager_answer_on_every_door(name, door, tmp_path):
    z = get_zoo_model(name)
    fresh = _fresh_like(z.example_inputs, torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = main_tensor(call(z.model, fresh))
    got, ops = run_door(door, copy.deepcopy(z.model), z.example_inputs, fresh, "dense", {}, tmp_path)
    assert not attention_left(ops), f"{name} through {door}: lowered graph keeps {attention_left(ops)}"
    err = (got - want).abs().max().item()
    assert err < ATOL, f"{name} through {door} (dense plan, fresh inputs): max error {err:.2e} vs eager"


class BiasBeforeReshape(nn.Module):
    """A bias added to scores viewed [B, H, S, S] between two [B*H, S, S] views: with a symbolic length the
    bias's placement cannot be read, at the example's shapes it can."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(H * D, 3 * H * D)

    def forward(self, x, bias):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, D).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-1, -2)).view(b * H, s, s) / D ** 0.5
        w = (w.view(b, H, s, s) + bias).view(b * H, s, s)
        return (w.softmax(-1).view(b, H, s, s) @ v).transpose(1, 2).reshape(b, s, -1)


@pytest.mark.parametrize("door", ["optimize", "export_torch"])
def test_a_symbolic_length_that_hides_a_site_falls_back_to_static_shapes(door, tmp_path):
    """optimize and export decide the static fallback in one place (lcpass.found.prefer_static): both warn
    with the same reason, find the site, and give eager's answer on fresh inputs of the example's shapes."""
    torch.manual_seed(0)
    model = BiasBeforeReshape().eval()
    gen = torch.Generator().manual_seed(3)
    make = lambda: (torch.randn(B, S, H * D, generator=gen), torch.randn(1, H, S, S, generator=gen))  # noqa: E731
    example, fresh = make(), make()
    with torch.no_grad():
        want = model(*fresh)
    door_name = "lcpass.optimize" if door == "optimize" else "lcpass.export"
    with pytest.warns(UserWarning, match=rf"{door_name}: BiasBeforeReshape: with a symbolic sequence length 0 of 1 "
                      r"attention sites are found \(.*a bias is added before a reshape"):
        if door == "optimize":
            got = lcpass.optimize(model, method="longlora", group_size=4, causal=False, dense_below=0,
                                 example_inputs=example)(*fresh)
        else:
            res = lcpass.export(model, example, tmp_path / "m.pt2", format="torch", method="longlora", group_size=4,
                                causal=False, dense_below=0)
            got = res.program.module()(*fresh)
    ref = lcpass.optimize(model, method="longlora", group_size=4, causal=False, dense_below=0, example_inputs=example,
                          capture="fx")
    assert (got - ref(*fresh)).abs().max().item() < ATOL  # the rewrite ran (the groups differ from eager)
    assert (got - want).abs().max().item() > 1e-3
