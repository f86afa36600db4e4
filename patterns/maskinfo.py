"""What a matched mask means: none, causal, sliding(W), chunked(C), padding, bias, or custom.

Two questions decide it:

1. **What does it depend on?** Walking the mask's ancestors (not through shape reads such as
   ``sym_size``): a *user input* (an ``attention_mask``) makes it ``padding``; a *parameter* (T5's
   relative-position embedding) makes it ``bias``; neither means it is a function of positions only.
2. **What is its value on the example inputs?** A positional mask whose value equals causal, causal +
   sliding window W, causal within chunks of C (Llama-4), or all-True is replaced by ``is_causal`` /
   ``window`` / ``chunk`` and the tensor is dropped; anything else is kept exactly. The window size is
   read from the value when the example is longer than the window, and from the mask's ``kv > q - W``
   comparison constant otherwise; the chunk size likewise, or from an ``a // C == b // C`` comparison
   (a chunk longer than the example reads as causal on the example only).
3. **Is a mask built from inputs structural?** A mask that depends on a forward input is data: its
   example value decides nothing by itself. It is evaluated again with every mask-like input (bool,
   0/1 integers, 0/-inf floats) set to attend everything; causality or a window that remains and that
   the example only narrows is structure (``create_causal_mask(attention_mask)``). Anything else read
   from the example (a caller's ``[S, S]`` mask that happens to be causal, a mask materialised in an
   earlier dynamo graph, one built from positions) is a *checked* claim: the canonical op keeps only
   the tensor, and a planned method that relies on the claim checks it on every call. Chunks are not
   shift-invariant: they are structure only if they also move with left padding (evaluated once more
   with the first key of every mask-like input padded), as the canonical op's chunks do.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from .graphinfo import constant_number, shape_of, vmap_state
from .op import chunk_start, positional_keep
from .records import Match

aten = torch.ops.aten

__all__ = ["MaskInfo", "analyse_masks", "positional_label", "read_positional"]

NEG_LIMIT = -1e4  # a fill at or below this masks a score out


@dataclass(frozen=True)
class MaskInfo:
    """The meaning of one site's mask."""

    kind: str  # "none" | "causal" | "sliding" | "chunked" | "padding" | "bias" | "custom"
    is_causal: bool
    window: int  # -1 for none
    keep_tensor: bool  # whether the mask tensor must stay in the canonical op
    # is_causal / window / chunk were read from a forward input's example value: the canonical op keeps
    # only the tensor (exact for any value); the planner may use the claim, the planned op checks it on
    # every call
    checked: bool = False
    chunk: int = -1  # -1 for none

    @property
    def label(self) -> str:
        if self.kind in ("sliding", "chunked"):
            return positional_label(self.is_causal, self.window, self.chunk)
        if self.kind in ("padding", "bias") and self.is_causal:
            return f"{positional_label(self.is_causal, self.window, self.chunk)}{'?' if self.checked else ''}+{self.kind}"
        return self.kind

    @property
    def op_causal(self) -> tuple[bool, int, int]:
        """(is_causal, window, chunk) the canonical op may impose: structure only, never a checked claim."""
        return (False, -1, -1) if self.checked else (self.is_causal, self.window, self.chunk)


def positional_label(is_causal: bool, window: int, chunk: int = -1) -> str:
    """The mask-kind label of a positional pattern: ``causal``, ``sliding(8)``, ``chunked(4)`` (causal
    within chunks), ``none``."""
    if chunk >= 1:
        head = "chunked" if is_causal and window < 0 else f"{positional_label(is_causal, window)}&chunked"
        return f"{head}({chunk})"
    if window >= 0:
        return f"sliding({window})"
    return "causal" if is_causal else "none"


def read_positional(label: str) -> Optional[tuple[bool, int, int]]:
    """``(is_causal, window, chunk)`` of a :func:`positional_label`; None for any other label."""
    causal, window, chunk = False, -1, -1
    for part in label.split("&"):
        if part == "causal":
            causal = True
        elif part.startswith("sliding(") and part.endswith(")"):
            causal, window = True, int(part[len("sliding("):-1])
        elif part.startswith("chunked(") and part.endswith(")"):
            causal, chunk = causal or part == label, int(part[len("chunked("):-1])
        elif part != "none":
            return None
    return causal, window, chunk


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


_FLOORDIV = (aten.floor_divide.default, aten.floor_divide.Scalar, operator.floordiv, torch.floor_divide)
_EQ = (aten.eq.Tensor, operator.eq, torch.eq)


def _floordiv_by(n: Any) -> Optional[int]:
    """C for ``x // C`` (floor_divide, or ``div(..., rounding_mode='floor')``) with a constant C >= 1."""
    if not isinstance(n, Node) or n.op != "call_function" or len(n.args) < 2:
        return None
    if n.target in _FLOORDIV or (n.target in (aten.div.Tensor_mode, aten.div.Scalar_mode)
                                 and n.kwargs.get("rounding_mode") == "floor"):
        c = constant_number(n.args[1])
        return int(c) if c is not None and c >= 1 and float(c).is_integer() else None
    return None


def _chunk_constants(mask_nodes: Iterable[Node]) -> set[int]:
    """C for every ``a // C == b // C`` comparison among the mask's ancestors."""
    found: set[int] = set()
    for n in _ancestors(mask_nodes, through_shapes=False):
        if n.op == "call_function" and n.target in _EQ and len(n.args) >= 2:
            a, b = _floordiv_by(n.args[0]), _floordiv_by(n.args[1])
            if a is not None and a == b:
                found.add(a)
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
        # a mask broadcast over the queries ([B, 1, 1, Sk] padding) is read on the scores' rows: one row
        # would look like a decode step, which every key before it makes "causal"
        rows = (shape_of(m.anchor) or (None, None))[-2] if total.dim() >= 2 else None
        if total.shape[-2] == 1 and isinstance(rows, int) and rows > 1:
            total = total.expand(*total.shape[:-2], rows, total.shape[-1])
    return total


def _chunk_from_rows(first: torch.Tensor) -> Optional[int]:
    """The chunk size of a [Sq, Sk] causal-within-chunks pattern: the first query after position 0 whose
    first key is itself (None when no row restarts)."""
    sq, sk = first.shape
    pos = torch.arange(sk - sq, sk)
    starts = torch.where(first.any(-1), first.int().argmax(-1), -1)
    restart = (starts == pos) & (pos >= 1)
    return int(pos[restart][0]) if bool(restart.any()) else None


def _positional(keep: torch.Tensor, window_candidates: set[int],
                chunk_candidates: set[int] = frozenset()) -> Optional[tuple[bool, int, int]]:
    """(is_causal, window, chunk) when a [..., Sq, Sk] keep mask is the same positional pattern everywhere."""
    sq, sk = keep.shape[-2], keep.shape[-1]
    flat = keep.reshape(-1, sq, sk)
    first = flat[0]
    if not bool((flat == first).all()):
        return None
    if bool(first.all()):
        return (False, -1, -1)
    causal = positional_keep(sq, sk, True, -1)
    if bool((first == causal).all()):
        # a window or chunk longer than the example only shows in the graph's constants
        bigger = sorted(w for w in window_candidates if w >= sk)
        if len(window_candidates) == 1 and bigger:
            return (True, bigger[0], -1)
        longer = sorted(c for c in chunk_candidates if c >= sk)
        return (True, -1, longer[0]) if len(chunk_candidates) == 1 and longer else (True, -1, -1)
    last_row = int(first[-1].sum())
    if last_row >= 1:
        windowed = positional_keep(sq, sk, True, last_row)
        if bool((first == windowed).all()):
            return (True, last_row, -1)
    c = _chunk_from_rows(first)
    if c is not None and bool((first == positional_keep(sq, sk, True, -1, chunk=c)).all()):
        return (True, -1, c)
    return None


def _implied(keep: torch.Tensor, window_candidates: set[int],
             chunk_candidates: set[int] = frozenset()) -> tuple[bool, int, int]:
    """(is_causal, window, chunk) that a data-dependent keep mask already implies (so applying them is
    exact; chunks counted from each row's first attended key, as the canonical op counts them)."""
    sq, sk = keep.shape[-2], keep.shape[-1]
    causal = positional_keep(sq, sk, True, -1)
    if bool((keep & ~causal).any()):
        return (False, -1, -1)
    for w in sorted(window_candidates):
        if not bool((keep & ~positional_keep(sq, sk, True, w)).any()):
            return (True, w, -1)
    four = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape)) if keep.dim() < 4 else keep
    start = chunk_start(four)
    for c in sorted(chunk_candidates):
        if not bool((four & ~positional_keep(sq, sk, True, -1, chunk=c, start=start)).any()):
            return (True, -1, c)
    return (True, -1, -1)


def _mask_like(x: Any, pad_first: bool = False) -> Optional[torch.Tensor]:
    """For a forward input that looks like a mask, the same input attending everything (with
    ``pad_first``: everything but the first key, i.e. one token of left padding); else None.

    Mask-like: bool; 0/1 integers with at least two dims (``attention_mask [B, S]``); floats that are 0
    or a huge negative (an additive mask). Token ids, positions and features are not."""
    if not isinstance(x, torch.Tensor) or x.numel() == 0:
        return None
    if x.dtype == torch.bool:
        out, hidden = torch.ones_like(x), False
    elif not x.is_floating_point() and x.dim() >= 2 and bool(((x == 0) | (x == 1)).all()):
        out, hidden = torch.ones_like(x), 0
    elif x.is_floating_point() and x.dim() >= 2 and bool(((x == 0) | (x <= NEG_LIMIT)).all()):
        out, hidden = torch.zeros_like(x), torch.finfo(x.dtype).min
    else:
        return None
    if pad_first:
        out[..., 0] = hidden
    return out


def _attend_all_inputs(gm: GraphModule, flat_inputs: Sequence[Any], params: set[str],
                       pad_first: bool = False) -> tuple[list[Any], set[str]]:
    """``flat_inputs`` with every mask-like forward input replaced by one that attends everything (but
    the first key, with ``pad_first``), and the names of the placeholders replaced."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out, replaced = list(flat_inputs), set()
    for i, (node, x) in enumerate(zip(holders, flat_inputs)):
        if node.name in params or "_buffers_" in node.name or "_parameters_" in node.name:
            continue
        alt = _mask_like(x, pad_first)
        if alt is not None:
            out[i] = alt
            replaced.add(node.name)
    return out, replaced


def _as4d(keep: torch.Tensor) -> torch.Tensor:
    return keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape)) if keep.dim() < 4 else keep


def _chunks_move(m: Match, shifted: dict[Node, Any], chunk: int) -> bool:
    """Whether the chunks move with one token of left padding: evaluated with the first key of every
    mask-like input padded, each query after it sees exactly its causal chunk counted from key 1."""
    alt = _combined(m, shifted) if shifted else None
    if alt is None:
        return False
    keep = _as4d(torch.isfinite(alt))
    sq, sk = keep.shape[-2], keep.shape[-1]
    one = torch.ones(keep.shape[0], dtype=torch.long)
    form = positional_keep(sq, sk, True, -1, chunk=chunk, start=one) & (torch.arange(sk) >= 1)
    rows = torch.arange(sk - sq, sk) >= 1  # the padded query's own row is the model's business
    return bool((keep[..., rows, :] == form[..., rows, :]).all())


def _structural(m: Match, combined: Optional[torch.Tensor], attend_all: dict[Node, Any],
                window_candidates: set[int], claim: tuple[bool, int, int], chunk_candidates: set[int] = frozenset(),
                shifted: Optional[dict[Node, Any]] = None) -> bool:
    """Whether the causality / window / chunk ``claim`` of a mask built from forward inputs holds for
    *any* value of those inputs, not only the example's. Every input the mask depends on must be
    mask-like; set to attend everything, the mask is evaluated again: what remains is built from shapes
    and constants (the causal part of ``create_causal_mask(attention_mask)``) and the example input may
    only take keys away from it. A caller's ``[S, S]`` mask that happens to be causal on the example is
    data: nothing remains. Chunks must also move with left padding as the canonical op's do
    (:func:`_chunks_move`), and the example may only take keys away from its own rows' chunks.
    """
    if not attend_all:
        return False
    alt = _combined(m, attend_all)
    if alt is None or combined is None or alt.shape != combined.shape:
        return False
    keep_alt = torch.isfinite(alt)
    if _positional(keep_alt, window_candidates, chunk_candidates) != claim:
        return False
    example = torch.isfinite(combined)
    if claim[2] < 1:
        return not bool((example & ~keep_alt).any())  # the example sees no key the structure hides
    ex = _as4d(example)
    form = positional_keep(ex.shape[-2], ex.shape[-1], True, -1, chunk=claim[2], start=chunk_start(ex))
    return not bool((ex & ~form).any()) and _chunks_move(m, shifted or {}, claim[2])


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
    shifted: dict[Node, Any] = {}  # ... and with the first key padded (do chunks move with it?)
    replaced: set[str] = set()
    if terms and flat_inputs is not None:
        values = _evaluate(gm, terms, flat_inputs)
        alt, replaced = _attend_all_inputs(gm, flat_inputs, params)
        if replaced:
            try:
                attend_all = _evaluate(gm, terms, alt)
            except Exception:  # noqa: BLE001 - cannot tell structure from data: every claim is checked
                attend_all = {}
            chunked = [n for m in matches for n in [b for b, _ in m.bias] + [c for c, _ in m.keep]
                       if _chunk_constants([n])]
            if attend_all and chunked:
                try:
                    shifted = _evaluate(gm, terms, _attend_all_inputs(gm, flat_inputs, params, pad_first=True)[0])
                except Exception:  # noqa: BLE001 - chunks that cannot be shown to move are checked claims
                    shifted = {}
    out: list[MaskInfo] = []
    for m in matches:
        nodes = [b for b, _ in m.bias] + [c for c, _ in m.keep]
        if not nodes:
            out.append(MaskInfo("causal" if m.is_causal else "none", m.is_causal, -1, False))
            continue
        chunks = _chunk_constants(nodes)
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
            pattern = _positional(torch.isfinite(combined), _window_constants(nodes), chunks)
        causal, window, chunk = pattern if pattern is not None else (False, -1, -1)
        if pattern is None and combined is not None and (user or param):
            causal, window, chunk = _implied(torch.isfinite(combined), _window_constants(nodes), chunks)
        # a claim read from an input's example value is data: checked on every call, never structure
        checked = user and (causal or window >= 0 or chunk >= 1) and not (
            inputs <= replaced and _structural(m, combined, attend_all, _window_constants(nodes),
                                               (causal, window, chunk), chunks, shifted))
        if m.is_causal:  # SDPA's own flag on top of a mask is not combinable in torch; keep it exact
            causal, checked = True, False
        if user and (combined is None or pure):
            out.append(MaskInfo("padding", causal, window, True, checked, chunk))
        elif param or (combined is not None and not pure):
            out.append(MaskInfo("bias", causal, window, True, checked, chunk))
        elif pattern is None:
            out.append(MaskInfo("custom", False, -1, True))
        elif not causal:
            out.append(MaskInfo("none", False, -1, False))
        else:
            kind = "chunked" if chunk >= 1 else "sliding" if window >= 0 else "causal"
            out.append(MaskInfo(kind, True, window, False, chunk=chunk))
    return out
