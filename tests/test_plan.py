"""The plan: presets, JSON round trip, files, and validation against a model's sites."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lcpass.methods import site_mask_mod
from lcpass.plan import HeadSpec, ModelFingerprint, Plan, SiteInfo, SitePlan

SITES = [SiteInfo(f"model.layers.{i}.self_attn", 8, 2, 64) for i in range(6)]
NAMES = [s.name for s in SITES]


def _mixed_plan() -> Plan:
    plan = Plan.duo(SITES, {NAMES[1]: [0, 3], NAMES[4]: [7]}, sink=4, recent=128)
    moa = [HeadSpec("moa", {"alpha": 64.0 * (h + 1), "beta": 0.125, "sink": 4}) for h in range(8)]
    return plan.with_site(NAMES[2], moa).with_site(NAMES[3], HeadSpec("s2", {"vert_stride": 4})).dense_layers(first=1)


# ---------------------------------------------------------------------------------------------
# presets and modifiers


def test_uniform_plan_covers_every_site():
    plan = Plan.uniform(SITES, "streaming", sink=4, window=256)
    assert list(plan.sites) == NAMES
    assert plan.resolve(NAMES[0]) == [HeadSpec("streaming", {"sink": 4, "window": 256})] * 8
    assert plan.fingerprint == ModelFingerprint.from_sites(SITES)
    with pytest.raises(ValueError, match=r"'window' = -1 is out of range; allowed: window >= 1"):
        Plan.uniform(SITES, "streaming", window=-1)
    with pytest.raises(ValueError, match="unknown attention method 'strimming'"):
        Plan.uniform(SITES, "strimming")


def test_duo_preset_marks_retrieval_heads():
    plan = Plan.duo(SITES, {NAMES[1]: [0, 3]}, sink=4, recent=128)
    flags = [h.params["retrieval"] for h in plan.resolve(NAMES[1])]
    assert flags == [h in (0, 3) for h in range(8)]
    assert plan.sites[NAMES[0]].uniform and plan.resolve(NAMES[0])[0].params["retrieval"] is False
    by_kv = Plan.duo(SITES, {NAMES[1]: [1]}, by_kv_head=True)  # KV head 1 serves query heads 4..7
    assert [h.params["retrieval"] for h in by_kv.resolve(NAMES[1])] == [h >= 4 for h in range(8)]
    with pytest.raises(ValueError, match=r"has 2 KV heads; retrieval KV heads \[2\] are out of range 0..1"):
        Plan.duo(SITES, {NAMES[1]: [2]}, by_kv_head=True)
    with pytest.raises(ValueError, match=r"retrieval heads \[8\] are out of range 0..7"):
        Plan.duo(SITES, {NAMES[1]: [8]})
    with pytest.raises(ValueError, match="retrieval site 'model.layers.9.self_attn' is not in the model"):
        Plan.duo(SITES, {"model.layers.9.self_attn": [0]})
    with pytest.raises(ValueError, match="'recent' = 0"):
        Plan.duo(SITES, {}, recent=0)


def test_dense_layers_first_and_last_in_model_order():
    plan = Plan.uniform(list(reversed(SITES)), "causal")  # plan order differs from model order below
    plan = Plan(plan.sites, ModelFingerprint.from_sites(SITES)).dense_layers(first=2, last=1)
    methods = [plan.resolve(n)[0].method for n in NAMES]
    assert methods == ["dense", "dense", "causal", "causal", "causal", "dense"]
    unchanged = Plan.uniform(SITES, "causal").dense_layers()
    assert [unchanged.resolve(n)[0].method for n in NAMES] == ["causal"] * 6
    with pytest.raises(ValueError, match="first=-1 must be an int >= 0"):
        plan.dense_layers(first=-1)


def test_resolve_unplanned_site_keeps_original_attention():
    plan = Plan({NAMES[0]: SitePlan.same("causal")}, ModelFingerprint.from_sites(SITES))
    assert plan.resolve(NAMES[5]) == [HeadSpec("dense")] * 8
    assert Plan({}).resolve("x", n_heads=3) == [HeadSpec("dense")] * 3


def test_resolved_specs_build_site_masks():
    plan = _mixed_plan()
    for s in SITES:
        mask = site_mask_mod(plan.resolve(s.name), s.n_heads, 100, 100)
        assert mask.__name__


def test_site_info_accepts_any_object_with_the_attributes():
    ns = [SimpleNamespace(name=s.name, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, head_dim=s.head_dim, extra=1) for s in SITES]
    plan = Plan.uniform(SimpleNamespace(sites=ns), "causal")
    plan.validate(ns)
    assert plan.fingerprint.sites == tuple(SITES)
    with pytest.raises(TypeError, match="needs name, n_heads, n_kv_heads, head_dim"):
        Plan.uniform([SimpleNamespace(name="x")], "causal")
    with pytest.raises(ValueError, match="repeated"):
        Plan.uniform(SITES + SITES[:1], "causal")


# ---------------------------------------------------------------------------------------------
# JSON and files


@pytest.mark.parametrize(
    "plan",
    [
        Plan.uniform(SITES, "streaming", window=256),
        _mixed_plan(),
        Plan({NAMES[0]: SitePlan.same("razor", ratio=4.0, retrieval=True)}),  # no fingerprint
    ],
)
def test_json_round_trip(plan):
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert back.to_json() == text
    assert json.loads(text)["lcpass_plan"] == 1


def test_json_compact_and_per_head_forms():
    data = _mixed_plan().to_dict()
    assert data["sites"][NAMES[0]] == {"all": {"method": "dense", "params": {}}}
    assert len(data["sites"][NAMES[1]]["heads"]) == 8
    assert data["fingerprint"]["sites"][0] == {"name": NAMES[0], "n_heads": 8, "n_kv_heads": 2, "head_dim": 64}


def test_save_load_and_file_errors(tmp_path):
    plan = _mixed_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json' does not exist"):
        Plan.load(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"lcpass_plan": 1, "sites": {')
    with pytest.raises(ValueError, match=r"corrupt.json' is not a valid lcpass plan: plan is not valid JSON"):
        Plan.load(corrupt)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"lcpass_plan": 1, "sites": {"a": {"heads": [{"params": {}}]}}}))
    with pytest.raises(ValueError, match=r"wrong.json'.*sites\['a'\].heads\[0\] must be"):
        Plan.load(wrong)
    with pytest.raises(ValueError, match="format version 7 is not supported"):
        Plan.from_dict({"lcpass_plan": 7, "sites": {}})


# ---------------------------------------------------------------------------------------------
# validation


def test_validate_accepts_its_own_model():
    _mixed_plan().validate(SITES)


def test_plan_for_another_model_is_refused_naming_first_mismatch():
    plan = Plan.uniform(SITES, "causal")
    other = list(SITES)
    other[2] = SiteInfo(NAMES[2], 8, 2, 128)
    other[4] = SiteInfo(NAMES[4], 16, 2, 64)
    with pytest.raises(ValueError, match=r"site 'model.layers.2.self_attn': head_dim is 64 in the plan but 128 in the model"):
        plan.validate(other)
    with pytest.raises(ValueError, match=r"site #0 is 'model.layers.0.self_attn' in the plan but 'blocks.0.attn'"):
        plan.validate([SiteInfo("blocks.0.attn", 8, 2, 64)] + SITES[1:])
    with pytest.raises(ValueError, match="has 6 attention sites, this model has 4"):
        plan.validate(SITES[:4])
    named = Plan(plan.sites, ModelFingerprint(plan.fingerprint.sites, "SmolLM2-135M"))
    with pytest.raises(ValueError, match="made for 'SmolLM2-135M'.*n_kv_heads is 2 in the plan but 4"):
        named.validate([SiteInfo(n, 8, 4, 64) for n in NAMES])


def test_validate_without_fingerprint_checks_sites_heads_and_params():
    with pytest.raises(ValueError, match=r"plan site 'model.layers.7.self_attn' is not in the model; the model's sites: 'model.layers.0"):
        Plan({"model.layers.7.self_attn": SitePlan.same("causal")}).validate(SITES)
    with pytest.raises(ValueError, match=r"lists 3 head specs but the site has 8 heads"):
        Plan({NAMES[0]: SitePlan((HeadSpec("causal"),) * 3)}).validate(SITES)
    with pytest.raises(ValueError, match=r"plan site 'model.layers.1.self_attn' head 2: streaming: parameter 'window' = -4"):
        heads = [HeadSpec("streaming", {"window": -4 if h == 2 else 8}) for h in range(8)]
        Plan({NAMES[1]: SitePlan(tuple(heads))}).validate(SITES)
    with pytest.raises(ValueError, match=r"plan site 'model.layers.0.self_attn': unknown attention method 'sparse'; known methods: dense, causal"):
        Plan({NAMES[0]: SitePlan.same("sparse")}).validate(SITES)
    with pytest.raises(ValueError, match=r"plan site 'model.layers.0.self_attn': s2: vert_stride=16 exceeds the site's 8 heads"):
        Plan({NAMES[0]: SitePlan.same("s2", vert_stride=16)}).validate(SITES)


def test_loaded_plan_with_bad_params_fails_validation(tmp_path):
    path = tmp_path / "p.json"
    Plan({NAMES[0]: SitePlan.same("dilated", dilation=0)}).save(path)
    with pytest.raises(ValueError, match=r"'dilation' = 0 is out of range; allowed: dilation >= 1"):
        Plan.load(path).validate(SITES)


def test_causal_methods_refused_on_bidirectional_sites():
    encoder = [SiteInfo(f"encoder.layer.{i}.attention.self", 4, 4, 32, is_causal=False) for i in range(2)]
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.self' is bidirectional.*heads \[0, 1, 2, 3\].*'streaming'"):
        Plan.uniform(encoder, "streaming", window=8).validate(encoder)
    Plan.uniform(encoder, "dense").validate(encoder)
    Plan.uniform(encoder, "longlora", group_size=8, causal=False).validate(encoder)
    mixed = Plan({encoder[0].name: SitePlan((HeadSpec("dense"),) + (HeadSpec("causal"),) * 3)})
    with pytest.raises(ValueError, match=r"heads \[1, 2, 3\] use causal plans \(e.g. 'causal'\)"):
        mixed.validate([SiteInfo(encoder[0].name, 4, 4, 32, is_causal=False)])
    # the flag is part of the fingerprint and survives JSON
    plan = Plan.uniform(encoder, "dense")
    assert Plan.from_json(plan.to_json()).fingerprint.sites[0].is_causal is False
    decoder = [SiteInfo(s.name, 4, 4, 32, is_causal=True) for s in encoder]
    with pytest.raises(ValueError, match="is_causal is False in the plan but True in the model"):
        plan.validate(decoder)


@pytest.mark.parametrize("zoo_name,causal", [("llama-tiny", True), ("bert-tiny", False)])
def test_plans_validate_against_detected_sites(zoo_name, causal):
    """The detector's sites (lcpass.patterns Detection) plug straight into presets and validation."""
    from lcpass import zoo
    from lcpass.capture import capture
    from lcpass.patterns import canonicalize

    zm = zoo.get_zoo_model(zoo_name)
    ex = zm.example_inputs
    cap = capture(zm.model, kwargs=ex) if isinstance(ex, dict) else capture(zm.model, tuple(ex))
    found = canonicalize(cap.gm, cap.flat_inputs, cap.param_placeholders)
    assert found.sites
    Plan.uniform(found, "dense").validate(found)
    first = found.sites[0]
    plan = Plan.duo(found, {first.name: [0]}, sink=2, recent=8)
    assert plan.fingerprint.sites[0] == SiteInfo(first.name, first.n_heads, first.n_kv_heads, first.head_dim, causal)
    if causal:
        plan.validate(found)
    else:
        with pytest.raises(ValueError, match=f"{first.name}' is bidirectional"):
            plan.validate(found)


# ---------------------------------------------------------------------------------------------
# what a door asks for: Plan.request / PlanRequest.for_sites, the one check every door makes


def test_request_checks_the_arguments_once_and_names_the_door(tmp_path):
    with pytest.raises(ValueError, match="^lcpass.export: pass exactly one of method='name'"):
        Plan.request(None, None, door="lcpass.export")
    with pytest.raises(ValueError, match="exactly one of --method NAME .* or --plan FILE"):
        Plan.request("dense", "plan.json", door="lcpass export", method_flag="--method NAME (see x)",
                     plan_flag="--plan FILE")
    with pytest.raises(ValueError, match="window"):
        Plan.request("streaming", None, {"window": -3}, door="lcpass.optimize")
    with pytest.raises(ValueError, match=r"parameters \['sink'\] go with method='name', not with plan="):
        Plan.request(None, Plan.uniform(SITES, "dense"), {"sink": 4}, door="lcpass.optimize")
    with pytest.raises(FileNotFoundError, match="plan file"):
        Plan.request(None, tmp_path / "missing.json", door="lcpass.optimize")
    with pytest.raises(ValueError, match="plan must be a Plan or a path"):
        Plan.request(None, 3, door="lcpass.optimize")
    with pytest.raises(ValueError, match="dense_first=-1 must be an int >= 0"):
        Plan.request("dense", None, door="lcpass optimize", dense_first=-1)


def test_request_builds_the_same_plan_as_the_presets(tmp_path):
    req = Plan.request("streaming", None, {"sink": 4, "window": 256}, door="lcpass.optimize", dense_last=2)
    plan = req.for_sites(SITES)
    assert plan == Plan.uniform(SITES, "streaming", sink=4, window=256).dense_layers(last=2)
    assert Plan.request(None, req, door="other door") is req  # a checked request passes through
    path = tmp_path / "p.json"
    plan.save(path)
    assert Plan.request(None, path, door="lcpass.optimize").for_sites(SITES) == plan
    assert Plan.from_args(SITES, "dense") == Plan.uniform(SITES, "dense")
    with pytest.raises(ValueError, match="causal plans"):  # validated against the sites it is built for
        Plan.from_args([SiteInfo("enc", 2, 2, 8, False)], "streaming", sink=1, window=4)
