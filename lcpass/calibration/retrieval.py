"""Retrieval-head scores (the Retrieval Head paper's copy-paste score) and the plans built from them.

Paper: Wu, Wang, Xiao, Peng, Fu, "Retrieval Head Mechanistically Explains Long-Context Factuality",
ICLR 2025. A head *copies* at a decoding step when its most-attended context token lies inside the needle
and is the very token being produced. Its retrieval score is the fraction of needle tokens it copied,
averaged over prompts. Here the answer is teacher-forced (one forward per prompt instead of a generation
loop): at answer position t the head's argmax key over the context must be a needle token equal to
token t, and (``require_copy=True``, the paper's condition) the model's own greedy prediction at t - 1
must be that token. A secondary *soft* score (attention probability on the needle's matching tokens)
breaks ties between heads with equal hard scores, so rankings stay meaningful when few heads copy.

Example:
    >>> scores = retrieval_head_scores(model, tok, lengths=(512,), depths=(0.2, 0.8))  # doctest: +SKIP
    >>> scores.shape                                   # doctest: +SKIP
    torch.Size([30, 9])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lcpass.calibration.probe import AttentionCall, attention_probe
from lcpass.calibration.progress import progress_bar
from lcpass.plan import HeadSpec, ModelFingerprint, Plan, SiteInfo, SitePlan
from lcpass.quality.prompts import Prompt, copy_prompt, random_copy_prompt

__all__ = [
    "RetrievalScores",
    "retrieval_head_scores",
    "score_retrieval_heads",
    "calibration_prompts",
    "needle_in_data",
    "select_heads",
    "duo_plan_from_scores",
    "razor_plan_from_scores",
]

RANDOM_PROMPTS_WARNING = (
    "lcpass.calibrate: no tokenizer and no data given, so calibration uses random-token prompts "
    "(a copy task on random ids); pass tokenizer=... (or data=...) for prompts in the model's language"
)


@dataclass
class RetrievalScores:
    """Per-site, per-query-head copy-paste scores.

    Attributes:
        sites: site names in model order (rows).
        hard: [sites, heads] the paper's score (fraction of needle tokens copied), in [0, 1].
        soft: [sites, heads] mean attention probability on the needle's matching tokens at copy steps.
        n_prompts: prompts scored.
    """

    sites: list[str]
    hard: torch.Tensor
    soft: torch.Tensor
    n_prompts: int

    def ranking_key(self) -> torch.Tensor:
        """hard + 1e-3 * soft: ranks by the paper's score, ties broken by attention on the needle."""
        return self.hard + 1e-3 * self.soft


def needle_in_data(hay: torch.Tensor, needle: torch.Tensor, depth: float, lead: int = 2) -> Prompt:
    """Insert `needle` ids at `depth` of the `hay` ids and append the needle again (teacher forcing):
    after its first `lead` tokens the model should copy the rest. Output length = len(hay) + 2 len(needle)."""
    hay = hay.reshape(-1)
    cut = round(depth * hay.numel())
    ids = torch.cat([hay[:cut], needle, hay[cut:], needle])
    n = needle.numel()
    return Prompt(
        ids[None], " ".join(map(str, needle.tolist())), [(cut, cut + n)], float(depth),
        answer_span=(ids.numel() - n + lead, ids.numel()), meta={"data": True},
    )


def _data_ids(data: Any, tokenizer: Any) -> list[torch.Tensor]:
    items = [data] if isinstance(data, (str, torch.Tensor)) else list(data)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError(
                    f"calibration data item {i} is text but no tokenizer was given; pass tokenizer=... "
                    "or token-id tensors"
                )
            out.append(torch.tensor(tokenizer(item, add_special_tokens=False)["input_ids"]))
        elif isinstance(item, torch.Tensor):
            out.append(item.reshape(-1).long())
        else:
            raise ValueError(
                f"calibration data item {i} is a {type(item).__name__}; pass strings or token-id tensors"
            )
    if not out:
        raise ValueError("calibration data is empty; pass at least one text or token-id tensor")
    return out


def calibration_prompts(
    model: nn.Module,
    tokenizer: Any = None,
    data: Any = None,
    lengths: Sequence[int] = (1024,),
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    seed: int = 0,
) -> list[Prompt]:
    """Teacher-forced copy prompts: from the tokenizer (random words in filler text), from `data`
    (random-token needles inside the given texts / ids, cut to each length), or random tokens (warns)."""
    prompts: list[Prompt] = []
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if data is not None:
        hays = _data_ids(data, tokenizer)
        gen = torch.Generator().manual_seed(seed)
        n_needle = 16
        for i, (length, depth) in enumerate((n, d) for n in lengths for d in depths):
            hay = hays[i % len(hays)][: max(length - 2 * n_needle, 1)]
            high = vocab or int(hay.max()) + 1
            needle = torch.randint(0, high, (n_needle,), generator=gen)
            prompts.append(needle_in_data(hay, needle, depth))
        return prompts
    if tokenizer is None:
        if not vocab:
            raise ValueError(
                f"{type(model).__name__} has no config.vocab_size, so random calibration prompts cannot be "
                "made; pass tokenizer=... or data=[token-id tensors]"
            )
        warnings.warn(RANDOM_PROMPTS_WARNING, UserWarning, stacklevel=3)
    k = 0
    for length in lengths:
        for depth in depths:
            if tokenizer is None:
                prompts.append(random_copy_prompt(vocab, length, depth, seed=seed + k))
            else:
                prompts.append(copy_prompt(tokenizer, length, depth, seed=seed + k))
            k += 1
    return prompts


def score_retrieval_heads(
    model: nn.Module,
    prompts: Iterable[Prompt],
    require_copy: bool = True,
    progress: bool = True,
) -> RetrievalScores:
    """Copy-paste scores of every attention head over teacher-forced copy `prompts` (see module doc)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("score_retrieval_heads: no prompts; pass at least one copy prompt")
    hard: dict[str, torch.Tensor] = {}
    soft: dict[str, torch.Tensor] = {}
    order: list[str] = []
    current: dict[str, Any] = {}

    def probe(call: AttentionCall) -> torch.Tensor:
        rows = current["rows"]
        if call.query.shape[2] == current["length"]:
            p = call.probs(rows)[0]  # [H, R, Sk]
            current.setdefault("argmax", {})[call.site] = p.argmax(dim=-1)  # [H, R]
            current.setdefault("mass", {})[call.site] = (p * current["source"][None]).sum(-1)  # [H, R]
            if call.site not in hard:
                order.append(call.site)
        return call.dense()

    with progress_bar(progress) as bar:
        task = bar.add_task("retrieval-head scores", total=len(prompts), info="")
        for prompt in prompts:
            if prompt.answer_span is None or not prompt.spans:
                raise ValueError("score_retrieval_heads: prompts need a needle span and an answer_span")
            ids = prompt.ids
            a0, a1 = prompt.answer_span
            n0, n1 = prompt.spans[0]
            targets = ids[0, a0:a1]  # tokens to copy
            rows = torch.arange(a0 - 1, a1 - 1)  # query positions that predict them
            needle = ids[0, n0:n1]
            # source[r, k]: key k is a needle token equal to the target of row r
            source = torch.zeros(len(rows), ids.shape[1])
            source[:, n0:n1] = (needle[None, :] == targets[:, None]).float()
            current.clear()
            current.update(rows=rows, length=ids.shape[1], source=source)
            with torch.no_grad(), attention_probe(model, probe):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            copied = logits[0, rows].argmax(-1) == targets  # [R]
            for site in current.get("argmax", {}):
                am = current["argmax"][site]  # [H, R]
                hit = source.gather(1, am.T.contiguous()).T > 0  # [H, R] argmax lands on a matching needle token
                if require_copy:
                    hit = hit & copied[None]
                h = hit.float().mean(dim=1)
                s = current["mass"][site].mean(dim=1)
                hard[site] = hard.get(site, 0) + h
                soft[site] = soft.get(site, 0) + s
            bar.advance(task)
    n = len(prompts)
    return RetrievalScores(
        order, torch.stack([hard[s] / n for s in order]), torch.stack([soft[s] / n for s in order]), n
    )


def retrieval_head_scores(
    model: nn.Module,
    tokenizer: Any = None,
    data: Any = None,
    lengths: Sequence[int] = (1024,),
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    require_copy: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """The copy-paste retrieval score of every head: a [layers, heads] tensor in [0, 1] (model order).

    Without a tokenizer or data the prompts are random tokens (a warning says so).

    Example:
        >>> s = retrieval_head_scores(model, tok, lengths=(512,), depths=(0.5,))  # doctest: +SKIP
        >>> s.shape, bool(s.isfinite().all())                                      # doctest: +SKIP
        (torch.Size([30, 9]), True)
    """
    prompts = calibration_prompts(model, tokenizer, data, lengths, depths, seed)
    return score_retrieval_heads(model, prompts, require_copy, progress).hard


def select_heads(
    sites: Sequence[SiteInfo], scores: torch.Tensor, ratio: float, by_kv_head: bool
) -> dict[str, list[int]]:
    """The top `ratio` of heads (or KV heads) by score, ranked across all sites.

    `scores` is [sites, query heads]; a KV head scores the max of its query heads (it must be kept
    whole if any of them retrieves). Exactly round(ratio * units) units are chosen; ties keep model order.

    Example:
        >>> sites = [SiteInfo("a", 2, 1, 8), SiteInfo("b", 2, 1, 8)]
        >>> select_heads(sites, torch.tensor([[0.1, 0.2], [0.9, 0.0]]), 0.5, by_kv_head=True)
        {'b': [0]}
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"retrieval ratio {ratio!r} must lie in [0, 1] (the share of heads kept full)")
    if scores.shape[0] != len(sites):
        raise ValueError(f"scores have {scores.shape[0]} rows but the model has {len(sites)} attention sites")
    units: list[tuple[float, int, str, int]] = []
    k = 0
    for s, row in zip(sites, scores):
        if row.numel() != s.n_heads:
            raise ValueError(f"site {s.name!r}: {row.numel()} head scores for {s.n_heads} heads")
        if by_kv_head:
            per = row.view(s.n_kv_heads, s.n_heads // s.n_kv_heads).max(dim=1).values
        else:
            per = row
        for h, v in enumerate(per.tolist()):
            units.append((float(v), k, s.name, h))
            k += 1
    n_keep = int(round(ratio * len(units)))
    chosen = sorted(units, key=lambda u: (-u[0], u[1]))[:n_keep]
    out: dict[str, list[int]] = {}
    for _, _, name, h in sorted(chosen, key=lambda u: u[1]):
        out.setdefault(name, []).append(h)
    return out


def duo_plan_from_scores(
    sites: Sequence[SiteInfo],
    scores: torch.Tensor,
    ratio: float,
    sink: int = 64,
    recent: int = 256,
    by_kv_head: bool = True,
    fingerprint: ModelFingerprint | None = None,
) -> Plan:
    """DuoAttention plan: the top `ratio` heads by score are retrieval heads, the rest streaming."""
    chosen = select_heads(sites, scores, ratio, by_kv_head)
    plan = Plan.duo(sites, chosen, sink=sink, recent=recent, by_kv_head=by_kv_head)
    return Plan(plan.sites, fingerprint or plan.fingerprint)


def razor_plan_from_scores(
    sites: Sequence[SiteInfo],
    scores: torch.Tensor,
    ratio: float,
    params: Mapping[str, Any] | None = None,
    by_kv_head: bool = True,
    fingerprint: ModelFingerprint | None = None,
) -> Plan:
    """RazorAttention plan: the top `ratio` heads keep their whole KV cache (``retrieval=True``), the
    rest keep sinks + recent + one compensation token. `params` are razor's other parameters."""
    chosen = select_heads(sites, scores, ratio, by_kv_head)
    extra = dict(params or {})
    plan: dict[str, SitePlan] = {}
    for s in sites:
        group = s.n_heads // s.n_kv_heads if by_kv_head else 1
        keep = {h * group + i for h in chosen.get(s.name, []) for i in range(group)}
        plan[s.name] = SitePlan(
            tuple(HeadSpec("razor", {**extra, "retrieval": h in keep}) for h in range(s.n_heads))
        )
    fp = fingerprint or ModelFingerprint.from_sites(sites)
    result = Plan(plan, fp)
    result.validate(sites)
    return result
