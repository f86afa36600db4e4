"""torch.compile(backend="lcpass"): attention rewritten in the graph dynamo hands over, the rest by Inductor.

The reference is ``lcpass.optimize`` with the same method (eager): the compiled model must agree with it,
the compiled forward must serve ``generate()``, and the speed of eager vs compiled is printed. The model is a
small random Llama (the zoo's ``llama-tiny``) so Inductor compiles in seconds on a laptop CPU.

Run:  python examples/compile_backend.py
"""
from __future__ import annotations

import copy
import time
import warnings

import torch

import lcpass
from lcpass.backend import GraphRecord
from lcpass.zoo import get_zoo_model

warnings.filterwarnings("ignore")
OPTIONS = {"method": "streaming", "sink": 2, "window": 8, "dense_below": 0}


def best_time(fn, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    z = get_zoo_model("llama-tiny")
    model, inputs = z.model, z.example_inputs

    reference = lcpass.optimize(copy.deepcopy(model), example_inputs=inputs, **OPTIONS)
    graphs: list[GraphRecord] = []
    compiled = torch.compile(copy.deepcopy(model), backend="lcpass", options={**OPTIONS, "record": graphs})

    with torch.no_grad():
        t0 = time.perf_counter()
        got = compiled(**inputs).logits
        t_compile = time.perf_counter() - t0
        want = reference(**inputs).logits
        err = (got - want).abs().max().item()
        print(f"compiled in {t_compile:.1f} s: {len(graphs)} graph(s), "
              f"{sum(g.rewritten for g in graphs)} attention sites rewritten; max |diff| vs optimize {err:.2e}")
        assert err <= 1e-5 and graphs[0].rewritten == z.n_attention
        t_eager = best_time(lambda: reference(**inputs))
        t_comp = best_time(lambda: compiled(**inputs))
    print(f"forward: lcpass.optimize (eager) {t_eager * 1e3:.1f} ms, torch.compile lcpass+inductor "
          f"{t_comp * 1e3:.1f} ms")

    # generate() with the compiled forward (Inductor skipped here: options inner='eager')
    gen_model = copy.deepcopy(model)
    gen_model.forward = torch.compile(gen_model.forward, backend="lcpass", options={**OPTIONS, "inner": "eager"})
    prompt = inputs["input_ids"][:1, :6]
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    out, want_ids = gen_model.generate(prompt, **kw), reference.generate(prompt, **kw)
    print("generate:", out[0].tolist())
    assert torch.equal(out, want_ids)
    print("OK")


if __name__ == "__main__":
    main()
