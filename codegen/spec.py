"""Kernel specs and template rendering: one fixed template per algorithm, specialised at named holes.

A :class:`KernelSpec` is everything the generated source depends on: the template, head_dim, tile
sizes, layout block size, GQA group, layout kind, dtype and the printed mask_mod / score_mod. Two
equal specs render the same source; :func:`spec_key` hashes the spec (and the template text, so a
template edit never reuses stale kernels) for :mod:`lcpass.codegen.cache`.

>>> from lcpass.masks import causal_mask
>>> from lcpass.codegen.printer import print_mask_mod
>>> s = KernelSpec("attn_fwd", head_dim=64, block_m=64, block_n=64, sparse_q=64, sparse_kv=64,
...                group=4, dtype="float16", mask=print_mask_mod(causal_mask()))
>>> "def attn_fwd(" in render(s)
True
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from lcpass.codegen.printer import PrintedFn, UnsupportedSpec

__all__ = ["KernelSpec", "TEMPLATES", "MAX_HEAD_DIM", "render", "spec_key", "check_head_dim",
           "check_tiles", "template_path"]

TEMPLATES_DIR = Path(__file__).parent / "templates"
TEMPLATES = ("attn_fwd", "attn_bwd", "attn_decode", "block_scores", "token_scores")
MAX_HEAD_DIM = 256  # one [BLOCK_M, BLOCK_D] fp32 accumulator per program must fit on chip
DTYPES = ("float32", "float16", "bfloat16")
LAYOUTS = ("csr", "causal", "full", "token")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_head_dim(head_dim: int) -> int:
    """BLOCK_D for ``head_dim`` (next power of two >= 16); UnsupportedSpec when it cannot be tiled.

    >>> check_head_dim(80)
    128
    """
    if not isinstance(head_dim, int) or head_dim < 1 or head_dim > MAX_HEAD_DIM or head_dim % 8:
        raise UnsupportedSpec(
            f"head_dim={head_dim!r} cannot be tiled by the lcpass Triton templates: they need a "
            f"multiple of 8 in [8, {MAX_HEAD_DIM}] (the accumulator lives on chip); run this site on "
            f"the CPU engine (backend='cpu')")
    return max(16, 1 << (head_dim - 1).bit_length())


def check_tiles(block_m: int, block_n: int, sparse_q: int, sparse_kv: int) -> None:
    """Tiles must be powers of two >= 16 dividing the layout block (else UnsupportedSpec)."""
    for name, t in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if not _pow2(t) or t < 16:
            raise UnsupportedSpec(f"{name}={t} is not a power of two >= 16 (tl.dot needs it)")
    if sparse_q % block_m or sparse_kv % block_n:
        raise UnsupportedSpec(
            f"layout block size ({sparse_q}, {sparse_kv}) is not a multiple of the kernel tile "
            f"({block_m}, {block_n}); build the layout with block_size a multiple of 16 that is a "
            f"power of two times the tile (e.g. 64 or 128)")


@dataclass(frozen=True)
class KernelSpec:
    """What one generated kernel module depends on (plain data, hashable).

    ``template``: one of :data:`TEMPLATES`; ``group``: GQA group size G = Hq // Hkv; ``layout``:
    ``"csr"`` (padded-CSR lists), ``"causal"`` or ``"full"`` (dense, implicit tiles; forward only),
    ``"token"`` (per-KV-head lists of key positions gathered in the kernel; options ``local`` and
    ``mask_tokens``);
    ``dtype``: the q/k/v element type; ``mask`` / ``score``: printed mask_mod / score_mod (None =
    none); ``options``: template-specific extras as sorted ``(name, value)`` pairs (e.g. the
    selection score kind).
    """

    template: str
    head_dim: int
    block_m: int
    block_n: int
    sparse_q: int
    sparse_kv: int
    group: int = 1
    dtype: str = "float32"
    layout: str = "csr"
    mask: PrintedFn | None = None
    score: PrintedFn | None = None
    options: tuple[tuple[str, object], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise UnsupportedSpec(f"KernelSpec.template={self.template!r}; known: {TEMPLATES}")
        if self.dtype not in DTYPES:
            raise UnsupportedSpec(f"dtype {self.dtype!r} is not supported by the Triton templates; "
                                  f"use one of {DTYPES} or the CPU engine")
        if self.layout not in LAYOUTS:
            raise UnsupportedSpec(f"KernelSpec.layout={self.layout!r}; known: {LAYOUTS}")
        if self.group < 1:
            raise UnsupportedSpec(f"KernelSpec.group={self.group}; the GQA group must be >= 1")
        if self.layout == "token":
            need = {"attn_fwd": ("local", "mask_tokens"), "attn_decode": ("mask_tokens",)}
            if self.template not in need:
                raise UnsupportedSpec(f"layout 'token' has no {self.template!r} kernel; token lists "
                                      f"run forward (attn_fwd) and decode (attn_decode) only")
            missing = [o for o in need[self.template] if o not in dict(self.options)]
            if missing:
                raise UnsupportedSpec(f"KernelSpec(layout='token', template={self.template!r}) needs "
                                      f"the options {missing}")
        check_head_dim(self.head_dim)
        if self.template != "block_scores":
            check_tiles(self.block_m, self.block_n, self.sparse_q, self.sparse_kv)

    @property
    def block_d(self) -> int:
        return check_head_dim(self.head_dim)

    def option(self, name: str, default: object = None) -> object:
        return dict(self.options).get(name, default)

    def describe(self) -> dict:
        """JSON-friendly form: what the key hashes (with the template text's hash)."""
        return {
            "template": self.template, "head_dim": self.head_dim, "block_m": self.block_m,
            "block_n": self.block_n, "sparse_q": self.sparse_q, "sparse_kv": self.sparse_kv,
            "group": self.group, "dtype": self.dtype, "layout": self.layout,
            "mask": list(self.mask.key()) if self.mask else None,
            "score": list(self.score.key()) if self.score else None,
            "options": [list(o) for o in self.options],
        }


def template_path(name: str) -> Path:
    return TEMPLATES_DIR / f"{name}.jinja"


@functools.lru_cache(maxsize=None)
def _template_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(TEMPLATES_DIR.glob("*.jinja")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def spec_key(spec: KernelSpec) -> str:
    """A stable 20-hex-digit hash of the spec and the templates (file and op names use it)."""
    blob = json.dumps(spec.describe(), sort_keys=True, default=str)
    return hashlib.sha256((blob + _template_digest()).encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              undefined=jinja2.StrictUndefined)


def render(spec: KernelSpec) -> str:
    """The Python source of the kernel module for ``spec`` (fills the template's named holes)."""
    ctx = dict(spec.options)
    ctx.update(
        key=spec_key(spec), head_dim=spec.head_dim, block_d=spec.block_d, block_m=spec.block_m,
        block_n=spec.block_n, sparse_q=spec.sparse_q, sparse_kv=spec.sparse_kv, group=spec.group,
        dtype=spec.dtype, layout=spec.layout, mask=spec.mask, score=spec.score,
        # fp32 inputs: exact fp32 dot products (the default is TF32 on NVIDIA GPUs)
        dot_kw=', input_precision="ieee"' if spec.dtype == "float32" else "",
    )
    return _env().get_template(f"{spec.template}.jinja").render(**ctx)
