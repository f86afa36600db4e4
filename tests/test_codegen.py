"""Generated Triton kernels under TRITON_INTERPRET=1 (CPU) against the plain-PyTorch reference.

Tiny shapes (N = 200: not a multiple of the 64-token layout block, 32x32 tiles so every block has
sub-tiles), GQA 4:1 and MQA, batch 2; fp32 at 1e-4. Every static/dense method of the registry runs
prefill and decode through the generated kernels built from the SAME mask_mod the engine uses;
Quest/mean-pooled selections, the backward for S2-Attn (LongLoRA) and sliding window, the source
properties (partial-path-only mask, in-window visits), the cache, custom-op export and the
unsupported-spec errors are checked too. Token-granular selections (TokenSelect): tests/
test_codegen_token.py. GPU tier: tests/test_codegen_gpu.py.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton compiles anything in this process

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lcpass import codegen  # noqa: E402
from lcpass import masks as M  # noqa: E402
from lcpass.codegen import AttentionSpec, UnsupportedSpec  # noqa: E402
from lcpass.codegen.cache import STATS, kernel_dir  # noqa: E402
from lcpass.codegen.select import reference_block_scores  # noqa: E402
from lcpass.engine import reference_attention  # noqa: E402
from lcpass.layout import build_layout  # noqa: E402
from lcpass.methods import list_methods, site_mask_mod  # noqa: E402

N, D, BLOCK, TILES = 200, 32, 64, (32, 32)
BIG_TILES = (64, 64)  # one tile per layout block: fewer interpreted programs for the method sweep
TOL = 1e-4

# small-context parameters per method (the defaults are sized for 4k-128k contexts)
PARAMS: dict[str, object] = {
    "streaming": {"sink": 4, "window": 40},
    "duo": lambda h: {"sink": 4, "recent": 32, "retrieval": h % 3 == 0},
    "razor": {},
    "moa": lambda h: {"alpha": 24.0 + 8 * h, "beta": 0.1, "sink": 2},
    "s2": {"block_size": 16, "local_blocks": 2, "vert_stride": 4},
    "dilated": {"window": 12, "dilation": 3},
    "longlora": {"group_size": 64},
}
STATIC = [m.name for m in list_methods() if m.kind in ("static", "dense")]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LCPASS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lcpass-cache"))


def _specs(name: str, n_heads: int) -> list:
    p = PARAMS.get(name, {})
    if callable(p):
        return [(name, p(h)) for h in range(n_heads)]
    return [(name, p)]


def _qkv(B: int, Hq: int, Hkv: int, Sq: int, Sk: int, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Sk, D, generator=g)
    v = torch.randn(B, Hkv, Sk, D, generator=g)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def _heads(i: int) -> tuple[int, int]:
    return (8, 2) if i % 2 == 0 else (4, 1)  # GQA 4:1, MQA


def test_registry_has_static_methods():
    assert {"dense", "causal", "streaming", "duo", "s2", "longlora"} <= set(STATIC)


@pytest.mark.parametrize("name", STATIC)
def test_prefill_matches_reference(name):
    i = STATIC.index(name)
    Hq, Hkv = _heads(i)
    Sq = N if i % 3 else 136  # some methods also as a chunked prefill (queries = last 136 keys)
    mm = site_mask_mod(_specs(name, Hq), Hq, Sq, N)
    lay = build_layout(mm, Hq, Sq, N, BLOCK)
    q, k, v = _qkv(2, Hq, Hkv, Sq, N, seed=i)
    tiles = TILES if name == "streaming" else BIG_TILES  # sub-tiled blocks too
    out = codegen.attention(q, k, v, lay, scale=D ** -0.5, tiles=tiles)
    ref = reference_attention(q, k, v, mm, scale=D ** -0.5)
    assert (out - ref).abs().max().item() < TOL, name


@pytest.mark.parametrize("name", STATIC)
def test_decode_matches_reference(name):
    i = STATIC.index(name)
    Hq, Hkv = _heads(i + 1)
    Sq = 1 if i % 2 else 3  # plain decode and a 3-token speculative step
    mm = site_mask_mod(_specs(name, Hq), Hq, Sq, N)
    lay = build_layout(mm, Hq, Sq, N, BLOCK)
    q, k, v = _qkv(2, Hq, Hkv, Sq, N, seed=10 + i)
    out = codegen.decode_attention(q, k, v, lay, scale=D ** -0.5, n_splits=2, block_n=32)
    ref = reference_attention(q, k, v, mm, scale=D ** -0.5)
    assert (out - ref).abs().max().item() < TOL, name


def _dense_mask_mod(lay):
    dense = lay.to_dense()
    off = lay.q_offset
    return M.mask_from_callable(lambda b, h, qi, ki: dense[b % dense.shape[0], h, qi - off, ki], "sel")


@pytest.mark.parametrize("kind", ["quest", "mean"])
def test_block_scores_match_reference(kind):
    q, k, _ = _qkv(2, 4, 1, N, N, seed=3)
    got = codegen.block_scores(q, k, block_size=BLOCK, kind=kind)
    want = reference_block_scores(q, k, block_size=BLOCK, kind=kind)
    assert got.shape == (2, 4, 4, 4)
    assert (got - want).abs().max().item() < 1e-4


def test_quest_topk_prefill_and_decode():
    q, k, v = _qkv(2, 8, 2, N, N, seed=4)
    lay = codegen.select_layout(q, k, k_blocks=2, mask_mod=M.causal_mask(), block_size=BLOCK)
    assert lay.batch == 2 and int(lay.kv_num_blocks.sum() + lay.full_kv_num_blocks.sum()) < 2 * 8 * 10
    out = codegen.attention(q, k, v, lay, scale=D ** -0.5, tiles=TILES)
    ref = reference_attention(q, k, v, _dense_mask_mod(lay), scale=D ** -0.5)
    assert (out - ref).abs().max().item() < TOL
    # decode: the newest query selects per head (heads of a group disagree: per-row membership)
    qd = q[:, :, -1:]
    lay1 = codegen.select_layout(qd, k, k_blocks=2, mask_mod=M.causal_mask(), block_size=BLOCK)
    got = codegen.decode_attention(qd, k, v, lay1, scale=D ** -0.5, n_splits=3, block_n=32)
    ref = reference_attention(qd, k, v, _dense_mask_mod(lay1), scale=D ** -0.5)
    assert (got - ref).abs().max().item() < TOL


@pytest.mark.parametrize("mask", ["causal", "full"])
def test_dense_generated_kernel(mask):
    mm = M.causal_mask() if mask == "causal" else M.full_mask()
    q, k, v = _qkv(2, 4, 1, N, N, seed=5)
    out = codegen.attention(q, k, v, None, scale=D ** -0.5, mask_mod=mm, tiles=BIG_TILES)
    assert (out - reference_attention(q, k, v, mm, scale=D ** -0.5)).abs().max().item() < TOL


def test_score_mod_softcap_and_per_head_bias():
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])

    def alibi_softcap(s, b, h, qi, ki):
        return 8.0 * torch.tanh((s - slopes[h] * (qi - ki)) / 8.0)

    mm = M.sliding_window_mask(70)
    lay = build_layout(mm, 4, N, N, BLOCK)
    q, k, v = _qkv(2, 4, 1, N, N, seed=6)
    out = codegen.attention(q, k, v, lay, scale=D ** -0.5, score_mod=alibi_softcap, tiles=TILES)
    ref = reference_attention(q, k, v, mm, scale=D ** -0.5, score_mod=alibi_softcap)
    assert (out - ref).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["longlora", "sliding"])
def test_backward_matches_autograd_of_reference(name):
    Hq, Hkv, n = 4, 2, 136  # 136: not a multiple of the 64-token block
    if name == "longlora":
        mm = site_mask_mod([("longlora", {"group_size": 64})], Hq, n, n)
    else:
        mm = M.sliding_window_mask(48)
    lay = build_layout(mm, Hq, n, n, BLOCK)
    q, k, v = _qkv(2, Hq, Hkv, n, n, seed=7, grad=True)
    keep = None
    if name == "sliding":  # with key padding: batch 1 has its last 20 keys padded
        keep = torch.ones(2, n, dtype=torch.bool)
        keep[1, -20:] = False
    out = codegen.attention(q, k, v, lay, scale=D ** -0.5, tiles=TILES, kv_keep=keep)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference_attention(q, k, v, mm, scale=D ** -0.5, kv_keep=keep)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    assert (out - ref).abs().max().item() < TOL
    for g, w, what in zip(got, want, "qkv"):
        assert (g - w).abs().max().item() < TOL, f"d{what}"


def test_key_padding_prefill_and_decode():
    # kv_keep masks padded keys on every tile (full blocks too); rows left without keys give zeros
    q, k, v = _qkv(2, 4, 1, N, N, seed=14)
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[0, :70] = False  # left padding: the first queries of batch 0 see no key at all
    keep[1, 150:] = False  # right padding
    mm = M.streaming_mask(4, 48)
    lay = build_layout(mm, 4, N, N, BLOCK)
    out = codegen.attention(q, k, v, lay, scale=D ** -0.5, tiles=BIG_TILES, kv_keep=keep)
    ref = reference_attention(q, k, v, mm, scale=D ** -0.5, kv_keep=keep)
    assert (out - ref).abs().max().item() < TOL and out[0, :, :70].abs().max().item() == 0.0
    qd = q[:, :, -1:]
    lay1 = build_layout(M.causal_mask(), 4, 1, N, BLOCK)
    got = codegen.decode_attention(qd, k, v, lay1, scale=D ** -0.5, kv_keep=keep, n_splits=2)
    want = reference_attention(qd, k, v, M.causal_mask(), scale=D ** -0.5, kv_keep=keep)
    assert (got - want).abs().max().item() < TOL
    with pytest.raises(ValueError, match=r"kv_keep must be Bool\[B=2, Sk=200\]"):
        codegen.attention(q, k, v, lay, scale=1.0, kv_keep=keep[:, :10])


def test_floor_division_semantics_on_negative_offsets():
    # (kv - q) is negative below the diagonal: torch floors, C truncates; the printed helpers floor
    mm = M.mask_from_callable(lambda b, h, qi, ki: ((ki - qi) // 3) % 2 == 0, "floor_stripes")
    assert "lc_floordiv" in codegen.print_mask_mod(mm).source()
    q, k, v = _qkv(1, 2, 1, 64, 64, seed=12)
    lay = build_layout(mm, 2, 64, 64, 32)
    out = codegen.attention(q, k, v, lay, scale=D ** -0.5, tiles=(32, 32))
    assert (out - reference_attention(q, k, v, mm, scale=D ** -0.5)).abs().max().item() < TOL


def test_kernels_cli_prints_the_site_kernel(capsys):
    import argparse

    from lcpass.cli import kernels_cmd

    ap = argparse.ArgumentParser()
    kernels_cmd.add_parser(ap.add_subparsers())
    args = ap.parse_args(["kernels", "llama-tiny", "--show", "model.layers.0.self_attn", "--method",
                          "streaming", "--param", "window=256", "--param", "sink=4"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "def attn_fwd(" in out and "streaming(sink=4, window=256)" in out
    assert "G = tl.constexpr(2)" in out  # llama-tiny: 4 q heads / 2 kv heads
    args = ap.parse_args(["kernels", "llama-tiny", "--show", "model.layers.0.self_attn", "--kind",
                          "decode"])
    assert args.func(args) == 0 and "def attn_decode_merge(" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not K=V"):
        kernels_cmd.parse_params(["window"])


# ------------------------------------------------------------------------------------------------
# generated source


def _fwd_source(mm, n_heads=4) -> str:
    (spec,) = codegen.kernel_specs(AttentionSpec(head_dim=D, mask_mod=mm, n_heads=n_heads,
                                                 dtype=torch.float32, block_size=(BLOCK, BLOCK)))
    return codegen.render(spec)


def test_mask_predicate_only_on_partial_path():
    mm = M.streaming_mask(4, [40, 48, 56, 64])
    src = _fwd_source(mm)
    p = codegen.print_mask_mod(mm)
    full_start = src.index("# ---- full blocks")
    part_start = src.index("# ---- partial blocks")
    full_section = src[full_start:part_start]
    assert "mm_" not in full_section and "mask_mod hole" not in full_section
    for line in p.lines:  # every printed statement appears once, on the partial path
        hits = [m.start() for m in re.finditer(re.escape(line), src)]
        assert len(hits) == 1 and hits[0] > part_start, line
    assert "tl.load(mm_tab0 + h)" in src  # the per-head window is a table argument
    assert src.count("tl.where(mm_") == 1
    assert src.lstrip().startswith('"""') and "Notation" in src[:2000]


def test_sliding_window_kernel_visits_only_in_window_blocks():
    # queries are the last 64 of 200 positions (136..199) with an 8-token window: keys 129..199, so
    # only key blocks 2 and 3 are in the window. Keys and values of blocks 0-1 are NaN: one visit of
    # them (masked or not, 0 * NaN = NaN in p @ v) would poison the output.
    W, Sq = 8, 64
    mm = M.sliding_window_mask(W)
    lay = build_layout(mm, 4, Sq, N, BLOCK)
    part, full = lay.block_maps()
    assert (part | full)[0, :, 0].tolist() == [[False, False, True, True]] * 4
    q, k, v = _qkv(2, 4, 2, Sq, N, seed=8)
    ref = reference_attention(q, k, v, mm, scale=D ** -0.5)
    k[:, :, :128] = float("nan")
    v[:, :, :128] = float("nan")
    out = codegen.attention(q, k, v, lay, scale=D ** -0.5, tiles=TILES)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < TOL
    src = _fwd_source(mm)
    assert "range(n_full * " in src and "range(n_part * " in src and "tl.cdiv(Sk, BLOCK_N)" not in src


def test_cache_two_specs_two_entries_same_spec_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LCPASS_CACHE_DIR", str(tmp_path))
    a = AttentionSpec(head_dim=D, mask_mod=M.sliding_window_mask(16), dtype=torch.float32)
    b = AttentionSpec(head_dim=D, mask_mod=M.sliding_window_mask(24), dtype=torch.float32)
    (sa,), (sb,) = codegen.kernel_specs(a), codegen.kernel_specs(b)
    assert codegen.spec_key(sa) != codegen.spec_key(sb)
    renders = STATS["renders"]
    codegen.load_kernel(sa)
    codegen.load_kernel(sb)
    files = sorted(p.name for p in kernel_dir().glob("*.py"))
    assert len(files) == 2 and STATS["renders"] == renders + 2
    codegen.load_kernel(codegen.kernel_specs(a)[0])  # equal spec, new object: reused
    assert STATS["renders"] == renders + 2 and len(list(kernel_dir().glob("*.py"))) == 2
    # another process finds the file: it imports, it does not render
    code = ("import os; os.environ['TRITON_INTERPRET']='1'\n"
            "import torch; from lcpass import codegen, masks as M\n"
            "from lcpass.codegen.cache import STATS\n"
            "s = codegen.kernel_specs(codegen.AttentionSpec(head_dim=%d, "
            "mask_mod=M.sliding_window_mask(16), dtype=torch.float32))[0]\n"
            "codegen.load_kernel(s); print(STATS['renders'], STATS['imports'])" % D)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LCPASS_CACHE_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["0", "1"]
    assert len(list(kernel_dir().glob("*.py"))) == 2


def test_export_sees_one_custom_op_node():
    mm = M.sliding_window_mask(20)
    lay = build_layout(mm, 2, 64, 64, 32)

    class Site(torch.nn.Module):
        def forward(self, q, k, v):
            return codegen.attention(q, k, v, lay, scale=0.25) * 2

    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, h, 64, 16, generator=g) for h in (2, 1, 1))
    ep = torch.export.export(Site(), (q, k, v))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "lcpass_codegen.sparse_attention.default" in targets
    assert (ep.module()(q, k, v) - Site()(q, k, v)).abs().max().item() == 0.0


def test_prepared_attention_compiles_to_one_op_node():
    from torch._dynamo.testing import CompileCounterWithBackend

    lay = build_layout(M.sliding_window_mask(20), 2, 64, 64, 32)
    prep = codegen.prepare_attention(lay, head_dim=16, n_heads=2, n_kv_heads=1, dtype=torch.float32,
                                     device="cpu", scale=0.25, backward=True)
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, h, 64, 16, generator=g) for h in (2, 1, 1))
    cnt = CompileCounterWithBackend("eager")  # dynamo graph; the interpreter cannot run AOT tracing
    compiled = torch.compile(lambda q, k, v: prep(q, k, v) * 2, backend=cnt, fullgraph=True)
    out = compiled(q, k, v)
    assert (out - prep(q, k, v) * 2).abs().max().item() == 0.0
    assert "lcpass_codegen.sparse_attention" in cnt.graphs[0].code
    qg = q.clone().requires_grad_()
    compiled(qg, k, v).sum().backward()
    qr = q.clone().requires_grad_()
    ref = reference_attention(qr, k, v, M.sliding_window_mask(20), scale=0.25) * 2
    ref.sum().backward()
    assert (qg.grad - qr.grad).abs().max().item() < TOL


# ------------------------------------------------------------------------------------------------
# unsupported specs


def test_unknown_op_is_named_and_reported():
    weird = M.mask_from_callable(lambda b, h, qi, ki: torch.sin(qi.float()) > 0, "sine_mask")
    with pytest.raises(UnsupportedSpec, match=r"mask_mod 'sine_mask' uses torch\.sin"):
        codegen.print_mask_mod(weird)
    ok, why = codegen.available(AttentionSpec(head_dim=64, mask_mod=weird, device="cpu"))
    assert not ok and "torch.sin" in why
    with pytest.raises(UnsupportedSpec, match="Python control flow"):
        codegen.print_mask_mod(M.mask_from_callable(lambda b, h, qi, ki: qi if qi > 3 else ki, "branchy"))


def test_untileable_head_dim_is_named_and_reported():
    ok, why = codegen.available(AttentionSpec(head_dim=300, device="cpu"))
    assert not ok and "head_dim=300" in why
    q, k, v = (torch.randn(1, 1, 16, 12) for _ in range(3))
    with pytest.raises(UnsupportedSpec, match="head_dim=12"):
        codegen.attention(q, k, v, build_layout(M.causal_mask(), 1, 16, 16, 16), scale=1.0)
    assert codegen.available(AttentionSpec(head_dim=64, device="cpu")) == (True, "")


def test_fallback_warns_and_stays_correct():
    weird = M.mask_from_callable(lambda b, h, qi, ki: torch.sin(qi.float()) > ki.float() * 0, "sine")
    q, k, v = _qkv(1, 2, 1, 40, 40, seed=11)
    lay = build_layout(weird, 2, 40, 40, 16)
    with pytest.warns(UserWarning, match="falling back to the CPU engine.*torch.sin"):
        out = codegen.attention_or_fallback(q, k, v, lay, scale=D ** -0.5)
    assert (out - reference_attention(q, k, v, weird, scale=D ** -0.5)).abs().max().item() < TOL
