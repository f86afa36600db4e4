"""lcpass.kv: generation with a CompressedCache equals dense where nothing is evicted, equals an independent
masked/compensated reference where it is, frees the evicted memory, handles left-padded batches, and refuses
a cache reused across plans."""
from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import lcpass
from lcpass.kv import CompressedCache, Selector
from lcpass.methods import compensated_attention
from lcpass.plan import Plan
from lcpass.zoo import get_zoo_model

warnings.filterwarnings("ignore")
NEW = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Decode is hundreds of tiny ops: on a shared CPU a second OpenMP thread that gets descheduled makes each
    one wait (measured 20x slower generate on the 2-core CI machine). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(model, ids, n=NEW, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def _held_bytes(obj) -> int:
    """Independent count: walk everything reachable from the cache and sum the storages of its tensors."""
    seen_obj, storages = set(), {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen_obj or isinstance(o, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
            continue
        seen_obj.add(id(o))
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack.extend(o)
        elif hasattr(o, "__dict__"):
            stack.extend(vars(o).values())
    return sum(storages.values())


# -- an independent reference: attention functions that see the full DynamicCache and apply the method's
#    eviction as a mask (streaming / duo), or RazorAttention's compression (methods.compensated_attention)

def _mask_reference(keep_fn):
    def attn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        sq, sk = query.shape[2], key.shape[2]
        g = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(g, 1).float(), value.repeat_interleave(g, 1).float()
        qpos = torch.arange(sk - sq, sk)[:, None]
        kv = torch.arange(sk)[None, :]
        keep = torch.stack([keep_fn(h, qpos, kv) & (kv <= qpos) for h in range(query.shape[1])])  # [H, Sq, Sk]
        s = (query.float() @ k.transpose(-1, -2)) * scaling
        s = s.masked_fill(~keep, float("-inf"))
        out = torch.softmax(s, -1) @ v
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    return attn


def _razor_reference(sink, recent, razor_heads):
    def attn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        sq, sk = query.shape[2], key.shape[2]
        g = query.shape[1] // key.shape[1]
        full = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), is_causal=sq > 1, scale=scaling)
        if sq == 1:
            comp = compensated_attention(query, key, value, sink, recent, scaling)
            for h in razor_heads:
                full[:, h] = comp[:, h]
        return full.transpose(1, 2).contiguous(), None
    return attn


def _with_attention(model, name, fn):
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"])
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name
    return ref


def _greedy_no_cache(model, ids, n=NEW):
    """The reference decode loop: a full forward over the whole sequence for every new token (no cache);
    end-of-sequence suppressed as generate(min_new_tokens=n) does."""
    out = ids
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    with torch.no_grad():
        for _ in range(n):
            logits = model(out, use_cache=False).logits[:, -1]
            logits[:, eos] = -math.inf
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)
    return out


def _sites(z):
    """The model's attention sites from its config (saves a capture per test)."""
    from lcpass.plan import SiteInfo

    c = z.model.config
    return [SiteInfo(f"model.layers.{i}.self_attn", c.num_attention_heads, c.num_key_value_heads,
                     getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, True)
            for i in range(c.num_hidden_layers)]


@functools.lru_cache(maxsize=None)
def _opt(name: str, method: str, dense_below=None, **params):
    """An optimized zoo model, shared by the tests that only run it (generate does not change it)."""
    z = get_zoo_model(name)
    return lcpass.optimize(z.model, method=method, dense_below=dense_below, example_inputs=z.example_inputs, **params)


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-tiny"])
def test_streaming_wide_window_equals_dense_and_small_window_equals_reference(name):
    z = get_zoo_model(name)
    ids = z.example_inputs["input_ids"][:1]
    dense = _gen(z.model, ids)
    out = _gen(_opt(name, "streaming", sink=4, window=200), ids, return_dict_in_generate=True)
    assert torch.equal(out.sequences, dense)
    cache = out.past_key_values
    assert isinstance(cache, CompressedCache)
    assert all(g.length == cache.layers[0].seen for layer in cache.layers for g in layer.groups)  # nothing evicted

    sink, window = 2, 8
    out = _gen(_opt(name, "streaming", 0, sink=sink, window=window), ids, return_dict_in_generate=True)
    ref = _with_attention(z.model, "kv_test_streaming",
                          _mask_reference(lambda h, q, kv: (kv < sink) | (q - kv < window)))
    want = _greedy_no_cache(ref, ids)
    assert torch.equal(out.sequences, want)
    assert not torch.equal(out.sequences, dense)  # the window really bites
    cache = out.past_key_values
    assert all(g.length == sink + window for layer in cache.layers for g in layer.groups)
    assert cache.nbytes() == _held_bytes(cache)


def test_duo_mixed_groups_and_razor_compensation_match_references():
    z = get_zoo_model("llama-tiny")  # 4 q heads, 2 KV heads, 2 layers
    ids = z.example_inputs["input_ids"][:1]
    sites = _sites(z)
    plan = Plan.duo(sites, {s.name: [0] for s in sites}, sink=2, recent=6, by_kv_head=True)
    m = lcpass.optimize(copy.deepcopy(z.model), plan=plan, dense_below=0, example_inputs=z.example_inputs)
    out = _gen(m, ids, return_dict_in_generate=True)
    ref = _with_attention(z.model, "kv_test_duo",
                          _mask_reference(lambda h, q, kv: (kv < 2) | (q - kv < 6) | torch.tensor(h < 2)))
    assert torch.equal(out.sequences, _greedy_no_cache(ref, ids))
    layer = out.past_key_values.layers[0]
    assert [(g.heads, g.length) for g in layer.groups] == [([0], layer.seen), ([1], 8)]

    # RazorAttention: KV head 1 (q heads 2, 3) keeps 2 sinks + 8 recent + a compensation token
    razor = {"sink": 2, "threshold": 8, "ratio": 100.0}
    specs = [lcpass.plan.HeadSpec("razor", {**razor, "retrieval": h < 2}) for h in range(4)]
    rplan = Plan({s.name: lcpass.plan.SitePlan(tuple(specs)) for s in sites}, plan.fingerprint)
    r = lcpass.optimize(copy.deepcopy(z.model), plan=rplan, example_inputs=z.example_inputs)
    out = _gen(r, ids, n=24, return_dict_in_generate=True)
    ref = _with_attention(z.model, "kv_test_razor", _razor_reference(2, 8, [2, 3]))
    assert torch.equal(out.sequences, _gen(ref, ids, n=24))
    g = out.past_key_values.layers[1].groups[1]
    assert g.length == 10 and float(g.comp_n[0]) == out.past_key_values.layers[1].seen - 10


def test_left_padded_batch_rows_equal_unbatched_runs():
    z = get_zoo_model("llama-tiny")
    m = _opt("llama-tiny", "streaming", 0, sink=2, window=8)
    full = z.example_inputs["input_ids"][0]
    prompts = [full[:19], full[3:15], full[5:9]]
    L = max(len(p) for p in prompts)
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = p, 1
    n = 24
    batched = _gen(m, ids, n=n, attention_mask=mask, pad_token_id=0)
    for i, p in enumerate(prompts):
        solo = _gen(m, p[None], n=n, pad_token_id=0)
        assert torch.equal(batched[i, L - len(p):], solo[0]), i


def test_budget_beyond_context_is_dense_and_by_hand_cache_and_plan_reuse():
    z = get_zoo_model("qwen3-tiny")
    ids = z.example_inputs["input_ids"][:1]
    sites = _sites(z)
    plan = Plan.uniform(sites, "streaming", sink=64, window=4096)
    m = lcpass.optimize(copy.deepcopy(z.model), plan=plan, example_inputs=z.example_inputs)
    assert torch.equal(_gen(m, ids, n=16), _gen(z.model, ids, n=16))
    cache = CompressedCache(plan)
    with torch.no_grad():
        a = m(ids, past_key_values=cache, use_cache=True).logits
        b = m(ids[:, :1], past_key_values=cache, use_cache=True).logits
    with torch.no_grad():
        dc = DynamicCache(config=z.model.config)
        want_a = z.model(ids, past_key_values=dc, use_cache=True).logits
        want_b = z.model(ids[:, :1], past_key_values=dc, use_cache=True).logits
    assert torch.allclose(a, want_a, atol=1e-5) and torch.allclose(b, want_b, atol=1e-5)
    assert cache.nbytes() >= cache.dense_nbytes()  # nothing evicted: dense (plus positions)

    other = _opt("qwen3-tiny", "streaming", 0, sink=2, window=8)
    with pytest.raises(ValueError, match=r"streaming plan #\w+.*streaming plan #\w+"):
        with torch.no_grad():
            other(ids[:, :1], past_key_values=cache, use_cache=True)
    fresh = CompressedCache(plan)
    with pytest.raises(ValueError, match=r"made for streaming plan #\w+ but the model runs streaming plan #\w+"):
        with torch.no_grad():
            other(ids, past_key_values=fresh, use_cache=True)
    plain = CompressedCache()
    with pytest.raises(ValueError, match="not optimized"):
        with torch.no_grad():
            z.model(ids, past_key_values=plain, use_cache=True)
            z.model(ids[:, :1], past_key_values=plain, use_cache=True)


def test_sampling_and_decode_selectors_run_and_read_less():
    z = get_zoo_model("llama-tiny")
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    m = lcpass.optimize(copy.deepcopy(z.model), method="causal", example_inputs=z.example_inputs)
    torch.manual_seed(0)
    s = m.generate(ids, max_new_tokens=8, do_sample=True, top_k=5)
    assert s.shape == (2, 48)
    dense = _gen(m, ids, n=8)
    big = {"quest": {"token_budget": 4096, "page_size": 16}, "tokenselect": {"k": 4096},
           "recycled": {"K": 4096}, "tidal": {"k": 4096, "selection_layer": 0}}
    for name, params in big.items():  # budgets covering the context: exactly dense
        lcpass.hf.set_kv_cache(m, select=Selector(name, params))
        assert torch.equal(_gen(m, ids, n=8), dense), name
    small = {"quest": {"token_budget": 16, "page_size": 16}, "tokenselect": {"k": 8, "cache_threshold": 2.0},
             "recycled": {"K": 8, "S": 4}, "tidal": {"k": 8, "selection_layer": 0, "reselection_layer": 0}}
    for name, params in small.items():
        lcpass.hf.set_kv_cache(m, select=Selector(name, params))
        out = _gen(m, ids, n=8, return_dict_in_generate=True)
        g = out.past_key_values.layers[1].groups[0]
        assert g.state.get("last_selected", 10 ** 9) < g.length, name
    lcpass.hf.set_kv_cache(m, select=None)
    # a plan of a dynamic method: generate's cache takes its decode selector from the plan
    q = lcpass.optimize(copy.deepcopy(z.model), method="quest", token_budget=16, page_size=16,
                        example_inputs=z.example_inputs)
    out = _gen(q, ids, n=8, return_dict_in_generate=True)
    g = out.past_key_values.layers[0].groups[0]
    assert g.selector == Selector("quest", {"token_budget": 16, "page_size": 16})
    assert g.state["last_selected"] < g.length


def test_selector_decode_equals_masked_reference():
    """One Quest / TokenSelect decode step equals dense attention restricted to the slots it chose."""
    from lcpass.kv.group import KVGroup
    from lcpass.kv.select import select_attend
    from lcpass.methods.dynamic.decode import quest_indices, tokenselect_indices
    from lcpass.methods import KVPolicy

    torch.manual_seed(0)
    B, h, G, L, D = 2, 2, 3, 300, 16
    k, v = torch.randn(B, h, L, D), torch.randn(B, h, L, D)
    q = torch.randn(B, h, G, D)
    pos = torch.arange(L, dtype=torch.int32)[None].repeat(B, 1)
    pos[1, :7] = -1  # left padding on row 1
    for sel, pick in ((Selector("quest", {"token_budget": 64, "page_size": 16}),
                       lambda g: quest_indices(q, g, sel.params)),
                      (Selector("tokenselect", {"k": 40, "n_local": 4}),
                       lambda g: tokenselect_indices(q, g, sel.params, 0.25))):
        g = KVGroup([0, 1], KVPolicy.all(), sel, k, v, pos)
        idx = pick(KVGroup([0, 1], KVPolicy.all(), sel, k, v, pos))
        got = select_attend(sel, q, g, 0.25, layer_idx=0, n_layers=1, shared={})
        keep = torch.zeros(B, h, L, dtype=torch.bool)
        keep.scatter_(2, idx.clamp(min=0), idx >= 0)
        keep &= (pos >= 0)[:, None]
        s = (q @ k.transpose(-1, -2)) * 0.25
        want = torch.softmax(s.masked_fill(~keep[:, :, None], -math.inf), -1) @ v
        assert torch.allclose(got, want, atol=1e-5), sel.name
        assert int(keep.sum(-1).max()) < L // 2


@pytest.mark.slow
def test_smollm2_streaming_and_duo_memory():
    from lcpass.zoo.pretrained import load_smollm2

    model, tok = load_smollm2()
    text = open("/usr/share/common-licenses/GPL-3").read()
    ids = tok(text, return_tensors="pt")["input_ids"]
    ex = {"input_ids": ids[:, :32]}
    short = ids[:, :48]
    dense = _gen(model, short)
    wide = lcpass.optimize(copy.deepcopy(model), method="streaming", sink=4, window=256, example_inputs=ex)
    assert torch.equal(_gen(wide, short), dense)
    small = lcpass.optimize(copy.deepcopy(model), method="streaming", sink=4, window=28, dense_below=0,
                            example_inputs=ex)
    ref = _with_attention(model, "kv_test_streaming_smol",
                          _mask_reference(lambda h, q, kv: (kv < 4) | (q - kv < 28)))
    assert torch.equal(_gen(small, short), _greedy_no_cache(ref, short))
    del wide, small, ref

    sites = _sites(type("Z", (), {"model": model}))
    retrieval = {s.name: ([0] if i % 2 else [0, 1]) for i, s in enumerate(sites)}  # 45 of 90 KV heads
    plan = Plan.duo(sites, retrieval, sink=64, recent=256, by_kv_head=True)
    # prefill exactly dense (SDPA, the cheapest 4k prefill here): this test is about the cache it leaves
    duo = lcpass.optimize(model, plan=plan, dense_below=1 << 20, example_inputs=ex)
    prompt = ids[:, :4096]
    out = _gen(duo, prompt, n=3, return_dict_in_generate=True)
    cache = out.past_key_values
    held = _held_bytes(cache)
    assert held == cache.nbytes()
    assert held <= 0.57 * cache.dense_nbytes(), (held, cache.dense_nbytes())
    assert len(tok.decode(out.sequences[0, 4096:])) > 0


# -- functional (tensor) caches in plain graphs ---------------------------------------------------

class _CachedAttn(torch.nn.Module):
    def __init__(self, c: int = 32, h: int = 4):
        super().__init__()
        self.c, self.h = c, h
        self.qkv, self.o = torch.nn.Linear(c, 3 * c), torch.nn.Linear(c, c)

    def forward(self, x, past_k, past_v):
        q, k, v = self.qkv(x).split(self.c, dim=2)
        q, k, v = (t.view(x.size(0), x.size(1), self.h, self.c // self.h).transpose(1, 2) for t in (q, k, v))
        k = torch.cat([past_k, k], dim=2)  # [B, H, S_past + T, D]: the tensor KV cache append
        v = torch.cat([past_v, v], dim=2)
        t, s = q.size(2), k.size(2)
        mask = k.new_ones((1, 1, t, s), dtype=torch.bool).tril(s - t)  # [1, 1, T, S]
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(x.size(0), x.size(1), self.c)), k, v


class _CachedGPT(torch.nn.Module):
    """nanoGPT with a tensor KV cache: positions are an input (never read from the cache's length)."""

    def __init__(self, vocab: int = 64, c: int = 32):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, c), torch.nn.Embedding(256, c)
        self.a0, self.a1 = _CachedAttn(c), _CachedAttn(c)
        self.head = torch.nn.Linear(c, vocab)

    def forward(self, idx, pos, k0, v0, k1, v1):
        x = self.wte(idx) + self.wpe(pos)
        y, k0, v0 = self.a0(x, k0, v0)
        x = x + y
        y, k1, v1 = self.a1(x, k1, v1)
        return self.head(x + y), k0, v0, k1, v1


def _decode(model, ids, n):
    empty = torch.zeros(1, 4, 0, 8)
    kv = [empty] * 4
    out, sizes = ids, []
    with torch.no_grad():
        x, pos = ids, torch.arange(ids.shape[1])[None]
        for _ in range(n):
            logits, *kv = model(x, pos, *kv)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            x, pos = nxt, pos[:, -1:] + 1
            sizes.append(kv[0].shape[2])
    return out, sizes


def test_functional_tensor_cache_append_is_bounded():
    torch.manual_seed(0)
    model = _CachedGPT().eval()
    ids = torch.randint(0, 64, (1, 12))
    ex = (ids, torch.arange(12)[None], *[torch.zeros(1, 4, 0, 8)] * 4)
    dense, dense_sizes = _decode(model, ids, 30)
    wide = lcpass.optimize(model, method="streaming", sink=2, window=64, example_inputs=ex, capture="fx")
    assert torch.equal(_decode(wide, ids, 30)[0], dense)
    m = lcpass.optimize(model, method="streaming", sink=2, window=6, dense_below=0, example_inputs=ex,
                        capture="fx")
    assert m.lcpass_kv_bounds and all(b[1:] == (2, 5) for b in m.lcpass_kv_bounds)
    got, sizes = _decode(m, ids, 30)
    assert max(sizes) == 7 and dense_sizes[-1] == 41
    # oracle: the same lowered attention over the whole (unbounded) tensor cache
    from lcpass.inspect import detect
    from lcpass.lower import lower_graph

    cap, det = detect(model, ex, route="fx")[0]
    lower_graph(cap.gm, det.sites, Plan.uniform(det.sites, "streaming", sink=2, window=6).resolve, 0)
    full, full_sizes = _decode(cap.gm, ids, 30)
    assert torch.equal(got, full) and full_sizes[-1] == 41
    assert not torch.equal(got, dense)


def test_tokenselect_selection_cache_is_per_kv_head():
    """A KV head whose queries stay similar reuses its selection (plus the slots added since); a head whose
    query drifted is re-selected alone. The output equals dense attention restricted to those slots."""
    from lcpass.kv.group import KVGroup
    from lcpass.kv.select import select_attend
    from lcpass.methods.dynamic.decode import tokenselect_indices
    from lcpass.methods import KVPolicy

    torch.manual_seed(1)
    B, h, G, L, D = 2, 2, 3, 300, 16
    k, v = torch.randn(B, h, L + 3, D), torch.randn(B, h, L + 3, D)
    pos = torch.arange(L + 3, dtype=torch.int32)[None].repeat(B, 1)
    pos[1, :5] = -1  # left padding on row 1
    sel = Selector("tokenselect", {"k": 40, "n_sink": 2, "n_local": 4, "cache_threshold": 0.9})
    q1 = torch.randn(B, h, G, D)
    g = KVGroup([0, 1], KVPolicy.all(), sel, k[:, :, :L], v[:, :, :L], pos[:, :L])
    select_attend(sel, q1, g, 0.25, layer_idx=0, n_layers=1, shared={})
    assert g.state["misses"] == B * h and g.state.get("hits", 0) == 0
    first = g.state["tokenselect"]["idx"].clone()
    g.append(k[:, :, L:], v[:, :, L:], pos[:, L:])  # three decode tokens later
    q2 = q1 + 0.01 * torch.randn(B, h, G, D)
    q2[0, 1] = torch.randn(G, D)  # row 0, KV head 1 drifted
    got = select_attend(sel, q2, g, 0.25, layer_idx=0, n_layers=1, shared={})
    assert g.state["misses"] == B * h + 1 and g.state["hits"] == B * h - 1
    fresh = tokenselect_indices(q2, KVGroup([0, 1], KVPolicy.all(), sel, k, v, pos), sel.params, 0.25)
    keep = torch.zeros(B, h, L + 3, dtype=torch.bool)
    keep.scatter_(2, first.clamp(min=0), first >= 0)
    keep[:, :, L:] = True
    keep[0, 1] = False
    keep[0, 1, fresh[0, 1][fresh[0, 1] >= 0]] = True
    keep &= (pos >= 0)[:, None]
    assert not torch.equal(keep[0, 1, :L], keep[0, 0, :L])
    s = (q2 @ k.transpose(-1, -2)) * 0.25
    want = torch.softmax(s.masked_fill(~keep[:, :, None], -math.inf), -1) @ v
    assert torch.allclose(got, want, atol=1e-5)
    # the indices view of the same state: each head's selection, then its newer slots
    idx = tokenselect_indices(q2, g, sel.params, 0.25)
    mine = torch.zeros_like(keep)
    mine.scatter_(2, idx.clamp(min=0), idx >= 0)
    assert torch.equal(mine & (pos >= 0)[:, None], keep)
    # the gathered selection is memory the cache holds
    st = g.state["tokenselect"]
    assert any(t is st["kg"] for t in g.tensors()) and any(t is st["vg"] for t in g.tensors())


def test_decode_selectors_read_their_method_records():
    """One record per method: a selector's parameters, defaults and ranges are its method's, nowhere else
    (the selector table once disagreed with the registry: Quest page_size 64 vs 128, TokenSelect n_local)."""
    from lcpass.kv.select import decode_selectors
    from lcpass.methods import get_method

    table = decode_selectors()
    assert sorted(table) == ["quest", "recycled", "tidal", "tokenselect"]
    for name, defaults in table.items():
        m = get_method(name)
        assert defaults == {n: m.param(n).default for n in m.decode_params}
        assert dict(Selector(name).params) == defaults
    with pytest.raises(ValueError, match="page_size' = 8 is out of range"):
        Selector("quest", {"page_size": 8})  # the record's range
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['block_size'\]"):
        Selector("tokenselect", {"block_size": 64})  # a prefill-only parameter
    with pytest.raises(ValueError, match="unknown decode selector 'streaming'"):
        Selector("streaming")
