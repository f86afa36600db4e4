"""The compressed KV cache composes with the model's own cache: hybrid models keep their recurrent and
convolution state, encoder-decoders their cross-attention cache, models with a cache class of their own
keep it; the bytes held match the plan's prediction; a plain forward with ``use_cache=True`` gets the
compressed cache too."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache, LinearAttentionCacheLayerMixin

import lcpass
from lcpass.kv import CompressedCache, compress_cache
from lcpass.methods import get_method
from lcpass.zoo.auto import architectures, build

SINK, WINDOW = 2, 6


def _tiny(model_type: str, impl=None):
    return build(next(a for a in architectures() if a.model_type == model_type), impl)


def _kv_slot_bytes(layer) -> int:
    """Bytes of one kept token of a compressed layer: K and V of every KV head, at their own head dims."""
    return sum(g.keys.shape[0] * len(g.heads) * (g.keys.shape[-1] + g.values.shape[-1]) * g.keys.element_size()
               for g in layer.groups)


@pytest.mark.parametrize("model_type", ["jamba", "zamba2", "bamba", "falcon_h1", "lfm2"])
def test_hybrid_keeps_its_state_and_holds_the_planned_bytes(model_type):
    tiny = _tiny(model_type)
    m = lcpass.optimize(tiny.model, method="streaming", sink=SINK, window=WINDOW, dense_below=0,
                        example_inputs=tiny.inputs)
    assert m.lcpass_report.kv == "compressed"
    ids = tiny.inputs["input_ids"][:1]
    out = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = out.cache
    assert isinstance(cache, CompressedCache)
    linear = [layer for layer in cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)]
    assert linear, f"{model_type}: the recurrent / conv layers of the model's own cache are gone"
    compressed = cache.compressed_layers()
    assert compressed and all(layer.binding is not None for layer in compressed)
    n = ids.shape[-1] + 6 - 1  # tokens that went through the cache
    policy = get_method("streaming").kv_policy({"sink": SINK, "window": WINDOW}, kv_len=n)
    for layer in compressed:
        predicted = policy.kept(n) * _kv_slot_bytes(layer)
        assert abs(layer.kv_nbytes() - predicted) <= 0.05 * predicted, (model_type, layer.kv_nbytes(), predicted)
    # eviction changes nothing: the same plan on the model's own (uncompressed) cache gives the same tokens
    lcpass.hf.set_kv_cache(m, False)
    full = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(full, out.sequences)


def test_encoder_decoder_keeps_its_cross_attention_cache():
    from lcpass.plan import Plan, SitePlan

    tiny = _tiny("whisper")
    sites = lcpass.inspect(tiny.model, tiny.inputs).sites
    plan = Plan({s.name: SitePlan.same("streaming", sink=SINK, window=WINDOW) for s in sites if s.is_causal})
    m = lcpass.optimize(tiny.model, plan=plan, dense_below=0, example_inputs=tiny.inputs)
    feats = tiny.inputs["input_features"][:1]
    out = m.generate(feats, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[-1] >= 5
    with torch.no_grad():  # (whisper's generate rebuilds the cache it returns: read a forward's instead)
        cache = m(**tiny.inputs, use_cache=True).cache
    assert isinstance(cache, EncoderDecoderCache)
    assert isinstance(cache.self_attention_cache, CompressedCache)
    assert all(isinstance(layer, DynamicLayer) for layer in cache.cross_attention_cache.layers)
    assert cache.cross_attention_cache.layers[0].keys.shape[-2] == tiny.model.config.max_source_positions


def test_model_with_its_own_cache_class_keeps_it():
    tiny = _tiny("minimax")
    m = lcpass.optimize(tiny.model, method="streaming", sink=SINK, window=WINDOW, dense_below=0,
                        example_inputs=tiny.inputs)
    assert m.lcpass_report.kv.startswith("own cache")
    ids = tiny.inputs["input_ids"][:1]
    out = m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[-1] == ids.shape[-1] + 4


def test_plain_forward_with_use_cache_gets_the_compressed_cache():
    tiny = _tiny("llama")
    m = lcpass.optimize(tiny.model, method="streaming", sink=SINK, window=WINDOW, dense_below=0,
                        example_inputs=tiny.inputs)
    with torch.no_grad():
        out = m(tiny.inputs["input_ids"], use_cache=True)
    assert isinstance(out.cache, CompressedCache)
    assert all(layer.groups[0].length == SINK + WINDOW for layer in out.cache.compressed_layers())
    with torch.no_grad():
        assert getattr(m(tiny.inputs["input_ids"], use_cache=False), "cache", None) is None


def test_compress_cache_keeps_unknown_caches():
    class Odd:
        pass

    odd = Odd()
    assert compress_cache(odd) is odd
