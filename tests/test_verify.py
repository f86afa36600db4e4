"""verify_model: every planned site is run once against the dense reference; a wrong lowering is named."""
from __future__ import annotations

import copy
import warnings

import pytest
import lcpass
import lcpass.lower
from lcpass.patterns.op import reference
from lcpass.verify import record_planned_calls, verify_model
from lcpass.zoo import get_zoo_model

warnings.filterwarnings("ignore")
STREAM = dict(method="streaming", sink=2, window=5, dense_below=0)


@pytest.mark.parametrize("name", ["llama-tiny", "llama-tiny-padded", "gemma2-tiny-eager", "nanogpt"])
def test_planned_sites_within_bound(name):
    z = get_zoo_model(name)
    m = lcpass.optimize(copy.deepcopy(z.model), example_inputs=z.example_inputs, **STREAM)
    rep = verify_model(m, z.example_inputs)
    assert len(rep) == z.n_attention and not rep.failed
    assert all(0.0 <= e <= rep.bounds[s] for s, e in rep.items())


def test_wrong_lowering_is_reported_by_name(monkeypatch):
    """A lowering that ignores the method (plain causal attention) is caught on every site."""
    z = get_zoo_model("llama-tiny")
    m = lcpass.optimize(copy.deepcopy(z.model), example_inputs=z.example_inputs, **STREAM)

    def ignores_the_method(q, k, v, mask, scale, is_causal, window, softcap, dropout_p, site, mask_kind, spec,
                           sinks=None, chunk=-1):
        return reference(q, k, v, mask, scale, is_causal, window, softcap, dropout_p, sinks, chunk)

    monkeypatch.setattr(lcpass.lower, "planned_attention_impl", ignores_the_method)
    with pytest.warns(UserWarning, match="model.layers.0.self_attn"):
        rep = verify_model(m, z.example_inputs)
    assert sorted(rep.failed) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn \(max abs error"):
        verify_model(m, z.example_inputs, strict=True)


def test_records_first_call_per_site_and_dense_plans_have_nothing_to_verify():
    z = get_zoo_model("qwen2-tiny")
    m = lcpass.optimize(copy.deepcopy(z.model), example_inputs=z.example_inputs, **STREAM)
    calls = record_planned_calls(m, z.example_inputs)
    assert list(calls) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert calls["model.layers.0.self_attn"]["q"].shape[2] == z.example_inputs["input_ids"].shape[1]
    dense = lcpass.optimize(copy.deepcopy(z.model), method="dense", example_inputs=z.example_inputs)
    with pytest.warns(UserWarning, match="nothing to verify"):
        assert verify_model(dense, z.example_inputs) == {}


def test_below_the_crossover_the_reference_is_exact_dense():
    z = get_zoo_model("llama-tiny")
    m = lcpass.optimize(copy.deepcopy(z.model), method="streaming", sink=2, window=5,
                        example_inputs=z.example_inputs)  # default crossover 2048 > 19 tokens
    rep = verify_model(m, z.example_inputs, bound=0.0)
    assert len(rep) == z.n_attention and set(rep.values()) == {0.0} and not rep.failed
