"""lcpass on a hand-written PyTorch model (no transformers): a small GPT whose attention is spelled out as
``q @ kᵀ * scale -> masked_fill(causal) -> softmax -> @ v``.

lcpass finds the attention structurally (no attribute names, no model registry), so ``lcpass.optimize``
returns a module with the same forward signature whose attention runs StreamingLLM on the CPU block-sparse
engine. The reference is the same model with the StreamingLLM mask written by hand into its own attention:
they must agree; the speed of the dense original and the optimized model is printed.

Run:  python examples/custom_model.py [--tokens 1024]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import lcpass

warnings.filterwarnings("ignore")
SINK, WINDOW = 4, 64


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, streaming: bool = False) -> None:
        super().__init__()
        self.heads, self.streaming = heads, streaming
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (t.view(b, s, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        scores = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5
        i = torch.arange(s, device=x.device)
        keep = i[None, :] <= i[:, None]  # causal
        if self.streaming:  # the hand-written reference of StreamingLLM
            keep = keep & ((i[None, :] < SINK) | (i[:, None] - i[None, :] < WINDOW))
        p = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        return self.out((p @ v).transpose(1, 2).reshape(b, s, c))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 128, heads: int = 4, layers: int = 2,
                 streaming: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Attention(dim, heads, streaming) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for attn, norm in zip(self.blocks, self.norms):
            x = x + attn(norm(x))
        return self.head(x)


def best_time(fn, repeat: int = 3) -> float:
    fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = TinyGPT().eval()
    reference = TinyGPT(streaming=True).eval()
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(0, 256, (1, args.tokens))

    print(lcpass.inspect(model, (idx[:, :32],)).sites[0])
    optimized = lcpass.optimize(model, method="streaming", sink=SINK, window=WINDOW, dense_below=0,
                                example_inputs=(idx,))  # captured at the length it runs
    print(optimized)
    with torch.no_grad():
        got, want = optimized(idx), reference(idx)
        err = (got - want).abs().max().item()
        print(f"{args.tokens} tokens: max |optimized - hand-written streaming reference| {err:.2e}")
        assert err <= 1e-4
        t_dense = best_time(lambda: model(idx))
        t_opt = best_time(lambda: optimized(idx))
    print(f"dense original {t_dense * 1e3:.1f} ms, lcpass streaming {t_opt * 1e3:.1f} ms (x{t_dense / t_opt:.2f})")
    print("OK")


if __name__ == "__main__":
    main()
