"""GPU tier of the generated kernels: N = 4096, bf16, against the fp32 reference (2e-2).

Skipped cleanly without CUDA. The checks run in ONE subprocess with TRITON_INTERPRET unset (the CPU
tier sets it in-process), which prints one JSON line of max errors; each test asserts its entry.
Run the checks by hand with ``python tests/test_codegen_gpu.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

TOL = 2e-2
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (generated kernels on GPU)"),
]


def _checks() -> dict[str, float]:
    """Max abs error of every generated kernel vs the reference at N = 4096, bf16 (CUDA)."""
    from lcpass import codegen
    from lcpass import masks as M
    from lcpass.engine import reference_attention
    from lcpass.layout import build_layout
    from lcpass.methods import site_mask_mod

    dev, dt = "cuda", torch.bfloat16
    B, Hq, Hkv, N, D = 1, 8, 2, 4096, 128
    sc = D ** -0.5
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, h, N, D, device=dev, dtype=dt, generator=g) for h in (Hq, Hkv, Hkv))
    err: dict[str, float] = {}

    def rec(name, out, ref):
        err[name] = float((out.float() - ref.float()).abs().max())

    masks = {
        "streaming": M.streaming_mask(4, 512),
        "s2": site_mask_mod([("s2", {})], Hq, N, N),
        "longlora": site_mask_mod([("longlora", {"group_size": 1024})], Hq, N, N),
        "duo": site_mask_mod([("duo", {"retrieval": h < 4})for h in range(Hq)], Hq, N, N),
    }
    for name, mm in masks.items():
        lay = build_layout(mm, Hq, N, N, 128)
        rec(f"prefill_{name}", codegen.attention(q, k, v, lay, scale=sc),
            reference_attention(q, k, v, mm, scale=sc))
    rec("dense_causal", codegen.attention(q, k, v, None, scale=sc, mask_mod=M.causal_mask()),
        reference_attention(q, k, v, M.causal_mask(), scale=sc))
    # decode (streaming heads and Quest selection)
    qd = q[:, :, -1:]
    mm = M.streaming_mask(4, 512)
    lay1 = build_layout(mm, Hq, 1, N, 64)
    rec("decode_streaming", codegen.decode_attention(qd, k, v, lay1, scale=sc),
        reference_attention(qd, k, v, mm, scale=sc))
    lay_q = codegen.select_layout(qd, k, k_blocks=8, mask_mod=M.causal_mask(), block_size=64)
    dense = lay_q.to_dense().to(dev)
    sel = M.mask_from_callable(lambda b, h, qi, ki: dense[0, h, qi - (N - 1), ki], "quest")
    rec("decode_quest", codegen.decode_attention(qd, k, v, lay_q, scale=sc),
        reference_attention(qd, k, v, sel, scale=sc))
    lay_p = codegen.select_layout(q, k, k_blocks=6, mask_mod=M.causal_mask(), block_size=128)
    dense_p = lay_p.to_dense().to(dev)
    selp = M.mask_from_callable(lambda b, h, qi, ki: dense_p[0, h, qi, ki], "quest_prefill")
    rec("prefill_quest", codegen.attention(q, k, v, lay_p, scale=sc),
        reference_attention(q, k, v, selp, scale=sc))
    # TokenSelect (token lists gathered in the kernel): prefill with the causal local block, decode
    # through the lowering's entry point, and the drop-in for the KV cache's gather_attend. The
    # selector runs on CPU copies (it is the CPU reference's selector; its kernels come later)
    from lcpass.kv.select import gather_attend
    from lcpass.methods import validate_params
    from lcpass.methods.dynamic import tokenselect_select

    p = validate_params("tokenselect", {"k": 512, "n_sink": 4, "n_local": 64, "block_size": 128})
    sel = tokenselect_select(q.float().cpu(), k.float().cpu(), params=p, state=None, mask_mod=None)
    dense_t = sel.to_dense(Hq).to(dev)
    selt = M.mask_from_callable(lambda b, h, qi, ki: dense_t[b, h, qi, ki], "tokenselect_prefill")
    rec("prefill_tokenselect", codegen.token_attention(q, k, v, sel.indices.to(dev), block_q=128,
                                                       scale=sc),
        reference_attention(q, k, v, selt, scale=sc))
    sel1 = tokenselect_select(qd.float().cpu(), k.float().cpu(), params=p, state=None, mask_mod=None)
    dense_1 = sel1.to_dense(Hq).to(dev)
    sel1m = M.mask_from_callable(lambda b, h, qi, ki: dense_1[b, h, qi - (N - 1), ki], "tokenselect_decode")
    rec("decode_tokenselect", codegen.selection_attention(qd, k, v, sel1, scale=sc),
        reference_attention(qd, k, v, sel1m, scale=sc))
    G = Hq // Hkv
    pos = torch.arange(N, device=dev).expand(B, N).contiguous()
    gi = torch.stack([torch.randperm(N, device=dev, generator=g)[:600] for _ in range(B * Hkv)])
    gi = gi.view(B, Hkv, 600)
    gi[..., 500:] = -1  # padded lists
    qg = qd.reshape(B, Hkv, G, D)
    rec("decode_gather", codegen.gather_decode(qg, k, v, pos, gi, sc),
        gather_attend(qg.float(), k.float(), v.float(), pos, gi, sc))
    votes = torch.softmax(qd.float() @ k.float().repeat_interleave(G, 1).transpose(-1, -2) * sc, -1)
    rec("scores_tokenselect", codegen.token_scores(qd, k, scale=sc),
        votes.view(B, Hkv, G, N).sum(2))
    # learned sinks (gpt-oss): the softmax starts from each row's sink, prefill and decode
    from lcpass.engine import with_sinks

    sinks = torch.randn(Hq, device=dev, generator=g) * 3
    mm = masks["streaming"]
    lay = build_layout(mm, Hq, N, N, 128)
    ref, lse = reference_attention(q.float(), k.float(), v.float(), mm, scale=sc, return_lse=True)
    rec("prefill_sinks", codegen.attention(q, k, v, lay, scale=sc, sinks=sinks[None, :, None]),
        with_sinks(ref, lse, sinks.view(1, -1, 1, 1).expand(B, Hq, N, 1)))
    ref1, lse1 = reference_attention(qd.float(), k.float(), v.float(), mm, scale=sc, return_lse=True)
    rec("decode_sinks", codegen.decode_attention(qd, k, v, lay1, scale=sc, sinks=sinks[None, :, None]),
        with_sinks(ref1, lse1, sinks.view(1, -1, 1, 1).expand(B, Hq, 1, 1)))
    # backward (S2-Attn and sliding window)
    for name, mm in (("longlora", masks["longlora"]), ("sliding", M.sliding_window_mask(512))):
        lay = build_layout(mm, Hq, N, N, 128)
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = codegen.attention(qq, kk, vv, lay, scale=sc)
        do = torch.randn_like(out)
        got = torch.autograd.grad(out, (qq, kk, vv), do)
        ref = reference_attention(qq.float(), kk.float(), vv.float(), mm, scale=sc)
        want = torch.autograd.grad(ref, (qq, kk, vv), do.float())
        for gg, ww, what in zip(got, want, "qkv"):
            scale_ = float(ww.abs().max()) or 1.0  # gradients are O(1e-1..1e1): relative to max
            err[f"bwd_{name}_d{what}"] = float((gg.float() - ww.float()).abs().max()) / max(1.0, scale_)
    return err


@pytest.fixture(scope="module")
def gpu_errors() -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


CHECKS = ["prefill_streaming", "prefill_s2", "prefill_longlora", "prefill_duo", "dense_causal",
          "decode_streaming", "decode_quest", "prefill_quest", "prefill_tokenselect",
          "decode_tokenselect", "decode_gather", "scores_tokenselect", "prefill_sinks", "decode_sinks"] + [
    f"bwd_{m}_d{w}" for m in ("longlora", "sliding") for w in "qkv"]


@pytest.mark.parametrize("name", CHECKS)
def test_gpu_kernel_matches_reference_bf16(gpu_errors, name):
    assert name in gpu_errors, sorted(gpu_errors)
    assert gpu_errors[name] < TOL, (name, gpu_errors[name])


if __name__ == "__main__":
    print(json.dumps(_checks()))


def test_kv_decode_selectors_on_cuda_equal_cpu():
    """The KV cache's decode selectors on CUDA (generated gather / scoring kernels) give the CPU path's
    output: Quest, TokenSelect and Recycled Attention over one group at L = 4096, fp32."""
    from lcpass.kv.group import KVGroup
    from lcpass.kv.select import Selector, select_attend
    from lcpass.methods import KVPolicy

    torch.manual_seed(0)
    B, h, G, L, D = 2, 2, 4, 4096, 128
    k, v, q = torch.randn(B, h, L, D), torch.randn(B, h, L, D), torch.randn(B, h, G, D)
    pos = torch.arange(L, dtype=torch.int32)[None].repeat(B, 1)
    pos[1, :37] = -1  # left padding
    for sel in (Selector("quest", {"token_budget": 400, "page_size": 64}),
                Selector("tokenselect", {"k": 400}), Selector("recycled", {"K": 400, "S": 4})):
        outs = []
        for dev in ("cpu", "cuda"):
            g = KVGroup([0, 1], KVPolicy.all(), sel, k.to(dev), v.to(dev), pos.to(dev))
            select_attend(sel, q.to(dev), g, D ** -0.5, layer_idx=0, n_layers=1, shared={})  # recycled: full step
            outs.append(select_attend(sel, q.to(dev), g, D ** -0.5, layer_idx=0, n_layers=1, shared={}).cpu())
        assert torch.allclose(outs[0], outs[1], atol=2e-3), (sel.name, float((outs[0] - outs[1]).abs().max()))
