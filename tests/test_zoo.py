"""The zoo is the detector's ground truth, so these tests check the ground truth itself: every model runs and is
deterministic, export/fx flags are honest, and `n_attention`/`expected` match what one forward really does
(observed by intercepting every SDPA and softmax call with a TorchFunctionMode)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lcpass import zoo
from lcpass.zoo import MASK_KINDS, NEGATIVE, ZOO, ZooModel, get_zoo_model, site
from lcpass.zoo.base import BATCH

ALL = list(ZOO) + list(NEGATIVE)
SDPA_FUNCS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.Tensor.softmax, torch._softmax}


class AttentionRecorder(TorchFunctionMode):
    """Records every SDPA call, every softmax call and every `amax(..., keepdim=True)` (hand-written softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in SDPA_FUNCS:
            self._sdpa(args, kwargs)
        elif func in SOFTMAX_FUNCS:
            self._softmax(args, kwargs)
        elif func is torch.Tensor.amax and (kwargs.get("keepdim") or (len(args) > 2 and args[2])):
            self.events.append(("amax", {"scores": args[0].detach().clone()}))
        elif func is F.multi_head_attention_forward:
            return self._inside_mha(func, args, kwargs)
        return func(*args, **kwargs)

    def _sdpa(self, args: tuple, kwargs: dict) -> None:
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
        self.events.append(("sdpa", dict(zip(names, args)) | kwargs))

    def _softmax(self, args: tuple, kwargs: dict) -> None:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        self.events.append(("softmax", {"scores": args[0].detach().clone(), "dim": dim}))

    def _inside_mha(self, func, args, kwargs):  # noqa: ANN001, ANN202
        """The mode is off while its handler runs, so F.multi_head_attention_forward's own SDPA/softmax calls
        (module globals of torch.nn.functional) are wrapped for the duration of the call instead."""
        sdpa, softmax = F.scaled_dot_product_attention, F.softmax

        def rec_sdpa(*a, **k):  # noqa: ANN002, ANN003, ANN202
            self._sdpa(a, k)
            return sdpa(*a, **k)

        def rec_softmax(*a, **k):  # noqa: ANN002, ANN003, ANN202
            self._softmax(a, k)
            return softmax(*a, **k)

        F.scaled_dot_product_attention, F.softmax = rec_sdpa, rec_softmax
        try:
            return func(*args, **kwargs)
        finally:
            F.scaled_dot_product_attention, F.softmax = sdpa, softmax


def record(z: ZooModel) -> list[tuple[str, dict[str, Any]]]:
    """Run one forward under the recorder. Grad stays enabled on purpose: under no_grad, eval-mode
    nn.MultiheadAttention / TransformerEncoderLayer take the fused C++ fast path, which calls no SDPA or
    softmax in Python (export and dynamo never take it)."""
    with AttentionRecorder() as rec:
        z.model(**z.example_inputs)
    return rec.events


def _keep_kind(keep: torch.Tensor) -> tuple[str, int | None]:
    """Classify a keep pattern [B, 1|H, Q, K] (True = attend) as a mask kind (+ window for sliding)."""
    q_len, k_len = keep.shape[-2:]
    i = torch.arange(q_len)[:, None] + (k_len - q_len)
    j = torch.arange(k_len)[None, :]
    causal = j <= i
    if bool(keep.all()):
        return "none", None
    keys = keep.any(dim=-2, keepdim=True)  # a key kept by any query = not padding
    if bool((keep == (causal & keys)).all()):
        return ("causal" if bool(keys.all()) else "causal+padding"), None
    if bool((keep == keys.expand_as(keep)).all()):
        return "padding", None
    offsets = (i - j).expand_as(keep)[keep]
    window = int(offsets.max()) + 1
    if bool((keep == (causal & (i - j < window))).all()):
        return "sliding", window
    raise AssertionError(f"unrecognised mask pattern {keep.int()}")


def observe_sdpa(call: dict[str, Any]) -> dict[str, Any]:
    """What one SDPA call really computes, in `site()` terms."""
    q, k, mask = call["query"], call["key"], call.get("attn_mask")
    hq, d = q.shape[1], q.shape[-1]
    # hkv: k's distinct heads (repeat_kv copies them; enable_gqa passes them unrepeated).
    distinct = [h for h in range(k.shape[1]) if not any(torch.equal(k[:, h], k[:, g]) for g in range(h))]
    obs = dict(hq=hq, hkv=len(distinct), head_dim=d, cross=q.shape[-2] != k.shape[-2])
    obs["scale"] = call["scale"] if call.get("scale") is not None else d**-0.5
    if mask is None:
        kind, window = ("causal" if call.get("is_causal") else "none"), None
    elif mask.dtype == torch.bool:
        kind, window = _keep_kind(mask)
    else:
        kind, window = _keep_kind(mask > torch.finfo(mask.dtype).min / 2)
        kept = mask[mask > torch.finfo(mask.dtype).min / 2]
        if bool((kept != 0).any()):  # an all-zero bias carries no information
            kind = {"none": "bias", "causal": "causal+bias"}[kind]
    obs.update(mask=kind, window=window)
    return obs


def observe_softmax(scores: torch.Tensor) -> dict[str, Any]:
    """What an eager softmax over [B, H, Q, K] scores computes (bias is invisible here: reported as its mask)."""
    keep = scores > torch.finfo(scores.dtype).min / 2
    kind, window = _keep_kind(keep if keep.dim() == 4 else keep[:, None])
    return dict(hq=scores.shape[1], cross=scores.shape[-2] != scores.shape[-1], mask=kind, window=window)


# ------------------------------------------------------------------------------------------ basics


@pytest.mark.parametrize("name", ALL)
def test_runs_and_is_deterministic(name: str) -> None:
    a, b = get_zoo_model(name), get_zoo_model(name)
    assert a.name == name and not a.model.training
    assert all(p.dtype == torch.float32 for p in a.model.parameters())
    with torch.no_grad():
        out_a, out_b = a.model(**a.example_inputs), b.model(**b.example_inputs)
    flat_a = [t for t in torch.utils._pytree.tree_leaves(out_a) if isinstance(t, torch.Tensor)]
    flat_b = [t for t in torch.utils._pytree.tree_leaves(out_b) if isinstance(t, torch.Tensor)]
    assert flat_a and len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        assert torch.isfinite(x).all(), name
        assert torch.equal(x, y), f"{name}: two builds disagree"


@pytest.mark.parametrize("name", ALL)
def test_entry_is_consistent(name: str) -> None:
    z = get_zoo_model(name)
    assert z.n_attention == len(z.expected)
    assert (name in NEGATIVE) == (z.reason_contains is not None) == (z.n_attention == 0)
    for s in z.expected:
        assert set(s) == {"mask", "window", "hq", "hkv", "head_dim", "softcap", "cross", "scale"}
        assert s["mask"] in MASK_KINDS and s["hq"] % s["hkv"] == 0
    assert z.attn_impl in (None, "sdpa", "eager")
    if z.attn_impl == "sdpa":
        assert not name.endswith("-eager")
    if z.attn_impl == "eager":
        assert name.endswith("-eager")


def test_registry_names_and_lookup_error() -> None:
    assert len(NEGATIVE) >= 7
    assert zoo.zoo_names() == list(ZOO) == zoo.zoo_names("transformers") + zoo.zoo_names("torch")
    assert not set(ZOO) & set(NEGATIVE)
    for family in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gpt2", "gptneox", "bert", "vit", "t5"):
        assert f"{family}-tiny" in ZOO and f"{family}-tiny-eager" in ZOO
    assert "gemma2-tiny-eager" in ZOO and "gemma2-tiny" not in ZOO
    with pytest.raises(zoo.UnknownZooModelError, match="'nope'.*llama-tiny"):
        get_zoo_model("nope")
    with pytest.raises(ValueError, match="source='hf'"):
        zoo.zoo_names("hf")


def test_site_validates() -> None:
    assert site("causal", 4, 2)["scale"] == 0.25
    with pytest.raises(ValueError, match="mask='diagonal'"):
        site("diagonal")
    with pytest.raises(ValueError, match="window"):
        site("sliding")
    with pytest.raises(ValueError, match="hkv must divide"):
        site("causal", 4, 3)


# -------------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("name", list(ZOO))
def test_n_attention_matches_observed_calls(name: str) -> None:
    """One forward performs exactly n_attention attention computations, SDPA or softmax."""
    z = get_zoo_model(name)
    events = record(z)
    sdpa = [e for e in events if e[0] == "sdpa"]
    soft = [e for e in events if e[0] in ("softmax", "amax")]
    if z.attn_impl == "sdpa":
        assert len(sdpa) == z.n_attention and not soft, f"{name}: {len(sdpa)} sdpa, {len(soft)} softmax"
    elif z.attn_impl == "eager":
        assert len(soft) == z.n_attention and not sdpa, f"{name}: {len(sdpa)} sdpa, {len(soft)} softmax"
    else:
        assert len(sdpa) + len(soft) == z.n_attention, f"{name}: {len(sdpa)} sdpa + {len(soft)} softmax"


@pytest.mark.parametrize("name", list(ZOO))
def test_expected_matches_observed_sites(name: str) -> None:
    """Each expected site (mask kind, window, heads, head_dim, cross, scale) matches the real call."""
    z = get_zoo_model(name)
    events = [e for e in record(z) if e[0] in ("sdpa", "softmax", "amax")]
    assert len(events) == z.n_attention
    for i, ((kind, call), exp) in enumerate(zip(events, z.expected)):
        if kind == "sdpa":
            obs = observe_sdpa(call)
            want = {k: exp[k] for k in obs}
            assert math.isclose(obs.pop("scale"), want.pop("scale"), rel_tol=1e-6), f"{name} site {i}: scale"
        else:
            scores = call["scores"]
            if scores.dim() == 3:  # [B*H, Q, K] layouts (baddbmm, nn.MHA with weights)
                scores = scores.unflatten(0, (BATCH, -1))
            obs = observe_softmax(scores)
            want = {k: exp[k] for k in obs}
            want["mask"] = {"bias": "none", "causal+bias": "causal"}.get(want["mask"], want["mask"])
        assert obs == want, f"{name} site {i}: observed {obs}, expected {want}"


def test_window_matters() -> None:
    """Sliding-window entries use sequences longer than the window, so the window changes the output."""
    for name in ("mistral-tiny", "gemma3-tiny", "gemma2-tiny-eager"):
        z = get_zoo_model(name)
        assert z.example_inputs["input_ids"].shape[1] > z.expected[0]["window"]


def test_softcap_and_layer_types_follow_config() -> None:
    g2 = get_zoo_model("gemma2-tiny-eager")
    assert [s["softcap"] for s in g2.expected] == [g2.model.config.attn_logit_softcapping] * 2
    for name in ("gemma2-tiny-eager", "gemma3-tiny", "mistral-tiny"):
        z = get_zoo_model(name)
        types = getattr(z.model.config, "layer_types", None) or ["sliding_attention"] * 2
        assert [s["mask"] == "sliding" for s in z.expected] == [t == "sliding_attention" for t in types]
        assert {s["window"] for s in z.expected if s["window"]} == {z.model.config.sliding_window}


def test_example_inputs_are_tensors_and_causal_lms_generate() -> None:
    """Pure-tensor kwargs (no use_cache flag); forwards return no cache; generate() still uses one."""
    for name in ALL:
        z = get_zoo_model(name)
        assert z.example_inputs and all(isinstance(v, torch.Tensor) for v in z.example_inputs.values()), name
    for name in ("llama-tiny", "gemma3-tiny-eager", "t5-tiny"):
        z = get_zoo_model(name)
        with torch.no_grad():
            assert not any("cache" in k for k in z.model(**z.example_inputs).keys())
        out = z.model.generate(z.example_inputs["input_ids"][:1, :5], max_new_tokens=2, do_sample=False,
                               return_dict_in_generate=True)
        assert out.cache is not None, name


# ------------------------------------------------------------------------------------ capture


@pytest.mark.parametrize("name", ALL)
def test_export_flag_is_honest(name: str) -> None:
    z = get_zoo_model(name)
    if not z.export_ok:
        with pytest.raises(Exception):
            torch.export.export(z.model, (), z.example_inputs, strict=False)
        return
    ep = torch.export.export(z.model, (), z.example_inputs, strict=False)
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(z.model(**z.example_inputs))
        got = torch.utils._pytree.tree_leaves(ep.module()(**z.example_inputs))
    want = [t for t in want if isinstance(t, torch.Tensor)]
    got = [t for t in got if isinstance(t, torch.Tensor)]
    assert len(want) == len(got)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_fx_flag_is_honest(name: str) -> None:
    z = get_zoo_model(name)
    if not z.fx_ok:
        with pytest.raises(Exception):
            torch.fx.symbolic_trace(z.model)
        return
    gm = torch.fx.symbolic_trace(z.model)
    with torch.no_grad():
        want, got = z.model(**z.example_inputs), gm(**z.example_inputs)
    for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
