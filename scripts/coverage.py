"""The architecture sweep over every architecture the installed transformers builds; writes
``benchmarks/results/coverage.json`` and prints ``docs/COVERAGE.md`` (never edited by hand).

    python scripts/coverage.py                  # every architecture, default and eager implementations
    python scripts/coverage.py llama falcon     # some model_types only (prints, does not write)
    python scripts/coverage.py --merge led      # re-run some model_types and replace their rows in the table
    python scripts/coverage.py -j 2             # two worker processes (one torch thread each)
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def _check(job):
    """One architecture x implementation, in a worker: the row, or a timeout row."""
    import torch

    from lcpass.zoo.sweep import Coverage, check

    torch.set_num_threads(1)
    arch, impl, timeout = job
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        row = check(arch, impl)
    except _Timeout:
        row = Coverage(arch.model_type, arch.task, arch.class_name, impl or "default", "error",
                       f"timed out after {timeout} s")
    finally:
        signal.alarm(0)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_types", nargs="*")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per architecture")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/coverage.json"))
    ap.add_argument("--md", default=str(ROOT / "docs/COVERAGE.md"))
    ap.add_argument("-j", "--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--merge", action="store_true",
                    help="with model_types: replace their rows in the committed table (the meta lists them)")
    args = ap.parse_args(argv)
    import torch

    from lcpass.zoo.auto import architectures
    from lcpass.zoo.coverage_table import impls_for, markdown

    torch.set_num_threads(1)
    archs = [a for a in architectures() if not args.model_types or a.model_type in args.model_types]
    jobs = [(arch, impl, args.timeout) for arch in archs for impl in impls_for(arch)]
    t0 = time.time()
    rows = []
    if args.jobs > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=20)
        results = pool.imap(_check, jobs)
    else:
        results = map(_check, jobs)
    for row in results:
        rows.append(row)
        print(f"{row.model_type:28s} {row.attn_impl:8s} {row.status:12s} {row.seconds:5.1f}s {row.reason[:150]}",
              flush=True)
    print(f"{len(rows)} rows in {time.time() - t0:.0f} s", file=sys.stderr)
    if args.model_types and not args.merge:
        return 0
    import transformers

    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "seconds": round(time.time() - t0)}
    if args.merge:
        from lcpass.zoo.sweep import Coverage

        old = json.loads(Path(args.json).read_text())
        if old["meta"].get("transformers") != transformers.__version__:
            print(f"--merge: the table is for transformers {old['meta'].get('transformers')}, this is "
                  f"{transformers.__version__}; run the whole sweep", file=sys.stderr)
            return 2
        fresh = {(r.model_type, r.attn_impl): r for r in rows}
        merged = [fresh.pop((r["model_type"], r["attn_impl"]), None) or Coverage(**r) for r in old["rows"]]
        rows = merged + list(fresh.values())
        meta = {**old["meta"], "rerun": sorted(set(old["meta"].get("rerun", [])) | set(args.model_types))}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=1))
    Path(args.md).write_text(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
