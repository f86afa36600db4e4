"""Does calibration pick the right heads? DuoAttention plans on SmolLM2-135M-Instruct, calibrated vs random.

For a retrieval ratio (default 0.5 of the KV heads kept full; the others sink 64 + recent 256), three
ways of choosing the retrieval heads are compared on the same passkey cases (lengths 1k, 2k, 4k x depths
0.1, 0.4, 0.7, 0.95, a 5-digit key stated once in filler text) and on perplexity at 2k tokens of GPL-3:

    optimize   DuoAttention's optimisation-based identification (per-KV-head gates trained with the
               distillation + L1 objective on synthetic passkey data: ``lcpass.calibrate(mode="optimize")``)
    score      the Retrieval Head paper's copy-paste score (``lcpass.calibrate(mode="score")``, the demo's
               fast default)
    random-S   the same number of retrieval KV heads chosen at random (seeds 0, 1, 2)

Every plan runs at every length (``dense_below=0``). Writes ``benchmarks/results/calibration.json`` and
``calibration.png`` (accuracy per plan and length). Not a test (about 30 minutes on 2 CPU cores);
``tests/test_calibrate.py`` checks the 2k cases in CI.

    python benchmarks/calibration.py                 # ratio 0.5, lengths 1024,2048,4096
    python benchmarks/calibration.py --lengths 2048  # one length
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DEPTHS = (0.1, 0.4, 0.7, 0.95)


def main(argv: list[str] | None = None) -> int:
    import lcpass
    from lcpass.calibration import calibrate, model_sites, random_duo_plan
    from lcpass.zoo.pretrained import load_smollm2
    from lcpass.quality import load_text_ids, perplexity, run_passkey

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--seeds", default="0,1,2", help="random plans' seeds")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    model, tok = load_smollm2()
    sites = model_sites(model)
    ppl_ids = load_text_ids(tok, n_tokens=2048)
    plans: dict[str, object] = {}
    calib_s: dict[str, float] = {}
    for mode in ("optimize", "score"):
        t0 = time.time()
        plans[mode] = calibrate(model, "duo", tokenizer=tok, retrieval_ratio=args.ratio, mode=mode, progress=False)
        calib_s[mode] = round(time.time() - t0, 1)
        print(f"calibrated ({mode}) in {calib_s[mode]} s", flush=True)
    fp = plans["optimize"].fingerprint
    for seed in (int(s) for s in args.seeds.split(",")):
        plans[f"random-{seed}"] = random_duo_plan(sites, args.ratio, seed=seed, fingerprint=fp)

    rows = []
    dense_cases = None
    ex = {"input_ids": ppl_ids[:, :32]}
    for name in ("dense", *plans):
        t0 = time.time()
        m = model if name == "dense" else lcpass.optimize(copy.deepcopy(model), plan=plans[name], dense_below=0,
                                                           example_inputs=ex)
        with torch.no_grad():
            ppl = perplexity(m(input_ids=ppl_ids).logits, ppl_ids)
        cases = run_passkey(m, tok, lengths, DEPTHS)
        if name == "dense":
            dense_cases = cases
        plan = plans.get(name)
        retrieval = None if plan is None else sum(
            bool(h.params.get("retrieval")) for s in sites for h in plan.resolve(s.name, s.n_heads))
        row = {"plan": name, "retrieval_query_heads": retrieval, "perplexity_2k": ppl,
               "passkey_accuracy": sum(c["correct"] for c in cases) / len(cases),
               "matches_dense": sum(a["correct"] == b["correct"] for a, b in zip(cases, dense_cases)),
               "by_length": {n: sum(c["correct"] for c in cases if c["length"] == n) / len(DEPTHS) for n in lengths},
               "cases": cases, "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{name:10s} passkey {row['passkey_accuracy']:.2f} ({row['matches_dense']}/{len(cases)} as dense) "
              f"ppl@2k {ppl:.3f} [{row['seconds']} s]", flush=True)
        if name != "dense":
            del m
    dense_ppl = rows[0]["perplexity_2k"]
    for r in rows:
        r["perplexity_delta_pct"] = 100.0 * (r["perplexity_2k"] / dense_ppl - 1.0)
    rand = [r for r in rows if r["plan"].startswith("random")]
    summary = {
        "ratio": args.ratio, "sink": 64, "recent": 256, "cases": len(lengths) * len(DEPTHS),
        "calibration_s": calib_s,
        "accuracy": {r["plan"]: r["passkey_accuracy"] for r in rows},
        "perplexity_delta_pct": {r["plan"]: r["perplexity_delta_pct"] for r in rows},
        "random_mean_accuracy": sum(r["passkey_accuracy"] for r in rand) / len(rand) if rand else None,
        "optimize_equals_dense_cases": rows[1]["matches_dense"],
    }
    result = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "model": "SmolLM2-135M-Instruct", "lengths": list(lengths), "depths": list(DEPTHS),
              "wall_s": round(time.time() - t_start, 1), "summary": summary, "rows": rows}
    (out / "calibration.json").write_text(json.dumps(result, indent=1))
    plot(rows, lengths, out / "calibration.png")
    print(json.dumps(summary, indent=1))
    return 0


def plot(rows: list[dict], lengths: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        ax.bar([i + j * width for i in range(len(lengths))], [r["by_length"][n] for n in lengths], width,
               label=f"{r['plan']} (ppl {r['perplexity_delta_pct']:+.1f}%)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(lengths))], [str(n) for n in lengths])
    ax.set(xlabel="prompt tokens", ylabel="passkey accuracy", ylim=(0, 1.05),
           title="SmolLM2-135M: DuoAttention heads chosen by calibration vs at random")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
