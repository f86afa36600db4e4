"""Retrieval-head scoring: the copy-paste score of the Retrieval Head paper on synthetic needle prompts.

Wu, Wang, Xiao, Peng, Fu, "Retrieval Head Mechanistically Explains Long-Context Factuality", 2024.
A head *retrieves* at a generation step when the token being generated is a needle token copied from
the context and the head's most attended position is that needle token. Here generation is
teacher-forced in one forward pass: each prompt is ``haystack[:d] + needle + haystack[d:] + needle``;
at every position of the second needle copy (after its first token) where the model's top-1 prediction
equals the next needle token, a head scores when its top attended context position is that token's
first occurrence. Score = hits / (prompts x scored steps): 1.0 = a perfect copy-paste head.

>>> from lcpass.zoo.pretrained import load_smollm2                            # doctest: +SKIP
>>> model, tok = load_smollm2()                                        # doctest: +SKIP
>>> scores = retrieval_head_scores(model, tok, n_prompts=4)           # [layers, heads]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["retrieval_head_scores", "needle_prompts"]


def needle_prompts(vocab: Tensor, *, n_prompts: int, context_len: int, needle_len: int,
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """Synthetic prompts from token ids ``vocab [V]``: returns (ids [n, context_len + needle_len],
    needle start [n]); the needle (distinct random tokens absent from the haystack) sits at a
    uniformly drawn depth and is repeated at the end."""
    if context_len <= needle_len or needle_len < 2 or vocab.numel() < 2 * needle_len:
        raise ValueError(f"needle_prompts: context_len={context_len}, needle_len={needle_len}, "
                         f"{vocab.numel()} usable tokens; need context_len > needle_len >= 2 and at "
                         f"least 2 * needle_len tokens")
    g = torch.Generator().manual_seed(seed)
    rows, starts = [], []
    hay_len = context_len - needle_len
    for _ in range(n_prompts):
        perm = vocab[torch.randperm(vocab.numel(), generator=g)]
        needle, pool = perm[:needle_len], perm[needle_len:]
        hay = pool[torch.randint(0, pool.numel(), (hay_len,), generator=g)]
        d = int(torch.randint(0, hay_len + 1, (1,), generator=g))
        rows.append(torch.cat([hay[:d], needle, hay[d:], needle]))
        starts.append(d)
    return torch.stack(rows), torch.tensor(starts)


@torch.no_grad()
def retrieval_head_scores(model: nn.Module, tokenizer: Any = None, n_prompts: int = 8, *,
                          context_len: int = 512, needle_len: int = 16, seed: int = 0) -> Tensor:
    """Copy-paste retrieval score of every head: ``Tensor[layers, heads]`` in [0, 1], on the model's device.

    ``model`` is a transformers causal LM; it runs with ``attn_implementation="eager"`` and
    ``output_attentions=True`` (restored afterwards). ``tokenizer`` (optional) removes special tokens
    from the sampled vocabulary.
    """
    cfg = model.config
    vocab_size = int(getattr(cfg, "vocab_size"))
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    ids = torch.arange(min(vocab_size, 32000))
    ids = ids[~torch.isin(ids, torch.tensor(sorted(special), dtype=torch.long))] if special else ids[3:]
    prompts, starts = needle_prompts(ids, n_prompts=n_prompts, context_len=context_len,
                                     needle_len=needle_len, seed=seed)
    old = getattr(cfg, "_attn_implementation", None)
    if old != "eager":
        model.set_attn_implementation("eager")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total: Tensor | None = None
    steps = 0
    try:
        j = torch.arange(1, needle_len, device=device)
        second = context_len  # position of the second needle copy
        qpos = second + j - 1  # step j: query at second + j - 1 predicts needle[j], copied from d + j
        for row, d in zip(prompts.to(device), starts.tolist()):  # starts: host-side prompt metadata
            out = model(row[None], output_attentions=True, use_cache=False)
            # only the scored rows, on the model's device: [L, H, needle_len - 1, second]
            att = torch.stack([a[0][:, qpos, :second].float() for a in out.attentions])
            pred = out.logits[0].argmax(-1)  # [S]
            src = d + j
            ok = pred[qpos] == row[second + j]  # the model copies this token
            top = att.argmax(-1)  # [L, H, needle_len - 1]
            hits = ((top == src) & ok).sum(-1).float()
            total = hits if total is None else total + hits
            steps += needle_len - 1
    finally:
        if old is not None and old != "eager":
            model.set_attn_implementation(old)
        model.train(was_training)
    return total / steps
