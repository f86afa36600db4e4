"""Attention hidden inside opaque calls, lowered to plain ops the matcher can read.

Dynamo hands a backend ``F.multi_head_attention_forward`` and the fused
``torch._transformer_encoder_layer_fwd`` as single calls; ``symbolic_trace`` keeps every
``nn.MultiheadAttention`` as a leaf ``call_module``. :func:`lower_opaque` replaces each by the same
computation written with plain tensor ops (in-projection, ``q @ kᵀ * scale + mask``, softmax, ``@ v``,
out-projection), traced with ``torch.fx`` and inlined, so its attention becomes an ordinary canonical
site. Forms it cannot reproduce exactly (``add_bias_kv``, ``add_zero_attn``, static k/v) are left alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from .graphinfo import dtype_of, rank_of

__all__ = ["lower_opaque"]


def _additive(mask: torch.Tensor, is_bool: bool, like: torch.Tensor) -> torch.Tensor:
    """PyTorch's nn convention: a bool mask is True where attention is NOT allowed."""
    if is_bool:
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], head_dim: int):
    # q: [N, H, L, D]; k, v: [N, H, S, D]; mask: additive, broadcastable to [N, H, L, S]
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v), probs


@dataclass(frozen=True)
class _MHAConfig:
    embed_dim: int
    num_heads: int
    separate: bool
    need_weights: bool
    average: bool
    absent: frozenset  # optional tensor arguments that are None
    mask_bool: bool
    mask_rank: int
    kpm_bool: bool
    batch_first: bool  # only for nn.MultiheadAttention modules (F.* is always seq-first)


def _mha_fn(cfg: _MHAConfig) -> Callable:
    def mha(query, key, value, in_w, in_b, out_w, out_b, q_w, k_w, v_w, key_padding_mask, attn_mask):
        if cfg.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        L, N, E = query.shape[0], query.shape[1], query.shape[2]
        S = key.shape[0]
        H = cfg.num_heads
        D = cfg.embed_dim // H
        if cfg.separate:
            wq, wk, wv = q_w, k_w, v_w
        else:
            wq, wk, wv = in_w.chunk(3)
        bq, bk, bv = in_b.chunk(3) if "in_b" not in cfg.absent else (None, None, None)
        q = F.linear(query, wq, bq).reshape(L, N, H, D).permute(1, 2, 0, 3)  # [N, H, L, D]
        k = F.linear(key, wk, bk).reshape(S, N, H, D).permute(1, 2, 0, 3)  # [N, H, S, D]
        v = F.linear(value, wv, bv).reshape(S, N, H, D).permute(1, 2, 0, 3)
        mask = None
        if "attn_mask" not in cfg.absent:
            m = _additive(attn_mask, cfg.mask_bool, q)
            mask = m.reshape(N, H, L, S) if cfg.mask_rank == 3 else m
        if "key_padding_mask" not in cfg.absent:
            kpm = _additive(key_padding_mask, cfg.kpm_bool, q).reshape(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        out, probs = _attend(q, k, v, mask, D)
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        out = F.linear(out, out_w, out_b if "out_b" not in cfg.absent else None)
        if cfg.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if cfg.need_weights:
            weights = probs.mean(dim=1) if cfg.average else probs
        return out, weights

    return mha


@dataclass(frozen=True)
class _EncoderConfig:
    embed_dim: int
    num_heads: int
    use_gelu: bool
    norm_first: bool
    eps: float
    mask_type: Optional[int]
    has_mask: bool
    mask_bool: bool


def _encoder_fn(cfg: _EncoderConfig) -> Callable:
    def layer(src, qkv_w, qkv_b, proj_w, proj_b, n1w, n1b, n2w, n2b, f1w, f1b, f2w, f2b, mask):
        N, L, E = src.shape[0], src.shape[1], src.shape[2]
        H, D = cfg.num_heads, cfg.embed_dim // cfg.num_heads

        def self_attention(x):
            q, k, v = F.linear(x, qkv_w, qkv_b).chunk(3, dim=-1)
            q = q.reshape(N, L, H, D).transpose(1, 2)
            k = k.reshape(N, L, H, D).transpose(1, 2)
            v = v.reshape(N, L, H, D).transpose(1, 2)
            add = None
            if cfg.has_mask:
                add = _additive(mask, cfg.mask_bool, q)
                if cfg.mask_type == 1:  # key padding [N, S]
                    add = add.reshape(N, 1, 1, L)
            out, _ = _attend(q, k, v, add, D)
            return F.linear(out.transpose(1, 2).reshape(N, L, E), proj_w, proj_b)

        def feed_forward(x):
            h = F.linear(x, f1w, f1b)
            h = F.gelu(h) if cfg.use_gelu else F.relu(h)
            return F.linear(h, f2w, f2b)

        if cfg.norm_first:
            x = src + self_attention(F.layer_norm(src, (E,), n1w, n1b, cfg.eps))
            return x + feed_forward(F.layer_norm(x, (E,), n2w, n2b, cfg.eps))
        x = F.layer_norm(src + self_attention(src), (E,), n1w, n1b, cfg.eps)
        return F.layer_norm(x + feed_forward(x), (E,), n2w, n2b, cfg.eps)

    return layer


def _is_bool(x: Any) -> bool:
    return isinstance(x, Node) and dtype_of(x) == torch.bool


def _mask_facts(a: dict[str, Any]) -> dict[str, Any]:
    absent = frozenset(name for name, key in (("in_b", "in_proj_bias"), ("out_b", "out_proj_bias"),
                                              ("attn_mask", "attn_mask"), ("key_padding_mask", "key_padding_mask"))
                       if a.get(key) is None)
    return dict(absent=absent, mask_bool=_is_bool(a["attn_mask"]), mask_rank=rank_of(a["attn_mask"]) or 2,
                kpm_bool=_is_bool(a["key_padding_mask"]))


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _inline(gm: GraphModule, node: Node, fn: Callable, args: Sequence[Any]) -> None:
    """Trace ``fn`` with fx and splice it in place of ``node`` (tuple outputs through their getitems)."""
    sub = torch.fx.symbolic_trace(fn)
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    val_map = {ph: a for ph, a in zip(placeholders, args)}
    before = set(gm.graph.nodes)
    with gm.graph.inserting_before(node):
        out = gm.graph.graph_copy(sub.graph, val_map)
    stack = node.meta.get("nn_module_stack")
    if stack is None and node.op == "call_module":
        stack = {str(node.target): (str(node.target), type(gm.get_submodule(str(node.target))))}
    for new in gm.graph.nodes:
        if new not in before and stack:
            new.meta["nn_module_stack"] = stack
    if isinstance(out, (tuple, list)):
        for user in list(node.users):
            if user.op == "call_function" and user.target.__name__ == "getitem":
                replacement = out[user.args[1]]
                if replacement is None and not user.users:
                    gm.graph.erase_node(user)
                    continue
                if replacement is None:
                    raise RuntimeError(f"{user.format_node()} reads an output the lowering does not produce")
                user.replace_all_uses_with(replacement)
                gm.graph.erase_node(user)
        if node.users:
            raise RuntimeError(f"{node.format_node()} is used as a whole tuple")
    else:
        node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _lower_mha_call(gm: GraphModule, node: Node) -> bool:
    # F.multi_head_attention_forward(query, key, value, embed_dim_to_check, num_heads, in_proj_weight,
    #   in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training,
    #   key_padding_mask, need_weights, attn_mask, use_separate_proj_weight, q_proj_weight, k_proj_weight,
    #   v_proj_weight, static_k, static_v, average_attn_weights, is_causal)
    names = ["query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal"]
    defaults = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
                "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
                "is_causal": False}
    a = {n: _arg(node, i, n, defaults.get(n)) for i, n in enumerate(names)}
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"] or a["static_k"] is not None \
            or a["static_v"] is not None or (a["training"] and a["dropout_p"]):
        return False
    cfg = _MHAConfig(int(a["embed_dim_to_check"]), int(a["num_heads"]), bool(a["use_separate_proj_weight"]), bool(a["need_weights"]),
                     bool(a["average_attn_weights"]), **_mask_facts(a), batch_first=False)
    _inline(gm, node, _mha_fn(cfg), [a["query"], a["key"], a["value"], a["in_proj_weight"], a["in_proj_bias"],
                                     a["out_proj_weight"], a["out_proj_bias"], a["q_proj_weight"],
                                     a["k_proj_weight"], a["v_proj_weight"], a["key_padding_mask"], a["attn_mask"]])
    return True


def _lower_encoder_call(gm: GraphModule, node: Node) -> bool:
    # torch._transformer_encoder_layer_fwd(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
    #   proj_bias, use_gelu, norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2,
    #   ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2, mask=None, mask_type=None)
    args = list(node.args)
    mask = node.kwargs.get("mask", args[18] if len(args) > 18 else None)
    mask_type = node.kwargs.get("mask_type", args[19] if len(args) > 19 else None)
    cfg = _EncoderConfig(int(args[1]), int(args[2]), bool(args[7]), bool(args[8]), float(args[9]),
                         mask_type, mask is not None, _is_bool(mask))
    _inline(gm, node, _encoder_fn(cfg), [args[0], *args[3:7], *args[10:18], mask])
    return True


def _lower_mha_module(gm: GraphModule, node: Node) -> bool:
    mod = gm.get_submodule(str(node.target))
    if mod.bias_k is not None or mod.add_zero_attn or (mod.training and mod.dropout):
        return False
    names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal"]
    defaults = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True}
    a = {n: _arg(node, i, n, defaults.get(n)) for i, n in enumerate(names)}
    separate = not mod._qkv_same_embed_dim
    a["in_proj_bias"], a["out_proj_bias"] = mod.in_proj_bias, mod.out_proj.bias
    cfg = _MHAConfig(mod.embed_dim, mod.num_heads, separate, bool(a["need_weights"]), bool(a["average_attn_weights"]),
                     **_mask_facts(a), batch_first=bool(mod.batch_first))

    def attr(name: str) -> Optional[Node]:
        owner, _, leaf = name.rpartition(".")
        if getattr(mod.get_submodule(owner) if owner else mod, leaf, None) is None:
            return None
        with gm.graph.inserting_before(node):
            return gm.graph.get_attr(f"{node.target}.{name}")

    tensors = [attr("in_proj_weight"), attr("in_proj_bias"), attr("out_proj.weight"),
               attr("out_proj.bias"), attr("q_proj_weight"), attr("k_proj_weight"), attr("v_proj_weight")]
    _inline(gm, node, _mha_fn(cfg), [a["query"], a["key"], a["value"], *tensors, a["key_padding_mask"],
                                     a["attn_mask"]])
    return True


_CONTAINERS = (torch.nn.TransformerEncoder, torch.nn.TransformerDecoder, torch.nn.TransformerEncoderLayer,
               torch.nn.TransformerDecoderLayer, torch.nn.Transformer)


def _node_inputs(gm: GraphModule, node: Node, flat_inputs: Sequence[Any]) -> tuple[tuple, dict]:
    """The real argument values one call_module node receives on the example inputs."""
    run = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        run.run(*flat_inputs, enable_io_processing=False)
    args = torch.fx.node.map_arg(node.args, lambda n: run.env[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: run.env[n])
    return args, kwargs


def _lower_leaf_by_export(gm: GraphModule, node: Node, flat_inputs: Sequence[Any]) -> bool:
    """A leaf container (nn.TransformerEncoder ...) whose forward fx cannot trace: export it alone on
    its real inputs and splice the exported graph in, so its attention becomes visible."""
    mod = gm.get_submodule(str(node.target))
    args, kwargs = _node_inputs(gm, node, flat_inputs)
    with torch.no_grad():
        ep = torch.export.export(mod, tuple(args), dict(kwargs), strict=False)
    sub = ep.module()
    prefix = str(node.target)
    leaves = torch.utils._pytree.tree_leaves((tuple(node.args), dict(node.kwargs)))
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(leaves):
        return False
    val_map: dict[Node, Any] = dict(zip(placeholders, leaves))
    before = set(gm.graph.nodes)
    output = None
    with gm.graph.inserting_before(node):
        for sn in sub.graph.nodes:
            if sn in val_map:
                continue
            if sn.op == "output":
                output = torch.fx.node.map_arg(sn.args[0], lambda n: val_map[n])
                continue
            if sn.op == "call_module" and str(sn.target) == "_guards_fn":
                continue  # export's input guards: the parent graph already fixed these inputs
            if sn.op == "get_attr":
                target = f"{prefix}.{sn.target}"
                try:
                    gm.get_submodule(prefix).get_submodule(str(sn.target).rpartition(".")[0])
                    owner = gm.get_submodule(f"{prefix}.{str(sn.target).rpartition('.')[0]}".strip("."))
                    getattr(owner, str(sn.target).rpartition(".")[2])
                except AttributeError:
                    value = sub
                    for part in str(sn.target).split("."):
                        value = getattr(value, part)
                    target = f"_lcpass_const_{len(before)}_{sn.name}"
                    gm.register_buffer(target, value)
                val_map[sn] = gm.graph.get_attr(target)
                val_map[sn].meta.update(sn.meta)
                continue
            val_map[sn] = gm.graph.node_copy(sn, lambda n: val_map[n])
    for new in gm.graph.nodes:
        if new not in before and "nn_module_stack" in new.meta:
            new.meta["nn_module_stack"] = {
                k: (f"{prefix}.{v[0]}".rstrip(".") if isinstance(v, tuple) else v, *(v[1:] if isinstance(v, tuple) else ()))
                for k, v in new.meta["nn_module_stack"].items()
            }
    out = torch.utils._pytree.tree_unflatten(list(output), ep.call_spec.out_spec) if ep.call_spec.out_spec else output
    if isinstance(out, Node):
        node.replace_all_uses_with(out)
    else:
        for user in list(node.users):
            user.replace_all_uses_with(out[user.args[1]])
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return True


def _is(node: Node, fn: Any) -> bool:
    return node.op == "call_function" and node.target is fn


def lower_opaque(gm: GraphModule, flat_inputs: Optional[Sequence[Any]] = None) -> int:
    """Decompose opaque attention calls into plain ops in place; returns how many were lowered.

    When anything was lowered and ``flat_inputs`` are given, shapes are propagated again so the
    matcher can read the new nodes.
    """
    lowered = 0
    for node in list(gm.graph.nodes):
        if _is(node, F.multi_head_attention_forward):
            lowered += _lower_mha_call(gm, node)
        elif _is(node, torch._transformer_encoder_layer_fwd):
            lowered += _lower_encoder_call(gm, node)
        elif node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), torch.nn.MultiheadAttention):
            lowered += _lower_mha_module(gm, node)
        elif node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), _CONTAINERS) \
                and flat_inputs is not None:
            lowered += _lower_leaf_by_export(gm, node, flat_inputs)
    if lowered:
        gm.graph.lint()
        gm.recompile()
        if flat_inputs is not None:
            from torch.fx.passes.shape_prop import ShapeProp

            with torch.no_grad():
                ShapeProp(gm).propagate(*flat_inputs)
    return lowered
