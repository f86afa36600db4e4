"""``lcpass.calibrate``: measure a model's heads and write a plan (DuoAttention, RazorAttention, MoA).

    calibrate(model, method="duo",   tokenizer=tok, retrieval_ratio=0.5)              # retrieval-head scores
    calibrate(model, method="duo",   tokenizer=tok, mode="optimize", steps=8)          # DuoAttention's gates
    calibrate(model, method="razor", tokenizer=tok, retrieval_ratio=0.25)
    calibrate(model, method="moa",   tokenizer=tok, density=0.5)                       # per-head windows

Every plan carries the model's full fingerprint (sites, architecture, attention-weight hash) and is
refused on another model. Without a tokenizer and data, calibration runs on random-token prompts and
warns. Progress is drawn with rich (``progress=False`` to silence it).

Example:
    >>> from lcpass.zoo.pretrained import load_smollm2
    >>> model, tok = load_smollm2()
    >>> plan = calibrate(model, "duo", tokenizer=tok, retrieval_ratio=0.5)   # doctest: +SKIP
    >>> plan.save("smollm2-duo.json")                                         # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from lcpass.calibration.duo_optimize import DuoGates, train_duo_gates
from lcpass.calibration.moa import allocate_windows, candidate_windows, profile_window_mass, window_density
from lcpass.calibration.probe import AttentionCall, attention_probe
from lcpass.calibration.retrieval import (
    RANDOM_PROMPTS_WARNING,
    RetrievalScores,
    _data_ids,
    calibration_prompts,
    duo_plan_from_scores,
    razor_plan_from_scores,
    retrieval_head_scores,
    score_retrieval_heads,
    select_heads,
)
from lcpass.inspect import detect
from lcpass.plan import HeadSpec, ModelFingerprint, Plan, SiteInfo, SitePlan
from lcpass.quality.prompts import passkey_prompt

__all__ = [
    "AttentionCall",
    "DuoGates",
    "RetrievalScores",
    "allocate_windows",
    "attention_probe",
    "calibrate",
    "calibration_prompts",
    "candidate_windows",
    "check_plan",
    "duo_plan_from_scores",
    "model_fingerprint",
    "model_sites",
    "moa_plan",
    "profile_window_mass",
    "random_duo_plan",
    "razor_plan_from_scores",
    "retrieval_head_scores",
    "score_retrieval_heads",
    "select_heads",
    "train_duo_gates",
    "window_density",
]

METHODS = ("duo", "razor", "moa")


def model_sites(model: nn.Module, example_inputs: dict[str, Any] | None = None) -> list[SiteInfo]:
    """The model's attention sites as the detector finds them (a short random prompt by default)."""
    if example_inputs is None:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        if not vocab:
            raise ValueError(
                f"cannot invent example inputs for {type(model).__name__} (no config.vocab_size); "
                "pass example_inputs={'input_ids': ...}"
            )
        gen = torch.Generator().manual_seed(0)
        example_inputs = {"input_ids": torch.randint(0, vocab, (1, 16), generator=gen)}
    sites = [SiteInfo.of(s) for _, det in detect(model, example_inputs) for s in det.sites]
    if not sites:
        raise ValueError(f"{type(model).__name__} has no attention sites lcpass can find; nothing to calibrate")
    return sites


def model_fingerprint(
    model: nn.Module, sites: Sequence[SiteInfo] | None = None, name: str = ""
) -> ModelFingerprint:
    """`ModelFingerprint.of_model` with the detected sites (detected now when not given)."""
    if sites is None:
        sites = model_sites(model)
    return ModelFingerprint.of_model(model, sites, name or _model_name(model))


def check_plan(plan: Plan, model: nn.Module, sites: Sequence[SiteInfo] | None = None) -> None:
    """Refuse `plan` on `model` when made for another model: ValueError naming the first difference
    (architecture, a site's heads, the number of sites, or the attention weights)."""
    plan.validate(model_fingerprint(model, sites))


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "")


def random_duo_plan(
    sites: Sequence[SiteInfo],
    ratio: float,
    sink: int = 64,
    recent: int = 256,
    by_kv_head: bool = True,
    seed: int = 0,
    fingerprint: ModelFingerprint | None = None,
) -> Plan:
    """A DuoAttention plan with the same number of retrieval heads as a calibrated one, chosen at
    random (the baseline calibration must beat)."""
    gen = torch.Generator().manual_seed(seed)
    rand = [torch.rand(s.n_heads, generator=gen) for s in sites]
    width = max(s.n_heads for s in sites)
    scores = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rand])
    if len({s.n_heads for s in sites}) != 1:
        raise ValueError("random_duo_plan: sites with different head counts are not supported")
    return duo_plan_from_scores(sites, scores, ratio, sink, recent, by_kv_head, fingerprint)


def moa_plan(
    sites: Sequence[SiteInfo],
    windows: torch.Tensor,
    sink: int = 64,
    fingerprint: ModelFingerprint | None = None,
) -> Plan:
    """A MoA plan: head h of site s keeps `sink` sinks and a fixed window `windows[s, h]` (beta = 0)."""
    plan: dict[str, SitePlan] = {}
    for s, row in zip(sites, windows.tolist()):
        specs = tuple(HeadSpec("moa", {"alpha": float(w), "beta": 0.0, "sink": sink}) for w in row[: s.n_heads])
        plan[s.name] = SitePlan(specs[:1]) if len(set(specs)) == 1 else SitePlan(specs)
    result = Plan(plan, fingerprint or ModelFingerprint.from_sites(sites))
    result.validate(sites)
    return result


def _order_scores(sites: Sequence[SiteInfo], names: Sequence[str], scores: torch.Tensor) -> torch.Tensor:
    """Reorder per-site rows (named `names`) into the detector's site order; unseen sites raise."""
    row = {n: i for i, n in enumerate(names)}
    missing = [s.name for s in sites if s.name not in row]
    if missing:
        raise ValueError(
            f"calibration saw no attention call for sites {missing[:4]}; the detected sites and the model's "
            "attention modules disagree (is this a transformers model whose attention goes through "
            "config._attn_implementation?)"
        )
    return torch.stack([scores[row[s.name]] for s in sites])


def calibrate(
    model: nn.Module,
    method: Literal["duo", "razor", "moa"] = "duo",
    data: Any = None,
    tokenizer: Any = None,
    retrieval_ratio: float = 0.5,
    *,
    mode: Literal["score", "optimize"] = "score",
    density: float = 0.5,
    lengths: Sequence[int] = (1024,),
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    sink: int = 64,
    recent: int = 256,
    by_kv_head: bool | None = None,
    steps: int = 8,
    l1: float = 0.05,
    razor_params: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
    example_inputs: dict[str, Any] | None = None,
    name: str = "",
    scores: torch.Tensor | None = None,
) -> Plan:
    """Calibrate `model` and return a plan for `method` ("duo", "razor" or "moa").

    Args:
        model: a transformers model (its attention must go through ``config._attn_implementation``).
        method: "duo" (DuoAttention: retrieval heads full, others sink + recent), "razor"
            (RazorAttention: retrieval heads keep the whole cache), "moa" (per-head windows).
        data: optional calibration texts or [1, S] token-id tensors; duo/razor hide random needles in
            them, moa profiles attention on them. Default: synthetic prompts from the tokenizer.
        tokenizer: the model's tokenizer, used to build prompts in its language. Without a tokenizer and
            data, random-token prompts are used and a UserWarning says so.
        retrieval_ratio: duo/razor: share of heads (KV heads for GQA, see `by_kv_head`) kept full.
        mode: duo/razor: "score" ranks heads by the retrieval-head copy-paste score (fast);
            "optimize" trains DuoAttention's per-KV-head gates (`steps` prompts, `l1` penalty).
        density: moa: target average fraction of causal attention kept at the profiling length.
        lengths, depths: prompt lengths (tokens) and needle depths of the calibration prompts.
        sink, recent: duo's streaming heads; moa uses `sink` for every head.
        by_kv_head: choose per KV head (default: True when the model uses GQA, so whole KV heads can be
            evicted); False chooses query heads independently.
        razor_params: razor's other parameters (sink, threshold, ratio).
        name: the model name written in the fingerprint (default: config._name_or_path).
        scores: duo/razor: precomputed per-head scores [sites, heads] (higher = keep full), e.g. from
            `lcpass.methods.dynamic.retrieval_heads.retrieval_head_scores`; skips the measurement.

    Returns:
        A validated `Plan` with the model's full fingerprint.

    Example:
        >>> plan = calibrate(model, "duo", tokenizer=tok, retrieval_ratio=0.5, lengths=(512,))  # doctest: +SKIP
        >>> plan.validate(model_fingerprint(model))                                              # doctest: +SKIP
    """
    if method not in METHODS:
        raise ValueError(f"calibrate: method {method!r} is not calibrated; use one of {', '.join(METHODS)}")
    if mode not in ("score", "optimize"):
        raise ValueError(f"calibrate: mode {mode!r} is unknown; use 'score' or 'optimize'")
    if mode == "optimize" and method == "moa":
        raise ValueError("calibrate: mode='optimize' trains DuoAttention gates; use it with method 'duo' or 'razor'")
    if not 0.0 <= retrieval_ratio <= 1.0:
        raise ValueError(f"calibrate: retrieval_ratio={retrieval_ratio!r} must lie in [0, 1]")
    if scores is not None and (method == "moa" or mode == "optimize"):
        raise ValueError("calibrate: scores=... replaces the retrieval-head measurement; use it with "
                         "method 'duo' or 'razor' and mode 'score'")
    sites = model_sites(model, example_inputs)
    fp = ModelFingerprint.of_model(model, sites, name or _model_name(model))
    gqa = any(s.n_kv_heads < s.n_heads for s in sites)
    kv = gqa if by_kv_head is None else by_kv_head
    was_training = model.training
    model.eval()
    try:
        if method == "moa":
            return _calibrate_moa(model, sites, fp, data, tokenizer, lengths, depths, density, sink, kv, seed,
                                  progress)
        if scores is not None:
            if tuple(scores.shape) != (len(sites), max(s.n_heads for s in sites)):
                raise ValueError(
                    f"calibrate: scores have shape {tuple(scores.shape)}, expected "
                    f"({len(sites)}, {max(s.n_heads for s in sites)}) = (sites, heads)"
                )
            if method == "duo":
                return duo_plan_from_scores(sites, scores.float(), retrieval_ratio, sink, recent, kv, fp)
            return razor_plan_from_scores(sites, scores.float(), retrieval_ratio, razor_params, kv, fp)
        prompts = calibration_prompts(model, tokenizer, data, lengths, depths, seed)
        if mode == "optimize":
            trained = train_duo_gates(model, prompts, sites, sink=sink, recent=recent, steps=steps, l1=l1,
                                      progress=progress)
            gates = trained.ranking_key()
            scores = torch.stack([
                gates[i, : s.n_kv_heads].repeat_interleave(s.n_heads // s.n_kv_heads)
                for i, s in enumerate(sites)
            ])
        else:
            rs = score_retrieval_heads(model, prompts, require_copy=True, progress=progress)
            scores = _order_scores(sites, rs.sites, rs.ranking_key())
            if float(rs.hard.max()) == 0.0:
                warnings.warn(
                    "lcpass.calibrate: no head ever copied a needle token (all retrieval scores are 0); "
                    "heads are ranked by attention on the needle only — use longer or more prompts, or "
                    "mode='optimize'", UserWarning, stacklevel=2,
                )
        if method == "duo":
            return duo_plan_from_scores(sites, scores, retrieval_ratio, sink, recent, kv, fp)
        return razor_plan_from_scores(sites, scores, retrieval_ratio, razor_params, kv, fp)
    finally:
        model.train(was_training)


def _calibrate_moa(
    model: nn.Module,
    sites: list[SiteInfo],
    fp: ModelFingerprint,
    data: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    density: float,
    sink: int,
    by_kv_head: bool,
    seed: int,
    progress: bool,
) -> Plan:
    length = max(lengths)
    if data is not None:
        inputs = [ids[:length][None] for ids in _data_ids(data, tokenizer)]
    elif tokenizer is not None:
        inputs = [passkey_prompt(tokenizer, length, d, seed=seed + i).ids for i, d in enumerate(depths)]
    else:
        vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        warnings.warn(RANDOM_PROMPTS_WARNING, UserWarning, stacklevel=3)
        gen = torch.Generator().manual_seed(seed)
        inputs = [torch.randint(0, vocab, (1, length), generator=gen) for _ in depths]
    length = min(int(x.shape[-1]) for x in inputs)
    windows = candidate_windows(length)
    names, mass = profile_window_mass(model, inputs, windows, sink=sink, progress=progress)
    mass = _order_scores(sites, names, mass)
    groups = {s.n_heads // s.n_kv_heads for s in sites}
    group = groups.pop() if by_kv_head and len(groups) == 1 else 1
    chosen = allocate_windows(mass, windows, length, density, sink, group)
    return moa_plan(sites, chosen, sink, fp)
