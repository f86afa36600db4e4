"""Quality harness: prompt builders (token-exact, facts once, parser), tasks, method specs, reports, the
eval CLI's one-line errors, and dense SmolLM2 on passkey / perplexity (slow: real model)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from lcpass.cli import eval_cmd
from lcpass.plan import Plan, SiteInfo
from lcpass.quality import (
    evaluate,
    kv_ratio,
    load_text_ids,
    parse_method,
    parse_number,
    perplexity,
    plot_plan,
    to_markdown,
)
from lcpass.quality.apply import apply_method
from lcpass.quality.prompts import (
    FILLER,
    HEADER,
    PASSKEY_QUESTION,
    copy_prompt,
    encode,
    multi_needle_prompt,
    passkey_prompt,
    random_copy_prompt,
)
from lcpass.quality.report import plan_density
from lcpass.quality.tasks import DEFAULT_TEXT, run_passkey

SMOLLM2_PPL_256 = 21.7  # FACTS.md: SmolLM2 perplexity on GPL-3 at 256 tokens


@pytest.fixture(scope="module")
def smollm2():
    from lcpass.zoo.pretrained import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def _count(haystack: list[int], needle: list[int]) -> int:
    n = len(needle)
    return sum(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


# ------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize("length", [300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_prompt_exact_length_once_at_depth(tok, length, depth):
    p = passkey_prompt(tok, length, depth, seed=7)
    ids = p.ids[0].tolist()
    assert p.ids.shape == (1, length) and p.length == length
    fact = encode(tok, " " + p.meta["fact"])
    assert len(p.spans) == 1 and ids[p.spans[0][0] : p.spans[0][1]] == fact
    assert _count(ids, fact) == 1
    text = tok.decode(ids)
    assert text.count(p.answer) == 1 and len(p.answer) == 5 and p.answer.isdigit()
    # depth: the fact starts at depth * (filler tokens) within one filler sentence
    n_head = len(encode(tok, HEADER))
    n_fill = length - n_head - len(fact) - len(encode(tok, PASSKEY_QUESTION))
    sentence = max(len(encode(tok, s + ".")) for s in FILLER.split(".") if s.strip())
    assert abs((p.spans[0][0] - n_head) - depth * n_fill) <= sentence
    assert text.endswith("What is the pass key? Answer with the 5-digit number.\nAnswer: The pass key is")
    # the parser recovers the key from what a model that knows it would say
    assert parse_number(" " + p.answer + ". The grass is green.") == p.answer


def test_passkey_prompt_refuses_bad_input(tok):
    with pytest.raises(ValueError, match="depth=1.5"):
        passkey_prompt(tok, 512, 1.5)
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(tok, 20, 0.5)


def test_parse_number_needs_exactly_five_digits():
    assert parse_number("The key is 123456.") is None
    assert parse_number("1234 then 56789") == "56789"
    assert parse_number("no digits") is None


def test_multi_needle_prompt_chain(tok):
    p = multi_needle_prompt(tok, 800, hops=2, distractors=2, seed=3)
    ids = p.ids[0].tolist()
    assert len(ids) == 800
    chain, facts = p.meta["chain"], p.meta["facts"]
    assert len(chain) == 3 and len(facts) == 5 and len(p.spans) == 5
    for fact, (a, b) in zip(facts, p.spans):
        enc = encode(tok, " " + fact)
        assert ids[a:b] == enc and _count(ids, enc) == 1
    text = tok.decode(ids)
    assert text.count(p.answer) == 1  # the answer code is stated once, in the chain root only
    assert p.answer in facts[0] and chain[0] in facts[0]
    assert all(f"{cur} door has the same code as the {prev}" in f
               for prev, cur, f in zip(chain, chain[1:], facts[1:3]))
    assert p.answer not in p.meta["wrong_codes"] and len(p.meta["wrong_codes"]) == 2
    assert text.rstrip().endswith(f"The code of the {chain[-1]} door is")
    # facts are not in chain order in the text for this seed, so reading order alone cannot answer
    assert sorted(p.spans) != p.spans


def test_copy_prompts_teacher_forced(tok):
    p = copy_prompt(tok, 400, 0.3, n_words=6, seed=1)
    ids = p.ids[0].tolist()
    assert len(ids) == 400 and p.answer_span[1] == 400
    assert tok.decode(ids[p.answer_span[0] :]).strip() == p.answer + "."
    needle = tok.decode(ids[p.spans[0][0] : p.spans[0][1]])
    assert p.answer in needle
    r = random_copy_prompt(1000, 200, 0.5, n_tokens=16, seed=2)
    a, b = r.spans[0]
    assert r.length == 200 and r.ids[0, a:b].tolist()[2:] == r.ids[0, r.answer_span[0] :].tolist()


# ------------------------------------------------------------------------------- text, specs, report


def test_load_text_errors_are_one_line(tok, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as e:
        load_text_ids(tok, missing, 16)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(ValueError, match="fewer than the 256"):
        load_text_ids(tok, short, 256)
    ids = load_text_ids(tok, DEFAULT_TEXT, 64)
    assert ids.shape == (1, 64)


def test_parse_method_specs():
    s = parse_method("streaming:window=256,sink=4")
    assert (s.method, s.params) == ("streaming", {"window": 256, "sink": 4})
    assert parse_method("duo:ratio=0.25").params == {"ratio": 0.25}
    assert parse_method("results/plan.json").plan_path == "results/plan.json"
    with pytest.raises(ValueError, match="unknown attention method 'nope'"):
        parse_method("nope")
    with pytest.raises(ValueError, match="window"):
        parse_method("streaming:window=-3")
    with pytest.raises(ValueError, match="not key=value"):
        parse_method("streaming:256")
    assert eval_cmd.split_methods("dense,streaming:window=256,sink=4,duo") == [
        "dense", "streaming:window=256,sink=4", "duo"]


def test_dense_is_the_unmodified_model():
    model = torch.nn.Linear(2, 2)
    assert apply_method(model, None) is model


def test_kv_ratio_and_plan_heat_map(tmp_path):
    sites = [SiteInfo(f"model.layers.{i}.self_attn", 4, 2, 8) for i in range(3)]
    plan = Plan.duo(sites, {sites[1].name: [1]}, sink=4, recent=60, by_kv_head=True)
    # 1 of 6 KV heads keeps 1024 tokens, 5 keep 64
    assert kv_ratio(plan, sites, 1024) == pytest.approx((1024 + 5 * 64) / (6 * 1024))
    assert kv_ratio(None, sites, 1024) == 1.0
    names, dens = plan_density(plan, length=512)
    assert names == [s.name for s in sites]
    assert dens[1, 2:].tolist() == [1.0, 1.0]  # retrieval KV head 1 = query heads 2, 3
    assert (dens[0] < 0.3).all() and (dens[1, :2] < 0.3).all()
    path = plot_plan(plan, tmp_path / "plan.png", length=512)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_never_invents_numbers_for_failed_methods():
    res = {"model": "m", "settings": {}, "methods": [
        {"method": "dense", "error": None, "passkey_accuracy": 1.0, "perplexity": 20.0},
        {"method": "streaming", "error": "lcpass.optimize is not available"},
    ]}
    md = to_markdown(res)
    row = [line for line in md.splitlines() if line.startswith("| streaming")][0]
    assert set(row.replace("streaming", "").replace("|", "").split()) == {"—"}
    assert "lcpass.optimize is not available" in md


# ------------------------------------------------------------------------------------- eval CLI


def _eval_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lcpass")
    eval_cmd.add_parser(parser.add_subparsers())
    return parser.parse_args(["eval", *argv])


def test_eval_cli_missing_text_and_corrupt_plan(tmp_path):
    args = _eval_args(["smollm2", "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError) as e:
        args.func(args)
    assert "missing.txt" in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    args = _eval_args(["smollm2", "--methods", str(bad), "--out", str(tmp_path)])
    with pytest.raises(ValueError) as e:
        args.func(args)
    assert "bad.json" in str(e.value) and "not a valid lcpass plan" in str(e.value)
    assert "\n" not in str(e.value)
    args = _eval_args(["smollm2", "--methods", str(tmp_path / "none.json"), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="none.json"):
        args.func(args)


@pytest.mark.slow
def test_eval_cli_refuses_plan_for_another_model(tmp_path):
    from lcpass.calibration import model_fingerprint, model_sites
    from lcpass.zoo import get_zoo_model

    tiny = get_zoo_model("llama-tiny").model
    sites = model_sites(tiny)
    plan = Plan(Plan.uniform(sites, "streaming", window=64).sites, model_fingerprint(tiny, sites))
    path = tmp_path / "tiny.json"
    plan.save(path)
    args = _eval_args(["smollm2", "--methods", str(path), "--ppl-tokens", "64", "--out", str(tmp_path)])
    with pytest.raises(ValueError) as e:
        args.func(args)
    msg = str(e.value)
    assert "plan was made for" in msg and "in the plan but" in msg and "\n" not in msg


# ------------------------------------------------------------------------------ real model (slow)


@pytest.mark.slow
def test_dense_smollm2_passkey_1k_two_depths(smollm2):
    model, tok = smollm2
    rows = run_passkey(model, tok, lengths=(1024,), depths=(0.2, 0.8), seed=11)
    assert [r["correct"] for r in rows] == [True, True], rows


@pytest.mark.slow
def test_dense_smollm2_perplexity_gpl3_256(smollm2):
    model, tok = smollm2
    ids = load_text_ids(tok, DEFAULT_TEXT, 256)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ppl = perplexity(logits, ids)
    assert abs(ppl - SMOLLM2_PPL_256) / SMOLLM2_PPL_256 < 0.15, ppl


@pytest.mark.slow
def test_evaluate_end_to_end_small(smollm2, tmp_path):
    model, tok = smollm2
    res = evaluate(model, tok, ["streaming:window=64,sink=4"], lengths=(256,), depths=(0.5,), needle_trials=1,
                   ppl_tokens=256, progress=False, out_dir=tmp_path)
    dense, other = res["methods"]
    assert dense["method"] == "dense" and dense["error"] is None
    assert dense["agreement"] == 1.0 and dense["perplexity_delta_pct"] == 0.0
    assert abs(dense["perplexity"] - SMOLLM2_PPL_256) / SMOLLM2_PPL_256 < 0.15
    assert dense["kv_bytes"] == 30 * 2 * 3 * 256 * 64 * 4  # layers x (k, v) x KV heads x tokens x dim x fp32
    assert dense["passkey_accuracy"] == 1.0 and len(dense["passkey"]) == 1 and len(dense["multi_needle"]) == 1
    assert other["error"] is None
    assert 0.0 < other["agreement"] <= 1.0 and other["perplexity"] > 0
    assert other["kv_ratio_policy"] == pytest.approx((4 + 64) / 256)
    # the prefill runs with the optimized model's CompressedCache: the bytes it really holds follow the plan
    assert other["kv_ratio_measured"] == pytest.approx(other["kv_ratio_policy"], rel=0.05)
    saved = json.loads(Path(res["files"]["json"]).read_text())
    assert [m["method"] for m in saved["methods"]] == ["dense", "streaming:window=64,sink=4"]
    for kind in ("markdown", "accuracy_vs_length", "passkey_heatmaps"):
        assert Path(res["files"][kind]).stat().st_size > 0
    assert (tmp_path / "plan_streaming_window_64_sink_4.png").is_file()
