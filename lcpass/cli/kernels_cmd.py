"""``lcpass kernels MODEL --show SITE --method M [--param k=v ...]``: print the generated Triton source.

The site's heads, KV heads and head_dim come from capturing MODEL and detecting its attention
(``lcpass.zoo.pretrained.resolve_model`` + ``lcpass.inspect.detect``); the method's mask_mod for that site
is printed into the templates. ``--kind`` picks the kernel (prefill forward, decode, backward).

Wiring (in lcpass/cli/__init__.py)::

    from lcpass.cli import kernels_cmd
    kernels_cmd.add_parser(sub)          # registers "kernels", sets func=kernels_cmd.run

Example::

    lcpass kernels llama-tiny --show model.layers.0.self_attn --method streaming --param window=256
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lcpass.codegen import AttentionSpec, UnsupportedSpec, generate_source
from lcpass.inspect import detect
from lcpass.methods import site_mask_mod, validate_params
from lcpass.zoo.pretrained import resolve_model

__all__ = ["add_parser", "run", "parse_params"]

EXAMPLES = """examples:
  lcpass kernels llama-tiny --list                                   the sites you can --show
  lcpass kernels llama-tiny --show model.layers.0.self_attn --method streaming --param window=256
  lcpass kernels smollm2 --show model.layers.3.self_attn --method s2 --kind decode --seq-len 8192
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``kernels`` sub-command on an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "kernels",
        help="print the generated Triton kernel source for a site of a model",
        description="Capture MODEL, find the attention site SITE, build METHOD's mask for it and print "
        "the Triton source lcpass generates (templates with the mask_mod printed into their holes).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="zoo name, 'smollm2', a local Hugging Face folder, or 'module:factory'")
    p.add_argument("--show", metavar="SITE", help="site (layer) name, as 'lcpass inspect' lists it")
    p.add_argument("--list", action="store_true", help="list the model's sites and exit")
    p.add_argument("--method", default="causal", help="attention method (see 'lcpass methods')")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="method parameter, repeatable (e.g. --param window=256)")
    p.add_argument("--kind", choices=("prefill", "decode", "backward"), default="prefill",
                   help="which kernel to print (default: prefill forward)")
    p.add_argument("--seq-len", type=int, default=4096,
                   help="context length the method's mask is built for (default 4096)")
    p.add_argument("--block-size", type=int, default=128, help="layout block size (default 128)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.set_defaults(func=run)
    return p


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["window=256", "retrieval=true"]`` -> ``{"window": 256, "retrieval": True}`` (JSON values,
    bare strings otherwise)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r} is not K=V; e.g. --param window=256")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def run(args: argparse.Namespace) -> int:
    """Print the generated source (or the site list with ``--list``); 0 on success."""
    import torch

    from lcpass.cli import UserError  # lazy: lcpass.cli imports this module before it defines UserError

    resolved = resolve_model(args.model)
    sites = [s for _cap, det in detect(resolved.model, resolved.example_inputs) for s in det.sites]
    if not sites:
        raise UserError(f"no attention found in {args.model!r}; try 'lcpass inspect {args.model}'")
    if args.list or not args.show:
        for s in sites:
            print(f"{s.name}\t{s.n_heads} heads / {s.n_kv_heads} kv heads, head_dim {s.head_dim}, "
                  f"{s.mask}")
        if not args.list:
            print("pass --show SITE to print the kernel of one site", file=sys.stderr)
        return 0
    site = next((s for s in sites if s.name == args.show), None)
    if site is None:
        names = ", ".join(s.name for s in sites[:6]) + (" ..." if len(sites) > 6 else "")
        raise UserError(f"site {args.show!r} is not in {args.model!r}; its sites: {names}")
    params = validate_params(args.method, parse_params(args.param))
    n = args.seq_len
    q_len = 1 if args.kind == "decode" else n
    mask = site_mask_mod([(args.method, params)], site.n_heads, q_len, n)
    spec = AttentionSpec(head_dim=site.head_dim, mask_mod=mask, dtype=getattr(torch, args.dtype),
                         n_heads=site.n_heads, n_kv_heads=site.n_kv_heads,
                         block_size=(args.block_size, args.block_size), kind=args.kind)
    try:
        src = generate_source(spec)
    except UnsupportedSpec as exc:
        raise UserError(f"{site.name}: {exc}") from None
    print(f"# lcpass kernels: {args.model} {site.name} method={args.method} {params} kind={args.kind} "
          f"heads={site.n_heads}/{site.n_kv_heads} head_dim={site.head_dim} seq_len={n}")
    print(src)
    return 0
