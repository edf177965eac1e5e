"""Unit scores, budgeted configurations (exact knapsack), insights, report and the demo's predictor stage."""
from __future__ import annotations

import itertools
import json
import math
import pickle

import numpy as np
import pytest
import torch

from autobuild.configs import (BudgetError, Knapsack, build_config, config_for_budget, knapsack_from_scores,
                               pareto_front, pareto_prune, plot_pareto, score_config, solve_knapsack)
from autobuild.scores import UnitScores, UnitScoreSet, enumerate_variants
from multiquant.options import Option, OptionTable

torch.set_num_threads(1)
METHODS = ("mse", "kmeans", "kmeans_all")
OPTIONS = [f"{m}-{b}" for b in (4, 3) for m in METHODS]


# ------------------------------------------------------------------------------------------ fixtures
def _tiny_table(seed: int = 0):
    """Option table of the tiny MNIST DiT by the reference's size formulas (no quantization run)."""
    from multiquant.families import get_family
    from multiquant.layers import quantizable_layers

    family = get_family("mnist_dit")
    layers = quantizable_layers(family.build("tiny"), family)
    rng = np.random.default_rng(seed)
    table = {}
    for ref in layers:
        if ref.tied_to:
            table[ref.key] = table[ref.tied_to]
            continue
        base = rng.uniform(1e-4, 1e-2)
        table[ref.key] = {}
        for option in OPTIONS:
            method, bits = option.rsplit("-", 1)
            error = base * {"mse": 1.0, "kmeans": 0.4, "kmeans_all": 0.7}[method] * (2.2 if bits == "3" else 1.0)
            size = Option(method, int(bits)).nbytes(ref.numel, ref.channels, 16)
            table[ref.key][option] = [option, ref.numel * 2, size, error]
    return family, layers, OptionTable(table, 16)


def _tiny_cache(n: int, seed: int = 0):
    """Random configurations with FID = weighted per-layer penalties (three layers much more sensitive)."""
    from multiquant.config import config_record, sample_random_config

    family, layers, table = _tiny_table(seed)
    canonical = [r.key for r in layers if not r.tied_to]
    rng = np.random.default_rng(seed)
    sensitivity = {k: 0.05 for k in canonical}
    for k in rng.choice(canonical, 3, replace=False):
        sensitivity[k] = 3.0
    penalty = {"mse": 1.0, "kmeans": 0.3, "kmeans_all": 0.6}
    records = []
    for i in range(n):
        config = sample_random_config(layers, seed, i)
        record = config_record(config, table.table, 16, table.fp_bytes)
        fid = sum(sensitivity[k] * penalty[config[k].rsplit("-", 1)[0]] * (3.0 if config[k].endswith("-3") else 1.0)
                  for k in canonical)
        record.update({"FID-GT-1k": 10 + fid + rng.normal(0, 0.2), "index": i, "architecture": "mnist_dit"})
        records.append(record)
    return family, layers, table, records


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few-epoch predictor on the tiny model's DAG and its unit scores (shared by the end-to-end tests)."""
    from autobuild.dag import family_dag, units
    from autobuild.scores import unit_scores_for
    from autobuild.train import TrainOptions, train_predictor

    family, layers, table, records = _tiny_cache(60)
    root = tmp_path_factory.mktemp("predictor")
    graph = family_dag("mnist_dit", "tiny")
    metrics = train_predictor(records, graph, "-1*FID-GT-1k", folds=2, epochs=4, batch_size=30, seed=0,
                              out_dir=root / "pred", units=units(graph, "block"), log=None,
                              options=TrainOptions(hidden=16, patience=5, lr=3e-3))
    block = unit_scores_for(root / "pred", graph, table, "block", batch_variants=8192)
    node = unit_scores_for(root / "pred", graph, table, "node")
    cache = root / "quant_cache.pkl"
    cache.write_bytes(pickle.dumps(records, protocol=4))
    return {"root": root, "pred": root / "pred", "graph": graph, "family": family, "layers": layers, "table": table,
            "records": records, "block": block, "node": node, "metrics": metrics, "cache": cache}


# ------------------------------------------------------------------------------------------ knapsack
def _brute_force(costs, values, capacity):
    best = (-np.inf, None)
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        if sum(int(c[i]) for c, i in zip(costs, choice)) <= capacity:
            score = sum(float(v[i]) for v, i in zip(values, choice))
            best = max(best, (score, choice), key=lambda t: t[0])
    return best


def test_milp_is_feasible_and_optimal_vs_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(25):
        groups = int(rng.integers(2, 5))
        costs = [rng.integers(10, 200, size=int(rng.integers(2, 8))) for _ in range(groups)]
        values = [rng.normal(size=len(c)) for c in costs]
        problem = Knapsack(costs, values, fp_bytes=1600, fp_prec=16)
        low, high = problem.min_bytes, sum(int(c.max()) for c in costs)
        for size in np.linspace(low, high, 6):
            budget = problem.avg_bits(int(size))
            solution = solve_knapsack(problem, budget)
            best, _ = _brute_force(costs, values, problem.capacity(budget))
            assert solution.size <= problem.capacity(budget) and solution.avg_bits <= budget + 1e-12
            assert solution.score == pytest.approx(best, abs=1e-9)


def test_pareto_prune_keeps_exactly_the_non_dominated_variants():
    costs = np.array([5, 3, 3, 8, 6, 5])
    values = np.array([1.0, 0.5, 0.2, 2.0, 0.9, 1.0])
    kept = pareto_prune(costs, values)
    assert kept.tolist() == [1, 0, 3]  # (3, .5), (5, 1.0) [first of the duplicates], (8, 2.0)


def test_budget_below_the_all_minimum_is_a_clear_error():
    problem = Knapsack([np.array([100, 150]), np.array([50, 80])], [np.zeros(2), np.zeros(2)], 800, 16)
    assert problem.avg_bits(problem.min_bytes) == pytest.approx(3.0)
    with pytest.raises(BudgetError, match=r"below the smallest achievable 3\.0000.*at least 3\.000"):
        solve_knapsack(problem, 2.99)
    assert solve_knapsack(problem, 3.0).size == 150


# ------------------------------------------------------------------------------------------ storage
def test_unit_score_storage_round_trip(tmp_path):
    variants = enumerate_variants(3, 6)
    assert variants.shape == (216, 3) and variants.dtype == np.uint8
    assert variants[:3].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2]] and len({tuple(r) for r in variants}) == 216
    units = [UnitScores("b0/attn", "Self-Attn", 0, 3, "out", ["a", "b", "c"], ["SA-Q", "SA-K", "SA-Out"],
                        [[], ["b1"], []], variants, np.random.default_rng(0).normal(size=216).astype(np.float32)),
             UnitScores("x", "Out", -1, 0, "x", ["x"], ["Out"], [[]], enumerate_variants(1, 6),
                        np.arange(6, dtype=np.float32))]
    scores = UnitScoreSet("block", OPTIONS, units, {"family": "toy", "seconds": 1.5})
    scores.save(tmp_path / "unit_scores_block")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit_scores_block.json", "unit_scores_block.safetensors"]
    back = UnitScoreSet.load(tmp_path / "unit_scores_block")
    assert back.level == "block" and back.options == OPTIONS and back.meta == scores.meta
    for a, b in zip(units, back.units):
        assert (a.name, a.type, a.block, a.hops, a.output, a.keys, a.ops, a.aliases) == \
               (b.name, b.type, b.block, b.hops, b.output, b.keys, b.ops, b.aliases)
        assert b.variants.dtype == np.uint8 and b.scores.dtype == np.float32
        assert np.array_equal(a.variants, b.variants) and np.array_equal(a.scores, b.scores)
    with pytest.raises(FileNotFoundError, match="unit_scores_for"):
        UnitScoreSet.load(tmp_path / "missing")


def test_option_table_sources(tmp_path):
    family, layers, table, records = _tiny_cache(40)
    from_records = OptionTable.from_records(records)
    assert from_records.options == OPTIONS and from_records.fp_bytes == table.fp_bytes
    assert all(from_records.table[k] == table.table[k] for k in table.keys)
    options = {k: v[0] for k, v in records[3]["config"].items()}
    assert table.avg_bits(options) == pytest.approx(records[3]["avg_bits"])
    (tmp_path / "t.json").write_text(json.dumps(table.table))
    assert OptionTable.from_source(tmp_path / "t.json").digest() == table.digest()
    with pytest.raises(ValueError, match="never use option"):
        OptionTable.from_records(records[:1])


# ------------------------------------------------------------------------------------------ configurations
def _synthetic_scores(layers, table) -> UnitScoreSet:
    """Node-level scores without a predictor: 4-bit better than 3-bit, K-Means-C best, layer-dependent."""
    rng = np.random.default_rng(1)
    units = []
    for ref in layers:
        if ref.tied_to:
            continue
        aliases = [r.key for r in layers if r.tied_to == ref.key]
        scores = np.array([1.0, 1.2, 1.1, 0.0, 0.3, 0.1]) * rng.uniform(0.5, 2.0)
        units.append(UnitScores(ref.key, "op", -1, 0, ref.key, [ref.key], ["Linear"], [aliases],
                                enumerate_variants(1, 6), scores.astype(np.float32)))
    return UnitScoreSet("node", OPTIONS, units, {"family": "mnist_dit"})


def test_config_written_in_reference_form_and_valid_for_the_model(tmp_path):
    from multiquant.config import load_config, validate_config

    family, layers, table = _tiny_table()
    scores = _synthetic_scores(layers, table)
    built = build_config(None, table, family, 4.0, level="node", out_dir=tmp_path, scores=scores)
    assert built.path == tmp_path / "mnist_dit_40.pkl" and built.path.with_suffix(".json").exists()
    raw = pickle.loads(built.path.read_bytes())
    assert isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values())  # {layer: "method-bits"}
    config = load_config(built.path)
    assert config == load_config(built.path.with_suffix(".json")) == built.config
    from multiquant.config import load_config_origin

    origin = load_config_origin(built.path)
    assert (origin["kind"], origin["budget"], origin["avg_bits"]) == ("built", 4.0, built.avg_bits)
    assert list(config) == [r.key for r in layers]  # every layer, tied copies included, in model order
    validate_config(config, layers, options=OPTIONS)  # raises on a tied copy that disagrees
    for ref in layers:
        if ref.tied_to:
            assert config[ref.key] == config[ref.tied_to]
    assert table.avg_bits(config) == pytest.approx(built.avg_bits) and built.avg_bits <= 4.0
    assert built.predicted_score == pytest.approx(score_config(scores, config))
    # a looser budget never predicts worse; tied copies are costed (the t-embedder counts twice)
    looser, _ = config_for_budget(scores, table, 4.5)
    assert score_config(scores, looser) >= built.predicted_score - 1e-9
    problem = knapsack_from_scores(scores, table)
    t_embed = next(i for i, u in enumerate(scores.units) if u.aliases[0])
    key, alias = scores.units[t_embed].keys[0], scores.units[t_embed].aliases[0][0]
    assert problem.costs[t_embed][0] == table.quant_bytes(key, "mse-4") + table.quant_bytes(alias, "mse-4")


# ------------------------------------------------------------------------------------------ end to end
def test_end_to_end_tiny_predictor_scores_and_budgeted_config(trained, tmp_path):
    from multiquant.config import load_config, validate_config

    block, node, table = trained["block"], trained["node"], trained["table"]
    assert [u.name for u in block.units][:2] == ["transformer_blocks.0.norm1.emb.timestep_embedder/t-embed",
                                                 "transformer_blocks.0/self-attn"]
    assert block.num_variants == sum(6 ** len(u.keys) for u in block.units) == 54576
    assert node.num_variants == 6 * 19 and all(np.isfinite(u.scores).all() for u in block.units)
    assert block.meta["seconds"] > 0 and block.meta["variants_per_second"] > 0
    # the batched scores equal the reference procedure: one isolated unit graph at a time
    from autobuild.dag import unit_subgraph, units
    from autobuild.train import load_ensemble
    from autobuild.pyg import Batch

    ensemble = load_ensemble(trained["pred"])
    unit = units(trained["graph"], "block")[4]  # block 1 feedforward: 36 variants
    stored = next(u for u in block.units if u.name == unit.name)
    template = ensemble.template_for(unit_subgraph(trained["graph"], unit))
    for row in (0, 17, 35):
        config = {k: table.table[k][OPTIONS[i]] for k, i in zip(stored.keys, stored.variants[row])}
        data = template.to_data(config)
        single = ensemble.score_nodes(Batch.from_data_list([data]), torch.tensor([template.num_nodes - 1]), unit.hops)
        assert single[0] == pytest.approx(stored.scores[row], abs=1e-4)
    # cached: a second call reads the files
    from autobuild.scores import unit_scores_for

    again = unit_scores_for(trained["pred"], trained["graph"], table, "block")
    assert again.meta["created"] == block.meta["created"]

    budget = 3.6
    built = build_config(trained["pred"], table, "mnist_dit", budget, out_dir=tmp_path, size="tiny")
    config = load_config(built.path)
    validate_config(config, trained["layers"], options=OPTIONS)
    assert built.avg_bits <= budget and table.avg_bits(config) == pytest.approx(built.avg_bits)
    assert built.predicted_score == pytest.approx(score_config(block, config), abs=1e-4)
    front = pareto_front(block, table, [3.0, 3.3, 3.6, 3.9, 5.0], model="mnist_dit", out_dir=tmp_path)
    assert [p["budget"] for p in front] == [3.3, 3.6, 3.9, 5.0]  # 3.0 is below the tiny model's minimum
    assert all(a["predicted_score"] <= b["predicted_score"] + 1e-9 for a, b in zip(front, front[1:]))
    png = plot_pareto(front, tmp_path / "front.png")
    assert png.stat().st_size > 1000


def test_insights_sensitivity_definition_and_plots(trained, tmp_path):
    from autobuild.insights import config_mix_by_op, layer_sensitivity, op_of_keys, op_sensitivity, write_insights

    node = trained["node"]
    rows = layer_sensitivity(node)
    per_layer = node.layer_scores()
    for row in rows[:3]:
        s = per_layer[row["key"]]
        assert row["sensitivity"] == pytest.approx(s[:3].max() - s[3:].min())  # best 4-bit - worst 3-bit
        assert row["bit_drop"] == pytest.approx(s[:3].max() - s[3:].max())  # best 4-bit - best 3-bit
        assert row["method_spread"] == pytest.approx(s[3:].max() - s[3:].min())  # best - worst 3-bit
    # the two report columns are the two parts of the sensitivity, not one number twice
    assert any(abs(r["bit_drop"] - r["method_spread"]) > 1e-9 for r in rows)
    assert any(abs(r["sensitivity"] - r["method_spread"]) > 1e-9 for r in rows)  # issue 18: not one column twice
    assert [r["sensitivity"] for r in rows] == sorted((r["sensitivity"] for r in rows), reverse=True)
    ops = op_sensitivity(rows)
    assert {o["op"] for o in ops} >= {"SA-Q", "FF1", "t-Embed", "Out"}
    config = {k: "kmeans-3" for k in trained["table"].keys}
    mix = config_mix_by_op(config, op_of_keys(node))
    assert sum(sum(c.values()) for c in mix.values()) == 19  # tied copies counted once
    result = write_insights(tmp_path, node, trained["block"], {"all3": config}, model="mnist_dit")
    assert set(result["plots"]) == {"box_block", "box_unit_type", "box_op", "mix_all3"}
    assert all(p.stat().st_size > 1000 for p in result["plots"].values())
    assert json.loads((tmp_path / "sensitivity.json").read_text())["definition"].startswith("sensitivity")


def test_report_html(trained, tmp_path):
    from autobuild.report import build_report, classify_scored
    from multiquant.config import config_record, uniform_config

    assert classify_scored({"name": "mnist_dit_35", "origin": {"kind": "built", "budget": 3.5}}) == ("built", 3.5)
    assert classify_scored({"name": "greedy_x", "origin": {"kind": "uniform", "budget": None}}) == ("uniform", None)
    assert classify_scored({"name": "mnist_dit_35_search"}) == ("other", None)  # names decide nothing
    table = trained["table"]
    scored = []
    for name, config in [("uniform_mse-4", uniform_config(trained["layers"], "mse-4")),
                         ("fp16", uniform_config(trained["layers"], "fp16"))]:
        record = config_record(config, table.table, 16, table.fp_bytes)
        scored.append({**record, "FID-GT-1k": 12.0, "name": name, "origin": {"kind": name.split("_")[0]}})
    (tmp_path / "scored").mkdir()
    (tmp_path / "scored" / "quant_cache.pkl").write_bytes(pickle.dumps(scored))
    # one-layer sweeps in which the time embedding is the most damaging part: the sweeps' verdict must say so
    from autobuild.dag import family_dag
    from autobuild.evidence import layer_roles

    ops, _ = layer_roles(family_dag("mnist_dit", "tiny"))
    rng = np.random.default_rng(5)
    sweep = {"settings": {"method": "mse", "bits": 3},
             "layers": [{"key": k, "fid_degradation": 50.0 + rng.uniform() if op == "t-Embed" else rng.uniform()}
                        for k, op in ops.items()]}
    (tmp_path / "sweeps.json").write_text(json.dumps(sweep))
    page = build_report(trained["pred"], trained["cache"], tmp_path / "report", [tmp_path / "scored"], table=table,
                        model="mnist_dit", size="tiny", budgets=[3.4, 3.8], log=None, sweeps=[tmp_path / "sweeps.json"])
    text = page.read_text()
    assert "the paper's claims" in text and "holds" in text
    claims = {c["id"]: c for c in json.loads((tmp_path / "report" / "report.json").read_text())["insights"]["claims"]}
    assert set(claims) == {"t_embed", "c_embed", "methods", "resblocks", "out_head", "sa_q_k"}
    sweeps_view = next(s for s in claims["t_embed"]["by_source"] if s["source"] == "one-layer sweeps")
    assert sweeps_view["verdict"] == "holds"
    assert sorted(r["rank"] for r in sweeps_view["figures"]["layers"].values()) == [1, 2]  # the two t-Embed layers
    assert claims["resblocks"]["verdict"] == "not applicable"  # a DiT has no ResNet blocks
    for needle in ("Predictor", "Pareto front (predicted)", "Measured MNIST-FID", "Sensitivity insights",
                   "data:image/png;base64", "uniform_mse-4", "Most sensitive layers"):
        assert needle in text
    summary = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [p["budget"] for p in summary["pareto"]] == [3.4, 3.8]
    # predictions in the target's units beside the unitless unit-score sum, and a warning off the training data
    assert "predicted target (" in text and "unit-score sum (no unit)" in text
    rows = {r["name"]: r for r in summary["scored"]}
    assert math.isfinite(rows["uniform_mse-4"]["predicted_target"])
    assert "outside the training data" in text and rows["fp16"]["outside_training"]
    assert (tmp_path / "report" / "configs" / "mnist_dit_34.pkl").exists()


def test_cli_build_config(trained, tmp_path, capsys):
    from qua2sedimo.cli import main

    (tmp_path / "table.json").write_text(json.dumps(trained["table"].table))
    assert main(["build-config", "--predictor", str(trained["pred"]), "--mq", str(tmp_path / "table.json"),
                 "--size", "tiny", "--avg_bits", "3.7", "--pareto", "--budgets", "3.4,3.8", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "mnist_dit_37.pkl").exists() and (tmp_path / "mnist_dit_pareto_block.png").exists()
    front = json.loads((tmp_path / "mnist_dit_pareto_block.json").read_text())["front"]
    assert [p["budget"] for p in front] == [3.4, 3.8]
    capsys.readouterr()
    assert main(["build-config", "--predictor", str(trained["pred"]), "--mq", str(tmp_path / "table.json"),
                 "--size", "tiny", "--avg_bits", "1.0", "--out", str(tmp_path)]) == 2  # a BudgetError: one line
    assert "error: " in (err := capsys.readouterr().err) and "below the smallest achievable" in err


def test_default_budgets_are_the_papers_where_the_model_reaches_them_else_priced_with_its_tables(capsys):
    """Two layers of 100 FP bytes at fp16 (avg bits = 0.08 x bytes): cheapest 3-bit 30 + 40 bytes = 5.6 bits,
    cheapest 4-bit 40 + 50 = 7.2, dearest 120 + 200 = 25.6. The paper's 3.3-3.9 lie below every configuration: b
    bits is priced 5.6 + (b - 3) x (7.2 - 5.6). A testbed reaches all of them: they come back unchanged; budgets
    given stay as given."""
    from autobuild.configs import (DEFAULT_PARETO_BUDGETS, DEFAULT_SEARCH_BUDGETS, budgets_or_default,
                                   default_budgets, parse_budgets)
    from multiquant.errors import InputError
    from multiquant.paths import multiquantizer_path

    costs = {"a": {"mse-4": 40, "kmeans-4": 120, "mse-3": 30, "kmeans-3": 80},
             "b": {"mse-4": 50, "kmeans-4": 200, "mse-3": 40, "kmeans-3": 60}}
    table = OptionTable({k: {o: [o, 100, c, 0.1] for o, c in per.items()} for k, per in costs.items()}, 16)
    budgets, why = default_budgets(table, (3.3, 3.5, 3.9, 4.2))
    assert budgets == [6.08, 6.4, 7.04, 7.52]
    assert why.startswith("this model's configurations cost 5.60-25.60 avg bits") and "all-4-bit 7.20" in why
    # one width only: b bits costs b / 4 of the cheapest all-4-bit configuration, and nothing costs less than it
    four = OptionTable({k: {o: v for o, v in per.items() if o.endswith("-4")} for k, per in table.table.items()}, 16)
    assert default_budgets(four, (3.3, 4.0, 4.4))[0] == [7.2, 7.92]
    # budgets never fall below the cheapest configuration (extrapolated past the widths)
    assert default_budgets(table, (2.0, 3.5))[0] == [5.6, 6.4]
    for name in ("mnist_dit", "mnist_unet"):  # the testbeds reach every paper budget: today's defaults
        mq = multiquantizer_path(f"{name}_mq.safetensors")
        for paper in (DEFAULT_PARETO_BUDGETS, DEFAULT_SEARCH_BUDGETS):
            assert default_budgets(mq, paper) == (list(paper), default_budgets(mq, paper)[1])
            assert default_budgets(mq, paper)[1].startswith("the paper's, all within this model's 3.0")
    assert budgets_or_default(parse_budgets("3.3, 99"), table, DEFAULT_SEARCH_BUDGETS) == [3.3, 99.0]
    assert capsys.readouterr().out == ""  # budgets given: nothing chosen, nothing said
    assert budgets_or_default(parse_budgets(None), table, (3.3, 3.9)) == [6.08, 7.04]
    assert capsys.readouterr().out.startswith("budgets 6.08, 7.04 avg bits (no --budgets given: this model's")
    for bad in ("", "3.5,x"):
        with pytest.raises(InputError, match="expected a comma list of average bits"):
            parse_budgets(bad)


def test_build_config_and_training_print_progress_with_eta_off_a_terminal(trained, tmp_path, capsys, monkeypatch):
    """Piped output (capsys: not a terminal) gets plain progress lines with rate and ETA: unit scoring counted in
    variants (a large unit is most of the work), each Pareto budget, the epochs of a fold."""
    from autobuild.configs import pareto_front
    from autobuild.scores import unit_scores_for
    from autobuild.train import TrainOptions, train_predictor

    monkeypatch.setenv("QUA2SEDIMO_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("QUA2SEDIMO_PROGRESS", raising=False)
    capsys.readouterr()
    scores = unit_scores_for(trained["pred"], trained["graph"], trained["table"], "block", path=tmp_path / "scores",
                             recompute=True, batch_variants=8192, log=None)
    total = sum(len(u.scores) for u in scores.units)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unit scores (")]
    assert len(lines) > len(scores.units)  # a line per batch of variants (the 46,656-variant unit: six)
    assert f"/{total} (" in lines[0] and " variant/s, ETA " in lines[0]
    assert lines[-1].endswith(" s") and f": {total}/{total} (100%)" in lines[-1] and "done in" in lines[-1]
    pareto_front(scores, trained["table"], [3.4, 3.6, 3.8], log=print)
    out = capsys.readouterr().out
    assert "(budgets: 1/3 (33%)" in out and ", ETA " in out and "(budgets: 3/3 (100%)" in out
    _, _, _, records = _tiny_cache(20, seed=4)
    train_predictor(records, trained["graph"], "-1*FID-GT-1k", folds=2, epochs=3, batch_size=10, seed=0,
                    out_dir=tmp_path / "pred", log=print,
                    options=TrainOptions(hidden=8, patience=5, linear_prior=False))  # the epochs' lines: no prior fits
    out = capsys.readouterr().out
    assert "(epochs: 1/3 (33%)" in out and "epoch/s, ETA " in out and "early stopping may end the fold sooner" in out
    assert "folds: 2/2 (100%)" in out


def test_predictor_stage_tiny(tmp_path):
    from autobuild.pipeline import StageSettings, predictor_stage

    _, _, _, records = _tiny_cache(60, seed=2)
    cache = tmp_path / "quant_cache.pkl"
    cache.write_bytes(pickle.dumps(records, protocol=4))
    settings = StageSettings(folds=2, epochs=3, patience=3, hidden=16, batch_size=20, lr=3e-3, workers=1, samples=0)
    summary = predictor_stage(cache, tmp_path / "out", settings=settings, budgets=(3.5, 3.7), size="tiny", log=None)
    assert set(summary["predictor"]) >= {"srcc_mean", "ndcg10_mean"}
    assert [p["budget"] for p in summary["pareto"]] == [3.5, 3.7]
    assert all(p["avg_bits"] <= p["budget"] for p in summary["pareto"])
    assert (tmp_path / "out" / "report" / "index.html").exists()
    assert (tmp_path / "out" / "quant_configs" / "mnist_dit_35.pkl").exists()


def test_sample_grids_fp16_vs_quantized(tmp_path):
    from autobuild.report import render_samples
    from multiquant.checkpoint import MultiQuantizer
    from multiquant.config import uniform_config
    from multiquant.families import get_family

    family = get_family("mnist_dit")
    denoiser = family.build("tiny")  # the tiny pipeline's denoiser (same seed)
    mq = MultiQuantizer.build(denoiser, family, kmeans_iters=5, show_progress=False)
    grids = render_samples(family, {"all3": uniform_config(mq.layers, "kmeans_all-3")}, tmp_path, num=4, mq=mq,
                           tiny=True, device="cpu")
    assert list(grids) == ["fp16", "all3"] and all(p.exists() for p in grids.values())
    from PIL import Image

    fp, q = (np.asarray(Image.open(grids[k])) for k in ("fp16", "all3"))
    assert fp.shape == q.shape and not np.array_equal(fp, q)  # same seeds, different weights


def test_scored_configurations_are_classified_by_the_origin_their_files_record(tmp_path):
    """The search writes <model>_35_search.pkl; a predictor config may carry any name: the report classifies
    from the origin that build-config / search / the allocator write into the .json and eval-configs records."""
    import argparse

    from autobuild.configs import config_origin
    from autobuild.report import load_scored
    from multiquant.commands import named_configs
    from multiquant.config import config_record, save_config, uniform_config
    from multiquant.families import get_family
    from multiquant.layers import quantizable_layers
    from multiquant.store import RecordStore

    family = get_family("mnist_dit")
    layers = quantizable_layers(family.build("tiny"), family)
    written = {"mnist_dit_35_search": config_origin("search", "mnist_dit", 3.5, 3.49, fid=51.0),
               "greedy_looking_name": config_origin("built", "mnist_dit", 3.3, 3.28),
               "mnist_dit_mse_37bits": {"kind": "greedy", "budget": 3.7, "solver": "greedy"}}
    for i, (name, origin) in enumerate(written.items()):
        save_config(uniform_config(layers, ["mse-3", "kmeans-4", "kmeans_all-3"][i]), tmp_path / f"{name}.pkl",
                    origin=origin)
    save_config(uniform_config(layers, "mse-4"), tmp_path / "hand_made.pkl")  # records no origin
    paths = [str(tmp_path / f"{n}.pkl") for n in [*written, "hand_made"]]
    args = argparse.Namespace(configs=paths, uniform="kmeans-4", fp16=True)
    items = named_configs(args, layers)
    store = RecordStore(tmp_path / "run", {"kind": "given"})
    table = {r.key: {o: [o, r.numel * 2, r.numel // 2, 1.0] for o in ("mse-3", "mse-4", "kmeans-4", "kmeans_all-3")}
             for r in layers}
    for i, (name, config, origin) in enumerate(items):
        record = config_record(config, table, 16, sum(r.numel * 2 for r in layers))
        store.commit(i, {**record, "FID-GT-1k": 10.0 + i, "bops": 1.0, "index": i, "name": name,
                         **({"origin": origin} if origin else {})})
    kinds = {r["name"]: (r["kind"], r["budget"]) for r in load_scored([tmp_path / "run"], "mnist_dit")}
    assert kinds == {"mnist_dit_35_search": ("search", 3.5), "greedy_looking_name": ("built", 3.3),
                     "mnist_dit_mse_37bits": ("greedy", 3.7), "hand_made": ("other", None),
                     "uniform_kmeans-4": ("uniform", None), "fp16": ("fp16", None)}


def test_measured_plot_says_how_many_points_it_clips(tmp_path):
    from autobuild.report import _clip_y, plot_measured
    from multiquant.utils import pyplot

    rng = np.random.default_rng(3)
    records = [{"avg_bits": float(b), "FID-GT-1k": float(f)}
               for b, f in zip(rng.uniform(3.1, 4.5, 120), np.concatenate([rng.uniform(50, 150, 114), [4e3] * 6]))]
    plt = pyplot()
    fig, ax = plt.subplots()
    assert _clip_y(ax, records, []) == 6  # the six catastrophic ones sit above the 95th percentile
    assert ax.get_ylim()[1] < 4e3
    plt.close(fig)
    assert plot_measured(records, [], tmp_path / "m.png", "t").stat().st_size > 1000


def test_units_deeper_than_a_shallow_network_read_its_deepest_hop(tmp_path):
    """A 1-layer GNN has hop levels 0 and 1 only; block units span more hops and read hop 1 instead of failing."""
    from autobuild.dag import family_dag, units
    from autobuild.scores import unit_scores_for
    from autobuild.train import TrainOptions, train_predictor

    family, layers, table, records = _tiny_cache(24, seed=3)
    graph = family_dag("mnist_dit", "tiny")
    block_units = units(graph, "block")
    assert max(u.hops for u in block_units) > 1
    train_predictor(records, graph, "-1*FID-GT-1k", folds=2, epochs=2, batch_size=12, seed=0, out_dir=tmp_path / "p",
                    units=block_units, log=None,
                    options=TrainOptions(hidden=8, layers=1, patience=2, linear_prior=False))  # the hops, not the prior
    scores = unit_scores_for(tmp_path / "p", graph, table, "block", batch_variants=8192)
    assert all(np.isfinite(u.scores).all() and u.scores.std() > 0 for u in scores.units if len(u.scores) > 1)


def test_block_level_predicted_scores_never_drop_as_the_budget_grows(trained, tmp_path, capsys):
    """A larger budget can always keep the smaller budget's choice: at block level, alone or swept, the predicted
    score of the built configuration never drops; build-config says which level and target it used."""
    from multiquant.config import load_config_origin
    from qua2sedimo.cli import main

    block, table = trained["block"], trained["table"]
    budgets = [3.3 + 0.05 * i for i in range(19)]
    alone = [config_for_budget(block, table, b)[1].score for b in budgets]
    assert all(b >= a - 1e-9 for a, b in zip(alone, alone[1:]))
    assert alone[-1] > alone[0]  # the budget binds: the check can fail
    front = pareto_front(block, table, budgets)
    assert [p["level"] for p in front] == ["block"] * len(budgets)
    assert all(q["predicted_score"] >= p["predicted_score"] - 1e-9 for p, q in zip(front, front[1:]))
    (tmp_path / "table.json").write_text(json.dumps(table.table))
    capsys.readouterr()
    assert main(["build-config", "--predictor", str(trained["pred"]), "--mq", str(tmp_path / "table.json"),
                 "--size", "tiny", "--avg_bits", "3.6", "--out", str(tmp_path), "--name", "b36"]) == 0
    out = capsys.readouterr().out
    assert "block-level unit scores" in out and "(target '-1*FID-GT-1k')" in out
    origin = load_config_origin(tmp_path / "b36.pkl")
    assert (origin["level"], origin["target"]) == ("block", "-1*FID-GT-1k")
