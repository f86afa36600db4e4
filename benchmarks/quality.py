"""Quality of every attention method on SmolLM2-135M-Instruct at one stated budget: the README table.

Budget: each sparse method keeps about 512 keys per query (or 25% of the heads full, for the
head-split methods) — 25% of a 2048-token context:

    streaming  sink 64 + window 448            duo        25% retrieval KV heads, others sink 64 + recent 448
    duo-random the same count, random heads    razor      25% heads full KV, others sink 4 + 448 recent + 1
    moa        per-head windows, density 0.25  s2         64-token blocks, 4 local blocks, vertical stride 8
    dilated    window 1024, dilation 2         longlora   groups of 512 tokens (shifted half the heads)
    quest      token budget 512, pages of 64   seer       top 8 blocks of 64
    tokenselect k = 512 tokens                  hip        k = 512
    landmark   top 8 blocks of 64              cca        groups of 16 + local window 256

Sites run the method at every length (``dense_below=0``), so short prompts measure the method, not the
dense fallback. For each method: passkey accuracy (lengths x depths) and how many cases match dense,
multi-needle accuracy, perplexity on GPL-3 and its change vs dense, next-token agreement with dense, the
prefill time spent inside the attention modules relative to dense (one run each, same prefill, warm-up
first; a shared CPU is noisy), and KV bytes relative to dense (from the plan's per-KV-head policies, and
from the tensors the returned cache holds). Methods that cannot be applied or fail are listed with their
error and no numbers. Writes ``benchmarks/results/quality.json``, ``quality.md`` and PNG plots.

    python benchmarks/quality.py              # lengths 1024,2048,4096 x depths 0.1,0.4,0.7,0.95; ppl at 2048
    python benchmarks/quality.py --quick      # lengths 1024 x depths 0.1,0.5,0.9; ppl at 1024 (~10x faster)
    python benchmarks/quality.py --methods dense,streaming:window=448,sink=64

Not a test: it takes tens of minutes on 2 CPU cores (the full run: hours).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from lcpass.cli.calibrate_cmd import parse_floats, parse_ints
from lcpass.cli.eval_cmd import split_methods

RESULTS = Path(__file__).resolve().parent / "results"

BUDGET = "~512 keys per query or 25% of heads full (25% of a 2048-token context)"
METHODS = [
    "streaming:sink=64,window=448",
    "duo:ratio=0.25,sink=64,recent=448",
    "duo-random:ratio=0.25,sink=64,recent=448",
    "razor:ratio=0.25,sink=4,threshold=448,compression=8",
    "moa:density=0.25,sink=64",
    "s2:block_size=64,local_blocks=4,vert_stride=8",
    "dilated:window=1024,dilation=2",
    "longlora:group_size=512",
    "quest:token_budget=512,page_size=64",
    "seer:block_size=64,topk=8",
    "tokenselect:k=512,block_size=64",
    "hip:k=512,block_size_q=64,block_size_k=16",
    "landmark:block_size=64,topk=8",
    "cca:group_size=16,local_window=256",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1024 tokens only, 3 depths, ppl at 1024")
    ap.add_argument("--methods", default=None, help="comma-separated method specs (default: the budget table)")
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--depths", default=None)
    ap.add_argument("--ppl-tokens", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from lcpass.zoo.pretrained import load_smollm2
    from lcpass.quality import evaluate

    lengths = parse_ints(args.lengths or ("1024" if args.quick else "1024,2048,4096"), "--lengths")
    depths = parse_floats(args.depths or ("0.1,0.5,0.9" if args.quick else "0.1,0.4,0.7,0.95"), "--depths")
    ppl_tokens = args.ppl_tokens or (1024 if args.quick else 2048)
    methods = ["dense"] + (split_methods(args.methods) if args.methods else METHODS)
    calibration = {"lengths": (1024,) if args.quick else (2048,), "depths": (0.1, 0.3, 0.5, 0.7, 0.9)}

    model, tok = load_smollm2()
    t0 = time.perf_counter()
    res = evaluate(
        model, tok, methods, lengths=lengths, depths=depths, needle_trials=1 if args.quick else 2,
        ppl_tokens=ppl_tokens, calibration=calibration, dense_below=0, progress=not args.no_progress,
        out_dir=Path(args.out) / "quality_files", name="SmolLM2-135M-Instruct",
    )
    res["budget"] = BUDGET
    res["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0]}
    res["command"] = "python benchmarks/quality.py" + (" --quick" if args.quick else "")
    res["total_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(res, indent=2) + "\n")
    md = Path(res["files"]["markdown"]).read_text()
    header = (f"### Quality at a fixed budget ({BUDGET})\n\nReproduce: `{res['command']}` "
              f"({res['total_s'] / 60:.0f} min on this machine).\n\n")
    (out / "quality.md").write_text(header + md)
    for kind in ("accuracy_vs_length", "passkey_heatmaps"):
        shutil.copy(res["files"][kind], out / f"quality_{kind}.png")
    print(header + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
