"""Detection: every zoo model, every capture route that works for it, exact site counts, mask kinds,
windows, heads, scale, softcap, and outputs unchanged by canonicalisation."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from lcpass.capture import CaptureError, capture, capture_dynamo
from lcpass.patterns import canonical_nodes, canonical_args, canonicalize
from lcpass.zoo import NEGATIVE, ZOO, get_zoo_model

warnings.filterwarnings("ignore")

TOL = 1e-5


def _first_tensor(out):
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return out


def _run(cap):
    with torch.no_grad():
        if cap.route == "export":
            return _first_tensor(cap.gm(**cap.extra["kwargs"]))
        return _first_tensor(cap.gm(*cap.flat_inputs))


def _captures(z, route):
    if route == "dynamo":
        return capture_dynamo(z.model, (), z.example_inputs)
    if route == "core":
        return [capture(z.model, (), z.example_inputs, decompose=True)]
    return [capture(z.model, (), z.example_inputs, route=route)]


def _parse_mask(label: str) -> tuple[str, int | None]:
    """'sliding(8)' -> ('sliding', 8); 'causal+padding' -> ('causal+padding', None)."""
    m = re.fullmatch(r"sliding\((\d+)\)(\+.*)?", label)
    if m:
        rest = m.group(2) or ""
        return ("sliding" + rest if rest else "sliding"), int(m.group(1))
    return label, None


def check_model(name: str, route: str) -> None:
    z = get_zoo_model(name)
    sites, errs = [], []
    for cap in _captures(z, route):
        before = _run(cap)
        found = canonicalize(cap.gm, cap.flat_inputs, cap.param_placeholders)
        after = _run(cap)
        assert len(canonical_nodes(cap.gm)) == len(found.sites)
        errs.append((after - before).abs().max().item())
        sites.extend(found.sites)
    assert len(sites) == z.n_attention, f"{name}/{route}: {len(sites)} sites, want {z.n_attention}: {sites}"
    assert max(errs) <= TOL, f"{name}/{route}: canonicalisation changed outputs by {max(errs)}"
    for site, want in zip(sites, z.expected):
        kind, window = _parse_mask(site.mask)
        assert kind == want["mask"], f"{name}/{route} {site.name}: mask {site.mask}, want {want['mask']}"
        assert window == want["window"], f"{name}/{route} {site.name}: window {window}, want {want['window']}"
        if not (route in ("fx", "dynamo") and z.family == "torch" and "mha" in name) and not name.startswith("transformer"):
            # nn.MultiheadAttention at ATen level runs as [B*H, S, D]: heads fold into the batch there
            assert site.n_heads in (want["hq"], 1), (name, site)
        if site.n_heads == want["hq"]:
            assert site.n_kv_heads == want["hkv"], (name, route, site)
        assert site.head_dim == want["head_dim"], (name, route, site)
        assert site.scale == pytest.approx(want["scale"], rel=1e-6), (name, route, site)
        assert site.softcap == pytest.approx(want["softcap"] or 0.0), (name, route, site)


EXPORT = [n for n in ZOO]
FX = [n for n in ZOO if get_zoo_model(n).fx_ok]
# gpt2-tiny is left out: torch 2.13 run_decompositions() itself fails on its Conv1D addmm view.
CORE = ["llama-tiny", "llama-tiny-eager", "mistral-tiny", "gemma2-tiny-eager", "gemma3-tiny", "bert-tiny",
        "bert-tiny-eager", "t5-tiny", "t5-tiny-eager", "gptneox-tiny", "vit-tiny", "mha", "mha-weights",
        "transformer-encoder", "nanogpt", "baddbmm-attn", "decomposed-softmax", "sdpa-gqa"]


@pytest.mark.parametrize("name", EXPORT)
def test_export_route(name):
    check_model(name, "export")


@pytest.mark.parametrize("name", EXPORT)
def test_dynamo_route(name):
    check_model(name, "dynamo")


@pytest.mark.parametrize("name", FX)
def test_fx_route(name):
    check_model(name, "fx")


@pytest.mark.parametrize("name", CORE)
def test_core_aten_route(name):
    check_model(name, "core")


def test_gqa_folded_and_mqa_kept():
    z = get_zoo_model("llama-tiny-eager")
    cap = capture(z.model, (), z.example_inputs)
    canonicalize(cap.gm, cap.flat_inputs)
    for node in canonical_nodes(cap.gm):
        a = canonical_args(node)
        assert a.k.meta["val"].shape[1] == 2 and a.q.meta["val"].shape[1] == 4  # repeat_kv folded away
    z = get_zoo_model("gemma3-tiny")
    cap = capture(z.model, (), z.example_inputs)
    found = canonicalize(cap.gm, cap.flat_inputs)
    assert [s.n_kv_heads for s in found.sites] == [1, 1]


def test_padding_mask_is_kept_exactly():
    """A left-padded batch: the padding mask stays a tensor, and outputs match eager on every row."""
    z = get_zoo_model("llama-tiny-padded")
    cap = capture(z.model, (), z.example_inputs)
    canonicalize(cap.gm, cap.flat_inputs)
    for node in canonical_nodes(cap.gm):
        assert canonical_args(node).mask is not None
    with torch.no_grad():
        want = z.model(**z.example_inputs).logits
        got = cap.gm(**cap.extra["kwargs"]).logits
    assert (got - want).abs().max().item() <= TOL


def test_t5_learned_bias_is_kept():
    z = get_zoo_model("t5-tiny")
    cap = capture(z.model, (), z.example_inputs)
    found = canonicalize(cap.gm, cap.flat_inputs)
    kept = [canonical_args(n).mask is not None for n in canonical_nodes(cap.gm)]
    assert kept == [s.mask != "none" for s in found.sites]
    assert sum(kept) == 4  # encoder self x2, decoder self x2


def test_dynamic_sequence_export_runs_at_other_lengths():
    """A causal mask found at one length stays right at another (the positional mask is replaced by
    is_causal, which follows the symbolic length)."""
    z = get_zoo_model("mistral-tiny")
    cap = capture(z.model, (), z.example_inputs, dynamic_seq=True)
    found = canonicalize(cap.gm, cap.flat_inputs)
    assert [s.mask for s in found.sites] == ["sliding(8)", "sliding(8)"]
    for seq in (7, 33):
        ids = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = z.model(input_ids=ids).logits
            got = cap.gm(input_ids=ids, use_cache=False).logits
        assert (got - want).abs().max().item() <= TOL, seq


def test_canonical_graph_survives_export_save_load(tmp_path):
    """The canonical op is a real custom op: a rewritten graph exports, saves and loads."""
    z = get_zoo_model("llama-tiny")
    cap = capture(z.model, (), z.example_inputs)
    canonicalize(cap.gm, cap.flat_inputs)
    ep = torch.export.export(cap.gm, (), cap.extra["kwargs"], strict=False)
    assert any(n.target is torch.ops.lcpass.attention.default for n in ep.graph.nodes)
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2")
    with torch.no_grad():
        want = z.model(**z.example_inputs).logits
        got = loaded.module()(**cap.extra["kwargs"]).logits
    assert (got - want).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------- negatives
@pytest.mark.parametrize("name", list(NEGATIVE))
def test_negative_cases_are_not_rewritten(name):
    z = get_zoo_model(name)
    routes = ["export"] + (["fx"] if z.fx_ok else [])
    for route in routes:
        cap = capture(z.model, (), z.example_inputs, route=route)
        before = _run(cap)
        found = canonicalize(cap.gm, cap.flat_inputs)
        assert found.sites == [], (name, route, found.sites)
        assert canonical_nodes(cap.gm) == []
        reasons = " | ".join(r.reason for r in found.rejected)
        assert z.reason_contains in reasons, f"{name}/{route}: {reasons!r} lacks {z.reason_contains!r}"
        assert torch.equal(_run(cap), before)


def test_capture_error_names_route_and_frame():
    z = get_zoo_model("llama-tiny")
    with pytest.raises(CaptureError, match=r"capture via fx failed for LlamaForCausalLM.*first failing frame: .+:\d+"):
        capture(z.model, (), z.example_inputs, route="fx")
    with pytest.raises(ValueError, match="capture route 'nope'"):
        capture(z.model, (), z.example_inputs, route="nope")


class _CpuFlash(torch.nn.Module):
    """Attention spelled with the ATen CPU flash kernel (tuple output: out, logsumexp)."""

    def forward(self, q, k, v):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=0.3)[0]


class _ExplicitGqaSdpa(torch.nn.Module):
    """F.scaled_dot_product_attention with enable_gqa, a float mask and the default scale."""

    def forward(self, q, k, v, bias):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


@pytest.mark.parametrize("route", ["export", "dynamo", "fx"])
def test_aten_sdpa_variants(route):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 11, 8, generator=g), torch.randn(2, 4, 11, 8, generator=g), torch.randn(2, 4, 11, 8, generator=g)
    cases = [(_CpuFlash(), (q, k, v), "causal", "sdpa-cpu", 0.3)]
    bias = torch.randn(2, 1, 11, 11, generator=g)
    cases.append((_ExplicitGqaSdpa(), (q, k[:, :2], v[:, :2], bias), "bias", "sdpa", 8 ** -0.5))
    for model, args, mask, source, scale in cases:
        want = model(*args)
        cap = capture_dynamo(model, args)[0] if route == "dynamo" else capture(model, args, route=route)
        found = canonicalize(cap.gm, cap.flat_inputs, cap.param_placeholders)
        assert [(s.mask, s.source) for s in found.sites] == [(mask, source)], found
        assert found.sites[0].scale == pytest.approx(scale)
        got = cap.gm(*args)
        got = got[0] if isinstance(got, (tuple, list)) else got
        assert (got - want).abs().max().item() <= TOL


def test_block_sparse_attention_is_refused_as_already_sparse():
    """BigBird's block-sparse form (softmaxes over gathered key blocks, concatenated on the key axis) is
    refused with a reason that says it is already sparse, on every one of its softmaxes; optimize counts
    them against the eager oracle, says so, and leaves the model (and its output) as it was."""
    import transformers

    import lcpass

    cfg = transformers.BigBirdConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, attention_type="block_sparse", block_size=2,
                                     num_random_blocks=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BigBirdModel(cfg).eval()
    ids = torch.randint(0, 100, (1, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = lcpass.inspect(model, {"input_ids": ids})
        assert not found.sites and len(found.rejected) == 5
        assert all(r.reason.startswith("already sparse (block-sparse attention") for r in found.rejected), found.rejected
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    with pytest.warns(UserWarning, match="already sparse"):
        out = lcpass.optimize(model, method="dense", example_inputs={"input_ids": ids})
    assert out is model and not hasattr(model, "lcpass_report")
    with torch.no_grad():
        assert torch.equal(out(input_ids=ids).last_hidden_state, want)
