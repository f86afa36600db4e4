"""What a matched mask means: none, causal, sliding(W), padding, bias, or custom.

Two questions decide it:

1. **What does it depend on?** Walking the mask's ancestors (not through shape reads such as
   ``sym_size``): a *user input* (an ``attention_mask``) makes it ``padding``; a *parameter* (T5's
   relative-position embedding) makes it ``bias``; neither means it is a function of positions only.
2. **What is its value on the example inputs?** A positional mask whose value equals causal, causal +
   sliding window W, or all-True is replaced by ``is_causal`` / ``window`` and the tensor is dropped;
   anything else is kept exactly. The window size is read from the value when the example is longer
   than the window, and from the mask's ``kv > q - W`` comparison constant otherwise.
3. **Is a mask built from inputs structural?** A mask that depends on a forward input is data: its
   example value decides nothing by itself. It is evaluated again with every mask-like input (bool,
   0/1 integers, 0/-inf floats) set to attend everything; causality or a window that remains and that
   the example only narrows is structure (``create_causal_mask(attention_mask)``). Anything else read
   from the example (a caller's ``[S, S]`` mask that happens to be causal, a mask materialised in an
   earlier dynamo graph, one built from positions) is a *checked* claim: the canonical op keeps only
   the tensor, and a planned method that relies on the claim checks it on every call.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from .graphinfo import constant_number, vmap_state
from .matcher import Match
from .op import positional_keep

aten = torch.ops.aten

__all__ = ["MaskInfo", "analyse_masks"]

NEG_LIMIT = -1e4  # a fill at or below this masks a score out


@dataclass(frozen=True)
class MaskInfo:
    """The meaning of one site's mask."""

    kind: str  # "none" | "causal" | "sliding" | "padding" | "bias" | "custom"
    is_causal: bool
    window: int  # -1 for none
    keep_tensor: bool  # whether the mask tensor must stay in the canonical op
    # is_causal / window were read from a forward input's example value: the canonical op keeps only the
    # tensor (exact for any value); the planner may use the claim, the planned op checks it on every call
    checked: bool = False

    @property
    def label(self) -> str:
        if self.kind == "sliding":
            return f"sliding({self.window})"
        if self.kind in ("padding", "bias") and self.is_causal:
            claim = f"sliding({self.window})" if self.window >= 0 else "causal"
            return f"{claim}{'?' if self.checked else ''}+{self.kind}"
        return self.kind

    @property
    def op_causal(self) -> tuple[bool, int]:
        """(is_causal, window) the canonical op may impose: structure only, never a checked claim."""
        return (False, -1) if self.checked else (self.is_causal, self.window)


_SHAPE_READS = {aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default, aten.sym_stride.int}
_COMPARE = {
    "gt": (aten.gt.Tensor, aten.gt.Scalar, operator.gt, torch.gt),
    "ge": (aten.ge.Tensor, aten.ge.Scalar, operator.ge, torch.ge),
    "lt": (aten.lt.Tensor, aten.lt.Scalar, operator.lt, torch.lt),
    "le": (aten.le.Tensor, aten.le.Scalar, operator.le, torch.le),
}
_SUB = (aten.sub.Tensor, aten.sub.Scalar, operator.sub, torch.sub)


def _is_shape_read(n: Node) -> bool:
    if n.op == "call_function" and n.target in _SHAPE_READS:
        return True
    if n.op == "call_method" and n.target in ("size", "dim", "numel"):
        return True
    return n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in ("shape", "dtype", "device")


def _ancestors(roots: Iterable[Node], through_shapes: bool) -> set[Node]:
    seen: set[Node] = set()
    stack = [r for r in roots if isinstance(r, Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if not through_shapes and _is_shape_read(n):
            continue
        stack.extend(n.all_input_nodes)
    return seen


class _PartialRun(Interpreter):
    """Run only the nodes in ``needed`` (and the placeholders), and every vmap level change: a mask built
    with ``torch.vmap`` (T5Gemma2's) leaves the levels (and vmap's decompositions) a global state its
    batch-dim ops depend on: they are set up and closed as in the full graph."""

    def __init__(self, gm: GraphModule, needed: set[Node]):
        super().__init__(gm, garbage_collect_values=False)
        self.needed = needed
        self.depth = 0

    def run_node(self, n: Node) -> Any:
        step = vmap_state(n)
        if n.op == "placeholder" or n in self.needed or step is not None:
            out = super().run_node(n)
            self.depth += step or 0
            return out
        return None


def _evaluate(gm: GraphModule, nodes: Sequence[Node], flat_inputs: Sequence[Any]) -> dict[Node, Any]:
    needed = _ancestors(nodes, through_shapes=True)
    run = _PartialRun(gm, needed)
    try:
        with torch.no_grad():
            run.run(*flat_inputs, enable_io_processing=False)
    except RuntimeError:
        # a state the skipped nodes set up (functorch's vmap plumbing, T5Gemma2's masks): run everything
        for _ in range(run.depth):  # close the vmap levels the partial run left open
            torch._C._functorch._vmap_decrement_nesting()
        run = _PartialRun(gm, set(gm.graph.nodes))
        with torch.no_grad():
            run.run(*flat_inputs, enable_io_processing=False)
    return {n: run.env.get(n) for n in nodes}


def _window_constants(mask_nodes: Iterable[Node]) -> set[int]:
    """W for every ``kv > q - W`` (or ``>=``: W+1) comparison among the mask's ancestors."""
    found: set[int] = set()
    for n in _ancestors(mask_nodes, through_shapes=False):
        if n.op != "call_function":
            continue
        for name, targets in _COMPARE.items():
            if n.target not in targets:
                continue
            for a in n.args[:2]:
                if isinstance(a, Node) and a.op == "call_function" and a.target in _SUB:
                    c = constant_number(a.args[1]) if len(a.args) > 1 else None
                    if c is not None and c >= 1 and float(c).is_integer():
                        found.add(int(c) + (1 if name in ("ge", "le") else 0))
    return found


def _combined(m: Match, values: dict[Node, Any]) -> Optional[torch.Tensor]:
    """The mask as one float tensor: 0 = attend, -inf = masked, anything else = bias."""
    def layout(node: Node, t: torch.Tensor) -> torch.Tensor:
        for pre, post in m.term_views.get(node, ()):
            t = t.expand(pre).reshape(post)
        return t

    total: Optional[torch.Tensor] = None
    for node, coef in m.bias:
        t = values[node]
        if not isinstance(t, torch.Tensor):
            return None
        t = layout(node, t).float() * coef
        total = t if total is None else total + t
    for node, negate in m.keep:
        c = values[node]
        if not isinstance(c, torch.Tensor):
            return None
        c = layout(node, c)
        keep = ~c.bool() if negate else c.bool()
        neg = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
        total = neg if total is None else total + neg
    if total is not None:
        total = total.masked_fill(total <= NEG_LIMIT, float("-inf"))
    return total


def _positional(keep: torch.Tensor, window_candidates: set[int]) -> Optional[tuple[bool, int]]:
    """(is_causal, window) when a [..., Sq, Sk] keep mask is the same positional pattern everywhere."""
    sq, sk = keep.shape[-2], keep.shape[-1]
    flat = keep.reshape(-1, sq, sk)
    first = flat[0]
    if not bool((flat == first).all()):
        return None
    if bool(first.all()):
        return (False, -1)
    causal = positional_keep(sq, sk, True, -1)
    if bool((first == causal).all()):
        bigger = sorted(w for w in window_candidates if w >= sk)
        return (True, bigger[0]) if len(window_candidates) == 1 and bigger else (True, -1)
    last_row = int(first[-1].sum())
    if last_row >= 1:
        windowed = positional_keep(sq, sk, True, last_row)
        if bool((first == windowed).all()):
            return (True, last_row)
    return None


def _implied(keep: torch.Tensor, window_candidates: set[int]) -> tuple[bool, int]:
    """(is_causal, window) that a data-dependent keep mask already implies (so applying them is exact)."""
    sq, sk = keep.shape[-2], keep.shape[-1]
    causal = positional_keep(sq, sk, True, -1)
    if bool((keep & ~causal).any()):
        return (False, -1)
    for w in sorted(window_candidates):
        if not bool((keep & ~positional_keep(sq, sk, True, w)).any()):
            return (True, w)
    return (True, -1)


def _mask_like(x: Any) -> Optional[torch.Tensor]:
    """For a forward input that looks like a mask, the same input attending everything; else None.

    Mask-like: bool; 0/1 integers with at least two dims (``attention_mask [B, S]``); floats that are 0
    or a huge negative (an additive mask). Token ids, positions and features are not."""
    if not isinstance(x, torch.Tensor) or x.numel() == 0:
        return None
    if x.dtype == torch.bool:
        return torch.ones_like(x)
    if not x.is_floating_point() and x.dim() >= 2:
        return torch.ones_like(x) if bool(((x == 0) | (x == 1)).all()) else None
    if x.is_floating_point() and x.dim() >= 2:
        return torch.zeros_like(x) if bool(((x == 0) | (x <= NEG_LIMIT)).all()) else None
    return None


def _attend_all_inputs(gm: GraphModule, flat_inputs: Sequence[Any], params: set[str]) -> tuple[list[Any], set[str]]:
    """``flat_inputs`` with every mask-like forward input replaced by one that attends everything, and
    the names of the placeholders replaced."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out, replaced = list(flat_inputs), set()
    for i, (node, x) in enumerate(zip(holders, flat_inputs)):
        if node.name in params or "_buffers_" in node.name or "_parameters_" in node.name:
            continue
        alt = _mask_like(x)
        if alt is not None:
            out[i] = alt
            replaced.add(node.name)
    return out, replaced


def _structural(m: Match, combined: Optional[torch.Tensor], attend_all: dict[Node, Any],
                window_candidates: set[int], claim: tuple[bool, int]) -> bool:
    """Whether the causality / window ``claim`` of a mask built from forward inputs holds for *any* value
    of those inputs, not only the example's. Every input the mask depends on must be mask-like; set to
    attend everything, the mask is evaluated again: what remains is built from shapes and constants (the
    causal part of ``create_causal_mask(attention_mask)``) and the example input may only take keys away
    from it. A caller's ``[S, S]`` mask that happens to be causal on the example is data: nothing remains.
    """
    if not attend_all:
        return False
    alt = _combined(m, attend_all)
    if alt is None or combined is None or alt.shape != combined.shape:
        return False
    keep_alt = torch.isfinite(alt)
    if bool((torch.isfinite(combined) & ~keep_alt).any()):
        return False  # the example input lets a query see a key the structure alone hides
    return _positional(keep_alt, window_candidates) == claim


def _is_param_node(gm: GraphModule, n: Node, params: set[str]) -> bool:
    """A learned parameter (not a buffer or constant: a registered causal-mask buffer is positional)."""
    if n.op == "placeholder":
        return n.name in params
    if n.op == "get_attr":
        try:
            return isinstance(gm.get_parameter(str(n.target)), torch.nn.Parameter)
        except AttributeError:
            return False
    return False


def analyse_masks(
    gm: GraphModule,
    matches: Sequence[Match],
    flat_inputs: Optional[Sequence[Any]],
    param_placeholders: Iterable[str] = (),
) -> list[MaskInfo]:
    """One :class:`MaskInfo` per match, in order."""
    terms = [n for m in matches for n in [b for b, _ in m.bias] + [c for c, _ in m.keep] if isinstance(n, Node)]
    values: dict[Node, Any] = {}
    params = set(param_placeholders)
    attend_all: dict[Node, Any] = {}  # the masks with every mask-like input attending everything
    replaced: set[str] = set()
    if terms and flat_inputs is not None:
        values = _evaluate(gm, terms, flat_inputs)
        alt, replaced = _attend_all_inputs(gm, flat_inputs, params)
        if replaced:
            try:
                attend_all = _evaluate(gm, terms, alt)
            except Exception:  # noqa: BLE001 - cannot tell structure from data: every claim is checked
                attend_all = {}
    out: list[MaskInfo] = []
    for m in matches:
        nodes = [b for b, _ in m.bias] + [c for c, _ in m.keep]
        if not nodes:
            out.append(MaskInfo("causal" if m.is_causal else "none", m.is_causal, -1, False))
            continue
        deps = _ancestors(nodes, through_shapes=False)
        # dynamo lifts buffers to placeholders too: a registered mask buffer is a constant, not input
        inputs = {n.name for n in deps if n.op == "placeholder" and n.name not in params
                  and "_buffers_" not in n.name and "_parameters_" not in n.name}
        user = bool(inputs)
        param = any(_is_param_node(gm, n, params) for n in deps)
        combined = _combined(m, values) if values else None
        pattern = None
        pure = False
        if combined is not None:
            finite = combined[torch.isfinite(combined)]
            pure = bool((finite == 0).all())
            pattern = _positional(torch.isfinite(combined), _window_constants(nodes))
        causal, window = pattern if pattern is not None else (False, -1)
        if pattern is None and combined is not None and (user or param):
            causal, window = _implied(torch.isfinite(combined), _window_constants(nodes))
        # a claim read from an input's example value is data: checked on every call, never structure
        checked = user and (causal or window >= 0) and not (
            inputs <= replaced and _structural(m, combined, attend_all, _window_constants(nodes), (causal, window)))
        if m.is_causal:  # SDPA's own flag on top of a mask is not combinable in torch; keep it exact
            causal, checked = True, False
        if user and (combined is None or pure):
            out.append(MaskInfo("padding", causal, window, True, checked))
        elif param or (combined is not None and not pure):
            out.append(MaskInfo("bias", causal, window, True, checked))
        elif pattern is None:
            out.append(MaskInfo("custom", False, -1, True))
        elif not causal:
            out.append(MaskInfo("none", False, -1, False))
        else:
            out.append(MaskInfo("sliding" if window >= 0 else "causal", True, window, False))
    return out
