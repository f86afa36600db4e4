"""Quickstart: optimize a Hugging Face causal LM (the embedded SmolLM2-135M-Instruct) and generate.

The optimized model is still a ``LlamaForCausalLM``: ``generate()`` and ``save_pretrained()`` work as
before. Every attention head runs StreamingLLM (4 sink tokens + a window of recent tokens) on the CPU
block-sparse engine. The reference (the untouched model) runs next to it: positions the window still
covers must agree exactly, the rest closely (top-1 next token), and the speed of both is printed.

Run:  python examples/quickstart_hf.py [--tokens 512] [--window 128]
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import lcpass
from lcpass.zoo.pretrained import DEFAULT_PROMPT, load_smollm2

warnings.filterwarnings("ignore")


def timed(fn, repeat: int = 1):
    """(result, best seconds over `repeat` runs)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256, help="prompt length")
    ap.add_argument("--window", type=int, default=64, help="recent tokens each head keeps")
    ap.add_argument("--new", type=int, default=8, help="tokens to generate")
    args = ap.parse_args()
    torch.manual_seed(0)

    model, tok = load_smollm2()
    text = (DEFAULT_PROMPT + " ") * (args.tokens // 20 + 1)
    ids = tok(text, return_tensors="pt")["input_ids"][:, : args.tokens]

    # the one call: same class back, attention planned per head
    optimized = lcpass.optimize(copy.deepcopy(model), method="streaming", sink=4, window=args.window,
                                dense_below=0, example_inputs={"input_ids": ids[:, :32]}, report=True)
    assert type(optimized) is type(model)

    with torch.no_grad():
        ref, t_ref = timed(lambda: model(input_ids=ids).logits)
        got, t_opt = timed(lambda: optimized(input_ids=ids).logits)
    covered = 4 + args.window  # positions whose whole causal context is still inside sinks + window
    exact = (got[:, :covered] - ref[:, :covered]).abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"prefill {ids.shape[1]} tokens: reference {t_ref:.2f} s, lcpass streaming {t_opt:.2f} s "
          f"(x{t_ref / t_opt:.2f})")
    print(f"first {covered} positions max |logit diff| {exact:.2e}; top-1 agreement over all positions "
          f"{agree:.1%}")
    assert exact <= 1e-3, exact
    assert agree >= 0.8, agree

    prompt = ids[:, : max(1, min(64, 4 + args.window - args.new))]  # prompt + new tokens fit in the cache
    gen_kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
    (want, t_g_ref), (out, t_g_opt) = (timed(lambda: model.generate(prompt, **gen_kw), 1),
                                       timed(lambda: optimized.generate(prompt, **gen_kw), 1))
    print(f"generate {args.new} tokens: reference {t_g_ref:.2f} s, lcpass {t_g_opt:.2f} s")
    print("reference:", repr(tok.decode(want[0, prompt.shape[1]:])))
    print("lcpass   :", repr(tok.decode(out[0, prompt.shape[1]:])))
    # prompt and generated tokens fit in sinks + window: greedy decoding must be identical
    assert torch.equal(out, want), "generate() with a covering window must equal the reference"
    print("OK")


if __name__ == "__main__":
    main()
