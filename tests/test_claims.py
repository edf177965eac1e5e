"""The claim checker (autobuild.claims) and its evidence (autobuild.evidence) on tiny synthetic evidence whose
right verdict is known by construction."""
from __future__ import annotations

import json

import numpy as np
import pytest

from autobuild.claims import (FAILS, HOLDS, NOT_APPLICABLE, UNSURE, LayerSource, MethodSource, backbone_kind,
                              check_claims, combine, compare_testbeds, percentiles)

# a small U-Net-like op map: global time MLP, two res blocks with time/condition projections, down/up, head
UNET_OPS = {"t0": "t-Embed", "t1": "t-Embed", "in": "Conv-In", "r0a": "Res-In", "r0t": "Res-tEmb", "r0c": "Res-cEmb",
            "r0b": "Res-Out", "down": "Down", "r1a": "Res-In", "r1t": "Res-tEmb", "r1c": "Res-cEmb", "r1b": "Res-Out",
            "up": "Up", "out": "Conv-Out"}
DIT_OPS = {"t0": "t-Embed", "t1": "t-Embed", "patch": "Patchify", "out": "Out",
           **{f"b{b}.{op}": op for b in range(3) for op in ("AdaLN", "SA-Q", "SA-K", "SA-V", "SA-Out", "FF1", "FF2")}}
DIT_BLOCKS = {k: k.split(".")[0] if "." in k else "global" for k in DIT_OPS}


def _values(ops, high=(), low=(), seed=0):
    """Fresh random sensitivities; the ``high`` layers above every other, the ``low`` ones below."""
    rng = np.random.default_rng(seed)
    values = {k: float(rng.uniform(1.0, 2.0)) for k in ops}
    for i, k in enumerate(high):
        values[k] = 10.0 + i
    for i, k in enumerate(low):
        values[k] = -10.0 - i
    return values


def _claim(claims, cid):
    return next(c for c in claims if c.id == cid)


def test_percentiles_by_hand():
    pct = percentiles({"a": 3.0, "b": 1.0, "c": 2.0, "d": 2.0, "e": float("nan")})
    # a out-ranks 3 of the other 3; b none; c and d out-rank b and tie each other (half)
    assert pct == {"a": 1.0, "b": 0.0, "c": pytest.approx(1.5 / 3), "d": pytest.approx(1.5 / 3)}


def test_backbone_from_ops():
    assert backbone_kind(UNET_OPS) == "U-Net"
    assert backbone_kind(DIT_OPS) == "transformer"
    assert backbone_kind({"a": "Conv-In", "b": "Conv", "c": "t-Embed"}) == "other"


def test_combine_rule():
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, UNSURE]) == HOLDS  # an inconclusive source does not veto
    assert combine([HOLDS, FAILS]) == UNSURE  # contradicting sources
    assert combine([UNSURE, NOT_APPLICABLE]) == UNSURE
    assert combine([NOT_APPLICABLE]) == NOT_APPLICABLE


@pytest.mark.parametrize("where, expected", [("top", HOLDS), ("bottom", FAILS), ("middle", UNSURE)])
def test_time_embedding_verdict_follows_the_figures(where, expected):
    keys = list(UNET_OPS)
    values = _values(UNET_OPS, high=("t0", "t1") if where == "top" else (), low=("t0", "t1") if where == "bottom" else ())
    if where == "middle":  # 8th and 9th least sensitive of 14: mean percentile 7.5/13 = 0.58, between the rules
        order = [k for k in keys if k not in ("t0", "t1")]
        values = {k: float(i) for i, k in enumerate(order[:7] + ["t0", "t1"] + order[7:])}
    claims = check_claims(UNET_OPS, [LayerSource("model", values), LayerSource("sweeps", values)])
    claim = _claim(claims, "t_embed")
    assert claim.verdict == expected
    assert "t0" in claim.by_source[0]["summary"] and "mean percentile" in claim.by_source[0]["summary"]


def test_contradicting_sources_are_inconclusive_and_secondary_sources_do_not_vote():
    top, bottom = _values(UNET_OPS, high=("t0", "t1")), _values(UNET_OPS, low=("t0", "t1"))
    claims = check_claims(UNET_OPS, [LayerSource("model", top), LayerSource("sweeps", bottom)])
    assert _claim(claims, "t_embed").verdict == UNSURE
    assert "contradict" in _claim(claims, "t_embed").summary
    claims = check_claims(UNET_OPS, [LayerSource("model", top), LayerSource("other model", bottom, primary=False)])
    assert _claim(claims, "t_embed").verdict == HOLDS


def test_condition_vs_time_and_resblocks():
    values = _values(UNET_OPS, high=("t0", "t1", "r0t", "r1t"), low=("r0c", "r1c"))
    claims = check_claims(UNET_OPS, [LayerSource("model", values)])
    assert _claim(claims, "c_embed").verdict == HOLDS
    flipped = _values(UNET_OPS, high=("r0c", "r1c"), low=("t0", "t1", "r0t", "r1t"))
    assert _claim(check_claims(UNET_OPS, [LayerSource("model", flipped)]), "c_embed").verdict == FAILS
    # no transformer layers in this U-Net: the ResNet-vs-transformer claim cannot be checked
    assert _claim(claims, "resblocks").verdict == NOT_APPLICABLE
    mixed = {**UNET_OPS, "a.q": "SA-Q", "a.k": "SA-K", "a.ff": "FF1"}
    res_high = _values(mixed, high=[k for k, o in mixed.items() if o.startswith("Res-")], low=("a.q", "a.k", "a.ff"))
    assert _claim(check_claims(mixed, [LayerSource("m", res_high)]), "resblocks").verdict == HOLDS


def test_output_head_and_sa_q_vs_k():
    values = _values(DIT_OPS, high=("out",))
    for b in range(3):  # SA-Q below SA-K in every block
        values[f"b{b}.SA-Q"], values[f"b{b}.SA-K"] = 0.5, 0.7
    claims = check_claims(DIT_OPS, [LayerSource("model", values)], blocks=DIT_BLOCKS)
    assert _claim(claims, "out_head").verdict == HOLDS
    assert _claim(claims, "sa_q_k").verdict == HOLDS and "3 of 3 blocks" in _claim(claims, "sa_q_k").by_source[0]["summary"]
    values["b0.SA-Q"], values["b1.SA-Q"] = 0.9, 0.9  # SA-Q less sensitive in only 1 of 3 blocks
    assert _claim(check_claims(DIT_OPS, [LayerSource("m", values)], blocks=DIT_BLOCKS), "sa_q_k").verdict == FAILS
    # a model without SA layers or head
    plain = {"a": "Conv-In", "b": "Conv", "c": "t-Embed"}
    claims = check_claims(plain, [LayerSource("m", {"a": 1.0, "b": 2.0, "c": 3.0})])
    assert _claim(claims, "sa_q_k").verdict == NOT_APPLICABLE and _claim(claims, "methods").verdict == NOT_APPLICABLE


def test_method_preference_depends_on_the_backbone():
    uaq_wins = MethodSource("uniform", {"4-bit": {"mse": 60.0, "kmeans": 70.0, "kmeans_all": 80.0},
                                        "3-bit": {"mse": 150.0, "kmeans": 300.0, "kmeans_all": 700.0}})
    values = [LayerSource("m", _values(UNET_OPS))]
    assert _claim(check_claims(UNET_OPS, values, [uaq_wins]), "methods").verdict == HOLDS  # U-Net: UAQ expected
    dit_values = [LayerSource("m", _values(DIT_OPS))]
    assert _claim(check_claims(DIT_OPS, dit_values, [uaq_wins]), "methods").verdict == FAILS  # DiT: K-Means expected
    split = MethodSource("uniform", {"4-bit": {"mse": 60.0, "kmeans": 50.0, "kmeans_all": 80.0},
                                     "3-bit": {"mse": 150.0, "kmeans": 100.0, "kmeans_all": 700.0}})
    claim = _claim(check_claims(DIT_OPS, dit_values, [split]), "methods")
    assert claim.verdict == UNSURE and "2 of 4" in claim.by_source[0]["summary"]


def test_compare_testbeds():
    dit = check_claims(DIT_OPS, [LayerSource("model (x)", _values(DIT_OPS, high=("out",)))], blocks=DIT_BLOCKS)
    unet = check_claims(UNET_OPS, [LayerSource("model (y)", _values(UNET_OPS, low=("out",)))])
    result = compare_testbeds({"d": {"backbone": "transformer", "claims": [c.as_dict() for c in dit]},
                               "u": {"backbone": "U-Net", "claims": [c.as_dict() for c in unet]}})
    assert result["verdict"] == HOLDS and "d head percentile 1.00 vs u 0.00" in result["summary"]
    reverse = compare_testbeds({"d": {"backbone": "transformer", "claims": [c.as_dict() for c in unet]},
                                "u": {"backbone": "U-Net", "claims": [c.as_dict() for c in dit]}})
    assert reverse["verdict"] == FAILS
    assert compare_testbeds({"d": {"backbone": "transformer", "claims": []}})["verdict"] == NOT_APPLICABLE


# ------------------------------------------------------------------------------------------ evidence
def _space(keys):
    from autobuild.optimize import Space
    from multiquant.options import OptionTable

    rng = np.random.default_rng(3)
    table = {}
    for key in keys:
        base = float(rng.uniform(1e-3, 1e-2))
        table[key] = {f"{m}-{b}": [f"{m}-{b}", 2000, 2000 * b // 16 + {"mse": 20, "kmeans": 60, "kmeans_all": 8}[m],
                                   base * (2.5 if b == 3 else 1.0)]
                      for m in ("mse", "kmeans", "kmeans_all") for b in (4, 3)}
    return Space.of(OptionTable(table, 16))


def test_dataset_model_finds_the_planted_layer_and_method(one_thread):
    """FID = exp(sum of per-layer penalties): layer t0 costs 1.0 log FID at 3 bits, the others 0.05; K-Means costs
    0.3 more than UAQ everywhere. The model must rank t0 first and prefer UAQ (so, on a U-Net: the claims hold)."""
    from autobuild.evidence import dataset_model, dataset_sources, testbed_insights

    keys = list(UNET_OPS)
    space = _space(keys)
    rng = np.random.default_rng(7)
    records = []
    for _ in range(150):
        config = {k: f"{rng.choice(['mse', 'kmeans', 'kmeans_all'])}-{rng.choice([3, 4])}" for k in keys}
        log_fid = sum((1.0 if k == "t0" else 0.05) * config[k].endswith("-3") + 0.03 * (not config[k].startswith("mse"))
                      for k in keys)
        records.append({"config": config, "FID-GT-1k": float(20 * np.exp(log_fid + rng.normal(0, 0.02)))})
    fit = dataset_model(space, records)
    assert fit["cv_srcc_log_fid"]["ridge"] > 0.9
    assert max(fit["effects"], key=fit["effects"].get) == "t0"
    assert fit["effects"]["t0"] == pytest.approx(1.0, abs=0.15)  # the planted log-FID step, in its units
    layer, method = dataset_sources(fit)
    out = testbed_insights(UNET_OPS, {k: k for k in keys}, [(layer, method, fit["cv_srcc_log_fid"][fit["best_model"]])])
    verdicts = {c["id"]: c["verdict"] for c in out["claims"]}
    assert verdicts["methods"] == HOLDS  # UAQ preferred on a U-Net backbone
    assert out["sensitive_parts"][layer.name]["layers"][0]["layer"] == "t0"


def test_load_sweeps_three_formats(tmp_path):
    from autobuild.evidence import load_sweeps, sweep_sources

    (tmp_path / "a.json").write_text(json.dumps({"settings": {"method": "mse", "bits": 3},
                                                 "layers": [{"key": "x", "fid_degradation": 5.0},
                                                            {"key": "y", "fid_degradation": 1.0}]}))
    (tmp_path / "b.json").write_text(json.dumps({"settings": {"fid_against": "fp", "num_prompts": 10},
                                                 "rankings": {"kmeans-3": [{"key": "x", "fid_fp": 2.0},
                                                                           {"key": "y", "fid_fp": 3.0}]}}))
    (tmp_path / "c.json").write_text(json.dumps({"sweeps": {"images": 10, "metric": "FID-FP",
                                                            "ranking": [{"layer": "z", "degradation": 9.0}]}}))
    sweeps = load_sweeps([tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"])
    assert sweeps["per_method"] == {"mse": {"x": 5.0, "y": 1.0}, "kmeans": {"x": 2.0, "y": 3.0}}
    assert sweeps["worst"] == {"x": 5.0, "y": 3.0, "z": 9.0}
    layer, method = sweep_sources(sweeps, 3)
    assert layer.values["z"] == 9.0 and method.contests == {"x @3-bit": {"mse": 5.0, "kmeans": 2.0},
                                                             "y @3-bit": {"mse": 1.0, "kmeans": 3.0}}
    from multiquant.errors import InputError

    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(InputError):
        load_sweeps([tmp_path / "d.json"])


def test_layer_roles_of_a_plain_module(one_thread):
    """A user's plain nn.Module: ops come from the module tree, so the time-MLP claim is checkable there too."""
    import module_family
    from autobuild.dag.trace import build_dag
    from autobuild.evidence import layer_roles

    ops, blocks = layer_roles(build_dag(module_family.ToyDenoiser(), module_family.FAMILY))
    assert sorted(k for k, o in ops.items() if o == "t-Embed") == ["model.time_mlp.0.weight_quantizer",
                                                                    "model.time_mlp.2.weight_quantizer"]
    values = _values(ops, low=[k for k, o in ops.items() if o == "t-Embed"])
    claims = check_claims(ops, [LayerSource("sweeps", values)], blocks=blocks)
    assert _claim(claims, "t_embed").verdict == FAILS
    assert _claim(claims, "methods").verdict == NOT_APPLICABLE  # neither a U-Net nor a transformer


def test_near_tied_models_both_decide():
    """Two models validated within 0.01 SRCC of each other both count; a clearly worse one is only shown."""
    from autobuild.evidence import testbed_insights

    top, bottom = _values(UNET_OPS, high=("t0", "t1")), _values(UNET_OPS, low=("t0", "t1"))
    tied = testbed_insights(UNET_OPS, {}, [(LayerSource("a", top), None, 0.986), (LayerSource("b", bottom), None, 0.985)])
    claim = next(c for c in tied["claims"] if c["id"] == "t_embed")
    assert claim["verdict"] == UNSURE and tied["primary_models"] == ["a", "b"]
    apart = testbed_insights(UNET_OPS, {}, [(LayerSource("a", top), None, 0.80), (LayerSource("b", bottom), None, 0.63)])
    assert next(c for c in apart["claims"] if c["id"] == "t_embed")["verdict"] == HOLDS
    assert apart["primary_models"] == ["a"]
