"""The architecture sweep: every architecture of :mod:`lcpass.zoo.auto`, checked against the eager oracle.

For one architecture and attention implementation, :func:`check` runs, in order, and stops at the first
check that fails:

1. **build** the tiny model (:func:`lcpass.zoo.auto.build`);
2. **oracle** — the attention computations of the eager forward (:mod:`lcpass.oracle`); none at all
   is the principled "no attention" outcome (a convnet, an SSM): ``optimize`` must then leave the model
   alone;
3. **detect** — exactly as many canonical sites as the oracle counted, each with the oracle's mask
   (``is_causal`` / ``window``);
4. **graph** — the captured graph with canonical sites reproduces the eager output (<= 1e-5, relative
   to the output's scale where it exceeds 1);
5. **dense** — ``lcpass.optimize(method="dense")`` keeps the class and the output (<= 1e-5);
6. **sparse** — a sparse plan (StreamingLLM sink 2 + window 4 on causal sites, LongLoRA's S²-Attn
   groups of 4 on bidirectional self-attention, cross-attention dense) changes the output and equals
   the model's own forward with each attention's scores restricted to that method's keep-mask, written
   out here (:func:`streaming_keep`, :func:`groups_keep`);
7. **generate** (generative tasks) — ``generate()`` after ``optimize`` runs and returns new tokens.

``lcpass.optimize`` raising :class:`lcpass.UnsupportedModelError` is the "refused" outcome, with its
reason. The result of a check is a :class:`Coverage` row; ``scripts/coverage.py`` prints them all as
``docs/COVERAGE.md``.

Example::

    >>> from lcpass.zoo.auto import architectures
    >>> row = check(next(a for a in architectures() if a.model_type == "llama"))
    >>> row.status, row.n_attention
    ('exact', 2)
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

import lcpass
from lcpass.capture import capture_dynamo
from lcpass.inspect import detect
from lcpass.oracle import AttentionCall, attention_calls, first_tensor, masked_forward
from lcpass.plan import HeadSpec, Plan, SitePlan
from lcpass.zoo.auto import Arch, BuildError, TinyModel, build

__all__ = ["Coverage", "check", "streaming_keep", "groups_keep", "STATUSES", "SINK", "WINDOW", "GROUP",
           "TOL_EXACT", "TOL_SPARSE"]

STATUSES = ("exact", "no-attention", "already-sparse", "refused", "wrong", "error", "not-built")
SINK, WINDOW, GROUP = 2, 4, 4  # the sparse plan's parameters (tiny, so they bite at 19 tokens)
TOL_EXACT, TOL_SPARSE = 1e-5, 1e-4


@dataclass
class Coverage:
    """One architecture x attention implementation: what the sweep found."""

    model_type: str
    task: str
    class_name: str
    attn_impl: str
    status: str  # one of STATUSES
    reason: str = ""  # why, for anything but "exact"
    n_attention: int = -1  # attention computations the oracle counted
    sites: list[str] = field(default_factory=list)  # detected masks
    routes: list[str] = field(default_factory=list)  # how the transformers door reached each site
    errors: dict[str, float] = field(default_factory=dict)  # max abs errors of the numeric checks
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def streaming_keep(sink: int = SINK, window: int = WINDOW):
    """StreamingLLM's keep-mask written out: causal, and the key is a sink or within the window."""
    def keep(sq: int, sk: int, n_heads: int) -> torch.Tensor:
        i = torch.arange(sq)[:, None] + (sk - sq)
        j = torch.arange(sk)[None, :]
        return ((j <= i) & ((j < sink) | (i - j < window)))[None]
    return keep


def groups_keep(group: int = GROUP):
    """LongLoRA's S²-Attn keep-mask written out (bidirectional): the same group of ``group`` tokens, the
    groups of the second half of the heads shifted by group/2."""
    def keep(sq: int, sk: int, n_heads: int) -> torch.Tensor:
        i = torch.arange(sq)[:, None] + (sk - sq)
        j = torch.arange(sk)[None, :]
        out = []
        for h in range(n_heads):
            shift = group // 2 if h >= (n_heads + 1) // 2 else 0
            out.append(torch.div(i - shift, group, rounding_mode="floor")
                       == torch.div(j - shift, group, rounding_mode="floor"))
        return torch.stack(out)
    return keep


def _site_pattern(site: Any, sk: int) -> str:
    """What the oracle should see for a detected site (windows the sequence cannot show read as causal)."""
    if not site.is_causal:
        return "none" if site.window < 0 else f"window({site.window})"
    if 0 <= site.window < sk:
        return f"sliding({site.window})"
    if 1 <= site.chunk < sk:
        return f"chunked({site.chunk})"
    return "causal"


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _generate_prompt(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The first sample of the forward's inputs, as ``generate`` takes them. Pop2Piano's ``generate`` requires
    ``input_features`` (its encoder's input embeddings) where its forward takes ``input_ids``: those are the
    embeddings of the same tokens."""
    import inspect

    config = getattr(model, "config", None)
    # MusicGen's token rows are (sample, codebook) pairs: its one sample is num_codebooks rows
    rows = int(getattr(getattr(config, "decoder", config), "num_codebooks", 1) or 1)
    prompt = {k: v[:rows] for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    required = [p.name for p in inspect.signature(model.generate).parameters.values()
                if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    if "input_features" in required and "input_features" not in prompt and "input_ids" in prompt:
        with torch.no_grad():
            prompt["input_features"] = model.get_input_embeddings()(prompt.pop("input_ids"))
    return prompt


def _exact_tol(ref: torch.Tensor) -> float:
    """:data:`TOL_EXACT`, relative to the output's scale once it exceeds 1 (mT5's unscaled logits reach 50:
    fp32 rounding of a reordered sum there is ~1e-5 absolute, 4e-7 relative)."""
    scale = float(ref.detach().abs().max()) if ref.numel() and ref.is_floating_point() else 1.0
    return TOL_EXACT * max(1.0, scale)


def _softmax_shape(found: list, rejection: Any) -> Optional[tuple]:
    """The output shape of a rejected softmax (what the oracle records for that attention)."""
    for _, det in found:
        for n in det.gm.graph.nodes:
            if n.name == rejection.node:
                v = n.meta.get("val", n.meta.get("example_value"))
                return tuple(v.shape) if hasattr(v, "shape") else None
    return None


def _without(calls: list[AttentionCall], shapes: list[Optional[tuple]]) -> list[AttentionCall]:
    """``calls`` less one call of each of ``shapes`` (the attention a model computes sparsely itself)."""
    left = list(shapes)
    kept = []
    for c in calls:
        if tuple(c.shape) in left:
            left.remove(tuple(c.shape))
        else:
            kept.append(c)
    return kept if not left else calls


def _plan_for(sites: list[Any], calls: list[AttentionCall]):
    """The sparse plan of the sweep and the keep-mask of each attention call."""
    plan_sites, keeps, heads = {}, {}, {}
    for i, (site, call) in enumerate(zip(sites, calls)):
        sq, sk = call.shape[-2], call.shape[-1]
        if site.is_causal:
            plan_sites[site.name] = SitePlan((HeadSpec("streaming", {"sink": SINK, "window": WINDOW}),))
            keeps[call.index] = streaming_keep()
        elif sq == sk and site.window < 0:
            plan_sites[site.name] = SitePlan((HeadSpec("longlora", {"group_size": GROUP, "causal": False}),))
            keeps[call.index] = groups_keep()
        heads[call.index] = site.n_heads
    return Plan(plan_sites), keeps, heads


def _graph_error(model, inputs, found, ref) -> float:
    """Max abs difference the canonical sites make: against the eager output (export), or, for dynamo's
    graphs (export failed), each canonical graph against the same graph captured again untouched."""
    cap = found[0][0]
    with torch.no_grad():
        if cap.route == "export":
            return _max_err(first_tensor(cap.gm(**cap.extra["kwargs"])), ref)
        raw = capture_dynamo(model, (), {**inputs, "use_cache": False})
        errs = [0.0]
        for (c, _), r in zip(found, raw):
            for a, b in zip(torch.utils._pytree.tree_leaves(c.gm(*c.flat_inputs)),
                            torch.utils._pytree.tree_leaves(r.gm(*r.flat_inputs))):
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    errs.append(_max_err(a, b))
        return max(errs)


def _fresh(arch: Arch, impl: Optional[str]) -> TinyModel:
    return build(arch, impl)


def check(arch: Arch, attn_implementation: Optional[str] = None, *, generate: bool = True) -> Coverage:
    """Run the sweep's checks on ``arch`` (see the module docstring); never raises."""
    t0 = time.perf_counter()
    row = Coverage(arch.model_type, arch.task, arch.class_name, attn_implementation or "default", "error")
    try:
        _check(arch, attn_implementation, row, generate)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure is the "error" outcome, with its reason
        row.status, row.reason = "error", f"{type(exc).__name__}: {_first_line(exc)}"
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _check(arch: Arch, impl: Optional[str], row: Coverage, generate: bool) -> None:
    try:
        tiny = _fresh(arch, impl)
    except BuildError as exc:
        row.status, row.reason = "not-built", str(exc)
        return
    row.attn_impl = tiny.attn_impl
    model, inputs = tiny.model, tiny.inputs
    calls, ref = attention_calls(model, inputs)
    row.n_attention = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not calls:
            out = lcpass.optimize(model, method="dense", example_inputs=inputs)
            row.status = "no-attention" if out is model and not hasattr(model, "lcpass_report") else "wrong"
            row.reason = "" if row.status == "no-attention" else "optimize changed a model without attention"
            return
        found = detect(model, inputs)
        sites = [s for _, det in found for s in det.sites]
        row.sites = [s.mask for s in sites]
        sparse = [r for _, det in found for r in det.rejected if r.reason.startswith("already sparse")]
        if sparse and sites:
            # the rest of the model (LED's decoder next to its banded encoder) is checked as usual
            kept = _without(calls, [_softmax_shape(found, r) for r in sparse])
            if len(kept) == len(sites):
                calls = kept
                row.reason = f"{len(sparse)} attention(s) {sparse[0].reason.split(';')[0]}; the rest checked"
        if sparse and not sites and len(sparse) == len(calls):
            # the model computes this attention sparsely itself (BigBird's blocks, Longformer's bands): it
            # keeps its own code; optimize must say so and leave the output exactly as it was
            out = lcpass.optimize(model, method="dense", example_inputs=inputs)
            with torch.no_grad():
                row.errors["dense"] = _max_err(first_tensor(out(**inputs)), ref)
            ok = row.errors["dense"] <= _exact_tol(ref)
            row.status = "already-sparse" if ok else "wrong"
            row.reason = sparse[0].reason if ok else f"optimize changes the output by {row.errors['dense']:.2e}"
            return
        if len(sites) != len(calls):
            try:
                lcpass.optimize(model, method="dense", example_inputs=inputs)
            except lcpass.UnsupportedModelError as exc:
                row.status, row.reason = "refused", str(exc)
                return
            row.status = "wrong"
            row.reason = (f"detected {len(sites)} sites, the eager forward computes {len(calls)} attentions "
                          f"({', '.join(c.pattern for c in calls)}) and optimize does not refuse it")
            return
        for site, call in zip(sites, calls):
            want = call.pattern
            got = _site_pattern(site, call.shape[-1])
            if want in ("varies", "other") and site.mask.split("+")[0] not in ("causal", "none", "sliding") \
                    or re.sub(r"^window", "sliding", got) == want or (want == "none" and got == "none"):
                continue
            plan, _, _ = _plan_for(sites, calls)
            try:
                lcpass.optimize(_fresh(arch, impl).model, plan=plan, example_inputs=inputs, dense_below=0)
            except lcpass.UnsupportedModelError as exc:
                row.status, row.reason = "refused", str(exc)
                return
            row.status = "wrong"
            row.reason = (f"site {site.name}: detected as {site.mask} ({got}), the eager forward attends {want}, "
                          "and optimize does not refuse it")
            return
        row.errors["graph"] = _graph_error(model, inputs, found, ref)
        tol = _exact_tol(ref)
        if row.errors["graph"] > tol:
            row.status, row.reason = "wrong", f"the canonical graph changes the output by {row.errors['graph']:.2e}"
            return
        try:
            dense = lcpass.optimize(model, method="dense", example_inputs=inputs)
        except lcpass.UnsupportedModelError as exc:
            row.status, row.reason = "refused", str(exc)
            return
        if type(dense) is not type(model):
            row.status, row.reason = "wrong", f"optimize returned {type(dense).__name__}, not {type(model).__name__}"
            return
        row.routes = list(getattr(dense.lcpass_report, "routes", {}).values())
        with torch.no_grad():
            row.errors["dense"] = _max_err(first_tensor(dense(**inputs)), ref)
        if row.errors["dense"] > tol:
            row.status = "wrong"
            row.reason = f"optimize(method='dense') changes the output by {row.errors['dense']:.2e}"
            return
        # sparse: a fresh model (optimize switched this one in place)
        tiny = _fresh(arch, impl)
        model = tiny.model
        plan, keeps, heads = _plan_for(sites, calls)
        if not keeps:
            row.status = "exact"
            row.reason = "no site takes a sparse method (cross-attention only)"
            return
        want = masked_forward(model, inputs, keeps, heads)
        try:
            sparse = lcpass.optimize(model, plan=plan, example_inputs=inputs, dense_below=0)
        except lcpass.UnsupportedModelError as exc:
            row.status, row.reason = "refused", str(exc)
            return
        with torch.no_grad():
            got = first_tensor(sparse(**inputs))
        row.errors["sparse_vs_reference"] = _max_err(got, want)
        row.errors["sparse_vs_dense"] = _max_err(got, ref)
        if _max_err(want, ref) <= 1e-6:
            # the model's own forward with the keep-masks applied gives its dense output: at this size the
            # output does not depend on what the masks cut (MobileViT's logits are constant at init), so the
            # output cannot show whether the method ran; the probe's per-site counters did
            row.reason = "the output does not depend on the masked scores at this size (sparse check vacuous)"
        elif row.errors["sparse_vs_dense"] <= 1e-6:
            row.status, row.reason = "wrong", "the sparse plan leaves the output unchanged (the method never ran)"
            return
        if row.errors["sparse_vs_reference"] > TOL_SPARSE:
            row.status = "wrong"
            row.reason = (f"the sparse plan differs from the masked eager reference by "
                          f"{row.errors['sparse_vs_reference']:.2e}")
            return
        if generate and arch.generative and hasattr(sparse, "generate"):
            prompt = _generate_prompt(sparse, inputs)
            try:
                with torch.no_grad():
                    out = sparse.generate(**prompt, max_new_tokens=3, do_sample=False, min_new_tokens=3)
            except Exception as exc:  # noqa: BLE001 - lcpass's failure only if the original model generates
                plain = _fresh(arch, impl).model
                try:
                    with torch.no_grad():
                        plain.generate(**prompt, max_new_tokens=3, do_sample=False, min_new_tokens=3)
                except Exception as own:  # noqa: BLE001 - the tiny model's generate() fails by itself
                    row.status = "exact"
                    row.reason = (f"generate() not checked: it fails on the unoptimized tiny model too "
                                  f"({type(own).__name__}: {_first_line(own)[:120]})")
                    return
                raise exc
            n_in = prompt.get("input_ids", prompt.get("decoder_input_ids"))
            if not isinstance(out, torch.Tensor) or (n_in is not None and out.shape[-1] < 3):
                row.status, row.reason = "wrong", "generate() after optimize returned no new tokens"
                return
    row.status = "exact"  # (a reason set above says which attention is already sparse)
