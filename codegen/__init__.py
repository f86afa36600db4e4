"""lcpass.codegen: generated Triton kernels for every plan.

One Jinja template per algorithm (``templates/``: block-sparse prefill forward, its backward, split-KV
decode with a log-sum-exp merge - both also over token lists gathered in the kernel - block scoring
and token scoring for dynamic selection), each opening with a notation block; the method's ``mask_mod`` / ``score_mod`` - the same Python objects the CPU engine runs - are
traced and printed into the named holes (:mod:`lcpass.codegen.printer`); generated modules are cached
on disk by spec hash (:mod:`lcpass.codegen.cache`) and run as ``torch.library.triton_op`` custom ops
(:mod:`lcpass.codegen.ops`) so torch.compile and torch.export see them.

Entry points::

    attention(q, k, v, layout, *, scale, mask_mod=None, score_mod=None) -> Tensor
    decode_attention(q, k, v, layout, *, scale, mask_mod=None, score_mod=None, n_splits=None) -> Tensor
    available(AttentionSpec(head_dim, mask_mod, ...)) -> (bool, reason)
    prepare_attention(layout, *, head_dim, n_heads, n_kv_heads, dtype, device, scale, ...)
        -> PreparedAttention, callable (q, k, v) -> out: host work done once, at lowering time
    prepare_decode(layout, *, ..., batch, n_splits=None) -> PreparedAttention (split-KV decode)
    select_layout(q, k, *, k_blocks, mask_mod, block_size, kind="quest"|"mean") -> BlockLayout
    token_attention(q, k, v, indices, *, block_q, scale, local=True) -> Tensor   (token lists, prefill)
    token_decode_attention(q, k, v, indices, *, scale, n_splits=None) -> Tensor  (token lists, decode)
    gather_decode(q, k, v, pos, idx, scale) -> Tensor     drop-in for lcpass.kv.select.gather_attend
    selection_attention(q, k, v, sel, *, scale) -> Tensor  a dynamic method's selection (any kind)
    token_scores(q, k, *, scale, kv_keep=None) -> Tensor  TokenSelect's soft vote [B, Hkv, Sk]

>>> from lcpass.codegen import available, AttentionSpec
>>> available(AttentionSpec(head_dim=64, device="cuda"))[0] in (True, False)
True
"""

from lcpass.codegen.api import (
    AttentionSpec,
    PreparedAttention,
    attention,
    attention_or_fallback,
    available,
    choose_tiles,
    decode_attention,
    generate_source,
    kernel_specs,
    prepare_attention,
    prepare_decode,
)
from lcpass.codegen.cache import cache_info, kernel_dir, load_kernel
from lcpass.codegen.printer import UnsupportedSpec, print_mask_mod, print_score_mod
from lcpass.codegen.select import block_scores, select_layout
from lcpass.codegen.spec import KernelSpec, render, spec_key
from lcpass.codegen.token import (gather_decode, prepare_token_attention, prepare_token_decode,
                                  selection_attention, token_attention, token_decode_attention,
                                  token_lists, token_scores)

__all__ = [
    "AttentionSpec",
    "KernelSpec",
    "PreparedAttention",
    "UnsupportedSpec",
    "attention",
    "attention_or_fallback",
    "available",
    "block_scores",
    "cache_info",
    "choose_tiles",
    "decode_attention",
    "gather_decode",
    "generate_source",
    "kernel_dir",
    "kernel_specs",
    "load_kernel",
    "prepare_attention",
    "prepare_decode",
    "prepare_token_attention",
    "prepare_token_decode",
    "print_mask_mod",
    "print_score_mod",
    "render",
    "select_layout",
    "selection_attention",
    "spec_key",
    "token_attention",
    "token_decode_attention",
    "token_lists",
    "token_scores",
]
